"""The pipeline end to end in one process: real PostgreSQL, real upstream, compressed time."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import defaultdict
from datetime import datetime

import asyncpg
from aiohttp import web
from helpers.services import StartService, StartUpstream, serve_app
from helpers.tables import objects, received_at
from helpers.waiting import all_done, eventually


async def test_objects_hold_exactly_the_online_ids_with_their_last_receive_time(
    start_service: StartService, start_upstream: StartUpstream, sql: asyncpg.Connection
) -> None:
    """After callbacks are processed, objects holds the even (online) ids, each with the
    receive time of the newest callback that named it."""
    _, url = await start_upstream()
    service = await start_service(objects_url=url, ttl=30)
    callbacks = [[0, 1, 2, 3, 4], [4, 5, 6, 6, 7], [], [2, 9, 10]]
    newest: dict[int, int] = {}
    for ids in callbacks:
        status, answer = await service.post(json.dumps({"object_ids": ids}))
        assert status == 202
        for object_id in ids:
            newest[object_id] = answer["callback_id"]
    await all_done(sql, len(callbacks))
    expected = {i: await received_at(sql, cb) for i, cb in newest.items() if i % 2 == 0}
    assert await objects(sql) == expected
    assert service.sample("lastseen_lookups_total", outcome="online") >= 5
    await eventually(lambda: service.sample("lastseen_callbacks_completed_total") == 4)


async def test_read_api_lists_and_gets_objects(
    start_service: StartService, start_upstream: StartUpstream, sql: asyncpg.Connection
) -> None:
    """GET /objects pages through the online objects; GET /objects/{id} gets one or 404."""
    _, url = await start_upstream()
    service = await start_service(objects_url=url, ttl=30)
    await service.post(json.dumps({"object_ids": list(range(10))}))
    await all_done(sql, 1)
    status, page = await service.get("/objects?limit=3")
    assert status == 200
    assert [o["id"] for o in page["objects"]] == [0, 2, 4]
    status, page = await service.get(f"/objects?limit=3&after={page['next_after']}")
    assert [o["id"] for o in page["objects"]] == [6, 8]
    assert page["next_after"] is None
    status, one = await service.get("/objects/8")
    assert status == 200
    assert one["id"] == 8
    assert datetime.fromisoformat(one["last_seen"]) == (await objects(sql))[8]
    assert (await service.get("/objects/7"))[0] == 404
    assert (await service.get("/objects/x"))[0] == 400
    assert (await service.get("/objects?limit=0"))[0] == 400


async def test_offline_after_online_and_back(
    start_service: StartService, start_upstream: StartUpstream, sql: asyncpg.Connection
) -> None:
    """An object found offline is removed, and comes back when found online again."""
    state = {5: True}
    _, url = await start_upstream(online=lambda object_id, now: state[object_id])
    service = await start_service(objects_url=url, ttl=30)

    async def post_and_wait(n: int) -> int:
        _, answer = await service.post('{"object_ids": [5]}')
        await all_done(sql, n)
        return int(answer["callback_id"])

    first = await post_and_wait(1)
    assert await objects(sql) == {5: await received_at(sql, first)}
    state[5] = False
    await post_and_wait(2)
    assert await objects(sql) == {}
    state[5] = True
    third = await post_and_wait(3)
    assert await objects(sql) == {5: await received_at(sql, third)}


class HeldUpstream:
    """An upstream whose first request for each id is held until ``release`` is set (or 5 s
    pass, so that a test whose race did not happen ends, and says so); every later request is
    answered at once. The n-th answer for an id is ``script[id][n]``; it counts the requests
    per id, the requests in flight, and the order of the answers."""

    def __init__(self, script: dict[int, list[bool]]) -> None:
        self.script = script
        self.release = asyncio.Event()
        self.requests: defaultdict[int, int] = defaultdict(int)
        self.in_flight = 0
        self.most_in_flight = 0
        self.answered: list[tuple[int, int]] = []  # (id, n) in the order answered

    async def handle(self, request: web.Request) -> web.Response:
        object_id = int(request.match_info["object_id"])
        n = self.requests[object_id]
        self.requests[object_id] += 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if n == 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.release.wait(), 5)
            return web.json_response({"id": object_id, "online": self.script[object_id][n]})
        finally:
            self.in_flight -= 1
            self.answered.append((object_id, n))

    async def serve(self) -> tuple[str, web.AppRunner]:
        app = web.Application()
        app.router.add_get("/objects/{object_id}", self.handle)
        runner, url = await serve_app(app)
        return url, runner


async def test_an_older_result_finishing_last_does_not_win(
    start_service: StartService, sql: asyncpg.Connection
) -> None:
    """Callback A's answers (1 online, 2 offline) are held until callback B's (1 offline,
    2 online) are answered and written; A's, older, arrive last. B is newer, so 1 ends absent
    and 2 online with B's receive time."""
    upstream = HeldUpstream({1: [True, False], 2: [False, True]})
    url, runner = await upstream.serve()
    try:
        # Held requests must not time out: a retry would be a request of its own.
        service = await start_service(objects_url=url, ttl=30, lookup_timeout=30)
        _, a = await service.post('{"object_ids": [1, 2]}')
        # Once A's requests are under way, B cannot join them and gets requests of its own.
        await eventually(lambda: upstream.requests[1] == 1 and upstream.requests[2] == 1)
        _, b = await service.post('{"object_ids": [1, 2]}')
        b_received = await received_at(sql, b["callback_id"])
        await eventually(lambda: _done(sql, b["callback_id"]))
        assert await objects(sql) == {2: b_received}
        # The race happened: A's requests were sent first and are still unanswered, with B's
        # results already written.
        assert upstream.in_flight == 2
        assert not await _done(sql, a["callback_id"])
        upstream.release.set()
        await all_done(sql, 2)
        assert sorted(upstream.answered[:2]) == [(1, 1), (2, 1)]
        assert sorted(upstream.answered[2:]) == [(1, 0), (2, 0)]
        assert await objects(sql) == {2: b_received}
    finally:
        await runner.cleanup()


async def _done(sql: asyncpg.Connection, callback_id: int) -> bool:
    done_at = await sql.fetchval("SELECT done_at FROM callbacks WHERE id = $1", callback_id)
    return done_at is not None


async def test_coalescing_under_a_backlog_asks_once_per_distinct_id(
    start_service: StartService, start_upstream: StartUpstream, sql: asyncpg.Connection
) -> None:
    """Ten waiting callbacks naming the same 20 ids cost 20 lookups, not 200."""
    upstream, url = await start_upstream()
    ingest = await start_service(role="ingest")
    for _ in range(10):
        assert (await ingest.post(json.dumps({"object_ids": list(range(20))})))[0] == 202
    worker = await start_service(role="worker", objects_url=url, ttl=30)
    await all_done(sql, 10)
    assert upstream.stats["requests"] == 20
    assert worker.sample("lastseen_lookups_coalesced_total") == 180
    assert sorted(await objects(sql)) == list(range(0, 20, 2))


async def test_a_lookup_sent_before_a_callback_does_not_serve_it(
    start_service: StartService, sql: asyncpg.Connection
) -> None:
    """A callback received while its id's lookup is already under way gets a lookup of its own,
    and the object ends with the later callback's receive time. The first request is held
    until the second has arrived: both are in flight at once, so the second callback met the
    first lookup under way and did not join it."""
    upstream = HeldUpstream({8: [True, True]})
    url, runner = await upstream.serve()
    try:
        service = await start_service(objects_url=url, ttl=30, lookup_timeout=30)
        await service.post('{"object_ids": [8]}')
        await eventually(lambda: upstream.requests[8] == 1)
        _, later = await service.post('{"object_ids": [8]}')
        await eventually(lambda: upstream.requests[8] == 2)
        upstream.release.set()
        await all_done(sql, 2)
        assert upstream.most_in_flight == 2
        assert upstream.answered == [(8, 1), (8, 0)]
        assert service.sample("lastseen_lookups_coalesced_total") == 0
        assert await objects(sql) == {8: await received_at(sql, later["callback_id"])}
    finally:
        await runner.cleanup()


async def test_objects_expire_between_ttl_and_ttl_plus_1s(
    start_service: StartService, start_upstream: StartUpstream, sql: asyncpg.Connection
) -> None:
    """An object is deleted no sooner than the TTL after its last callback, and within 1 s more."""
    _, url = await start_upstream(latency_min=0.01, latency_max=0.02)
    service = await start_service(objects_url=url, ttl=1.0, reap_interval=0.05)
    _, answer = await service.post('{"object_ids": [2, 4]}')
    received = (await received_at(sql, answer["callback_id"])).timestamp()
    await eventually(lambda: _has_objects(sql), timeout=5)
    await eventually(lambda: _no_objects(sql), timeout=5, every=0.005)
    gone = time.time()
    assert 1.0 <= gone - received < 2.0
    # The counter moves just after the commit the test sees, so it is waited for too.
    await eventually(lambda: service.sample("lastseen_objects_deleted_total", cause="expired") == 2)


async def _has_objects(sql: asyncpg.Connection) -> bool:
    return bool(await sql.fetchval("SELECT count(*) FROM objects"))


async def _no_objects(sql: asyncpg.Connection) -> bool:
    return not await _has_objects(sql)
