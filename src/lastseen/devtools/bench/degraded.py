"""The benchmark's scenarios of a service under strain it did not cause:

- database-outage: PostgreSQL taken away (a proxy cuts every connection and refuses new ones,
  as a stopped or failing-over server does) for 15 s under 5 callbacks/s of 20 unique ids sent
  the reference producer's way (1 s timeout, no retry; TTL 30 s, lookups 0.3-1.0 s), several
  runs in a row: the share of POSTs acknowledged, the reply times, how long the spool takes to
  drain, and whether every acknowledged id reaches ``objects`` before its TTL runs out.
- overload: three times the pipeline's sustainable rate for 2 minutes, then the normal rate:
  reply p99, RSS of each process over time, inbox depth, and the time until freshness returns
  (the oldest pending callback younger than the upstream's slowest answer again).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from typing import TYPE_CHECKING, Any

import aiohttp

from lastseen.devtools.bench.processes import rss_mib
from lastseen.devtools.dbproxy import DatabaseProxy
from lastseen.devtools.loadgen import percentile
from lastseen.telemetry.promtext import Reading, quantile, since

if TYPE_CHECKING:
    from lastseen.devtools.bench.runner import Bench

DB_OUTAGE_TTL = 30.0
DB_OUTAGE_RATE = 5.0  # callbacks per second
DB_OUTAGE_IDS = 20  # unique, online ids per callback


async def database_outage(bench: Bench) -> dict[str, Any]:
    """PostgreSQL away for a while, ``runs`` times on one service."""
    o = bench.options
    url = await bench.fresh_database("bench_database_outage")
    upstream = await bench.upstream(0.3, 1.0)
    proxy = DatabaseProxy(url)
    await proxy.start()
    serve = await bench.serve(
        proxy.url(), objects_url=upstream.upstream_url, ttl=str(DB_OUTAGE_TTL)
    )
    ids = itertools.count(0, 2)  # even: online
    runs = []
    try:
        for n in range(o.db_outage_runs):
            bench.progress(f"database outage, run {n + 1} of {o.db_outage_runs}")
            runs.append(await _one_outage(bench, serve.url, url, proxy, ids))
    finally:
        await serve.terminate()
        await upstream.terminate()
        await proxy.stop()
    errors = [line for line in serve.logs if line.get("level") in ("error", "critical")]
    return {
        "ttl_s": DB_OUTAGE_TTL,
        "outage_s": o.db_outage_seconds,
        "rate_per_s": DB_OUTAGE_RATE,
        "ids_per_callback": DB_OUTAGE_IDS,
        "runs": runs,
        "error_log_lines": [str(line.get("event")) for line in errors][:20],
        "goal": "every POST acknowledged; every acknowledged id in objects before its TTL runs "
        "out; no error in the logs",
    }


async def _one_outage(
    bench: Bench, service_url: str, direct_url: str, proxy: DatabaseProxy, ids: Any
) -> dict[str, Any]:
    o = bench.options
    posts = 0
    replies: list[float] = []
    acknowledged: dict[int, float] = {}  # id: when its callback was sent
    spooled = 0
    appeared: dict[int, float] = {}
    producing = True

    async def produce(http: aiohttp.ClientSession) -> None:
        nonlocal posts, spooled
        started = time.monotonic()
        for k in itertools.count():
            if not producing:
                return
            await asyncio.sleep(max(0.0, started + k / DB_OUTAGE_RATE - time.monotonic()))
            batch = [next(ids) for _ in range(DB_OUTAGE_IDS)]
            posts += 1
            at = time.time()
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.post(service_url + "/callback", json={"object_ids": batch}) as r:
                    body = await r.json()
                    if r.status == 202:
                        replies.append(time.time() - at)
                        acknowledged.update((i, at) for i in batch)
                        spooled += body.get("callback_id") is None

    async def watch() -> None:
        async with bench.database(direct_url) as db:
            while True:
                now = time.time()
                for object_id, _ in await db.list_objects(None, 10_000_000):
                    appeared.setdefault(object_id, now)
                await asyncio.sleep(0.1)

    async def spool_depth() -> float:
        async with aiohttp.ClientSession() as http, http.get(service_url + "/metrics") as r:
            for line in (await r.text()).splitlines():
                if line.startswith("lastseen_spool_callbacks "):
                    return float(line.split()[1])
        return 0.0

    timeout = aiohttp.ClientTimeout(total=1.0)  # the reference producer's
    async with aiohttp.ClientSession(timeout=timeout) as http:
        producer = asyncio.create_task(produce(http), name="bench-db-outage-produce")
        watcher = asyncio.create_task(watch(), name="bench-db-outage-watch")
        await asyncio.sleep(o.db_outage_before)
        await proxy.stop()
        await asyncio.sleep(o.db_outage_seconds)
        await proxy.start()
        recovered = time.monotonic()
        drained_after: float | None = None
        while time.monotonic() - recovered < DB_OUTAGE_TTL:
            if await spool_depth() == 0:
                drained_after = time.monotonic() - recovered
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(max(0.0, recovered + o.db_outage_before - time.monotonic()))
        producing = False
        await producer
        # Every acknowledged id either appears or its TTL has run out.
        deadline = max(acknowledged.values(), default=time.time()) + DB_OUTAGE_TTL
        while set(acknowledged) - set(appeared) and time.time() < deadline:
            await asyncio.sleep(0.2)
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    delays = [appeared[i] - acknowledged[i] for i in acknowledged if i in appeared]
    return {
        "posts": posts,
        "acknowledged": len(replies),
        "acknowledged_from_the_spool": spooled,
        "reply_ms": {
            "p50": round(percentile(replies, 50) * 1000, 1),
            "p99": round(percentile(replies, 99) * 1000, 1),
            "max": round(max(replies, default=0.0) * 1000, 1),
        },
        "spool_drained_after_s": None if drained_after is None else round(drained_after, 2),
        "acknowledged_ids": len(acknowledged),
        "never_appeared": len(set(acknowledged) - set(appeared)),
        "appeared_after_s": {
            "p50": round(percentile(delays, 50), 2),
            "max": round(max(delays, default=0.0), 2),
        },
        "appeared_after_the_ttl": sum(1 for d in delays if d > DB_OUTAGE_TTL),
    }


OVERLOAD_IDS = 200  # at most, per callback (100 on average); unique ids
FRESH_WITHIN = 5.0  # s: the oldest pending callback is younger than this when fresh again


async def overload(bench: Bench) -> dict[str, Any]:
    """Too much load for a while, then the normal rate again."""
    o = bench.options
    url = await bench.fresh_database("bench_overload")
    upstream = await bench.upstream(o.latency_min, o.latency_max)
    serve = await bench.serve(url, objects_url=upstream.upstream_url)
    universe = 2**40  # ids drawn from here are as good as unique
    samples: list[dict[str, Any]] = []
    started = time.monotonic()
    high = await bench.producer(
        serve, o.overload_rate, o.overload_seconds, connections=64,
        max_ids=OVERLOAD_IDS, universe=universe,
    )  # fmt: skip
    first = await bench.read_metrics(serve)
    while high.proc is not None and high.proc.returncode is None:
        await asyncio.sleep(1.0)
        samples.append(await _sample(bench, serve, started, "overload"))
    await high.wait()
    during = await bench.read_metrics(serve)
    dropped = time.monotonic()
    normal = await bench.producer(
        serve, o.overload_normal_rate, o.overload_after_seconds, connections=16,
        max_ids=OVERLOAD_IDS, universe=universe,
    )  # fmt: skip
    fresh_after: float | None = None
    while normal.proc is not None and normal.proc.returncode is None:
        await asyncio.sleep(1.0)
        sample = await _sample(bench, serve, started, "normal")
        samples.append(sample)
        if fresh_after is None and sample["inbox_oldest_age_s"] < FRESH_WITHIN:
            fresh_after = round(time.monotonic() - dropped, 1)
    await normal.wait()
    after = await bench.read_metrics(serve)
    await serve.terminate()
    await upstream.terminate()
    reply = "lastseen_reply_seconds"
    rss_peak: dict[str, float] = {}
    for sample in samples:
        for name, mib in sample["rss_mib"].items():
            rss_peak[name] = max(rss_peak.get(name, 0.0), mib)
    return {
        "overload_rate_per_s": o.overload_rate,
        "normal_rate_per_s": o.overload_normal_rate,
        "ids_per_callback_at_most": OVERLOAD_IDS,
        "overload_s": o.overload_seconds,
        "reply_p99_ms_overload": _p99_ms(first, during, reply),
        "reply_p99_ms_after": _p99_ms(during, after, reply),
        "callbacks_rejected": after.total("lastseen_callbacks_rejected_total"),
        "callbacks_expired": after.total("lastseen_callbacks_expired_total"),
        "inbox_pending_max": max((s["inbox_pending"] for s in samples), default=0.0),
        "rss_mib_peak": rss_peak,
        "rss_mib_end": samples[-1]["rss_mib"] if samples else {},
        "fresh_again_after_s": fresh_after,
        "fresh_means": f"the oldest pending callback younger than {FRESH_WITHIN:g} s",
        "samples": samples,
        "producer": {"overload": high.summary, "normal": normal.summary},
        "goal": "replies fast, memory bounded, freshness back within one TTL of the drop",
    }


async def _sample(bench: Bench, serve: Any, started: float, phase: str) -> dict[str, Any]:
    metrics = await bench.read_metrics(serve)
    return {
        "t": round(time.monotonic() - started, 1),
        "phase": phase,
        "rss_mib": rss_mib(serve.pid),
        "inbox_pending": metrics.get("lastseen_inbox_pending"),
        "inbox_oldest_age_s": round(metrics.get("lastseen_inbox_oldest_pending_age_seconds"), 1),
        "lookups_total": metrics.total("lastseen_lookups_total"),
    }


def _p99_ms(before: Reading, after: Reading, name: str) -> float | None:
    seconds = quantile(since(after.buckets(name), before.buckets(name)), 0.99)
    return None if seconds is None else round(seconds * 1000, 1)
