"""Per-client rate limits on ``POST /callback`` (off by default): a token bucket per client,
the client being its bearer token when it sends one that was verified, else its address.

A producer that misbehaves (a retry loop, a replayed backlog) must not take the front door from
the others. Buckets are kept for the most recently seen ``MAX_CLIENTS`` clients, so a flood of
addresses costs bounded memory; a forgotten client starts again with a full bucket.
"""

from __future__ import annotations

import collections
import hashlib
import math
import time

MAX_CLIENTS = 10_000
# Clients named in the metric's label, at most; the rest are counted as "other".
MAX_LABELS = 100


def client_of(token: str | None, address: str | None) -> str:
    """The name a client is limited and counted by: a digest of its verified bearer token
    (never the token itself: it ends up in metrics), else its address."""
    if token is not None:
        return f"token:{hashlib.sha256(token.encode()).hexdigest()[:12]}"
    return address or "unknown"


class ClientLimits:
    """``rate`` callbacks per second per client, with bursts of ``burst``."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = max(1.0, burst)
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()
        self._labels: set[str] = set()

    def admit(self, client: str) -> float:
        """0 if ``client`` may send one callback now (and it is counted), else the seconds
        until it may."""
        now = time.monotonic()
        tokens, last = self._buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[client] = (tokens, now)
        if len(self._buckets) > MAX_CLIENTS:
            self._buckets.popitem(last=False)
        return wait

    def label(self, client: str) -> str:
        """``client`` as a metric label: the first ``MAX_LABELS`` clients by name, then
        "other", so that the metric's size stays bounded."""
        if client in self._labels:
            return client
        if len(self._labels) < MAX_LABELS:
            self._labels.add(client)
            return client
        return "other"


def retry_after(wait: float) -> str:
    """A Retry-After value (whole seconds, at least 1) for a wait in seconds."""
    return str(max(1, math.ceil(wait)))
