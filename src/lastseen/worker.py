"""The worker: claims callbacks from the inbox, looks their ids up, hands outcomes to the writer.

It wakes at once on a notification from the group commit (LISTEN/NOTIFY) and also polls, so a
lost notification, or a lapsed lease of a crashed worker, only delays work. It holds at most
``max_active_callbacks`` unfinished callbacks in memory; the rest wait in the inbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Sequence

import asyncpg
import structlog

from lastseen.db import Claimed, Database, DeadLetter
from lastseen.errors import DatabaseError
from lastseen.inbox import Leases
from lastseen.lookups import Job, Lookup, Lookups, Outcome
from lastseen.metrics import Metrics
from lastseen.results import ResultWriter

log = structlog.get_logger("lastseen.worker")


class Worker:
    def __init__(
        self,
        db: Database,
        metrics: Metrics,
        leases: Leases,
        *,
        max_active: int,
        poll_interval: float,
    ) -> None:
        self.db = db
        self.metrics = metrics
        self.leases = leases
        self.max_active = max_active
        self.poll_interval = poll_interval
        self.jobs: dict[int, Job] = {}
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()  # set when the last held callback is done
        self._listener: asyncpg.Connection | None = None
        self._claiming = True
        # Wired by the composition root (they need each other's callbacks).
        self.lookups: Lookups
        self.results: ResultWriter

    @staticmethod
    def new_id() -> str:
        return f"worker-{uuid.uuid4().hex[:12]}"

    async def run(self) -> None:
        """Claims work until cancelled or ``stop_claiming``."""
        while self._claiming:
            # Cleared before the claim: a notification during the claim means another round.
            self._wake.clear()
            await self._ensure_listener()
            if not self._claiming:
                break
            room = self.max_active - len(self.jobs)
            claimed: list[Claimed] = []
            if room > 0:
                try:
                    claimed = await self.leases.claim(room)
                except DatabaseError as exc:
                    # Unreachable, a deadlock, a read-only failover: try again at the next poll.
                    log.warning("could not claim callbacks", error=str(exc))
                for callback in claimed:
                    self._start(callback)
            if claimed and len(claimed) == min(room, self.leases.batch):
                continue  # there may be more waiting
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)

    async def _ensure_listener(self) -> None:
        if self._listener is not None and not self._listener.is_closed():
            return
        try:
            self._listener = await self.db.listen("lastseen_inbox", self._wake.set)
        except DatabaseError as exc:
            self._listener = None
            log.warning("cannot listen for new callbacks; polling", error=str(exc))

    def _start(self, callback: Claimed) -> None:
        if callback.id in self.jobs:
            return  # our lease lapsed and we claimed it again; we are still on it
        # A callback is stored as received; one lookup per distinct id is enough.
        distinct = list(dict.fromkeys(callback.object_ids))
        job = Job(callback.id, callback.received_at, callback.received_at.timestamp(), 0)
        job.remaining = len(distinct)
        self.metrics.callbacks_claimed.inc()
        if not job.remaining:
            self.results.add_done(job.id)
        self.jobs[job.id] = job
        self.metrics.callbacks_active.set(len(self.jobs))
        for object_id in distinct:
            self.lookups.add(job, object_id)

    def deliver(self, lookup: Lookup, outcome: Outcome) -> None:
        """A lookup's outcome, for every job it served."""
        if isinstance(outcome, bool):
            newest = max(lookup.jobs, key=lambda job: job.received_ts)
            self.results.add_result(
                lookup.object_id,
                newest.received_at,
                outcome,
                [job.received_ts for job in lookup.jobs],
                lookup.latency,
            )
        else:
            self.metrics.dead_letters.labels(outcome.reason).inc(len(lookup.jobs))
            log.warning(
                "lookup dead-lettered",
                object_id=lookup.object_id,
                reason=outcome.reason,
                detail=outcome.detail,
                attempts=lookup.attempts,
                callbacks=len(lookup.jobs),
            )
            self.results.add_dead_letters(
                [
                    DeadLetter(
                        job.id,
                        lookup.object_id,
                        job.received_at,
                        outcome.reason,
                        outcome.detail,
                        lookup.attempts,
                    )
                    for job in lookup.jobs
                ]
            )
        for job in lookup.jobs:
            job.remaining -= 1
            if job.remaining == 0:
                self.results.add_done(job.id)

    def done(self, ids: Sequence[int]) -> None:
        """Callbacks whose "done" is committed."""
        for callback_id in ids:
            self.jobs.pop(callback_id, None)
        self.metrics.callbacks_completed.inc(len(ids))
        self.metrics.callbacks_active.set(len(self.jobs))
        self._wake.set()  # room for more
        if not self.jobs:
            self._idle.set()

    def stop_claiming(self) -> None:
        self._claiming = False
        self._wake.set()

    async def drain(self, grace: float) -> None:
        """Waits up to ``grace`` seconds for the held callbacks to finish."""
        if self.jobs:
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace)

    async def close(self) -> None:
        if self._listener is not None:
            try:
                await asyncio.wait_for(self._listener.close(), 2)
            except (TimeoutError, OSError, asyncpg.InterfaceError):
                self._listener.terminate()
            self._listener = None
