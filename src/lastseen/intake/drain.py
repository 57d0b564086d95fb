"""Draining the spool: its oldest callbacks moved into the inbox, exactly once."""

from __future__ import annotations

from lastseen.intake.spool import Spool
from lastseen.storage.database import Database

DRAIN_BATCH = 1000  # spooled callbacks moved into the inbox per transaction


async def drain_batch(spool: Spool, db: Database) -> int:
    """Moves the oldest spooled callbacks into the inbox; how many (0: the spool is empty).

    Exactly once: the inbox skips keys it already has, so a drain that stopped between the
    two steps moves nothing twice when it runs again.
    """
    batch = await spool.peek(DRAIN_BATCH)
    if batch:
        await db.insert_keyed_callbacks(
            [s.received_at for s in batch], [s.ids for s in batch], [s.key for s in batch]
        )
        await spool.forget(batch)
    return len(batch)
