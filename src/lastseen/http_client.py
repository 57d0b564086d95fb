"""A small HTTP/1.1 client for the one request lastseen makes: ``GET /objects/{id}``.

Why not aiohttp's client here. A worker keeps thousands of these requests in flight, and at a
few thousand per second aiohttp's per-request machinery (URL objects, timers, stream readers,
a task per connection step) was most of the worker's CPU. This client keeps a pool of
keep-alive connections to one origin, writes a prebuilt request, and parses the answer in
``data_received``: status line, headers, then a body framed by Content-Length, chunked
encoding, or the end of the connection. Measured on this machine it costs several times less
CPU per request (see the README); aiohttp stays the HTTP server and the simulator's client.

A connection taken from the pool may have been closed by the server meanwhile; if it fails
before any byte of the answer arrives, the request is sent once more on a new connection, as
browsers and aiohttp do. Every other failure is the caller's to retry.
"""

from __future__ import annotations

import asyncio
import ssl
from urllib.parse import urlsplit

# An answer about one object is a few dozen bytes; anything this large is not one.
MAX_RESPONSE = 1 << 20


class HttpError(Exception):
    """The request got no usable answer: connection trouble, a timeout, or a bad response."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class _Answer(asyncio.Protocol):
    """One connection; parses one response at a time into ``waiter``."""

    def __init__(self, pool: UpstreamClient) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.closed = False
        self.keep_alive = True
        self.received_any = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send(self, request: bytes, waiter: asyncio.Future[tuple[int, bytes]]) -> None:
        assert self.transport is not None
        self.buffer.clear()
        self.received_any = False
        self.waiter = waiter
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        self.buffer += data
        self._parse(eof=False)

    def eof_received(self) -> bool | None:
        self._parse(eof=True)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self._parse(eof=True)
        if self.waiter is not None and not self.waiter.done():
            kind = "stale" if not self.received_any else "connection"
            self.waiter.set_exception(HttpError(kind, repr(exc) if exc else "connection closed"))

    def _fail(self, detail: str) -> None:
        self.keep_alive = False
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(HttpError("bad_response", detail))
        self.close()

    def _parse(self, *, eof: bool) -> None:
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        buffer = self.buffer
        if len(buffer) > MAX_RESPONSE:
            self._fail(f"the answer is larger than {MAX_RESPONSE} bytes")
            return
        head_end = buffer.find(b"\r\n\r\n")
        if head_end < 0:
            if eof and self.received_any:
                self._fail("the connection closed inside the headers")
            return  # with nothing received at all, connection_lost reports it
        lines = bytes(buffer[:head_end]).split(b"\r\n")
        try:
            version, code = lines[0].split(b" ", 2)[:2]
            status = int(code)
        except ValueError:
            self._fail(f"bad status line {lines[0][:80]!r}")
            return
        if 100 <= status < 200:
            # An interim answer (100 Continue, 103 Early Hints): the real one follows.
            del buffer[: head_end + 4]
            self._parse(eof=eof)
            return
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        connection = headers.get(b"connection", b"").lower()
        self.keep_alive = (
            connection != b"close" if version == b"HTTP/1.1" else connection == b"keep-alive"
        )
        start = head_end + 4
        body: bytes | None
        if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            try:
                body = self._dechunk(start)
            except ValueError:
                self._fail("bad chunk size")
                return
            if body is None and eof:
                self._fail("the connection closed inside a chunked body")
                return
        elif b"content-length" in headers:
            try:
                length = int(headers[b"content-length"])
                if length < 0:
                    raise ValueError(length)
            except ValueError:
                self._fail("bad Content-Length")
                return
            body = bytes(buffer[start : start + length]) if len(buffer) - start >= length else None
            if body is None and eof:
                self._fail("the connection closed inside the body")
                return
        elif status in (204, 304):
            body = b""
        else:
            # No framing: the body runs to the end of the connection.
            self.keep_alive = False
            body = bytes(buffer[start:]) if eof else None
        if body is not None:
            self.waiter = None
            waiter.set_result((status, body))

    def _dechunk(self, position: int) -> bytes | None:
        buffer = self.buffer
        parts: list[bytes] = []
        while True:
            line_end = buffer.find(b"\r\n", position)
            if line_end < 0:
                return None
            size = int(bytes(buffer[position:line_end]).split(b";")[0] or b"0", 16)
            position = line_end + 2
            if size == 0:
                # Trailers, if any, end with an empty line.
                end = buffer.find(b"\r\n", position)
                while end > position:
                    position = end + 2
                    end = buffer.find(b"\r\n", position)
                return b"".join(parts) if end >= 0 else None
            if len(buffer) < position + size + 2:
                return None
            parts.append(bytes(buffer[position : position + size]))
            position += size + 2

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class UpstreamClient:
    """Keep-alive GETs against one origin (``http://host:port`` or ``https://...``)."""

    def __init__(self, base_url: str, *, timeout: float, max_idle: int = 20_000) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http(s) URL, got {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl: ssl.SSLContext | None = (
            ssl.create_default_context() if parts.scheme == "https" else None
        )
        self.prefix = parts.path.rstrip("/")
        default_port = (parts.scheme == "https" and self.port == 443) or self.port == 80
        authority = self.host if default_port else f"{self.host}:{self.port}"
        if ":" in self.host and not default_port:
            authority = f"[{self.host}]:{self.port}"
        self._head = f"Host: {authority}\r\nUser-Agent: lastseen\r\nAccept: */*\r\n\r\n".encode()
        self.timeout = timeout
        self.max_idle = max_idle
        self._idle: list[_Answer] = []
        self._all: set[_Answer] = set()

    def request_bytes(self, path: str) -> bytes:
        return b"GET " + (self.prefix + path).encode() + b" HTTP/1.1\r\n" + self._head

    async def _connect(self) -> _Answer:
        loop = asyncio.get_running_loop()
        try:
            _, protocol = await loop.create_connection(
                lambda: _Answer(self), self.host, self.port, ssl=self.ssl
            )
        except OSError as exc:
            raise HttpError("connection", repr(exc)) from None
        self._all.add(protocol)
        return protocol

    async def get(self, path: str) -> tuple[int, bytes]:
        """(status, body) of ``GET path``, or ``HttpError``; the whole exchange within the
        timeout."""
        request = self.request_bytes(path)
        try:
            async with asyncio.timeout(self.timeout):
                while True:
                    while self._idle and self._idle[-1].closed:
                        self._all.discard(self._idle.pop())
                    reused = bool(self._idle)
                    conn = self._idle.pop() if reused else await self._connect()
                    try:
                        return await self._exchange(conn, request)
                    except HttpError as exc:
                        if exc.reason != "stale":
                            raise
                        if not reused:
                            raise HttpError("connection", exc.detail) from None
                        # The server closed an idle connection; this was not a real attempt.
        except TimeoutError:
            raise HttpError("timeout", f"no answer within {self.timeout:g} s") from None

    async def _exchange(self, conn: _Answer, request: bytes) -> tuple[int, bytes]:
        waiter: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        conn.send(request, waiter)
        try:
            answer = await waiter
        except BaseException:
            self._all.discard(conn)
            conn.close()
            raise
        if conn.keep_alive and not conn.closed and len(self._idle) < self.max_idle:
            self._idle.append(conn)
        else:
            self._all.discard(conn)
            conn.close()
        return answer

    async def close(self) -> None:
        for conn in list(self._all):
            conn.close()
        self._all.clear()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports finish closing
