"""What only the tools ask of a database (the demo, the benchmark, the tests): the URL of
another database on a server, and the queries of devtools/queries.sql on the service's pool."""

from __future__ import annotations

from datetime import datetime
from urllib.parse import urlsplit, urlunsplit

from lastseen.storage.database import Database, load_queries

Q = load_queries("lastseen.devtools")


def with_database(url: str, name: str) -> str:
    """The URL of database ``name`` on the server of ``url``."""
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


async def empty_tables(db: Database) -> None:
    await db.pool.execute(Q["empty_tables"])


async def holds_data(db: Database) -> bool:
    return bool(await db.pool.fetchval(Q["holds_data"]))


async def server_version(db: Database) -> str:
    return str(await db.pool.fetchval(Q["server_version"]))


async def wal_position(db: Database) -> int:
    return int(await db.pool.fetchval(Q["wal_position"]))


async def count_callbacks(db: Database) -> int:
    return int(await db.pool.fetchval(Q["count_callbacks"]))


async def objects_up_to(db: Database, limit: int) -> dict[int, datetime] | None:
    """Every online object and its ``last_seen``; None when there are more than ``limit``."""
    rows = await db.pool.fetch(Q["objects_up_to"], limit)
    return None if len(rows) > limit else {r[0]: r[1] for r in rows}


async def recent_dead_letters(db: Database, limit: int) -> list[tuple[int, int, str]]:
    """The newest dead letters: (callback id, object id, reason)."""
    return [(r[0], r[1], r[2]) for r in await db.pool.fetch(Q["recent_dead_letters"], limit)]


async def newest_callback(db: Database) -> int:
    return int(await db.pool.fetchval(Q["newest_callback"]))


async def retries_after(db: Database, callback_id: int) -> list[tuple[int, int, list[int]]]:
    """Callbacks made by retrying dead letters, after ``callback_id``: (id, retry of, ids)."""
    rows = await db.pool.fetch(Q["retries_after"], callback_id)
    return [(r[0], r[1], list(r[2])) for r in rows]


async def is_superuser(db: Database) -> bool:
    return bool(await db.pool.fetchval(Q["is_superuser"]))


async def set_read_only(db: Database, on: bool) -> None:
    """The whole server refuses writes (``on``) or takes them again, open sessions included;
    ``db`` needs a superuser."""
    async with db.pool.acquire() as conn:
        await conn.execute(Q["writable_session"])
        await conn.execute(Q["refuse_writes" if on else "take_writes"])
        await conn.execute(Q["reload_configuration"])
