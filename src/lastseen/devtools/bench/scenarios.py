"""The benchmark's scenarios; each takes the run's ``Bench`` and returns its figures.

- ingest: the most callbacks with 200-id bodies the service acknowledges durably per second,
  next to a do-nothing POST handler on the same server in the same run, alternating rounds.
- pipeline: rising callback rates until the service stops keeping up; per step lookups/s, ids
  resolved/s, coalesced lookups, inbox depth, and the lag over upstream latency.
- expiry: how long after the TTL each object is actually deleted.
- soak: a fixed rate for a while, sampling RSS and inbox depth.

The failure scenarios are in failures.py, the scale scenario in scale.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp

from lastseen.devtools import certs
from lastseen.devtools.bench.box import box
from lastseen.devtools.bench.degraded import database_outage, overload
from lastseen.devtools.bench.failures import crash, hostile_upstream, reaper, upstream_outage
from lastseen.devtools.bench.inflight import inflight
from lastseen.devtools.bench.processes import rss_growth, rss_mib, workers
from lastseen.devtools.bench.scale import scale
from lastseen.devtools.launch import ServeProcess, SimulateProcess
from lastseen.devtools.loadgen import (
    build_requests,
    callback_bodies,
    percentile,
    run_load,
    signed_headers,
)
from lastseen.http_client import UpstreamClient
from lastseen.promtext import Reading, quantile, since

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
                wal_before = await db.wal_position()
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
                wal = await db.wal_position() - wal_before
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
        stored = await db.count_callbacks()
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
    "overload": overload,
    "reaper": reaper,
    "scale": scale,
    "inflight": inflight,
    "box": box,
}
