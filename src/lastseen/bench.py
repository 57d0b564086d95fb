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
from lastseen.processes import ServeProcess, SimulateProcess

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
        self.simulators: list[SimulateProcess] = []

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
        for simulator in self.simulators:
            if simulator.proc is not None and simulator.proc.returncode is None:
                await simulator.terminate()
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

    async def simulate(self, *args: str, upstream: bool) -> SimulateProcess:
        process = SimulateProcess(*args)
        self.simulators.append(process)
        return await process.start(wait_for_upstream=upstream)

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


class Scrape:
    """One reading of a service's /metrics: plain samples and histogram buckets."""

    def __init__(self, text: str, at: float) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        self.at = at
        self.values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                self.values[key] = sample.value

    def get(self, name: str, **labels: str) -> float:
        return self.values.get((name, tuple(sorted(labels.items()))), 0.0)

    def total(self, name: str) -> float:
        """Sum over every label value of ``name``."""
        return sum(v for (n, _), v in self.values.items() if n == name)

    def buckets(self, name: str) -> list[tuple[float, float]]:
        """(upper bound, cumulative count) of histogram ``name``, in order."""
        found = [
            (float(dict(labels)["le"]), value)
            for (n, labels), value in self.values.items()
            if n == name + "_bucket"
        ]
        return sorted(found)


def histogram_quantile(
    before: list[tuple[float, float]], after: list[tuple[float, float]], q: float
) -> float | None:
    """The q-quantile (0-1) of observations between two scrapes, interpolated in its bucket."""
    counts = [(bound, a - b) for (bound, a), (_, b) in zip(after, before or after, strict=False)]
    if not before:
        counts = list(after)
    total = counts[-1][1] if counts else 0
    if total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, cumulative in counts:
        if cumulative >= rank:
            if bound == float("inf"):
                return lower_bound
            share = (rank - lower_count) / max(cumulative - lower_count, 1e-12)
            return lower_bound + share * (bound - lower_bound)
        lower_bound, lower_count = bound, cumulative
    return lower_bound


async def scrape(url: str) -> Scrape:
    import aiohttp

    async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as response:
        return Scrape(await response.text(), time.monotonic())


DISTRIBUTIONS = {
    # name: (most ids per callback, id universe)
    "reference": (200, 100),
    "unique": (200, 10_000_000),
}


async def pipeline(bench: Bench) -> dict[str, Any]:
    """Rising callback rates until the service no longer keeps up, for each id distribution."""
    o = bench.options
    runs: dict[str, Any] = {}
    for distribution, (max_ids, universe) in DISTRIBUTIONS.items():
        url = await bench.fresh_database(f"bench_pipeline_{distribution}")
        upstream = await bench.simulate(
            "--mode",
            "upstream",
            "--upstream-listen",
            "127.0.0.1:0",
            "--latency-min",
            str(o.latency_min),
            "--latency-max",
            str(o.latency_max),
            "--seed",
            str(o.seed),
            upstream=True,
        )
        serve = await bench.serve(url, objects_url=upstream.upstream_url, ttl="30")
        steps = []
        for rate in o.rates:
            step = await _pipeline_step(bench, serve, upstream, rate, max_ids, universe)
            steps.append(step)
            _progress(
                f"pipeline {distribution} {rate}/s: {step['lookups_per_s']} lookups/s, "
                f"lag over upstream p99 {step['lag_over_upstream_ms']['p99']} ms, "
                f"inbox {step['inbox_pending_end']}, keeping up: {step['keeping_up']}"
            )
            if not step["keeping_up"]:
                break
        await serve.terminate()
        await upstream.terminate()
        sustained = [s for s in steps if s["keeping_up"]]
        runs[distribution] = {
            "max_ids_per_callback": max_ids,
            "id_universe": universe,
            "steps": steps,
            "max_sustained_lookups_per_s": max((s["lookups_per_s"] for s in sustained), default=0),
        }
    return {
        "upstream_latency_s": [o.latency_min, o.latency_max],
        "step_seconds": o.step_seconds,
        "distributions": runs,
        "goal": ">= 5000 lookups/s sustained; lag over upstream p99 < 100 ms at 1000 lookups/s",
    }


async def _pipeline_step(
    bench: Bench,
    serve: ServeProcess,
    upstream: SimulateProcess,
    rate: float,
    max_ids: int,
    universe: int,
) -> dict[str, Any]:
    o = bench.options
    meter = bench.cpu(serve=serve.pid, upstream=upstream.pid)
    producer = await bench.simulate(
        "--mode",
        "producer",
        "--target",
        serve.url + "/callback",
        "--rate",
        str(rate),
        "--connections",
        "32",
        "--max-ids",
        str(max_ids),
        "--id-universe",
        str(universe),
        "--duration",
        str(o.step_seconds),
        "--seed",
        str(o.seed),
        upstream=False,
    )
    meter.start()
    first = previous = await scrape(serve.url)
    timeline: list[dict[str, Any]] = []
    while producer.proc is not None and producer.proc.returncode is None:
        await asyncio.sleep(o.sample_every)
        now = await scrape(serve.url)
        dt = now.at - previous.at
        timeline.append(
            {
                "t": round(now.at - first.at, 2),
                "lookups_per_s": round(
                    (now.total("lastseen_lookups_total") - previous.total("lastseen_lookups_total"))
                    / dt,
                    1,
                ),
                "inbox_pending": now.get("lastseen_inbox_pending"),
                "lookups_in_flight": now.get("lastseen_lookups_in_flight"),
                "lag_over_upstream_p99_ms": _ms(
                    histogram_quantile(
                        previous.buckets("lastseen_lag_over_upstream_seconds"),
                        now.buckets("lastseen_lag_over_upstream_seconds"),
                        0.99,
                    )
                ),
            }
        )
        previous = now
    await producer.wait()
    last = await scrape(serve.url)
    cpu = meter.stop()
    seconds = last.at - first.at

    def rate_of(name: str) -> float:
        return round((last.total(name) - first.total(name)) / seconds, 1)

    lag = ("lastseen_lag_over_upstream_seconds", "lastseen_result_lag_seconds")
    lag_quantiles = {
        name: {
            f"p{int(q * 100)}": _ms(histogram_quantile(first.buckets(name), last.buckets(name), q))
            for q in (0.5, 0.99)
        }
        for name in lag
    }
    pending_end = last.get("lastseen_inbox_pending")
    keeping_up = pending_end <= max(2 * rate, 10) and (lag_quantiles[lag[0]]["p99"] or 0) < 1000
    return {
        "callbacks_per_s": rate,
        "producer": producer.summary,
        "seconds": round(seconds, 1),
        "lookups_per_s": rate_of("lastseen_lookups_total"),
        "ids_resolved_per_s": rate_of("lastseen_result_lag_seconds_count"),
        "coalesced_per_s": rate_of("lastseen_lookups_coalesced_total"),
        "dead_letters": last.total("lastseen_dead_letters_total")
        - first.total("lastseen_dead_letters_total"),
        "inbox_pending_end": pending_end,
        "inbox_pending_max": max((p["inbox_pending"] for p in timeline), default=0),
        "lag_over_upstream_ms": lag_quantiles[lag[0]],
        "result_lag_ms": lag_quantiles[lag[1]],
        "cpu_percent": cpu,
        "keeping_up": keeping_up,
        "timeline": timeline,
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


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
    runners = {"ingest": ingest, "pipeline": pipeline}
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
