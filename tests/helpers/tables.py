"""Reading what the service stored."""

from __future__ import annotations

from datetime import datetime

import asyncpg


async def objects(sql: asyncpg.Connection) -> dict[int, datetime]:
    """The objects table: id -> last_seen."""
    return {r["id"]: r["last_seen"] for r in await sql.fetch("SELECT * FROM objects")}


async def received_at(sql: asyncpg.Connection, callback_id: int) -> datetime:
    value = await sql.fetchval("SELECT received_at FROM callbacks WHERE id = $1", callback_id)
    assert isinstance(value, datetime)
    return value
