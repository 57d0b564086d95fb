"""The scale scenario: the same offered load on one instance (its HTTP process and one worker
process) and on a front door with two worker instances, all on one database.

On this project's 2-core machine every process shares the same two cores with PostgreSQL, the
simulator and the producer, so a second worker instance can only add what the cores have left:
the figures say how the work spreads, with the CPU of each process, not what more machines
would give.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from lastseen.devtools.launch import ServeProcess
from lastseen.telemetry.promtext import Buckets, Reading, quantile, since

if TYPE_CHECKING:
    from lastseen.devtools.bench.runner import Bench

UNIQUE = (200, 10_000_000)  # most ids per callback, id universe: every id a lookup


def _summed_buckets(readings: list[Reading], name: str) -> Buckets:
    """One histogram's buckets added up over instances (the same bounds in each)."""
    total: dict[float, float] = {}
    for reading in readings:
        for bound, count in reading.buckets(name):
            total[bound] = total.get(bound, 0.0) + count
    return sorted(total.items())


async def _step(
    bench: Bench,
    front: ServeProcess,
    measured: list[ServeProcess],
    cpu: dict[str, int],
    rate: float,
) -> dict[str, Any]:
    o = bench.options
    meter = bench.cpu(**cpu)
    max_ids, universe = UNIQUE
    producer = await bench.producer(
        front, rate, o.step_seconds, connections=32, max_ids=max_ids, universe=universe
    )
    meter.start()
    # From when the first lookups can have finished to when the producer stops.
    await asyncio.sleep(o.latency_max + 1.0)
    begin = [await bench.read_metrics(s) for s in measured]
    await producer.wait()
    end = [await bench.read_metrics(s) for s in measured]
    usage = meter.stop()
    seconds = max(end[0].at - begin[0].at, 1e-9)
    lookups = sum(e.total("lastseen_lookups_total") for e in end) - sum(
        b.total("lastseen_lookups_total") for b in begin
    )
    lag = "lastseen_lag_over_upstream_seconds"
    recent = since(_summed_buckets(end, lag), _summed_buckets(begin, lag))
    p99 = quantile(recent, 0.99)
    pending = (await bench.read_metrics(front)).get("lastseen_inbox_pending")
    return {
        "callbacks_per_s": rate,
        "lookups_per_s": round(lookups / seconds, 1),
        "lag_over_upstream_p99_ms": None if p99 is None else round(p99 * 1000, 1),
        "inbox_pending_end": pending,
        "cpu_percent": usage,
    }


async def scale(bench: Bench) -> dict[str, Any]:
    """Each layout in turn, stepping through ``scale_rates``."""
    o = bench.options
    layouts: dict[str, Any] = {}
    for layout in ("one instance", "ingest + 2 worker instances"):
        url = await bench.fresh_database("bench_scale_" + str(len(layouts)))
        upstream = await bench.upstream(o.latency_min, o.latency_max)
        objects = {"objects_url": upstream.upstream_url, "ttl": "30"}
        if layout == "one instance":
            front = await bench.serve(url, **objects)
            measured = [front]
            cpu = {"serve": front.pid, "upstream": upstream.pid}
        else:
            front = await bench.serve(url, "--role", "ingest")
            measured = [await bench.serve(url, "--role", "worker", **objects) for _ in range(2)]
            cpu = {"ingest": front.pid, "upstream": upstream.pid}
            cpu |= {f"worker{n + 1}": worker.pid for n, worker in enumerate(measured)}
        steps = []
        for rate in o.scale_rates:
            step = await _step(bench, front, measured, cpu, rate)
            steps.append(step)
            bench.progress(
                f"scale, {layout}, {rate:g} callbacks/s: {step['lookups_per_s']} lookups/s, "
                f"lag p99 {step['lag_over_upstream_p99_ms']} ms, cpu {step['cpu_percent']}"
            )
        for process in {front, *measured}:
            await process.terminate()
        await upstream.terminate()
        layouts[layout] = {"steps": steps}
    return {
        "upstream_latency_s": [o.latency_min, o.latency_max],
        "step_seconds": o.step_seconds,
        "ids": "unique, up to 200 per callback",
        "layouts": layouts,
        "note": "every process on the same 2 cores: a second worker instance adds only what "
        "the cores have left",
    }
