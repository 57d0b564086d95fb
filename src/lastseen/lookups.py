"""Upstream lookups: one request per id, shared by every callback that may use its answer.

Coalescing. The same id arrives in many callbacks. A lookup may serve a callback only if its
request was sent after that callback was received: an answer obtained earlier says nothing
about the object at the callback's time. So a lookup accepts joiners while it has not sent its
request (it waits for a slot, a rate token, or a retry's backoff: whatever it sends will be
later than now) and, once sent, only callbacks received before the send. A callback that cannot
join starts a new lookup, which becomes the one later callbacks join. Under a backlog, every
claimed callback was received in the past, so one lookup per distinct id serves them all.

Failures. Transient failures (upstream.py says which) are retried with exponential backoff and
jitter, without holding a slot. A permanent failure, or running out of attempts, is reported as
such to every callback the lookup serves; it never blocks other ids.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable

import structlog

from lastseen.backoff import backoff
from lastseen.errors import LookupFailed
from lastseen.metrics import Metrics
from lastseen.model import HeldCallback, Lookup, Outcome

log = structlog.get_logger("lastseen.lookups")


Deliver = Callable[[Lookup, Outcome], None]
Fetch = Callable[[int], Awaitable[bool]]


class RateLimiter:
    """At most ``rate`` acquisitions per second, spread evenly."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self._next = time.monotonic()

    async def acquire(self) -> None:
        now = time.monotonic()
        slot = max(self._next, now)
        self._next = slot + self.interval
        if slot > now:
            await asyncio.sleep(slot - now)


class Lookups:
    """Runs lookups with ``fetch``; calls ``deliver`` once per lookup with its outcome."""

    def __init__(
        self,
        fetch: Fetch,
        metrics: Metrics,
        deliver: Deliver,
        *,
        max_in_flight: int,
        rate: float,
        timeout: float,
        max_attempts: int,
        retry_base: float,
        retry_max: float,
    ) -> None:
        self.fetch = fetch
        self.metrics = metrics
        self.deliver = deliver
        self.max_attempts = max_attempts
        self.retry_base = retry_base
        self.retry_max = retry_max
        self.max_in_flight = max_in_flight
        self._rate = RateLimiter(rate) if rate > 0 else None
        self._open: dict[int, Lookup] = {}
        # Lookups wait here for a slot (new ones, and retries after their backoff). A task is
        # made only when a request can go out: a burst of twenty thousand ids costs a queue
        # entry each, not a task each waiting on a semaphore.
        self._ready: collections.deque[Lookup] = collections.deque()
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._backoffs: dict[Lookup, asyncio.TimerHandle] = {}

    def add(self, callback: HeldCallback, object_id: int) -> None:
        """Looks ``object_id`` up for ``callback``, sharing a lookup when the rule above allows."""
        lookup = self._open.get(object_id)
        if lookup is not None and lookup.accepts(callback):
            lookup.callbacks.append(callback)
            self.metrics.coalesced.inc()
            return
        lookup = self._open[object_id] = Lookup(object_id, [callback])
        self._ready.append(lookup)
        self._pump()

    def _pump(self) -> None:
        while self._ready and self._in_flight < self.max_in_flight:
            self._in_flight += 1
            task = asyncio.create_task(self._run(self._ready.popleft()))
            self._tasks.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._in_flight -= 1
        self._pump()
        if not task.cancelled() and task.exception() is not None:
            # _run catches everything it expects; anything else is a bug worth a loud log.
            log.error("lookup task crashed", error=repr(task.exception()))

    async def _run(self, lookup: Lookup) -> None:
        """One attempt; then the outcome, or a retry after a backoff (without a slot)."""
        lookup.attempts += 1
        if self._rate is not None:
            await self._rate.acquire()
        outcome = await self._attempt(lookup)
        if isinstance(outcome, LookupFailed) and not (
            outcome.permanent or lookup.attempts >= self.max_attempts
        ):
            self.metrics.lookup_retries.labels(outcome.reason).inc()
            delay = backoff(lookup.attempts, self.retry_base, self.retry_max, jitter=True)
            handle = asyncio.get_running_loop().call_later(delay, self._retry, lookup)
            self._backoffs[lookup] = handle
            return
        # Closed to joiners before anything else can run: the answer is final.
        if self._open.get(lookup.object_id) is lookup:
            del self._open[lookup.object_id]
        self.metrics.lookups.labels(
            "failed" if isinstance(outcome, LookupFailed) else ("online" if outcome else "offline")
        ).inc()
        self.deliver(lookup, outcome)

    def _retry(self, lookup: Lookup) -> None:
        del self._backoffs[lookup]
        self._ready.append(lookup)
        self._pump()

    async def _attempt(self, lookup: Lookup) -> Outcome:
        lookup.sent_at = time.time()
        started = time.perf_counter()
        self.metrics.lookups_in_flight.inc()
        try:
            return await self.fetch(lookup.object_id)
        except LookupFailed as failure:
            return failure
        except Exception as exc:
            # A bug here must not strand the callbacks waiting on this id: log it loudly and
            # treat it as a failed attempt, which is retried and in the end dead-lettered.
            log.exception("lookup attempt crashed", object_id=lookup.object_id)
            return LookupFailed(lookup.object_id, "internal_error", repr(exc), permanent=False)
        finally:
            lookup.latency = time.perf_counter() - started
            lookup.sent_at = None
            self.metrics.lookups_in_flight.dec()
            self.metrics.lookup_seconds.observe(lookup.latency)

    async def close(self) -> None:
        """Cancels the lookups under way (their callbacks stay in the inbox for a redo)."""
        for handle in self._backoffs.values():
            handle.cancel()
        self._backoffs.clear()
        self._ready.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._open.clear()
