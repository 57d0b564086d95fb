"""The tools' readings of Prometheus metrics: parsing, percentiles and histogram quantiles."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from lastseen.devtools.loadgen import percentile
from lastseen.telemetry.promtext import Reading, quantile, since


def test_quantiles_come_from_bucket_counts() -> None:
    """Quantiles interpolate linearly within the bucket holding the rank, like Prometheus'
    histogram_quantile; none without observations; the highest finite bound past the last."""
    buckets = [(0.1, 2.0), (0.5, 5.0), (1.0, 5.0), (math.inf, 5.0)]
    assert quantile(buckets, 0.5) == pytest.approx(0.1 + 0.4 * (0.5 / 3))
    assert quantile(buckets, 0.2) == pytest.approx(0.05)
    assert quantile([(0.1, 0.0), (math.inf, 0.0)], 0.5) is None
    assert quantile([(0.1, 1.0), (math.inf, 4.0)], 0.99) == 0.1
    assert quantile([], 0.5) is None


def test_quantiles_over_a_window_use_the_difference_of_two_readings() -> None:
    """Between two readings only the observations made in between count."""
    before = [(0.1, 0.0), (1.0, 0.0), (math.inf, 0.0)]
    after = [(0.1, 50.0), (1.0, 100.0), (math.inf, 100.0)]
    assert quantile(since(after, before), 0.5) == pytest.approx(0.1)
    assert quantile(since(after, before), 0.75) == pytest.approx(0.55)
    assert quantile(since(before, before), 0.5) is None
    assert since(after, None) == after


def test_a_registry_and_its_text_read_the_same() -> None:
    """Reading a registry in this process and reading its exposition text give the same
    samples, totals over labels, values by label, and buckets."""
    registry = CollectorRegistry()
    histogram = Histogram("h_seconds", "test", buckets=(0.01, 0.1, 1.0), registry=registry)
    for value in [0.005] * 50 + [0.05] * 49 + [0.5]:
        histogram.observe(value)
    counter = Counter("c", "test", ["reason"], registry=registry)
    counter.labels("a").inc(2)
    counter.labels("b").inc(3)
    for reading in (
        Reading.of_registry(registry),
        Reading.of_text(generate_latest(registry).decode()),
    ):
        assert reading.buckets("h_seconds") == [
            (0.01, 50.0),
            (0.1, 99.0),
            (1.0, 100.0),
            (math.inf, 100.0),
        ]
        assert quantile(reading.buckets("h_seconds"), 0.5) == pytest.approx(0.01)
        assert quantile(reading.buckets("h_seconds"), 0.99) == pytest.approx(0.1)
        assert reading.total("c_total") == 5
        assert reading.get("c_total", reason="b") == 3
        assert reading.by_label("c_total", "reason") == {"a": 2, "b": 3}
        assert reading.get("missing") == 0


def test_nearest_rank_percentiles() -> None:
    """The load generator's percentiles are nearest-rank over the raw latencies."""
    assert percentile([], 99) == 0.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile(list(range(1, 101)), 99) == 99
