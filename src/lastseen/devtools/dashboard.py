"""The demo's dashboard: figures from the service's metrics, the database and the simulator.

Counters and gauges are read from the service's own Prometheus registry, the inbox depth and the
online objects from the database (as ``/metrics`` does), and the rest from the simulator. Latency
quantiles cover only the recent ``window``: the bucket counts of the newest reading minus those
of the reading ``window`` seconds older, then interpolated within the bucket that holds the rank,
as Prometheus' ``histogram_quantile`` does. So they follow the system as it changes, and they
are only as precise as the buckets (metrics.py) are fine. Below the figures, the events
(events.py) name what happened to objects and dead letters as the database shows it.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import asyncpg
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from lastseen.core.errors import DatabaseError
from lastseen.devtools.events import Events
from lastseen.telemetry.promtext import Reading, quantile, since

if TYPE_CHECKING:
    from lastseen.devtools.simulate.run import Simulator
    from lastseen.runtime.service import Service

SHOWN_EVENTS = 5  # the newest events in the live view

LATENCIES = {
    "lookup": "lastseen_lookup_seconds",
    "lag_over_upstream": "lastseen_lag_over_upstream_seconds",
    "result_lag": "lastseen_result_lag_seconds",
}


@dataclasses.dataclass(frozen=True)
class Figures:
    """One frame of the dashboard."""

    elapsed: float
    window: float
    # Producer.
    sent: int
    acknowledged: int
    not_acknowledged: int
    producer_in_flight: int
    send_rate: float
    # Service.
    received: int
    rejected: int
    processed: int
    inbox_pending: int | None
    oldest_pending: float | None
    lookups_in_flight: int
    lookups: int
    lookup_rate: float
    coalesced: int
    retries: int
    objects_online: int | None
    deleted_expired: int
    deleted_offline: int
    dead_letters: dict[str, int]
    latencies: dict[str, tuple[float | None, float | None]]  # name: (p50, p99)
    # Upstream.
    upstream_requests: int
    upstream_in_flight: int
    upstream_faults: int
    # Events: the last few, and those new in this frame.
    events: tuple[str, ...] = ()
    new_events: tuple[str, ...] = ()


class Dashboard:
    """Samples the figures of one demo run; keeps ``window`` seconds of readings for rates."""

    def __init__(self, service: Service, simulator: Simulator, window: float = 30.0) -> None:
        self.service = service
        self.simulator = simulator
        self.window = window
        self.started = time.monotonic()
        # (reading, callbacks the producer has sent by then)
        self._readings: collections.deque[tuple[Reading, int]] = collections.deque()
        self._pending: tuple[int, float | None] | None = None
        self._online: int | None = None
        self.events = Events(service.settings.ttl)

    def note(self, text: str) -> None:
        """An event from outside the database (the demo's own actions)."""
        self.events.note(f"{_clock(time.monotonic() - self.started)} {text}")

    async def _database_figures(self) -> None:
        # Sampled like /metrics does: a slow database leaves the last figures, never a failure.
        db = self.service.db
        try:
            pending, age = await asyncio.wait_for(db.inbox_stats(), 1.0)
            self._online = await asyncio.wait_for(db.count_objects(), 1.0)
        except (DatabaseError, TimeoutError):
            return
        self._pending = (pending, age)

    async def sample(self) -> Figures:
        now = time.monotonic()
        await self._database_figures()
        reading = Reading.of_registry(self.service.metrics.registry, now)
        new_events: list[str] = []
        try:
            clock = _clock(now - self.started)
            new_events = await asyncio.wait_for(
                self.events.sample(self.service.db, reading, clock), 2.0
            )
        except (DatabaseError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            pass  # the next frame sees what this one missed
        producer = self.simulator.producer
        upstream = self.simulator.upstream
        self._readings.append((reading, producer.stats["sent"] if producer else 0))
        while len(self._readings) > 2 and now - self._readings[1][0].at >= self.window:
            self._readings.popleft()
        old, old_sent = self._readings[0]
        span = now - old.at

        def rate(new: float, old: float) -> float:
            return (new - old) / span if span > 0 else 0.0

        latencies = {}
        for label, name in LATENCIES.items():
            recent = since(reading.buckets(name), old.buckets(name) if span > 0 else None)
            latencies[label] = (quantile(recent, 0.5), quantile(recent, 0.99))
        deleted = reading.by_label("lastseen_objects_deleted_total", "cause")
        pending = self._pending
        stats = producer.stats if producer is not None else None
        return Figures(
            elapsed=now - self.started,
            window=min(span, self.window),
            sent=stats["sent"] if stats else 0,
            acknowledged=stats["acknowledged"] if stats else 0,
            not_acknowledged=producer.failed if producer else 0,
            producer_in_flight=producer.in_flight if producer else 0,
            send_rate=rate(self._readings[-1][1], old_sent),
            received=int(reading.total("lastseen_callbacks_received_total")),
            rejected=int(reading.total("lastseen_callbacks_rejected_total")),
            processed=int(reading.total("lastseen_callbacks_completed_total")),
            inbox_pending=None if pending is None else pending[0],
            oldest_pending=None if pending is None else pending[1],
            lookups_in_flight=int(reading.total("lastseen_lookups_in_flight")),
            lookups=int(reading.total("lastseen_lookups_total")),
            lookup_rate=rate(
                reading.total("lastseen_lookups_total"), old.total("lastseen_lookups_total")
            ),
            coalesced=int(reading.total("lastseen_lookups_coalesced_total")),
            retries=int(reading.total("lastseen_lookup_retries_total")),
            objects_online=self._online,
            deleted_expired=int(deleted.get("expired", 0)),
            deleted_offline=int(deleted.get("offline", 0)),
            dead_letters={
                reason: int(n)
                for reason, n in reading.by_label("lastseen_dead_letters_total", "reason").items()
            },
            latencies=latencies,
            upstream_requests=upstream.stats["requests"] if upstream else 0,
            upstream_in_flight=upstream.in_flight if upstream else 0,
            upstream_faults=(
                sum(n for k, n in upstream.stats.items() if k not in ("requests", "ok"))
                if upstream
                else 0
            ),
            events=tuple(self.events.recent),
            new_events=tuple(new_events),
        )


def seconds(value: float | None) -> str:
    """A duration for people: ms below a second."""
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def _clock(value: float) -> str:
    whole = int(value)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def _n(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _section(title: str, rows: Sequence[tuple[str, str]]) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(min_width=30)
    table.add_column(justify="right", min_width=10)
    table.add_row(f"[bold]{title}[/bold]", "")
    for label, value in rows:
        table.add_row(label, value)
    return table


def render(f: Figures, title: str = "lastseen demo") -> RenderableType:
    """The live view of one frame."""
    dead = sum(f.dead_letters.values())
    producer = _section(
        "Producer",
        [
            ("callbacks sent", _n(f.sent)),
            ("acknowledged (202)", _n(f.acknowledged)),
            ("failed or timed out", _n(f.not_acknowledged)),
            ("POSTs in flight", _n(f.producer_in_flight)),
            ("send rate", f"{f.send_rate:.1f}/s"),
        ],
    )
    upstream = _section(
        "Upstream",
        [
            ("requests", _n(f.upstream_requests)),
            ("in flight", _n(f.upstream_in_flight)),
            ("faults injected", _n(f.upstream_faults)),
        ],
    )
    service = _section(
        "Service",
        [
            ("callbacks acknowledged", _n(f.received)),
            ("callbacks processed", _n(f.processed)),
            ("inbox depth (pending)", _n(f.inbox_pending)),
            ("oldest pending", seconds(f.oldest_pending)),
            ("lookups in flight", _n(f.lookups_in_flight)),
            ("lookups done", f"{_n(f.lookups)} ({f.lookup_rate:.0f}/s)"),
            ("lookups coalesced", _n(f.coalesced)),
            ("lookup retries", _n(f.retries)),
            ("online objects", _n(f.objects_online)),
            ("deleted: expired / offline", f"{f.deleted_expired:,} / {f.deleted_offline:,}"),
            ("dead letters", f"{dead:,}"),
            # One row per reason: a long list on one row would squeeze the figures out.
            *((f"  {reason}", f"{n:,}") for reason, n in sorted(f.dead_letters.items())),
        ],
    )
    latency = Table.grid(padding=(0, 2))
    latency.add_column(min_width=30)
    latency.add_column(justify="right", min_width=10)
    latency.add_column(justify="right", min_width=10)
    latency.add_row(
        f"[bold]Latency, last {f.window:.0f} s[/bold]", "[bold]p50[/bold]", "[bold]p99[/bold]"
    )
    names = {
        "lookup": "upstream lookup",
        "lag_over_upstream": "lag over upstream",
        "result_lag": "receipt to result",
    }
    for key, label in names.items():
        p50, p99 = f.latencies.get(key, (None, None))
        latency.add_row(label, seconds(p50), seconds(p99))
    grid = Table.grid(padding=(0, 4))
    grid.add_row(Group(producer, "", upstream), Group(service, "", latency))
    body: RenderableType = grid
    if f.events:
        # The newest few, one line each, under the figures.
        events = Table.grid()
        events.add_column(no_wrap=True, overflow="ellipsis")
        events.add_row("[bold]Events[/bold]")
        for text in f.events[-SHOWN_EVENTS:]:
            events.add_row(Text(text))
        body = Group(grid, "", events)
    return Panel(body, title=f"{title} · {_clock(f.elapsed)} · Ctrl-C stops", expand=False)


def deletions(f: Figures) -> str:
    """What the service's metrics say it did of what the story shows."""
    dead = sum(f.dead_letters.values())
    return (
        f"service: deleted {f.deleted_expired:,} objects by the TTL and {f.deleted_offline:,} "
        f"for going offline; {f.coalesced:,} lookups coalesced; "
        f"{dead:,} dead letter{'' if dead == 1 else 's'}"
    )


def line(f: Figures) -> str:
    """The same figures on one line, for a log or a pipe."""
    lookup = f.latencies.get("lookup", (None, None))
    lag = f.latencies.get("lag_over_upstream", (None, None))
    return (
        f"[{_clock(f.elapsed)}] sent {f.sent} acked {f.acknowledged} "
        f"failed {f.not_acknowledged} | processed {f.processed} pending {_n(f.inbox_pending)} "
        f"lookups in flight {f.lookups_in_flight} | online {_n(f.objects_online)} "
        f"deleted {f.deleted_expired + f.deleted_offline} "
        f"dead letters {sum(f.dead_letters.values())} | "
        f"lookup p50 {seconds(lookup[0])} p99 {seconds(lookup[1])} "
        f"lag over upstream p50 {seconds(lag[0])} p99 {seconds(lag[1])}"
    )
