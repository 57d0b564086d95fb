"""A TCP proxy in front of PostgreSQL, to take the database away and bring it back: ``stop``
cuts every connection and refuses new ones, as a stopped or failed-over server does; ``start``
lets them through again. ``partition`` keeps every connection open and passes no bytes either
way (new connections are taken and hang), as a network that drops packets does; ``heal``
delivers what waited, as TCP's retransmissions would. For the tests and the benchmark."""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import parse_qs, urlsplit, urlunsplit


class DatabaseProxy:
    """A loopback port in front of the PostgreSQL server of ``url`` (Unix socket or TCP)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        socket_dir = parse_qs(parts.query).get("host", [""])[0]
        self._unix = f"{socket_dir}/.s.PGSQL.{parts.port or 5432}" if socket_dir else None
        self._tcp = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self._url = parts
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._stops = 0  # how many times stop was called: a connection from before is cut
        self._flowing = asyncio.Event()
        self._flowing.set()

    def url(self, database: str | None = None) -> str:
        """The URL of the same server and user through this proxy (the same database, or
        ``database``)."""
        user = self._url.username or "postgres"
        password = f":{self._url.password}" if self._url.password else ""
        path = f"/{database}" if database is not None else self._url.path
        netloc = f"{user}{password}@127.0.0.1:{self.port}"
        return urlunsplit(("postgresql", netloc, path, "", ""))

    async def start(self) -> None:
        """Lets connections through (again, on the same port)."""
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stops = self._stops
        try:
            if self._unix is not None:
                up_reader, up_writer = await asyncio.open_unix_connection(self._unix)
            else:
                up_reader, up_writer = await asyncio.open_connection(*self._tcp)
        except OSError:
            writer.close()
            return
        if stops != self._stops:
            # Accepted just before a stop, connected just after: it must not outlive it.
            up_writer.close()
            writer.close()
            return
        tasks = {
            asyncio.create_task(self._pipe(reader, up_writer)),
            asyncio.create_task(self._pipe(up_reader, writer)),
        }
        self._pipes.update(tasks)
        await asyncio.wait(tasks)
        self._pipes.difference_update(tasks)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    def partition(self) -> None:
        """Passes no more bytes, on open connections and new ones, until ``heal``."""
        self._flowing.clear()

    def heal(self) -> None:
        self._flowing.set()

    async def stop(self) -> None:
        """Refuses new connections and cuts the open ones."""
        self._stops += 1
        if self._server is not None:
            self._server.close()
            for task in list(self._pipes):
                task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None
