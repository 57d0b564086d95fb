"""The spool: callbacks acknowledged while PostgreSQL is away, stored on local disk, and moved
into the inbox exactly once when it is back; real SQLite files, a real PostgreSQL behind a proxy
that takes it away."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from helpers.cli import run_cli
from helpers.services import Running, Spawn, StartService, StartUpstream
from helpers.tables import objects
from helpers.waiting import eventually

from lastseen.core.errors import SpoolFailed, SpoolFull
from lastseen.devtools.dbproxy import DatabaseProxy
from lastseen.intake import failover
from lastseen.intake import group_commit as inbox
from lastseen.intake.drain import DRAIN_BATCH, drain_batch
from lastseen.intake.spool import Spool
from lastseen.storage.arrays import id_array
from lastseen.storage.database import Database
from lastseen.telemetry.metrics import Metrics


async def test_a_spool_keeps_its_callbacks_across_a_restart_and_goes_once_drained(
    tmp_path: Path,
) -> None:
    """What was appended is there, in order and exact, after the spool is closed and opened
    again (a restart); the file exists only while it holds callbacks."""
    path = tmp_path / "spool" / "a.sqlite3"
    spool = Spool(path, max_bytes=1 << 20)
    await spool.open()
    assert not path.exists()
    callbacks = [(1_700_000_000.123456 + i, id_array([i, i + 1])) for i in range(10)]
    keys = await spool.append(callbacks[:4]) + await spool.append(callbacks[4:])
    assert len(set(keys)) == 10
    await spool.close()

    again = Spool(path, max_bytes=1 << 20)
    await again.open()
    assert (again.depth, again.oldest) == (10, callbacks[0][0])
    spooled = await again.peek(100)
    assert [(s.received_at, s.ids) for s in spooled] == callbacks
    assert [s.key for s in spooled] == keys
    await again.forget(spooled[:3])
    assert (again.depth, again.oldest) == (7, callbacks[3][0])
    await again.forget(spooled[3:])
    assert (again.depth, again.size, again.oldest) == (0, 0, None)
    assert not path.exists()
    # A new file gets a new name: its keys cannot collide with those already drained.
    assert not set(await again.append(callbacks[:1])) & set(keys)
    await again.close()


async def test_a_full_spool_stores_nothing_more(tmp_path: Path) -> None:
    """Beyond its bound the spool refuses a whole batch and keeps what it had."""
    spool = Spool(tmp_path / "s.sqlite3", max_bytes=300)
    await spool.open()
    await spool.append([(1.0, id_array([1]))] * 3)
    with pytest.raises(SpoolFull):
        await spool.append([(2.0, id_array([2]))] * 3)
    assert spool.depth == 3
    assert len(await spool.peek(10)) == 3
    await spool.close()


async def test_a_drain_moves_callbacks_in_order_with_their_receive_times_exactly_once(
    db: Database, sql: asyncpg.Connection, tmp_path: Path
) -> None:
    """Spooled callbacks reach the inbox in the order they were spooled, with their original
    receive times and ids; a drain that stopped after the inbox took a batch but before the
    spool forgot it stores nothing twice when it runs again."""
    spool = Spool(tmp_path / "s.sqlite3", max_bytes=1 << 30)
    await spool.open()
    n = DRAIN_BATCH * 2 + 500
    callbacks = [(1_700_000_000.0 + i / 1000, id_array([i, 10**12 + i])) for i in range(n)]
    await spool.append(callbacks)
    first = await spool.peek(DRAIN_BATCH)
    # The crash: the inbox has the first batch, the spool still has it too.
    await db.insert_keyed_callbacks(
        [s.received_at for s in first], [s.ids for s in first], [s.key for s in first]
    )
    moved = 0
    while drained := await drain_batch(spool, db):
        moved += drained
    assert moved == n
    assert spool.depth == 0
    rows = await sql.fetch("SELECT received_at, object_ids FROM callbacks ORDER BY id")
    assert [(r["received_at"].timestamp(), id_array(r["object_ids"])) for r in rows] == [
        (pytest.approx(t, abs=1e-6), ids) for t, ids in callbacks
    ]
    await spool.close()


async def _produce(
    url: str, stop: asyncio.Event, replies: list[tuple[int, dict[str, object], list[int]]]
) -> None:
    """Callbacks of 5 unique ids every 50 ms, each with a 1 s timeout and no retry (the
    reference producer's manners); every reply is kept."""
    timeout = aiohttp.ClientTimeout(total=1.0)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        for n in range(10_000):
            if stop.is_set():
                return
            ids = [n * 10 + k * 2 for k in range(5)]  # even: online
            try:
                async with http.post(url + "/callback", json={"object_ids": ids}) as r:
                    replies.append((r.status, await r.json(), ids))
            except (aiohttp.ClientError, TimeoutError):
                replies.append((0, {}, ids))
            await asyncio.sleep(0.05)


async def _spooling(
    start_service: StartService,
    start_upstream: StartUpstream,
    tmp_path: Path,
    database_url: str | None = None,
) -> Running:
    """A service with a spool and an upstream, production's commit timeout, a 30 s TTL."""
    _, upstream_url = await start_upstream()
    where = {} if database_url is None else {"database_url": database_url}
    return await start_service(
        **where,
        objects_url=upstream_url,
        ttl=30.0,
        commit_timeout=0.8,
        spool_max_bytes=1 << 20,
        spool_path=tmp_path / "spool.sqlite3",
    )


async def _all_in_objects(sql: asyncpg.Connection, wanted: set[int]) -> bool:
    return wanted <= set(await objects(sql))


async def test_the_endpoint_answers_while_the_database_is_away(
    db_proxy: DatabaseProxy,
    sql: asyncpg.Connection,
    start_service: StartService,
    start_upstream: StartUpstream,
    tmp_path: Path,
) -> None:
    """PostgreSQL taken away for 2 s under load: every POST gets a 202, /ready stays 200 and
    says it is degraded, and once the database is back every acknowledged id reaches
    `objects` (well within the TTL), each spooled callback stored once."""
    service = await _spooling(start_service, start_upstream, tmp_path, db_proxy.url())
    replies: list[tuple[int, dict[str, object], list[int]]] = []
    stop = asyncio.Event()
    producer = asyncio.create_task(_produce(service.url, stop, replies))
    try:
        await eventually(lambda: len(replies) >= 10)
        await db_proxy.stop()
        await eventually(lambda: service.sample("lastseen_callbacks_spooled_total") >= 10)
        status, ready = await service.get("/ready")
        assert status == 200
        assert ready["ready"] is True
        assert str(ready["degraded"]).startswith("spooling")
        await asyncio.sleep(1.5)
        await db_proxy.start()
        recovered = time.monotonic()
        await eventually(lambda: service.sample("lastseen_spooling") == 0, timeout=10)
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        await producer
    assert [status for status, _, _ in replies] == [202] * len(replies)
    spooled = [str(body["spooled"]) for _, body, _ in replies if body["callback_id"] is None]
    assert len(spooled) >= 10
    wanted = {i for _, _, ids in replies for i in ids}

    await eventually(lambda: _all_in_objects(sql, wanted), timeout=15)
    assert time.monotonic() - recovered < 15
    keys = await sql.fetch("SELECT source FROM callbacks WHERE source LIKE 'spool:%'")
    assert sorted(r["source"] for r in keys) == sorted(spooled)
    assert service.sample("lastseen_spool_callbacks") == 0


async def test_a_stalled_event_loop_does_not_take_a_healthy_database_for_lost(
    db: Database, sql: asyncpg.Connection, tmp_path: Path
) -> None:
    """The event loop stalls for longer than the commit may take (one turn of a burst of
    thousands of requests can) while a commit is in flight: the answer that waited behind the
    stall counts, so the callback is stored in PostgreSQL and nothing goes to the spool."""
    spool = Spool(tmp_path / "s.sqlite3", max_bytes=1 << 20)
    await spool.open()
    commit = inbox.GroupCommit(
        db, Metrics(), max_batch=100, concurrency=1, timeout=1.0, spool=spool
    )
    commit.open()
    runner = asyncio.create_task(commit.run())
    loop = asyncio.get_running_loop()
    try:
        for _ in range(3):
            future = commit.submit(time.time(), [1, 2, 3])
            # Stalls the loop right after the commit has sent its statement: 0.7 s, past
            # the 0.5 s a commit may take before the database is taken for lost.
            loop.call_later(0.005, time.sleep, 0.7)
            stored = await future
            assert isinstance(stored, int), stored
    finally:
        commit.close()
        await runner
        await spool.close()
    assert not commit.spooling
    assert spool.depth == 0
    assert await sql.fetchval("SELECT count(*) FROM callbacks") == 3


async def test_the_endpoint_answers_while_the_database_refuses_writes(
    sql: asyncpg.Connection,
    start_service: StartService,
    start_upstream: StartUpstream,
    tmp_path: Path,
) -> None:
    """PostgreSQL read-only for 2 s under load (SQLSTATE 25006, as a standby after a failover
    answers), its connections kept: every POST gets a 202 (none a 500), the callbacks go to
    the spool and /ready says so; the probe's write keeps the spool until the server takes
    writes again, and then every acknowledged id reaches `objects`."""
    service = await _spooling(start_service, start_upstream, tmp_path)

    async def read_only(on: bool) -> None:
        await sql.execute("SET default_transaction_read_only = off")
        value = "on" if on else "off"
        await sql.execute(f"ALTER SYSTEM SET default_transaction_read_only = {value}")
        await sql.execute("SELECT pg_reload_conf()")

    replies: list[tuple[int, dict[str, object], list[int]]] = []
    stop = asyncio.Event()
    producer = asyncio.create_task(_produce(service.url, stop, replies))
    try:
        await eventually(lambda: len(replies) >= 10)
        await read_only(True)
        await eventually(lambda: service.sample("lastseen_callbacks_spooled_total") >= 10)
        status, ready = await service.get("/ready")
        assert (status, ready["ready"]) == (200, True)
        assert str(ready["degraded"]).startswith("spooling")
        await asyncio.sleep(1.5)
        assert service.sample("lastseen_spooling") == 1  # the probe's write was refused
        await read_only(False)
        await eventually(lambda: service.sample("lastseen_spooling") == 0, timeout=10)
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        await producer
        await sql.execute("ALTER SYSTEM RESET default_transaction_read_only")
        await sql.execute("SELECT pg_reload_conf()")
    assert [status for status, _, _ in replies] == [202] * len(replies)
    assert service.sample("lastseen_callbacks_rejected_total", reason="database_error") == 0
    wanted = {i for _, _, ids in replies for i in ids}

    await eventually(lambda: _all_in_objects(sql, wanted), timeout=15)
    assert service.sample("lastseen_spool_callbacks") == 0


async def test_ready_answers_at_once_while_the_database_drops_packets(
    db_proxy: DatabaseProxy,
    sql: asyncpg.Connection,
    start_service: StartService,
    start_upstream: StartUpstream,
    tmp_path: Path,
) -> None:
    """A partition that passes no bytes for 3 s, connections kept open, under load: every
    POST gets a 202 (a commit stuck on the partition is given up on, not waited for, and its
    batch spooled); /ready answers every time within a kubelet's 1 s, from state kept in the
    background (200, degraded, once the ping is overdue); once the partition heals every
    acknowledged id reaches `objects`."""
    service = await _spooling(start_service, start_upstream, tmp_path, db_proxy.url())
    replies: list[tuple[int, dict[str, object], list[int]]] = []
    stop = asyncio.Event()
    producer = asyncio.create_task(_produce(service.url, stop, replies))
    answers: list[tuple[float, int, dict[str, object]]] = []
    try:
        await eventually(lambda: len(replies) >= 10)
        db_proxy.partition()
        ends = time.monotonic() + 3.0
        while time.monotonic() < ends:
            started = time.monotonic()
            status, ready = await service.get("/ready")
            answers.append((time.monotonic() - started, status, ready))
            await asyncio.sleep(0.1)
        db_proxy.heal()
        await eventually(lambda: service.sample("lastseen_spooling") == 0, timeout=15)
    finally:
        db_proxy.heal()
        stop.set()
        await producer
    assert [status for status, _, _ in replies] == [202] * len(replies)
    slowest = max(seconds for seconds, _, _ in answers)
    assert slowest < 1.0, answers
    assert all(status == 200 for _, status, _ in answers), answers
    assert any(str(ready.get("degraded", "")).startswith("spooling") for _, _, ready in answers)
    wanted = {i for _, _, ids in replies for i in ids}

    await eventually(lambda: _all_in_objects(sql, wanted), timeout=15)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB file system of its own (tmpfs), for a disk that fills; skipped where this
    process may not mount one (only root may)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_a_spool_whose_disk_is_full_answers_503_never_202(
    db_proxy: DatabaseProxy, sql: asyncpg.Connection, start_service: StartService, small_disk: Path
) -> None:
    """The database away and the spool's disk filling (its size bound far above what the disk
    holds): each POST is a 202 while the disk takes it and a 503 with Retry-After once it
    does not, never the other way round; /ready says 503 and why; once the database is back
    every callback acknowledged from the spool is in the inbox, each once."""
    service = await start_service(
        database_url=db_proxy.url(),
        role="ingest",
        commit_timeout=0.5,
        spool_max_bytes=1 << 30,
        spool_path=small_disk / "spool.sqlite3",
    )
    await db_proxy.stop()
    answers: list[tuple[int, dict[str, object], str | None]] = []
    ids = list(range(0, 400, 2))
    for _ in range(400):
        async with service.http.post(service.url + "/callback", json={"object_ids": ids}) as r:
            answers.append((r.status, await r.json(), r.headers.get("Retry-After")))
        if answers[-1][0] == 503 and len(answers) > 3 and answers[-3][0] == 503:
            break
    statuses = [status for status, _, _ in answers]
    assert set(statuses) == {202, 503}, statuses
    first_refusal = statuses.index(503)
    assert statuses[first_refusal:] == [503] * (len(statuses) - first_refusal), statuses
    assert all(retry == "1" for status, _, retry in answers if status == 503)
    status, ready = await service.get("/ready")
    assert status == 503
    assert "the spool cannot take more" in str(ready["reason"])
    spooled = sorted(str(body["spooled"]) for status, body, _ in answers if status == 202)
    await db_proxy.start()

    async def drained() -> bool:
        rows = await sql.fetch("SELECT source FROM callbacks WHERE source LIKE 'spool:%'")
        return sorted(r["source"] for r in rows) == spooled

    await eventually(drained, timeout=15)


async def test_a_full_spool_answers_503_not_202(
    db_proxy: DatabaseProxy, start_service: StartService, tmp_path: Path
) -> None:
    """With the database away and the spool at its bound, a callback gets 503 with
    Retry-After, and /ready says that nothing can store it."""
    service = await start_service(
        database_url=db_proxy.url(),
        role="ingest",
        commit_timeout=0.5,
        spool_max_bytes=100,
        spool_path=tmp_path / "spool.sqlite3",
    )
    await db_proxy.stop()
    status, body = await service.post(json.dumps({"object_ids": [1, 2, 3]}))
    assert status == 202
    assert body["callback_id"] is None
    async with service.http.post(service.url + "/callback", json={"object_ids": [4]}) as r:
        assert r.status == 503
        assert r.headers["Retry-After"] == "1"
        assert (await r.json())["error"] == "not_stored"
    status, ready = await service.get("/ready")
    assert status == 503
    assert "the spool cannot take more" in ready["reason"]
    await db_proxy.start()


@pytest.mark.slow
async def test_a_spool_left_by_a_killed_instance_drains_when_it_starts_again(
    db_proxy: DatabaseProxy, sql: asyncpg.Connection, spawn: Spawn, tmp_path: Path
) -> None:
    """kill -9 while the database is away: the callbacks acknowledged from the spool are moved
    into the inbox, each once, when an instance starts again on the same spool."""
    env = {
        "LASTSEEN_DATABASE_URL": db_proxy.url(),
        "LASTSEEN_ROLE": "ingest",
        "LASTSEEN_SPOOL_PATH": str(tmp_path / "spool.sqlite3"),
    }
    first = await spawn(env=env)
    await db_proxy.stop()
    keys = []
    async with aiohttp.ClientSession() as http:
        for n in range(20):
            async with http.post(first.url + "/callback", json={"object_ids": [n]}) as r:
                assert r.status == 202
                keys.append((await r.json())["spooled"])
    first.kill()
    await first.wait()
    await db_proxy.start()
    await spawn(env=env)

    async def drained() -> bool:
        rows = await sql.fetch("SELECT source FROM callbacks")
        return sorted(r["source"] for r in rows) == sorted(keys)

    await eventually(drained, timeout=15)
    # The inbox has them a moment before the spool forgets them.
    await eventually(lambda: not (tmp_path / "spool.sqlite3").exists())


async def test_drain_spool_moves_a_dead_instances_spool(
    db_url: str, sql: asyncpg.Connection, tmp_path: Path
) -> None:
    """`lastseen drain-spool FILE` moves what an instance that never came back left in its
    spool; a file that is not there is an error."""
    path = tmp_path / "gone.sqlite3"
    spool = Spool(path, max_bytes=1 << 20)
    await spool.open()
    await spool.append([(1_700_000_000.5, id_array([7, 8])), (1_700_000_001.5, id_array([9]))])
    await spool.close()
    env = {"LASTSEEN_DATABASE_URL": db_url}
    done = await run_cli("drain-spool", path, env=env)
    assert done.code == 0, done.stderr
    assert "2 callbacks moved" in done.stderr
    rows = await sql.fetch("SELECT received_at, object_ids FROM callbacks ORDER BY id")
    assert [(r["received_at"].timestamp(), list(r["object_ids"])) for r in rows] == [
        (1_700_000_000.5, [7, 8]),
        (1_700_000_001.5, [9]),
    ]
    again = await run_cli("drain-spool", path, env=env)
    assert again.code == 2
    assert "no spool file" in again.stderr


async def test_a_spool_in_use_is_refused_to_a_second_user(tmp_path: Path, db_url: str) -> None:
    """While an instance holds its spool, a second Spool on the file and ``lastseen
    drain-spool`` are refused with a clear error, and the file keeps what it holds; once the
    first lets go, the drain takes it."""
    path = tmp_path / "spool.sqlite3"
    first = Spool(path, max_bytes=1 << 20)
    await first.open()
    await first.append([(time.time(), id_array([1, 2]))])
    second = Spool(path, max_bytes=1 << 20)
    with pytest.raises(SpoolFailed, match="in use by another process"):
        await second.open()
    with pytest.raises(SpoolFailed, match="not locked"):
        await second.append([(time.time(), id_array([3]))])
    await second.close()
    refused = await run_cli("drain-spool", path, env={"LASTSEEN_DATABASE_URL": db_url})
    assert refused.code == 2
    assert "in use by another process" in refused.stderr
    assert first.depth == 1
    await first.close()
    drained = await run_cli("drain-spool", path, env={"LASTSEEN_DATABASE_URL": db_url})
    assert drained.code == 0, drained.stderr
    assert "1 callbacks moved" in drained.stderr


async def test_a_dying_drainer_stops_the_service(
    start_service: StartService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The group commit's side tasks run under the service's supervisor: a drainer that dies
    of an error nobody expected (a bug) fails the service, instead of leaving a spool that
    never drains while the instance answers 202."""
    service = await start_service(
        role="ingest", spool_max_bytes=1 << 20, spool_path=tmp_path / "spool.sqlite3"
    )

    async def broken(spool: Spool, db: Database) -> int:
        raise RuntimeError("a bug in the drain")

    monkeypatch.setattr(failover, "drain_batch", broken)
    commit = service.service.commit
    assert commit is not None
    commit.lose_database("taken for lost by the test")
    assert isinstance(await commit.submit(time.time(), [1]), str)  # spooled
    # The probe finds the database there, and the drain begins.
    await asyncio.wait_for(service.service.supervisor.failed.wait(), 10)
    assert "group-commit-drain" in str(service.service.supervisor.failure)
