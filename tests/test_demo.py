"""``lastseen demo`` and its dashboard: the whole system in one process, then a verification."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from helpers.cli import run_cli
from helpers.services import StartService
from rich.console import Console

from lastseen.devtools import dashboard
from lastseen.devtools.demo import NotEmpty, start_fresh
from lastseen.devtools.simulate.config import SimulatorConfig
from lastseen.devtools.simulate.producer import ProducerConfig
from lastseen.devtools.simulate.run import Simulator
from lastseen.devtools.simulate.upstream import UpstreamConfig
from lastseen.storage.database import Database

# Time compressed about 25 times; free ports; no terminal (stdout is a pipe).
FAST = [
    "--listen=127.0.0.1:0",
    "--upstream-listen=127.0.0.1:0",
    "--period=0.2",
    "--ttl=2",
    "--latency-min=0.012",
    "--latency-max=0.172",
    "--reap-interval=0.05",
    "--progress-every=1",
    "--edge=0.2",
    "--log-level=warning",
]


@pytest.mark.slow
async def test_demo_without_a_terminal_runs_and_verifies(tmp_path: Path) -> None:
    """`lastseen demo --scenario reference --duration 3` on a fresh data dir starts the
    embedded PostgreSQL, the service and the simulator (the reference producer), prints plain
    progress lines, and ends with a summary saying that every callback was acknowledged and
    every acknowledged callback was processed; it
    exits 0."""
    # A producer's timeout of 10 s, not the reference's 1 s: a reply a busy machine is slow to
    # send is not a missed callback.
    result = await run_cli(
        "demo",
        f"--data-dir={tmp_path}",
        "--scenario=reference",
        "--duration=3",
        "--timeout=10",
        *FAST,
    )
    assert result.code == 0, result.stdout + result.stderr
    out = result.stdout
    assert "╭" not in out  # no live view without a terminal
    progress = re.findall(r"^\[0:00:0\d\] sent (\d+) acked (\d+)", out, re.MULTILINE)
    assert len(progress) >= 2
    match = re.search(r"producer: (\d+) callbacks sent, (\d+) acknowledged", out)
    assert match is not None
    sent, acknowledged = int(match[1]), int(match[2])
    assert sent >= 5
    assert acknowledged == sent
    assert "lastseen verify: PASS" in out
    assert f"all {acknowledged} acknowledged callbacks were processed" in out
    assert (tmp_path / "demo" / "truth" / "callbacks.jsonl").exists()


def named(event: str, out: str) -> dict[int, str]:
    """The objects the events ``objects 1, 2 <event>`` name, each with the event's group."""
    found = {}
    for match in re.finditer(rf"objects? ([\d, ]+) {event}", out):
        for object_id in match[1].split(", "):
            found[int(object_id)] = match[2]
    return found


@pytest.mark.slow
async def test_the_story_shows_expiry_offline_coalescing_and_a_dead_letter_retried(
    tmp_path: Path,
) -> None:
    """The default scenario, time compressed (TTL 3 s, a tick every 0.2 s, 6 s in all): the
    events name the leaving ids expired a TTL after they were last seen, the going-offline ids
    deleted at once, the lookups coalesced and the dead letter retried; the service's metrics
    count both kinds of deletion and the coalesced lookups; and verify passes, having checked
    both kinds of deletion, which it required."""
    fast = [arg for arg in FAST if not arg.startswith("--ttl=")]
    result = await run_cli(
        "demo", f"--data-dir={tmp_path}", "--ttl=3", "--timeout=10", "--refresh=0.1", *fast
    )
    out = result.stdout
    assert result.code == 0, out + result.stderr
    assert "story (TTL 3 s, a callback every 0.2 s, 6 s in all):" in out
    expired = named(r"expired \(last seen ([\d.]+) s ago\)", out)
    # 20, 21, 22, and 50: the retried dead letter's row, a TTL after the first callback.
    assert sorted(expired) == [20, 21, 22, 50], out
    assert all(float(age) >= 3 * 0.95 for age in expired.values())
    assert sorted(named("went offline: deleted at once()", out)) == [30, 31, 32], out
    assert "dead letter: object 50 (http_4xx)" in out
    assert "demo: POST /dead-letters/retry: 200, 1 queued" in out
    assert "dead letter retried: object 50" in out
    assert "lookups coalesced (shared requests)" in out
    metrics = re.search(
        r"service: deleted (\d+) objects by the TTL and (\d+) for going offline; "
        r"(\d+) lookups coalesced",
        out,
    )
    assert metrics is not None, out
    assert int(metrics[1]) == 4  # 20, 21, 22 and 50
    assert int(metrics[2]) == 3  # 30, 31, 32
    assert int(metrics[3]) > 0
    assert "lastseen verify: PASS" in out
    assert "deletions: expired: 4 checked" in out
    assert "offline: 3 checked" in out
    assert "required: expired and offline" in out
    assert "1 retried, 1 of them processed" in out


@pytest.mark.slow
async def test_a_story_stopped_early_requires_no_deletions(tmp_path: Path) -> None:
    """Stopped before its deletions were due (--duration 1 of a 4 s story), the demo's verify
    passes without requiring them, and says so."""
    result = await run_cli("demo", f"--data-dir={tmp_path}", "--duration=1", *FAST)
    assert result.code == 0, result.stdout + result.stderr
    assert "its deletions were not all due yet, and are not required" in result.stdout
    assert "lastseen verify: PASS" in result.stdout
    assert "required:" not in result.stdout


@pytest.mark.slow
async def test_demo_exits_1_when_verification_fails(tmp_path: Path) -> None:
    """When callbacks cannot be finished (every lookup hangs) the drain gives up, verification
    lists the unprocessed callbacks, and the demo exits 1."""
    result = await run_cli(
        "demo",
        f"--data-dir={tmp_path}",
        "--duration=1",
        *FAST,
        "--hang=1",
        "--hang-seconds=30",
        "--drain-timeout=0.3",
        "--shutdown-grace=0.2",
    )
    assert result.code == 1, result.stdout + result.stderr
    assert "lastseen verify: FAIL" in result.stdout
    assert "NOT all acknowledged callbacks were processed" in result.stdout
    assert "not_processed:" in result.stdout


async def test_dashboard_shows_every_figure(start_service: StartService, tmp_path: Path) -> None:
    """After a second of traffic, a frame shows callbacks sent and acknowledged, inbox depth,
    lookups in flight, online objects, deletions, lookup latency and lag over upstream
    quantiles, and dead letters, with the figures read from the service and the simulator."""
    simulator = Simulator(
        SimulatorConfig(
            upstream_listen=("127.0.0.1", 0),
            upstream=UpstreamConfig(latency_min=0.01, latency_max=0.05, seed=1, invalid_400=0.05),
            producer=ProducerConfig(period=0.1, seed=2),
            truth_dir=tmp_path,
        )
    )
    url = await simulator.start_upstream()
    service = await start_service(objects_url=url, ttl=30)
    simulator.start_producer(service.url + "/callback")
    try:
        board = dashboard.Dashboard(service.service, simulator, window=10)
        await board.sample()
        await asyncio.sleep(1.0)
        figures = await board.sample()
    finally:
        await simulator.stop()
    assert figures.sent >= 3
    # The service counts a 202 before sending it, the producer once it has it.
    assert figures.received >= figures.acknowledged >= 3
    assert figures.processed >= 1
    assert figures.inbox_pending is not None
    assert figures.objects_online
    assert figures.latencies["lookup"][0] is not None
    assert figures.latencies["lag_over_upstream"][1] is not None
    assert figures.dead_letters.get("http_4xx", 0) > 0
    assert figures.upstream_requests > 0

    console = Console(record=True, width=120, force_terminal=False)
    console.print(dashboard.render(figures))
    text = console.export_text()
    for label in (
        "callbacks sent",
        "acknowledged (202)",
        "inbox depth (pending)",
        "lookups in flight",
        "online objects",
        "deleted: expired / offline",
        "lookups coalesced",
        "upstream lookup",
        "lag over upstream",
        "dead letters",
        "Events",
    ):
        assert label in text, label
    assert f"{figures.objects_online:,}" in text
    # The events, as the database shows them: rows created, dead letters recorded.
    assert any(" online" in event for event in figures.events), figures.events
    assert any(event.split(" ", 1)[1].startswith("dead letter") for event in figures.events), (
        figures.events
    )
    line = dashboard.line(figures)
    assert f"sent {figures.sent} acked {figures.acknowledged}" in line


async def test_demo_empties_its_own_database_and_refuses_anyone_elses(db: Database) -> None:
    """The demo empties the tables of its own embedded database, but refuses to run on a
    database given with --database-url that already holds callbacks."""
    await db.pool.execute(
        "INSERT INTO callbacks (received_at, object_ids, locked_until) VALUES (now(), '{1}', now())"
    )
    with pytest.raises(NotEmpty):
        await start_fresh(db, owned=False)
    await start_fresh(db, owned=True)
    assert await db.pool.fetchval("SELECT count(*) FROM callbacks") == 0
    await start_fresh(db, owned=False)  # now empty: accepted
