"""lastseen's lock-free counters and histograms export exactly what prometheus_client's do."""

from __future__ import annotations

import prometheus_client
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from lastseen.telemetry.metrics import FAST, Counter, Histogram

values = st.lists(st.floats(min_value=0, max_value=100, allow_nan=False), max_size=50)


@given(observed=values, split=st.integers(min_value=0, max_value=50))
def test_a_histogram_exports_what_prometheus_clients_does(
    observed: list[float], split: int
) -> None:
    """The same observations, one at a time or in bulk (bounds included: a value equal to a
    bound falls in that bound's bucket), give the same exposition text."""
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    mine = Histogram("x_seconds", "doc", buckets=FAST, registry=ours)
    reference = prometheus_client.Histogram("x_seconds", "doc", buckets=FAST, registry=theirs)
    for value in [*observed, *FAST]:
        reference.observe(value)
    for value in observed[:split]:
        mine.observe(value)
    mine.observe_many([*observed[split:], *FAST])
    got, expected = _samples(ours), _samples(theirs)
    assert got.pop("x_seconds_sum") == pytest.approx(expected.pop("x_seconds_sum"))
    assert got == expected


def test_a_counter_exports_what_prometheus_clients_does() -> None:
    """Labelled and unlabelled counters: the same samples, the unlabelled one there at 0 from
    the start; an unlabelled increment of a labelled counter is refused."""
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    plain = Counter("calls", "doc", registry=ours)
    by = Counter("outcomes", "doc", ["outcome"], registry=ours)
    plain_ref = prometheus_client.Counter("calls", "doc", registry=theirs)
    by_ref = prometheus_client.Counter("outcomes", "doc", ["outcome"], registry=theirs)
    assert _samples(ours) == _samples(theirs)
    for counter, labelled in ((plain, by), (plain_ref, by_ref)):
        counter.inc()
        counter.inc(2.5)
        labelled.labels("online").inc()
        labelled.labels("failed").inc(3)
    assert _samples(ours) == _samples(theirs)
    with pytest.raises(ValueError, match="labels"):
        by.inc()


def _samples(registry: CollectorRegistry) -> dict[str, float]:
    lines = generate_latest(registry).decode().splitlines()
    pairs = (line.rsplit(" ", 1) for line in lines if not line.startswith("#"))
    return {name: float(value) for name, value in pairs if "_created" not in name}
