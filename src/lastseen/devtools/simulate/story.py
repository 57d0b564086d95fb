"""The demo's story: a producer and an upstream that change over time, so that one run shows the
whole life of an object.

Its clock starts with the producer's first callback; times are measured in the service's TTL
``T`` and the producer's ``period``. Every ``period`` (tick ``k`` at ``k * period``) the
producer sends one callback naming:

- the *steady* ids, always online: rows that stay, their ``last_seen`` moving on;
- the *leaving* ids while ``t <= T/3``, then never again: deleted a TTL after they were last
  seen (about ``T/3 + T``);
- the *going offline* ids throughout, online until ``2T/3`` and offline after: the first
  lookup after that deletes their rows at once (they go on arriving, without a row);
- the *dead letter* id in the first callback only: the upstream answers it 400 until ``T/3``;
  the demo retries the dead letter at ``T/2`` (``POST /dead-letters/retry``), the good answer
  lands and makes a row with the original ``last_seen``, which then expires at about ``T``.

Every third tick, from the second, is a *burst*: the same callback ``BURST`` times at once. The
copies are received before their lookups go out, so each id is looked up once for all of them
(``lastseen_lookups_coalesced_total``).

Everything is due by ``settled_at`` (the leaving ids' expiry, with margins); the demo runs
``length`` (``2T``) by default and expects, when it ran that long, both kinds of deletion.
"""

from __future__ import annotations

import dataclasses
import math

STEADY = (10, 11, 12, 13, 14, 15)
LEAVING = (20, 21, 22)
GOING_OFFLINE = (30, 31, 32)
DEAD_LETTER = 50
BURST = 3


@dataclasses.dataclass
class Story:
    """The timeline of one run; ``begin`` starts its clock (wall-clock seconds)."""

    ttl: float
    period: float
    started: float | None = None

    def begin(self, now: float) -> None:
        self.started = now

    def elapsed(self, now: float) -> float | None:
        return None if self.started is None else now - self.started

    @property
    def leave_at(self) -> float:
        return self.ttl / 3

    @property
    def offline_at(self) -> float:
        return 2 * self.ttl / 3

    @property
    def heal_at(self) -> float:
        return self.ttl / 3

    @property
    def retry_at(self) -> float:
        return self.ttl / 2

    @property
    def settled_at(self) -> float:
        """When every deletion of the story is due: the leaving ids' last tick plus the TTL,
        with a period (and a second) of margin for a slow machine."""
        last_tick = math.floor(self.leave_at / self.period) * self.period if self.period else 0
        return last_tick + self.ttl + self.period + 1.0

    @property
    def length(self) -> float:
        """The demo's default duration: past ``settled_at`` with margin to spare."""
        return max(2 * self.ttl, self.settled_at + self.period)

    def callbacks(self, tick: int) -> list[list[int]]:
        """The callbacks of tick ``tick``, sent at once: one, or ``BURST`` alike."""
        t = tick * self.period
        ids = [*STEADY, *GOING_OFFLINE]
        if t <= self.leave_at:
            ids += LEAVING
        if tick == 0:
            return [[*ids, DEAD_LETTER]]
        copies = BURST if tick % 3 == 1 else 1
        return [list(ids) for _ in range(copies)]

    def online(self, object_id: int, now: float) -> bool:
        """The upstream's rule: every id online, but the going-offline ones after
        ``offline_at``."""
        t = self.elapsed(now)
        return not (object_id in GOING_OFFLINE and t is not None and t >= self.offline_at)

    def fault(self, object_id: int, now: float) -> str | None:
        """The upstream's scripted faults: 400 for the dead-letter id until ``heal_at``."""
        t = self.elapsed(now)
        if object_id == DEAD_LETTER and (t is None or t < self.heal_at):
            return "invalid_400"
        return None

    def lines(self) -> list[str]:
        """The timeline, for the screen."""

        def ids(group: tuple[int, ...]) -> str:
            return ", ".join(map(str, group))

        def s(seconds: float) -> str:
            return f"{seconds:.3g} s"

        return [
            f"story (TTL {s(self.ttl)}, a callback every {s(self.period)}, "
            f"{s(self.length)} in all):",
            f"  objects {ids(STEADY)} arrive throughout and stay online",
            f"  objects {ids(LEAVING)} stop arriving at {s(self.leave_at)}: deleted a TTL "
            f"later (by {s(self.settled_at)})",
            f"  objects {ids(GOING_OFFLINE)} go offline at {s(self.offline_at)}: deleted at "
            "their next lookup",
            f"  object {DEAD_LETTER}: answered 400 (a dead letter) until {s(self.heal_at)}, "
            f"retried at {s(self.retry_at)}",
            f"  every third callback comes {BURST} times at once: its lookups coalesce",
        ]
