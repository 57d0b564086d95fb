"""The demo's events: what happened to objects and dead letters, named as the database shows it.

Each sample compares the database with the previous sample: rows of ``objects`` that appeared
("objects 10, 11 online"), rows that went (by their age: a row older than the TTL went by the
TTL, "object 20 expired (last seen 30.2 s ago)"; a younger one because the upstream said
offline, "object 30 went offline: deleted at once"), new dead letters, dead letters retried (a
callback whose ``retry_of`` is set), and, from the service's metrics, lookups coalesced. With
more than ``max_rows`` objects (a large id universe) rows are not named, only counted.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable
from datetime import datetime

from lastseen.devtools import database as devdb
from lastseen.storage.database import Database
from lastseen.telemetry.promtext import Reading

COALESCED = "lookups coalesced (shared requests)"
RETRY_MARGIN = 10_000  # callback ids: how far out of order commits may land


def _objects(ids: list[int]) -> str:
    return f"object{'s' if len(ids) > 1 else ''} {_ids(ids)}"


def _ids(ids: Iterable[int], most: int = 8) -> str:
    listed = sorted(set(ids))
    text = ", ".join(map(str, listed[:most]))
    return text + (f" and {len(listed) - most} more" if len(listed) > most else "")


class Events:
    """Finds the events since the last sample; ``recent`` keeps the last ``keep`` of them."""

    def __init__(self, ttl: float, *, max_rows: int = 1000, keep: int = 10) -> None:
        self.ttl = ttl
        self.max_rows = max_rows
        self.recent: collections.deque[str] = collections.deque(maxlen=keep)
        self.counts: collections.Counter[str] = collections.Counter()
        self._rows: dict[int, datetime] | None = None
        self._letters: set[tuple[int, int]] | None = None
        self._newest = 0  # the newest callback id at the last sample
        self._retries: set[int] = set()
        self._retried_ids: set[int] = set()
        self._coalesced = 0.0
        self._deleted: dict[str, float] = {}
        self._notes: list[str] = []

    def note(self, text: str) -> None:
        """An event told from outside, shown with the next sample's."""
        self._notes.append(text)

    async def sample(self, db: Database, reading: Reading, clock: str) -> list[str]:
        """The new events, each prefixed with ``clock``; also appended to ``recent``."""
        found = await self._dead_letters(db)
        found += await self._objects(db, reading)
        coalesced = reading.total("lastseen_lookups_coalesced_total")
        if coalesced > self._coalesced:
            n = int(coalesced - self._coalesced)
            found.append(f"{n} {COALESCED}")
            self.counts["coalesced"] += n
        self._coalesced = coalesced
        stamped = [*self._notes, *(f"{clock} {text}" for text in found)]
        self._notes.clear()
        for text in stamped:
            # A burst after a burst: one line in the view, the newest, not a screenful.
            if self.recent and COALESCED in self.recent[-1] and COALESCED in text:
                self.recent.pop()
            self.recent.append(text)
        return stamped

    async def _objects(self, db: Database, reading: Reading) -> list[str]:
        rows = await devdb.objects_up_to(db, self.max_rows)
        now = time.time()
        found: list[str] = []
        deleted = reading.by_label("lastseen_objects_deleted_total", "cause")
        previous, self._rows = self._rows, rows
        if rows is None or previous is None:
            if rows is None and previous is not None:
                found.append(f"over {self.max_rows:,} objects: counted, not named")
            if rows is None:
                for cause in ("expired", "offline"):
                    n = int(deleted.get(cause, 0) - self._deleted.get(cause, 0))
                    if n > 0:
                        found.append(f"{n:,} objects deleted ({cause})")
            self._deleted = deleted
            if rows and previous is None:
                found.append(f"{_objects(sorted(rows))} online")
            return found
        self._deleted = deleted
        created = rows.keys() - previous.keys()
        if created:
            late = [i for i in created if now - rows[i].timestamp() > self.ttl / 4]
            fresh = created.difference(late)
            if fresh:
                found.append(f"{_objects(sorted(fresh))} online")
            by_why: dict[str, list[int]] = collections.defaultdict(list)
            for object_id in sorted(late):
                retried = object_id in self._retried_ids
                by_why["dead letter retried" if retried else "late answer"].append(object_id)
            for why, ids in sorted(by_why.items()):
                age = max(now - rows[i].timestamp() for i in ids)
                found.append(f"{_objects(ids)} online ({why}, last seen {age:.1f} s ago)")
        # The reaper deletes rows older than the TTL; a result that says offline deletes one
        # that a newer callback (younger than the TTL) named. Ids that went together (one
        # reaper round, one callback's results) are named together.
        expired: dict[float, list[int]] = collections.defaultdict(list)
        offline: list[int] = []
        for object_id in sorted(previous.keys() - rows.keys()):
            age = now - previous[object_id].timestamp()
            if age >= self.ttl * 0.95:
                expired[round(age, 1)].append(object_id)
            else:
                offline.append(object_id)
        if len(expired) > 2:  # many at once (a large run): one line, not one per age
            ages = sorted(expired)
            ids = sorted(i for group in expired.values() for i in group)
            expired = {ages[-1]: ids}
            span = f"{ages[0]:.1f}-{ages[-1]:.1f}"
        else:
            span = ""
        for age, ids in sorted(expired.items(), reverse=True):
            self.counts["expired"] += len(ids)
            found.append(f"{_objects(ids)} expired (last seen {span or f'{age:.1f}'} s ago)")
        if offline:
            self.counts["offline"] += len(offline)
            found.append(f"{_objects(offline)} went offline: deleted at once")
        return found

    async def _dead_letters(self, db: Database) -> list[str]:
        found: list[str] = []
        letters = await devdb.recent_dead_letters(db, 100)
        known = self._letters or set()
        by_reason: dict[str, list[int]] = collections.defaultdict(list)
        for callback_id, object_id, reason in reversed(letters):
            if (callback_id, object_id) not in known:
                by_reason[reason].append(object_id)
        for reason, ids in sorted(by_reason.items()):
            self.counts["dead_letters"] += len(ids)
            found.append(f"dead letter{'s' if len(ids) > 1 else ''}: {_objects(ids)} ({reason})")
        self._letters = {(c, o) for c, o, _ in letters}
        # Only the callbacks stored since the last sample are read (by id, an index range),
        # with a margin for those committed out of order: not the whole audit table each time.
        newest = await devdb.newest_callback(db)
        since = max(0, self._newest - RETRY_MARGIN)
        for callback_id, _retry_of, ids in await devdb.retries_after(db, since):
            if callback_id in self._retries:
                continue
            self._retries.add(callback_id)
            self.counts["retried"] += len(ids)
            self._retried_ids.update(ids)
            found.append(f"dead letter retried: {_objects(ids)}")
        self._newest = newest
        return found
