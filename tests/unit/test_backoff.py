"""The one exponential backoff (core/backoff.py)."""

from __future__ import annotations

import random

import pytest

from lastseen.core.backoff import backoff


def test_the_delay_doubles_from_the_base_up_to_the_cap() -> None:
    assert [backoff(n, 0.1, 1.0) for n in range(1, 7)] == pytest.approx(
        [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    )


def test_a_huge_attempt_number_is_the_cap() -> None:
    """No overflow after days of failures."""
    assert backoff(100_000, 0.1, 30.0) == 30.0


def test_jitter_spreads_the_delays_over_the_upper_half() -> None:
    """Waiters that failed together come back spread over [d/2, d], not together."""
    random.seed(1)
    delays = [backoff(3, 0.1, 1.0, jitter=True) for _ in range(1000)]
    assert min(delays) >= 0.2
    assert max(delays) <= 0.4
    assert min(delays) < 0.21
    assert max(delays) > 0.39
