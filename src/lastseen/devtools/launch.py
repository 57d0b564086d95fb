"""lastseen components as subprocesses, for ``lastseen bench`` and the tests.

A ``lastseen serve`` started here listens on a free port (``--listen 127.0.0.1:0``); the URL is
read from its ``listening`` log line, and ``start`` returns once ``/ready`` says 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp

LASTSEEN = [sys.executable, "-m", "lastseen"]


def clean_environment(**extra: str) -> dict[str, str]:
    """This process's environment without its ``LASTSEEN_*`` settings, plus ``extra``: a
    process started by the tools runs with the settings they give it, not the developer's,
    and stops when the process that started it is gone (a test run killed with -9 leaves
    no service behind)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LASTSEEN_")}
    return {**env, "LASTSEEN_EXIT_WITH": str(os.getpid()), **extra}


class ServeProcess:
    """``lastseen serve`` in a subprocess on a free port; its JSON log lines are kept."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, keep_logs: int = 10_000):
        self.args = args
        self.env = clean_environment(**(env or {}))
        self.keep_logs = keep_logs
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""
        self.logs: list[dict[str, Any]] = []
        self._reader: asyncio.Task[None] | None = None
        self.admin_headers: dict[str, str] = {}  # for /metrics, where it has an admin token
        token = self.env.get("LASTSEEN_ADMIN_TOKEN")
        if token is None and "LASTSEEN_ADMIN_TOKEN_FILE" in self.env:
            token = Path(self.env["LASTSEEN_ADMIN_TOKEN_FILE"]).read_text().strip()
        if token is not None:
            self.admin_headers["Authorization"] = f"Bearer {token}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, timeout: float = 60.0) -> ServeProcess:
        self.proc = await asyncio.create_subprocess_exec(
            *LASTSEEN,
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            *self.args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=self.env,
        )
        listening: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read(listening))
        self.url = await asyncio.wait_for(listening, timeout)
        async with asyncio.timeout(timeout), aiohttp.ClientSession() as http:
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(self.url + "/ready") as response:
                        if response.status == 200:
                            return self
                await asyncio.sleep(0.02)

    async def _read(self, listening: asyncio.Future[str]) -> None:
        assert self.proc is not None
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            try:
                line = json.loads(raw)
            except ValueError:
                line = {"event": raw.decode(errors="replace").rstrip()}
            if len(self.logs) < self.keep_logs:
                self.logs.append(line)
            if line.get("event") == "listening" and not listening.done():
                listening.set_result(line["url"])
        if not listening.done():
            listening.set_exception(RuntimeError(f"lastseen serve exited: {self.logs[-5:]}"))

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    async def wait(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        if self._reader is not None:
            await self._reader
        return code

    async def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, then the exit status (SIGKILL if it does not stop in time)."""
        assert self.proc is not None
        if self.proc.returncode is not None:
            return self.proc.returncode
        self.signal(signal.SIGTERM)
        try:
            return await self.wait(timeout)
        except TimeoutError:
            self.kill()
            return await self.wait()

    async def stop(self) -> None:
        """Kills it if it still runs."""
        if self.proc is not None and self.proc.returncode is None:
            self.kill()
            await self.wait()

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.logs if line.get("event") == name]


class SimulateProcess:
    """``lastseen simulate`` in a subprocess; ``upstream_url`` once its upstream listens."""

    def __init__(self, *args: str) -> None:
        self.args = args
        self.proc: asyncio.subprocess.Process | None = None
        self.upstream_url = ""
        self.summary: list[str] = []
        self._stderr: asyncio.Task[None] | None = None
        self._stdout: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, *, wait_for_upstream: bool, timeout: float = 60.0) -> SimulateProcess:
        self.proc = await asyncio.create_subprocess_exec(
            *LASTSEEN,
            "simulate",
            "--log-format",
            "json",
            "--log-level",
            "warning" if not wait_for_upstream else "info",
            *self.args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=clean_environment(),
        )
        listening: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._stderr = asyncio.create_task(self._read_stderr(listening))
        self._stdout = asyncio.create_task(self._read_stdout())
        if wait_for_upstream:
            self.upstream_url = await asyncio.wait_for(listening, timeout)
        return self

    async def _read_stderr(self, listening: asyncio.Future[str]) -> None:
        assert self.proc is not None
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            with contextlib.suppress(ValueError):
                line = json.loads(raw)
                if line.get("event") == "upstream listening" and not listening.done():
                    listening.set_result(line["url"])
        if not listening.done():
            listening.set_exception(RuntimeError("lastseen simulate exited"))
            listening.exception()  # retrieved here when nobody waits for it

    async def _read_stdout(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            self.summary.append(raw.decode(errors="replace").rstrip())

    async def wait(self, timeout: float = 120.0) -> int:
        assert self.proc is not None
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        for task in (self._stderr, self._stdout):
            if task is not None:
                await task
        return code

    async def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return await self.wait(timeout)
        except TimeoutError:
            self.proc.kill()
            return await self.wait()
