"""The throughput scenarios: the pipeline at rising rates, and the same over TLS.

- pipeline: rising callback rates until the service stops keeping up; per step lookups/s, ids
  resolved/s, coalesced lookups, inbox depth, and the lag over upstream latency.
- tls: CPU per lookup with the upstream behind HTTPS beside plain HTTP.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lastseen.devtools import certs
from lastseen.devtools.bench.processes import workers
from lastseen.devtools.launch import ServeProcess, SimulateProcess
from lastseen.telemetry.promtext import Reading, quantile, since
from lastseen.upstream.client import UpstreamClient

if TYPE_CHECKING:
    from lastseen.devtools.bench.runner import Bench


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
        upstreams = await bench.upstreams(o.latency_min, o.latency_max)
        serve = await bench.serve(url, objects_url=upstreams[0].upstream_url, ttl="30")
        steps = []
        for rate in o.rates:
            step = await _pipeline_step(bench, serve, upstreams, rate, max_ids, universe)
            steps.append(step)
            bench.progress(
                f"pipeline {distribution} {rate}/s: {step['lookups_per_s']} lookups/s, "
                f"lag over upstream p99 {step['lag_over_upstream_ms']['p99']} ms, "
                f"inbox {step['inbox_pending_end']}, keeping up: {step['keeping_up']}"
            )
            if not step["keeping_up"]:
                break
        await serve.terminate()
        for upstream in upstreams:
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
        "goal": ">= 10,000 lookups/s sustained with unique ids, lag over upstream p99 < 100 ms",
    }


async def tls(bench: Bench) -> dict[str, Any]:
    """CPU per lookup with the upstream behind HTTPS (a CA of the run's own, given to the
    service as LASTSEEN_UPSTREAM_CA_FILE) beside plain HTTP, alternating, unique ids."""
    o = bench.options
    if not certs.available():
        return {"skipped": "no openssl command to make a CA with"}
    made = certs.make(o.out_dir / "tls")
    max_ids, universe = DISTRIBUTIONS["unique"]
    steps: list[dict[str, Any]] = []
    for round_no in range(o.rounds):
        for scheme in ("http", "https"):
            url = await bench.fresh_database(f"bench_tls_{scheme}")
            upstream = await bench.upstream(
                o.latency_min, o.latency_max, tls=made if scheme == "https" else None
            )
            extra = {"upstream_ca_file": str(made.ca)} if scheme == "https" else {}
            serve = await bench.serve(url, objects_url=upstream.upstream_url, **extra)
            step = await _pipeline_step(bench, serve, [upstream], o.tls_rate, max_ids, universe)
            await serve.terminate()
            await upstream.terminate()
            per = step["cpu_us_per_lookup"]
            workers_us = sum(v for k, v in per.items() if k.startswith("worker"))
            steps.append(
                {
                    "round": round_no,
                    "scheme": scheme,
                    "lookups_per_s": step["lookups_per_s"],
                    "keeping_up": step["keeping_up"],
                    "worker_cpu_us_per_lookup": round(workers_us, 1),
                    "upstream_cpu_us_per_lookup": per.get("upstream"),
                    "cpu_us_per_lookup": per,
                }
            )
            bench.progress(
                f"tls {scheme} round {round_no + 1}: {step['lookups_per_s']} lookups/s, "
                f"worker cpu {workers_us:.1f} us per lookup"
            )

    def median(scheme: str) -> float:
        return float(
            statistics.median(s["worker_cpu_us_per_lookup"] for s in steps if s["scheme"] == scheme)
        )

    plain, secure = median("http"), median("https")
    # What a lookup costs the client on a new connection (with its handshake) and on a pooled
    # one, from this process: an upstream that answers at once, 1,000 GETs at a time.
    client: dict[str, dict[str, float]] = {}
    for scheme in ("http", "https"):
        upstream = await bench.upstream(0.0, 0.0, tls=made if scheme == "https" else None)
        client[scheme] = await _client_cpu(upstream.upstream_url, made.ca, o.tls_client_gets)
        await upstream.terminate()
    return {
        "callbacks_per_s": o.tls_rate,
        "client_cpu_us_per_get": client,
        "steps": steps,
        "worker_cpu_us_per_lookup_http": plain,
        "worker_cpu_us_per_lookup_https": secure,
        "https_over_http": round(secure / plain, 2) if plain else None,
    }


async def _client_cpu(url: str, ca: Path, gets: int) -> dict[str, float]:
    """CPU µs per GET of the lookup client: on new connections, then on pooled ones."""
    client = UpstreamClient(url, timeout=30, ca_file=ca)
    try:
        began = time.process_time()
        await asyncio.gather(*(client.get(f"/objects/{i}") for i in range(gets)))
        new = (time.process_time() - began) / gets * 1e6
        began = time.process_time()
        for _ in range(10):
            await asyncio.gather(*(client.get(f"/objects/{i}") for i in range(gets)))
        pooled = (time.process_time() - began) / (10 * gets) * 1e6
    finally:
        await client.close()
    return {"new_connection": round(new, 1), "pooled_connection": round(pooled, 1)}


async def _pipeline_step(
    bench: Bench,
    serve: ServeProcess,
    upstreams: list[SimulateProcess],
    rate: float,
    max_ids: int,
    universe: int,
) -> dict[str, Any]:
    o = bench.options
    producer = await bench.producer(
        serve, rate, o.step_seconds, connections=32, max_ids=max_ids, universe=universe
    )
    # The producer is not metered: it has exited (and cannot be read) when the step ends.
    meter = bench.cpu(
        http=-serve.pid,  # negative: the process alone, not its worker processes
        **{f"worker{n}": p.pid for n, p in enumerate(workers(serve))},
        **(
            {"upstream": upstreams[0].pid}
            if len(upstreams) == 1
            else {f"upstream{n}": p.pid for n, p in enumerate(upstreams)}
        ),
    )
    meter.start()
    first = previous = await bench.read_metrics(serve)
    scrapes = [first]
    timeline: list[dict[str, Any]] = []
    while producer.proc is not None and producer.proc.returncode is None:
        await asyncio.sleep(o.sample_every)
        now = await bench.read_metrics(serve)
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
                    _quantile(previous, now, "lastseen_lag_over_upstream_seconds", 0.99)
                ),
            }
        )
        previous = now
    await producer.wait()
    cpu = meter.stop()
    done = await bench.read_metrics(serve)
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
        name: {f"p{int(q * 100)}": _ms(_quantile(begin, end, name, q)) for q in (0.5, 0.99)}
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
        # Over the whole step, ramp and all: every lookup done while the meter ran.
        "cpu_us_per_lookup": meter.per_unit(_delta(first, done, "lastseen_lookups_total")),
        "keeping_up": keeping_up,
        "timeline": timeline,
    }


def _delta(before: Reading, after: Reading, name: str) -> float:
    return after.total(name) - before.total(name)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _quantile(before: Reading, after: Reading, name: str, q: float) -> float | None:
    return quantile(since(after.buckets(name), before.buckets(name)), q)
