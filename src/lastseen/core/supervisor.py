"""Background tasks that are named, referenced and supervised.

A task that dies with an error, or that returns although it should run until cancelled, is
logged and stops the process: a service that silently lost its reaper or its worker would keep
answering 202 while doing nothing with the callbacks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import structlog

log = structlog.get_logger("lastseen.core.supervisor")


class Supervisor:
    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._stopping = False
        self.failed = asyncio.Event()
        self.failure: str | None = None

    def start(self, name: str, coro: Coroutine[Any, Any, Any], *, finite: bool = False) -> None:
        """Runs ``coro`` as task ``name``; ``finite`` tasks may return without it being an error."""
        if name in self._tasks:
            raise ValueError(f"task {name!r} is already running")
        task = asyncio.create_task(coro, name=name)
        self._tasks[name] = task
        task.add_done_callback(lambda t: self._finished(name, t, finite))

    def _finished(self, name: str, task: asyncio.Task[Any], finite: bool) -> None:
        if self._tasks.get(name) is not task:
            return  # cancel() took it: its end was asked for
        del self._tasks[name]
        if task.cancelled() or self._stopping:
            return
        exc = task.exception()
        if exc is not None:
            log.error("background task died", task=name, error=repr(exc), exc_info=exc)
            self.failure = f"task {name} died: {exc!r}"
        elif not finite:
            log.error("background task exited", task=name)
            self.failure = f"task {name} exited"
        else:
            return
        self.failed.set()

    async def wait(self, name: str, timeout: float) -> None:
        """Waits up to ``timeout`` seconds for task ``name`` to end by itself."""
        task = self._tasks.get(name)
        if task is not None:
            await asyncio.wait({task}, timeout=timeout)

    async def cancel(self, *names: str) -> None:
        """Cancels the named tasks (an end asked for, not a failure) and waits for them."""
        tasks = [task for name in names if (task := self._tasks.pop(name, None)) is not None]
        await _cancelled(tasks)
        await self._reap(tasks)

    async def stop(self, grace: float = 0.0) -> None:
        """Waits up to ``grace`` seconds for the tasks to end by themselves, then cancels them."""
        self._stopping = True
        tasks = list(self._tasks.values())
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace) if grace > 0 else ((), set(tasks))
        await _cancelled(list(pending))
        await self._reap(tasks)

    @staticmethod
    async def _reap(tasks: list[asyncio.Task[Any]]) -> None:
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for task, result in zip(tasks, results, strict=True):
            if isinstance(result, Exception):
                log.warning("task failed while stopping", task=task.get_name(), error=repr(result))


# How often a task that is still running after its cancel is cancelled again.
RECANCEL_EVERY = 0.5


async def _cancelled(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancels ``tasks`` and returns once they have ended, cancelling again those that go on:
    Python 3.11's ``asyncio.wait_for`` loses a cancel that lands as its inner call completes
    (fixed in 3.12), and a task in a loop around it then runs on, and a stop that waited for
    it would wait forever (seen: a service that did not stop in 30 s, once in a few runs)."""
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=RECANCEL_EVERY)
