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
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import psutil

from lastseen.devtools.launch import ServeProcess, SimulateProcess
from lastseen.devtools.loadgen import percentile, run_load
from lastseen.storage.embedded import EmbeddedPostgres

SCENARIOS = ("ingest", "pipeline", "expiry", "soak")


@dataclasses.dataclass
class BenchOptions:
    scenarios: Sequence[str]
    out_dir: Path
    database_url: str | None = None
    # ingest
    seconds: float = 5.0
    # Enough requests in flight to keep the group commit's batches full: fewer leave the
    # durable path waiting on fsyncs rather than on the CPU (64 gave about 10% less).
    connections: int = 128
    rounds: int = 3
    ids_per_callback: int = 200
    # pipeline
    rates: Sequence[float] = (10, 20, 40, 60, 80, 100, 120)
    step_seconds: float = 20.0
    latency_min: float = 0.3
    latency_max: float = 4.3
    # expiry
    ttl: float = 5.0
    expiry_objects: int = 2000
    # soak
    soak_seconds: float = 600.0
    soak_rate: float = 20.0
    sample_every: float = 2.0
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
            times = root.cpu_times()
            total = times.user + times.system
            if pid > 0:
                # Children that ended (PostgreSQL backends come and go) are in the parent's
                # children_* times once reaped; the ones alive are counted one by one.
                total += times.children_user + times.children_system
                for proc in root.children(recursive=True):
                    with _quiet():
                        child = proc.cpu_times()
                        total += child.user + child.system
            return float(total)
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

    async def upstream(self, latency_min: float, latency_max: float) -> SimulateProcess:
        """The simulated upstream (even ids online) on a free port."""
        return await self.simulate(
            "--mode", "upstream", "--upstream-listen", "127.0.0.1:0",
            "--latency-min", str(latency_min), "--latency-max", str(latency_max),
            "--seed", str(self.options.seed), upstream=True,
        )  # fmt: skip

    async def producer(
        self,
        serve: ServeProcess,
        rate: float,
        seconds: float,
        *,
        connections: int,
        max_ids: int | None = None,
        universe: int | None = None,
    ) -> SimulateProcess:
        """The simulated producer, open loop at ``rate`` for ``seconds``; the id draws are the
        simulator's defaults (the reference's) unless given."""
        args = ["--mode", "producer", "--target", serve.url + "/callback", "--rate", str(rate),
                "--connections", str(connections), "--duration", str(seconds),
                "--seed", str(self.options.seed)]  # fmt: skip
        if max_ids is not None:
            args += ["--max-ids", str(max_ids)]
        if universe is not None:
            args += ["--id-universe", str(universe)]
        return await self.simulate(*args, upstream=False)

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
        upstream = await bench.upstream(o.latency_min, o.latency_max)
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
    producer = await bench.producer(
        serve, rate, o.step_seconds, connections=32, max_ids=max_ids, universe=universe
    )
    meter.start()
    first = previous = await scrape(serve.url)
    scrapes = [first]
    timeline: list[dict[str, Any]] = []
    while producer.proc is not None and producer.proc.returncode is None:
        await asyncio.sleep(o.sample_every)
        now = await scrape(serve.url)
        if now.total("lastseen_lookups_total") < previous.total("lastseen_lookups_total"):
            continue  # a worker process did not answer in time: an incomplete reading
        scrapes.append(now)
        dt = now.at - previous.at
        timeline.append(
            {
                "t": round(now.at - first.at, 2),
                "lookups_per_s": round(_delta(previous, now, "lastseen_lookups_total") / dt, 1),
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
    cpu = meter.stop()
    # Steady state: from when the first lookups can have finished to when the producer stopped;
    # the ramp (nothing finishes for a few seconds) and the drain would understate the rate.
    steady = [
        m for m in scrapes if o.latency_max + 1.0 <= m.at - first.at <= o.step_seconds + 0.5
    ] or scrapes
    begin, end = (steady[0], steady[-1]) if len(steady) > 1 else (first, scrapes[-1])
    seconds = max(end.at - begin.at, 1e-9)

    def rate_of(name: str) -> float:
        return round(_delta(begin, end, name) / seconds, 1)

    lag = ("lastseen_lag_over_upstream_seconds", "lastseen_result_lag_seconds")
    lag_quantiles = {
        name: {
            f"p{int(q * 100)}": _ms(histogram_quantile(begin.buckets(name), end.buckets(name), q))
            for q in (0.5, 0.99)
        }
        for name in lag
    }
    pending = [m.get("lastseen_inbox_pending") for m in steady]
    # Keeping up: the lag stays under a second and the inbox holds no more than the callbacks
    # of the last few seconds (every callback waits for its slowest lookup).
    backlog_bound = rate * (o.latency_max + 2.0) + 10
    keeping_up = (
        max(pending, default=0) <= backlog_bound and (lag_quantiles[lag[0]]["p99"] or 0) < 1000
    )
    return {
        "callbacks_per_s": rate,
        "producer": producer.summary,
        "steady_seconds": round(seconds, 1),
        "lookups_per_s": rate_of("lastseen_lookups_total"),
        "ids_resolved_per_s": rate_of("lastseen_result_lag_seconds_count"),
        "coalesced_per_s": rate_of("lastseen_lookups_coalesced_total"),
        "dead_letters": _delta(first, scrapes[-1], "lastseen_dead_letters_total"),
        "inbox_pending_end": pending[-1] if pending else 0,
        "inbox_pending_max": max(pending, default=0),
        "lag_over_upstream_ms": lag_quantiles[lag[0]],
        "result_lag_ms": lag_quantiles[lag[1]],
        "cpu_percent": cpu,
        "keeping_up": keeping_up,
        "timeline": timeline,
    }


def _delta(before: Scrape, after: Scrape, name: str) -> float:
    return after.total(name) - before.total(name)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


async def expiry(bench: Bench) -> dict[str, Any]:
    """How long after its TTL each object is actually deleted."""
    import aiohttp

    o = bench.options
    url = await bench.fresh_database("bench_expiry")
    upstream = await bench.upstream(0.01, 0.05)
    serve = await bench.serve(url, objects_url=upstream.upstream_url, ttl=str(o.ttl))
    per_callback = 200
    ids = list(range(0, 2 * o.expiry_objects, 2))  # even: all online
    async with aiohttp.ClientSession() as http:
        for start in range(0, len(ids), per_callback):
            body = {"object_ids": ids[start : start + per_callback]}
            async with http.post(serve.url + "/callback", json=body) as response:
                assert response.status == 202, await response.text()
            await asyncio.sleep(0.05)
    conn = await asyncpg.connect(url)
    try:
        async with asyncio.timeout(o.ttl + 30):
            while await conn.fetchval("SELECT count(*) FROM callbacks WHERE done_at IS NULL"):
                await asyncio.sleep(0.02)
            seen = {r[0]: r[1].timestamp() for r in await conn.fetch("SELECT * FROM objects")}
            gone_at: dict[int, float] = {}
            while len(gone_at) < len(seen):
                present = {r[0] for r in await conn.fetch("SELECT id FROM objects")}
                now = time.time()
                for object_id in seen.keys() - present - gone_at.keys():
                    gone_at[object_id] = now
                await asyncio.sleep(0.01)
    finally:
        await conn.close()
    await serve.terminate()
    await upstream.terminate()
    late = [gone_at[i] - (seen[i] + o.ttl) for i in seen]
    return {
        "ttl_s": o.ttl,
        "objects": len(seen),
        "expected_objects": len(ids),
        "poll_interval_ms": 10,
        "after_ttl_ms": {
            "p50": round(percentile(late, 50) * 1000, 1),
            "p99": round(percentile(late, 99) * 1000, 1),
            "max": round(max(late, default=0.0) * 1000, 1),
            "min": round(min(late, default=0.0) * 1000, 1),
        },
        "deleted_before_ttl": sum(1 for x in late if x < 0),
        "goal": "every object deleted within TTL + 1 s, none before the TTL",
    }


async def soak(bench: Bench) -> dict[str, Any]:
    """A fixed rate for a while; RSS and inbox depth sampled: memory must stay flat."""
    o = bench.options
    url = await bench.fresh_database("bench_soak")
    upstream = await bench.upstream(o.latency_min, o.latency_max)
    serve = await bench.serve(url, objects_url=upstream.upstream_url)
    producer = await bench.producer(serve, o.soak_rate, o.soak_seconds, connections=16)
    started = time.monotonic()
    samples: list[dict[str, Any]] = []
    while producer.proc is not None and producer.proc.returncode is None:
        await asyncio.sleep(o.sample_every)
        metrics = await scrape(serve.url)
        samples.append(
            {
                "t": round(time.monotonic() - started, 1),
                "rss_mib": _rss_mib(serve.pid),
                "inbox_pending": metrics.get("lastseen_inbox_pending"),
                "lookups_total": metrics.total("lastseen_lookups_total"),
            }
        )
    await producer.wait()
    await serve.terminate()
    await upstream.terminate()
    half = samples[len(samples) // 2 :] or samples
    growth = {
        name: round(half[-1]["rss_mib"][name] - half[0]["rss_mib"][name], 1)
        for name in (half[0]["rss_mib"] if half else {})
        if name in half[-1]["rss_mib"]
    }
    return {
        "rate_per_s": o.soak_rate,
        "seconds": o.soak_seconds,
        "samples": samples,
        "rss_growth_second_half_mib": growth,
        "inbox_pending_max": max((s["inbox_pending"] for s in samples), default=0),
        "producer": producer.summary,
        "goal": "RSS flat over the soak",
    }


def _rss_mib(pid: int) -> dict[str, float]:
    """RSS of ``serve`` and of each of its worker processes, in MiB."""
    try:
        root = psutil.Process(pid)
        found = {"serve": root.memory_info().rss / 2**20}
        for n, child in enumerate(root.children()):
            with _quiet():
                found[f"worker{n}"] = child.memory_info().rss / 2**20
        return {k: round(v, 1) for k, v in found.items()}
    except psutil.Error:
        return {}


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

    console = Console(record=True, width=180, file=open(os.devnull, "w"))  # noqa: SIM115
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
    if "pipeline" in scenarios:
        s = scenarios["pipeline"]
        for name, run in s["distributions"].items():
            lo, hi = s["upstream_latency_s"]
            title = (
                f"pipeline, {name} ids (up to {run['max_ids_per_callback']} per callback from "
                f"{run['id_universe']:,}), upstream {lo}-{hi} s"
            )
            table = Table(title=title)
            for column in (
                "callbacks/s",
                "lookups/s",
                "ids resolved/s",
                "coalesced/s",
                "inbox end (max)",
                "lag over upstream p50/p99 ms",
                "result lag p50/p99 ms",
                "keeping up",
                "cpu % by process",
            ):
                table.add_column(column)
            for step in run["steps"]:
                lag, res = step["lag_over_upstream_ms"], step["result_lag_ms"]
                table.add_row(
                    f"{step['callbacks_per_s']:g}",
                    f"{step['lookups_per_s']:.0f}",
                    f"{step['ids_resolved_per_s']:.0f}",
                    f"{step['coalesced_per_s']:.0f}",
                    f"{step['inbox_pending_end']:.0f} ({step['inbox_pending_max']:.0f})",
                    f"{lag['p50']}/{lag['p99']}",
                    f"{res['p50']}/{res['p99']}",
                    "yes" if step["keeping_up"] else "NO",
                    " ".join(f"{k}={v}" for k, v in step["cpu_percent"].items()),
                )
            console.print(table)
            console.print(f"most lookups/s sustained: {run['max_sustained_lookups_per_s']:.0f}")
    if "expiry" in scenarios:
        s = scenarios["expiry"]
        late = s["after_ttl_ms"]
        console.print(
            f"expiry: {s['objects']} objects, TTL {s['ttl_s']} s; deleted after the TTL by "
            f"p50 {late['p50']} ms, p99 {late['p99']} ms, max {late['max']} ms "
            f"(polled every {s['poll_interval_ms']} ms); {s['deleted_before_ttl']} before it"
        )
    if "soak" in scenarios:
        s = scenarios["soak"]
        first = s["samples"][0]["rss_mib"] if s["samples"] else {}
        last = s["samples"][-1]["rss_mib"] if s["samples"] else {}
        rss = ", ".join(f"{k} {first.get(k)} -> {last.get(k)} MiB" for k in last)
        console.print(
            f"soak: {s['rate_per_s']} callbacks/s for {s['seconds']} s; RSS {rss}; growth over "
            f"the second half {s['rss_growth_second_half_mib']} MiB; inbox max "
            f"{s['inbox_pending_max']:.0f}"
        )
    return console.export_text()


def plot(results: dict[str, Any], path: Path) -> bool:
    """Throughput and lag over time as a PNG; False if matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    scenarios = results["scenarios"]
    panels = [n for n in ("ingest", "pipeline", "soak") if n in scenarios]
    if not panels:
        return False
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.6 * len(panels)), squeeze=False)
    for ax, name in zip((a[0] for a in axes), panels, strict=True):
        s = scenarios[name]
        if name == "ingest":
            labels = [f"{r['path']} #{r['round'] + 1}" for r in s["rounds"]]
            ax.bar(
                labels,
                [r["ok_per_s"] for r in s["rounds"]],
                color=["tab:gray" if r["path"] == "/noop" else "tab:blue" for r in s["rounds"]],
            )
            ax.set_ylabel("acknowledged / s")
            ax.set_title(f"ingest: durable vs do-nothing, ratio {s['ratio']:.2f}")
        elif name == "pipeline":
            twin = ax.twinx()
            offset = 0.0
            for dist, run in s["distributions"].items():
                for step in run["steps"]:
                    t = [offset + p["t"] for p in step["timeline"]]
                    ax.plot(t, [p["lookups_per_s"] for p in step["timeline"]], color="tab:blue")
                    twin.plot(
                        t,
                        [max(p["lag_over_upstream_p99_ms"] or 0, 1.0) for p in step["timeline"]],
                        color="tab:red",
                        alpha=0.6,
                    )
                    ax.axvline(offset, color="lightgray", lw=0.8)
                    ax.text(
                        offset,
                        0,
                        f"{dist} {step['callbacks_per_s']:g}/s",
                        fontsize=7,
                        rotation=90,
                        va="bottom",
                    )
                    offset = t[-1] if t else offset + step["steady_seconds"]
            ax.set_ylabel("lookups / s", color="tab:blue")
            twin.set_ylabel("lag over upstream p99 (ms)", color="tab:red")
            twin.set_yscale("log")
            ax.set_title("pipeline: rising callback rates")
            ax.set_xlabel("seconds")
        else:
            t = [p["t"] for p in s["samples"]]
            for proc in s["samples"][-1]["rss_mib"] if s["samples"] else {}:
                ax.plot(t, [p["rss_mib"].get(proc, 0) for p in s["samples"]], label=f"{proc} RSS")
            ax.set_ylabel("MiB")
            twin = ax.twinx()
            twin.plot(
                t,
                [p["inbox_pending"] for p in s["samples"]],
                color="tab:red",
                alpha=0.5,
                label="inbox",
            )
            twin.set_ylabel("inbox pending", color="tab:red")
            ax.legend(loc="upper left")
            ax.set_title(f"soak: {s['rate_per_s']} callbacks/s")
            ax.set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


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
    runners = {"ingest": ingest, "pipeline": pipeline, "expiry": expiry, "soak": soak}
    async with Bench(options) as bench:
        results["postgresql"] = await bench.postgres_version()
        for name in options.scenarios:
            _progress(f"scenario {name}")
            results["scenarios"][name] = await runners[name](bench)
            (options.out_dir / "results.json").write_text(json.dumps(results, indent=2))
    report = render(results)
    (options.out_dir / "report.txt").write_text(report)
    print(report)
    if plot(results, options.out_dir / "bench.png"):
        print(f"wrote {options.out_dir / 'results.json'}, report.txt and bench.png")
    else:
        print(
            f"wrote {options.out_dir / 'results.json'} and report.txt (no plot: pip install "
            "'lastseen[plot]' for matplotlib)"
        )
    return 0


__all__ = ["SCENARIOS", "BenchOptions", "percentile", "run"]
