"""Databases of a test's own, and reading what the service stored in them."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import datetime

import asyncpg

from lastseen.devtools.database import with_database


@contextlib.asynccontextmanager
async def own_database(pg_url: str, name: str, template: str | None = None) -> AsyncIterator[str]:
    """A database named ``name`` on the server of ``pg_url`` (a copy of ``template``, else
    empty), its URL, and dropped afterwards whoever is still connected."""
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        copy = f' TEMPLATE "{template}"' if template else ""
        await conn.execute(f'CREATE DATABASE "{name}"{copy}')
    finally:
        await conn.close()
    try:
        yield with_database(pg_url, name)
    finally:
        conn = await asyncpg.connect(pg_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


async def objects(sql: asyncpg.Connection) -> dict[int, datetime]:
    """The objects table: id -> last_seen."""
    return {r["id"]: r["last_seen"] for r in await sql.fetch("SELECT * FROM objects")}


async def received_at(sql: asyncpg.Connection, callback_id: int) -> datetime:
    value = await sql.fetchval("SELECT received_at FROM callbacks WHERE id = $1", callback_id)
    assert isinstance(value, datetime)
    return value
