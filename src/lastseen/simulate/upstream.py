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
import time
from collections import Counter
from collections.abc import Callable

from aiohttp import web

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
    hang_seconds: float = 3600.0
    seed: int | None = None
    record: bool = False
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
    """The upstream as an aiohttp application; ``stats`` and ``answers`` are the ground truth."""

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

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/objects/{object_id}", self.handle)
        return app

    def _fault(self) -> str | None:
        for fault in FAULTS:
            rate = getattr(self.config, fault)
            if rate and self.random.random() < rate:
                return fault
        return None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        config = self.config
        self.in_flight += 1
        self.stats["requests"] += 1
        try:
            await asyncio.sleep(self.random.uniform(config.latency_min, config.latency_max))
            raw = request.match_info["object_id"]
            try:
                object_id = int(raw)
            except ValueError:
                self.stats["invalid_400"] += 1
                return web.Response(status=400, text="invalid id", content_type="text/plain")
            scripted = None
            if config.track_ids or config.first_faults:
                self.requests_by_id[object_id] += 1
                seen = self.requests_by_id[object_id]
                if seen <= len(config.first_faults):
                    scripted = config.first_faults[seen - 1]
            fault = scripted or self._fault()
            now = time.time()
            online = config.online(object_id, now)
            self.stats[fault or "ok"] += 1
            if config.record or self.on_answer is not None:
                answer = Answer(object_id, now, None if fault else online, fault or "ok")
                if config.record:
                    self.answers.append(answer)
                if self.on_answer is not None:
                    self.on_answer(answer)
            return await self._answer(request, object_id, online, fault)
        finally:
            self.in_flight -= 1

    async def _answer(
        self, request: web.Request, object_id: int, online: bool, fault: str | None
    ) -> web.StreamResponse:
        body_type = self.config.content_type
        if fault == "error_5xx":
            return web.Response(status=503, text="unavailable", content_type="text/plain")
        if fault == "hang":
            await asyncio.sleep(self.config.hang_seconds)
        if fault == "invalid_400":
            return web.Response(status=400, text="invalid id", content_type="text/plain")
        if fault == "drop":
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=500)  # never sent: the connection is gone
        if fault == "malformed":
            return web.Response(body=b'{"id": ', headers={"Content-Type": body_type})
        answer_id = object_id + 1 if fault == "wrong_id" else object_id
        body = f'{{"id":{answer_id},"online":{"true" if online else "false"}}}'
        return web.Response(body=body.encode(), headers={"Content-Type": body_type})
