"""What /ready and /health answer: the instance's state, kept current in the background so
that an answer never waits on the database."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import structlog

from lastseen.core.errors import DatabaseError
from lastseen.core.replies import Ready
from lastseen.storage.database import Database
from lastseen.telemetry.promtext import Reading

log = structlog.get_logger("lastseen.api.readiness")


# How often /ready's state is brought up to date, and how long a ping may take before the
# database counts as unreachable.
READY_CHECK_EVERY = 0.25


READY_CHECK_TIMEOUT = 1.0


UPSTREAM_CHECK_EVERY = 2.0


class Spooling(Protocol):
    """What readiness asks of a group commit with a spool."""

    @property
    def accepting(self) -> bool: ...

    @property
    def spooling(self) -> bool: ...


class Watched(enum.Enum):
    """``answer``'s default: the upstream's state as ``watch`` last found it."""

    WATCHED = "what watch found"


WATCHED = Watched.WATCHED


class Readiness:
    """Whether this instance can do its work: migrations applied, database reachable; and, as
    details that do not make it unready (it still stores callbacks), whether the upstream is
    failing, asked of ``upstream_failing`` (None where no pipeline runs), and whether callbacks
    go to the local spool, asked of ``spool`` (None where there is none): an instance that
    cannot reach its database but can spool is ready, degraded. A worker process that keeps
    failing to start, asked of ``worker_trouble``, makes it unready: nothing would be looked up.

    ``watch`` keeps the database's and the upstream's state current in the background, and
    ``answer`` reads it: ``GET /ready`` never waits on the database (a kubelet gives a probe
    1 s, and a server behind a partition that drops packets would hold a ping far longer)."""

    def __init__(
        self,
        upstream_failure: Callable[[], Awaitable[str | None]] | None = None,
        spool: Spooling | None = None,
        worker_trouble: Callable[[], str | None] | None = None,
        *,
        upstream: str = "",
        clock: Callable[[], float] = time.time,
        read_clock: Callable[[float, float, float], None] | None = None,
    ) -> None:
        """``upstream_failure`` tells why the upstream is failing, or None while it is not;
        ``upstream`` is its URL. ``read_clock`` is told, after each ping, when it was sent and
        answered (by ``clock``) and what PostgreSQL's clock said (``DatabaseClock.read``)."""
        self.upstream_failure = upstream_failure
        self.upstream = upstream
        self.spool = spool
        self.worker_trouble = worker_trouble
        self.clock = clock
        self.read_clock = read_clock
        self.unreachable = False  # the last check (or migration) found no database
        self.upstream_failing: str | None = None  # why, as ``watch`` last found it
        self.reason = "migrations not applied yet"
        self.draining = False  # shutting down: tell load balancers, while still serving
        self._migrated = asyncio.Event()
        self._pinging_since: float | None = None  # loop time a ping in progress started
        self._timeout = READY_CHECK_TIMEOUT

    @property
    def migrated(self) -> bool:
        return self._migrated.is_set()

    def set_migrated(self) -> None:
        self.unreachable = False
        self._migrated.set()

    async def wait_migrated(self) -> None:
        await self._migrated.wait()

    async def watch(
        self, db: Database, every: float = READY_CHECK_EVERY, timeout: float = READY_CHECK_TIMEOUT
    ) -> None:
        """Pings the database (once migrated) every ``every`` seconds, and asks whether the
        upstream is failing every ``UPSTREAM_CHECK_EVERY`` (in worker processes, that is a
        scrape of their metrics), until cancelled; a ping that takes longer than ``timeout``
        counts as unreachable while it lasts."""
        self._timeout = timeout
        loop = asyncio.get_running_loop()
        asked_upstream = -UPSTREAM_CHECK_EVERY
        while True:
            if self.migrated:
                await self.ping(db, timeout)
            due = loop.time() - asked_upstream >= UPSTREAM_CHECK_EVERY
            if self.upstream_failure is not None and due:
                asked_upstream = loop.time()
                with contextlib.suppress(TimeoutError):
                    asked = self.upstream_failure()
                    self.upstream_failing = await asyncio.wait_for(asked, timeout)
            await asyncio.sleep(every)

    async def ping(self, db: Database, timeout: float = READY_CHECK_TIMEOUT) -> None:
        """One ping: whether the database answers within ``timeout``, and what its clock said
        (to ``read_clock``)."""
        self._pinging_since = asyncio.get_running_loop().time()
        sent = self.clock()
        try:
            database_time = await asyncio.wait_for(db.ping(), timeout)
            reachable, error = True, ""
        except (DatabaseError, TimeoutError) as exc:
            reachable, error = False, str(exc) or "timeout"
        self._pinging_since = None
        if reachable and self.read_clock is not None:
            self.read_clock(sent, self.clock(), database_time)
        if not reachable and not self.unreachable:
            # The driver's text (hosts, ports, errno) is for the logs, not for callers.
            log.warning("readiness check failed", error=error)
        self.unreachable = not reachable

    def _database_unreachable(self) -> bool:
        if self._pinging_since is not None:
            overdue = asyncio.get_running_loop().time() - self._pinging_since > self._timeout
            if overdue:
                return True
        return self.unreachable

    def check(self) -> str | None:
        """None when ready, otherwise why not."""
        if self.draining:
            return "shutting down"
        if not self.migrated:
            return self.reason
        return "database unreachable" if self._database_unreachable() else None

    def answer(self, upstream_failing: str | Watched | None = WATCHED) -> Ready:
        """What ``GET /ready`` answers: ``ready``, and why not, or in what way degraded.
        ``upstream_failing`` (why, or None), when the caller knows it more recently, replaces
        what ``watch`` found."""
        reason = self.check()
        trouble = None if self.worker_trouble is None else self.worker_trouble()
        if reason is None and trouble is not None:
            return Ready(False, reason=trouble)
        answer = Ready(True)
        spool = self.spool
        unreachable = self._database_unreachable()
        if reason is not None and (spool is None or not unreachable or self.draining):
            return Ready(False, reason=reason)
        # The spool takes callbacks once a commit found the database gone, which may be
        # before the next ping does.
        if spool is not None and (reason is not None or spool.spooling):
            if not spool.accepting:
                full = f"{reason or 'spooling'}, and the spool cannot take more"
                return Ready(False, reason=full)
            why = f" {reason};" if reason else ""
            answer.degraded = f"spooling:{why} callbacks are stored on local disk"
        if self.upstream_failure is not None:
            failing = self.upstream_failing if upstream_failing is WATCHED else upstream_failing
            answer.upstream = "ok" if failing is None else self.describe_failure(failing)
        return answer

    def describe_failure(self, cause: str) -> str:
        """The upstream's outage as /ready, /status and the page say it."""
        return f"failing ({cause}) at {self.upstream}: lookups held and probed"


def upstream_failure(reading: Reading) -> str | None:
    """Why the processes of ``reading`` see the upstream failing, or None while they do
    not (from ``lastseen_upstream_outage`` and ``lastseen_upstream_failure``)."""
    if reading.total("lastseen_upstream_outage") <= 0:
        return None
    causes = [c for c, on in reading.by_label("lastseen_upstream_failure", "cause").items() if on]
    return ", ".join(sorted(causes)) or "failing"
