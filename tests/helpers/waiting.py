"""Waiting for a condition that nothing signals: the state of another process, a database row."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable

import asyncpg


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0, every: float = 0.02
) -> None:
    """Waits until ``check()`` (plain or async) is true; fails the test after ``timeout`` s."""
    async with asyncio.timeout(timeout):
        while True:
            result = check()
            if await result if inspect.isawaitable(result) else result:
                return
            await asyncio.sleep(every)


async def all_done(sql: asyncpg.Connection, expected: int = 1, timeout: float = 20.0) -> None:
    """Waits until at least ``expected`` callbacks are stored and none is pending."""

    async def check() -> bool:
        total, pending = await sql.fetchrow(
            "SELECT count(*), count(*) FILTER (WHERE done_at IS NULL) FROM callbacks"
        )
        return bool(pending == 0 and total >= expected)

    await eventually(check, timeout=timeout)
