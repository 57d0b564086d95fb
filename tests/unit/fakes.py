"""The pipeline's collaborators that are not the database, small enough to read: an upstream
that answers as the test scripts it, and what a lookup's outcomes are delivered to. The database
is never faked: a stage that needs one gets a real ``Database`` with no server behind it."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import socket
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

from lastseen.core.clock import ManualClock
from lastseen.core.errors import LookupFailed
from lastseen.core.model import HeldCallback, Lookup, Outcome
from lastseen.storage.database import Database
from lastseen.telemetry.metrics import Metrics

Answer = bool | LookupFailed
Reply = Callable[[Answer], None]


class Hold:
    """A scripted answer that does not come until the test releases it."""


HOLD = Hold()


def transient(object_id: int, reason: str = "http_5xx") -> LookupFailed:
    return LookupFailed(object_id, reason, "scripted", permanent=False)


def permanent(object_id: int, reason: str = "http_4xx") -> LookupFailed:
    return LookupFailed(object_id, reason, "scripted", permanent=True)


class FakeUpstream:
    """``fetch`` as the lookups call it. The n-th request for an id gets ``script[id][n]``
    (after ``latency``), or, past the script, ``default(id)``; ``HOLD`` keeps the request in
    flight until ``release``."""

    def __init__(self, clock: ManualClock, latency: float = 0.05) -> None:
        self.clock = clock
        self.latency = latency
        self.script: dict[int, list[Answer | Hold]] = {}
        self.default: Callable[[int], Answer | Hold] = lambda object_id: object_id % 2 == 0
        self.requests: list[tuple[int, float]] = []  # (id, wall time sent)
        self.held: dict[int, collections.deque[Reply]] = collections.defaultdict(collections.deque)
        self.in_flight = 0
        self.most_in_flight = 0

    def fetch(self, object_id: int, reply: Reply) -> None:
        sent = len(self.sent(object_id))
        self.requests.append((object_id, self.clock.wall()))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        script = self.script.get(object_id, [])
        answer = script[sent] if sent < len(script) else self.default(object_id)
        if isinstance(answer, Hold):
            self.held[object_id].append(reply)
        else:
            asyncio.get_running_loop().call_later(self.latency, self._answer, reply, answer)

    def release(self, object_id: int, answer: Answer) -> None:
        """Answers the oldest held request for ``object_id`` now."""
        self._answer(self.held[object_id].popleft(), answer)

    def sent(self, object_id: int) -> list[float]:
        """When each request for ``object_id`` was sent."""
        return [at for i, at in self.requests if i == object_id]

    def _answer(self, reply: Reply, answer: Answer) -> None:
        self.in_flight -= 1
        reply(answer)


@dataclasses.dataclass
class Delivered:
    object_id: int
    callbacks: list[int]
    outcome: Outcome
    attempts: int
    at: float  # wall time


class Deliveries(list[Delivered]):
    """What the lookups deliver, in order."""

    def __init__(self, clock: ManualClock) -> None:
        super().__init__()
        self.clock = clock

    def __call__(self, lookup: Lookup, outcome: Outcome) -> None:
        callbacks = [c.id for c in lookup.callbacks]
        self.append(
            Delivered(lookup.object_id, callbacks, outcome, lookup.attempts, self.clock.wall())
        )

    def of(self, object_id: int) -> list[Delivered]:
        return [d for d in self if d.object_id == object_id]


def held(callback_id: int, received_ts: float, distinct: int = 1) -> HeldCallback:
    """A claimed callback received at ``received_ts`` (wall time), with ``distinct`` ids."""
    received_at = datetime.fromtimestamp(received_ts, UTC)
    return HeldCallback(callback_id, received_at, received_ts, distinct, distinct)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    """One sample's value, 0 if it has none yet."""
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@contextlib.asynccontextmanager
async def no_database() -> AsyncIterator[Database]:
    """A ``Database`` whose address refuses connections (a port bound and not listening, for
    as long as it is used): what is tested with it must need no database, and a query would
    fail loudly."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        db = await Database.open(f"postgresql://lastseen@127.0.0.1:{port}/none", size=1, timeout=1)
        try:
            yield db
        finally:
            await db.close()
