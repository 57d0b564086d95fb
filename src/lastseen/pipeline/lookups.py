"""Upstream lookups: one request per id, shared by every callback that may use its answer.

Coalescing. The same id arrives in many callbacks. A lookup may serve a callback only if its
request was sent after that callback was received: an answer obtained earlier says nothing
about the object at the callback's time. So a lookup accepts joiners while it has not sent its
request (it waits for a slot, a rate token, or a retry's backoff: whatever it sends will be
later than now) and, once sent, only callbacks received before the send. A callback that cannot
join starts a new lookup, which becomes the one later callbacks join. Under a backlog, every
claimed callback was received in the past, so one lookup per distinct id serves them all.

Failures. A permanent failure (upstream.py says which) is reported to every callback the
lookup serves, and dead-lettered. A transient one is retried, with exponential backoff and
jitter and without holding a slot, for as long as the answer can still matter: while some
callback it serves is younger than the TTL (an older one's result could create no row). Each
failure lets go of the callbacks that have aged past the TTL, as ``Expired``; so each callback
has a budget of its own, whenever it joined.

Outages. When the upstream answers nothing (``OUTAGE_FAILURES`` transient failures and no
success for ``OUTAGE_SILENCE`` seconds), stretching each id's backoff would only delay the
recovery: lookups that fail, and new ones, are held instead, ``PROBES`` of them are sent as
probes every ``retry_base`` seconds, and the first success releases them all at once (within the
in-flight cap and the rate limit). Failing ids never block the others: an upstream that answers
some ids is not in an outage, however many others fail or hang, and a probe that hangs does not
stop the next ones.
"""

from __future__ import annotations

import asyncio
import collections
import functools
from collections.abc import Callable

import structlog

from lastseen.core.backoff import backoff
from lastseen.core.clock import SYSTEM, Clock
from lastseen.core.errors import LookupFailed
from lastseen.core.model import Expired, Fetch, HeldCallback, Lookup, Outcome
from lastseen.telemetry.metrics import Metrics

log = structlog.get_logger("lastseen.pipeline.lookups")


Deliver = Callable[[Lookup, Outcome], None]

# What says the upstream itself is failing: this many transient failures, and not one success
# for this long. Shares of recent attempts were tried and failed in benchmarks: a hostile
# upstream's hanging ids time out together, in bursts of failures that pass any share, and held
# every lookup, good ids included, for seconds; counting first attempts only never saw an outage
# under the reference load (the same ids again and again join lookups already retrying). A real
# outage answers nothing, and is seen within a second under any load.
OUTAGE_FAILURES = 10
OUTAGE_SILENCE = 1.0
PROBES = 3  # held lookups sent per probe interval: one that hangs must not stall the recovery


class RateLimiter:
    """At most ``rate`` acquisitions per second, spread evenly."""

    def __init__(self, rate: float, clock: Clock = SYSTEM) -> None:
        self.interval = 1.0 / rate
        self.clock = clock
        self._next = clock.monotonic()

    def reserve(self) -> float:
        """Takes the next slot; the seconds until it comes."""
        now = self.clock.monotonic()
        slot = max(self._next, now)
        self._next = slot + self.interval
        return slot - now


_NOT_SENT = frozenset({"connection", "internal_error"})  # failures before a request went out


def outage_cause(failure: LookupFailed) -> str:
    """A failure in a few words of a bounded set (they label a metric): the reason, and for
    a connection, a timeout or a status, what happened ("connection: connection refused");
    never the body an upstream sent."""
    if failure.reason in ("connection", "timeout") or failure.reason.startswith("http_"):
        return f"{failure.reason}: {failure.detail}"[:120]
    return failure.reason


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
        ttl: float,
        retry_base: float,
        retry_max: float,
        upstream: str = "",
        clock: Clock = SYSTEM,
    ) -> None:
        """``upstream``: the upstream's URL, for what an operator reads of its outages."""
        self.fetch = fetch
        self.upstream = upstream
        self.clock = clock
        self.metrics = metrics
        self.deliver = deliver
        self.ttl = ttl
        self.retry_base = retry_base
        self.retry_max = retry_max
        self.max_in_flight = max_in_flight
        self._rate = RateLimiter(rate, clock) if rate > 0 else None
        self._open: dict[int, Lookup] = {}
        # Lookups wait here for a slot (new ones, and retries after their backoff): a burst of
        # twenty thousand ids costs a queue entry each. An attempt is a request and a callback,
        # not a task: at thousands of lookups a second, a task, its coroutines and a future per
        # lookup were a tenth of the worker's CPU.
        self._ready: collections.deque[Lookup] = collections.deque()
        self._in_flight = 0
        self._backoffs: dict[Lookup, asyncio.TimerHandle] = {}
        self._paced: dict[Lookup, asyncio.TimerHandle] = {}  # waiting for a rate slot
        self._closed = False
        # The outage: whether each of the last attempts failed, and the lookups held until
        # it ends.
        self._last_success = clock.monotonic()
        self._failures_since = 0  # transient failures since the last success
        self._outage = False
        self.failure: str | None = None  # while in an outage: the cause of the last failure
        self._held: collections.deque[Lookup] = collections.deque()
        self._probe: asyncio.TimerHandle | None = None
        # Per lookup, the metrics cost what labels() and a locked gauge cost: the outcomes'
        # children are bound once, and the gauge reads the count when scraped.
        self._outcomes = {
            name: metrics.lookups.labels(name) for name in ("online", "offline", "failed")
        }
        self._attempting = 0
        metrics.lookups_in_flight.set_function(lambda: self._attempting)

    @property
    def outage(self) -> bool:
        return self._outage

    def add(self, callback: HeldCallback, object_id: int) -> None:
        """Looks ``object_id`` up for ``callback``, sharing a lookup when the rule above allows."""
        lookup = self._open.get(object_id)
        if lookup is not None and lookup.accepts(callback):
            lookup.callbacks.append(callback)
            self.metrics.coalesced.inc()
            return
        lookup = self._open[object_id] = Lookup(object_id, [callback])
        if self.outage:
            self._hold(lookup)
            return
        self._ready.append(lookup)
        self._pump()

    def _pump(self) -> None:
        while self._ready and self._in_flight < self.max_in_flight:
            lookup = self._ready.popleft()
            # After a burst the queue holds lookups whose callbacks all aged past the TTL while
            # they waited: their answers could create no row, so they go now, as expired,
            # without a request, and the capacity goes to callbacks that can still matter (an
            # overload benchmark kept freshness away for minutes after the load dropped).
            if not self._let_go_of_stale(lookup):
                continue
            self._in_flight += 1
            delay = self._rate.reserve() if self._rate is not None else 0.0
            if delay > 0:
                loop = asyncio.get_running_loop()
                self._paced[lookup] = loop.call_later(delay, self._attempt, lookup)
            else:
                self._attempt(lookup)

    def _attempt(self, lookup: Lookup) -> None:
        """Sends one attempt; ``_attempted`` gets its outcome."""
        if self._closed:
            return
        self._paced.pop(lookup, None)
        lookup.attempts += 1
        lookup.sent_at = self.clock.wall()
        lookup.started = self.clock.monotonic()
        self._attempting += 1
        try:
            self.fetch(lookup.object_id, functools.partial(self._attempted, lookup))
        except Exception as exc:
            # A bug here must not strand the callbacks waiting on this id: log it loudly and
            # treat it as a failed attempt (on the next turn of the loop: no recursion through
            # the queue), retried while its answer can matter.
            log.exception("lookup attempt crashed", object_id=lookup.object_id)
            failure = LookupFailed(lookup.object_id, "internal_error", repr(exc), permanent=False)
            asyncio.get_running_loop().call_soon(self._attempted, lookup, failure)

    def _attempted(self, lookup: Lookup, outcome: bool | LookupFailed) -> None:
        if self._closed:
            return
        lookup.latency = self.clock.monotonic() - lookup.started
        lookup.sent_at = None
        self._attempting -= 1
        # The upstream's latency: a refused connect takes microseconds and says nothing of it.
        if not isinstance(outcome, LookupFailed) or outcome.reason not in _NOT_SENT:
            self.metrics.lookup_seconds.observe(lookup.latency)
        try:
            self._conclude(lookup, outcome)
        except Exception:
            # Whatever it was, the slot comes back; a bug here is worth a loud log.
            log.exception("lookup outcome crashed", object_id=lookup.object_id)
        finally:
            self._in_flight -= 1
            self._pump()

    def _conclude(self, lookup: Lookup, outcome: bool | LookupFailed) -> None:
        """The outcome, or a retry (after a backoff, or after the outage)."""
        if isinstance(outcome, LookupFailed) and not outcome.permanent:
            self._failed(outcome)
            lookup.last_failure = outcome.reason
            if not self._let_go_of_stale(lookup):
                return  # nothing it serves can use an answer any more
            self.metrics.lookup_retries.labels(outcome.reason).inc()
            if self.outage:
                self._hold(lookup)
                return
            delay = backoff(lookup.attempts, self.retry_base, self.retry_max, jitter=True)
            handle = asyncio.get_running_loop().call_later(delay, self._retry, lookup)
            self._backoffs[lookup] = handle
            return
        if not isinstance(outcome, LookupFailed):
            self._succeeded()
        self._close(lookup)
        self._outcomes[
            "failed" if isinstance(outcome, LookupFailed) else ("online" if outcome else "offline")
        ].inc()
        self.deliver(lookup, outcome)

    def _close(self, lookup: Lookup) -> None:
        """Closed to joiners before anything else can run: its answer is final."""
        if self._open.get(lookup.object_id) is lookup:
            del self._open[lookup.object_id]

    def _let_go_of_stale(self, lookup: Lookup) -> bool:
        """Completes the callbacks that have aged past the TTL as expired; whether any remain."""
        cutoff = self.clock.wall() - self.ttl
        stale = [c for c in lookup.callbacks if c.received_ts < cutoff]
        if not stale:
            return True
        fresh = [c for c in lookup.callbacks if c.received_ts >= cutoff]
        lookup.callbacks = fresh
        if not fresh:
            self._close(lookup)
            self.metrics.lookups.labels("expired").inc()
        expired = Lookup(lookup.object_id, stale, attempts=lookup.attempts)
        self.deliver(expired, Expired(lookup.last_failure))
        return bool(fresh)

    def _retry(self, lookup: Lookup) -> None:
        del self._backoffs[lookup]
        self._ready.append(lookup)
        self._pump()

    def _failed(self, failure: LookupFailed) -> None:
        self._failures_since += 1
        if self._outage:
            self._name_cause(failure)  # a probe's failure may say something new
        elif (
            self._failures_since >= OUTAGE_FAILURES
            and self.clock.monotonic() - self._last_success >= OUTAGE_SILENCE
        ):
            self._outage = True
            self._name_cause(failure)
            log.warning(
                "the upstream is failing; holding lookups and probing",
                upstream=self.upstream,
                cause=self.failure,
            )
            self.metrics.upstream_outage.set(1)

    def _name_cause(self, failure: LookupFailed) -> None:
        cause = outage_cause(failure)
        if cause != self.failure:
            self.failure = cause
            self.metrics.upstream_failure.clear()
            self.metrics.upstream_failure.labels(cause).set(1)

    def _succeeded(self) -> None:
        self._last_success = self.clock.monotonic()
        self._failures_since = 0
        if not self._outage:
            return
        self._outage = False
        self.failure = None
        log.info("the upstream answers again; releasing held lookups", held=len(self._held))
        self.metrics.upstream_outage.set(0)
        self.metrics.upstream_failure.clear()
        if self._probe is not None:
            self._probe.cancel()
            self._probe = None
        self._ready.extend(self._held)
        self._held.clear()
        self._pump()

    def _hold(self, lookup: Lookup) -> None:
        self._held.append(lookup)
        if self._probe is None:
            self._probe = asyncio.get_running_loop().call_later(self.retry_base, self._send_probe)

    def _send_probe(self) -> None:
        """Sends up to ``PROBES`` held lookups, after letting go of held callbacks that aged past
        the TTL."""
        self._probe = None
        held, self._held = self._held, collections.deque()
        for lookup in held:
            if self._let_go_of_stale(lookup):
                self._held.append(lookup)
        for _ in range(min(PROBES, len(self._held))):
            self._ready.append(self._held.popleft())
        self._pump()
        if self._held:
            self._probe = asyncio.get_running_loop().call_later(self.retry_base, self._send_probe)

    def close(self) -> None:
        """Drops the lookups under way: answers that come later are ignored, and their
        callbacks stay in the inbox for a redo."""
        self._closed = True
        for handle in [*self._backoffs.values(), *self._paced.values()]:
            handle.cancel()
        self._backoffs.clear()
        self._paced.clear()
        if self._probe is not None:
            self._probe.cancel()
            self._probe = None
        self._held.clear()
        self._ready.clear()
        self._open.clear()
