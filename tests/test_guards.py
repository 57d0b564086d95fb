"""Requests a browser was tricked into sending, text PostgreSQL cannot hold, every int64 id,
numbers and times as the OpenAPI document writes them."""

from __future__ import annotations

import asyncpg
from helpers.services import StartService


async def _dead_letter(sql: asyncpg.Connection) -> None:
    await sql.execute(
        "INSERT INTO dead_letters (callback_id, object_id, received_at, reason, detail, attempts)"
        " VALUES (1, 10, now(), 'http_4xx', '', 1)"
    )


async def test_a_cross_site_post_is_refused_with_or_without_an_admin_token(
    start_service: StartService, sql: asyncpg.Connection
) -> None:
    """With no admin token (the loopback default) and with one: a discard marked cross-site by
    Sec-Fetch-Site or by a foreign Origin is 403, a non-JSON body 415, and the dead letter
    stays; the same request from the page's own origin goes through."""
    await _dead_letter(sql)
    for token in (None, "admin-secret"):
        service = await start_service(role="ingest", admin_token=token)
        auth = {} if token is None else {"Authorization": f"Bearer {token}"}
        url = service.url + "/dead-letters/discard"
        body = b'{"reason": "http_4xx"}'
        json_type = {"Content-Type": "application/json"}
        refusals = [
            ({**json_type, "Sec-Fetch-Site": "cross-site"}, 403),
            ({**json_type, "Origin": "http://evil.example"}, 403),
            ({**json_type, "Origin": "null"}, 403),
            ({"Content-Type": "text/plain"}, 415),
            ({}, 415),
        ]
        for headers, status in refusals:
            async with service.http.post(url, data=body, headers={**auth, **headers}) as response:
                assert response.status == status, headers
                assert (await response.json())["error"] in ("cross_site", "unsupported_media_type")
        assert await sql.fetchval("SELECT count(*) FROM dead_letters") == 1
        own = {**auth, **json_type, "Origin": service.url, "Sec-Fetch-Site": "same-origin"}
        async with service.http.post(url, data=body, headers={**own}) as response:
            assert response.status == 200
            assert (await response.json())["discarded"] == 1
        await _dead_letter(sql)


async def test_a_cross_site_callback_is_refused(
    start_service: StartService, sql: asyncpg.Connection
) -> None:
    """POST /callback from a page of another site stores nothing; a producer's (no Origin) is
    taken."""
    service = await start_service(role="ingest")
    status, answer = await service.post('{"object_ids": [1]}', headers={"Origin": "http://x.test"})
    assert (status, answer["error"]) == (403, "cross_site")
    assert (await service.post('{"object_ids": [1]}'))[0] == 202
    assert await sql.fetchval("SELECT count(*) FROM callbacks") == 1


async def test_text_postgresql_cannot_hold_is_a_400(start_service: StartService) -> None:
    """A NUL byte or bytes that are not UTF-8 in a text filter: 400 saying so, not
    a database error taken for an outage."""
    service = await start_service(role="ingest")
    for query in ("reason=%C3%A5%00&callback_id=3", "reason=%FF", "%00=1"):
        status, answer = await service.get("/dead-letters?" + query)
        assert (status, answer["error"]) == (400, "bad_query"), query


async def test_objects_lists_every_int64_id(
    start_service: StartService, sql: asyncpg.Connection
) -> None:
    """The least and the greatest int64 are listed, on the first page and after a cursor."""
    low, high = -(2**63), 2**63 - 1
    await sql.execute(
        "INSERT INTO objects (id, last_seen) VALUES ($1, now()), (0, now()), ($2, now())",
        low,
        high,
    )
    service = await start_service(role="ingest")
    status, page = await service.get("/objects?limit=2")
    assert status == 200
    assert [o["id"] for o in page["objects"]] == [low, 0]
    status, page = await service.get(f"/objects?after={page['next_after']}")
    assert [o["id"] for o in page["objects"]] == [high]


async def test_a_nul_byte_in_a_body_s_filter_is_a_400(start_service: StartService) -> None:
    """The same text in a retry's JSON body: 400, not a database error."""
    service = await start_service(role="ingest")
    async with service.http.post(
        service.url + "/dead-letters/retry", json={"reason": "a\x00b"}
    ) as response:
        assert response.status == 400
        assert (await response.json())["error"] == "bad_request"


async def test_numbers_are_taken_as_the_document_writes_them(
    start_service: StartService, sql: asyncpg.Connection
) -> None:
    """Ids and limits written as floats with no fraction (``7.0``, ``1e3``: integers to JSON
    Schema) are those integers; ``7.5`` is refused. Integers in a query or a path are plain
    decimals: ``7_000``, `` 7`` and other scripts' digits are 400."""
    service = await start_service(role="ingest")
    assert (await service.post('{"object_ids": [7.0, 1e3, -2]}'))[0] == 202
    assert await sql.fetchval("SELECT object_ids FROM callbacks") == [7, 1000, -2]
    status, answer = await service.post('{"object_ids": [7.5]}')
    assert (status, answer["error"]) == (400, "invalid_id")
    async with service.http.post(
        service.url + "/dead-letters/retry", json={"limit": 5.0, "callback_id": 1.0}
    ) as response:
        assert response.status == 200, await response.text()
    for path in ("/objects?after=7_000", "/objects?limit=%207", "/objects/%EF%BC%97"):
        status, answer = await service.get(path)
        assert status == 400, path
        assert answer["error"] in ("bad_query", "bad_id"), path


async def test_times_and_cursors_are_taken_as_the_document_writes_them(
    start_service: StartService,
) -> None:
    """A time filter is an ISO 8601 date-time or epoch seconds: an empty one and ``1e5`` are
    400; a date-time that falls off the calendar in UTC stands for the calendar's edge (never
    a 500); a cursor of the documented form whose ids pass 64 bits is still a position."""
    service = await start_service(role="ingest")
    good = (
        "received_after=1700000000.5",
        "received_before=2026-12-02T10:00:00%2B01:00",
        "received_after=0001-01-01T00:00:00%2B05:00",
        "received_before=9999-12-31T23:59:59-05:00",
    )
    for query in good:
        assert (await service.get("/dead-letters?" + query))[0] == 200, query
    bad = ("received_after=", "received_after=1e5")
    for query in bad:
        status, answer = await service.get("/dead-letters?" + query)
        assert (status, answer["error"]) == (400, "bad_filter"), query
    status, _ = await service.get("/dead-letters?after=1/9999999999999999999/-9999999999999999999")
    assert status == 200
    status, answer = await service.get("/dead-letters?after=2026-12-02/1/2")
    assert (status, answer["error"]) == (400, "bad_cursor")


async def test_an_empty_body_is_not_taken_for_every_dead_letter(
    start_service: StartService, sql: asyncpg.Connection
) -> None:
    """A discard with an empty (or blank) body is 400, and the dead letter stays: ``{}`` is
    how to ask for all of them, as the document says (the body is required)."""
    await _dead_letter(sql)
    service = await start_service(role="ingest")
    for body in (b"", b"\r\n"):
        async with service.http.post(
            service.url + "/dead-letters/discard",
            data=body,
            headers={"Content-Type": "application/json"},
        ) as response:
            assert response.status == 400
            assert (await response.json())["error"] == "malformed_json"
    assert await sql.fetchval("SELECT count(*) FROM dead_letters") == 1
