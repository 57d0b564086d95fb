"""Monotonic result writes and the reaper's rule, against the real schema."""

from __future__ import annotations

import asyncio
import random
import time
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lastseen.core.errors import DatabaseUnavailable
from lastseen.core.model import DeadLetter
from lastseen.pipeline.reaper import Reaper
from lastseen.storage.arrays import ResultBatch, id_array
from lastseen.storage.database import Database, Q
from lastseen.storage.errors import translate
from lastseen.telemetry.metrics import Metrics

EPOCH = datetime(2030, 1, 1, tzinfo=UTC)
LONG_AGO = datetime(2000, 1, 1, tzinfo=UTC)

# (id, seconds after EPOCH, online); distinct times per id so that "newest" is unambiguous.
results_strategy = st.lists(
    st.tuples(st.integers(0, 6), st.integers(0, 40), st.booleans()),
    max_size=40,
    unique_by=lambda r: (r[0], r[1]),
)


def batch_of(results: list[tuple[int, int, bool]]) -> ResultBatch:
    newest: dict[int, tuple[int, bool]] = {}
    for object_id, t, online in results:  # the writer's own de-duplication: newest per id
        if object_id not in newest or t > newest[object_id][0]:
            newest[object_id] = (t, online)
    ids = list(newest)
    return ResultBatch(
        ids=ids,
        seen_at=[EPOCH + timedelta(seconds=newest[i][0]) for i in ids],
        online=[newest[i][1] for i in ids],
        dead_letters=[],
        completed=[],
    )


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(results=results_strategy, order_seed=st.integers(0, 2**32), splits=st.integers(1, 6))
def test_any_completion_order_gives_the_newest_state(
    db_url: str, results: list[tuple[int, int, bool]], order_seed: int, splits: int
) -> None:
    """Whatever order results arrive in, and however they are batched, each id ends as its
    newest result says: online with that result's receive time, or absent."""
    shuffled = results[:]
    random.Random(order_seed).shuffle(shuffled)
    chunks = [shuffled[i::splits] for i in range(splits)]

    async def apply() -> dict[int, datetime]:
        db = await Database.open(db_url, size=1, timeout=10)
        try:
            await db.pool.execute("TRUNCATE objects, observations")
            for chunk in chunks:
                await db.write_results(batch_of(chunk), LONG_AGO)
            rows = await db.pool.fetch("SELECT id, last_seen FROM objects")
        finally:
            await db.close()
        return {row["id"]: row["last_seen"] for row in rows}

    expected: dict[int, datetime] = {}
    for object_id in {r[0] for r in results}:
        _, t, online = max((r for r in results if r[0] == object_id), key=lambda r: r[1])
        if online:
            expected[object_id] = EPOCH + timedelta(seconds=t)
    assert asyncio.run(apply()) == expected


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    times=st.lists(
        st.datetimes(datetime(1900, 1, 1), datetime(2200, 1, 1), timezones=st.just(UTC)),
        min_size=1,
        max_size=20,
    )
)
def test_receive_times_are_stored_to_the_microsecond(db_url: str, times: list[datetime]) -> None:
    """A result's receive time reaches observations and objects exactly, to the microsecond
    (the writer sends it as a number of microseconds)."""
    ids = list(range(len(times)))

    async def apply() -> tuple[dict[int, datetime], dict[int, datetime]]:
        db = await Database.open(db_url, size=1, timeout=10)
        try:
            await db.pool.execute("TRUNCATE objects, observations")
            batch = ResultBatch(ids, times, [True] * len(ids), dead_letters=[], completed=[])
            await db.write_results(batch, LONG_AGO.replace(year=1800))
            seen = await db.pool.fetch("SELECT id, seen_at FROM observations")
            rows = await db.pool.fetch("SELECT id, last_seen FROM objects")
        finally:
            await db.close()
        return dict((r[0], r[1]) for r in seen), dict((r[0], r[1]) for r in rows)

    expected = dict(zip(ids, times, strict=True))
    assert asyncio.run(apply()) == (expected, expected)


async def test_results_older_than_the_ttl_create_no_row(db: Database) -> None:
    """An online result whose callback is older than the cutoff is recorded but adds no row."""
    cutoff = datetime.now(UTC) - timedelta(seconds=30)
    old = cutoff - timedelta(seconds=1)
    fresh = cutoff + timedelta(seconds=1)
    batch = ResultBatch(
        ids=[1, 2], seen_at=[old, fresh], online=[True, True], dead_letters=[], completed=[]
    )
    assert await db.write_results(batch, cutoff) == (1, 0)
    assert [r[0] for r in await db.list_objects(-1, 10)] == [2]


async def test_concurrent_writers_of_one_id_keep_the_newest(db_url: str) -> None:
    """Two instances writing the same ids at once, in opposite orders, end in the newest state
    and do not deadlock each other into failure."""
    dbs = [await Database.open(db_url, size=2, timeout=10) for _ in range(2)]
    try:
        ids = list(range(200))
        older = ResultBatch(
            ids=ids, seen_at=[EPOCH] * 200, online=[True] * 200, dead_letters=[], completed=[]
        )
        newer = ResultBatch(
            ids=ids[::-1],
            seen_at=[EPOCH + timedelta(seconds=1)] * 200,
            online=[False] * 200,
            dead_letters=[],
            completed=[],
        )
        for _ in range(5):
            await asyncio.gather(
                dbs[0].write_results(older, LONG_AGO), dbs[1].write_results(newer, LONG_AGO)
            )
        assert await dbs[0].count_objects() == 0
    finally:
        for d in dbs:
            await d.close()


async def _pending_callback(sql: asyncpg.Connection, received: datetime, ids: list[int]) -> int:
    return int(
        await sql.fetchval(
            "INSERT INTO callbacks (received_at, object_ids, locked_until)"
            " VALUES ($1, $2, now()) RETURNING id",
            received,
            ids,
        )
    )


def _reaper(db: Database, ttl: float = 5) -> Reaper:
    return Reaper(
        db,
        Metrics(),
        ttl=ttl,
        interval=1,
        audit_retention=60,
        dead_letter_retention=60,
        prune_interval=1,
        idempotency_retention=3600,
    )


def _results(ids: list[int], seen_at: datetime, *, online: bool = True) -> ResultBatch:
    return ResultBatch(
        ids=ids,
        seen_at=[seen_at] * len(ids),
        online=[online] * len(ids),
        dead_letters=[],
        completed=[],
    )


async def test_reaper_spares_objects_named_by_a_pending_callback(
    db: Database, sql: asyncpg.Connection
) -> None:
    """An expired object stays while a callback received within the TTL that names it is
    pending, and is not examined again while it waits; once that callback's id is dead-lettered
    (so no result will renew it), the next round deletes it."""
    now = datetime.now(UTC)
    await sql.execute(
        "INSERT INTO objects VALUES (1, $1), (2, $1), (3, $2)",
        now - timedelta(seconds=10),
        now,
    )
    recent = await _pending_callback(sql, now - timedelta(seconds=1), [1, 7])
    await _pending_callback(sql, now - timedelta(seconds=60), [2])  # older than the TTL
    reaper = _reaper(db)
    assert await reaper.reap_once() == (1, 1)
    assert [r[0] for r in await db.list_objects(-1, 10)] == [1, 3]
    assert await reaper.reap_once() == (0, 0)  # kept: out of the reaper's range
    letter = DeadLetter(recent, 1, now - timedelta(seconds=1), "http_4xx", "404", 1)
    await db.write_results(
        ResultBatch(ids=[], seen_at=[], online=[], dead_letters=[letter], completed=[recent]),
        now - timedelta(seconds=5),
    )
    assert await reaper.reap_once() == (1, 0)
    assert [r[0] for r in await db.list_objects(-1, 10)] == [3]


async def test_a_result_clears_the_reapers_mark(db: Database, sql: asyncpg.Connection) -> None:
    """A kept object whose pending callback's result says online is renewed with that
    callback's receive time and expires a TTL after it, like any other."""
    now = datetime.now(UTC)
    await sql.execute("INSERT INTO objects VALUES (1, $1)", now - timedelta(seconds=10))
    received = now - timedelta(seconds=3)
    await _pending_callback(sql, received, [1])
    reaper = _reaper(db)
    assert await reaper.reap_once() == (0, 1)
    await db.write_results(_results([1], received), now - timedelta(seconds=5))
    row = await sql.fetchrow("SELECT last_seen, kept_for FROM objects WHERE id = 1")
    assert row is not None
    assert (row["last_seen"], row["kept_for"]) == (received, None)


async def test_reaper_notes_a_callback_whose_transaction_commits_late(
    db: Database, sql: asyncpg.Connection, db_url: str
) -> None:
    """A callback stored by a transaction that began before a reaper round and committed after
    it is still noted by the next round: the reaper keeps the object it names."""
    now = datetime.now(UTC)
    await sql.execute("INSERT INTO objects VALUES (1, $1)", now - timedelta(seconds=10))
    reaper = _reaper(db)
    late = await asyncpg.connect(db_url)
    try:
        async with late.transaction():
            await _pending_callback(late, now, [1])
            # A callback from a later transaction, committed first, is noted by this round.
            await _pending_callback(sql, now, [2])
            assert await reaper.reap_once() == (1, 0)
            await sql.execute("INSERT INTO objects VALUES (1, $1)", now - timedelta(seconds=10))
        assert await reaper.reap_once() == (0, 1)
    finally:
        await late.close()
    assert [r[0] for r in await db.list_objects(-1, 10)] == [1]


async def test_prune_removes_old_done_callbacks_observations_and_dead_letters(
    db: Database, sql: asyncpg.Connection
) -> None:
    """Done callbacks older than the audit period, observations older than the TTL and dead
    letters older than their retention go; pending callbacks stay whatever their age, and so
    do recent dead letters."""
    now = datetime.now(UTC)
    old = now - timedelta(hours=2)
    done = await _pending_callback(sql, old, [1])
    await sql.execute("UPDATE callbacks SET done_at = $2 WHERE id = $1", done, old)
    await _pending_callback(sql, old, [2])
    await sql.execute("INSERT INTO observations VALUES (1, $1, true), (2, $2, false)", old, now)
    await sql.execute(
        "INSERT INTO dead_letters (callback_id, object_id, received_at, reason, detail, attempts,"
        " created_at) VALUES (1, 1, $1, 'http_4xx', '', 1, $1), (1, 2, $2, 'http_4xx', '', 1, $2)",
        old,
        now,
    )
    reaper = Reaper(
        db,
        Metrics(),
        ttl=30,
        interval=1,
        audit_retention=3600,
        dead_letter_retention=3600,
        prune_interval=1,
        idempotency_retention=3600,
    )
    assert await reaper.prune_once() == (1, 1, 1, 0)
    assert await sql.fetchval("SELECT object_id FROM dead_letters") == 2
    assert await sql.fetchval("SELECT count(*) FROM callbacks") == 1
    assert await sql.fetchval("SELECT id FROM observations") == 2


def test_driver_errors_of_a_lost_connection_mean_unavailable() -> None:
    """Every error a lost connection makes the driver raise is "unavailable" (waited out and
    retried), not a refusal that would stop the results writer."""
    for error in (
        asyncpg.InternalClientError("cannot switch to state 15; another operation is in progress"),
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        ConnectionResetError(),
        TimeoutError(),
    ):
        assert isinstance(translate("write_results", error), DatabaseUnavailable), error
    refused = asyncpg.UniqueViolationError("duplicate key value")
    assert not isinstance(translate("x", refused), DatabaseUnavailable)


async def test_leasing_a_callback_rewrites_its_row_in_place(
    db: Database, sql: asyncpg.Connection
) -> None:
    """Claiming callbacks of 200 ids, renewing their leases and handing them back are HOT
    updates (no new index entries, no second copy of the id array in the WAL), so leases cost
    the database little whatever the callbacks hold."""
    if int(await sql.fetchval("SHOW server_version_num")) < 150000:
        pytest.skip("pg_stat_force_next_flush() needs PostgreSQL 15")
    literals = [id_array(list(range(i * 1000, i * 1000 + 200))) for i in range(8)]
    await db.insert_callbacks([time.time()] * 8, literals)
    claimed = [r[0] for r in await sql.fetch(Q["claim_callbacks"], "w", 8, 30.0)]
    await sql.fetch(Q["extend_leases"], "w", claimed, 30.0)
    await sql.execute(Q["release_callbacks"], "w", claimed)
    await sql.execute("SELECT pg_stat_force_next_flush()")  # this session's counts, when idle
    counts = await sql.fetchrow(
        "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'callbacks'"
    )
    assert len(claimed) == 8
    assert tuple(counts) == (24, 24)


async def test_an_id_its_pending_callback_dead_lettered_keeps_nothing(
    db: Database, sql: asyncpg.Connection
) -> None:
    """An object falls due after the pending callback naming it has dead-lettered that id (its
    other ids still being looked up): nothing of that callback will renew it, so the reaper
    deletes it at its TTL instead of keeping it a TTL past the callback's receipt. (Found by
    test_simulate's verify: a row 0.3 s past its TTL, once in a few dozen runs.)"""
    now = datetime.now(UTC)
    await sql.execute("INSERT INTO objects VALUES (1, $1), (2, $1)", now - timedelta(seconds=10))
    received = now - timedelta(seconds=1)
    pending = await _pending_callback(sql, received, [1, 2])
    letter = DeadLetter(pending, 1, received, "http_4xx", "400", 1)
    await db.write_results(
        ResultBatch(ids=[], seen_at=[], online=[], dead_letters=[letter], completed=[]),
        now - timedelta(seconds=5),
    )
    assert await _reaper(db).reap_once() == (1, 1)  # 1 deleted; 2 kept for its result
    assert [r[0] for r in await db.list_objects(-1, 10)] == [2]
