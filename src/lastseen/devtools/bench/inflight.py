"""The in-flight scenario: how much memory a worker process takes per lookup in flight.

An upstream that holds every answer for ``inflight_hold`` seconds, and a burst of callbacks
of unique ids: the lookups pile up in flight, to the worker's cap (``LASTSEEN_MAX_LOOKUPS``,
lowered to what the open-file limit allows: each holds a connection). The worker's RSS idle
and with the lookups in flight gives the memory per lookup in flight; once the answers come,
every id is checked to have been looked up.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any

import aiohttp

from lastseen.devtools.bench.processes import rss_mib

if TYPE_CHECKING:
    from lastseen.devtools.bench.runner import Bench


async def inflight(bench: Bench) -> dict[str, Any]:
    o = bench.options
    hold = o.inflight_hold
    url = await bench.fresh_database("bench_inflight")
    upstream = await bench.upstream(hold, hold)
    serve = await bench.serve(
        url,
        objects_url=upstream.upstream_url,
        ttl=str(hold * 10),
        lookup_timeout=str(hold * 3),
        max_lookups=str(o.inflight_lookups),
    )
    await asyncio.sleep(1.0)
    idle = rss_mib(serve.pid)
    ids = list(range(1, o.inflight_lookups + 1))
    started = time.monotonic()
    async with aiohttp.ClientSession() as http:
        for first in range(0, len(ids), 200):
            body = json.dumps({"object_ids": ids[first : first + 200]})
            async with http.post(serve.url + "/callback", data=body) as response:
                assert response.status == 202, await response.text()
    # Until the in-flight count stops rising (the cap, or every id), within the hold.
    peak, best = 0.0, 0.0
    while time.monotonic() - started < hold * 0.8:
        await asyncio.sleep(0.5)
        now = (await bench.read_metrics(serve)).total("lastseen_lookups_in_flight")
        if now > best:
            best = now
        elif now > 0 and now == best:
            break
    loaded = rss_mib(serve.pid)
    peak = best
    bench.progress(f"inflight: {peak:.0f} lookups in flight, RSS {idle} -> {loaded}")
    deadline = time.monotonic() + hold * 4 + 30
    done = 0.0
    while time.monotonic() < deadline:
        reading = await bench.read_metrics(serve)
        done = reading.total("lastseen_lookups_total")
        if done >= len(ids) and not reading.total("lastseen_inbox_pending"):
            break
        await asyncio.sleep(1.0)
    await serve.terminate()
    await upstream.terminate()
    worker = "worker0" if "worker0" in loaded else "serve"
    grown = loaded.get(worker, 0.0) - idle.get(worker, 0.0)
    return {
        "upstream_hold_s": hold,
        "ids": len(ids),
        "lookups_in_flight_peak": peak,
        "rss_mib_idle": idle,
        "rss_mib_in_flight": loaded,
        "worker_mib_for_lookups": round(grown, 1),
        "worker_kib_per_lookup_in_flight": round(grown * 1024 / peak, 2) if peak else None,
        "lookups_done": done,
        "all_looked_up": done >= len(ids),
    }
