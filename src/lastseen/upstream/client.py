"""A small HTTP/1.1 client for the one request lastseen makes: ``GET /objects/{id}``.

Why not aiohttp's client here. A worker keeps thousands of these requests in flight, and at a
few thousand per second aiohttp's per-request machinery (URL objects, timers, stream readers,
a task per connection step) was most of the worker's CPU. This client keeps a pool of
keep-alive connections to one origin, writes a prebuilt request, and parses the answer in
``data_received``: status line, headers, then a body framed by Content-Length, chunked
encoding, or the end of the connection. Measured on this machine it costs several times less
CPU per request (docs/explanation/design-decisions.md); aiohttp stays the HTTP server and the
simulator's client.

A connection taken from the pool may have been closed by the server meanwhile; if it fails
before any byte of the answer arrives, the request is sent once more on a new connection, as
browsers and aiohttp do. Every other failure is the caller's to retry.

Timeouts. Every request has the same timeout, so deadlines come in the order requests are
sent: one queue of (deadline, connection, exchange number) and one timer for its head fail
the requests that are late. ``asyncio.timeout`` per request (a timer handle, a context and
a cancellation each) was 13% of the worker's CPU at 4,000 lookups/s.

Completions. ``start`` hands the answer (or the ``HttpError``) to a callback, called from the
connection's protocol callbacks or the deadline timer, never from inside ``start``: no task,
coroutine chain or future per request. ``get`` awaits the same, for callers that want a
coroutine.
"""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import ssl
from pathlib import Path
from urllib.parse import urlsplit

from lastseen.upstream.connection import (
    MAX_RESPONSE,
    Answer,
    Connection,
    Exchange,
    HttpError,
    InStep,
    OnAnswer,
    client_closed,
)

# Connects under way at once; more requests wait for one of those, or for a connection an answer
# frees. A worker that starts 20,000 lookups at once (a cold start under load, a backlog claimed)
# would otherwise open 20,000 connections in a burst that overflows the upstream's accept queue:
# lost SYNs are retried after 1, 3, 7 s, the lookups time out, and the reconnects cost more.
MAX_CONNECTING = 256


def unreachable(exc: OSError) -> str:
    """Why a connection could not be made, as an operator reads it ("connection refused"),
    not as Python prints it ("[Errno 111] Connect call failed ('127.0.0.1', 9010)")."""
    if isinstance(exc, socket.gaierror):
        return f"name not resolved ({exc.strerror})"
    if exc.errno:
        return os.strerror(exc.errno).lower()
    return repr(exc)


class UpstreamClient:
    """Keep-alive GETs against one origin (``http://host:port`` or ``https://...``)."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float,
        max_idle: int = 20_000,
        max_response: int = MAX_RESPONSE,
        max_connecting: int = MAX_CONNECTING,
        ca_file: Path | None = None,
        client_cert: Path | None = None,
        client_key: Path | None = None,
        header: str | None = None,
    ) -> None:
        """``ca_file``: the CAs that sign an HTTPS upstream's certificate (else the system's);
        ``client_cert`` (and ``client_key``): a certificate to present; ``header``: one
        ``Name: value`` line sent with every request (an API key: kept only in the request
        bytes, never logged)."""
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http(s) URL, got {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self.ssl = ssl.create_default_context(cafile=ca_file)
            if client_cert is not None:
                self.ssl.load_cert_chain(client_cert, client_key)
        self.prefix = parts.path.rstrip("/")
        default_port = (parts.scheme == "https" and self.port == 443) or self.port == 80
        authority = self.host if default_port else f"{self.host}:{self.port}"
        if ":" in self.host and not default_port:
            authority = f"[{self.host}]:{self.port}"
        extra = "" if header is None else header + "\r\n"
        self._head = (
            f"Host: {authority}\r\nUser-Agent: lastseen\r\nAccept: */*\r\n{extra}\r\n".encode()
        )
        self.timeout = timeout
        self.max_idle = max_idle
        self.max_response = max_response
        self._idle: list[Connection] = []
        self._all: set[Connection] = set()
        # (deadline, connection, exchange) in the order sent: with one timeout for all,
        # nearly the order of the deadlines (a resend after a stale connection keeps its
        # first deadline, and is failed at most a few milliseconds late).
        self._deadlines: collections.deque[tuple[float, Connection, int]] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self._connecting: set[asyncio.Task[None]] = set()
        self.max_connecting = max_connecting
        # Requests waiting for a connection while ``max_connecting`` connects are under way.
        self._queued: collections.deque[Exchange] = collections.deque()
        self._closed = False

    def request_bytes(self, path: str) -> bytes:
        return b"GET " + (self.prefix + path).encode() + b" HTTP/1.1\r\n" + self._head

    def _new_connection(self) -> Connection:
        return Connection(self._settled, self.max_response)

    async def _connect(self, deadline: float) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(deadline):
                _, protocol = await loop.create_connection(
                    lambda: Connection(self._settled, self.max_response),
                    self.host,
                    self.port,
                    ssl=self.ssl,
                )
        except OSError as exc:
            raise HttpError("connection", unreachable(exc)) from None
        except TimeoutError:
            raise HttpError("timeout", f"no connection within {self.timeout:g} s") from None
        self._all.add(protocol)
        return protocol

    def _expire(self) -> None:
        """Fails the requests whose deadline has passed; sets the timer for the next one."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadlines = self._deadlines
        detail = f"no answer within {self.timeout:g} s"
        while deadlines and deadlines[0][0] <= now:
            _, conn, exchange = deadlines.popleft()
            conn.time_out(exchange, detail)
        self._timer = loop.call_at(deadlines[0][0], self._expire) if deadlines else None

    def start(self, path: str, in_step: InStep, on_answer: OnAnswer) -> None:
        """Sends ``GET path``; ``on_answer`` gets (status, body), or an ``HttpError``, once,
        the whole exchange within the timeout. A connection whose answer ``in_step`` rejects
        is not used again."""
        deadline = asyncio.get_running_loop().time() + self.timeout
        self._send(Exchange(self.request_bytes(path), in_step, on_answer, deadline))

    async def get(self, path: str, in_step: InStep = lambda status, body: True) -> Answer:
        """``start``, awaited: (status, body), or ``HttpError``."""
        done: asyncio.Future[Answer | HttpError] = asyncio.get_running_loop().create_future()

        def answered(result: Answer | HttpError) -> None:
            if not done.done():
                done.set_result(result)

        self.start(path, in_step, answered)
        result = await done
        if isinstance(result, HttpError):
            raise result
        return result

    def _send(self, exchange: Exchange) -> None:
        if self._closed:
            # Told on the next turn of the loop: an answer never comes from inside ``start``,
            # so a caller that starts the next request from its callback cannot recurse.
            asyncio.get_running_loop().call_soon(exchange.on_answer, client_closed())
            return
        idle = self._idle
        while idle and idle[-1].closed:
            self._all.discard(idle.pop())
        if idle:
            exchange.reused = True
            self._dispatch(idle.pop(), exchange)
        elif len(self._connecting) < self.max_connecting:
            exchange.reused = False
            task = asyncio.get_running_loop().create_task(self._connect_and_send(exchange))
            self._connecting.add(task)
            task.add_done_callback(self._connected)
        else:
            self._queued.append(exchange)

    def _connected(self, task: asyncio.Task[None]) -> None:
        """A connect ended: the next queued request may start one (or take a free
        connection)."""
        self._connecting.discard(task)
        if not self._closed:
            exchange = self._next_queued()
            if exchange is not None:
                self._send(exchange)

    def _next_queued(self) -> Exchange | None:
        """The oldest queued request still within its deadline; the late ones fail."""
        now = asyncio.get_running_loop().time()
        while self._queued:
            exchange = self._queued.popleft()
            if exchange.deadline > now:
                return exchange
            exchange.on_answer(HttpError("timeout", f"no connection within {self.timeout:g} s"))
        return None

    async def _connect_and_send(self, exchange: Exchange) -> None:
        try:
            conn = await self._connect(exchange.deadline)
        except HttpError as exc:
            exchange.on_answer(exc)
            return
        except asyncio.CancelledError:
            exchange.on_answer(client_closed())
            raise
        except Exception as exc:  # whatever it is, the caller hears of it: no request is lost
            exchange.on_answer(HttpError("connection", repr(exc)))
            return
        self._dispatch(conn, exchange)

    def _dispatch(self, conn: Connection, exchange: Exchange) -> None:
        conn.send(exchange)
        self._deadlines.append((exchange.deadline, conn, conn.exchanges))
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_at(exchange.deadline, self._expire)

    def _settled(self, conn: Connection, exchange: Exchange, result: Answer | HttpError) -> None:
        """``conn`` has the answer to ``exchange``, or failed it: back to the pool or closed,
        then the caller is told (a stale pooled connection is not a real attempt: the request
        goes again)."""
        if isinstance(result, HttpError):
            self._all.discard(conn)
            conn.close()
            if result.reason == "stale":
                if exchange.reused:
                    self._send(exchange)  # the server closed an idle connection meanwhile
                    return
                result = HttpError("connection", result.detail)
            exchange.on_answer(result)
            return
        reusable = exchange.in_step(*result) and conn.keep_alive and not conn.closed
        waiting = self._next_queued() if reusable and self._queued else None
        if waiting is not None:
            waiting.reused = True
            self._dispatch(conn, waiting)
        elif reusable and len(self._idle) < self.max_idle:
            self._idle.append(conn)
        else:
            self._all.discard(conn)
            conn.close()
        exchange.on_answer(result)

    async def close(self) -> None:
        """Closes every connection; requests under way fail with ``HttpError``."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._deadlines.clear()
        for task in self._connecting:
            task.cancel()
        await asyncio.gather(*self._connecting, return_exceptions=True)
        while self._queued:
            self._queued.popleft().on_answer(client_closed())
        for conn in list(self._all):
            conn.close()
        self._all.clear()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports finish closing
