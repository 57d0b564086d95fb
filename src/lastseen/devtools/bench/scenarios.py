"""The benchmark's scenarios; each takes the run's ``Bench`` and returns its figures.

- ingest: the most callbacks with 200-id bodies the service acknowledges durably per second,
  next to a do-nothing POST handler on the same server in the same run, alternating rounds.
- expiry: how long after the TTL each object is actually deleted.
- soak: a fixed rate for a while, sampling RSS and inbox depth.

The pipeline and TLS scenarios are in throughput.py, the failure scenarios in failures.py,
degraded.py and nemesis.py, the scale scenario in scale.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp

from lastseen.devtools import database as devdb
from lastseen.devtools.bench.box import box
from lastseen.devtools.bench.degraded import database_outage, overload
from lastseen.devtools.bench.failures import crash, hostile_upstream, reaper, upstream_outage
from lastseen.devtools.bench.inflight import inflight
from lastseen.devtools.bench.nemesis import nemesis
from lastseen.devtools.bench.processes import rss_growth, rss_mib
from lastseen.devtools.bench.scale import scale
from lastseen.devtools.bench.throughput import pipeline, tls
from lastseen.devtools.loadgen import (
    build_requests,
    callback_bodies,
    percentile,
    run_load,
    signed_headers,
)

if TYPE_CHECKING:
    from lastseen.devtools.bench.runner import Bench

_BENCH_TOKEN = "bench-intake-token"
_BENCH_SECRET = "whsec_" + base64.b64encode(b"lastseen-bench-webhook-secret-32").decode()


async def ingest(bench: Bench) -> dict[str, Any]:
    """Durable callbacks per second vs a do-nothing handler, same server, alternating rounds."""
    o = bench.options
    url = await bench.fresh_database("bench_ingest")
    # A producer with the intake token takes the group commit's plain path; one that signs
    # every request sends a webhook-id with each, checked and recorded as an idempotency key.
    serve = await bench.serve(
        url,
        "--role",
        "ingest",
        noop_route="true",
        intake_token=_BENCH_TOKEN,
        webhook_secret=_BENCH_SECRET,
    )
    parts = urlsplit(serve.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    bodies = callback_bodies(500, o.ids_per_callback, o.seed)
    token = [{"Authorization": f"Bearer {_BENCH_TOKEN}"}] * len(bodies)
    # Enough signed requests that none repeats within a round (a repeat would be answered
    # from its key, not stored).
    signed_bodies = callback_bodies(max(500, int(o.seconds * 8000)), o.ids_per_callback, o.seed)
    await run_load(host, port, "/noop", bodies, connections=o.connections, seconds=1.0)  # warm up
    rounds: list[dict[str, Any]] = []
    watched: list[int] = []
    watcher = None
    if o.watch_status:
        watcher = asyncio.create_task(_watch_status(serve.url, watched), name="status-watcher")
    for round_no in range(o.rounds):
        for label in ("/noop", "/callback", "/callback signed"):
            path = label.split()[0]
            if label == "/callback signed":
                headers = signed_headers(_BENCH_SECRET, signed_bodies, f"r{round_no}")
                prepared = build_requests(host, port, path, signed_bodies, headers)
            else:
                prepared = build_requests(host, port, path, bodies, token)
            meter = bench.cpu(serve=serve.pid)
            async with bench.database(url) as db:
                wal_before = await devdb.wal_position(db)
            meter.start()
            result = await run_load(
                host,
                port,
                path,
                bodies,
                connections=o.connections,
                seconds=o.seconds,
                prepared=prepared,
            )
            result.path = label
            entry = result.summary() | {"round": round_no, "cpu_percent": meter.stop()}
            async with bench.database(url) as db:
                wal = await devdb.wal_position(db) - wal_before
            answered = result.statuses.get(202, 0)
            entry["ok_per_s"] = round(result.ok_rate(202), 1)
            # Per answered request: a durable callback on /callback, a do-nothing one on /noop.
            entry["cpu_us_per_request"] = meter.per_unit(answered)
            entry["wal_bytes_per_request"] = round(wal / answered) if answered else None
            rounds.append(entry)
            p99 = result.percentile(99) * 1000
            bench.progress(
                f"ingest {label} round {round_no + 1}: {entry['ok_per_s']}/s p99 {p99:.1f} ms"
            )
    if watcher is not None:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    async with bench.database(url) as db:
        stored = await devdb.count_callbacks(db)
    await serve.terminate()
    noop = [r["ok_per_s"] for r in rounds if r["path"] == "/noop"]
    durable = [r["ok_per_s"] for r in rounds if r["path"] == "/callback"]
    signed = [r["ok_per_s"] for r in rounds if r["path"] == "/callback signed"]
    durable_p99 = [r["latency_ms"]["p99"] for r in rounds if r["path"] == "/callback"]
    acknowledged = sum(
        r["statuses"].get("202", 0) for r in rounds if r["path"].startswith("/callback")
    )
    return {
        "connections": o.connections,
        "seconds_per_round": o.seconds,
        "ids_per_callback": o.ids_per_callback,
        "rounds": rounds,
        "noop_per_s_median": statistics.median(noop),
        "durable_per_s_median": statistics.median(durable),
        "ratio": round(statistics.median(durable) / statistics.median(noop), 3),
        "signed_per_s_median": statistics.median(signed),
        "signed_ratio": round(statistics.median(signed) / statistics.median(durable), 3),
        "durable_p99_ms_median": statistics.median(durable_p99),
        "acknowledged": acknowledged,
        "stored_rows": stored,
        "goal": "ratio >= 0.7 and p99 < 20 ms (64 connections)",
        "status_reads": {"200": watched.count(200), "other": len(watched) - watched.count(200)}
        if o.watch_status
        else None,
    }


async def _watch_status(url: str, statuses: list[int], every: float = 2.0) -> None:
    """Reads GET /status every ``every`` seconds, as an open status page does."""
    async with aiohttp.ClientSession() as http:
        while True:
            async with http.get(url + "/status") as response:
                await response.read()
                statuses.append(response.status)
            await asyncio.sleep(every)


async def expiry(bench: Bench) -> dict[str, Any]:
    """How long after its TTL each object is actually deleted.

    Rows are watched from the first callback on, so an object counts as seen even if the
    service (on a busy machine) writes it late and the reaper takes it soon after.
    """
    o = bench.options
    url = await bench.fresh_database("bench_expiry")
    upstream = await bench.upstream(0.01, 0.05)
    serve = await bench.serve(url, objects_url=upstream.upstream_url, ttl=str(o.ttl))
    per_callback = 200
    ids = list(range(0, 2 * o.expiry_objects, 2))  # even: all online
    seen: dict[int, float] = {}  # id: last_seen
    gone_at: dict[int, float] = {}
    async with aiohttp.ClientSession() as http, bench.database(url) as db:
        for start in range(0, len(ids), per_callback):
            body = {"object_ids": ids[start : start + per_callback]}
            async with http.post(serve.url + "/callback", json=body) as response:
                assert response.status == 202, await response.text()
            await asyncio.sleep(0.05)
        async with asyncio.timeout(o.ttl + 30):
            while True:
                present = dict(await db.list_objects(None, len(ids) + 1))
                now = time.time()
                seen.update((i, last_seen.timestamp()) for i, last_seen in present.items())
                for object_id in seen.keys() - present.keys() - gone_at.keys():
                    gone_at[object_id] = now
                pending, _ = await db.inbox_stats()
                if not pending and len(gone_at) == len(seen):
                    break
                await asyncio.sleep(0.01)
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
        metrics = await bench.read_metrics(serve)
        samples.append(
            {
                "t": round(time.monotonic() - started, 1),
                "rss_mib": rss_mib(serve.pid),
                "inbox_pending": metrics.get("lastseen_inbox_pending"),
                "lookups_total": metrics.total("lastseen_lookups_total"),
            }
        )
    await producer.wait()
    await serve.terminate()
    await upstream.terminate()
    growth = rss_growth(samples)
    return {
        "rate_per_s": o.soak_rate,
        "seconds": o.soak_seconds,
        "samples": samples,
        "rss_growth_second_half_mib": growth,
        "inbox_pending_max": max((s["inbox_pending"] for s in samples), default=0),
        "producer": producer.summary,
        "goal": "RSS flat over the soak",
    }


Scenario = Callable[["Bench"], Awaitable[dict[str, Any]]]
SCENARIOS: dict[str, Scenario] = {
    "ingest": ingest,
    "pipeline": pipeline,
    "tls": tls,
    "expiry": expiry,
    "soak": soak,
    "crash": crash,
    "upstream-outage": upstream_outage,
    "hostile-upstream": hostile_upstream,
    "database-outage": database_outage,
    "nemesis": nemesis,
    "overload": overload,
    "reaper": reaper,
    "scale": scale,
    "inflight": inflight,
    "box": box,
}
