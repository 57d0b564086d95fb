"""The worker: claims callbacks from the inbox and hands each distinct id to the lookups.

It wakes at once on a notification from the group commit (LISTEN/NOTIFY), or when held
callbacks finish and make room, and it also polls, so a lost notification, or a lapsed lease of
a crashed worker, only delays work. It claims while its callbacks hold fewer distinct ids than
it can finish in half a TTL at the rate it has been finishing them (at least ``min_active_ids``,
at most ``max_active_ids``; so it holds at most that plus one claim batch); the rest wait in
the inbox, where the reaper expires in bulk what ages past the TTL, and whence the newest are
claimed first. A worker that held more than it can finish within the TTL would keep every new
callback waiting behind work that expires in its hands (an overload benchmark: freshness came
back 80 s after the load dropped, with 400,000 ids held). A callback claimed ``max_claims``
times before (each claim ended by a crash or a lost lease) is set aside as poison instead of
being worked on again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import asyncpg
import structlog

from lastseen.core.clock import SYSTEM, Clock
from lastseen.core.errors import DatabaseError
from lastseen.core.model import Claimed, HeldCallback
from lastseen.pipeline.leases import HeldCallbacks, Leases
from lastseen.storage.database import Database
from lastseen.telemetry.metrics import Metrics

log = structlog.get_logger("lastseen.pipeline.worker")


class Worker:
    def __init__(
        self,
        db: Database,
        leases: Leases,
        held: HeldCallbacks,
        wake: asyncio.Event,
        *,
        look_up: Callable[[HeldCallback, int], None],
        done: Callable[[int], None],
        set_aside: Callable[[HeldCallback, list[int], str, str], None],
        max_active_ids: int,
        min_active_ids: int,
        max_claims: int,
        ttl: float,
        poll_interval: float,
        metrics: Metrics,
        clock: Clock = SYSTEM,
    ) -> None:
        """``look_up(callback, id)`` takes each distinct id of a claimed callback; ``done``
        takes a callback with no ids at all; ``set_aside(callback, ids, reason, detail)`` one that
        must not be worked on. ``wake`` is set by whatever makes work claimable or makes room:
        a notification, held callbacks finishing."""
        self.db = db
        self.leases = leases
        self.held = held
        self.wake = wake
        self.look_up = look_up
        self.done = done
        self.set_aside = set_aside
        self.max_active_ids = max_active_ids
        self.min_active_ids = min(min_active_ids, max_active_ids)
        self.clock = clock
        self._rate = 0.0  # distinct ids finished per second, smoothed
        self._since = (clock.monotonic(), 0)
        self.max_claims = max_claims
        self.ttl = ttl
        self.metrics = metrics
        self.poll_interval = poll_interval
        self._listener: asyncpg.Connection | None = None
        self._claiming = True

    async def run(self) -> None:
        """Claims work until cancelled or ``stop_claiming``."""
        await self.leases.take_back()
        while self._claiming:
            # Cleared before the claim: a notification during the claim means another round.
            self.wake.clear()
            await self._ensure_listener()
            if not self._claiming:
                break
            room = self.budget() > self.held.ids
            claimed: list[Claimed] = []
            if room:
                try:
                    claimed = await self.leases.claim()
                except DatabaseError as exc:
                    # Unreachable, a deadlock, a read-only failover: try again at the next poll.
                    log.warning("could not claim callbacks", error=str(exc))
                for callback in claimed:
                    self.start(callback)
            if len(claimed) == self.leases.batch:
                continue  # there may be more waiting
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.poll_interval)

    def budget(self) -> int:
        """How many distinct ids this worker may hold: what it finishes in half a TTL."""
        now = self.clock.monotonic()
        then, finished = self._since
        if now - then >= 1.0:
            rate = (self.held.finished_ids - finished) / (now - then)
            self._rate = rate if not self._rate else 0.7 * self._rate + 0.3 * rate
            self._since = (now, self.held.finished_ids)
        budget = int(self._rate * self.ttl / 2)
        return max(self.min_active_ids, min(self.max_active_ids, budget))

    async def _ensure_listener(self) -> None:
        if self._listener is not None and not self._listener.is_closed():
            return
        try:
            self._listener = await self.db.listen("lastseen_inbox", self.wake.set)
        except DatabaseError as exc:
            self._listener = None
            log.warning("cannot listen for new callbacks; polling", error=str(exc))

    def start(self, claimed: Claimed) -> None:
        """Works on a claimed callback: its distinct ids to the lookups, or done at once, or
        set aside."""
        if claimed.id in self.held:
            return  # our lease lapsed and we claimed it again; we are still on it
        # A callback is stored as received; one lookup per distinct id is enough.
        distinct = list(dict.fromkeys(claimed.object_ids))
        received_at = claimed.received_at
        callback = HeldCallback(
            claimed.id, received_at, received_at.timestamp(), len(distinct), len(distinct)
        )
        self.held.add(callback)
        if claimed.claims > self.max_claims:
            log.error("callback set aside as poison", callback_id=claimed.id, claims=claimed.claims)
            detail = f"claimed {claimed.claims} times without finishing"
            self.set_aside(callback, distinct, "poison", detail)
            return
        if not distinct or callback.received_ts < self.clock.wall() - self.ttl:
            # Nothing to look up, or too old for any result to create a row (a callback handed
            # back after its TTL): done without lookups.
            if distinct:
                self.metrics.callbacks_expired.inc()
            self.done(callback.id)
            return
        for object_id in distinct:
            self.look_up(callback, object_id)

    def stop_claiming(self) -> None:
        self._claiming = False
        self.wake.set()

    async def close(self) -> None:
        if self._listener is not None:
            try:
                await asyncio.wait_for(self._listener.close(), 2)
            except (TimeoutError, OSError, asyncpg.InterfaceError):
                self._listener.terminate()
            self._listener = None
