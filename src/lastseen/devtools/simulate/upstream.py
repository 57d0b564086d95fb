"""A stand-in for the upstream lastseen is built for: ``GET /objects/{id}``, slow, sometimes wrong.

Like the reference upstream, it waits a uniform 300 to 4299 ms before every answer (bad
requests included), answers ``{"id": <id>, "online": <bool>}`` as ``text/plain``, has no limit on
concurrent requests, and answers 400 ``invalid id`` to an id that does not parse. Each fault is
drawn per request at its own rate. Every answer is counted; with ``record`` on, each one is kept
(id, time, online, kind) as ground truth for ``lastseen verify``, and an ``on_answer`` sink gets
each one as it is decided (``lastseen simulate`` writes them to a file, so memory stays flat).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import random
import ssl
import time
from collections import Counter
from collections.abc import Callable

OnlineRule = Callable[[int, float], bool]

FAULTS = ("error_5xx", "hang", "malformed", "invalid_400", "wrong_id", "drop")


def even_online(object_id: int, now: float) -> bool:
    return object_id % 2 == 0


def random_online(probability: float, seed: int) -> OnlineRule:
    """Online with ``probability``, fixed per id (a status never changes)."""

    def rule(object_id: int, now: float) -> bool:
        digest = hashlib.blake2b(f"{seed}:{object_id}".encode(), digest_size=8).digest()
        return int.from_bytes(digest) / 2**64 < probability

    return rule


def flipping_online(period: float) -> OnlineRule:
    """Even ids online in even periods, odd ids in odd ones: every status flips each period."""

    def rule(object_id: int, now: float) -> bool:
        return (object_id + int(now // period)) % 2 == 0

    return rule


def parse_online_rule(text: str, seed: int = 0) -> OnlineRule:
    """``even``, ``random:P`` or ``flip:SECONDS``."""
    kind, _, arg = text.partition(":")
    if kind == "even" and not arg:
        return even_online
    if kind == "random":
        return random_online(float(arg), seed)
    if kind == "flip":
        return flipping_online(float(arg))
    raise ValueError(f"online rule: expected even, random:P or flip:SECONDS, got {text!r}")


@dataclasses.dataclass
class UpstreamConfig:
    latency_min: float = 0.3
    latency_max: float = 4.3
    online: OnlineRule = even_online
    content_type: str = "text/plain; charset=utf-8"
    # Rates, each the probability that one request gets that fault.
    error_5xx: float = 0.0
    hang: float = 0.0
    malformed: float = 0.0
    invalid_400: float = 0.0
    wrong_id: float = 0.0
    drop: float = 0.0
    # The first requests for each id get these faults, in order: retries, deterministically.
    first_faults: tuple[str, ...] = ()
    # Faults by id and time (wall clock), as a story scripts them: a fault's name, or None.
    scripted: Callable[[int, float], str | None] | None = None
    hang_seconds: float = 3600.0
    seed: int | None = None
    record: bool = False
    # A header every request must carry, (lower-case name, value), like an objects service
    # that asks for an API key: 401 without it.
    require_header: tuple[str, str] | None = None
    # Count requests per id in ``requests_by_id``. Off, that table holds only what
    # ``first_faults`` needs, so a long run over a large id universe does not grow it.
    track_ids: bool = True


@dataclasses.dataclass(frozen=True, slots=True)
class Answer:
    object_id: int
    at: float  # wall-clock time the answer was decided (after the delay)
    online: bool | None  # None for a fault
    kind: str  # "ok" or the fault


class Upstream:
    """The upstream as a small HTTP/1.1 server; ``stats`` and ``answers`` are the ground truth.

    It speaks raw asyncio rather than aiohttp: a request costs one timer for its delay, not a
    handler task, so that on a small machine the simulator leaves the CPU to the system under
    test (``lastseen bench`` runs both on one host). Requests on one connection are answered in
    order; keep-alive is the default, ``Connection: close`` and HTTP/1.0 are honoured.
    """

    def __init__(
        self,
        config: UpstreamConfig | None = None,
        on_answer: Callable[[Answer], None] | None = None,
    ) -> None:
        self.config = config or UpstreamConfig()
        self.on_answer = on_answer
        self.random = random.Random(self.config.seed)
        self.stats: Counter[str] = Counter()
        self.requests_by_id: Counter[int] = Counter()
        self.answers: list[Answer] = []
        self.in_flight = 0
        self.down = False  # an outage: every request answers 503
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()

    async def serve(
        self, host: str, port: int, *, reuse_port: bool = False, tls: ssl.SSLContext | None = None
    ) -> str:
        """Listens on ``host:port`` (0: a free port); returns the base URL. With
        ``reuse_port``, other processes may listen on the same port; with ``tls``, it speaks
        HTTPS."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self),
            host,
            port,
            backlog=4096,
            reuse_address=True,
            reuse_port=reuse_port or None,
            ssl=tls,
        )
        bound = self._server.sockets[0].getsockname()
        return f"{'https' if tls else 'http'}://{host}:{bound[1]}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for connection in list(self._connections):
                connection.close()
            await self._server.wait_closed()
            self._server = None

    def toggle_outage(self) -> None:
        self.down = not self.down

    def _fault(self) -> str | None:
        for fault in FAULTS:
            rate = getattr(self.config, fault)
            if rate and self.random.random() < rate:
                return fault
        return None

    def delay(self) -> float:
        return self.random.uniform(self.config.latency_min, self.config.latency_max)

    def decide(self, raw_id: str) -> tuple[int, bytes, str | None]:
        """The answer to ``GET /objects/{raw_id}`` once its delay is over: (status, body, fault)."""
        config = self.config
        try:
            object_id = int(raw_id)
        except ValueError:
            self.stats["invalid_400"] += 1
            return 400, b"invalid id", None
        scripted = None
        if config.track_ids or config.first_faults:
            self.requests_by_id[object_id] += 1
            seen = self.requests_by_id[object_id]
            if seen <= len(config.first_faults):
                scripted = config.first_faults[seen - 1]
        now = time.time()
        if scripted is None and config.scripted is not None:
            scripted = config.scripted(object_id, now)
        fault = "outage" if self.down else scripted or self._fault()
        online = config.online(object_id, now)
        self.stats[fault or "ok"] += 1
        if config.record or self.on_answer is not None:
            answer = Answer(object_id, now, None if fault else online, fault or "ok")
            if config.record:
                self.answers.append(answer)
            if self.on_answer is not None:
                self.on_answer(answer)
        if fault in ("error_5xx", "outage"):
            return 503, b"unavailable", fault
        if fault == "invalid_400":
            return 400, b"invalid id", fault
        if fault == "malformed":
            return 200, b'{"id": ', fault
        answer_id = object_id + 1 if fault == "wrong_id" else object_id
        body = b'{"id":%d,"online":%s}' % (answer_id, b"true" if online else b"false")
        return 200, body, fault


_REASONS = {200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 404: b"Not Found",
            405: b"Method Not Allowed", 503: b"Service Unavailable"}  # fmt: skip


class _Connection(asyncio.Protocol):
    """One client connection: parses a request, answers it after its delay, then the next."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.busy = False
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self.upstream._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.upstream._connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
            self.upstream.in_flight -= 1
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > 65536:
            self.close()
            return
        self._next()

    def _next(self) -> None:
        if self.busy or self.transport is None:
            return
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).split(b"\r\n")
        del self.buffer[: end + 4]
        parts = head[0].split(b" ")
        method, target, version = [*parts, b"", b"", b""][:3]
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        connection = headers.get(b"connection", b"").lower()
        required = self.upstream.config.require_header
        allowed = required is None or headers.get(required[0].encode()) == required[1].encode()
        close = connection == b"close" or (version != b"HTTP/1.1" and connection != b"keep-alive")
        self.busy = True
        self.upstream.in_flight += 1
        self.upstream.stats["requests"] += 1
        # Like the reference, every request waits first, bad ones included.
        self.timer = asyncio.get_running_loop().call_later(
            self.upstream.delay(),
            self._answer,
            method,
            target.decode(errors="replace"),
            close,
            allowed,
        )

    def _answer(self, method: bytes, target: str, close: bool, allowed: bool = True) -> None:
        self.timer = None
        self.upstream.in_flight -= 1
        if not allowed:
            self._send(401, b"unauthorized", close)
        elif method != b"GET":
            self._send(405, b"method not allowed", close)
        elif not target.startswith("/objects/") or "/" in target[9:]:
            self._send(404, b"not found", close)
        else:
            status, body, fault = self.upstream.decide(target[9:])
            if fault == "drop":
                self.close()
            elif fault == "hang":
                self.upstream.in_flight += 1
                self.timer = asyncio.get_running_loop().call_later(
                    self.upstream.config.hang_seconds, self._hung, status, body, close
                )
            else:
                self._send(status, body, close)

    def _hung(self, status: int, body: bytes, close: bool) -> None:
        self.timer = None
        self.upstream.in_flight -= 1
        self._send(status, body, close)

    def _send(self, status: int, body: bytes, close: bool) -> None:
        if self.transport is None:
            return
        content_type = (
            self.upstream.config.content_type if status == 200 else "text/plain; charset=utf-8"
        )
        head = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n" % (
            status,
            _REASONS.get(status, b"Status"),
            content_type.encode(),
            len(body),
            b"Connection: close\r\n" if close else b"",
        )
        self.transport.write(head + body)
        if close:
            self.close()
            return
        self.busy = False
        self._next()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
