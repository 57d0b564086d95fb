"""One keep-alive connection to the upstream, as an asyncio protocol: it sends one request at a
time and parses the answer as its bytes arrive (the client's pool is in client.py).

The status line, the headers, then a body framed by Content-Length, chunked encoding, or the
end of the connection; interim (1xx) answers are skipped. Each segment is looked at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

# An answer about one object is a few dozen bytes; anything this large is not one. The cap
# counts every byte of one response, interim answers included, and bounds the memory of a
# connection: 16,384 connections in flight hold at most 256 MiB of answers.
MAX_RESPONSE = 16 << 10


_MAX_CHUNK_LINE = 64  # "ffffffff;name=value": a chunk-size line longer than this is not one


Answer = tuple[int, bytes]  # (status, body)


InStep = Callable[[int, bytes], bool]


OnAnswer = Callable[["Answer | HttpError"], None]
# Told of each exchange a connection settles: the connection, the exchange, its result.
Settled = Callable[["Connection", "Exchange", "Answer | HttpError"], None]


class HttpError(Exception):
    """The request got no usable answer: connection trouble, a timeout, or a bad response."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def client_closed() -> HttpError:
    # A new one per request: a shared exception would gather every raiser's traceback.
    return HttpError("connection", "the client closed")


class Exchange:
    """One request, from its first send to its answer."""

    __slots__ = ("deadline", "in_step", "on_answer", "request", "reused")

    def __init__(self, request: bytes, in_step: InStep, on_answer: OnAnswer, deadline: float):
        self.request = request
        self.in_step = in_step
        self.on_answer = on_answer
        self.deadline = deadline
        self.reused = False  # sent on a pooled connection, which the server may have closed


class Connection(asyncio.Protocol):
    """One connection; parses one response at a time for ``exchange``.

    Parsing is incremental: each segment is looked at once, whatever the segmentation (a
    response in one-byte segments costs as little as one in a single segment), interim answers
    are skipped in a loop, and a response whose size passes ``max_response`` fails at once.
    """

    def __init__(self, settled: Settled, max_response: int) -> None:
        self.settled = settled
        self.max_response = max_response
        self.transport: asyncio.Transport | None = None
        self.exchange: Exchange | None = None
        self.exchanges = 0  # requests sent on this connection: tells a timeout whose it is
        self.closed = False
        self.keep_alive = True
        self._start()

    def _start(self) -> None:
        self.buffer = bytearray()
        self.received = 0  # bytes of this response so far, interim answers included
        self.scanned = 0  # where the search for the end of the head (or a line) resumes
        self.status = 0
        self.framing = ""  # "" while in the head; then "length", "chunked", "eof" or "none"
        self.length = 0
        self.parts: list[bytes] = []  # a chunked body's chunks so far
        self.trailers = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, exchange: Exchange) -> None:
        assert self.transport is not None
        self._start()
        self.exchange = exchange
        self.exchanges += 1
        self.transport.write(exchange.request)

    def _settle(self, result: Answer | HttpError) -> None:
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            self.settled(self, exchange, result)

    def time_out(self, exchange: int, detail: str) -> None:
        """Fails the request ``exchange`` if it is still waiting."""
        if exchange == self.exchanges and self.exchange is not None:
            self.keep_alive = False
            self._settle(HttpError("timeout", detail))

    def data_received(self, data: bytes) -> None:
        if self.exchange is None:
            # Bytes nobody asked for: the next answer on this connection could not be trusted.
            self.keep_alive = False
            self.close()
            return
        self.received += len(data)
        if self.received > self.max_response:
            self._fail(f"the answer is larger than {self.max_response} bytes")
            return
        self.buffer += data
        self._parse(eof=False)

    def eof_received(self) -> bool | None:
        self._parse(eof=True)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.exchange is not None:
            self._parse(eof=True)
        if self.exchange is not None:
            kind = "stale" if not self.received else "connection"
            self._settle(HttpError(kind, repr(exc) if exc else "connection closed"))

    def _fail(self, detail: str) -> None:
        self.keep_alive = False
        self._settle(HttpError("bad_response", detail))
        self.close()

    def _parse(self, *, eof: bool) -> None:
        if self.exchange is None:
            return
        try:
            while not self.framing:
                if not self._head(eof):
                    return
            body = self._body(eof)
        except ValueError as exc:
            self._fail(str(exc))
            return
        if body is not None:
            self._settle((self.status, body))

    def _head(self, eof: bool) -> bool:
        """Parses a head once it is complete; False while it is not. An interim answer
        (100 Continue, 103 Early Hints) is dropped, and the real one's head is next."""
        buffer = self.buffer
        head_end = buffer.find(b"\r\n\r\n", self.scanned)
        if head_end < 0:
            self.scanned = max(0, len(buffer) - 3)
            if eof and self.received:
                raise ValueError("the connection closed inside the headers")
            return False  # with nothing received at all, connection_lost reports it
        lines = bytes(buffer[:head_end]).split(b"\r\n")
        del buffer[: head_end + 4]
        self.scanned = 0
        try:
            version, code = lines[0].split(b" ", 2)[:2]
            status = int(code)
        except ValueError:
            raise ValueError(f"bad status line {lines[0][:80]!r}") from None
        if 100 <= status < 200:
            return True
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        connection = headers.get(b"connection", b"").lower()
        self.keep_alive = (
            connection != b"close" if version == b"HTTP/1.1" else connection == b"keep-alive"
        )
        self.status = status
        if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            self.framing = "chunked"
        elif b"content-length" in headers:
            try:
                self.length = int(headers[b"content-length"])
            except ValueError:
                raise ValueError("bad Content-Length") from None
            if not 0 <= self.length <= self.max_response:
                raise ValueError(f"Content-Length {self.length} out of bounds")
            self.framing = "length"
        elif status in (204, 304):
            self.framing = "none"
        else:
            # No framing: the body runs to the end of the connection.
            self.keep_alive = False
            self.framing = "eof"
        return True

    def _body(self, eof: bool) -> bytes | None:
        """The body once it is complete, else None."""
        buffer = self.buffer
        body: bytes | None
        if self.framing == "none":
            body = b""
        elif self.framing == "length":
            body = bytes(buffer[: self.length]) if len(buffer) >= self.length else None
            if body is not None and len(buffer) > self.length:
                self.keep_alive = False  # more than was announced: out of step
        elif self.framing == "eof":
            body = bytes(buffer) if eof else None
        else:
            body = self._dechunk()
        if body is None and eof:
            raise ValueError("the connection closed inside the body")
        return body

    def _dechunk(self) -> bytes | None:
        """Moves the complete chunks out of the buffer; the body once the last one is in."""
        buffer = self.buffer
        while True:
            line_end = buffer.find(b"\r\n", self.scanned)
            if line_end < 0:
                self.scanned = max(0, len(buffer) - 1)
                if not self.trailers and len(buffer) > _MAX_CHUNK_LINE:
                    raise ValueError("bad chunk size")
                return None
            if self.trailers:
                # Trailers, if any, end with an empty line.
                del buffer[: line_end + 2]
                self.scanned = 0
                if line_end == 0:
                    if buffer:
                        self.keep_alive = False  # more than the answer: out of step
                    return b"".join(self.parts)
                continue
            try:
                size = int(bytes(buffer[:line_end]).split(b";")[0] or b"0", 16)
            except ValueError:
                raise ValueError("bad chunk size") from None
            if size < 0:
                raise ValueError("bad chunk size")
            if size == 0:
                del buffer[: line_end + 2]
                self.scanned = 0
                self.trailers = True
                continue
            end = line_end + 2 + size
            if len(buffer) < end + 2:
                # The size line stays; the next search for it starts at its end.
                self.scanned = line_end
                return None
            if buffer[end : end + 2] != b"\r\n":
                raise ValueError("a chunk longer than its size")
            self.parts.append(bytes(buffer[line_end + 2 : end]))
            del buffer[: end + 2]
            self.scanned = 0

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()
