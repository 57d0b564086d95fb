"""A stand-in for the producer of callbacks: ``POST {"object_ids": [...]}`` to lastseen.

Reference mode (the default) behaves like the reference producer: sleep ``period`` seconds,
then one POST with a ``timeout`` (1 s), never retried; the next sleep starts only after that POST
returns, so the period is ``period`` plus the reply time. Each callback holds a uniform count of
0 to ``max_ids`` ids, each drawn uniformly from 0 to ``id_universe - 1`` (duplicates included).

Load mode (``rate`` > 0) is open-loop: callbacks are sent on a fixed schedule of ``rate`` per
second over up to ``connections`` connections, whether or not earlier ones were answered, so a
slow service shows up as timeouts rather than as a producer that politely slows down. A request
still waiting for a free connection when its timeout passes counts as timed out.

Story mode (``story`` set: the demo's default) sends what ``simulate/story.py`` scripts: at
each tick (every ``period`` from the first POST, on schedule) one callback, or a burst of the
same callback several times at once; the story's clock starts with the first tick.

Every POST is counted by outcome in ``stats``; every one that is not acknowledged is logged.
Nothing is kept per callback: each one is handed to ``record`` (the truth file) and forgotten, and
at most ``max_outstanding`` requests are under way, so memory is bounded however long it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

import aiohttp
import msgspec
import structlog

from lastseen.devtools.simulate.truth import SentCallback

if TYPE_CHECKING:
    from lastseen.devtools.simulate.story import Story

log = structlog.get_logger("lastseen.devtools.simulate.producer")

OUTCOMES = ("acknowledged", "rejected", "timeout", "error")


@dataclasses.dataclass(frozen=True)
class ProducerConfig:
    target: str = "http://127.0.0.1:9090/callback"
    period: float = 5.0
    timeout: float = 1.0
    max_ids: int = 199
    id_universe: int = 100
    rate: float = 0.0  # callbacks per second in load mode; 0: reference mode
    connections: int = 50
    seed: int | None = None
    story: Story | None = None  # story mode: what it sends, and when

    @property
    def max_outstanding(self) -> int:
        """Requests under way at most: every one ends within the timeout, so more than a
        timeout's worth of the schedule (twice, for slack) means the producer itself is stuck."""
        return max(self.connections, math.ceil(2 * self.rate * self.timeout), 1)


class _Acknowledgement(msgspec.Struct):
    callback_id: int


_ack_decoder = msgspec.json.Decoder(_Acknowledgement)


def draw_ids(rng: random.Random, max_ids: int, id_universe: int) -> list[int]:
    """One callback's ids: a uniform count from 0 to ``max_ids``, each uniform in the universe."""
    return [rng.randrange(id_universe) for _ in range(rng.randint(0, max_ids))]


class Producer:
    """Sends callbacks until ``stop``; ``stats`` counts them by outcome."""

    def __init__(
        self, config: ProducerConfig, record: Callable[[SentCallback], None] | None = None
    ) -> None:
        self.config = config
        self.record = record
        self.random = random.Random(config.seed)
        self.stats: Counter[str] = Counter()
        self.in_flight = 0
        self._stop = asyncio.Event()
        self._posts: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._encoder = msgspec.json.Encoder()

    @property
    def failed(self) -> int:
        return self.stats["rejected"] + self.stats["timeout"] + self.stats["error"]

    async def run(self) -> None:
        """Sends until ``stop`` is called; returns once the last POST has ended."""
        connector = aiohttp.TCPConnector(limit=max(1, self.config.connections))
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.config.timeout),
            raise_for_status=False,
        )
        try:
            if self.config.story is not None:
                await self._story_loop(self.config.story)
            elif self.config.rate > 0:
                await self._open_loop()
            else:
                await self._reference_loop()
            if self._posts:
                await asyncio.gather(*self._posts, return_exceptions=True)
        finally:
            await self._session.close()

    def stop(self) -> None:
        """Sends nothing more; POSTs under way end by themselves (within the timeout)."""
        self._stop.set()

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _reference_loop(self) -> None:
        while True:
            await self._pause(self.config.period)
            if self._stop.is_set():
                return
            await self._post()

    async def _story_loop(self, story: Story) -> None:
        story.begin(time.time())
        start = time.monotonic()
        tick = 0
        while not self._stop.is_set():
            batch = story.callbacks(tick)
            await asyncio.gather(*(self._post(ids) for ids in batch))
            tick += 1
            # On schedule: a slow reply delays one tick, never the rest of the story.
            await self._pause(start + tick * self.config.period - time.monotonic())

    async def _open_loop(self) -> None:
        interval = 1.0 / self.config.rate
        due = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if due > now:
                await self._pause(due - now)
                continue
            if now - due > 1.0:
                # The loop itself stalled for over a second: skip ahead rather than burst.
                missed = int((now - due) / interval)
                self.stats["skipped"] += missed
                log.warning("producer fell behind its schedule", skipped=missed)
                due += missed * interval
            if len(self._posts) >= self.config.max_outstanding:
                self.stats["skipped"] += 1
            else:
                task = asyncio.create_task(self._post())
                self._posts.add(task)
                task.add_done_callback(self._posts.discard)
            due += interval

    async def _post(self, ids: list[int] | None = None) -> None:
        assert self._session is not None
        config = self.config
        if ids is None:
            ids = draw_ids(self.random, config.max_ids, config.id_universe)
        body = self._encoder.encode({"object_ids": ids})
        status: int | None = None
        error: str | None = None
        callback_id: int | None = None
        sent_at = time.time()
        started = time.perf_counter()
        self.stats["sent"] += 1
        self.in_flight += 1
        try:
            async with self._session.post(
                config.target, data=body, headers={"Content-Type": "application/json"}
            ) as response:
                status = response.status
                reply = await response.read()
            if status == 202:
                with contextlib.suppress(msgspec.DecodeError):
                    callback_id = _ack_decoder.decode(reply).callback_id
        except TimeoutError:
            # aiohttp's timeouts are TimeoutErrors too, whether connecting or reading.
            error = "timeout"
        except aiohttp.ClientError as exc:
            error = f"{type(exc).__name__}: {exc}"
        finally:
            self.in_flight -= 1
        seconds = time.perf_counter() - started
        acknowledged = callback_id is not None
        outcome = (
            "acknowledged"
            if acknowledged
            else ("timeout" if error == "timeout" else ("error" if error else "rejected"))
        )
        self.stats[outcome] += 1
        self.stats["ids_sent"] += len(ids)
        if not acknowledged:
            # No retry, like the reference: the callback is lost to lastseen, and said so here.
            log.warning(
                "callback not acknowledged",
                outcome=outcome,
                status=status,
                error=error,
                seconds=round(seconds, 3),
                ids=len(ids),
            )
        if self.record is not None:
            self.record(
                SentCallback(sent_at, ids, acknowledged, status, callback_id, error, seconds)
            )
