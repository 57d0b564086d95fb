"""The reaper: deletes objects last seen more than the TTL ago, and prunes old bookkeeping
(done callbacks, observations too old to matter, dead letters past their retention).

The rule: an object goes when its ``last_seen`` is older than the TTL, unless a callback that
names it was received within the TTL and is still pending (in a backlog, or being looked up).
Then its own result decides: online moves ``last_seen`` forward, offline deletes the row. Without
this, a backlog would make objects blink out and back in.

Cost. A round's cost follows what arrived since the last one, not the backlog: the reaper notes
each pending callback's ids once, soon after it commits (``pending_ids``), and an expired object
it finds named there is marked with that callback's receive time (``kept_for``) instead of being
examined again every round; a result or a dead letter for it clears the mark. Migration 0004
says how.

Stale callbacks. A pending callback that is not leased and is older than the TTL is completed
without lookups (``lastseen_callbacks_expired_total``): its result could create no row. So
after an outage or a burst, the upstream's capacity goes to callbacks that can still matter.

One reaper works at a time across instances (a transaction-scoped advisory lock); the others
find the lock taken and skip that round, so a dead instance's reaper is replaced at once.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import structlog

from lastseen.core.backoff import backoff
from lastseen.core.clock import SYSTEM, Clock
from lastseen.core.errors import DatabaseError
from lastseen.storage.database import Database
from lastseen.telemetry.metrics import Metrics

log = structlog.get_logger("lastseen.pipeline.reaper")

REAP_LIMIT = 10_000
PRUNE_LIMIT = 10_000
STALE_LIMIT = 10_000
FAILED_ROUNDS_MAX = 2.0  # s: the longest wait between rounds the database refused


def _at(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


class Reaper:
    def __init__(
        self,
        db: Database,
        metrics: Metrics,
        *,
        ttl: float,
        interval: float,
        audit_retention: float,
        dead_letter_retention: float,
        prune_interval: float,
        idempotency_retention: float,
        clock: Clock = SYSTEM,
    ) -> None:
        self.db = db
        self.clock = clock
        self.metrics = metrics
        self.ttl = ttl
        self.interval = interval
        self.audit_retention = audit_retention
        self.dead_letter_retention = dead_letter_retention
        self.prune_interval = prune_interval
        self.idempotency_retention = idempotency_retention

    async def expire_stale(self) -> int:
        """Completes unclaimed callbacks older than the TTL, up to ``STALE_LIMIT``."""
        expired = await self.db.expire_stale_callbacks(
            _at(self.clock.wall() - self.ttl), STALE_LIMIT
        )
        if expired:
            self.metrics.callbacks_expired.inc(expired)
        return expired

    async def reap_once(self) -> tuple[int, int] | None:
        """One round: (objects deleted, objects kept for a pending callback), or None if
        another instance reaps."""
        reaped = await self.db.reap(_at(self.clock.wall() - self.ttl), REAP_LIMIT)
        if reaped and reaped[0]:
            self.metrics.objects_deleted.labels("expired").inc(reaped[0])
        return reaped

    async def prune_once(self) -> tuple[int, int, int, int]:
        """One prune of each kind (done callbacks, observations, dead letters, idempotency
        keys), up to ``PRUNE_LIMIT`` rows each."""
        now = self.clock.wall()
        return await self.db.prune(
            _at(now - self.audit_retention),
            _at(now - self.ttl),
            _at(now - self.dead_letter_retention),
            _at(now - self.idempotency_retention),
            PRUNE_LIMIT,
        )

    async def run(self) -> None:
        """Reaps every ``interval`` and prunes every ``prune_interval``, until cancelled."""
        next_prune = self.clock.monotonic() + self.prune_interval
        failures = 0
        while True:
            examined = expired = 0
            try:
                expired = await self.expire_stale()
                reaped = await self.reap_once()
                examined = sum(reaped) if reaped else 0
                if self.clock.monotonic() >= next_prune:
                    pruned = await self.prune_once()
                    if any(pruned):
                        callbacks, observations, dead, keys = pruned
                        log.info(
                            "pruned",
                            callbacks=callbacks,
                            observations=observations,
                            dead_letters=dead,
                            idempotency_keys=keys,
                        )
                    # A full round means more is waiting: prune again next time round, so
                    # pruning keeps up with any ingest rate.
                    full = PRUNE_LIMIT in pruned
                    next_prune = self.clock.monotonic() + (0 if full else self.prune_interval)
            except DatabaseError as exc:
                # A database away or read-only refuses every round: said once, then rounds
                # back off (to at most FAILED_ROUNDS_MAX: expiry resumes soon after it is back).
                failures += 1
                self.metrics.reaper_failures.inc()
                if failures == 1:
                    log.warning("reaper round failed; retrying", error=str(exc))
                await asyncio.sleep(backoff(failures, self.interval, FAILED_ROUNDS_MAX))
                continue
            if failures:
                log.info("reaper rounds succeed again", failed_rounds=failures)
                failures = 0
            if examined != REAP_LIMIT and expired != STALE_LIMIT:
                await asyncio.sleep(self.interval)
