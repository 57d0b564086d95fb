"""A lean closed-loop HTTP/1.1 load generator for ``lastseen bench``.

Each connection sends a request, reads the whole response, and sends the next (keep-alive).
It writes prebuilt request bytes and parses only the status line and Content-Length, so that
on a 2-core machine it spends as little CPU as it can: CPU it takes is CPU the server under
test does not get, and the bench reports every process's CPU next to its figures.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import math
import random
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime

import standardwebhooks


@dataclasses.dataclass
class LoadResult:
    """What one load run measured."""

    path: str
    connections: int
    seconds: float
    requests: int
    statuses: Counter[int]
    errors: int
    latencies: list[float]

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def ok_rate(self, status: int = 202) -> float:
        return self.statuses[status] / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        return percentile(self.latencies, q)

    def summary(self) -> dict[str, object]:
        return {
            "path": self.path,
            "connections": self.connections,
            "seconds": round(self.seconds, 3),
            "requests": self.requests,
            "rate_per_s": round(self.rate, 1),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "errors": self.errors,
            "latency_ms": {
                "p50": round(self.percentile(50) * 1000, 2),
                "p99": round(self.percentile(99) * 1000, 2),
                "max": round(max(self.latencies, default=0.0) * 1000, 2),
            },
        }


def callback_bodies(count: int, ids: int, seed: int, universe: int = 10_000_000) -> list[bytes]:
    """``count`` callback bodies of ``ids`` ids each, drawn from ``range(universe)``."""
    rng = random.Random(seed)
    return [
        json.dumps({"object_ids": [rng.randrange(universe) for _ in range(ids)]}).encode()
        for _ in range(count)
    ]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (nearest rank) of ``values``; 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


def build_requests(
    host: str,
    port: int,
    path: str,
    bodies: Sequence[bytes],
    headers: Sequence[Mapping[str, str]] | None = None,
) -> list[bytes]:
    """Raw HTTP/1.1 requests, one per body, with ``headers[n]`` added to request n."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        "{}Content-Length: {}\r\n\r\n"
    )
    extra = [""] * len(bodies)
    if headers is not None:
        extra = ["".join(f"{k}: {v}\r\n" for k, v in h.items()) for h in headers]
    return [
        head.format(x, len(body)).encode() + body for x, body in zip(extra, bodies, strict=True)
    ]


def signed_headers(secret: str, bodies: Sequence[bytes], prefix: str) -> list[dict[str, str]]:
    """Standard Webhooks headers for each body, each message with an id of its own."""
    webhook = standardwebhooks.Webhook(secret)
    now = datetime.now(UTC)
    return [
        {
            "webhook-id": f"{prefix}-{n}",
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": webhook.sign(f"{prefix}-{n}", now, body.decode()),
        }
        for n, body in enumerate(bodies)
    ]


async def _connection(
    host: str,
    port: int,
    requests: Iterator[bytes],
    deadline: float,
    result: LoadResult,
) -> None:
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        result.errors += 1
        return
    try:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            writer.write(next(requests))
            status_line = await reader.readline()
            if not status_line:
                result.errors += 1
                return
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if length:
                await reader.readexactly(length)
            result.latencies.append(time.perf_counter() - started)
            result.requests += 1
            result.statuses[int(status_line[9:12])] += 1
    except (OSError, asyncio.IncompleteReadError, ValueError):
        result.errors += 1
    finally:
        writer.close()


async def run_load(
    host: str,
    port: int,
    path: str,
    bodies: Sequence[bytes],
    *,
    connections: int,
    seconds: float,
    prepared: Sequence[bytes] | None = None,
) -> LoadResult:
    """Keeps ``connections`` requests in flight against ``path`` for ``seconds``: ``bodies``
    in turn, or the ``prepared`` requests (from ``build_requests``)."""
    requests = itertools.cycle(prepared or build_requests(host, port, path, bodies))
    result = LoadResult(path, connections, seconds, 0, Counter(), 0, [])
    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(
        *(_connection(host, port, requests, deadline, result) for _ in range(connections))
    )
    result.seconds = time.perf_counter() - started
    return result
