"""The time the pipeline reads: the wall clock (receive times, the TTL's cutoff) and the
monotonic clock (rates, silences, latencies), from one object handed to each stage.

The stages never read ``time`` themselves, so a test can hand them a ``ManualClock`` and decide
when a callback ages past the TTL or an upstream has been silent long enough, in no time at all.
The event loop's timers are the loop's own; a test that moves this clock runs them on a loop
whose time is this clock's monotonic reading (tests/unit/virtual.py).
"""

from __future__ import annotations

import time


class Clock:
    """The system's clocks."""

    def wall(self) -> float:
        """Seconds since the epoch, as ``time.time()``."""
        return time.time()

    def monotonic(self) -> float:
        """Seconds from an arbitrary start that never go back, as ``time.monotonic()``."""
        return time.monotonic()


SYSTEM = Clock()


class ManualClock(Clock):
    """Clocks that stand still until ``advance`` moves both together."""

    def __init__(self, wall: float = 1_750_000_000.0, monotonic: float = 1_000.0) -> None:
        self._wall = wall
        self._monotonic = monotonic

    def wall(self) -> float:
        return self._wall

    def monotonic(self) -> float:
        return self._monotonic

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self._wall += seconds
        self._monotonic += seconds
