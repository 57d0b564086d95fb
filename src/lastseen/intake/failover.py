"""The spool fail-over: whether the database is taken for unreachable, callbacks going to the
local spool meanwhile; the probe that finds the database again; and the drain of the spool
back into the inbox, in the order it filled, with the original receive times.

The group commit (group_commit.py) decides when a commit failed; this decides what follows.
Its states: committing to PostgreSQL; spooling (the database lost, the probe asking every
``probe_interval`` with a write the inbox needs, since a read-only server answers a
``SELECT 1``); draining (the database back, the spool emptied while new callbacks go to
PostgreSQL). Apart from them, whether the spool takes callbacks: after a write it refused
(full, or its disk failing), not until one works.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Protocol

import structlog

from lastseen.core.backoff import backoff
from lastseen.core.clock import SYSTEM, Clock
from lastseen.core.errors import DatabaseError, DatabaseUnavailable, SpoolFailed, SpoolFull
from lastseen.intake.drain import drain_batch
from lastseen.intake.spool import Spool
from lastseen.storage.database import Database
from lastseen.telemetry.metrics import Metrics

log = structlog.get_logger("lastseen.intake.failover")


class Waiting(Protocol):
    """A request waiting for its callback to be stored."""

    received_at: float
    ids: str  # array literal
    future: asyncio.Future[int | str]


class Failover:
    def __init__(
        self,
        db: Database,
        metrics: Metrics,
        spool: Spool,
        *,
        probe_interval: float,
        probe_timeout: float,
        migrated: Callable[[], bool],
        gate: asyncio.Event,
        drained: asyncio.Event,
        clock: Clock = SYSTEM,
    ) -> None:
        """``migrated`` says whether the schema is in place (before, the probe pings and the
        drain waits); ``gate`` is the committers', set when spooling starts (they spool
        before the migration too) and cleared when the database is back before it;
        ``drained`` is set after each drained batch (the workers' cue)."""
        self.db = db
        self.metrics = metrics
        self.spool = spool
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.migrated = migrated
        self.gate = gate
        self.drained = drained
        self.spooling = False  # the database is taken for unreachable: callbacks are spooled
        self._drain = asyncio.Event()  # the spool may have something the inbox can take now
        self._lost = asyncio.Event()  # set while spooling: the probe's cue
        self._refusing = False  # the spool's last write failed (full, or the disk)
        metrics.spool_depth.set_function(lambda: spool.depth)
        metrics.spool_bytes.set_function(lambda: spool.size)
        metrics.spool_oldest_age.set_function(
            lambda: 0.0 if spool.oldest is None else max(0.0, clock.wall() - spool.oldest)
        )

    @property
    def accepting(self) -> bool:
        """Whether the spool takes callbacks (its last write did not fail)."""
        return not self._refusing

    def may_drain(self) -> None:
        """The inbox may take the spool's callbacks now (the schema is in place)."""
        self._drain.set()

    def lose_database(self, reason: str) -> None:
        """The database is taken for unreachable: callbacks go to the spool until a probe
        finds it again."""
        if not self.spooling:
            log.warning("the database does not answer; spooling callbacks", error=reason)
            self.spooling = True
            self.metrics.spooling.set(1)
            self._lost.set()
            self.gate.set()

    async def store(self, entries: Sequence[Waiting]) -> None:
        """Spools the callbacks of ``entries``, answering each request: its spool key, or
        ``SpoolFull`` / ``SpoolFailed`` when the spool cannot take them."""
        if not entries:
            return
        try:
            keys = await self._append([(e.received_at, e.ids) for e in entries])
        except (SpoolFull, SpoolFailed) as exc:
            if isinstance(exc, SpoolFailed):
                log.error("the spool refused callbacks", error=str(exc), size=len(entries))
            for entry in entries:
                if not entry.future.done():
                    entry.future.set_exception(
                        SpoolFull(exc.max_bytes) if isinstance(exc, SpoolFull) else SpoolFailed()
                    )
            return
        for entry, key in zip(entries, keys, strict=True):
            if not entry.future.done():
                entry.future.set_result(key)

    async def _append(self, callbacks: list[tuple[float, str]]) -> list[str]:
        try:
            keys = await self.spool.append(callbacks)
        except (SpoolFull, SpoolFailed):
            self._refusing = True
            raise
        self._refusing = False
        self.metrics.callbacks_spooled.inc(len(callbacks))
        self._drain.set()
        return keys

    async def probe(self) -> None:
        """While spooling, asks the database now and then whether it is back; the spool
        drains once it is. Runs until cancelled."""
        while True:
            await self._lost.wait()
            await asyncio.sleep(self.probe_interval)
            try:
                async with asyncio.timeout(self.probe_timeout):
                    # A write where the schema is in place: a read-only server answers a
                    # SELECT 1, and would take the spool back only to refuse every batch.
                    await (self.db.probe_write() if self.migrated() else self.db.ping())
            except (DatabaseError, TimeoutError):
                continue
            log.info("the database answers again; draining the spool")
            self.spooling = False
            self.metrics.spooling.set(0)
            self._lost.clear()
            if not self.migrated():
                self.gate.clear()  # back to waiting for the migration
            self._drain.set()

    async def drainer(self) -> None:
        """Moves the spool's callbacks into the inbox whenever it can. Runs until cancelled."""
        failures = 0
        while True:
            await self._drain.wait()
            if self.spooling or not self.migrated() or self.spool.depth == 0:
                self._drain.clear()  # set again by a spooled callback, the probe or open()
                continue
            try:
                drained = await drain_batch(self.spool, self.db)
                if not drained:
                    self._drain.clear()
                    continue
            except DatabaseUnavailable as exc:
                self.lose_database(str(exc))
                continue
            except (DatabaseError, SpoolFailed) as exc:
                # Left in the spool for the next try; nothing is lost by waiting.
                failures += 1
                log.error("could not drain the spool", error=str(exc))
                await asyncio.sleep(backoff(failures, 0.5, 30.0))
                continue
            failures = 0
            self._refusing = False  # there is room again
            self.metrics.callbacks_drained.inc(drained)
            self.drained.set()
