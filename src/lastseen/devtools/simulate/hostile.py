"""An upstream that misbehaves on purpose, for the tests and the benchmark: by the last digit
of the id it is asked about, it answers in one-byte chunks (1), with thousands of interim
``100 Continue`` answers before nothing (3), with a 50 MB Content-Length trickled a byte every
50 ms (5), or not at all (7). Every other id gets a well-formed "online" answer at once.
"""

from __future__ import annotations

import asyncio

KINDS = {1: "chunks", 3: "interim", 5: "trickle", 7: "silent"}


def kind_of(object_id: int) -> str | None:
    """How the hostile upstream answers about this id (None: well)."""
    return KINDS.get(object_id % 10)


def answered(object_id: int) -> bool:
    """Whether a correct client gets a result for this id (one-byte chunks are still HTTP)."""
    return kind_of(object_id) in (None, "chunks")


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            request = await reader.readuntil(b"\r\n\r\n")
            object_id = int(request.split(b" ")[1].rsplit(b"/", 1)[1])
            body = b'{"id":%d,"online":true}' % object_id
            kind = kind_of(object_id)
            if kind == "chunks":
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                for byte in body:
                    writer.write(b"1\r\n%c\r\n" % byte)
                    await writer.drain()
                writer.write(b"0\r\n\r\n")
            elif kind == "interim":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" * 3000)
            elif kind == "trickle":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 50000000\r\n\r\n")
                for _ in range(100):
                    writer.write(b"x")
                    await writer.drain()
                    await asyncio.sleep(0.05)
            elif kind == "silent":
                await asyncio.sleep(30)
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
                writer.write(body)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, ValueError):
        pass
    except asyncio.CancelledError:
        pass  # the server is closing: a cancelled handler would be logged as an error
    finally:
        writer.close()


class Hostile:
    """The server, and the handlers of its connections: closing a server leaves those
    running (a silent answer sleeps 30 s), so ``close`` ends them too."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await _serve(reader, writer)
        finally:
            self._handlers.discard(task)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)


async def start() -> tuple[Hostile, str]:
    """The hostile upstream on a free loopback port, and its objects URL."""
    hostile = Hostile()
    # A deep accept queue: released lookups connect in bursts of thousands.
    server = await asyncio.start_server(hostile._handle, "127.0.0.1", 0, backlog=4096)
    hostile.server = server
    return hostile, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
