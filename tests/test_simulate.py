"""``lastseen simulate`` and ``lastseen verify``: the reference scenario, faults, tampering, and
the producer's timeout. Real PostgreSQL, real HTTP, time compressed about 25 times."""

from __future__ import annotations

import asyncio
import itertools
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import structlog
from aiohttp import web
from helpers.cli import Background, run_cli
from helpers.services import Running, StartService, serve_app
from helpers.waiting import all_done, eventually

from lastseen.cli import build_parser
from lastseen.devtools.simulate import truth
from lastseen.devtools.simulate.config import SimulatorConfig
from lastseen.devtools.simulate.producer import Producer, ProducerConfig, draw_ids
from lastseen.devtools.simulate.run import Simulator
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


async def check_run(db: Database, truth_dir: Path, ttl: float = TTL) -> Report:
    return await verify(db, truth_dir, ttl=ttl, reap_interval=REAP, audit_retention=3600, edge=EDGE)


async def reap_now(running: Running) -> None:
    """One reaper round now: a check that follows sees the table as the reaper leaves it, not
    as a reaper that a busy machine delays left it a round ago."""
    assert running.service.pipeline is not None
    await running.service.pipeline.reaper.reap_once()


async def independent_check(sql: asyncpg.Connection, truth_dir: Path, ttl: float) -> list[str]:
    """What is wrong, computed without lastseen.devtools.verify, for a run without faults and the
    ``even`` online rule: every acknowledged callback is done, and objects holds the even ids
    whose newest callback is within the TTL, with its receive time. Ids within the TTL edge
    (the reaper's interval, plus slack) may be either way."""
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
        may = object_id % 2 == 0 and age is not None and age <= ttl + REAP + EDGE
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
        f"--truth-dir={truth_dir}",
    )
    assert producer.code == 0, producer.stderr
    sent = list(truth.read_callbacks(truth_dir))
    acknowledged = sum(s.acknowledged for s in sent)
    assert len(sent) >= 5
    # Only a reply slower than the 1 s timeout (a busy machine) would go unacknowledged.
    assert acknowledged >= 1
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
        await reap_now(service)
        report = await check_run(db, tmp_path)
    finally:
        await simulator.stop()
    assert report.ok, "\n".join(report.lines())
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
        await reap_now(service)
        report = await check_run(db, tmp_path, ttl=ttl)
        mine = await independent_check(sql, tmp_path, ttl)
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


async def never_answers() -> tuple[asyncio.Server, list[bytes], asyncio.Event]:
    """A server that reads requests and never answers; returns it and the request lines."""
    requests: list[bytes] = []
    release = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            if line.startswith(b"POST "):
                requests.append(line)
            if release.is_set():
                break
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, requests, release


async def test_producer_gives_up_after_1s_never_retries_and_counts_it() -> None:
    """Against a server that never answers, each POST fails after the 1 s timeout, is logged and
    counted as timed out, is sent exactly once, and the next sleep starts only after it ended."""
    server, requests, release = await never_answers()
    port = server.sockets[0].getsockname()[1]
    sent: list[truth.SentCallback] = []
    producer = Producer(
        ProducerConfig(target=f"http://127.0.0.1:{port}/callback", period=0.2, seed=1),
        sent.append,
    )
    with structlog.testing.capture_logs() as logs:
        running = asyncio.create_task(producer.run())
        await eventually(lambda: len(sent) >= 2, timeout=10)
        producer.stop()
        await running
    release.set()
    server.close()
    assert producer.config.timeout == 1.0  # the default, like the reference
    assert len(sent) == producer.stats["sent"] == producer.stats["timeout"] == len(requests)
    for callback in sent:
        assert not callback.acknowledged
        assert (callback.status, callback.callback_id, callback.error) == (None, None, "timeout")
        assert callback.seconds >= 0.99
    for first, second in itertools.pairwise(sent):
        assert second.sent_at - first.sent_at >= 1.0 + 0.2 - 0.02
    failures = [e for e in logs if e["event"] == "callback not acknowledged"]
    assert len(failures) == len(sent)
    assert {e["outcome"] for e in failures} == {"timeout"}


async def test_producer_counts_refused_connections_and_error_replies() -> None:
    """A POST that cannot connect is an error and one answered 503 is rejected; both are
    counted, recorded as not acknowledged, and sent once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    answered = 0

    async def unavailable(request: web.Request) -> web.Response:
        nonlocal answered
        answered += 1
        return web.json_response({"error": "not_stored"}, status=503)

    app = web.Application()
    app.router.add_post("/callback", unavailable)
    runner, url = await serve_app(app)
    try:
        outcomes = {}
        for target in (f"http://127.0.0.1:{closed_port}/callback", url + "/callback"):
            sent: list[truth.SentCallback] = []
            producer = Producer(ProducerConfig(target=target, period=0.05, seed=2), sent.append)
            running = asyncio.create_task(producer.run())

            async def three(sent: list[truth.SentCallback] = sent) -> bool:
                return len(sent) >= 3

            await eventually(three)
            producer.stop()
            await running
            assert not any(s.acknowledged for s in sent)
            outcomes[target] = producer.stats
    finally:
        await runner.cleanup()
    refused, rejected = outcomes.values()
    assert refused["error"] == refused["sent"] >= 3
    assert rejected["rejected"] == rejected["sent"] == answered >= 3


async def test_load_mode_is_open_loop_over_many_connections() -> None:
    """With 100 callbacks/s over 10 connections to a server that takes 0.5 s per reply, the
    producer keeps its schedule (a closed loop would send 20 a second), never has more than 10
    requests on the wire at once, and counts the callbacks that wait past their timeout."""
    busy = 0
    most = 0

    async def slow(request: web.Request) -> web.Response:
        nonlocal busy, most
        busy += 1
        most = max(most, busy)
        try:
            await asyncio.sleep(0.5)
        finally:
            busy -= 1
        return web.json_response({"callback_id": 1}, status=202)

    app = web.Application()
    app.router.add_post("/callback", slow)
    # Cancels the handler when the producer gives up on a request and closes its connection,
    # so that ``busy`` counts the requests on live connections only.
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert isinstance(server, asyncio.Server)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        producer = Producer(
            ProducerConfig(target=url + "/callback", rate=100, connections=10, seed=3)
        )
        running = asyncio.create_task(producer.run())
        await asyncio.sleep(1.0)
        producer.stop()
        await running
    finally:
        await runner.cleanup()
    stats = producer.stats
    assert stats["sent"] >= 60
    assert stats["acknowledged"] > 0
    assert stats["timeout"] > 0
    assert stats["sent"] == stats["acknowledged"] + stats["timeout"]
    # Requests at once, not ports over time: a timed-out request's connection is replaced.
    assert 1 < most <= 10


def test_ids_are_drawn_like_the_reference() -> None:
    """A callback holds a uniform count of 0 to 199 ids (so empty ones happen), each from 0 to
    99, with duplicates."""
    rng = random.Random(1)
    draws = [draw_ids(rng, 199, 100) for _ in range(3000)]
    counts = [len(ids) for ids in draws]
    assert (min(counts), max(counts)) == (0, 199)
    assert {i for ids in draws for i in ids} == set(range(100))
    assert all(len(set(ids)) < len(ids) for ids in draws if len(ids) > 50)


def test_simulate_flags_build_a_typed_config() -> None:
    """`lastseen simulate` without flags behaves like the reference program; flags set each
    part, and a bad online rule or fault rate is refused."""
    parser = build_parser()
    config = SimulatorConfig.from_arguments(parser.parse_args(["simulate"]))
    assert config.mode == "both"
    assert config.upstream_listen == ("127.0.0.1", 9010)
    assert (config.upstream.latency_min, config.upstream.latency_max) == (0.3, 4.3)
    assert config.upstream.content_type == "text/plain; charset=utf-8"
    assert config.upstream.online(4, 0)
    assert not config.upstream.online(3, 0)
    p = config.producer
    assert (p.target, p.period, p.timeout) == ("http://127.0.0.1:9090/callback", 5.0, 1.0)
    assert (p.max_ids, p.id_universe, p.rate) == (199, 100, 0.0)
    assert config.truth_dir is None

    flags = (
        "--mode upstream --online flip:10 --error-5xx 0.1 --drop 0.01 "
        "--rate 200 --connections 50 --id-universe 10000000 --upstream-listen :0"
    )
    args = parser.parse_args(["simulate", *flags.split()])
    config = SimulatorConfig.from_arguments(args)
    assert (config.runs_upstream, config.runs_producer) == (True, False)
    assert (config.upstream.error_5xx, config.upstream.drop) == (0.1, 0.01)
    assert config.upstream_listen == ("127.0.0.1", 0)
    assert (config.producer.rate, config.producer.connections) == (200.0, 50)
    assert config.producer.id_universe == 10_000_000
    for bad in ("--online odd", "--error-5xx 2", "--mode all"):
        with pytest.raises(SystemExit):
            parser.parse_args(["simulate", *bad.split()])
