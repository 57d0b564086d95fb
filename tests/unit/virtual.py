"""An event loop on a ``ManualClock``: its time is the clock's monotonic reading, and when it has
nothing to do but wait for a timer it moves the clock to that timer instead of sleeping.

So a backoff of 30 s, a TTL running out or an outage's probes take no real time, and happen in
the order their timers say. Only for code that does no real I/O: a socket that would answer
later is not waited for (the clock jumps past it), and a loop left with nothing scheduled fails
at once instead of hanging until the test's timeout.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from lastseen.core.clock import ManualClock

T = TypeVar("T")


class Stuck(AssertionError):
    """Nothing is scheduled and nothing can wake the loop: the test waits for what never comes."""


class _Selector(selectors.DefaultSelector):
    def __init__(self, clock: ManualClock) -> None:
        super().__init__()
        self.clock = clock

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        events = super().select(0)
        if events:
            return events
        if timeout is None:
            raise Stuck("the loop has nothing scheduled: the test waits forever")
        if timeout > 0:
            self.clock.advance(timeout)
        return []


class VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        super().__init__(_Selector(clock))

    def time(self) -> float:
        return self.clock.monotonic()


def run(clock: ManualClock, main: Coroutine[Any, Any, T]) -> T:
    """Runs ``main`` on a fresh loop on ``clock``; fails if a task outlives it."""
    loop = VirtualLoop(clock)
    try:
        result = loop.run_until_complete(main)
        leftover = [task for task in asyncio.all_tasks(loop) if not task.done()]
        assert not leftover, f"tasks outlived the test: {leftover}"
        return result
    finally:
        # Whatever failed, nothing is left pending on a closed loop.
        leftover = [task for task in asyncio.all_tasks(loop) if not task.done()]
        for task in leftover:
            task.cancel()
        if leftover:
            loop.run_until_complete(asyncio.wait(leftover))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


async def until(check: Callable[[], bool], within: float, every: float = 0.01) -> None:
    """Waits, polling every ``every`` seconds of the clock, until ``check()``; fails after
    ``within`` seconds of it (which pass in no time: a broken rule fails at once)."""
    async with asyncio.timeout(within):
        while not check():
            await asyncio.sleep(every)
