"""What a 202 promises: the callback survives kill -9; and the service survives its database."""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import signal
import time

import aiohttp
import asyncpg
import pytest
from helpers.netfilter import dropping
from helpers.services import Spawn, StartService, StartUpstream
from helpers.waiting import eventually

from lastseen.api.readiness import Readiness
from lastseen.core.clock import DatabaseClock
from lastseen.core.errors import DatabaseUnavailable
from lastseen.devtools.clocks import ShiftedClock
from lastseen.devtools.dbproxy import DatabaseProxy
from lastseen.runtime.service import collect_when_grown
from lastseen.storage.database import Database


async def _post(http: aiohttp.ClientSession, url: str, ids: list[int]) -> int | None:
    """The callback id of a 202, or None for any other outcome (error, refused, cut off)."""
    try:
        async with http.post(url + "/callback", json={"object_ids": ids}) as response:
            if response.status == 202:
                return int((await response.json())["callback_id"])
    except aiohttp.ClientError:
        pass
    return None


@pytest.mark.slow
async def test_kill_9_after_202_loses_nothing(
    db_url: str, sql: asyncpg.Connection, start_upstream: StartUpstream, spawn: Spawn
) -> None:
    """Every callback answered 202 is in the inbox after kill -9, and is processed on restart."""
    serve = await spawn("--role", "ingest", env={"LASTSEEN_DATABASE_URL": db_url})
    acknowledged: dict[int, list[int]] = {}
    async with aiohttp.ClientSession() as http:

        async def producer(n: int) -> None:
            for i in range(1000):
                ids = [n * 1000 + i, 100_000 + i]
                callback_id = await _post(http, serve.url, ids)
                if callback_id is None:
                    return
                acknowledged[callback_id] = ids

        producers = [asyncio.create_task(producer(n)) for n in range(20)]
        await eventually(lambda: len(acknowledged) >= 200)
        serve.kill()  # while 20 requests are in flight
        await asyncio.gather(*producers)
    assert await serve.wait() == -signal.SIGKILL

    rows = await sql.fetch("SELECT id, object_ids FROM callbacks")
    stored = {row["id"]: row["object_ids"] for row in rows}
    assert len(acknowledged) >= 200
    for callback_id, ids in acknowledged.items():
        assert stored[callback_id] == ids

    _, upstream_url = await start_upstream()
    again = await spawn(env={"LASTSEEN_DATABASE_URL": db_url, "LASTSEEN_OBJECTS_URL": upstream_url})
    try:

        async def all_done() -> bool:
            pending = await sql.fetchval("SELECT count(*) FROM callbacks WHERE done_at IS NULL")
            return bool(pending == 0)

        await eventually(all_done, timeout=30)
    finally:
        again.signal(signal.SIGTERM)
        assert await again.wait() == 0


@pytest.mark.slow
async def test_sigterm_finishes_work_and_exits_0(
    db_url: str, sql: asyncpg.Connection, start_upstream: StartUpstream, spawn: Spawn
) -> None:
    """On SIGTERM the service (and its worker process) finishes the callbacks it holds, leaves
    no lease behind, and exits 0."""
    _, upstream_url = await start_upstream(latency_min=0.2, latency_max=0.3)
    serve = await spawn(env={"LASTSEEN_DATABASE_URL": db_url, "LASTSEEN_OBJECTS_URL": upstream_url})
    async with aiohttp.ClientSession() as http:
        ids = [await _post(http, serve.url, [i, i + 1]) for i in range(10)]
    assert None not in ids

    async def all_claimed() -> bool:
        return bool(await sql.fetchval("SELECT count(*) FROM callbacks WHERE claims > 0") == 10)

    await eventually(all_claimed)
    serve.signal(signal.SIGTERM)
    assert await serve.wait() == 0
    assert serve.events("stopped")
    unfinished = await sql.fetchval(
        "SELECT count(*) FROM callbacks WHERE done_at IS NULL AND locked_by IS NOT NULL"
    )
    assert unfinished == 0
    done = await sql.fetchval("SELECT count(*) FROM callbacks WHERE done_at IS NOT NULL")
    assert done == 10


async def test_callbacks_are_committed_synchronously_whatever_the_server_default(
    db_url: str, sql: asyncpg.Connection
) -> None:
    """The test server runs with synchronous_commit off; lastseen's connections turn it on,
    because a 202 promises the callback survives a crash of PostgreSQL too."""
    from lastseen.storage.database import Database

    assert await sql.fetchval("SHOW synchronous_commit") == "off"
    database = await Database.open(db_url, size=1, timeout=5)
    try:
        assert await database.pool.fetchval("SHOW synchronous_commit") == "on"
    finally:
        await database.close()


@pytest.mark.slow
async def test_sigterm_hands_back_what_it_could_not_finish(
    db_url: str, sql: asyncpg.Connection, start_upstream: StartUpstream, spawn: Spawn
) -> None:
    """If held callbacks cannot finish within the shutdown grace, they are handed back at once
    (no lease left to run out), not marked done, and the service still exits 0."""
    upstream, upstream_url = await start_upstream(first_faults=("hang",), hang_seconds=30)
    serve = await spawn(
        env={
            "LASTSEEN_DATABASE_URL": db_url,
            "LASTSEEN_OBJECTS_URL": upstream_url,
            "LASTSEEN_SHUTDOWN_GRACE": "0.5",
            "LASTSEEN_LOOKUP_TIMEOUT": "30",
        }
    )
    async with aiohttp.ClientSession() as http:
        assert await _post(http, serve.url, [4]) is not None
    await eventually(lambda: upstream.requests_by_id[4] == 1)
    serve.signal(signal.SIGTERM)
    assert await serve.wait() == 0
    row = await sql.fetchrow(
        "SELECT done_at, locked_by, locked_until <= now() AS free FROM callbacks"
    )
    assert row["done_at"] is None
    assert row["locked_by"] is None
    assert row["free"]


async def test_readiness_follows_the_database(
    db_proxy: DatabaseProxy, start_service: StartService
) -> None:
    """Without a spool, /ready is 503 with a reason while the database is away, and 200 again
    when it is back; meanwhile /health answers and callbacks get a quick 503, never a false
    202."""
    proxy = db_proxy
    service = await start_service(database_url=proxy.url(), role="ingest", commit_timeout=0.5)
    assert await service.get("/ready") == (200, {"ready": True})

    await proxy.stop()

    async def unready() -> bool:
        return (await service.get("/ready"))[0] == 503

    await eventually(unready, timeout=3)  # within a check's interval
    status, answer = await service.get("/ready")
    assert answer["ready"] is False
    assert "database unreachable" in answer["reason"]
    assert await service.get("/health") == (200, {"status": "alive"})
    status, answer = await service.post('{"object_ids": [1]}')
    assert status == 503
    assert answer["error"] == "not_stored"
    status, listing = await service.get("/objects")
    assert status == 503
    # What the driver said (hosts, ports, errno) stays in the logs.
    for text in (answer["detail"], listing["detail"]):
        assert str(proxy.port) not in text
        assert "127.0.0.1" not in text

    await proxy.start()

    async def ready() -> bool:
        return (await service.get("/ready"))[0] == 200

    await eventually(ready)
    status, _ = await service.post('{"object_ids": [1]}')
    assert status == 202
    await proxy.stop()


async def test_starting_without_a_database_waits_for_it(
    db_proxy: DatabaseProxy, start_service: StartService
) -> None:
    """A service whose database is not there yet serves /health, reports why it is not ready,
    and migrates and gets ready once the database appears."""
    proxy = db_proxy
    await proxy.stop()
    service = await start_service(database_url=proxy.url(), role="ingest", migrated=False)
    why = {"ready": False, "reason": "cannot migrate: the database is unreachable"}

    async def says_why() -> bool:  # once its first attempt to migrate has failed
        return await service.get("/ready") == (503, why)

    await eventually(says_why)
    assert await service.get("/health") == (200, {"status": "alive"})
    assert not service.service.readiness.migrated
    await proxy.start()
    await service.wait_ready()
    assert await service.get("/ready") == (200, {"ready": True})
    await proxy.stop()


def _children(pid: int) -> list[int]:
    import psutil

    found = []
    for child in psutil.Process(pid).children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "lastseen" in " ".join(child.cmdline()):
                found.append(child.pid)
        except psutil.Error:
            pass
    return found


@pytest.mark.slow
async def test_a_dead_worker_process_is_started_again(
    db_url: str, sql: asyncpg.Connection, start_upstream: StartUpstream, spawn: Spawn
) -> None:
    """kill -9 of the worker process: the service starts a new one, which does the work."""
    _, upstream_url = await start_upstream()
    serve = await spawn(env={"LASTSEEN_DATABASE_URL": db_url, "LASTSEEN_OBJECTS_URL": upstream_url})
    await eventually(lambda: len(_children(serve.pid)) == 1)
    (first,) = _children(serve.pid)
    os.kill(first, signal.SIGKILL)
    await eventually(lambda: _children(serve.pid) not in ([], [first]))
    async with aiohttp.ClientSession() as http:
        assert await _post(http, serve.url, [2, 3]) is not None

    async def done() -> bool:
        return bool(await sql.fetchval("SELECT count(*) FROM callbacks WHERE done_at IS NOT NULL"))

    await eventually(done)
    assert serve.events("worker process exited; starting it again")


@pytest.mark.slow
async def test_kill_9_of_serve_leaves_no_worker_behind(db_url: str, spawn: Spawn) -> None:
    """A worker process does not outlive its parent, even one killed with kill -9."""
    import psutil

    serve = await spawn(env={"LASTSEEN_DATABASE_URL": db_url})
    await eventually(lambda: len(_children(serve.pid)) == 1)
    (child,) = _children(serve.pid)
    serve.kill()
    await serve.wait()
    await eventually(lambda: not psutil.pid_exists(child), timeout=20)


@pytest.mark.slow
async def test_metrics_add_up_the_worker_processes_once(
    db_url: str, sql: asyncpg.Connection, start_upstream: StartUpstream, spawn: Spawn
) -> None:
    """/metrics of a multi-process service shows the worker's counters, the database-wide
    gauges once, not once per process, and each process's own process metrics."""
    upstream, upstream_url = await start_upstream(latency_min=5, latency_max=5)
    serve = await spawn(env={"LASTSEEN_DATABASE_URL": db_url, "LASTSEEN_OBJECTS_URL": upstream_url})
    async with aiohttp.ClientSession() as http:
        for i in range(3):
            assert await _post(http, serve.url, [i]) is not None
        await eventually(lambda: upstream.stats["requests"] == 3)

        async def metric(name: str) -> float:
            async with http.get(serve.url + "/metrics") as response:
                text = await response.text()
            line = next(x for x in text.splitlines() if x.startswith(name + " "))
            return float(line.split()[1])

        assert await metric("lastseen_inbox_pending") == 3
        assert await metric("lastseen_callbacks_claimed_total") == 3
        assert await metric("lastseen_lookups_in_flight") == 3
        assert await metric("lastseen_callbacks_received_total") == 3
        async with http.get(serve.url + "/metrics") as response:
            text = await response.text()
        # Process metrics are per process, not summed.
        for process in ("http", "worker-0"):
            assert f'lastseen_process_resident_memory_bytes{{process="{process}"}}' in text
            assert f'lastseen_process_open_fds{{process="{process}"}}' in text
        assert 'lastseen_build_info{process="worker-0",python="' in text


@pytest.mark.slow
async def test_a_dead_worker_process_s_callbacks_are_taken_back_at_once(
    db_url: str, sql: asyncpg.Connection, start_upstream: StartUpstream, spawn: Spawn
) -> None:
    """kill -9 of the worker process in the middle of a callback, with a 30 s lease: the
    service hands the callback back as soon as the process exits and its successor finishes
    it, long before the lease would have run out."""
    upstream, upstream_url = await start_upstream(first_faults=("hang",), hang_seconds=60)
    serve = await spawn(
        env={
            "LASTSEEN_DATABASE_URL": db_url,
            "LASTSEEN_OBJECTS_URL": upstream_url,
            "LASTSEEN_LEASE": "30",
            "LASTSEEN_LOOKUP_TIMEOUT": "60",
        }
    )
    await eventually(lambda: len(_children(serve.pid)) == 1)
    (first,) = _children(serve.pid)
    async with aiohttp.ClientSession() as http:
        assert await _post(http, serve.url, [6]) is not None
    await eventually(lambda: upstream.requests_by_id[6] == 1)
    os.kill(first, signal.SIGKILL)

    async def done() -> bool:
        return bool(await sql.fetchval("SELECT count(*) FROM callbacks WHERE done_at IS NOT NULL"))

    await eventually(done, timeout=15)
    assert await sql.fetchval("SELECT claims FROM callbacks") == 2
    assert serve.events("handed back a dead worker's callbacks")


@pytest.mark.slow
async def test_two_ingest_and_two_worker_instances_survive_a_kill_of_each(
    db_url: str, sql: asyncpg.Connection, start_upstream: StartUpstream, spawn: Spawn
) -> None:
    """Two ingest-role and two worker-role instances on one database, under load; one of each
    is killed with SIGKILL mid-run. Every acknowledged callback is processed, and objects
    holds exactly the even ids with the newest receive time of the callbacks naming them."""
    _, upstream_url = await start_upstream(latency_min=0.01, latency_max=0.2)
    common = {"LASTSEEN_DATABASE_URL": db_url, "LASTSEEN_TTL": "60"}
    ingest = [await spawn("--role", "ingest", env=common) for _ in range(2)]
    workers = [
        await spawn("--role", "worker", env={**common, "LASTSEEN_OBJECTS_URL": upstream_url})
        for _ in range(2)
    ]
    acknowledged: list[int] = []
    async with aiohttp.ClientSession() as http:
        for n in range(120):
            if n == 40:
                ingest[0].kill()
                workers[0].kill()
            target = ingest[1] if n >= 40 else ingest[n % 2]
            ids = [(n * 7 + k) % 60 for k in range(15)]
            callback_id = await _post(http, target.url, ids)
            if callback_id is not None:
                acknowledged.append(callback_id)
            await asyncio.sleep(0.01)
    assert len(acknowledged) >= 80

    async def processed() -> bool:
        pending = await sql.fetchval("SELECT count(*) FROM callbacks WHERE done_at IS NULL")
        return bool(pending == 0)

    await eventually(processed, timeout=30)
    done = {r[0] for r in await sql.fetch("SELECT id FROM callbacks WHERE done_at IS NOT NULL")}
    assert set(acknowledged) <= done
    newest = {
        r[0]: r[1]
        for r in await sql.fetch(
            "SELECT x, max(received_at) FROM callbacks, unnest(object_ids) AS x GROUP BY x"
        )
    }
    rows = {r[0]: r[1] for r in await sql.fetch("SELECT id, last_seen FROM objects")}
    assert rows == {i: seen for i, seen in newest.items() if i % 2 == 0}


async def test_a_full_collection_follows_memory_growth() -> None:
    """A pipeline process collects fully when its RSS has grown by the threshold since the last
    time, and not while it stays level."""
    growth = 16 << 20
    collections: list[float] = []

    def collect() -> int:
        collections.append(time.monotonic())
        return 0

    task = asyncio.create_task(collect_when_grown(0.02, growth, collect))
    try:
        await asyncio.sleep(0.2)
        assert collections == []
        # Pages of its own, touched so they are resident: memory from the allocator may be
        # memory the process already holds (freed by an earlier test), and not grow the RSS.
        ballast = mmap.mmap(-1, 2 * growth)
        for i in range(0, len(ballast), 4096):
            ballast[i] = 1
        await eventually(lambda: len(collections) == 1, timeout=5)
        await asyncio.sleep(0.2)
        assert len(collections) == 1  # level again: no second one
        ballast.close()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_readiness_sets_the_instance_clock_to_postgresqls(db: Database) -> None:
    """On a host whose clock runs 2 s ahead, the readiness pings measure an offset of about
    +2 s (the figure the clock-skew metric shows) and the instance's clock reads PostgreSQL's
    time."""
    clock = DatabaseClock(ShiftedClock(2.0))
    readings: list[float] = []

    def read(sent: float, answered: float, database: float) -> None:
        clock.read(sent, answered, database)
        readings.append(clock.offset)

    readiness = Readiness(clock=clock.base.wall, read_clock=read)
    # A connection of the pool's own first: a reading whose round trip holds the connection's
    # set-up is off by half of it (on a loaded machine, more than the bound checked here).
    await db.ping()
    readiness.set_migrated()
    watching = asyncio.create_task(readiness.watch(db, every=0.01))
    try:
        await eventually(lambda: len(readings) >= 3)
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching
    assert all(abs(offset - 2.0) < 0.25 for offset in readings), readings
    assert abs(clock.wall() - await db.ping()) < 0.25


async def test_a_query_to_a_server_whose_packets_are_dropped_fails_within_the_tcp_timeout(
    db_proxy: DatabaseProxy,
) -> None:
    """Every packet to the database's port dropped by the kernel (a network that loses them, not
    one that refuses): a query in flight fails as *unavailable* within the TCP timeout (2 s
    here), not after its 60 s statement timeout on a connection that will never answer; once
    packets pass again, the pool serves on a new connection."""
    db = await Database.open(db_proxy.url(), size=1, timeout=60, tcp_timeout=2)
    try:
        assert await db.ping()
        with dropping(db_proxy.port):
            started = time.monotonic()
            with pytest.raises(DatabaseUnavailable):
                await asyncio.wait_for(db.ping(), 20)
            failed_after = time.monotonic() - started
        assert failed_after < 6, failed_after
        assert await db.ping()
    finally:
        await db.close()
