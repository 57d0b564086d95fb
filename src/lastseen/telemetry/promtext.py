"""Readings of Prometheus metrics: one parser (of exposition text, or of a registry in this
process) and one histogram quantile, shared by the status page, the benchmark and the demo's
dashboard.

A quantile over a time window is taken as Prometheus' ``histogram_quantile`` does: the bucket
counts of the newer reading minus those of the older one, interpolated linearly within the
bucket that holds the rank. It is only as precise as the buckets (metrics.py) are fine.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

# (upper bound, cumulative count) of a histogram, in order, +Inf last.
Buckets = list[tuple[float, float]]
_Key = tuple[str, tuple[tuple[str, str], ...]]


class Reading:
    """Every sample of one reading, by name and labels, and when it was taken."""

    def __init__(self, families: Iterable[Metric], at: float | None = None) -> None:
        self.at = time.monotonic() if at is None else at
        self.values: dict[_Key, float] = {}
        for family in families:
            for sample in family.samples:
                self.values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    @classmethod
    def of_text(cls, text: str, at: float | None = None) -> Reading:
        return cls(text_string_to_metric_families(text), at)

    @classmethod
    def of_registry(cls, registry: CollectorRegistry, at: float | None = None) -> Reading:
        return cls(registry.collect(), at)

    @classmethod
    def summed(cls, readings: Iterable[Reading], at: float | None = None) -> Reading:
        """Several processes' readings as one, each sample summed (as ``/metrics`` merges them)."""
        total = cls((), at)
        for reading in readings:
            for key, value in reading.values.items():
                total.values[key] = total.values.get(key, 0.0) + value
        return total

    def get(self, name: str, **labels: str) -> float:
        return self.values.get((name, tuple(sorted(labels.items()))), 0.0)

    def total(self, name: str) -> float:
        """Sum over every label value of ``name``."""
        return sum(v for (n, _), v in self.values.items() if n == name)

    def by_label(self, name: str, label: str) -> dict[str, float]:
        """The samples of ``name`` by the value of its ``label``."""
        return {
            dict(labels)[label]: v
            for (n, labels), v in self.values.items()
            if n == name and label in dict(labels)
        }

    def buckets(self, name: str) -> Buckets:
        """The buckets of histogram ``name`` (without the ``_bucket`` suffix)."""
        found = [
            (float(dict(labels)["le"]), value)
            for (n, labels), value in self.values.items()
            if n == name + "_bucket"
        ]
        return sorted(found)


def since(after: Buckets, before: Buckets | None) -> Buckets:
    """The observations between two readings of one histogram."""
    if not before or [b for b, _ in before] != [b for b, _ in after]:
        return after
    return [(bound, a - b) for (bound, a), (_, b) in zip(after, before, strict=True)]


def quantile(buckets: Buckets, q: float) -> float | None:
    """The ``q`` (0-1) quantile of a histogram's observations; None when it has none. In the
    +Inf bucket, the highest finite bound."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    below = lower = 0.0
    for bound, count in buckets:
        if count >= rank and count > below:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / (count - below)
        below, lower = count, bound
    return lower
