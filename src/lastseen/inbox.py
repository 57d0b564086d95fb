"""The inbox: durable storage of received callbacks, by group commit (leases.py reads it).

A 202 means the callback is committed with synchronous commit, so every
request waits for an fsync. Rather than one transaction per request, requests queue here and a
few committers each take everything that queued meanwhile and store it with one multi-row
INSERT. While one commit waits for its fsync, the next batch forms; an idle service commits a
lone request at once, so the batching adds no latency when there is nothing to batch.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from collections.abc import Sequence

import structlog

from lastseen.errors import (
    CommitTimeout,
    DatabaseError,
    DatabaseUnavailable,
    NotAccepting,
    RetryableConflict,
)
from lastseen.metrics import Metrics
from lastseen.storage.database import Database, id_array

log = structlog.get_logger("lastseen.inbox")


@dataclasses.dataclass(slots=True)
class _Entry:
    received_at: float  # epoch seconds
    ids: str  # array literal, see storage.database.id_array
    future: asyncio.Future[int]
    deadline: float  # loop time after which the request gets its 503


class GroupCommit:
    """Commits callbacks in groups; ``submit`` returns once the callback is durable."""

    def __init__(
        self,
        db: Database,
        metrics: Metrics,
        *,
        max_batch: int,
        concurrency: int,
        timeout: float,
        retry_delay: float = 0.05,
        max_batch_bytes: int = 64 << 20,
    ) -> None:
        self.db = db
        self.metrics = metrics
        self.max_batch = max_batch
        # Many large bodies in one INSERT could pass PostgreSQL's 1 GB limit on one value
        # and fail the whole group; a batch closes at this many bytes of ids.
        self.max_batch_bytes = max_batch_bytes
        self.concurrency = concurrency
        self.timeout = timeout
        self.retry_delay = retry_delay
        self._queue: collections.deque[_Entry] = collections.deque()
        self._committing: list[list[_Entry]] = []
        self._wake = asyncio.Event()
        self._committed = asyncio.Event()
        self._open = False
        self._closing = False

    def open(self) -> None:
        """Starts taking callbacks (once the schema is in place)."""
        self._open = True

    def submit(self, received_at: float, object_ids: Sequence[int]) -> asyncio.Future[int]:
        """Queues one callback; the future gives its id once it is durable.

        The future fails with ``CommitTimeout`` if that takes longer than the timeout (the
        callback is then not acknowledged and, if no committer has taken it yet, not stored
        either) and with ``DatabaseError`` if PostgreSQL refuses it. ``NotAccepting`` is
        raised at once before ``open`` and after ``close``.
        """
        if self._closing:
            raise NotAccepting("shutting down")
        if not self._open:
            raise NotAccepting("starting: the schema is not migrated yet")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        entry = _Entry(received_at, id_array(object_ids), future, loop.time() + self.timeout)
        self._queue.append(entry)
        self._wake.set()
        return future

    def _take(self) -> list[_Entry]:
        batch: list[_Entry] = []
        size = 0
        while self._queue and len(batch) < self.max_batch and size < self.max_batch_bytes:
            entry = self._queue.popleft()
            if not entry.future.done():
                batch.append(entry)
                size += len(entry.ids)
        return batch

    async def run(self) -> None:
        """The committers; runs until cancelled, or until ``close`` has drained the queue."""
        helpers = [
            asyncio.create_task(self._expire(), name="group-commit-expiry"),
            asyncio.create_task(self._notifier(), name="group-commit-notify"),
        ]
        try:
            await asyncio.gather(*(self._committer() for _ in range(self.concurrency)))
        finally:
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)

    async def _notifier(self) -> None:
        # At most one notification in flight; commits meanwhile are covered by the next one.
        # A lost notification only delays work until the workers' next poll.
        while True:
            await self._committed.wait()
            self._committed.clear()
            try:
                await self.db.notify_inbox()
            except DatabaseError as exc:
                log.warning("could not notify workers; they will poll", error=str(exc))
                await asyncio.sleep(self.retry_delay)

    async def _expire(self) -> None:
        # One sweeper instead of a timer per request: at thousands of requests per second,
        # per-request timers cost more than the check.
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(0.05, self.timeout / 4))
            now = loop.time()
            # A new exception per request: one shared object would collect every raise's
            # traceback, and with it every expired request's frame, forever.
            while self._queue and self._queue[0].deadline < now:
                entry = self._queue.popleft()
                if not entry.future.done():
                    entry.future.set_exception(CommitTimeout(self.timeout))
            for batch in self._committing:
                for entry in batch:
                    if entry.deadline < now and not entry.future.done():
                        entry.future.set_exception(CommitTimeout(self.timeout))

    async def _committer(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            self._committing.append(batch)
            try:
                await self._commit(batch)
            finally:
                self._committing.remove(batch)

    async def _commit(self, batch: list[_Entry]) -> None:
        started = time.perf_counter()
        try:
            ids = await self.db.insert_callbacks(
                [e.received_at for e in batch], [e.ids for e in batch]
            )
        except (DatabaseUnavailable, RetryableConflict) as exc:
            # Put the batch back, in order, for the next try; requests whose timeout passes
            # meanwhile get their 503 and are skipped.
            log.warning("group commit failed, will retry", error=str(exc), size=len(batch))
            self._queue.extendleft(reversed(batch))
            await asyncio.sleep(self.retry_delay)
            return
        except DatabaseError as exc:
            log.error("group commit refused", error=str(exc), size=len(batch))
            for entry in batch:
                if not entry.future.done():
                    entry.future.set_exception(DatabaseError(exc.operation, exc.detail))
            return
        self.metrics.commit_seconds.observe(time.perf_counter() - started)
        self.metrics.commit_batch.observe(len(batch))
        self._committed.set()
        for entry, callback_id in zip(batch, ids, strict=True):
            if not entry.future.done():
                entry.future.set_result(callback_id)

    def close(self) -> None:
        """Refuses new callbacks; ``run`` returns once what was queued is committed."""
        self._closing = True
        self._wake.set()
