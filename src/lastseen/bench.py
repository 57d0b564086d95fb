"""``lastseen bench``: the same measurements every time, end to end, over loopback.

Each component runs as its own process, as in production: PostgreSQL (the embedded server, in
a fresh data directory, fsync on: durable commits are what is measured), ``lastseen serve``,
and the simulator's upstream and producer. Results go to ``OUT/results.json`` (every figure,
every setting, the machine), ``OUT/report.txt`` (the human table) and ``OUT/bench.png``.

Scenarios:
- ingest: the most callbacks with 200-id bodies the service acknowledges durably per second,
  next to a do-nothing POST handler on the same server in the same run, alternating rounds.
- pipeline: rising callback rates until the service stops keeping up; per step lookups/s, ids
  resolved/s, coalesced lookups, inbox depth, and the lag over upstream latency.
- expiry: how long after the TTL each object is actually deleted.
- soak: a fixed rate for a while, sampling RSS and inbox depth.

The machine is shared and noisy: compare figures from one run, not across runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import psutil

from lastseen.embedded import EmbeddedPostgres
from lastseen.loadgen import percentile, run_load
from lastseen.processes import ServeProcess

SCENARIOS = ("ingest", "pipeline", "expiry", "soak")


@dataclasses.dataclass
class BenchOptions:
    scenarios: Sequence[str]
    out_dir: Path
    database_url: str | None = None
    # ingest
    seconds: float = 5.0
    connections: int = 64
    rounds: int = 3
    ids_per_callback: int = 200
    # pipeline
    rates: Sequence[float] = (5, 10, 20, 40, 80)
    step_seconds: float = 20.0
    latency_min: float = 0.3
    latency_max: float = 4.3
    # expiry
    ttl: float = 5.0
    expiry_objects: int = 2000
    # soak
    soak_seconds: float = 600.0
    soak_rate: float = 20.0
    sample_every: float = 5.0
    seed: int = 1

    def smoke(self) -> BenchOptions:
        """The same scenarios, tiny and in seconds: for the test suite, not for figures."""
        return dataclasses.replace(
            self,
            seconds=0.5,
            connections=4,
            rounds=1,
            rates=(5.0,),
            step_seconds=2.0,
            latency_min=0.01,
            latency_max=0.05,
            ttl=1.0,
            expiry_objects=20,
            soak_seconds=2.0,
            soak_rate=5.0,
            sample_every=0.5,
        )


class CpuMeter:
    """CPU seconds used by processes (and their children) between ``start`` and ``stop``."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._start: dict[str, float] = {}
        self._t0 = 0.0

    @staticmethod
    def _cpu(pid: int) -> float:
        try:
            root = psutil.Process(abs(pid))
            total = 0.0
            for proc in [root, *(root.children(recursive=True) if pid > 0 else [])]:
                with _quiet():
                    times = proc.cpu_times()
                    total += times.user + times.system
            return total
        except psutil.Error:
            return 0.0

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._start = {name: self._cpu(pid) for name, pid in self.pids.items()}

    def stop(self) -> dict[str, float]:
        """Per process, the share of one core used, in percent."""
        elapsed = time.perf_counter() - self._t0
        return {
            name: round(100 * (self._cpu(pid) - self._start[name]) / elapsed, 1)
            for name, pid in self.pids.items()
        }


@asynccontextmanager
async def _noop_context() -> AsyncIterator[None]:
    yield


def _quiet() -> Any:
    import contextlib

    return contextlib.suppress(psutil.Error)


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


class Bench:
    """The processes of one bench run and the database they share."""

    def __init__(self, options: BenchOptions) -> None:
        self.options = options
        self.embedded: EmbeddedPostgres | None = None
        self.server_url = ""
        self.pg_pid: int | None = None
        self.serves: list[ServeProcess] = []

    async def __aenter__(self) -> Bench:
        if self.options.database_url:
            self.server_url = self.options.database_url
        else:
            self.embedded = EmbeddedPostgres(self.options.out_dir / "postgres")
            self.server_url = await asyncio.to_thread(self.embedded.start)
            self.pg_pid = self.embedded.pid
        return self

    async def __aexit__(self, *exc: object) -> None:
        for serve in self.serves:
            await serve.stop()
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)

    async def fresh_database(self, name: str) -> str:
        conn = await asyncpg.connect(self.server_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return with_database(self.server_url, name)

    async def serve(self, database_url: str, *args: str, **env: str) -> ServeProcess:
        environment = {"LASTSEEN_DATABASE_URL": database_url}
        environment.update({f"LASTSEEN_{k.upper()}": v for k, v in env.items()})
        serve = ServeProcess(*args, env=environment, keep_logs=1000)
        self.serves.append(serve)
        return await serve.start()

    async def postgres_version(self) -> str:
        conn = await asyncpg.connect(self.server_url)
        try:
            return str(await conn.fetchval("SHOW server_version"))
        finally:
            await conn.close()

    def cpu(self, **pids: int) -> CpuMeter:
        named = dict(pids)
        named["bench"] = -os.getpid()  # negative: this process alone, not its children
        if self.pg_pid is not None:
            named["postgres"] = self.pg_pid
        return CpuMeter(named)


def callback_bodies(count: int, ids: int, seed: int, universe: int = 10_000_000) -> list[bytes]:
    rng = random.Random(seed)
    return [
        json.dumps({"object_ids": [rng.randrange(universe) for _ in range(ids)]}).encode()
        for _ in range(count)
    ]


async def ingest(bench: Bench) -> dict[str, Any]:
    """Durable callbacks per second vs a do-nothing handler, same server, alternating rounds."""
    o = bench.options
    url = await bench.fresh_database("bench_ingest")
    serve = await bench.serve(url, "--role", "ingest", noop_route="true")
    parts = urlsplit(serve.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    bodies = callback_bodies(500, o.ids_per_callback, o.seed)
    await run_load(host, port, "/noop", bodies, connections=o.connections, seconds=1.0)  # warm up
    rounds: list[dict[str, Any]] = []
    for round_no in range(o.rounds):
        for path in ("/noop", "/callback"):
            meter = bench.cpu(serve=serve.pid)
            meter.start()
            result = await run_load(
                host, port, path, bodies, connections=o.connections, seconds=o.seconds
            )
            entry = result.summary() | {"round": round_no, "cpu_percent": meter.stop()}
            entry["ok_per_s"] = round(result.ok_rate(202), 1)
            rounds.append(entry)
            p99 = result.percentile(99) * 1000
            _progress(f"ingest {path} round {round_no + 1}: {entry['ok_per_s']}/s p99 {p99:.1f} ms")
    stored = await _count(url, "SELECT count(*) FROM callbacks")
    await serve.terminate()
    noop = [r["ok_per_s"] for r in rounds if r["path"] == "/noop"]
    durable = [r["ok_per_s"] for r in rounds if r["path"] == "/callback"]
    durable_p99 = [r["latency_ms"]["p99"] for r in rounds if r["path"] == "/callback"]
    acknowledged = sum(r["statuses"].get("202", 0) for r in rounds if r["path"] == "/callback")
    return {
        "connections": o.connections,
        "seconds_per_round": o.seconds,
        "ids_per_callback": o.ids_per_callback,
        "rounds": rounds,
        "noop_per_s_median": statistics.median(noop),
        "durable_per_s_median": statistics.median(durable),
        "ratio": round(statistics.median(durable) / statistics.median(noop), 3),
        "durable_p99_ms_median": statistics.median(durable_p99),
        "acknowledged": acknowledged,
        "stored_rows": stored,
        "goal": "ratio >= 0.5 and p99 < 50 ms",
    }


async def _count(url: str, query: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval(query))
    finally:
        await conn.close()


def _progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    return {
        "cores": psutil.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def render(results: dict[str, Any]) -> str:
    """The human table, as plain text."""
    from rich.console import Console
    from rich.table import Table

    console = Console(record=True, width=110, file=open(os.devnull, "w"))  # noqa: SIM115
    m = results["machine"]
    console.print(
        f"lastseen bench {results['started']}  cores={m['cores']} memory={m['memory_gib']} GiB "
        f"python={m['python']} postgresql={results.get('postgresql', '?')}"
    )
    scenarios = results["scenarios"]
    if "ingest" in scenarios:
        s = scenarios["ingest"]
        table = Table(
            title=f"ingest: {s['ids_per_callback']}-id bodies, {s['connections']} connections"
        )
        for column in ("round", "path", "ok/s", "p50 ms", "p99 ms", "max ms", "cpu % by process"):
            table.add_column(column)
        for r in s["rounds"]:
            lat = r["latency_ms"]
            cpu = " ".join(f"{k}={v}" for k, v in r["cpu_percent"].items())
            table.add_row(
                str(r["round"] + 1),
                r["path"],
                f"{r['ok_per_s']:.0f}",
                str(lat["p50"]),
                str(lat["p99"]),
                str(lat["max"]),
                cpu,
            )
        console.print(table)
        console.print(
            f"durable/do-nothing = {s['durable_per_s_median']:.0f}/{s['noop_per_s_median']:.0f}"
            f" = {s['ratio']:.2f} (goal >= 0.5); durable p99 {s['durable_p99_ms_median']} ms"
            f" (goal < 50); {s['acknowledged']} acknowledged, {s['stored_rows']} rows stored"
        )
    return console.export_text()


async def run(options: BenchOptions) -> int:
    options.out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "options": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in dataclasses.asdict(options).items()
        },
        "scenarios": {},
    }
    runners = {"ingest": ingest}
    async with Bench(options) as bench:
        results["postgresql"] = await bench.postgres_version()
        for name in options.scenarios:
            _progress(f"scenario {name}")
            results["scenarios"][name] = await runners[name](bench)
            (options.out_dir / "results.json").write_text(json.dumps(results, indent=2))
    report = render(results)
    (options.out_dir / "report.txt").write_text(report)
    print(report)
    return 0


__all__ = ["SCENARIOS", "BenchOptions", "percentile", "run"]
