"""The database edge: the pool, the migrations, and every named query as a method.

Callers never see asyncpg's exceptions: each method turns them (errors.py) into
``DatabaseUnavailable`` (connection trouble, worth waiting out), ``RetryableConflict`` (deadlock
or serialization failure, run the transaction again) or ``DatabaseError`` (anything else).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import re
from collections.abc import Callable, Sequence
from datetime import datetime

import asyncpg
import structlog

from lastseen.core.errors import DatabaseError, RetryableConflict
from lastseen.core.model import Claimed, DeadLetter, DeadLetterFilter
from lastseen.storage.arrays import ResultBatch, result_arrays
from lastseen.storage.errors import UNAVAILABLE, edge, translate
from lastseen.storage.sockets import TCP_TIMEOUT, abandon_when_silent

log = structlog.get_logger("lastseen.storage.database")


def load_queries(package: str = "lastseen.storage") -> dict[str, str]:
    """The statements of a package's ``queries.sql`` by name."""
    text = importlib.resources.files(package).joinpath("queries.sql").read_text()
    queries: dict[str, str] = {}
    for block in re.split(r"^-- name: ", text, flags=re.MULTILINE)[1:]:
        name, _, body = block.partition("\n")
        queries[name.strip()] = body.strip()
    return queries


def load_migrations() -> list[tuple[int, str, str]]:
    """(version, name, SQL) of each migration, in order."""
    folder = importlib.resources.files("lastseen.storage").joinpath("migrations")
    found = []
    for entry in folder.iterdir():
        match = re.fullmatch(r"(\d+)_(\w+)\.sql", entry.name)
        if match:
            found.append((int(match[1]), match[2], entry.read_text()))
    return sorted(found)


Q = load_queries()


async def _reset(conn: asyncpg.Connection) -> None:
    """Nothing more to do when a connection goes back to the pool. Given this, asyncpg's pool
    still rolls back a transaction left open and drops listeners (``Connection._reset``), but no
    longer sends ``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`` on every
    release: a round trip and four statements for state lastseen never leaves on a pooled
    connection (its advisory locks are transaction-scoped, its settings ``SET LOCAL``, its
    LISTEN on a connection of its own)."""


# Serializes migrations of concurrently starting instances.
_MIGRATION_LOCK = 0x6C617374_7365656E  # "lastseen"


class Database:
    """The pool and the named queries. Open once per process; close in the same place."""

    def __init__(
        self, pool: asyncpg.Pool, url: str, statement_timeout: float, tcp_timeout: float
    ) -> None:
        self.pool = pool
        self.url = url
        self.statement_timeout = statement_timeout
        self.tcp_timeout = tcp_timeout

    @classmethod
    async def open(
        cls, url: str, *, size: int, timeout: float, tcp_timeout: float = TCP_TIMEOUT
    ) -> Database:
        """A pool that connects lazily, so that a process can start while the database is down;
        its TCP connections are abandoned ``tcp_timeout`` seconds after the server stops
        answering (0: when the system's defaults say, minutes later)."""

        async def init(conn: asyncpg.Connection) -> None:
            abandon_when_silent(conn, tcp_timeout)

        try:
            pool = await asyncpg.create_pool(
                url,
                min_size=0,
                max_size=size,
                timeout=timeout,
                command_timeout=timeout,
                max_inactive_connection_lifetime=60,
                reset=_reset,
                init=init,
                server_settings={
                    "application_name": "lastseen",
                    # A 202 promises durability, whatever the server's default.
                    "synchronous_commit": "on",
                },
            )
        except (asyncpg.PostgresError, *UNAVAILABLE) as exc:
            raise translate("open", exc) from exc
        return cls(pool, url, timeout, tcp_timeout)

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.pool.close(), self.statement_timeout)
        except TimeoutError:
            self.pool.terminate()

    @edge
    async def listen(self, channel: str, wake: Callable[[], None]) -> asyncpg.Connection:
        """A dedicated connection that calls ``wake`` on each notification on ``channel``."""
        conn: asyncpg.Connection = await asyncpg.connect(self.url, timeout=self.statement_timeout)
        abandon_when_silent(conn, self.tcp_timeout)
        await conn.add_listener(channel, lambda *_: wake())
        return conn

    @edge
    async def migrate(self) -> list[int]:
        """Applies the migrations this database lacks; returns the versions applied now."""
        applied_now = []
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(Q["take_migration_lock"], _MIGRATION_LOCK)
            if not await conn.fetchval(Q["has_migrations_table"]):
                await conn.execute(Q["create_migrations_table"])
            done = {r[0] for r in await conn.fetch(Q["applied_migrations"])}
            known = load_migrations()
            unknown = done - {version for version, _, _ in known}
            if unknown:
                log.warning("database has newer migrations than this lastseen", versions=unknown)
            for version, name, sql in known:
                if version in done:
                    continue
                await conn.execute(sql)
                await conn.execute(Q["record_migration"], version, name)
                applied_now.append(version)
        return applied_now

    @edge
    async def ping(self) -> float:
        """The database's clock (epoch seconds), if it answers."""
        answer = await self.pool.fetchval(Q["ping"], timeout=self.statement_timeout)
        if not isinstance(answer, float):
            # Seen behind pgbouncer in transaction mode: a broken answer, not a crash of the
            # readiness watch (whose death would stop the instance).
            raise DatabaseError("ping", f"the answer was {answer!r}, not the server's clock")
        return answer

    @edge
    async def now(self) -> datetime:
        """PostgreSQL's clock: the one receive times are in."""
        answer: datetime = await self.pool.fetchval(Q["now"], timeout=self.statement_timeout)
        return answer

    @edge
    async def probe_write(self) -> None:
        """Returns if the database takes the inbox's writes; else the error that says why."""
        await self.pool.execute(Q["probe_write"], timeout=self.statement_timeout)

    @edge
    async def insert_callbacks(
        self, received_at: Sequence[float], id_arrays: Sequence[str]
    ) -> list[int]:
        """Stores callbacks in one durable transaction; returns their ids in input order.

        ``received_at`` are epoch seconds; ``id_arrays`` are made by ``id_array``.
        """
        rows = await self.pool.fetch(Q["insert_callbacks"], received_at, id_arrays)
        # One statement draws its ids from the sequence in row order, so sorting recovers it.
        return sorted(row[0] for row in rows)

    @edge
    async def insert_keyed_callbacks(
        self, received_at: Sequence[float], id_arrays: Sequence[str], keys: Sequence[str]
    ) -> int:
        """Stores callbacks with unique keys (imported, or drained from a spool) durably,
        skipping keys already stored; returns how many were stored now."""
        rows = await self.pool.fetch(Q["insert_keyed_callbacks"], received_at, id_arrays, keys)
        return len(rows)

    @edge
    async def notify_inbox(self) -> None:
        await self.pool.execute(Q["notify_inbox"])

    @edge
    async def claim(self, worker: str, limit: int, lease: float) -> list[Claimed]:
        rows = await self.pool.fetch(Q["claim_callbacks"], worker, limit, lease)
        return [Claimed(r[0], r[1], r[2], r[3]) for r in rows]

    @edge
    async def extend_leases(self, worker: str, ids: Sequence[int], lease: float) -> set[int]:
        rows = await self.pool.fetch(Q["extend_leases"], worker, list(ids), lease)
        return {row[0] for row in rows}

    @edge
    async def release(self, worker: str, ids: Sequence[int]) -> None:
        await self.pool.execute(Q["release_callbacks"], worker, list(ids))

    @edge
    async def release_holder(self, worker: str) -> int:
        return _rows_affected(await self.pool.execute(Q["release_holder"], worker))

    @edge
    async def write_results(self, batch: ResultBatch, cutoff: datetime) -> tuple[int, int]:
        """Writes one batch of results in one transaction; returns (upserted, deleted).

        The commit is synchronous, as durable as a callback's: a callback's earlier results
        were committed by earlier batches, and one the server acknowledged and then lost (a
        crash, or a failover to a standby it had not reached) would leave the done mark, written
        later, without them (design-decisions.md: what it cost, measured).
        """
        upserted = deleted = 0
        async with self.pool.acquire() as conn, conn.transaction():
            if batch.ids:
                # Two statements, not one: if the first waits for another writer of the same
                # ids, the second's fresh snapshot sees what that writer did to objects.
                results = result_arrays(batch)
                await conn.execute(Q["record_observations"], *results)
                row = await conn.fetchrow(Q["apply_newest"], *results, cutoff)
                assert row is not None
                upserted, deleted = row[0], row[1]
            if batch.dead_letters:
                letters = batch.dead_letters
                await conn.execute(
                    Q["insert_dead_letters"],
                    [d.callback_id for d in letters],
                    [d.object_id for d in letters],
                    [d.received_at for d in letters],
                    [d.reason for d in letters],
                    [d.detail for d in letters],
                    [d.attempts for d in letters],
                )
            if batch.completed:
                await conn.execute(Q["complete_callbacks"], batch.completed)
        return upserted, deleted

    @edge
    async def expire_stale_callbacks(self, cutoff: datetime, limit: int) -> int:
        return int(await self.pool.fetchval(Q["expire_stale_callbacks"], cutoff, limit))

    @edge
    async def reap(self, cutoff: datetime, limit: int) -> tuple[int, int] | None:
        """Deletes expired objects, after noting the pending callbacks that arrived since the
        last note; returns (deleted, kept), or None when another instance's reaper holds the
        lock.

        The note is only needed to decide about an expired object, so a round with none
        skips it: the next note catches up, and finds only the callbacks still pending by
        then (with results that come in seconds, a small share). In a run where nothing
        expired, noting every callback's ids was 70% of PostgreSQL's statement time."""
        async with self.pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval(Q["take_reaper_lock"]):
                return None
            await conn.execute(Q["forget_pending_ids"], cutoff)
            if not await conn.fetchval(Q["any_expired"], cutoff):
                return 0, 0
            await conn.execute(Q["note_pending_ids"], cutoff)
            row = await conn.fetchrow(Q["reap_objects"], cutoff, limit)
        assert row is not None
        return int(row["deleted"]), int(row["kept"])

    @edge
    async def prune(
        self,
        done_before: datetime,
        observed_before: datetime,
        dead_before: datetime,
        keys_before: datetime,
        limit: int,
    ) -> tuple[int, int, int, int]:
        """Deletes old done callbacks, stale observations, old dead letters and old
        idempotency keys; returns how many of each."""
        callbacks = await self.pool.execute(Q["prune_callbacks"], done_before, limit)
        observations = await self.pool.execute(Q["prune_observations"], observed_before, limit)
        dead = await self.pool.execute(Q["prune_dead_letters"], dead_before, limit)
        keys = await self.pool.execute(Q["prune_idempotency_keys"], keys_before, limit)
        return (
            _rows_affected(callbacks),
            _rows_affected(observations),
            _rows_affected(dead),
            _rows_affected(keys),
        )

    @edge
    async def insert_callbacks_keyed(
        self,
        received_at: Sequence[float],
        id_arrays: Sequence[str],
        keys: Sequence[str | None],
        digests: Sequence[str | None],
    ) -> list[tuple[int, str | None]]:
        """Stores a group commit's callbacks in one durable transaction, those with an
        idempotency key (``keys``, distinct where not None) only if the key is not taken yet.
        Returns, in input order, each callback's id and, for a keyed one, the digest stored
        under its key: another digest than the one given means another body came first, and
        the id is that body's callback's."""
        plain = [n for n, key in enumerate(keys) if key is None]
        keyed = [n for n, key in enumerate(keys) if key is not None]
        answers: list[tuple[int, str | None]] = [(0, None)] * len(keys)
        async with self.pool.acquire() as conn:
            # A batch of one kind is one statement, atomic as it is: no BEGIN and COMMIT round
            # trips (a producer that signs everything sends only keyed callbacks).
            both = conn.transaction() if plain and keyed else contextlib.nullcontext()
            async with both:
                if plain:
                    rows = await conn.fetch(
                        Q["insert_callbacks"],
                        [received_at[n] for n in plain],
                        [id_arrays[n] for n in plain],
                    )
                    for n, callback_id in zip(plain, sorted(r[0] for r in rows), strict=True):
                        answers[n] = (callback_id, None)
                if keyed:
                    rows = [(received_at[n], id_arrays[n], keys[n], digests[n]) for n in keyed]
                    found = await _claim_keys(conn, rows)
                    for n in keyed:
                        answers[n] = found[keys[n]]
        return answers

    @edge
    async def inbox_stats(self) -> tuple[int, float | None]:
        """Pending callbacks, and the oldest one's age in seconds (None with none pending)."""
        row = await self.pool.fetchrow(Q["inbox_stats"])
        assert row is not None
        return row[0], None if row[1] is None else max(0.0, row[1])

    @edge
    async def count_objects(self) -> int:
        return int(await self.pool.fetchval(Q["count_objects"]))

    @edge
    async def list_objects(self, after: int | None, limit: int) -> list[tuple[int, datetime]]:
        """A page of online objects: the first, or those after the id ``after``."""
        if after is None:
            rows = await self.pool.fetch(Q["list_objects_first"], limit)
        else:
            rows = await self.pool.fetch(Q["list_objects"], after, limit)
        return [(r[0], r[1]) for r in rows]

    @edge
    async def get_object(self, object_id: int) -> datetime | None:
        row = await self.pool.fetchrow(Q["get_object"], object_id)
        return None if row is None else row[1]

    @edge
    async def list_dead_letters(
        self,
        which: DeadLetterFilter,
        limit: int,
        after: tuple[datetime, int, int] | None = None,
    ) -> list[tuple[DeadLetter, datetime]]:
        """Dead letters that match, newest received first, each with when it was recorded;
        ``after`` (received, callback, object) continues from the end of a page."""
        start = after or (None, None, None)
        rows = await self.pool.fetch(Q["list_dead_letters"], *_filter(which), limit, *start)
        return [(DeadLetter(*r[:6]), r[6]) for r in rows]

    @edge
    async def count_matching_dead_letters(self, which: DeadLetterFilter) -> int:
        return int(await self.pool.fetchval(Q["count_matching_dead_letters"], *_filter(which)))

    @edge
    async def count_dead_letters(self) -> dict[str, int]:
        return {r[0]: r[1] for r in await self.pool.fetch(Q["count_dead_letters"])}

    @edge
    async def retry_dead_letters(self, which: DeadLetterFilter, limit: int) -> list[int]:
        """Puts dead letters that match back into the inbox; returns the ids of the new
        callbacks."""
        rows = await self.pool.fetch(Q["retry_dead_letters"], *_filter(which), limit)
        return sorted(r[0] for r in rows)

    @edge
    async def discard_dead_letters(self, which: DeadLetterFilter, limit: int) -> int:
        """Deletes dead letters that match; returns how many."""
        return int(await self.pool.fetchval(Q["discard_dead_letters"], *_filter(which), limit))

    @edge
    async def callback_status(self, callback_id: int) -> asyncpg.Record | None:
        """One callback's receipt, completion, id counts and claims (None once pruned)."""
        row: asyncpg.Record | None = await self.pool.fetchrow(Q["callback_status"], callback_id)
        return row


async def _claim_keys(
    conn: asyncpg.Connection, rows: list[tuple[float, str, str | None, str | None]]
) -> dict[str | None, tuple[int, str | None]]:
    """Stores the keyed callbacks ``(received_at, ids, key, digest)`` whose keys are free;
    the callback id and digest under every key, stored now or before."""
    received_at, id_arrays, keys, digests = (list(column) for column in zip(*rows, strict=True))
    stored = await conn.fetch(
        Q["insert_idempotent_callbacks"], received_at, id_arrays, keys, digests
    )
    digest_of = dict(zip(keys, digests, strict=True))
    found = {r[0]: (r[1], digest_of[r[0]]) for r in stored}
    if len(found) < len(rows):
        missing = [key for key in keys if key not in found]
        earlier = await conn.fetch(Q["keyed_callbacks"], missing)
        found.update((r["key"], (int(r["callback_id"]), str(r["digest"]))) for r in earlier)
    if len(found) < len(rows):
        # Pruned between the two statements: the whole batch again.
        raise RetryableConflict("insert_callbacks_keyed", "an idempotency key went")
    return found


def _filter(which: DeadLetterFilter) -> tuple[object, ...]:
    return (which.reason, which.callback_id, which.received_before, which.received_after)


def _rows_affected(status: str) -> int:
    """The row count of a command status such as ``DELETE 12``."""
    return int(status.rsplit(" ", 1)[-1])
