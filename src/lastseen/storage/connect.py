"""The pool a process opens from its settings: on the configured PostgreSQL, or on an embedded
one started for it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from lastseen.config.settings import Settings
from lastseen.storage.database import Database
from lastseen.storage.embedded import EmbeddedPostgres

DB_TIMEOUT = 10.0


@contextlib.asynccontextmanager
async def database(settings: Settings) -> AsyncIterator[Database]:
    """The pool, on the configured database or on an embedded one started for it; on exit the
    pool closes, then the embedded server stops (if no other lastseen process uses it)."""
    embedded = None
    url = settings.database_url
    if url is None:
        embedded = EmbeddedPostgres(settings.data_dir)
        url = await asyncio.to_thread(embedded.start)
    try:
        db = await Database.open(
            url,
            size=settings.pool_size,
            timeout=DB_TIMEOUT,
            tcp_timeout=settings.database_tcp_timeout,
        )
        try:
            yield db
        finally:
            await db.close()
    finally:
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
