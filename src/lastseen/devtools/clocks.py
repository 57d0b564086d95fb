"""A host's clock that is off: for measuring and testing what a skew between instances does."""

from __future__ import annotations

from lastseen.core.clock import Clock


class ShiftedClock(Clock):
    """The system's clocks with the wall clock ``by`` seconds ahead (behind, if negative), as
    on a host whose NTP is off."""

    def __init__(self, by: float) -> None:
        self.by = by

    def wall(self) -> float:
        return super().wall() + self.by
