"""The status page in a real browser: headless Chromium (Debian's ``chromium``) driven by
Playwright. Run by ``make test-browser``, which installs the browser when it is missing; the
page loads with no console error, follows callbacks as they arrive, retries and discards dead
letters, asks for the admin token once, and works under a proxy's path prefix on a narrow
screen. The first test photographs the page under load into its temporary directory;
`LASTSEEN_SCREENSHOT=docs/status-page.png make test-browser` refreshes the README's picture.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import shutil
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from helpers.services import Running, StartService, StartUpstream, serve_app
from playwright.async_api import (
    Browser,
    ConsoleMessage,
    Dialog,
    Page,
    Response,
    async_playwright,
    expect,
)

pytestmark = pytest.mark.browser

# Chromium in a closed network, as root, with no screen: no sandbox (root), and none of its
# own connections to the outside (each refused, noisily).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    executable = os.environ.get("LASTSEEN_CHROMIUM") or shutil.which("chromium")
    if executable is None:
        pytest.fail("no Chromium: `make test-browser` installs Debian's chromium")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield launched
        await launched.close()


class Watched:
    """A page whose console errors, uncaught exceptions and failed requests are kept, to be
    checked. Chromium also logs each answer of 400 or more as a console error; those are kept
    apart, by status and path, since some are expected (an object that is not online)."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.errors: list[str] = []
        self.failed: list[tuple[int, str]] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))
        page.on("response", self._response)

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            self.errors.append(message.text)

    def _response(self, response: Response) -> None:
        if response.status >= 400:
            self.failed.append((response.status, urlsplit(response.url).path))


async def _open(browser: Browser, url: str, width: int = 1280) -> Watched:
    page = await browser.new_page(viewport={"width": width, "height": 900})
    page.set_default_timeout(15_000)
    watched = Watched(page)
    await page.goto(url)
    return watched


async def _dead_letters(sql: asyncpg.Connection, *rows: tuple[int, int, str]) -> None:
    now = datetime.now(UTC)
    await sql.executemany(
        "INSERT INTO dead_letters (callback_id, object_id, received_at, reason, detail, attempts)"
        " VALUES ($1, $2, $3, $4, 'status 400: invalid id', 3)",
        [(callback, obj, now, reason) for callback, obj, reason in rows],
    )


async def _produce(service: Running, stop: asyncio.Event, rate: float = 20.0) -> int:
    """Callbacks of 40 ids out of 2,000 at ``rate`` per second until ``stop``."""
    rng = random.Random(7)
    sent = 0
    while not stop.is_set():
        ids = rng.sample(range(2000), 40)
        status, _ = await service.post(f'{{"object_ids": {ids}}}')
        assert status == 202
        sent += 1
        await asyncio.sleep(1 / rate)
    return sent


async def test_the_page_loads_and_follows_callbacks_as_they_arrive(
    browser: Browser, start_service: StartService, start_upstream: StartUpstream, tmp_path: Path
) -> None:
    """Opened at /, the page lands on /ui/, says the instance is ready, and its figures move
    as callbacks arrive and are processed: received, processed, lookups per second, online
    objects; no console error. Under that load it is photographed for the README."""
    _, upstream_url = await start_upstream(latency_min=0.3, latency_max=1.5, invalid_400=0.002)
    service = await start_service(objects_url=upstream_url, ttl=30.0, retry_max=0.2)
    watched = await _open(browser, service.url + "/")
    page = watched.page
    assert page.url.endswith("/ui/")
    await expect(page.locator("#state")).to_have_text("ready")
    await expect(page.locator("#received")).to_have_text("0")
    stop = asyncio.Event()
    load = asyncio.create_task(_produce(service, stop), name="producer")
    try:
        await expect(page.locator("#received")).not_to_have_text("0")
        await expect(page.locator("#processed")).not_to_have_text("0")
        await expect(page.locator("#lookup-rate")).not_to_have_text("0.0/s")
        await expect(page.locator("#online")).not_to_have_text("0")
        # Enough history for the sparklines to show the climb.
        await page.wait_for_timeout(12_000)
        shot = os.environ.get("LASTSEEN_SCREENSHOT") or str(tmp_path / "status-page.png")
        await page.screenshot(path=shot, full_page=True)
    finally:
        stop.set()
        sent = await load
    received = int((await page.locator("#received").text_content() or "0").replace(",", ""))
    assert 0 < received <= sent
    # The labels say what their figures are: the role as configured, one callback in the
    # singular, the retries against the lookups done (refused callbacks belong to receiving).
    assert (await page.locator("#instance").text_content() or "").endswith("· all")
    held, noun, *_ = (await page.locator("#active").text_content() or "").split(" ")
    assert noun == ("callback" if held == "1" else "callbacks")
    assert re.fullmatch(
        r"of [\d,]+ lookups? done", await page.locator("#retries-of").text_content() or ""
    )
    assert "newest received first" in (await page.locator("#dead-letters h2").text_content() or "")
    assert (watched.errors, watched.failed) == ([], [])


async def test_an_unreachable_upstream_is_named_on_the_page(
    browser: Browser, start_service: StartService
) -> None:
    """With nothing listening at the objects URL (a newcomer's `make run`), the page's
    upstream badge names the URL and the cause, connection refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"  # closed once the block ends
    service = await start_service(objects_url=url, ttl=30.0)
    assert (await service.post('{"object_ids": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]}'))[0] == 202
    watched = await _open(browser, service.url + "/ui/")
    badge = watched.page.locator("#upstream")
    await expect(badge).to_have_text(
        f"upstream failing (connection: connection refused) at {url}: lookups held",
        timeout=20_000,
    )
    assert (watched.errors, watched.failed) == ([], [])


async def test_retry_and_discard_buttons_act_on_one_callbacks_dead_letters(
    browser: Browser, start_service: StartService, sql: asyncpg.Connection
) -> None:
    """A dead letter's Retry button queues its ids again as a new callback (with retry_of) and
    removes it from the list; Discard, once confirmed, deletes the other callback's; a
    read-only page shows no buttons."""
    await _dead_letters(sql, (77, 5, "http_4xx"), (77, 6, "http_4xx"), (78, 9, "poison"))
    # An ingest-only instance: the requeued callback stays in the inbox to be looked at.
    service = await start_service(role="ingest", ttl=300.0)
    watched = await _open(browser, service.url + "/ui/")
    page = watched.page
    row = page.locator("#dead tbody tr[data-callback='77']")
    await expect(row).to_contain_text("5, 6")
    await row.get_by_role("button", name="Retry", exact=True).click()
    await expect(page.locator("#dead-message")).to_contain_text("queued again as callback")
    await expect(row).to_have_count(0)
    retried = await sql.fetch("SELECT object_ids, retry_of FROM callbacks")
    assert [(list(r["object_ids"]), r["retry_of"]) for r in retried] == [([5, 6], 77)]

    async def confirm(dialog: Dialog) -> None:
        await dialog.accept()

    page.once("dialog", confirm)
    other = page.locator("#dead tbody tr[data-callback='78']")
    await other.get_by_role("button", name="Discard", exact=True).click()
    await expect(page.locator("#dead-message")).to_contain_text("1 dead letters discarded")
    await expect(page.locator("#dead-empty")).to_be_visible()
    assert await sql.fetchval("SELECT count(*) FROM dead_letters") == 0
    assert (watched.errors, watched.failed) == ([], [])

    await _dead_letters(sql, (79, 1, "poison"))
    read_only = await start_service(role="ingest", ui="read")
    watched = await _open(browser, read_only.url + "/ui/")
    await expect(watched.page.locator("#dead tbody tr[data-callback='79']")).to_be_visible()
    await expect(watched.page.get_by_role("button", name="Retry")).to_have_count(0)
    await expect(watched.page.get_by_role("button", name="Retry all shown")).to_be_hidden()
    assert (watched.errors, watched.failed) == ([], [])


async def test_the_page_asks_for_the_admin_token_once(
    browser: Browser, start_service: StartService
) -> None:
    """With an admin token set, the page asks for it; a wrong one is refused with a message;
    the right one opens the page, and a reload in the same tab does not ask again."""
    service = await start_service(role="ingest", admin_token="s3cret-token")
    page = await browser.new_page()
    page.set_default_timeout(15_000)
    await page.goto(service.url + "/ui/")
    await expect(page.locator("#login")).to_be_visible()
    await expect(page.locator("#main")).to_be_hidden()
    await page.locator("#token").fill("wrong")
    await page.get_by_role("button", name="Open").click()
    await expect(page.locator("#login-error")).to_be_visible()
    await page.locator("#token").fill("s3cret-token")
    await page.get_by_role("button", name="Open").click()
    await expect(page.locator("#main")).to_be_visible()
    await expect(page.locator("#state")).to_have_text("ready")
    await page.reload()
    await expect(page.locator("#main")).to_be_visible()
    await expect(page.locator("#login")).to_be_hidden()


async def _prefix_proxy(target: str, prefix: str) -> tuple[web.AppRunner, str]:
    """A reverse proxy that serves ``target`` under ``prefix`` (stripped on the way in)."""
    session = aiohttp.ClientSession()
    kept = ("authorization", "content-type", "location", "content-security-policy")

    async def forward(request: web.Request) -> web.Response:
        async with session.request(
            request.method,
            f"{target}/{request.match_info['tail']}",
            params=request.query,
            headers={k: v for k, v in request.headers.items() if k.lower() in kept},
            data=await request.read(),
            allow_redirects=False,
        ) as answer:
            body = await answer.read()
            headers = {k: v for k, v in answer.headers.items() if k.lower() in kept}
            return web.Response(status=answer.status, body=body, headers=headers)

    async def close(app: web.Application) -> None:
        await session.close()

    app = web.Application()
    app.router.add_route("*", prefix + "/{tail:.*}", forward)
    app.on_cleanup.append(close)
    return await serve_app(app)


async def test_the_page_works_under_a_path_prefix_on_a_narrow_screen(
    browser: Browser, start_service: StartService, sql: asyncpg.Connection
) -> None:
    """Behind a proxy that serves the instance under /ops/lastseen, on a 390-pixel screen: the
    page loads from the prefix, finds an object by id, shows dead letters as cards, and
    nothing is wider than the screen."""
    await sql.execute("INSERT INTO objects (id, last_seen) VALUES (4242, now())")
    await _dead_letters(sql, (90, 1, "http_5xx"))
    service = await start_service(role="ingest", ttl=300.0)
    runner, proxy = await _prefix_proxy(service.url, "/ops/lastseen")
    try:
        watched = await _open(browser, proxy + "/ops/lastseen/", width=390)
        page = watched.page
        assert page.url == proxy + "/ops/lastseen/ui/"
        await expect(page.locator("#state")).to_have_text("ready")
        await expect(page.locator("#dead tbody tr[data-callback='90']")).to_be_visible()
        await page.locator("#object-id").fill("4242")
        await page.get_by_role("button", name="Find").click()
        await expect(page.locator("#object-result")).to_contain_text("Object 4242 is online")
        await page.locator("#object-id").fill("4243")
        await page.get_by_role("button", name="Find").click()
        await expect(page.locator("#object-result")).to_contain_text("4243 is not online")
        widths = await page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        assert widths[0] <= widths[1], widths
        assert await page.locator("#dead thead").is_hidden()
        assert watched.errors == []
        assert watched.failed == [(404, "/ops/lastseen/objects/4243")]
    finally:
        await runner.cleanup()
