"""The spool: a callback's durable home on local disk while PostgreSQL cannot take it in time.

SQLite from the standard library, in WAL mode with ``synchronous=FULL``: each append is one
transaction, on disk before it returns, and a crash at any moment leaves either all of it or
none. Each spooled callback gets a key that is unique for ever (the spool file's own random
name, then its sequence number); the inbox stores it with the callback when the spool drains
(``callbacks.source``, unique), so a drain that crashes after PostgreSQL took a batch and before
the spool forgot it stores nothing twice when it runs again.

The file exists only while it holds callbacks: it is made by the first append and removed once
drained, so an instance whose database never failed leaves nothing behind, and one that starts
next to a file knows there is something to drain.

One thread does all of the SQLite work, so the event loop never waits on a disk.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import fcntl
import os
import re
import sqlite3
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from lastseen.config.instance import instance_name
from lastseen.config.settings import Settings
from lastseen.core.errors import SpoolFailed, SpoolFull

T = TypeVar("T")

# What a spooled callback costs besides its ids, for the size bound: its row, key and index
# entry, roughly (the file itself is larger again by SQLite's free pages and its WAL).
ROW_OVERHEAD = 64

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS spooled (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at REAL NOT NULL,
    ids         TEXT NOT NULL
);
"""


def spool_path(settings: Settings) -> Path:
    """The spool file of this instance: ``LASTSEEN_SPOOL_PATH``, or one named after the
    instance in the data directory, so that a restart under the same name finds it."""
    if settings.spool_path is not None:
        return settings.spool_path
    name = re.sub(r"[^A-Za-z0-9._-]", "_", instance_name(settings))
    return settings.data_dir / "spool" / f"{name}.sqlite3"


@dataclasses.dataclass(frozen=True, slots=True)
class Spooled:
    """One spooled callback: its receive time (epoch seconds) and ids as an array literal."""

    seq: int
    key: str
    received_at: float
    ids: str


class Spool:
    """The spool file of one instance. ``depth``, ``size`` and ``oldest`` are kept in memory,
    so reading them costs nothing; only this object writes the file."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="spool")
        self._conn: sqlite3.Connection | None = None
        self._lock: int | None = None  # the lock file's descriptor, held while open
        self._name = ""
        self.depth = 0
        self.size = 0
        self.oldest: float | None = None

    async def open(self) -> None:
        """Takes the spool's lock and reads what a predecessor left in the file, if there is
        one; ``SpoolFailed`` if the file could not be made when it is needed (its directory is
        not writable) or another process holds it (an instance, or ``drain-spool``)."""
        await self._call(self._check)

    def _check(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(self.path.parent, os.W_OK):
            raise SpoolFailed(f"cannot write in {self.path.parent}")
        # The lock has a file of its own: the spool file goes when it is empty, and a lock on
        # it would go with it while another process waits to take one.
        lock = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            raise SpoolFailed(
                f"{self.path} is in use by another process (a running instance, or "
                "lastseen drain-spool)"
            ) from None
        self._lock = lock
        if self.path.exists():
            self._open()

    def _open(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(_SCHEMA)
        conn.execute(
            "INSERT OR IGNORE INTO spool_meta (name, value) VALUES ('name', ?)",
            (uuid.uuid4().hex,),
        )
        (self._name,) = conn.execute("SELECT value FROM spool_meta WHERE name = 'name'").fetchone()
        depth, size, oldest = conn.execute(
            "SELECT count(*), coalesce(sum(length(ids)), 0), min(received_at) FROM spooled"
        ).fetchone()
        self.depth, self.size, self.oldest = depth, size + depth * ROW_OVERHEAD, oldest
        self._conn = conn

    @staticmethod
    def _key(name: str, seq: int) -> str:
        return f"spool:{name}:{seq}"

    async def append(self, callbacks: Sequence[tuple[float, str]]) -> list[str]:
        """Stores callbacks (receive time, id array literal) durably, in order; their keys.

        ``SpoolFull`` if they would pass the size bound, ``SpoolFailed`` if the disk refuses
        them: either way nothing of them is stored.
        """
        size = sum(len(ids) + ROW_OVERHEAD for _, ids in callbacks)
        if self.size + size > self.max_bytes:
            raise SpoolFull(self.max_bytes)
        name, last = await self._call(self._append, callbacks)
        first = last - len(callbacks) + 1
        self.depth += len(callbacks)
        self.size += size
        if self.oldest is None:
            self.oldest = min(received for received, _ in callbacks)
        return [self._key(name, seq) for seq in range(first, last + 1)]

    def _append(self, callbacks: Sequence[tuple[float, str]]) -> tuple[str, int]:
        if self._lock is None:
            raise SpoolFailed(f"{self.path} is not locked by this process")
        if self._conn is None:
            self._open()
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("INSERT INTO spooled (received_at, ids) VALUES (?, ?)", callbacks)
            # One writer, one transaction: the rows got consecutive numbers ending here.
            (last,) = conn.execute("SELECT max(seq) FROM spooled").fetchone()
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return self._name, int(last)

    async def peek(self, limit: int) -> list[Spooled]:
        """The oldest ``limit`` spooled callbacks, in the order they were spooled."""
        name, rows = await self._call(self._peek, limit)
        return [Spooled(seq, self._key(name, seq), received, ids) for seq, received, ids in rows]

    def _peek(self, limit: int) -> tuple[str, list[tuple[int, float, str]]]:
        if self._conn is None:
            return self._name, []
        cursor = self._conn.execute(
            "SELECT seq, received_at, ids FROM spooled ORDER BY seq LIMIT ?", (limit,)
        )
        return self._name, cursor.fetchall()

    async def forget(self, batch: Sequence[Spooled]) -> None:
        """Deletes callbacks that the inbox has taken (the oldest ones, as ``peek`` gave them)."""
        if not batch:
            return
        self.oldest = await self._call(self._forget, batch[-1].seq)
        self.depth -= len(batch)
        self.size -= sum(len(s.ids) + ROW_OVERHEAD for s in batch)

    def _forget(self, last: int) -> float | None:
        conn = self._connection()
        conn.execute("DELETE FROM spooled WHERE seq <= ?", (last,))
        (oldest,) = conn.execute("SELECT min(received_at) FROM spooled").fetchone()
        if oldest is None:
            # Empty: the file goes (in this thread, so no append can slip in between).
            conn.close()
            self._conn = None
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            return None
        return float(oldest)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise SpoolFailed("the spool is not open")
        return self._conn

    async def _call(self, fn: Callable[..., T], *args: object) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except sqlite3.Error as exc:
            # A full disk, a read-only or broken file: the details are for the logs.
            raise SpoolFailed(f"{type(exc).__name__}: {exc}") from exc
        except OSError as exc:
            raise SpoolFailed(f"{type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        """Closes the file (what it holds stays for the next start)."""
        if self._conn is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._conn.close)
            self._conn = None
        if self._lock is not None:
            os.close(self._lock)  # and with it the lock
            self._lock = None
        self._executor.shutdown(wait=True)
