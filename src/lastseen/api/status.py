"""The figures of the status page, served as JSON at ``GET /status``: what this instance is
doing now, the database-wide figures (inbox, objects, dead letters), and a few minutes of
history for the page's sparklines.

Nothing is sampled while nobody asks: a request takes a sample when the last one is older
than ``sample_every``, and viewers that ask at once share it (a lock), so any number of open
pages costs one sample per interval. The history is the samples those requests took.
Counters and histograms come from this process's registry and its worker processes' (as
``/metrics`` sums them); rates and latency quantiles are over the recent ``window``.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import msgspec
from aiohttp import web

from lastseen import __version__
from lastseen.api.readiness import upstream_failure
from lastseen.core.errors import DatabaseError
from lastseen.core.replies import Ready
from lastseen.storage.database import Database
from lastseen.telemetry.metrics import Metrics
from lastseen.telemetry.promtext import Reading, quantile, since

if TYPE_CHECKING:
    # Not at run time: web.py imports openapi.py, which takes its schema from here.
    from lastseen.api.readiness import Readiness

Scrape = Callable[[], Awaitable[list[tuple[str, str]]]]

LATENCIES = {
    "lookup": "lastseen_lookup_seconds",
    "lag_over_upstream": "lastseen_lag_over_upstream_seconds",
    "result_lag": "lastseen_result_lag_seconds",
    "reply": "lastseen_reply_seconds",
}


class Quantiles(msgspec.Struct):
    """Seconds; null while the window holds no observation."""

    p50: float | None
    p99: float | None


class Totals(msgspec.Struct):
    """Counts since this instance started (all its processes)."""

    received: int
    rejected: int
    processed: int
    lookups: int
    retries: int
    deleted_expired: int
    deleted_offline: int
    dead_lettered: int
    spooled: int


class Rates(msgspec.Struct):
    """Per second, over the window."""

    received: float
    processed: float
    lookups: float


class Inbox(msgspec.Struct):
    """Callbacks not done yet, all instances; null when the database did not answer."""

    pending: int | None
    oldest_age: float | None


class SpoolFigures(msgspec.Struct):
    spooling: bool
    callbacks: int
    bytes: int
    oldest_age: float


class Point(msgspec.Struct, array_like=True):
    """One sample of the history: [epoch seconds, received/s, processed/s, lookups/s, inbox
    pending, lookups in flight, lag over upstream p99 (s)]."""

    at: float
    received: float
    processed: float
    lookups: float
    pending: int | None
    in_flight: int
    lag_p99: float | None


class Status(msgspec.Struct):
    """``GET /status``."""

    at: float
    version: str
    instance: str
    role: str
    ui: str
    ready: Ready
    totals: Totals
    rates: Rates
    window: float
    inbox: Inbox
    lookups_in_flight: int
    callbacks_active: int
    objects_online: int | None
    dead_letters: dict[str, int]
    spool: SpoolFigures | None
    upstream_failing: bool
    upstream_failure: str | None  # why: the cause of the last failed lookup
    upstream_url: str
    latency: dict[str, Quantiles]
    memory_bytes: int
    history: list[Point]


class DatabaseFigures(msgspec.Struct):
    """The figures that live in the database: the same whichever instance asks."""

    pending: int | None = None
    oldest_age: float | None = None
    online: int | None = None
    dead_letters: dict[str, int] = msgspec.field(default_factory=dict)


async def database_figures(db: Database, timeout: float = 1.0) -> DatabaseFigures | None:
    """The inbox depth and its oldest age, the online objects and the dead letters by reason;
    None when the database does not answer in time (the caller keeps its last figures: a slow
    database makes them stale, never a scrape or a page fail)."""
    try:
        pending, age = await asyncio.wait_for(db.inbox_stats(), timeout)
        online = await asyncio.wait_for(db.count_objects(), timeout)
        dead = await asyncio.wait_for(db.count_dead_letters(), timeout)
    except (DatabaseError, TimeoutError):
        return None
    return DatabaseFigures(pending, age, online, dead)


class StatusBoard:
    """Takes and keeps the samples behind ``GET /status``."""

    def __init__(
        self,
        db: Database,
        metrics: Metrics,
        readiness: Readiness,
        other_processes: Scrape | None,
        *,
        instance: str,
        role: str,
        ui: str,
        sample_every: float = 2.0,
        window: float = 30.0,
        history: float = 600.0,
    ) -> None:
        self.db = db
        self.metrics = metrics
        self.readiness = readiness
        self.other_processes = other_processes
        self.instance = instance
        self.role = role
        self.ui = ui
        self.sample_every = sample_every
        self.window = window
        self.history = history
        self._lock = asyncio.Lock()
        self._readings: collections.deque[Reading] = collections.deque()
        self._points: collections.deque[Point] = collections.deque()
        self._database = DatabaseFigures()
        self._latest: Status | None = None

    async def handle(self, request: web.Request) -> web.Response:
        """``GET /status``."""
        return web.Response(
            body=msgspec.json.encode(await self.status()),
            content_type="application/json",
            headers={"Cache-Control": "no-store"},
        )

    async def status(self) -> Status:
        """The latest sample, taken now if it is older than ``sample_every``."""
        async with self._lock:
            latest = self._latest
            if latest is None or time.monotonic() - self._readings[-1].at >= self.sample_every:
                latest = self._latest = await self._sample()
            return latest

    async def _reading(self) -> Reading:
        own = Reading.of_registry(self.metrics.registry)
        if self.other_processes is None:
            return own
        others = [Reading.of_text(text) for _, text in await self.other_processes()]
        return Reading.summed([own, *others], own.at)

    async def _sample(self) -> Status:
        # The reading first: it holds the worker processes' outage gauges, which readiness
        # would otherwise scrape from them a second time.
        reading = await self._reading()
        failure = upstream_failure(reading)
        ready = self.readiness.answer(failure)
        figures = await database_figures(self.db) if self.readiness.migrated else None
        if figures is not None:
            self._database = figures
        now = reading.at
        previous = self._readings[-1] if self._readings else None
        self._readings.append(reading)
        while len(self._readings) > 2 and now - self._readings[1].at >= self.window:
            self._readings.popleft()
        old = self._readings[0]

        def per_second(name: str, before: Reading | None) -> float:
            if before is None or now <= before.at:
                return 0.0
            return max(0.0, (reading.total(name) - before.total(name)) / (now - before.at))

        def window_quantiles(name: str) -> Quantiles:
            recent = since(reading.buckets(name), old.buckets(name) if old is not reading else None)
            return Quantiles(quantile(recent, 0.5), quantile(recent, 0.99))

        received, completed = (
            "lastseen_callbacks_received_total",
            "lastseen_callbacks_completed_total",
        )
        lookups = "lastseen_lookups_total"
        latency = {label: window_quantiles(name) for label, name in LATENCIES.items()}
        d = self._database
        in_flight = int(reading.total("lastseen_lookups_in_flight"))
        point = Point(
            at=time.time(),
            received=round(per_second(received, previous), 2),
            processed=round(per_second(completed, previous), 2),
            lookups=round(per_second(lookups, previous), 2),
            pending=d.pending,
            in_flight=in_flight,
            lag_p99=latency["lag_over_upstream"].p99,
        )
        self._points.append(point)
        while self._points and point.at - self._points[0].at > self.history:
            self._points.popleft()
        deleted = reading.by_label("lastseen_objects_deleted_total", "cause")
        spool = None
        if self.readiness.spool is not None:
            spool = SpoolFigures(
                spooling=reading.total("lastseen_spooling") > 0,
                callbacks=int(reading.total("lastseen_spool_callbacks")),
                bytes=int(reading.total("lastseen_spool_bytes")),
                oldest_age=reading.total("lastseen_spool_oldest_age_seconds"),
            )
        return Status(
            at=point.at,
            version=__version__,
            instance=self.instance,
            role=self.role,
            ui=self.ui,
            ready=ready,
            totals=Totals(
                received=int(reading.total(received)),
                rejected=int(reading.total("lastseen_callbacks_rejected_total")),
                processed=int(reading.total(completed)),
                lookups=int(reading.total(lookups)),
                retries=int(reading.total("lastseen_lookup_retries_total")),
                deleted_expired=int(deleted.get("expired", 0)),
                deleted_offline=int(deleted.get("offline", 0)),
                dead_lettered=int(reading.total("lastseen_dead_letters_total")),
                spooled=int(reading.total("lastseen_callbacks_spooled_total")),
            ),
            rates=Rates(
                received=round(per_second(received, old), 2),
                processed=round(per_second(completed, old), 2),
                lookups=round(per_second(lookups, old), 2),
            ),
            window=round(now - old.at, 1),
            inbox=Inbox(d.pending, d.oldest_age),
            lookups_in_flight=in_flight,
            callbacks_active=int(reading.total("lastseen_callbacks_active")),
            objects_online=d.online,
            dead_letters=d.dead_letters,
            spool=spool,
            upstream_failing=failure is not None,
            upstream_failure=failure,
            upstream_url=self.readiness.upstream,
            latency=latency,
            memory_bytes=int(reading.total("lastseen_process_resident_memory_bytes")),
            history=list(self._points),
        )
