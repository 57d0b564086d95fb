"""The values that travel along a callback's path, shared by the stages that hand them on.

A claimed callback becomes a ``HeldCallback`` while this process works on it; each distinct id
of it joins a ``Lookup``; a lookup ends in an ``Outcome`` for every callback it serves; an
outcome is a result (online or not), for a permanent failure a ``DeadLetter``, or ``Expired``
when transient failures lasted until no answer could matter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import datetime

from lastseen.core.errors import LookupFailed


@dataclasses.dataclass(frozen=True, slots=True)
class Claimed:
    """A callback as the inbox leased it to this worker."""

    id: int
    received_at: datetime
    object_ids: list[int]
    claims: int  # this claim included


@dataclasses.dataclass(eq=False, slots=True)
class HeldCallback:
    """A claimed callback being worked on: its distinct ids, and how many still lack an
    outcome."""

    id: int
    received_at: datetime
    received_ts: float
    distinct: int
    remaining: int


@dataclasses.dataclass(eq=False, slots=True)
class Lookup:
    """One id's lookup and the callbacks it serves."""

    object_id: int
    callbacks: list[HeldCallback]
    sent_at: float | None = None  # wall-clock time of the request under way, if one is
    attempts: int = 0
    started: float = 0.0  # monotonic time the request under way, or the last, was sent
    latency: float = 0.0  # duration of the request that gave the answer
    last_failure: str = ""  # the reason of the latest transient failure, if any

    def accepts(self, callback: HeldCallback) -> bool:
        """Whether its answer can say something about the object at ``callback``'s time."""
        return self.sent_at is None or callback.received_ts <= self.sent_at


@dataclasses.dataclass(frozen=True, slots=True)
class Expired:
    """No answer came while one could matter: the callbacks it was for are older than the TTL,
    so their results could create no row. ``reason`` is the last failure's."""

    reason: str


Outcome = bool | LookupFailed | Expired  # online or not, a permanent failure, or too late


@dataclasses.dataclass(frozen=True, slots=True)
class DeadLetter:
    """An id of one callback that could not be looked up, and why."""

    callback_id: int
    object_id: int
    received_at: datetime
    reason: str
    detail: str
    attempts: int


@dataclasses.dataclass(frozen=True, slots=True)
class DeadLetterFilter:
    """Which dead letters an operation is about; None matches anything."""

    reason: str | None = None
    callback_id: int | None = None
    received_before: datetime | None = None
    received_after: datetime | None = None  # at or after

    def still_relevant(self, cutoff: datetime) -> DeadLetterFilter:
        """The part received at or after ``cutoff`` (the TTL's): the ids whose lookups could
        still change ``objects``."""
        after = cutoff if self.received_after is None else max(self.received_after, cutoff)
        return dataclasses.replace(self, received_after=after)

    def stale(self, cutoff: datetime) -> DeadLetterFilter:
        """The part received before ``cutoff``."""
        before = cutoff if self.received_before is None else min(self.received_before, cutoff)
        return dataclasses.replace(self, received_before=before)


# Asks the upstream about one id; calls back once with whether it is online, or why there is no
# answer.
Fetch = Callable[[int, Callable[[bool | LookupFailed], None]], None]
