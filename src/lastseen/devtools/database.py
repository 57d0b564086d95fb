"""What only the tools ask of a database (the demo, the benchmark, the tests): the URL of
another database on a server, and the queries of devtools/queries.sql on the service's pool."""

from __future__ import annotations

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
