"""Leases: what this process holds of the inbox, and the leases that keep others off it.

A worker claims callbacks with ``FOR UPDATE SKIP LOCKED`` and sets ``locked_until``; it renews
the lease while it works. Redoing a callback is harmless: lookups only read, and result writes
are monotonic (see results.py). So a failure costs seconds, never the TTL:
- on shutdown, the leases on unfinished callbacks are handed back at once;
- leases are short (seconds) and renewed three times per lease, so what a vanished instance
  held is claimed again by any worker within one lease;
- leases carry a stable holder name (the instance's name, and a worker process's slot), and a
  process starting under a name first takes back what a crashed predecessor of that name held;
  ``lastseen serve`` also takes back a dead worker process's callbacks as soon as it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog

from lastseen.core.errors import DatabaseError
from lastseen.core.model import Claimed, HeldCallback
from lastseen.storage.database import Database
from lastseen.telemetry.metrics import Metrics

log = structlog.get_logger("lastseen.pipeline.leases")


async def take_back(db: Database, holder: str, event: str) -> None:
    """Hands back every unfinished callback leased to ``holder`` (a crashed or dead process of
    that name), so that it is claimed now rather than when its leases run out; logs ``event``
    with the count."""
    try:
        count = await db.release_holder(holder)
    except DatabaseError as exc:
        log.warning("could not take back callbacks; their leases will lapse", error=str(exc))
        return
    if count:
        log.info(event, holder=holder, count=count)


class HeldCallbacks:
    """The callbacks this process has claimed and not finished: what its leases cover.

    ``on_finished`` is called whenever callbacks finish, since that makes room for more.
    """

    def __init__(self, metrics: Metrics, on_finished: Callable[[], None]) -> None:
        self.metrics = metrics
        self.on_finished = on_finished
        self._by_id: dict[int, HeldCallback] = {}
        self.ids = 0  # distinct ids of the held callbacks, answered or not
        self.finished_ids = 0  # distinct ids of the callbacks finished so far
        self._empty = asyncio.Event()
        self._empty.set()

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, callback_id: int) -> bool:
        return callback_id in self._by_id

    def callback_ids(self) -> list[int]:
        return list(self._by_id)

    def add(self, callback: HeldCallback) -> None:
        self._by_id[callback.id] = callback
        self.ids += callback.distinct
        self._empty.clear()
        self.metrics.callbacks_claimed.inc()
        self.metrics.callbacks_active.set(len(self._by_id))

    def finish(self, ids: list[int]) -> None:
        """Callbacks whose "done" is committed."""
        for callback_id in ids:
            callback = self._by_id.pop(callback_id, None)
            if callback is not None:
                self.ids -= callback.distinct
                self.finished_ids += callback.distinct
        self.metrics.callbacks_completed.inc(len(ids))
        self.metrics.callbacks_active.set(len(self._by_id))
        if not self._by_id:
            self._empty.set()
        self.on_finished()

    async def wait_empty(self, timeout: float) -> None:
        """Waits up to ``timeout`` seconds until every held callback has finished."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._empty.wait(), timeout)


class Leases:
    """Claims callbacks for one worker and keeps the leases on what it holds alive."""

    def __init__(
        self, db: Database, held: HeldCallbacks, worker: str, *, lease: float, batch: int
    ) -> None:
        self.db = db
        self.held = held
        self.worker = worker
        self.lease = lease
        self.batch = batch

    async def take_back(self) -> None:
        """Takes back what a predecessor under this name held (it crashed, or it is still
        stopping)."""
        await take_back(self.db, self.worker, "took back a predecessor's callbacks")

    async def claim(self) -> list[Claimed]:
        """Leases up to one claim batch of callbacks."""
        return await self.db.claim(self.worker, self.batch, self.lease)

    async def renew_forever(self) -> None:
        """Renews the leases on the held callbacks three times per lease period."""
        while True:
            await asyncio.sleep(self.lease / 3)
            ids = self.held.callback_ids()
            if not ids:
                continue
            try:
                kept = await self.db.extend_leases(self.worker, ids, self.lease)
            except DatabaseError as exc:
                # The next round, a third of a lease later, tries again.
                log.warning("could not renew leases", error=str(exc), held=len(ids))
                continue
            lost = {i for i in ids if i in self.held} - kept
            if lost:
                # Another worker took them after our lease ran out; both finishing is harmless.
                log.warning("leases lost", count=len(lost))

    async def hand_back(self) -> None:
        """Hands what is still held back to the inbox, so another worker takes it at once."""
        ids = self.held.callback_ids()
        if ids:
            await self.db.release(self.worker, ids)
