"""What failures cost: retries, outages, poison, crashes and takeovers, a hostile upstream; real
PostgreSQL, real upstreams, compressed time. The lookups' own decisions (retried for as long as
the answer can matter, an outage's probes and release) are tests/unit/test_lookups.py's; which
answers are retried, tests/unit/test_answers.py's."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from helpers.cli import run_cli
from helpers.services import Spawn, StartService, StartUpstream, serve_app
from helpers.tables import objects, received_at
from helpers.waiting import all_done, eventually

from lastseen.devtools.simulate import hostile
from lastseen.telemetry.promtext import Reading


@pytest.mark.parametrize(
    "faults",
    [("error_5xx", "error_5xx"), ("malformed",), ("hang",), ("drop",), ("error_5xx", "hang")],
)
async def test_transient_failures_are_retried(
    start_service: StartService,
    start_upstream: StartUpstream,
    sql: asyncpg.Connection,
    faults: tuple[str, ...],
) -> None:
    """5xx, bodies that do not parse, timeouts and dropped connections are retried until an
    answer comes; nothing is dead-lettered."""
    upstream, url = await start_upstream(first_faults=faults, hang_seconds=5)
    service = await start_service(objects_url=url, ttl=30, lookup_timeout=0.3)
    await service.post('{"object_ids": [2, 3]}')
    await all_done(sql, 1)
    assert upstream.requests_by_id[2] == len(faults) + 1
    assert sorted(await objects(sql)) == [2]
    assert await sql.fetchval("SELECT count(*) FROM dead_letters") == 0
    retries = sum(
        service.sample("lastseen_lookup_retries_total", reason=reason)
        for reason in ("http_5xx", "malformed_body", "timeout", "connection")
    )
    # Each fault of each id is one retry. A connection dropped after it came back to the pool
    # would be sent again before it counted (upstream/client.py), but an id's first request
    # goes on a new one: no connection has answered, so none is in the pool yet.
    assert retries == 2 * len(faults)


async def test_callbacks_older_than_the_ttl_cost_no_lookup(
    start_service: StartService, start_upstream: StartUpstream, sql: asyncpg.Connection
) -> None:
    """Pending callbacks that are older than the TTL when their turn comes (a backlog after an
    outage) are completed without lookups, in bulk, and counted; a fresh one is looked up."""
    upstream, url = await start_upstream()
    await sql.execute(
        "INSERT INTO callbacks (received_at, object_ids, locked_until)"
        " SELECT now() - interval '1 minute', '{2,4}', now() FROM generate_series(1, 50)"
    )
    service = await start_service(objects_url=url, ttl=30)
    await service.post('{"object_ids": [6]}')
    await all_done(sql, 51)
    assert service.sample("lastseen_callbacks_expired_total") == 50
    assert upstream.requests_by_id[2] == upstream.requests_by_id[4] == 0
    assert sorted(await objects(sql)) == [6]
    assert await sql.fetchval("SELECT count(*) FROM dead_letters") == 0


async def test_a_callback_claimed_too_often_is_set_aside_as_poison(
    start_service: StartService, start_upstream: StartUpstream, sql: asyncpg.Connection
) -> None:
    """A callback already claimed LASTSEEN_MAX_CLAIMS times without finishing (each time its
    worker died) is not worked on again: its ids are dead-lettered as poison and it is done,
    while the other callbacks flow."""
    upstream, url = await start_upstream()
    await sql.execute(
        "INSERT INTO callbacks (received_at, object_ids, locked_until, claims)"
        " VALUES (now(), '{2,4}', now(), 3)"
    )
    service = await start_service(objects_url=url, ttl=30, max_claims=3)
    await service.post('{"object_ids": [6]}')
    await all_done(sql, 2)
    rows = await sql.fetch("SELECT object_id, reason FROM dead_letters ORDER BY object_id")
    assert [(r["object_id"], r["reason"]) for r in rows] == [(2, "poison"), (4, "poison")]
    assert sorted(await objects(sql)) == [6]
    assert upstream.requests_by_id[2] == upstream.requests_by_id[4] == 0


async def test_a_4xx_is_dead_lettered(
    start_service: StartService, start_upstream: StartUpstream, sql: asyncpg.Connection
) -> None:
    """A 4xx (the upstream's word that the request is wrong) dead-letters the id at once for
    each callback that named it, with the reason and the attempt; the callbacks complete."""
    _, url = await start_upstream(invalid_400=1.0)
    service = await start_service(objects_url=url, ttl=30)
    _, first = await service.post('{"object_ids": [1, 2]}')
    await all_done(sql, 1)
    rows = await sql.fetch("SELECT * FROM dead_letters ORDER BY object_id")
    assert [(r["callback_id"], r["object_id"]) for r in rows] == [
        (first["callback_id"], 1),
        (first["callback_id"], 2),
    ]
    assert {r["reason"] for r in rows} == {"http_4xx"}
    assert {r["attempts"] for r in rows} == {1}
    assert service.sample("lastseen_dead_letters_total", reason="http_4xx") == 2
    assert await objects(sql) == {}


async def test_an_upstream_outage_costs_no_row_and_ends_at_once(
    start_service: StartService, sql: asyncpg.Connection
) -> None:
    """The upstream answers 500 to everything for longer than the TTL while the same ids keep
    arriving: no row disappears meanwhile (pending callbacks protect them), the service says
    it sees an outage (a metric, and /ready, which stays 200), and once the upstream answers
    again every id catches up with a callback received after the recovery within a second."""
    ids = list(range(0, 40, 2))
    state = {"down": False}

    async def answer(request: web.Request) -> web.Response:
        if state["down"]:
            return web.Response(status=500)
        object_id = int(request.match_info["id"])
        return web.json_response({"id": object_id, "online": object_id % 2 == 0})

    app = web.Application()
    app.router.add_get("/objects/{id}", answer)
    runner, url = await serve_app(app)
    # Backoffs that stretch to 30 s: only the outage's probing can make the recovery quick.
    service = await start_service(
        objects_url=url, ttl=2.0, reap_interval=0.05, retry_base=0.1, retry_max=30
    )
    body = json.dumps({"object_ids": ids})
    sending = True

    async def produce() -> None:
        while sending:
            await service.post(body)
            await asyncio.sleep(0.2)

    producer = asyncio.create_task(produce())
    try:
        await eventually(lambda: service.sample("lastseen_objects_upserted_total") >= len(ids))
        state["down"] = True
        outage_ends = time.monotonic() + 3.0
        while time.monotonic() < outage_ends:
            assert sorted(await objects(sql)) == ids
            await asyncio.sleep(0.1)
        assert service.sample("lastseen_upstream_outage") == 1
        cause = "http_5xx: status 500"
        assert service.sample("lastseen_upstream_failure", cause=cause) == 1

        async def says(upstream: str) -> bool:
            status, ready = await service.get("/ready")
            return (status, ready.get("upstream")) == (200, upstream)

        # /ready asks the pipeline every UPSTREAM_CHECK_EVERY seconds.
        failing = f"failing ({cause}) at {url}: lookups held and probed"
        await eventually(lambda: says(failing), timeout=5)
        state["down"] = False
        recovered = time.time()
        await asyncio.sleep(1.0)
        rows = await objects(sql)
        assert sorted(rows) == ids
        assert all(last_seen.timestamp() >= recovered for last_seen in rows.values()), rows
        assert service.sample("lastseen_upstream_outage") == 0
        assert service.sample("lastseen_upstream_failure", cause=cause) == 0
        await eventually(lambda: says("ok"), timeout=5)
        assert await service.get("/ready") == (200, {"ready": True, "upstream": "ok"})
        assert await sql.fetchval("SELECT count(*) FROM dead_letters") == 0
    finally:
        sending = False
        await producer
        await runner.cleanup()


@pytest.mark.slow
async def test_dead_letters_can_be_listed_and_retried(
    db_url: str,
    start_service: StartService,
    start_upstream: StartUpstream,
    sql: asyncpg.Connection,
) -> None:
    """`lastseen dead-letters` lists them; `lastseen retry-dead-letters` queues their ids again
    with the original receive time, and a healthy upstream then resolves them. A dead letter
    received more than the TTL ago is skipped, and said so: its lookup could change nothing."""
    _, bad = await start_upstream(invalid_400=1.0)
    service = await start_service(objects_url=bad, ttl=30)
    _, answer = await service.post('{"object_ids": [4, 5]}')
    await all_done(sql, 1)
    await service.service.stop()
    await sql.execute(
        "INSERT INTO dead_letters (callback_id, object_id, received_at, reason, detail, attempts)"
        " VALUES (999, 8, now() - interval '1 hour', 'http_4xx', '', 1)"
    )

    env = {"LASTSEEN_DATABASE_URL": db_url, "LASTSEEN_TTL": "30"}
    listing = await run_cli("dead-letters", env=env)
    letters = [json.loads(line) for line in listing.stdout.splitlines()]
    assert {(d["object_id"], d["reason"]) for d in letters} == {
        (4, "http_4xx"),
        (5, "http_4xx"),
        (8, "http_4xx"),
    }

    retried = await run_cli("retry-dead-letters", env=env)
    assert retried.code == 0, retried.stderr
    assert "1 dead letters skipped" in retried.stderr
    assert await sql.fetchval("SELECT object_id FROM dead_letters") == 8
    _, good = await start_upstream()
    await start_service(objects_url=good, ttl=30)
    await all_done(sql, 2)
    assert await objects(sql) == {4: await received_at(sql, answer["callback_id"])}


@pytest.mark.slow
async def test_a_killed_workers_callback_is_finished_by_another(
    db_url: str,
    start_service: StartService,
    start_upstream: StartUpstream,
    sql: asyncpg.Connection,
    spawn: Spawn,
) -> None:
    """kill -9 of a worker in the middle of a callback: once its lease lapses, another
    instance claims the callback and finishes it."""
    upstream, url = await start_upstream(first_faults=("hang",), hang_seconds=60)
    first = await spawn(
        env={
            "LASTSEEN_DATABASE_URL": db_url,
            "LASTSEEN_OBJECTS_URL": url,
            "LASTSEEN_LEASE": "1",
            "LASTSEEN_POLL_INTERVAL": "0.1",
            "LASTSEEN_LOOKUP_TIMEOUT": "60",
        }
    )
    assert (await first_post(first.url, '{"object_ids": [6]}')) == 202
    await eventually(lambda: upstream.requests_by_id[6] == 1)
    first.kill()
    await first.wait()
    await start_service(objects_url=url, ttl=30, lease=1.0)
    await all_done(sql, 1)
    row = await sql.fetchrow("SELECT claims, done_at FROM callbacks")
    assert row["claims"] == 2
    assert sorted(await objects(sql)) == [6]


@pytest.mark.slow
async def test_a_paused_worker_loses_nothing_and_undoes_nothing(
    db_url: str, start_service: StartService, sql: asyncpg.Connection, spawn: Spawn
) -> None:
    """A worker stopped (SIGSTOP: a VM pause, a long GC) past its lease with a lookup in
    flight: another instance finishes the callback, then sees the object go offline in a
    later callback; once the first worker continues (SIGCONT) and its old answer (online)
    arrives, nothing it writes late brings the object back, each callback is done, and the
    paused worker goes on working."""
    first_answer = asyncio.Event()
    online = {6: True}
    requests: list[int] = []

    async def answer(request: web.Request) -> web.Response:
        object_id = int(request.match_info["id"])
        requests.append(object_id)
        if len(requests) == 1:
            await first_answer.wait()  # the paused worker's lookup: answered after SIGCONT
            return web.json_response({"id": object_id, "online": True})
        return web.json_response({"id": object_id, "online": online.get(object_id, False)})

    app = web.Application()
    app.router.add_get("/objects/{id}", answer)
    runner, url = await serve_app(app)
    paused = await spawn(
        env={
            "LASTSEEN_DATABASE_URL": db_url,
            "LASTSEEN_OBJECTS_URL": url,
            "LASTSEEN_WORKER_PROCESSES": "0",  # the pipeline in the process paused
            "LASTSEEN_LEASE": "1",
            "LASTSEEN_POLL_INTERVAL": "0.1",
            "LASTSEEN_LOOKUP_TIMEOUT": "60",
            "LASTSEEN_TTL": "60",
        }
    )
    try:
        assert await first_post(paused.url, '{"object_ids": [6]}') == 202
        await eventually(lambda: len(requests) == 1)
        paused.signal(signal.SIGSTOP)
        other = await start_service(objects_url=url, ttl=60, lease=1.0)
        await all_done(sql, 1)
        assert sorted(await objects(sql)) == [6]
        online[6] = False
        status, _ = await other.post('{"object_ids": [6]}')
        assert status == 202
        await all_done(sql, 2)
        assert await objects(sql) == {}
        paused.signal(signal.SIGCONT)
        first_answer.set()

        async def looked_up() -> bool:  # the old answer reached the paused worker
            async with aiohttp.ClientSession() as http, http.get(paused.url + "/metrics") as r:
                reading = Reading.of_text(await r.text())
            return reading.total("lastseen_lookups_total") >= 1

        await eventually(looked_up)
        await asyncio.sleep(1.0)  # its results written, its lost lease noticed
        assert await objects(sql) == {}
        rows = await sql.fetch("SELECT claims, done_at FROM callbacks ORDER BY id")
        assert [r["claims"] for r in rows] == [2, 1]
        assert all(r["done_at"] is not None for r in rows)
        # Still a working instance: with the other one stopped, a callback sent to it is
        # looked up and done.
        await other.service.stop()
        online[8] = True
        assert await first_post(paused.url, '{"object_ids": [8]}') == 202
        await all_done(sql, 3)
        assert sorted(await objects(sql)) == [8]
    finally:
        paused.signal(signal.SIGCONT)  # a stopped process would ignore its SIGTERM at teardown
        first_answer.set()
        await runner.cleanup()


async def first_post(url: str, body: str) -> int:
    async with aiohttp.ClientSession() as http, http.post(url + "/callback", data=body) as r:
        return r.status


@pytest.mark.slow
async def test_kill_9_at_any_moment_loses_no_callback(
    db_url: str, start_upstream: StartUpstream, sql: asyncpg.Connection, spawn: Spawn
) -> None:
    """Callbacks keep coming while the service is killed with kill -9 and restarted, three
    times; in the end every acknowledged callback is done and the table is right."""
    _, url = await start_upstream(latency_min=0.01, latency_max=0.2)
    env = {
        "LASTSEEN_DATABASE_URL": db_url,
        "LASTSEEN_OBJECTS_URL": url,
        "LASTSEEN_LEASE": "1",
        "LASTSEEN_POLL_INTERVAL": "0.1",
        "LASTSEEN_TTL": "60",
    }
    acknowledged: list[int] = []
    async with aiohttp.ClientSession() as http:
        for cycle in range(4):
            serve = await spawn(env=env)
            deadline = time.monotonic() + 1.0 + 0.3 * cycle
            n = 0
            while time.monotonic() < deadline:
                ids = [(cycle * 1000 + n * 7 + k) % 50 for k in range(20)]
                async with http.post(serve.url + "/callback", json={"object_ids": ids}) as r:
                    if r.status == 202:
                        acknowledged.append((await r.json())["callback_id"])
                n += 1
                await asyncio.sleep(0.01)
            if cycle < 3:
                serve.kill()
                await serve.wait()
        await all_done(sql, len(acknowledged))
        serve.signal(signal.SIGTERM)
        assert await serve.wait() == 0
    done = {r[0] for r in await sql.fetch("SELECT id FROM callbacks WHERE done_at IS NOT NULL")}
    assert set(acknowledged) <= done
    named = {i for r in await sql.fetch("SELECT object_ids FROM callbacks") for i in r[0]}
    assert sorted(await objects(sql)) == sorted(i for i in named if i % 2 == 0)


async def test_a_working_worker_keeps_its_lease(
    start_service: StartService, start_upstream: StartUpstream, sql: asyncpg.Connection
) -> None:
    """A callback whose lookups outlast the lease stays with the worker that holds it: the lease
    is renewed, so a second worker polling all along never claims it."""
    _, url = await start_upstream(latency_min=1.5, latency_max=1.5)
    holder = await start_service(objects_url=url, ttl=30, lease=0.6)
    await holder.post('{"object_ids": [2]}')
    await eventually(lambda: holder.sample("lastseen_callbacks_claimed_total") == 1)
    other = await start_service(objects_url=url, ttl=30, lease=0.6)
    await all_done(sql, 1)
    assert await sql.fetchval("SELECT claims FROM callbacks") == 1
    assert other.sample("lastseen_callbacks_claimed_total") == 0


@pytest.mark.slow
async def test_a_restarted_instance_takes_back_what_it_held(
    db_url: str, start_upstream: StartUpstream, sql: asyncpg.Connection, spawn: Spawn
) -> None:
    """kill -9 of an instance in the middle of a callback, with a 30 s lease: started again
    under the same instance id, it takes the callback back at once and finishes it."""
    upstream, url = await start_upstream(first_faults=("hang",), hang_seconds=60)
    env = {
        "LASTSEEN_DATABASE_URL": db_url,
        "LASTSEEN_OBJECTS_URL": url,
        "LASTSEEN_WORKER_PROCESSES": "0",
        "LASTSEEN_INSTANCE_ID": "instance-a",
        "LASTSEEN_LEASE": "30",
        "LASTSEEN_LOOKUP_TIMEOUT": "60",
    }
    first = await spawn(env=env)
    assert (await first_post(first.url, '{"object_ids": [6]}')) == 202
    await eventually(lambda: upstream.requests_by_id[6] == 1)
    first.kill()
    await first.wait()
    second = await spawn(env=env)
    await all_done(sql, 1, timeout=15)
    assert await sql.fetchval("SELECT claims FROM callbacks") == 2
    assert sorted(await objects(sql)) == [6]
    assert second.events("took back a predecessor's callbacks")


async def test_a_hostile_upstream_delays_no_other_id(
    start_service: StartService, sql: asyncpg.Connection
) -> None:
    """Some ids get one-byte chunks, thousands of interim answers, a 50 MB Content-Length
    trickled slowly, or no answer at all (with a 10 s lookup timeout); the other ids' results
    are written at once, as if the upstream were well (a margin for a busy machine: well under
    the timeout any of them could have waited for)."""
    server, url = await hostile.start()
    try:
        service = await start_service(objects_url=url, ttl=30, lookup_timeout=10)
        ids = list(range(40))
        posted = time.time()
        await service.post(json.dumps({"object_ids": ids}))
        wanted = {i for i in ids if hostile.answered(i)}
        await eventually(lambda: service.sample("lastseen_objects_upserted_total") >= len(wanted))
        assert time.time() - posted < 3.0
        assert set(await objects(sql)) == wanted
    finally:
        await server.close()
