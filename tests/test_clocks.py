"""Instances on hosts whose clocks disagree by 2 s either way: receive times and TTL cutoffs
come from one clock, PostgreSQL's, so expiry and the order of results do not move with the
skew. Each test fails on a service that reads its host's clock (see DatabaseClock)."""

from __future__ import annotations

import asyncio
from datetime import datetime

import asyncpg
import pytest
from aiohttp import web
from helpers.services import StartService, serve_app
from helpers.tables import objects
from helpers.waiting import all_done, eventually

from lastseen.devtools.clocks import ShiftedClock

TTL = 3.0


async def _upstream(online: dict[int, bool]) -> tuple[web.AppRunner, str]:
    async def answer(request: web.Request) -> web.Response:
        object_id = int(request.match_info["id"])
        return web.json_response({"id": object_id, "online": online.get(object_id, False)})

    app = web.Application()
    app.router.add_get("/objects/{id}", answer)
    return await serve_app(app)


async def test_an_object_lives_the_ttl_by_postgresqls_clock_whatever_the_hosts_say(
    sql: asyncpg.Connection, start_service: StartService
) -> None:
    """An ingest instance 2 s ahead and a worker (with the reaper) 2 s behind: the callback's
    receive time is PostgreSQL's at its arrival, and the object is deleted the TTL after it,
    not the 4 s of skew later (nor before)."""
    runner, url = await _upstream({6: True})
    try:
        front = await start_service(role="ingest", clock=ShiftedClock(2.0))
        await start_service(role="worker", objects_url=url, ttl=TTL, clock=ShiftedClock(-2.0))
        before: datetime = await sql.fetchval("SELECT clock_timestamp()")
        status, _ = await front.post('{"object_ids": [6]}')
        after: datetime = await sql.fetchval("SELECT clock_timestamp()")
        assert status == 202
        received: datetime = await sql.fetchval("SELECT received_at FROM callbacks")
        assert (before - received).total_seconds() < 0.25, (before, received)
        assert (received - after).total_seconds() < 0.25, (received, after)
        await all_done(sql, 1)
        last_seen = (await objects(sql))[6]
        assert last_seen == received
        gone = None
        async with asyncio.timeout(TTL + 10):
            while gone is None:
                now, present = await sql.fetchrow(
                    "SELECT clock_timestamp(), EXISTS (SELECT 1 FROM objects WHERE id = 6)"
                )
                if not present:
                    gone = now
                await asyncio.sleep(0.02)
        lived = (gone - last_seen).total_seconds()
        # Not before the TTL, but for the correction's error (half a loopback round trip, well
        # under 50 ms); and not the 2 s later a worker reading its own clock would delete it.
        assert TTL - 0.05 <= lived < TTL + 1.5, lived
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("ahead", [2.0, -2.0])
async def test_the_newer_callback_wins_across_instances_whose_clocks_disagree(
    sql: asyncpg.Connection, start_service: StartService, ahead: float
) -> None:
    """Two ingest instances, one ``ahead`` seconds off and one the other way: an object seen
    online in a callback to the first and, a second later, offline in one to the second
    ends offline (the newer callback is the one received later, by one clock), whichever of
    the two hosts runs ahead."""
    online = {8: True}
    runner, url = await _upstream(online)
    try:
        first = await start_service(role="ingest", clock=ShiftedClock(ahead))
        second = await start_service(role="ingest", clock=ShiftedClock(-ahead))
        await start_service(role="worker", objects_url=url, ttl=60.0)
        assert (await first.post('{"object_ids": [8]}'))[0] == 202
        await all_done(sql, 1)
        assert list(await objects(sql)) == [8]
        online[8] = False
        await asyncio.sleep(1.0)
        assert (await second.post('{"object_ids": [8]}'))[0] == 202
        await all_done(sql, 2)
        await eventually(lambda: _no_objects(sql), timeout=5)
        received = [r[0] for r in await sql.fetch("SELECT received_at FROM callbacks ORDER BY id")]
        assert 0.5 < (received[1] - received[0]).total_seconds() < 2.0, received
    finally:
        await runner.cleanup()


async def _no_objects(sql: asyncpg.Connection) -> bool:
    return not await objects(sql)
