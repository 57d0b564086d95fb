"""The time the pipeline reads: the wall clock (receive times, the TTL's cutoff) and the
monotonic clock (rates, silences, latencies), from one object handed to each stage.

The stages never read ``time`` themselves, so a test can hand them a ``ManualClock`` and decide
when a callback ages past the TTL or an upstream has been silent long enough, in no time at all.
The event loop's timers are the loop's own; a test that moves this clock runs them on a loop
whose time is this clock's monotonic reading (tests/unit/virtual.py).
"""

from __future__ import annotations

import collections
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


SKEW_READINGS = 8  # the last readings of PostgreSQL's clock the correction chooses from


class DatabaseClock(Clock):
    """``base``'s clocks, the wall clock set to PostgreSQL's: every instance's receive times
    and TTL cutoffs then come from one clock, the database's, however far apart the hosts'
    clocks are (an ingest instance 2 s ahead of the reaper's would otherwise keep each
    object 2 s longer, and order two callbacks 2 s apart wrongly).

    Until the first reading it is ``base``'s. Each reading of PostgreSQL's clock is taken
    within a round trip; of the last ``SKEW_READINGS`` the one with the shortest round trip
    sets the offset (its error is at most half that round trip: a stalled loop or a slow
    answer cannot move it), NTP's clock filter in miniature."""

    def __init__(self, base: Clock = SYSTEM) -> None:
        self.base = base
        self.offset = 0.0  # base's wall clock minus PostgreSQL's
        self.error = float("inf")  # at most this far off: half the chosen reading's round trip
        self._readings: collections.deque[tuple[float, float]] = collections.deque(
            maxlen=SKEW_READINGS
        )

    def wall(self) -> float:
        return self.base.wall() - self.offset

    def monotonic(self) -> float:
        return self.base.monotonic()

    def read(self, sent: float, answered: float, database: float) -> None:
        """PostgreSQL's clock said ``database`` to a question sent at ``sent`` and answered at
        ``answered`` (``base``'s wall clock)."""
        round_trip = max(0.0, answered - sent)
        # The database read its clock about halfway through the round trip.
        self._readings.append((round_trip, (sent + answered) / 2 - database))
        round_trip, self.offset = min(self._readings)
        self.error = round_trip / 2
