"""Worker processes: the pipeline runs beside the HTTP front door, not in its event loop.

Why processes. A worker at a few thousand lookups per second keeps tens of thousands of tasks
and sockets busy; in the ingest process's event loop that delays POST /callback replies past
the producer's 1 s timeout, so a busy pipeline would cost callbacks. In its own process the
pipeline can saturate a core while the front door, mostly idle, is scheduled at once.

``lastseen serve`` (role ``all``) runs the ingest itself and starts ``worker_processes``
children as ``lastseen serve --role worker`` with the same settings. A child that exits is
logged and started again after a backoff; a child outlives no parent (it gets SIGTERM when the
parent dies, even by kill -9, and then hands its leases back). Each child serves /metrics on a
loopback port of its own; the parent's /metrics adds them up, so one scrape sees everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import sys

import aiohttp
import structlog

from lastseen.backoff import backoff
from lastseen.leases import holder_name, take_back
from lastseen.settings import OPTIONS, Settings
from lastseen.storage.database import Database

log = structlog.get_logger("lastseen.worker_processes")

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """In a worker process: get SIGTERM when the parent goes away (Linux), or exit now if it
    already has. Called by the child itself: a pre-exec hook is unsafe in a threaded parent."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def child_environment(
    settings: Settings, database_url: str, port: int, holder: str
) -> dict[str, str]:
    """The parent's settings as LASTSEEN_* variables, with the child's own role, port, and
    the name its leases carry."""
    env = dict(os.environ)
    for option in OPTIONS:
        value = getattr(settings, option.field)
        if value is None:
            env.pop(option.env, None)
            continue
        if option.field == "listen":
            value = f"127.0.0.1:{port}"
        elif isinstance(value, bool):
            value = "true" if value else "false"
        env[option.env] = str(value)
    env.update(
        LASTSEEN_ROLE="worker",
        LASTSEEN_DATABASE_URL=database_url,
        LASTSEEN_WORKER_PROCESSES="0",
        LASTSEEN_PARENT_PID=str(os.getpid()),
        LASTSEEN_PORT_SHARE=str(settings.worker_processes),
        LASTSEEN_INSTANCE_ID=holder,
    )
    return env


class WorkerProcess:
    """One child, started again whenever it exits until ``stop``. Its leases carry the name
    ``holder``, the same for every child of this slot: when one dies, what it held is handed
    back at once, and its successor would take it back anyway."""

    def __init__(self, number: int, settings: Settings, db: Database, holder: str) -> None:
        self.number = number
        self.settings = settings
        self.db = db
        self.holder = holder
        self.port = 0
        self.proc: asyncio.subprocess.Process | None = None
        self._stopping = False

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    async def _spawn(self) -> asyncio.subprocess.Process:
        self.port = _free_port()
        env = child_environment(self.settings, self.db.url, self.port, self.holder)
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "lastseen",
            "serve",
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
        )

    async def run(self) -> None:
        """Keeps the child running; returns after ``stop``."""
        crashes = 0  # in a row: a child that ran a minute starts the count afresh
        while not self._stopping:
            self.proc = await self._spawn()
            log.info("worker process started", number=self.number, pid=self.proc.pid)
            started = asyncio.get_running_loop().time()
            code = await self.proc.wait()
            if self._stopping or code == 0:
                # 0 is a clean stop, asked for by a signal (Ctrl-C reaches the whole process
                # group before this process gets to stop its children): not a crash.
                return
            log.error("worker process exited; starting it again", number=self.number, code=code)
            await take_back(self.db, self.holder, "handed back a dead worker's callbacks")
            # A child that ran for a while is started again at once; one that dies as it
            # starts (a bad setting, a broken install) ever more slowly.
            ran_a_while = asyncio.get_running_loop().time() - started > 2.0
            crashes = 1 if ran_a_while else crashes + 1
            await asyncio.sleep(backoff(crashes, 0.2, 30.0))

    async def stop(self, grace: float) -> None:
        """SIGTERM, up to ``grace`` seconds plus a margin to finish, then SIGKILL."""
        self._stopping = True
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace + 10)
        except TimeoutError:
            log.warning("worker process did not stop; killing it", number=self.number)
            proc.kill()
            await proc.wait()


class WorkerProcesses:
    """The children of one ``lastseen serve``."""

    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        parent = holder_name(settings.instance_id, settings.listen)
        self.children = [
            WorkerProcess(n, settings, db, f"{parent}/worker-{n}")
            for n in range(settings.worker_processes)
        ]

    async def scrape(self, timeout: float = 3.0) -> list[tuple[str, str]]:
        """(name, /metrics text) of each child that answers in time."""

        async def one(http: aiohttp.ClientSession, child: WorkerProcess) -> tuple[str, str] | None:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(child.metrics_url) as response:
                    if response.status == 200:
                        return f"worker-{child.number}", await response.text()
            return None

        client_timeout = aiohttp.ClientTimeout(total=timeout)
        async with aiohttp.ClientSession(timeout=client_timeout) as http:
            texts = await asyncio.gather(*(one(http, c) for c in self.children))
        return [t for t in texts if t is not None]

    async def stop(self) -> None:
        await asyncio.gather(*(c.stop(self.settings.shutdown_grace) for c in self.children))
