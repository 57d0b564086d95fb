"""The inbox: durable storage of received callbacks, by group commit (leases.py reads it).

A 202 means the callback is committed with synchronous commit, so every
request waits for an fsync. Rather than one transaction per request, requests queue here and a
few committers each take everything that queued meanwhile and store it with one multi-row
INSERT. While one commit waits for its fsync, the next batch forms; an idle service commits a
lone request at once, so the batching adds no latency when there is nothing to batch.

The spool. When a commit cannot reach PostgreSQL in time (half the commit timeout), its
callbacks go to the local spool (spool.py) instead, durable before the 202, and so do later
ones, straight away, until a probe finds the database again; then the spool drains into the
inbox in the order it filled, with the original receive times, while new callbacks go to
PostgreSQL again (failover.py). Before the schema is migrated (PostgreSQL down at start)
callbacks are spooled too. A 202 means stored in one of the two places; with neither, 503.

A commit whose answer was lost with its connection may have landed after all: its callbacks
are then stored twice (once from the spool). Their effect is the same: the same ids with the
same receive time.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import time
from collections.abc import Coroutine, Sequence
from typing import Any

import structlog

from lastseen.core.clock import SYSTEM, Clock
from lastseen.core.errors import (
    CommitTimeout,
    DatabaseError,
    DatabaseUnavailable,
    IdempotencyConflict,
    NotAccepting,
    RetryableConflict,
)
from lastseen.core.waiting import answered_within
from lastseen.intake.failover import Failover
from lastseen.intake.spool import Spool
from lastseen.storage.arrays import id_array
from lastseen.storage.database import Database
from lastseen.telemetry.metrics import Metrics

log = structlog.get_logger("lastseen.intake.group_commit")


@dataclasses.dataclass(slots=True)
class _Entry:
    received_at: float  # epoch seconds
    ids: str  # array literal, see storage.database.id_array
    future: asyncio.Future[int | str]
    deadline: float  # loop time after which the request gets its 503
    key: str | None = None  # idempotency key
    digest: str | None = None  # of ``ids``, told apart from another body under the same key


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
        spool: Spool | None = None,
        probe_interval: float = 0.5,
        clock: Clock = SYSTEM,
    ) -> None:
        """``clock`` is the one receive times come from (the spool's age is read by it)."""
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
        self.spool = spool
        # A commit slower than this is taken for an unreachable database, leaving the other
        # half of the timeout for the spool's write.
        self.spool_after = timeout / 2
        # Commits given up on after ``spool_after``: their cancellation may wait on a server
        # that no longer answers (a partition), so they end on their own, held here meanwhile.
        self._abandoned: set[asyncio.Task[list[tuple[int, str | None]]]] = set()
        self._gate = asyncio.Event()  # set once committing or spooling can start
        self.failover: Failover | None = None
        if spool is not None:
            self.failover = Failover(
                db,
                metrics,
                spool,
                probe_interval=probe_interval,
                probe_timeout=self.spool_after,
                migrated=lambda: self._open,
                gate=self._gate,
                drained=self._committed,
                clock=clock,
            )

    def open(self) -> None:
        """Starts committing to PostgreSQL (once the schema is in place); before, callbacks
        are refused, or spooled where there is a spool."""
        self._open = True
        self._gate.set()
        if self.failover is not None:
            self.failover.may_drain()

    @property
    def accepting(self) -> bool:
        """Whether a callback can be stored now, in PostgreSQL or in the spool."""
        if self._closing:
            return False
        if self.failover is None:
            return self._open
        return self.failover.accepting

    @property
    def spooling(self) -> bool:
        """Whether the database is taken for unreachable, callbacks going to the spool."""
        return self.failover is not None and self.failover.spooling

    def lose_database(self, reason: str) -> None:
        """The database is taken for unreachable: callbacks go to the spool (if there is one)
        until a probe finds it again."""
        if self.failover is not None:
            self.failover.lose_database(reason)

    def submit(self, received_at: float, object_ids: Sequence[int]) -> asyncio.Future[int | str]:
        """Queues one callback; the future gives its id once it is durable (or its spool key,
        if it went to the spool).

        The future fails with ``CommitTimeout`` if that takes longer than the timeout (the
        callback is then not acknowledged and, if no committer has taken it yet, not stored
        either), with ``DatabaseError`` if PostgreSQL refuses it, and with ``SpoolFull`` or
        ``SpoolFailed`` when it could be stored in neither place. ``NotAccepting`` is raised at
        once after ``close``, and before ``open`` where there is no spool.
        """
        return self._enqueue(received_at, object_ids, None)

    def _enqueue(
        self, received_at: float, object_ids: Sequence[int], key: str | None
    ) -> asyncio.Future[int | str]:
        if self._closing:
            raise NotAccepting("shutting down")
        if not self._open and self.spool is None:
            raise NotAccepting("starting: the schema is not migrated yet")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int | str] = loop.create_future()
        literal = id_array(object_ids)
        entry = _Entry(received_at, literal, future, loop.time() + self.timeout)
        if key is not None:
            entry.key = key
            entry.digest = hashlib.sha256(literal.encode()).hexdigest()
        self._queue.append(entry)
        self._wake.set()
        return future

    def submit_keyed(
        self, received_at: float, object_ids: Sequence[int], key: str
    ) -> asyncio.Future[int | str]:
        """``submit`` under an idempotency key, in the same group commit: the future gives the
        id of the callback first stored under ``key`` (this one, or an earlier one with the
        same ids), or fails with ``IdempotencyConflict`` if the earlier one had other ids.
        While the database is away it goes to the spool like any other, unchecked."""
        return self._enqueue(received_at, object_ids, key)

    def _take(self) -> list[_Entry]:
        batch: list[_Entry] = []
        size = 0
        keys: set[str] = set()
        later: list[_Entry] = []  # a key sent again before its first request was committed
        while self._queue and len(batch) < self.max_batch and size < self.max_batch_bytes:
            entry = self._queue.popleft()
            if entry.future.done():
                continue
            if entry.key is not None:
                if entry.key in keys:
                    later.append(entry)
                    continue
                keys.add(entry.key)
            batch.append(entry)
            size += len(entry.ids)
        self._queue.extendleft(reversed(later))
        return batch

    async def run(self) -> None:
        """The committers; runs until cancelled, or until ``close`` has drained the queue.
        The tasks of ``side_tasks`` must run beside it."""
        await asyncio.gather(*(self._committer() for _ in range(self.concurrency)))

    def side_tasks(self) -> dict[str, Coroutine[Any, Any, None]]:
        """The tasks the committers need beside them, by name, each to run until cancelled
        (after ``run`` returns): for the caller to supervise, so that one that dies stops
        the process instead of leaving, say, a spool that never drains."""
        tasks = {
            "group-commit-expiry": self._expire(),
            "group-commit-notify": self._notifier(),
        }
        if self.failover is not None:
            tasks["group-commit-probe"] = self.failover.probe()
            tasks["group-commit-drain"] = self.failover.drainer()
        return tasks

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
            if not (self._open or self.spooling or self._closing):
                # Not migrated yet, and the database not known to be down: callbacks wait for
                # the migration (or their timeout) rather than going to the spool.
                await self._gate.wait()
                continue
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
        failover = self.failover
        if failover is not None and (failover.spooling or not self._open):
            await failover.store([e for e in batch if not e.future.done()])
            return
        started = time.perf_counter()
        try:
            answers = await self._insert_within(batch, self.spool_after if failover else None)
        except (DatabaseUnavailable, TimeoutError) as exc:
            if failover is not None:
                failover.lose_database(str(exc) or "the commit took too long")
                await failover.store([e for e in batch if not e.future.done()])
                return
            self._put_back(batch, exc)
            await asyncio.sleep(self.retry_delay)
            return
        except RetryableConflict as exc:
            self._put_back(batch, exc)
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
        for entry, (callback_id, digest) in zip(batch, answers, strict=True):
            if entry.future.done():
                continue
            if digest != entry.digest:
                entry.future.set_exception(IdempotencyConflict())
            else:
                entry.future.set_result(callback_id)

    async def _insert(self, batch: list[_Entry]) -> list[tuple[int, str | None]]:
        if any(e.key is not None for e in batch):
            return await self.db.insert_callbacks_keyed(
                [e.received_at for e in batch],
                [e.ids for e in batch],
                [e.key for e in batch],
                [e.digest for e in batch],
            )
        ids = await self.db.insert_callbacks([e.received_at for e in batch], [e.ids for e in batch])
        return [(i, None) for i in ids]

    async def _insert_within(
        self, batch: list[_Entry], seconds: float | None
    ) -> list[tuple[int, str | None]]:
        """``_insert``, or ``TimeoutError`` after ``seconds`` without waiting for its
        cancellation: a statement cancelled on a connection that passes no bytes waits for
        its cancel request, and the batch's requests would time out meanwhile. An abandoned
        insert may still commit: its callbacks are then stored twice (the spool's copy), the
        same ids with the same receive time, which changes nothing in ``objects``."""
        insert = asyncio.create_task(self._insert(batch), name="group-commit-insert")
        try:
            answered = await answered_within(insert, seconds, min(e.deadline for e in batch))
        except asyncio.CancelledError:
            insert.cancel()
            raise
        if answered:
            return insert.result()
        insert.cancel()
        self._abandoned.add(insert)
        insert.add_done_callback(self._forget)
        raise TimeoutError

    def _forget(self, insert: asyncio.Task[list[tuple[int, str | None]]]) -> None:
        self._abandoned.discard(insert)
        if not insert.cancelled() and insert.exception() is not None:
            log.info("an abandoned commit ended", error=str(insert.exception()))

    def _put_back(self, batch: list[_Entry], exc: Exception) -> None:
        # In order, for the next try; requests whose timeout passes meanwhile get their 503
        # and are skipped.
        log.warning("group commit failed, will retry", error=str(exc), size=len(batch))
        self._queue.extendleft(reversed(batch))

    def close(self) -> None:
        """Refuses new callbacks; ``run`` returns once what was queued is committed."""
        self._closing = True
        self._gate.set()
        self._wake.set()
