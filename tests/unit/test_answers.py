"""The upstream's rules (upstream/answers.py): what each answer says, and which failures are
retried; the lookups' client against a real HTTP server on a free loopback port."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from helpers.services import serve_app

from lastseen.core.errors import LookupFailed
from lastseen.upstream.answers import Upstream
from lastseen.upstream.client import UpstreamClient


async def _answer(request: web.Request) -> web.Response:
    object_id = int(request.match_info["id"])
    if object_id == 1:
        return web.json_response({"id": 1, "online": True})
    if object_id == 2:
        return web.json_response({"id": 2, "online": False})
    if object_id == 3:
        return web.json_response({"id": 4, "online": True})  # about another id
    if object_id == 4:
        return web.Response(text="<html>busy</html>")
    return web.Response(status=object_id, text="no")  # the id is the status


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    app = web.Application()
    app.router.add_get("/objects/{id}", _answer)
    runner, url = await serve_app(app)
    client = UpstreamClient(url, timeout=5.0)
    yield Upstream(client)
    await client.close()
    await runner.cleanup()


async def ask(upstream: Upstream, object_id: int) -> bool | LookupFailed:
    answered: asyncio.Future[bool | LookupFailed] = asyncio.get_running_loop().create_future()
    upstream.ask(object_id, answered.set_result)
    return await answered


async def test_an_answer_about_the_object_says_whether_it_is_online(upstream: Upstream) -> None:
    assert await ask(upstream, 1) is True
    assert await ask(upstream, 2) is False


@pytest.mark.parametrize(
    ("object_id", "reason"),
    [
        (3, "wrong_id"),
        (4, "malformed_body"),
        (500, "http_5xx"),
        (503, "http_5xx"),
        (429, "http_429"),
        (408, "http_408"),
        (301, "http_3xx"),
    ],
)
async def test_answers_that_may_change_are_transient(
    upstream: Upstream, object_id: int, reason: str
) -> None:
    """Retried: the upstream's trouble, or a connection out of step (an answer about another
    id, a body that is not an object)."""
    outcome = await ask(upstream, object_id)
    assert isinstance(outcome, LookupFailed)
    assert (outcome.reason, outcome.permanent) == (reason, False)


@pytest.mark.parametrize("status", [400, 404, 410])
async def test_other_4xx_are_permanent(upstream: Upstream, status: int) -> None:
    """The upstream's word that the request itself is wrong: dead-lettered, not retried."""
    outcome = await ask(upstream, status)
    assert isinstance(outcome, LookupFailed)
    assert (outcome.reason, outcome.permanent) == ("http_4xx", True)
    assert "no" in outcome.detail


async def test_no_server_is_a_transient_connection_failure() -> None:
    client = UpstreamClient("http://127.0.0.1:9", timeout=5.0)
    try:
        outcome = await ask(Upstream(client), 1)
    finally:
        await client.close()
    assert isinstance(outcome, LookupFailed)
    assert (outcome.reason, outcome.permanent) == ("connection", False)
