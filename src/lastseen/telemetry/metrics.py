"""Prometheus metrics. One registry per service instance, so tests can run several in a process."""

from __future__ import annotations

import bisect
import itertools
import math
import platform
from collections.abc import Iterable, Sequence

from prometheus_client import (
    CollectorRegistry,
    Gauge,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

from lastseen import __version__

# The *_created series double the output and say nothing a scraper needs here.
disable_created_metrics()  # type: ignore[no-untyped-call]

FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
SLOW = (0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 7.5, 10.0, 30.0)
LAG = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0)
SIZES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


class _Value:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class Counter:
    """A counter, optionally labelled, for code that runs on one thread (the event loop).

    prometheus_client's counters and histograms take a lock on every change: in a worker
    that serves many callbacks per lookup, those locks were 56% of its CPU (py-spy, the box
    benchmark). These are plain additions, exported as prometheus_client's are.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = list(labelnames)
        self._children: dict[tuple[str, ...], _Value] = {}
        # Unlabelled: its one series, there (at 0) from the start, as prometheus_client's is.
        self._only = None if self.labelnames else self.labels()
        registry.register(self)

    def labels(self, *values: str) -> _Value:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}")
            child = self._children[values] = _Value()
        return child

    def inc(self, amount: float = 1.0) -> None:
        if self._only is None:
            raise ValueError(f"{self.name}: give the labels {self.labelnames}")
        self._only.value += amount

    def collect(self) -> list[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in self._children.items():
            family.add_metric(list(values), child.value)
        return [family]


class Histogram:
    """A histogram for code that runs on one thread (the event loop): see ``Counter``."""

    def __init__(
        self,
        name: str,
        documentation: str,
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = list(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0
        registry.register(self)

    def observe(self, value: float) -> None:
        # The first bound at or above the value: Prometheus buckets are "less or equal".
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def observe_many(self, values: Iterable[float]) -> None:
        counts, bounds, first_at_or_above = self.counts, self.bounds, bisect.bisect_left
        total = 0.0
        for value in values:
            counts[first_at_or_above(bounds, value)] += 1
            total += value
        self.sum += total

    def collect(self) -> list[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation)
        bounds = [*self.bounds, math.inf]
        cumulative = itertools.accumulate(self.counts)
        family.add_metric(
            [],
            [(_le(b), float(c)) for b, c in zip(bounds, cumulative, strict=True)],
            self.sum,
        )
        return [family]


def _le(bound: float) -> str:
    """A bucket's bound as prometheus_client writes it ("0.5", "+Inf")."""
    return floatToGoString(bound)  # type: ignore[no-untyped-call,no-any-return]


class Metrics:
    """Every metric lastseen exports, named ``lastseen_*``."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        # CPU, RSS, open file descriptors: lastseen_process_*, one set per process.
        ProcessCollector(namespace="lastseen", registry=r)
        self.build_info = Gauge(
            "lastseen_build_info",
            "Always 1; the labels say which lastseen runs",
            ["version", "python"],
            registry=r,
        )
        self.build_info.labels(__version__, platform.python_version()).set(1)
        # Ingest.
        self.callbacks_received = Counter(
            "lastseen_callbacks_received", "Callbacks acknowledged with 202", registry=r
        )
        self.callbacks_rejected = Counter(
            "lastseen_callbacks_rejected", "Callbacks refused, by reason", ["reason"], registry=r
        )
        self.ids_received = Counter(
            "lastseen_ids_received",
            "Ids in acknowledged callbacks, duplicates included",
            registry=r,
        )
        self.commit_batch = Histogram(
            "lastseen_commit_batch_size", "Callbacks per group commit", buckets=SIZES, registry=r
        )
        self.commit_seconds = Histogram(
            "lastseen_commit_seconds", "Duration of one group commit", buckets=FAST, registry=r
        )
        self.reply_seconds = Histogram(
            "lastseen_reply_seconds", "POST /callback reply time", buckets=FAST, registry=r
        )
        self.clients_limited = Counter(
            "lastseen_client_rate_limited",
            "Callbacks refused with 429 by the per-client rate limit, by client (a bearer "
            "token's digest or an address; the first 100 clients, then other)",
            ["client"],
            registry=r,
        )
        # The spool (a local store while PostgreSQL is unreachable).
        self.spool_depth = Gauge(
            "lastseen_spool_callbacks", "Callbacks in this instance's spool", registry=r
        )
        self.spool_bytes = Gauge(
            "lastseen_spool_bytes",
            "Bytes of callbacks in this instance's spool (the bound's measure)",
            registry=r,
        )
        self.spool_oldest_age = Gauge(
            "lastseen_spool_oldest_age_seconds",
            "Age of the oldest callback in this instance's spool (0 when empty)",
            registry=r,
        )
        self.callbacks_spooled = Counter(
            "lastseen_callbacks_spooled", "Callbacks acknowledged from the spool", registry=r
        )
        self.callbacks_drained = Counter(
            "lastseen_callbacks_drained", "Spooled callbacks moved into the inbox", registry=r
        )
        self.spooling = Gauge(
            "lastseen_spooling",
            "1 while this instance stores callbacks in its spool (the database is unreachable)",
            registry=r,
        )
        # Inbox and workers.
        self.inbox_pending = Gauge(
            "lastseen_inbox_pending", "Callbacks not done yet (all instances)", registry=r
        )
        self.inbox_oldest_age = Gauge(
            "lastseen_inbox_oldest_pending_age_seconds",
            "Age of the oldest callback not done yet",
            registry=r,
        )
        self.clock_skew = Gauge(
            "lastseen_clock_skew_seconds",
            "This host's clock minus PostgreSQL's: the correction the instance applies (its "
            "receive times and TTL cutoffs are in PostgreSQL's time)",
            registry=r,
        )
        self.worker_processes_up = Gauge(
            "lastseen_worker_processes_up",
            "Worker processes of this instance whose metrics this scrape could read",
            registry=r,
        )
        self.worker_process_restarts = Counter(
            "lastseen_worker_process_restarts",
            "Worker processes of this instance started again after they exited",
            registry=r,
        )
        self.callbacks_claimed = Counter(
            "lastseen_callbacks_claimed", "Callbacks leased by this instance", registry=r
        )
        self.callbacks_completed = Counter(
            "lastseen_callbacks_completed", "Callbacks marked done by this instance", registry=r
        )
        self.callbacks_expired = Counter(
            "lastseen_callbacks_expired",
            "Callbacks completed without lookups: older than the TTL when their turn came",
            registry=r,
        )
        self.callbacks_active = Gauge(
            "lastseen_callbacks_active", "Callbacks this instance holds unfinished", registry=r
        )
        # Lookups.
        self.lookups_in_flight = Gauge(
            "lastseen_lookups_in_flight", "Upstream requests under way", registry=r
        )
        self.lookups = Counter(
            "lastseen_lookups", "Finished lookups, by outcome", ["outcome"], registry=r
        )
        self.lookup_seconds = Histogram(
            "lastseen_lookup_seconds",
            "Upstream request duration (requests that reached the upstream; not failed connects)",
            buckets=SLOW,
            registry=r,
        )
        self.lookup_retries = Counter(
            "lastseen_lookup_retries", "Lookup attempts retried, by reason", ["reason"], registry=r
        )
        self.dead_letters_pending = Gauge(
            "lastseen_dead_letters_pending",
            "Dead letters stored, by reason (all instances: take the max over instances)",
            ["reason"],
            registry=r,
        )
        self.dead_letters = Counter(
            "lastseen_dead_letters", "Ids dead-lettered, by reason", ["reason"], registry=r
        )
        self.ids_expired = Counter(
            "lastseen_ids_expired",
            "Callback ids completed without an answer because none came while it could matter"
            " (within the TTL), by the last failure's reason",
            ["reason"],
            registry=r,
        )
        self.upstream_outage = Gauge(
            "lastseen_upstream_outage",
            "1 while this process sees the upstream failing broadly and holds its lookups",
            registry=r,
        )
        self.upstream_failure = Gauge(
            "lastseen_upstream_failure",
            "1, labelled with the cause of the last failed lookup, while lookups are held (the"
            " upstream outage)",
            ["cause"],
            registry=r,
        )
        self.coalesced = Counter(
            "lastseen_lookups_coalesced",
            "Callback ids served by a lookup that was already under way",
            registry=r,
        )
        # Results.
        self.results_batch = Histogram(
            "lastseen_results_batch_size", "Results per write", buckets=SIZES, registry=r
        )
        self.objects_upserted = Counter(
            "lastseen_objects_upserted", "Object rows inserted or moved forward", registry=r
        )
        self.objects_deleted = Counter(
            "lastseen_objects_deleted", "Object rows deleted, by cause", ["cause"], registry=r
        )
        self.reaper_failures = Counter(
            "lastseen_reaper_rounds_failed",
            "Reaper rounds the database refused or did not answer (rounds back off meanwhile)",
            registry=r,
        )
        self.result_lag = Histogram(
            "lastseen_result_lag_seconds",
            "From callback receipt to its result written",
            buckets=SLOW,
            registry=r,
        )
        self.lag_over_upstream = Histogram(
            "lastseen_lag_over_upstream_seconds",
            "Result lag minus the upstream's own latency for that lookup",
            buckets=LAG,
            registry=r,
        )
        self.objects_online = Gauge(
            "lastseen_objects_online", "Rows in the objects table", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Fixed:
    """A collector that yields metric families it was given."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def _per_process(name: str) -> bool:
    return name.startswith("lastseen_process_") or name == "lastseen_build_info"


def merge(texts: Sequence[tuple[str, str]]) -> bytes:
    """Several processes' exposition texts, each named by its process, as one.

    Each sample is summed over the processes, which is right for every lastseen metric:
    counters and histograms add up, the gauges that count things in flight add up, and the
    gauges sampled from the database are set only by the front-door process (0 in the
    workers). The process metrics (``lastseen_process_*``, ``lastseen_build_info``) are not
    summed: each process's keep a ``process`` label.
    """
    families: dict[str, Metric] = {}
    sums: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for process, text in texts:
        for family in text_string_to_metric_families(text):
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                sums[family.name] = {}
            for sample in family.samples:
                labels = dict(sample.labels)
                if _per_process(family.name):
                    labels["process"] = process
                key = (sample.name, tuple(sorted(labels.items())))
                sums[family.name][key] = sums[family.name].get(key, 0.0) + sample.value
    for name, family in families.items():
        for (sample_name, pairs), value in sums[name].items():
            family.add_sample(sample_name, dict(pairs), value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(list(families.values())))
    return generate_latest(registry)
