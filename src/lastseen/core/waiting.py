"""Waiting on work whose answer comes over the network, within a deadline."""

from __future__ import annotations

import asyncio
from typing import Any


async def answered_within(task: asyncio.Task[Any], seconds: float | None, deadline: float) -> bool:
    """Whether ``task`` ends within ``seconds`` of the event loop's own time, never waiting
    past the loop time ``deadline``. Time the loop spends stalled (one turn of a burst of
    thousands of requests can take longer than a commit) is not counted against the
    database: its answer may have arrived meanwhile and wait behind the stall, and a
    healthy database taken for lost would send callbacks to the spool for nothing."""
    if seconds is None:
        await asyncio.wait({task})
        return True
    loop = asyncio.get_running_loop()
    step = seconds / 8
    counted = 0.0
    while True:
        before = loop.time()
        await asyncio.wait({task}, timeout=step)
        if task.done():
            return True
        now = loop.time()
        counted += min(now - before, 2 * step)
        if counted >= seconds or now >= deadline - step:
            return False
