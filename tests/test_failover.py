"""A real failover: a primary with a synchronous standby, the primary crashed and the standby
promoted under load, lastseen given both hosts in libpq's multi-host form."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import aiohttp
import asyncpg
import pytest
from helpers.services import Spawn, StartUpstream
from helpers.waiting import eventually

from lastseen.devtools.replication import Pair, missing

pytestmark = pytest.mark.slow


@pytest.fixture
def pair() -> Iterator[Pair]:
    why = missing()
    if why is not None:
        pytest.skip(why)
    made = Pair()
    try:
        made.start()
        yield made
    finally:
        made.stop()


async def test_a_failover_to_a_synchronous_standby_loses_no_callback(
    pair: Pair, spawn: Spawn, start_upstream: StartUpstream
) -> None:
    """5 callbacks/s of 20 unique ids, a 1 s client timeout and no retry, while the primary
    stops at once (-m immediate) and the standby is promoted 3 s later: every POST is
    acknowledged (the spool carries the gap), /ready answers 200 within 1 s throughout, and
    every acknowledged id is in `objects` on the new primary, looked up."""
    await pair.wait_synchronous()
    _, upstream_url = await start_upstream(latency_min=0.01, latency_max=0.05)
    serve = await spawn(
        env={
            "LASTSEEN_DATABASE_URL": pair.url,
            "LASTSEEN_OBJECTS_URL": upstream_url,
            "LASTSEEN_TTL": "60",
        }
    )
    statuses: list[int] = []
    sent: list[list[int]] = []
    timeout = aiohttp.ClientTimeout(total=1.0)

    async def produce(seconds: float) -> None:
        async with aiohttp.ClientSession(timeout=timeout) as http:
            for _ in range(int(seconds * 5)):
                n = len(sent)
                ids = [n * 40 + 2 * k for k in range(20)]  # even: online
                sent.append(ids)
                try:
                    async with http.post(serve.url + "/callback", json={"object_ids": ids}) as r:
                        statuses.append(r.status)
                except (aiohttp.ClientError, TimeoutError):
                    statuses.append(0)
                await asyncio.sleep(0.2)

    ready_seconds: list[float] = []

    async def probe_ready(until: asyncio.Task[None]) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            while not until.done():
                started = time.monotonic()
                async with http.get(serve.url + "/ready") as response:
                    assert response.status == 200  # ready, degraded while spooling
                ready_seconds.append(time.monotonic() - started)
                await asyncio.sleep(0.2)

    producing = asyncio.create_task(produce(10.0))
    probing = asyncio.create_task(probe_ready(producing))
    await asyncio.sleep(2.0)
    await asyncio.to_thread(pair.crash_primary)
    await asyncio.sleep(3.0)
    await asyncio.to_thread(pair.promote_standby)
    await producing
    await probing
    assert statuses == [202] * len(sent), statuses
    assert max(ready_seconds) < 1.0, ready_seconds  # a kubelet probe's timeout
    wanted = {i for ids in sent for i in ids}
    conn = await asyncpg.connect(pair.host_url(1))
    try:
        missing_ids: set[int] = set()

        async def all_there() -> bool:
            rows = await conn.fetch("SELECT id FROM objects")
            missing_ids.clear()
            missing_ids.update(wanted - {r["id"] for r in rows})
            return not missing_ids

        try:
            await eventually(all_there, timeout=30)
        except TimeoutError:
            callbacks = await conn.fetch("SELECT * FROM callbacks ORDER BY id")
            concerned = [
                dict(r)
                for r in callbacks
                if r["done_at"] is None or missing_ids & set(r["object_ids"])
            ]
            notable = [e for e in serve.logs if e.get("level") in ("warning", "error")]
            pytest.fail(
                f"{len(missing_ids)} acknowledged ids not in objects, e.g. "
                f"{sorted(missing_ids)[:10]}; their callbacks: {concerned}; "
                f"warnings and errors: {notable[-40:]}"
            )
    finally:
        await conn.close()
