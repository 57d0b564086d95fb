"""Writing results: small batches, monotonic upserts, callbacks marked done after their results.

Batching. Results are written as they arrive: the first one wakes the writer, which waits a few
milliseconds for company (or not at all once a batch is full) and writes everything with one
multi-row statement per kind. A failed write puts the batch back, merged with what arrived
meanwhile, and is tried again; a callback's "done" always travels with or after its results.

Monotonic upserts. Lookups finish in any order, in any instance. Only the newest result per id
counts, "newest" meaning the latest callback receive time. The ``observations`` table keeps the
newest result per id, online or not; ``record_observations`` (storage/queries.sql) updates it only
with newer results, locking each id's row, and ``apply_newest`` then changes ``objects`` only
for results that are the newest: online -> insert or move ``last_seen`` forward; offline ->
delete. So an old online answer that arrives after a newer offline one does not
resurrect the object, and an old offline answer does not delete a newer sighting. Results whose
callback is already older than the TTL create no row.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import structlog

from lastseen.core.clock import SYSTEM, Clock
from lastseen.core.errors import DatabaseError, DatabaseUnavailable, RetryableConflict
from lastseen.core.model import DeadLetter, Expired, HeldCallback, Lookup, Outcome
from lastseen.storage.arrays import ResultBatch
from lastseen.storage.database import Database
from lastseen.telemetry.metrics import Metrics

log = structlog.get_logger("lastseen.pipeline.results")

# (receive times of the callbacks served, upstream latency of the answer)
_Lag = tuple[Sequence[float], float]


class ResultWriter:
    """Collects lookups' outcomes and finished callbacks, and writes them in batches; tells
    ``on_done`` which callbacks are done once that is committed."""

    def __init__(
        self,
        db: Database,
        metrics: Metrics,
        *,
        ttl: float,
        max_batch: int,
        interval: float,
        on_done: Callable[[list[int]], None],
        retry_delay: float = 0.1,
        clock: Clock = SYSTEM,
    ) -> None:
        self.db = db
        self.clock = clock
        self.metrics = metrics
        self.ttl = ttl
        self.max_batch = max_batch
        self.interval = interval
        self.on_done = on_done
        self.retry_delay = retry_delay
        self._results: dict[int, tuple[datetime, bool]] = {}
        self._lags: list[_Lag] = []
        self._dead: list[DeadLetter] = []
        self._done: list[int] = []
        self._wake = asyncio.Event()
        self._failures = 0  # consecutive non-transient write failures

    def record(self, lookup: Lookup, outcome: Outcome) -> None:
        """A lookup's outcome, for every callback it served; a callback whose last id this was
        is done, once what it depends on is written."""
        if isinstance(outcome, bool):
            newest = max(lookup.callbacks, key=lambda callback: callback.received_ts)
            self.add_result(
                lookup.object_id,
                newest.received_at,
                outcome,
                [callback.received_ts for callback in lookup.callbacks],
                lookup.latency,
            )
        elif isinstance(outcome, Expired):
            self.metrics.ids_expired.labels(outcome.reason).inc(len(lookup.callbacks))
        else:
            self.metrics.dead_letters.labels(outcome.reason).inc(len(lookup.callbacks))
            log.warning(
                "lookup dead-lettered",
                object_id=lookup.object_id,
                reason=outcome.reason,
                detail=outcome.detail,
                attempts=lookup.attempts,
                callbacks=len(lookup.callbacks),
            )
            self.add_dead_letters(
                [
                    DeadLetter(
                        callback.id,
                        lookup.object_id,
                        callback.received_at,
                        outcome.reason,
                        outcome.detail,
                        lookup.attempts,
                    )
                    for callback in lookup.callbacks
                ]
            )
        for callback in lookup.callbacks:
            callback.remaining -= 1
            if callback.remaining == 0:
                self.add_done(callback.id)

    def set_aside(
        self, callback: HeldCallback, ids: Sequence[int], reason: str, detail: str
    ) -> None:
        """Dead-letters every id of ``callback`` with ``reason``, and completes it."""
        self.metrics.dead_letters.labels(reason).inc(len(ids))
        self.add_dead_letters(
            [DeadLetter(callback.id, i, callback.received_at, reason, detail, 0) for i in ids]
        )
        self.add_done(callback.id)

    def add_result(
        self,
        object_id: int,
        seen_at: datetime,
        online: bool,
        received: Sequence[float],
        latency: float,
    ) -> None:
        """One lookup's answer for the callbacks received at ``received`` (newest: ``seen_at``)."""
        self._merge(object_id, seen_at, online)
        self._lags.append((received, latency))
        self._wake.set()

    def _merge(self, object_id: int, seen_at: datetime, online: bool) -> None:
        # One statement may touch each id once; keep the newest, offline winning a tie.
        known = self._results.get(object_id)
        if known is None or seen_at > known[0] or (seen_at == known[0] and not online):
            self._results[object_id] = (seen_at, online)

    def add_dead_letters(self, letters: Sequence[DeadLetter]) -> None:
        self._dead.extend(letters)
        self._wake.set()

    def add_done(self, callback_id: int) -> None:
        self._done.append(callback_id)
        self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._results) + len(self._dead) + len(self._done)

    async def run(self) -> None:
        """Writes batches until cancelled."""
        while True:
            await self._wake.wait()
            if self.pending < self.max_batch:
                await asyncio.sleep(self.interval)
            self._wake.clear()
            await self.flush()

    def batches(self) -> list[ResultBatch]:
        """What is pending, as ``flush`` writes it: one batch per ``max_batch`` results, the dead
        letters and the done marks with the last, after every result they depend on."""
        ids = list(self._results)
        chunks = [ids[i : i + self.max_batch] for i in range(0, len(ids), self.max_batch)] or [[]]
        return [
            ResultBatch(
                ids=chunk,
                seen_at=[self._results[i][0] for i in chunk],
                online=[self._results[i][1] for i in chunk],
                dead_letters=list(self._dead) if n == len(chunks) - 1 else [],
                completed=list(self._done) if n == len(chunks) - 1 else [],
            )
            for n, chunk in enumerate(chunks)
        ]

    async def flush(self) -> None:
        """Writes everything pending now, a batch per transaction."""
        if not self.pending:
            return
        batches = self.batches()
        self._results = {}
        lags, self._lags = self._lags, []
        dead, self._dead = self._dead, []
        done, self._done = self._done, []
        for n, batch in enumerate(batches):
            cutoff = datetime.fromtimestamp(self.clock.wall() - self.ttl, UTC)
            try:
                upserted, deleted = await self.db.write_results(batch, cutoff)
            except DatabaseError as exc:
                for unwritten in batches[n:]:
                    for result in zip(
                        unwritten.ids, unwritten.seen_at, unwritten.online, strict=True
                    ):
                        self._merge(*result)
                self._lags[:0] = lags
                self._dead[:0] = dead
                self._done[:0] = done
                self._wake.set()
                self._failing(exc)
                await asyncio.sleep(self.retry_delay)
                return
            self._failures = 0
            self.metrics.results_batch.observe(len(batch.ids) + len(batch.dead_letters))
            self.metrics.objects_upserted.inc(upserted)
            self.metrics.objects_deleted.labels("offline").inc(deleted)
        written = self.clock.wall()
        # One observation per id of every callback served: in bulk, hundreds per lookup when
        # a lookup serves many callbacks.
        self.metrics.result_lag.observe_many(
            [written - received_ts for received, _ in lags for received_ts in received]
        )
        self.metrics.lag_over_upstream.observe_many(
            [
                max(0.0, written - received_ts - latency)
                for received, latency in lags
                for received_ts in received
            ]
        )
        if done:
            self.on_done(done)

    async def flush_all(self) -> None:
        """Writes what is pending until nothing is, or until a write makes no progress."""
        while self.pending:
            before = self.pending
            await self.flush()
            if self.pending >= before:
                return

    def _failing(self, exc: DatabaseError) -> None:
        """Transient failures are retried for as long as they last. Anything else is retried a
        few times and then raised: the task dies loudly, its process is restarted, and the
        callbacks' leases lapse, rather than a worker renewing leases on work it cannot write."""
        if isinstance(exc, (DatabaseUnavailable, RetryableConflict)):
            log.warning("writing results failed, will retry", error=str(exc))
            return
        self._failures += 1
        log.error("writing results refused", error=str(exc), attempt=self._failures)
        if self._failures >= 5:
            raise exc
