"""One checker for the failure scenarios: what a producer was told, what ``objects`` held and
how ``/ready`` answered, while a fault ran; and the figures judged from them.

``observe`` plays the reference producer (open loop: each POST on its schedule, whatever the
ones before it are waiting for; a 1 s timeout and no retry; several instances taken in turn,
as a load balancer does), watches ``objects`` through its own connection and probes
``/ready`` every 0.2 s, until the fault has run and every acknowledged id is in ``objects`` or
past its TTL (or, to measure expiry, deleted or well past it).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import json
import time
from collections.abc import Awaitable, Iterator, Sequence
from typing import Any

import aiohttp
import asyncpg

from lastseen.core.errors import DatabaseError
from lastseen.devtools.loadgen import percentile, signed_headers
from lastseen.storage.database import Database

RATE = 5.0  # callbacks per second
IDS = 20  # unique ids per callback
CLIENT_TIMEOUT = 1.0  # s: the reference producer's, no retry
READY_EVERY = 0.2  # s between /ready probes
READY_WAIT = 5.0  # s a probe waits before it counts as not answered
WATCH_EVERY = 0.1  # s between reads of objects
# s: how early a deletion may come and still count as at its TTL (the clock correction's error,
# half a round trip to PostgreSQL, is well within it)
EXPIRY_TOLERANCE = 0.05
EXPIRY_WAIT = 10.0  # s past its TTL an id may still be in objects before expiry gives up on it


@dataclasses.dataclass
class Post:
    sent: float  # wall clock
    ids: list[int]
    status: int  # 0: no answer within the client's timeout
    seconds: float
    to: int = 0  # which of the instances it was sent to


@dataclasses.dataclass
class Checker:
    ttl: float
    posts: list[Post] = dataclasses.field(default_factory=list)
    appeared: dict[int, float] = dataclasses.field(default_factory=dict)  # id: first seen
    gone: dict[int, float] = dataclasses.field(default_factory=dict)  # id: first seen gone
    ready: list[tuple[float, int]] = dataclasses.field(default_factory=list)  # s, status
    fault: tuple[float, float] = (0.0, 0.0)  # wall clock: when it began and ended

    def acknowledged(self) -> dict[int, float]:
        """Each acknowledged id and when its POST was sent."""
        return {i: p.sent for p in self.posts if p.status == 202 for i in p.ids}

    def waiting(self, now: float, expiry: bool = False) -> bool:
        """Is an acknowledged id still missing from ``objects`` and within its TTL? With
        ``expiry``: is one still in ``objects`` and not long past its TTL?"""
        if expiry:
            return any(
                i not in self.gone and now < sent + self.ttl + EXPIRY_WAIT
                for i, sent in self.acknowledged().items()
            )
        return any(
            i not in self.appeared and now < sent + self.ttl
            for i, sent in self.acknowledged().items()
        )

    def expiry(self, to: int) -> dict[str, Any]:
        """For the ids acknowledged by instance ``to``: when each was deleted, from its POST's
        sending plus the TTL (its receive time is a little later: never below 0 if expiry
        keeps the TTL, but for the clock correction's error: ``EXPIRY_TOLERANCE``)."""
        sent = {i: p.sent for p in self.posts if p.status == 202 and p.to == to for i in p.ids}
        late = [self.gone[i] - (at + self.ttl) for i, at in sent.items() if i in self.gone]
        return {
            "ids": len(sent),
            "deleted": len(late),
            "after_ttl_s": {
                "min": round(min(late, default=0.0), 2),
                "p50": round(percentile(late, 50), 2),
                "max": round(max(late, default=0.0), 2),
            },
            "deleted_before_ttl": sum(1 for x in late if x < -EXPIRY_TOLERANCE),
        }

    def result(self) -> dict[str, Any]:
        acked = self.acknowledged()
        delays = [self.appeared[i] - sent for i, sent in acked.items() if i in self.appeared]
        missed = [
            i for i, sent in acked.items() if self.appeared.get(i, float("inf")) > sent + self.ttl
        ]
        statuses = collections.Counter(p.status for p in self.posts)
        replies = [p.seconds for p in self.posts if p.status]
        ready_seconds = [seconds for seconds, _ in self.ready]
        # When the POSTs not acknowledged were sent, from the fault's start.
        unacknowledged = [p.sent - self.fault[0] for p in self.posts if p.status != 202]
        return {
            "posts": len(self.posts),
            "acknowledged": statuses.get(202, 0),
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "acknowledged_ids": len(acked),
            "missed_ids": len(missed),
            "missed_examples": sorted(missed)[:10],
            "worst_id_delay_s": round(max(delays, default=0.0), 2),
            "reply_p99_ms": round(percentile(replies, 99) * 1000, 1),
            "reply_max_ms": round(max(replies, default=0.0) * 1000, 1),
            "fault_lasted_s": round(self.fault[1] - self.fault[0], 2),
            "unacknowledged_sent_s": [round(min(unacknowledged), 2), round(max(unacknowledged), 2)]
            if unacknowledged
            else None,
            "ready_probes": len(self.ready),
            "ready_worst_s": round(max(ready_seconds, default=0.0), 3),
            "ready_over_1_s": sum(1 for s in ready_seconds if s > 1.0),
            "ready_statuses": dict(
                collections.Counter(str(status) for _, status in self.ready).most_common()
            ),
        }


async def observe(
    checker: Checker,
    services: Sequence[str],
    watch_url: str,
    fault: Awaitable[None],
    ids: Iterator[int],
    *,
    expiry: bool = False,
    secret: str | None = None,
) -> None:
    """Produces to ``services`` in turn (each POST signed with the webhook ``secret``, if
    given), watches and probes while ``fault`` runs, then until every acknowledged id is in
    ``objects`` or past its TTL (with ``expiry``: deleted, or long past it)."""
    done = asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as http, asyncio.TaskGroup() as tasks:
        watcher = tasks.create_task(_watch(checker, watch_url), name="nemesis-watch")
        prober = tasks.create_task(_probe(checker, services), name="nemesis-ready")
        producer = tasks.create_task(
            _produce(checker, http, services, ids, done, secret), name="nemesis-produce"
        )
        await fault
        done.set()
        await producer
        while checker.waiting(time.time(), expiry):
            await asyncio.sleep(0.2)
        watcher.cancel()
        prober.cancel()


async def _produce(
    checker: Checker,
    http: aiohttp.ClientSession,
    services: Sequence[str],
    ids: Iterator[int],
    done: asyncio.Event,
    secret: str | None,
) -> None:
    async def post(batch: list[int], to: int) -> None:
        body = json.dumps({"object_ids": batch}).encode()
        headers = {"Content-Type": "application/json"}
        if secret is not None:
            headers |= signed_headers(secret, [body], f"nemesis-{batch[0]}")[0]
        sent, started = time.time(), time.monotonic()
        status = 0
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            post = http.post(services[to] + "/callback", data=body, headers=headers)
            async with post as response:
                await response.read()
                status = response.status
        checker.posts.append(Post(sent, batch, status, time.monotonic() - started, to))

    started = time.monotonic()
    async with asyncio.TaskGroup() as posts:
        for n in itertools.count():
            await asyncio.sleep(max(0.0, started + n / RATE - time.monotonic()))
            if done.is_set():
                return
            batch = [next(ids) for _ in range(IDS)]
            posts.create_task(post(batch, n % len(services)), name=f"nemesis-post-{n}")


async def _watch(checker: Checker, url: str) -> None:
    """When each id first appears in ``objects``, and when it is first seen gone (the ids are
    unique: once each is enough)."""
    db = await Database.open(url, size=1, timeout=2.0)
    present: set[int] = set()
    try:
        while True:
            with contextlib.suppress(
                DatabaseError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError
            ):
                rows = await asyncio.wait_for(db.list_objects(None, 10_000_000), 3.0)
                now = time.time()
                for object_id, _ in rows:
                    checker.appeared.setdefault(object_id, now)
                now_present = {object_id for object_id, _ in rows}
                for object_id in present - now_present:
                    checker.gone.setdefault(object_id, now)
                present = now_present
            await asyncio.sleep(WATCH_EVERY)
    finally:
        await db.close()


async def _probe(checker: Checker, services: Sequence[str]) -> None:
    """``/ready`` of each instance in turn, every ``READY_EVERY``: how long each answer took
    (a kubelet waits 1 s)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=READY_WAIT)) as http:
        for n in itertools.count():
            url = services[n % len(services)]
            started = time.monotonic()
            status = 0
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(url + "/ready") as response:
                    await response.read()
                    status = response.status
            checker.ready.append((time.monotonic() - started, status))
            await asyncio.sleep(READY_EVERY)
