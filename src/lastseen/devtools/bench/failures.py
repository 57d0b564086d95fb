"""The benchmark's failure scenarios: what a failure costs in freshness.

- crash: the worker process killed with SIGKILL every 4 s and the whole service every 12 s,
  started again at once, under 10 callbacks/s of 20 unique online ids (TTL 30 s, lookups
  0.3-1.0 s): how long after it was sent each acknowledged id first appears in ``objects``.
- upstream-outage: the upstream answers 503 to everything for 12 s while the same 100 online
  ids arrive every second (TTL 6 s): whether any row disappears meanwhile, and how long after
  the recovery each id catches up with the newest callback sent before it.
- hostile-upstream: an upstream that answers some ids in one-byte chunks, with thousands of
  interim answers, with a 50 MB body trickled slowly, or not at all, under 10 callbacks/s of 40
  unique ids: how long the well-answered ids take, and each process's memory over the run.
- reaper: how long one reaper round takes with a backlog of 1 million pending ids (5,000
  callbacks of 200), when expired objects are named by them (protected) and when not.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import time
from typing import TYPE_CHECKING, Any

import aiohttp
import psutil

from lastseen.devtools.bench.processes import rss_growth, rss_mib, workers
from lastseen.devtools.loadgen import percentile
from lastseen.devtools.simulate import hostile
from lastseen.pipeline.reaper import Reaper
from lastseen.telemetry.metrics import Metrics

if TYPE_CHECKING:
    from lastseen.devtools.bench.runner import Bench

CRASH_TTL = 30.0
CRASH_RATE = 10.0  # callbacks per second
CRASH_IDS = 20  # unique, online ids per callback
WORKER_KILL_EVERY = 4.0
SERVICE_KILL_EVERY = 3  # every third kill takes the whole service


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def crash(bench: Bench) -> dict[str, Any]:
    """Kills, on a schedule, while callbacks keep coming; then when each id appeared."""
    o = bench.options
    url = await bench.fresh_database("bench_crash")
    upstream = await bench.upstream(0.3, 1.0)
    # A fixed port: the service started again has the same name on its leases.
    args = ("--listen", f"127.0.0.1:{_free_port()}")
    env = {"objects_url": upstream.upstream_url, "ttl": str(CRASH_TTL)}
    serve = await bench.serve(url, *args, **env)
    sent: dict[int, float] = {}  # acknowledged id: when its callback was sent
    appeared: dict[int, float] = {}
    kills = {"worker": 0, "service": 0}
    producing = True
    ids = itertools.count(0, 2)  # even: online

    async def produce(http: aiohttp.ClientSession) -> None:
        started = time.monotonic()
        for n in itertools.count():
            if not producing:
                return
            await asyncio.sleep(max(0.0, started + n / CRASH_RATE - time.monotonic()))
            batch = [next(ids) for _ in range(CRASH_IDS)]
            at = time.time()
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.post(serve.url + "/callback", json={"object_ids": batch}) as r:
                    if r.status == 202:
                        sent.update((i, at) for i in batch)

    async def watch() -> None:
        async with bench.database(url) as db:
            while True:
                rows = await db.list_objects(None, 1_000_000)
                now = time.time()
                for object_id, _ in rows:
                    appeared.setdefault(object_id, now)
                await asyncio.sleep(0.1)

    async def chaos() -> None:
        nonlocal serve
        for n in itertools.count(1):
            await asyncio.sleep(WORKER_KILL_EVERY)
            if n % SERVICE_KILL_EVERY:
                for child in workers(serve):
                    with contextlib.suppress(psutil.Error):
                        child.send_signal(signal.SIGKILL)
                kills["worker"] += 1
                continue
            for child in workers(serve):
                with contextlib.suppress(psutil.Error):
                    child.send_signal(signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(serve.pid, signal.SIGKILL)
            await serve.wait()
            kills["service"] += 1
            serve = await bench.serve(url, *args, **env)

    timeout = aiohttp.ClientTimeout(total=1.0)  # the reference producer's
    async with aiohttp.ClientSession(timeout=timeout) as http:
        watcher = asyncio.create_task(watch(), name="bench-crash-watch")
        chaos_task = asyncio.create_task(chaos(), name="bench-crash-chaos")
        producer = asyncio.create_task(produce(http), name="bench-crash-produce")
        await asyncio.sleep(o.crash_seconds)
        chaos_task.cancel()
        producing = False
        await asyncio.gather(producer, return_exceptions=True)
        await asyncio.gather(chaos_task, return_exceptions=True)
        # Every acknowledged id either appears or is past any hope of it.
        deadline = time.monotonic() + CRASH_TTL
        while set(sent) - set(appeared) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    await serve.terminate()
    await upstream.terminate()
    delays = [appeared[i] - sent[i] for i in sent if i in appeared]
    return {
        "seconds": o.crash_seconds,
        "ttl_s": CRASH_TTL,
        "kills": kills,
        "acknowledged_ids": len(sent),
        "never_appeared": len(set(sent) - set(appeared)),
        "appeared_after_s": {
            "p50": round(percentile(delays, 50), 2),
            "p99": round(percentile(delays, 99), 2),
            "max": round(max(delays, default=0.0), 2),
        },
        "later_than_10_s": sum(1 for d in delays if d > 10),
        "goal": "every acknowledged id in objects within 10 s of its callback; none missing",
    }


OUTAGE_TTL = 6.0
OUTAGE_IDS = list(range(0, 200, 2))  # 100 ids, all online


async def upstream_outage(bench: Bench) -> dict[str, Any]:
    """An outage of the upstream, started and ended by signals to the simulator."""
    o = bench.options
    url = await bench.fresh_database("bench_upstream_outage")
    upstream = await bench.upstream(0.3, 1.0)
    serve = await bench.serve(url, objects_url=upstream.upstream_url, ttl=str(OUTAGE_TTL))
    sent: list[float] = []  # when each acknowledged callback was sent
    seen: dict[int, float] = {}  # id: last_seen, as of the latest poll
    disappeared: set[int] = set()
    caught_up: dict[int, float] = {}
    recovered: float | None = None
    producing = True

    async def produce(http: aiohttp.ClientSession) -> None:
        while producing:
            at = time.time()
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                body = {"object_ids": OUTAGE_IDS}
                async with http.post(serve.url + "/callback", json=body) as r:
                    if r.status == 202:
                        sent.append(at)
            await asyncio.sleep(max(0.0, at + 1.0 - time.time()))

    async def watch() -> None:
        async with bench.database(url) as db:
            while True:
                rows = {i: t.timestamp() for i, t in await db.list_objects(None, 1000)}
                now = time.time()
                disappeared.update(seen.keys() - rows.keys())
                seen.update(rows)
                if recovered is not None:
                    newest = max(t for t in sent if t <= recovered)
                    for object_id, last_seen in rows.items():
                        if last_seen >= newest:
                            caught_up.setdefault(object_id, now - recovered)
                await asyncio.sleep(0.1)

    timeout = aiohttp.ClientTimeout(total=1.0)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        producer = asyncio.create_task(produce(http), name="bench-outage-produce")
        watcher = asyncio.create_task(watch(), name="bench-outage-watch")
        await asyncio.sleep(o.outage_warmup)
        missing_before = set(OUTAGE_IDS) - seen.keys()
        os.kill(upstream.pid, signal.SIGUSR1)
        await asyncio.sleep(o.outage_seconds)
        os.kill(upstream.pid, signal.SIGUSR1)
        recovered = time.time()
        async with asyncio.timeout(OUTAGE_TTL * 2):
            while len(caught_up) < len(OUTAGE_IDS):
                await asyncio.sleep(0.1)
        producing = False
        for task in (producer, watcher):
            task.cancel()
        await asyncio.gather(producer, watcher, return_exceptions=True)
    await serve.terminate()
    await upstream.terminate()
    delays = sorted(caught_up.values())
    return {
        "ttl_s": OUTAGE_TTL,
        "outage_s": o.outage_seconds,
        "ids": len(OUTAGE_IDS),
        "missing_before_the_outage": len(missing_before),
        "disappeared": len(disappeared),
        "caught_up_after_s": {
            "p50": round(percentile(delays, 50), 2),
            "max": round(max(delays, default=0.0), 2),
        },
        "goal": "no row disappears; every id caught up within 2 s of the recovery",
    }


HOSTILE_RATE = 10.0  # callbacks per second
HOSTILE_IDS = 40  # unique ids per callback; 4 in 10 get a hostile answer


async def hostile_upstream(bench: Bench) -> dict[str, Any]:
    """A hostile upstream for a while: the other ids' delays, and RSS sampled every second."""
    o = bench.options
    url = await bench.fresh_database("bench_hostile")
    server, objects_url = await hostile.start()
    serve = await bench.serve(url, objects_url=objects_url, ttl="30", lookup_timeout="10")
    sent: dict[int, float] = {}
    appeared: dict[int, float] = {}
    samples: list[dict[str, Any]] = []
    ids = itertools.count()
    started = time.monotonic()

    async def produce(http: aiohttp.ClientSession) -> None:
        for n in itertools.count():
            await asyncio.sleep(max(0.0, started + n / HOSTILE_RATE - time.monotonic()))
            batch = [next(ids) for _ in range(HOSTILE_IDS)]
            at = time.time()
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.post(serve.url + "/callback", json={"object_ids": batch}) as r:
                    if r.status == 202:
                        sent.update((i, at) for i in batch if hostile.answered(i))

    async def watch() -> None:
        async with bench.database(url) as db:
            while True:
                now = time.time()
                for object_id, _ in await db.list_objects(None, 10_000_000):
                    appeared.setdefault(object_id, now)
                await asyncio.sleep(0.1)

    async def sample() -> None:
        while True:
            await asyncio.sleep(1.0)
            metrics = await bench.read_metrics(serve)
            samples.append(
                {
                    "t": round(time.monotonic() - started, 1),
                    "rss_mib": rss_mib(serve.pid),
                    "lookups_in_flight": metrics.get("lastseen_lookups_in_flight"),
                }
            )

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as http:
        tasks = [
            asyncio.create_task(produce(http), name="bench-hostile-produce"),
            asyncio.create_task(watch(), name="bench-hostile-watch"),
            asyncio.create_task(sample(), name="bench-hostile-sample"),
        ]
        await asyncio.sleep(o.hostile_seconds)
        tasks[0].cancel()
        await asyncio.sleep(3.0)  # the last callbacks' well-answered ids
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    await serve.terminate()
    await server.close()
    delays = [appeared[i] - sent[i] for i in sent if i in appeared]
    growth = rss_growth(samples)
    return {
        "seconds": o.hostile_seconds,
        "well_answered_ids": len(sent),
        "never_appeared": len(set(sent) - set(appeared)),
        "appeared_after_s": {
            "p50": round(percentile(delays, 50), 2),
            "p99": round(percentile(delays, 99), 2),
            "max": round(max(delays, default=0.0), 2),
        },
        "lookups_in_flight_max": max((s["lookups_in_flight"] or 0 for s in samples), default=0),
        "rss_mib_first": samples[0]["rss_mib"] if samples else {},
        "rss_mib_last": samples[-1]["rss_mib"] if samples else {},
        "rss_growth_second_half_mib": growth,
        "samples": samples,
        "goal": "well-answered ids within 1 s; memory flat",
    }


# Fixture data for the reaper measurement only, so it lives here and not in queries.sql:
# $1 callbacks of $2 ids each (from id $3 on), received now and pending (leased, so none is
# expired); then objects last seen an hour ago, $1 of them named by those callbacks and $1 others.
_REAPER_FIXTURE = """
INSERT INTO callbacks (received_at, object_ids, locked_until)
SELECT now(), ARRAY(SELECT generate_series($3 + c * $2, $3 + c * $2 + $2 - 1))::bigint[],
       now() + interval '1 hour'
FROM generate_series(0, $1 - 1) AS c;
INSERT INTO objects (id, last_seen)
SELECT id, now() - interval '1 hour'
FROM (SELECT generate_series(0, $1 - 1) AS id
      UNION ALL SELECT generate_series(1000000000, 1000000000 + $1 - 1)) AS ids;
"""


async def reaper(bench: Bench) -> dict[str, Any]:
    """Reaper rounds over a large backlog of pending ids."""
    o = bench.options
    callbacks, per_callback, objects = o.reaper_callbacks, 200, 10_000
    url = await bench.fresh_database("bench_reaper")
    async with bench.database(url) as db:
        await db.migrate()
        pending, expired = _REAPER_FIXTURE.strip().split(";\n")
        await db.pool.execute(pending, callbacks, per_callback, 0)
        await db.pool.execute(expired.rstrip(";"), objects)
        await db.pool.execute("ANALYZE")  # fixture only: fresh statistics, as autovacuum would
        reaper_ = Reaper(
            db,
            Metrics(),
            ttl=30,
            interval=0.2,
            audit_retention=3600,
            dead_letter_retention=3600,
            prune_interval=10,
            idempotency_retention=3600,
        )
        rounds: list[dict[str, float]] = []
        for n in range(5):
            if n:  # a round's worth of new arrivals: 0.2 s at 10,000 ids/s
                await db.pool.execute(pending, 10, per_callback, 2_000_000_000 + n * 2_000)
            started = time.perf_counter()
            deleted, kept = await reaper_.reap_once() or (0, 0)
            rounds.append(
                {
                    "ms": round((time.perf_counter() - started) * 1000, 1),
                    "deleted": deleted,
                    "kept": kept,
                }
            )
    bench.progress(f"reaper rounds: {rounds}")
    return {
        "pending_ids": callbacks * per_callback,
        "expired_objects": 2 * objects,
        "protected_objects": objects,
        # The first round after a start on a database the reaper has not looked at notes the
        # whole backlog once; every later round notes only what arrived since (2,000 new ids
        # before each: 0.2 s of arrivals at 10,000 ids/s).
        "rounds": rounds,
        "first_round_ms": rounds[0]["ms"],
        "round_ms_max_after_first": max((r["ms"] for r in rounds[1:]), default=0.0),
        "reap_interval_ms": 200,
        "goal": "a round well under the reap interval (200 ms) with 1 million pending ids",
    }
