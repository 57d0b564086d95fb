"""``lastseen simulate`` and ``lastseen verify``: the reference scenario, faults, tampering.
Real PostgreSQL, real HTTP, time compressed about 25 times (the producer alone:
test_producer.py)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from helpers.cli import Background, run_cli
from helpers.services import Running, StartService
from helpers.waiting import all_done

from lastseen.devtools.simulate import truth
from lastseen.devtools.simulate.config import SimulatorConfig
from lastseen.devtools.simulate.producer import ProducerConfig
from lastseen.devtools.simulate.run import Simulator
from lastseen.devtools.simulate.story import DEAD_LETTER, GOING_OFFLINE, LEAVING, STEADY, Story
from lastseen.devtools.simulate.upstream import UpstreamConfig
from lastseen.devtools.verify import Report, verify
from lastseen.storage.database import Database

TTL = 2.0
REAP = 0.05  # conftest's fast_settings
EDGE = 0.2


@pytest.fixture
async def background() -> AsyncIterator[Callable[..., Awaitable[Background]]]:
    """Starts ``lastseen`` subprocesses that are killed at the end of the test if still running."""
    started: list[Background] = []

    async def start(*args: str | Path) -> Background:
        process = await Background.start(*args)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()
        await process.proc.wait()


def sim_config(truth_dir: Path, **producer: Any) -> SimulatorConfig:
    """Both parts on a free port; the reference's distributions with time compressed 25 times
    (5 s period -> 0.2 s, 300-4300 ms lookups -> 12-172 ms) unless ``producer`` says otherwise;
    upstream settings with an ``upstream_`` prefix."""
    upstream = {k[9:]: producer.pop(k) for k in list(producer) if k.startswith("upstream_")}
    upstream.setdefault("latency_min", 0.012)
    upstream.setdefault("latency_max", 0.172)
    producer.setdefault("period", 0.2)
    return SimulatorConfig(
        mode="both",
        upstream_listen=("127.0.0.1", 0),
        upstream=UpstreamConfig(seed=7, track_ids=False, **upstream),
        producer=ProducerConfig(seed=8, **producer),
        truth_dir=truth_dir,
    )


async def simulated_run(
    start_service: StartService, config: SimulatorConfig, seconds: float, **service: Any
) -> tuple[Simulator, Any]:
    """Runs the simulator against a fresh service for ``seconds``, then stops the producer;
    returns the simulator (its upstream still up) and the service."""
    simulator = Simulator(config)
    url = await simulator.start_upstream()
    service.setdefault("ttl", TTL)
    running = await start_service(objects_url=url, **service)
    simulator.start_producer(target=running.url + "/callback")
    await asyncio.sleep(seconds)
    await simulator.stop_producer()
    return simulator, running


async def check_run(
    db: Database, truth_dir: Path, ttl: float = TTL, reaped: float | None = None
) -> Report:
    """``verify``, with the TTL edge widened by the time since the reaper round that began at
    ``reaped`` (``time.monotonic()``): a row that fell due after that round's cutoff is not the
    reaper's to have deleted yet, however long a busy machine takes to reach the check."""
    edge = EDGE if reaped is None else EDGE + (time.monotonic() - reaped)
    return await verify(db, truth_dir, ttl=ttl, reap_interval=REAP, audit_retention=3600, edge=edge)


async def reap_now(running: Running) -> float:
    """One reaper round now, so that a check that follows sees the table as the reaper leaves
    it; returns when the round began (``time.monotonic()``, before its cutoff was taken). A
    round finds the lock taken, and reaps nothing, while the service's own reaper is in one:
    it waits for a round of its own."""
    assert running.service.pipeline is not None
    async with asyncio.timeout(10):
        while True:
            began = time.monotonic()
            if await running.service.pipeline.reaper.reap_once() is not None:
                return began
            await asyncio.sleep(0.01)


async def _explain(sql: asyncpg.Connection, report: Report) -> str:
    """For a row verify found past its TTL: what the database holds about its id (the row,
    the callbacks naming it, its dead letters, observations and the reaper's notes), to tell
    the reaper's decision from the check's."""
    lines = []
    for example in report.examples.get("unexpected_row", []):
        found = re.search(r"object (-?\d+): expired", example)
        if found is None:
            continue
        oid = int(found.group(1))
        lines.append(f"now {await sql.fetchval('SELECT now()')}")
        lines.append(f"row {await sql.fetchrow('SELECT * FROM objects WHERE id = $1', oid)}")
        for table, where in (
            ("callbacks", "$1 = ANY(object_ids)"),
            ("dead_letters", "object_id = $1"),
            ("observations", "id = $1"),
            ("pending_ids", "object_id = $1"),
        ):
            for row in await sql.fetch(f"SELECT * FROM {table} WHERE {where}", oid):
                lines.append(f"{table} {dict(row)}")
    return "".join("\n" + line for line in lines)


async def independent_check(
    sql: asyncpg.Connection, truth_dir: Path, ttl: float, reaped: float | None = None
) -> list[str]:
    """What is wrong, computed without lastseen.devtools.verify, for a run without faults and the
    ``even`` online rule: every acknowledged callback is done, and objects holds the even ids
    whose newest callback is within the TTL, with its receive time. Ids within the TTL edge
    (the reaper's interval, plus slack, plus the time since the round that began at
    ``reaped``) may be either way."""
    late = REAP + EDGE + (0.0 if reaped is None else time.monotonic() - reaped)
    acknowledged = {
        sent.callback_id
        for sent in truth.read_callbacks(truth_dir)
        if sent.callback_id is not None and sent.acknowledged
    }
    async with sql.transaction(isolation="repeatable_read", readonly=True):
        now: datetime = await sql.fetchval("SELECT now()")
        callbacks = await sql.fetch("SELECT id, received_at, object_ids, done_at FROM callbacks")
        rows = {r["id"]: r["last_seen"] for r in await sql.fetch("SELECT * FROM objects")}
    problems = []
    done = {c["id"] for c in callbacks if c["done_at"] is not None}
    problems += [f"callback {i} not done" for i in sorted(acknowledged - done)]
    newest: dict[int, datetime] = {}
    for c in callbacks:
        for object_id in c["object_ids"]:
            newest[object_id] = max(newest.get(object_id, c["received_at"]), c["received_at"])
    for object_id in sorted(newest.keys() | rows.keys()):
        seen = newest.get(object_id)
        age = None if seen is None else (now - seen).total_seconds()
        must = object_id % 2 == 0 and age is not None and age < ttl - EDGE
        may = object_id % 2 == 0 and age is not None and age <= ttl + late
        row = rows.get(object_id)
        if row is None and must:
            problems.append(f"object {object_id} missing")
        elif row is not None and not may:
            problems.append(f"object {object_id} unexpected")
        elif row is not None and row != seen:
            problems.append(f"object {object_id} last_seen {row} instead of {seen}")
    return problems


async def test_reference_scenario_end_to_end_passes_verify(
    db_url: str,
    start_service: StartService,
    sql: asyncpg.Connection,
    tmp_path: Path,
    background: Callable[..., Awaitable[Background]],
) -> None:
    """`lastseen simulate --mode upstream` and `--mode producer`, run as two processes with the
    reference's behaviour and time compressed 25 times, feed a service; every callback is
    acknowledged and processed, objects holds even ids only, and `lastseen verify` passes.
    The TTL is long: expiry is tested elsewhere, and here the rows must outlast the checks."""
    ttl = 30.0
    truth_dir = tmp_path / "truth"
    upstream = await background(
        "simulate",
        "--mode=upstream",
        "--upstream-listen=127.0.0.1:0",
        "--latency-min=0.012",
        "--latency-max=0.172",
        f"--truth-dir={truth_dir}",
    )
    url = (await upstream.event("upstream listening"))["url"]
    service = await start_service(objects_url=url, ttl=ttl)
    producer = await run_cli(
        "simulate",
        "--mode=producer",
        f"--target={service.url}/callback",
        "--period=0.2",
        "--duration=2.5",
        # The reference's 1 s would count a reply a busy machine is slow to send as missed.
        "--timeout=10",
        f"--truth-dir={truth_dir}",
    )
    assert producer.code == 0, producer.stderr
    sent = list(truth.read_callbacks(truth_dir))
    acknowledged = sum(s.acknowledged for s in sent)
    assert len(sent) >= 5
    assert acknowledged == len(sent)
    assert f"{len(sent)} callbacks sent, {acknowledged} acknowledged" in producer.stdout
    await all_done(sql)
    code, summary = await upstream.stop()  # closes its truth file
    assert code == 0
    assert "answered" in summary

    result = await run_cli(
        "verify",
        f"--truth-dir={truth_dir}",
        f"--database-url={db_url}",
        f"--ttl={ttl:g}",
        f"--reap-interval={REAP}",
        f"--edge={EDGE}",
    )
    assert result.code == 0, result.stdout + result.stderr
    assert "lastseen verify: PASS" in result.stdout
    assert f"all {acknowledged} acknowledged callbacks were processed" in result.stdout
    ids = [r[0] for r in await sql.fetch("SELECT id FROM objects")]
    assert ids
    assert all(i % 2 == 0 for i in ids)


async def test_faults_are_retried_or_dead_lettered_and_verify_passes(
    start_service: StartService, db: Database, sql: asyncpg.Connection, tmp_path: Path
) -> None:
    """With every kind of upstream fault injected under open-loop load, transient faults (5xx,
    hangs, bodies that do not parse, answers about another id, dropped connections) are
    retried, the permanent one (400) is dead-lettered, every acknowledged callback is
    processed, and verify passes."""
    config = sim_config(
        tmp_path,
        rate=40,
        connections=8,
        max_ids=30,
        id_universe=300,
        upstream_error_5xx=0.15,
        upstream_hang=0.03,
        upstream_hang_seconds=5.0,
        upstream_malformed=0.05,
        upstream_drop=0.03,
        upstream_invalid_400=0.03,
        upstream_wrong_id=0.03,
    )
    simulator, service = await simulated_run(start_service, config, 2.0, lookup_timeout=0.3)
    try:
        await all_done(sql)
        simulator.flush()
        reaped = await reap_now(service)
        report = await check_run(db, tmp_path, reaped=reaped)
    finally:
        await simulator.stop()
    assert report.ok, "\n".join(report.lines()) + await _explain(sql, report)
    assert simulator.producer is not None
    assert report.acknowledged == simulator.producer.stats["acknowledged"] > 0
    assert set(report.dead_letters) == {"http_4xx"}
    for reason in ("http_5xx", "timeout", "malformed_body", "wrong_id"):
        assert service.sample("lastseen_lookup_retries_total", reason=reason) > 0, reason
    assert simulator.upstream is not None
    assert simulator.upstream.stats["drop"] > 0


async def test_verify_agrees_with_an_independent_check(
    start_service: StartService, db: Database, sql: asyncpg.Connection, tmp_path: Path
) -> None:
    """On a run where objects keep expiring (1000 ids, up to 20 per callback, a 1 s TTL), the
    check written here finds nothing wrong, and neither does verify."""
    ttl = 1.0
    config = sim_config(tmp_path, period=0.05, max_ids=20, id_universe=1000)
    simulator, service = await simulated_run(start_service, config, 2.5, ttl=ttl)
    try:
        await all_done(sql)
        simulator.flush()
        reaped = await reap_now(service)
        report = await check_run(db, tmp_path, ttl=ttl, reaped=reaped)
        mine = await independent_check(sql, tmp_path, ttl, reaped)
    finally:
        await simulator.stop()
    assert mine == []
    assert report.ok, "\n".join(report.lines())
    # Something did expire, and something is left: both sides of the TTL were checked.
    assert service.sample("lastseen_objects_deleted_total", cause="expired") > 0
    assert report.rows > 0


async def test_verify_fails_when_the_objects_table_is_tampered_with(
    db_url: str, start_service: StartService, db: Database, sql: asyncpg.Connection, tmp_path: Path
) -> None:
    """After a clean run, a deleted row, a row for an offline id and a row whose last_seen moved
    back each make `lastseen verify` exit 1 and name the object; the independent check agrees."""
    ttl = 30.0
    simulator, _ = await simulated_run(start_service, sim_config(tmp_path), 1.2, ttl=ttl)
    try:
        await all_done(sql)
        simulator.flush()
        assert (await check_run(db, tmp_path, ttl=ttl)).ok
        assert await independent_check(sql, tmp_path, ttl) == []
        rows = [r[0] for r in await sql.fetch("SELECT id FROM objects ORDER BY id")]
        gone, moved = rows[0], rows[1]
        offline = await sql.fetchval(
            "SELECT min(x) FROM callbacks, unnest(object_ids) AS x WHERE x % 2 = 1"
        )
        await sql.execute("DELETE FROM objects WHERE id = $1", gone)
        await sql.execute("INSERT INTO objects VALUES ($1, now())", offline)
        await sql.execute(
            "UPDATE objects SET last_seen = last_seen - interval '1 second' WHERE id = $1", moved
        )
        result = await run_cli(
            "verify",
            f"--truth-dir={tmp_path}",
            f"--database-url={db_url}",
            f"--ttl={ttl:g}",
            f"--reap-interval={REAP}",
        )
        mine = await independent_check(sql, tmp_path, ttl)
    finally:
        await simulator.stop()
    assert result.code == 1, result.stdout + result.stderr
    assert "lastseen verify: FAIL: 3 discrepancies" in result.stdout
    assert f"object {gone}: online" in result.stdout
    assert "missing_row: 1" in result.stdout
    assert f"object {offline}: the upstream said offline" in result.stdout
    assert f"object {moved}: last_seen" in result.stdout
    assert "wrong_last_seen: 1" in result.stdout
    assert len(mine) == 3


def test_the_story_changes_what_is_sent_and_answered_over_time() -> None:
    """The story's timeline, in its TTL (30 s) and period (5 s): the leaving ids until 10 s, the
    dead-letter id in the first callback only, a burst of 3 every third tick from the second;
    the going-offline ids online until 20 s; the dead-letter id answered 400 until 10 s."""
    story = Story(ttl=30, period=5)
    assert story.length == 60
    assert story.retry_at == 15
    assert story.settled_at == 10 + 30 + 5 + 1  # the last tick with the leaving ids, a TTL
    first = story.callbacks(0)
    assert len(first) == 1
    assert DEAD_LETTER in first[0]
    assert set(LEAVING) <= set(first[0])
    assert len(story.callbacks(1)) == 3
    assert len(story.callbacks(2)) == 1
    assert set(LEAVING) <= set(story.callbacks(2)[0])  # 10 s
    later = story.callbacks(3)[0]  # 15 s
    assert not set(LEAVING) & set(later)
    assert DEAD_LETTER not in later
    assert set(STEADY) | set(GOING_OFFLINE) == set(later)
    story.begin(1000.0)
    offline = GOING_OFFLINE[0]
    assert story.online(offline, 1019.9)
    assert not story.online(offline, 1020.0)
    assert story.online(STEADY[0], 2000.0)
    assert story.fault(DEAD_LETTER, 1009.9) == "invalid_400"
    assert story.fault(DEAD_LETTER, 1010.0) is None
    assert story.fault(STEADY[0], 1000.0) is None


async def test_verify_expect_fails_a_run_without_deletions(
    db_url: str, start_service: StartService, sql: asyncpg.Connection, tmp_path: Path
) -> None:
    """A reference run (even ids online, never changing) within its TTL deletes nothing:
    `lastseen verify` passes, saying it checked no deletions, and fails with --expect expired
    --expect offline, naming both."""
    ttl = 30.0
    simulator, _ = await simulated_run(start_service, sim_config(tmp_path), 1.0, ttl=ttl)
    try:
        await all_done(sql)
        simulator.flush()
        args = [f"--truth-dir={tmp_path}", f"--database-url={db_url}", f"--ttl={ttl:g}"]
        plain = await run_cli("verify", *args)
        expecting = await run_cli("verify", *args, "--expect=expired", "--expect=offline")
    finally:
        await simulator.stop()
    assert plain.code == 0, plain.stdout + plain.stderr
    assert "deletions: expired: 0 checked" in plain.stdout
    assert "offline: 0 checked" in plain.stdout
    assert expecting.code == 1, expecting.stdout + expecting.stderr
    assert "lastseen verify: FAIL: 2 discrepancies" in expecting.stdout
    assert "no_expired: 1" in expecting.stdout
    assert "no_offline: 1" in expecting.stdout
    assert "required: expired and offline" in expecting.stdout
