"""The box scenario: the whole service on one machine, every callback processed.

``lastseen serve`` with its default layout (the HTTP process and a worker process), an
upstream that answers at once, and the closed-loop load generator sending callbacks of ids
from 0 to 99 for ``seconds``; then the clock runs on until the inbox is empty. Callbacks per
second is what was acknowledged over the time until every one was processed, next to the
do-nothing handler on the same server in the same run: the whole box's ratio, with each
process's CPU per callback.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from lastseen.devtools import database as devdb
from lastseen.devtools.bench.processes import workers
from lastseen.devtools.loadgen import callback_bodies, run_load

if TYPE_CHECKING:
    from lastseen.devtools.bench.runner import Bench

IDS = 100  # ids 0 to 99: the reference producer's universe


async def box(bench: Bench) -> dict[str, Any]:
    o = bench.options
    url = await bench.fresh_database("bench_box")
    upstream = await bench.upstream(0.0, 0.0)
    serve = await bench.serve(url, objects_url=upstream.upstream_url, ttl="30", noop_route="true")
    parts = urlsplit(serve.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    sent = callback_bodies(500, o.ids_per_callback, o.seed, universe=IDS)
    await run_load(host, port, "/noop", sent, connections=o.connections, seconds=1.0)  # warm up
    rounds: list[dict[str, Any]] = []
    for round_no in range(o.rounds):
        noop = await run_load(
            host, port, "/noop", sent, connections=o.connections, seconds=o.seconds
        )
        meter = bench.cpu(
            http=-serve.pid,
            **{f"worker{n}": p.pid for n, p in enumerate(workers(serve))},
            upstream=upstream.pid,
        )
        async with bench.database(url) as db:
            before = await devdb.count_callbacks(db)
            wal_before = await devdb.wal_position(db)
        meter.start()
        started = time.monotonic()
        load = await run_load(
            host, port, "/callback", sent, connections=o.connections, seconds=o.seconds
        )
        async with bench.database(url) as db:
            while (await db.inbox_stats())[0] > 0:
                if time.monotonic() - started > o.seconds * 20 + 60:
                    break
                await asyncio.sleep(0.05)
            pending, _ = await db.inbox_stats()
            stored = await devdb.count_callbacks(db) - before
            wal = await devdb.wal_position(db) - wal_before
        elapsed = time.monotonic() - started
        cpu = meter.stop()
        acknowledged = load.statuses.get(202, 0)
        processed = round(acknowledged / elapsed, 1) if not pending else 0.0
        noop_rate = round(noop.ok_rate(202), 1)
        entry: dict[str, Any] = {
            "round": round_no,
            "noop_per_s": noop_rate,
            "acknowledged": acknowledged,
            "stored": stored,
            "pending_at_end": pending,
            "seconds_until_processed": round(elapsed, 2),
            "processed_per_s": processed,
            "reply_p99_ms": round(load.percentile(99) * 1000, 1),
            "cpu_percent": cpu,
            "cpu_us_per_callback": meter.per_unit(acknowledged),
            "wal_bytes_per_callback": round(wal / acknowledged) if acknowledged else None,
            "ratio": round(processed / noop_rate, 3) if noop_rate else 0.0,
        }
        rounds.append(entry)
        bench.progress(
            f"box round {round_no + 1}: {entry['processed_per_s']}/s processed vs "
            f"{entry['noop_per_s']}/s do-nothing = {entry['ratio']}; pending at end {pending}"
        )
    await serve.terminate()
    await upstream.terminate()
    return {
        "connections": o.connections,
        "seconds_per_round": o.seconds,
        "ids_per_callback": o.ids_per_callback,
        "ids": f"0 to {IDS - 1}",
        "rounds": rounds,
        "ratio_median": statistics.median(r["ratio"] for r in rounds),
        "every_callback_processed": all(r["pending_at_end"] == 0 for r in rounds),
        "goal": "ratio >= 0.4 with every callback processed",
    }
