"""What lastseen keeps in its data directory (the embedded PostgreSQL's data, the spool, the
demo's ground truth and logs), and a reset to a clean slate that refuses to take anything a
running process or an undelivered callback still needs."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sqlite3
from pathlib import Path

import psutil

from lastseen.core.errors import LastseenError


class DataInUse(LastseenError):
    """The data directory is still needed: by a running server, or for callbacks it holds."""


def sizes(data_dir: Path) -> dict[Path, int]:
    """Each top-level entry of ``data_dir``, with the bytes below it."""
    if not data_dir.is_dir():
        return {}
    found = {}
    for entry in sorted(data_dir.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            found[entry] = sum(f.lstat().st_size for f in entry.rglob("*") if not f.is_dir())
        else:
            found[entry] = entry.lstat().st_size
    return found


def check_unused(data_dir: Path) -> None:
    """Raises ``DataInUse`` while a process uses ``data_dir`` (the embedded server, or an
    instance holding a spool) or a spool in it holds callbacks not delivered yet."""
    users = data_dir / "users"  # the processes that share the embedded server
    running = [p.name for p in users.glob("*") if p.name.isdigit() and _alive(int(p.name))]
    if running:
        raise DataInUse(
            f"{data_dir} is in use by lastseen (pid {', '.join(running)}): stop it first"
        )
    postmaster = data_dir / "pgdata" / "postmaster.pid"
    if postmaster.exists():
        first = postmaster.read_text().split("\n", 1)[0].strip()
        if first.isdigit() and _alive(int(first)):
            raise DataInUse(f"the embedded PostgreSQL in {data_dir} runs (pid {first}): stop it")
    for spool in sorted((data_dir / "spool").glob("*.sqlite3")):
        if _locked(Path(f"{spool}.lock")):
            raise DataInUse(f"{spool} is in use by a running instance: stop it first")
        held = _spooled(spool)
        if held:
            raise DataInUse(
                f"{spool} holds {held} callbacks not delivered yet: move them into the database "
                f"with lastseen drain-spool {spool}, or delete the file yourself"
            )


def reset(data_dir: Path) -> None:
    """Deletes everything in ``data_dir`` (after ``check_unused``), keeping the directory."""
    check_unused(data_dir)
    for entry in sizes(data_dir):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _locked(lock: Path) -> bool:
    if not lock.exists():
        return False
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _spooled(spool: Path) -> int:
    try:
        with contextlib.closing(sqlite3.connect(f"file:{spool}?mode=ro", uri=True)) as db:
            (count,) = db.execute("SELECT count(*) FROM spooled").fetchone()
    except sqlite3.Error:
        return 1  # unreadable: not ours to judge, so not ours to delete
    return int(count)


def _alive(pid: int) -> bool:
    return pid != os.getpid() and psutil.pid_exists(pid)
