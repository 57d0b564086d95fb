"""Helpers that run lastseen as a real subprocess, and a TCP proxy that can cut the database off."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp

LASTSEEN = [sys.executable, "-m", "lastseen"]


class ServeProcess:
    """``lastseen serve`` in a subprocess on a free port; its JSON log lines are kept."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.env = {**os.environ, **(env or {})}
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""
        self.logs: list[dict[str, Any]] = []
        self._reader: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 30.0) -> ServeProcess:
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

    async def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        if self._reader is not None:
            await self._reader
        return code

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.kill()
            await self.wait()

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.logs if line.get("event") == name]


def unix_socket_of(url: str) -> str:
    """The Unix socket of a PostgreSQL URL such as the embedded server's."""
    parts = urlsplit(url)
    host = parse_qs(parts.query).get("host", [""])[0]
    if not host.startswith("/"):
        raise ValueError(f"not a Unix-socket URL: {url}")
    return f"{host}/.s.PGSQL.{parts.port or 5432}"


class DatabaseProxy:
    """A TCP port in front of PostgreSQL's Unix socket, to take the database away and back."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(self.socket_path)
        tasks = {
            asyncio.create_task(self._pipe(reader, up_writer)),
            asyncio.create_task(self._pipe(up_reader, writer)),
        }
        self._pipes.update(tasks)
        await asyncio.wait(tasks)
        self._pipes.difference_update(tasks)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        """Refuses new connections and cuts the open ones."""
        if self._server is not None:
            self._server.close()
            for task in list(self._pipes):
                task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None
