"""The lastseen command as a subprocess."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
from pathlib import Path
from typing import Any

from helpers.waiting import eventually
from lastseen.devtools.launch import LASTSEEN, clean_environment


@dataclasses.dataclass(frozen=True)
class Finished:
    code: int
    stdout: str
    stderr: str


async def run_cli(
    *args: str | Path, timeout: float = 60.0, env: dict[str, str] | None = None
) -> Finished:
    """Runs ``lastseen ARGS`` to the end, without a terminal, with ``env`` added to the
    environment; returns its status and output."""
    environment = clean_environment(**{**(env or {}), "LASTSEEN_LOG_FORMAT": "json"})
    return await run_to_end([*LASTSEEN, *map(str, args)], environment, timeout)


async def run_to_end(argv: list[str], env: dict[str, str], timeout: float) -> Finished:
    """Runs ``argv`` without a terminal to the end, or kills it after ``timeout`` seconds
    (and raises ``TimeoutError``); its status and output."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Finished(proc.returncode, out.decode(), err.decode())


class Background:
    """``lastseen ARGS`` left running; ``logs`` are its JSON log lines."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.logs: list[dict[str, Any]] = []
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, *args: str | Path) -> Background:
        proc = await asyncio.create_subprocess_exec(
            *LASTSEEN,
            *map(str, args),
            "--log-format",
            "json",
            stdin=asyncio.subprocess.DEVNULL,
            env=clean_environment(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(proc)

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            try:
                self.logs.append(json.loads(raw))
            except ValueError:
                self.logs.append({"event": raw.decode(errors="replace").rstrip()})

    async def event(self, name: str, timeout: float = 30.0) -> dict[str, Any]:
        """The first log line with this event, once it is there."""

        async def logged() -> bool:
            if self.proc.returncode is not None:
                raise AssertionError(f"exited with {self.proc.returncode}: {self.logs[-5:]}")
            return any(line.get("event") == name for line in self.logs)

        await eventually(logged, timeout=timeout)
        return next(line for line in self.logs if line.get("event") == name)

    async def stop(self, timeout: float = 30.0) -> tuple[int, str]:
        """SIGTERM; waits for the exit; returns the status and what it printed."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        assert self.proc.stdout is not None
        out = await asyncio.wait_for(self.proc.stdout.read(), timeout)
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await self._reader
        return code, out.decode()

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
