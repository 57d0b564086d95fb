"""The one exponential backoff: of lookups, of a worker process started again, of a database
that is not there yet."""

from __future__ import annotations

import random


def backoff(attempt: int, base: float, cap: float, *, jitter: bool = False) -> float:
    """The delay after failure number ``attempt`` (1 for the first): ``base`` doubled with each
    failure, at most ``cap``. With ``jitter``, drawn from the upper half of that, so that many
    waiters that failed together do not come back together."""
    delay = min(cap, base * 2.0 ** min(attempt - 1, 64))
    return delay / 2 + random.uniform(0, delay / 2) if jitter else delay
