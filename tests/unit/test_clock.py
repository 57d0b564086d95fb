"""The instance's clock set to PostgreSQL's (core/clock.py DatabaseClock): which reading of
the database's clock it trusts."""

from __future__ import annotations

import pytest

from lastseen.core.clock import SKEW_READINGS, DatabaseClock, ManualClock


def test_until_a_reading_it_is_the_hosts_clock() -> None:
    host = ManualClock(wall=1000.0)
    assert DatabaseClock(host).wall() == 1000.0


def test_a_reading_sets_the_wall_clock_to_the_databases_and_leaves_monotonic_alone() -> None:
    host = ManualClock(wall=1000.0, monotonic=5.0)
    clock = DatabaseClock(host)
    # Asked at 1000.0, answered at 1000.1: the database said 998.05 about halfway.
    clock.read(1000.0, 1000.1, 998.05)
    assert clock.offset == pytest.approx(2.0)
    assert clock.error == pytest.approx(0.05)
    assert clock.wall() == pytest.approx(998.0)
    assert clock.monotonic() == 5.0


def test_the_reading_with_the_shortest_round_trip_wins() -> None:
    """A reading taken across a stalled loop (a round trip of a second, its midpoint half a
    second off) does not move the offset a quick one set."""
    clock = DatabaseClock(ManualClock())
    clock.read(100.0, 100.01, 98.005)  # offset 2.0, 10 ms round trip
    clock.read(101.0, 102.0, 99.0)  # offset 2.5, a second's round trip
    assert clock.offset == pytest.approx(2.0)
    assert clock.error == pytest.approx(0.005)


def test_old_readings_are_forgotten() -> None:
    """The host's clock stepped (NTP): once the quick reading from before the step is among
    the last ``SKEW_READINGS`` no more, the offset follows the new readings."""
    clock = DatabaseClock(ManualClock())
    clock.read(100.0, 100.001, 98.0005)  # offset 2.0, the quickest ever
    for n in range(SKEW_READINGS - 1):
        clock.read(200.0 + n, 200.02 + n, 199.01 + n)  # offset 1.0
        assert clock.offset == pytest.approx(2.0)
    clock.read(300.0, 300.02, 299.01)
    assert clock.offset == pytest.approx(1.0)
