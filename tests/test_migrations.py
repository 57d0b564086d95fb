"""Upgrades: a database that an older lastseen migrated, holding what it stored, migrated to the
newest schema, keeps its data and serves today's queries. Every other test gets a database
cloned from one migrated from empty, so only here does a migration meet rows."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest
from helpers.tables import own_database

from lastseen.core.model import DeadLetterFilter
from lastseen.storage.arrays import ResultBatch, id_array
from lastseen.storage.database import Database, Q, load_migrations

MIGRATIONS = load_migrations()
NEWEST = MIGRATIONS[-1][0]
OLDER = [version for version, _, _ in MIGRATIONS[:-1]]
TTL = 60.0


@pytest.fixture
async def empty_url(pg_url: str) -> AsyncIterator[str]:
    """A database of this test's own with no schema at all."""
    async with own_database(pg_url, f"upgrade_{os.getpid()}") as url:
        yield url


async def migrate_to(sql: asyncpg.Connection, version: int) -> None:
    """The schema as a lastseen whose newest migration was ``version`` left it: its migrations
    applied and recorded, as its ``migrate`` did."""
    async with sql.transaction():
        await sql.execute(Q["create_migrations_table"])
        for number, name, statements in MIGRATIONS:
            if number <= version:
                await sql.execute(statements)
                await sql.execute(Q["record_migration"], number, name)


async def store_data(sql: asyncpg.Connection, version: int) -> dict[str, int]:
    """What an instance of that version would have stored, with the columns it knew: callbacks
    done, pending (fresh, and older than the TTL), leased to a worker, imported; objects fresh,
    expired, and expired but named by a pending callback; an observation; a dead letter; an
    idempotency key. Returns the callbacks' ids by role."""

    async def callback(
        ids: str, age: str, done: bool = False, leased: bool = False, source: str | None = None
    ) -> int:
        columns = ["received_at", "object_ids", "locked_until", "locked_by", "claims", "done_at"]
        values = [
            f"now() - interval '{age}'",
            f"'{ids}'",
            "now() + interval '1 hour'" if leased else "now()",
            "'old-worker'" if leased else "NULL",
            "1" if leased or done else "0",
            "now()" if done else "NULL",
        ]
        if source is not None:
            columns.append("source")
            values.append(f"'{source}'")
        statement = f"INSERT INTO callbacks ({', '.join(columns)}) VALUES ({', '.join(values)})"
        return int(await sql.fetchval(statement + " RETURNING id"))

    roles = {
        "done": await callback("{4}", "2 seconds", done=True),
        "fresh": await callback("{2,3,9}", "1 second"),
        "stale": await callback("{5}", "1 hour"),
        "leased": await callback("{6}", "1 second", leased=True),
    }
    if version >= 3:
        roles["imported"] = await callback("{10}", "1 second", source="old.csv:1")
    await sql.execute(
        "INSERT INTO objects (id, last_seen) VALUES"
        " (4, now() - interval '2 seconds'), (8, now() - interval '2 hours'),"
        " (9, now() - interval '2 hours')"
    )
    await sql.execute("INSERT INTO observations VALUES (4, now() - interval '2 seconds', true)")
    await sql.execute(
        "INSERT INTO dead_letters (callback_id, object_id, received_at, reason, detail, attempts)"
        " VALUES ($1, 7, now(), 'http_4xx', 'status 400: no', 1)",
        roles["done"],
    )
    if version >= 5:
        await sql.execute(
            "INSERT INTO idempotency_keys (key, callback_id, digest) VALUES ('key-1', $1, 'd1')",
            roles["done"],
        )
    return roles


SNAPSHOT = {
    "callbacks": "SELECT id, received_at, object_ids, locked_by, claims, done_at FROM callbacks",
    "objects": "SELECT id, last_seen FROM objects",
    "observations": "SELECT * FROM observations",
    "dead_letters": "SELECT * FROM dead_letters",
}


async def snapshot(sql: asyncpg.Connection) -> dict[str, list[tuple[object, ...]]]:
    """Every row an older lastseen wrote, in the columns it knew."""
    return {
        table: [tuple(r) for r in await sql.fetch(f"{query} ORDER BY 1, 2")]
        for table, query in SNAPSHOT.items()
    }


@pytest.mark.parametrize("version", OLDER)
async def test_an_older_schema_with_data_upgrades_to_the_newest(
    empty_url: str, version: int
) -> None:
    """From each older schema version: migrate applies exactly the missing migrations; every
    row survives; and the service's queries work on the upgraded rows: the reaper deletes the
    expired object and keeps the one a pending callback names (that callback was stored before
    the reaper noted pending ids), a stale pending callback expires, a claim takes what is
    claimable and not what another worker leases, results complete a callback, new callbacks
    follow the old ids, and dead letters, objects and idempotency keys read back."""
    sql = await asyncpg.connect(empty_url)
    db = await Database.open(empty_url, size=2, timeout=10)
    try:
        await migrate_to(sql, version)
        roles = await store_data(sql, version)
        before = await snapshot(sql)

        assert await db.migrate() == [v for v, _, _ in MIGRATIONS if v > version]
        assert await sql.fetchval("SELECT max(version) FROM lastseen_migrations") == NEWEST
        assert await snapshot(sql) == before
        assert await db.migrate() == []

        cutoff = datetime.fromtimestamp(time.time() - TTL, UTC)
        assert await db.reap(cutoff, 100) == (1, 1)
        assert {r[0] for r in await sql.fetch("SELECT id FROM objects")} == {4, 9}
        assert await db.expire_stale_callbacks(cutoff, 100) == 1
        claimable = {roles[role] for role in ("fresh", "imported") if role in roles}
        claimed = await db.claim("new-worker", 10, 30.0)
        assert {c.id for c in claimed} == claimable
        fresh = next(c for c in claimed if c.id == roles["fresh"])
        assert fresh.object_ids == [2, 3, 9]
        batch = ResultBatch(
            ids=[2, 3, 9],
            seen_at=[fresh.received_at] * 3,
            online=[True, False, False],
            dead_letters=[],
            completed=[fresh.id],
        )
        assert await db.write_results(batch, cutoff) == (1, 1)
        assert await db.get_object(2) == fresh.received_at
        assert await db.get_object(9) is None
        assert await db.release_holder("old-worker") == 1

        (new,) = await db.insert_callbacks([time.time()], [id_array([11])])
        assert new > max(roles.values())
        letters = await db.list_dead_letters(DeadLetterFilter(), 10)
        assert [(d.callback_id, d.object_id, d.reason) for d, _ in letters] == [
            (roles["done"], 7, "http_4xx")
        ]
        keyed = await db.insert_callbacks_keyed([time.time()], [id_array([12])], ["key-1"], ["d1"])
        if version >= 5:
            assert keyed == [(roles["done"], "d1")]  # the key stored before the upgrade holds
        else:
            assert keyed[0][0] > new
        later = datetime.fromtimestamp(time.time() + TTL, UTC)
        assert await db.prune(cutoff, cutoff, later, cutoff, 100) == (0, 0, 1, 0)
    finally:
        await db.close()
        await sql.close()
