"""The status page's server side: the JSON status route, the page's files and modes, the
admin token, and the dead-letter pages it walks. The page itself, in a browser, is tested in
tests/browser (``make test-browser``)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from helpers.services import Running, StartService, StartUpstream


async def _status(service: Running, **headers: str) -> dict[str, Any]:
    async with service.http.get(service.url + "/status", headers=headers) as response:
        assert response.status == 200, await response.text()
        answer: dict[str, Any] = await response.json()
        return answer


async def test_the_status_route_follows_callbacks_to_their_results(
    start_service: StartService, start_upstream: StartUpstream
) -> None:
    """GET /status counts the callbacks received and processed, the lookups and the online
    objects, and keeps one history point per sample; asked again within the sampling interval,
    it answers the same sample (any number of viewers cost one)."""
    _, upstream_url = await start_upstream()
    service = await start_service(objects_url=upstream_url, ttl=30.0)
    board = service.service.status
    assert board is not None
    first = await _status(service)
    assert first["totals"]["received"] == 0
    assert first["ready"]["ready"] is True
    assert first["ui"] == "full"
    again = await _status(service)
    assert again["at"] == first["at"]

    for ids in ([2, 4, 6], [4, 8]):
        assert (await service.post(f'{{"object_ids": {ids}}}'))[0] == 202
    async with asyncio.timeout(10):
        while True:
            await asyncio.sleep(board.sample_every)
            now = await _status(service)
            if now["totals"]["processed"] == 2 and now["objects_online"] == 4:
                break
    assert now["totals"]["received"] == 2
    assert now["totals"]["lookups"] >= 4
    assert now["inbox"]["pending"] == 0
    assert now["latency"]["lookup"]["p99"] is not None
    assert len(now["history"]) >= 2
    at, received_rate, *_ = now["history"][-1]
    assert at == now["at"]
    assert received_rate >= 0


async def test_the_page_is_served_in_full_or_read_mode_and_not_when_off(
    start_service: StartService,
) -> None:
    """With LASTSEEN_UI=full or read, / leads to ui/ (a relative address, so a proxy's prefix
    is kept) and the page's files are served with a strict content security policy; the
    status route says which mode the page is in. With off, the page is not there."""
    for mode in ("full", "read"):
        service = await start_service(role="ingest", ui=mode)
        async with service.http.get(service.url + "/", allow_redirects=False) as response:
            assert (response.status, response.headers["Location"]) == (302, "ui/")
        async with service.http.get(service.url + "/ui/") as response:
            assert response.status == 200
            assert response.content_type == "text/html"
            assert "script-src 'self'" in response.headers["Content-Security-Policy"]
            assert 'src="app.js"' in await response.text()
        for asset, kind in (("app.js", "text/javascript"), ("app.css", "text/css")):
            async with service.http.get(f"{service.url}/ui/{asset}") as response:
                assert (response.status, response.content_type) == (200, kind)
        assert (await service.get("/ui/other.js"))[0] == 404
        assert (await _status(service))["ui"] == mode
    off = await start_service(role="ingest", ui="off")
    for path in ("/", "/ui/", "/ui/app.js"):
        assert (await off.get(path))[0] == 404, path
    assert (await _status(off))["ui"] == "off"


async def test_the_admin_token_guards_the_figures_not_the_page_files(
    start_service: StartService,
) -> None:
    """With an admin token, /status needs it; the page's files (code, no data) do not, so
    the page can load and ask for the token."""
    service = await start_service(role="ingest", admin_token="adm1n")
    status, answer = await service.get("/status")
    assert (status, answer["error"]) == (401, "unauthorized")
    assert (await _status(service, Authorization="Bearer adm1n"))["role"] == "ingest"
    for path in ("/ui/", "/ui/app.js", "/ui/app.css"):
        async with service.http.get(service.url + path) as response:
            assert response.status == 200, path


async def test_dead_letters_are_listed_a_page_at_a_time(
    start_service: StartService, sql: asyncpg.Connection
) -> None:
    """GET /dead-letters pages with next_after: the pages hold every matching dead letter
    exactly once, newest received first, also when several share a receive time; a made-up
    cursor is a 400."""
    now = datetime.now(UTC)
    rows = [(c, o, now, "http_4xx" if o % 3 else "poison") for c in (1, 2) for o in range(7)]
    rows.append((3, 1, now - timedelta(seconds=5), "http_4xx"))
    await sql.executemany(
        "INSERT INTO dead_letters (callback_id, object_id, received_at, reason, detail, "
        "attempts, created_at) VALUES ($1, $2, $3, $4, '', 1, $3)",
        rows,
    )
    service = await start_service(role="ingest")
    for reason, expected in ((None, len(rows)), ("http_4xx", 9)):
        seen: list[tuple[int, int]] = []
        after: str | None = None
        pages = 0
        while True:
            query = "limit=3" + (f"&reason={reason}" if reason else "")
            async with service.http.get(
                service.url + "/dead-letters?" + query, params={"after": after} if after else None
            ) as response:
                assert response.status == 200
                page = await response.json()
            pages += 1
            seen += [(d["callback_id"], d["object_id"]) for d in page["dead_letters"]]
            after = page["next_after"]
            if after is None:
                break
        assert len(seen) == expected == len(set(seen))
        assert seen[-1] == (3, 1)  # received first: listed last
        assert seen[:-1] == sorted(seen[:-1], reverse=True)  # then by callback and id
        assert pages == expected // 3 + 1
    status, answer = await service.get("/dead-letters?after=2026-01-01/x/1")
    assert (status, answer["error"]) == (400, "bad_cursor")
