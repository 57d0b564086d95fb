"""Worker processes: the pipeline runs beside the HTTP front door, not in its event loop.

Why processes. A worker at a few thousand lookups per second keeps tens of thousands of tasks
and sockets busy; in the ingest process's event loop that delays POST /callback replies past
the producer's 1 s timeout, so a busy pipeline would cost callbacks. In its own process the
pipeline can saturate a core while the front door, mostly idle, is scheduled at once.

``lastseen serve`` (role ``all``) runs the ingest itself and starts ``worker_processes``
children, each handed the settings this process resolved, whole, on its standard input
(secrets read from files included: a child that read the environment again could disagree
with its parent). A child that exits is logged and started again after a backoff; a child
outlives no parent (it gets SIGTERM when the parent dies, even by kill -9, and then hands its
leases back). Each child serves /metrics on a loopback port of its own, behind a token only
the parent knows; the parent's /metrics adds them up, so one scrape sees everything. A child
that keeps failing to start makes /ready 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import socket
import sys

import aiohttp
import structlog

from lastseen.config.settings import Settings
from lastseen.core.backoff import backoff
from lastseen.pipeline.leases import take_back
from lastseen.storage.database import Database
from lastseen.telemetry.logs import resolved_log_format
from lastseen.telemetry.metrics import Metrics

log = structlog.get_logger("lastseen.runtime.processes")

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# The hidden subcommand a worker process runs: it reads its settings from standard input.
WORKER_COMMAND = "worker-process"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def child_settings(
    settings: Settings, database_url: str, port: int, holder: str, token: str
) -> Settings:
    """What a worker process runs: the parent's settings, resolved, with the child's role,
    database (the embedded server's, where the parent started one), port and lease name. Its
    HTTP routes (only ``/metrics`` is read, by the parent) take ``token`` as their admin
    token, a credential that no client knows; the intake secrets it does not need are left
    out."""
    return settings.replace(
        database_url=database_url,
        role="worker",
        listen=("127.0.0.1", port),
        worker_processes=0,
        parent_pid=os.getpid(),
        exit_with=None,  # the parent is what it dies with
        port_share=settings.worker_processes,
        instance_id=holder,
        admin_token=token,
        admin_token_file=None,
        # Its standard error is a pipe to this process: "auto" would always mean JSON there.
        log_format=resolved_log_format(settings.log_format),
        webhook_secret=None,
        webhook_secret_file=None,
        intake_token=None,
        intake_token_file=None,
    )


def child_environment() -> dict[str, str]:
    """The parent's environment without ``LASTSEEN_*``: a child's settings come whole on its
    standard input, and nothing in the environment may say otherwise."""
    return {k: v for k, v in os.environ.items() if not k.startswith("LASTSEEN_")}


# Failed starts in a row after which readiness reports the worker process as broken.
FAILED_STARTS = 3
# A child that ran this long had started: its next exit begins a new count.
STARTED_AFTER = 2.0


class WorkerProcess:
    """One child, started again whenever it exits until ``stop``. Its leases carry the name
    ``holder``, the same for every child of this slot: when one dies, what it held is handed
    back at once, and its successor would take it back anyway. Its standard error passes
    through this process's, and its last line is kept: it says why a child that keeps dying
    died."""

    def __init__(
        self,
        number: int,
        settings: Settings,
        db: Database,
        holder: str,
        token: str,
        metrics: Metrics,
    ) -> None:
        self.number = number
        self.settings = settings
        self.db = db
        self.holder = holder
        self.token = token
        self.metrics = metrics
        self.port = 0
        self.proc: asyncio.subprocess.Process | None = None
        self._stopping = False
        self.failed_starts = 0  # in a row
        self.last_error: str | None = None  # the last line of the last child that exited
        self._last_line: str | None = None  # of the child running now

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    @property
    def trouble(self) -> str | None:
        """Why this worker process cannot run, once it failed to start a few times in a row."""
        if self.failed_starts < FAILED_STARTS:
            return None
        why = f": {self.last_error}" if self.last_error else ""
        return f"worker process {self.number} cannot start ({self.failed_starts} tries){why}"

    async def _spawn(self) -> asyncio.subprocess.Process:
        self.port = _free_port()
        settings = child_settings(self.settings, self.db.url, self.port, self.holder, self.token)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "lastseen",
            WORKER_COMMAND,
            env=child_environment(),
            stdin=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdin is not None
        proc.stdin.write(settings.encode())
        with contextlib.suppress(ConnectionError):
            await proc.stdin.drain()
        proc.stdin.close()
        return proc

    async def _pass_stderr(self, proc: asyncio.subprocess.Process) -> None:
        # In chunks, not lines: one line longer than a StreamReader's limit (a traceback in
        # one JSON line) would raise, and with it stop this process.
        assert proc.stderr is not None
        out = sys.stderr.buffer
        tail = b""
        while chunk := await proc.stderr.read(1 << 16):
            with contextlib.suppress(OSError):
                out.write(chunk)
                out.flush()
            tail = (tail + chunk)[-4096:]
            lines = [line for line in tail.split(b"\n") if line.strip()]
            if lines:
                self._last_line = _ANSI.sub("", lines[-1].decode(errors="replace")).strip()[:500]

    async def run(self) -> None:
        """Keeps the child running; returns after ``stop``."""
        while not self._stopping:
            self._last_line = None
            self.proc = proc = await self._spawn()
            if self._stopping:  # stop() came while it was starting, and found no process
                proc.terminate()
            log.info("worker process started", number=self.number, pid=proc.pid)
            exited = asyncio.ensure_future(asyncio.gather(proc.wait(), self._pass_stderr(proc)))
            done, _ = await asyncio.wait({exited}, timeout=STARTED_AFTER)
            ran_a_while = not done
            if ran_a_while:
                self.failed_starts = 0  # it started: readiness no longer holds its past against it
            code, _ = await exited
            if self._stopping or code == 0:
                # 0 is a clean stop, asked for by a signal (Ctrl-C reaches the whole process
                # group before this process gets to stop its children): not a crash.
                return
            self.last_error = self._last_line
            self.metrics.worker_process_restarts.inc()
            if not ran_a_while:
                self.failed_starts += 1
            log.error(
                "worker process exited; starting it again",
                number=self.number,
                code=code,
                last_line=self.last_error,
                failed_starts=self.failed_starts,
            )
            await take_back(self.db, self.holder, "handed back a dead worker's callbacks")
            # A child that ran for a while is started again at once; one that dies as it
            # starts (a bad setting, a broken install) ever more slowly.
            await asyncio.sleep(0.2 if ran_a_while else backoff(self.failed_starts, 0.2, 30.0))

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

    def __init__(self, settings: Settings, db: Database, instance: str, metrics: Metrics) -> None:
        self.settings = settings
        # The parent's own credential for its children's routes; it never leaves this host.
        self.token = secrets.token_urlsafe(32)
        self.children = [
            WorkerProcess(n, settings, db, f"{instance}/worker-{n}", self.token, metrics)
            for n in range(settings.worker_processes)
        ]

    def trouble(self) -> str | None:
        """Why some worker process cannot run, if one cannot."""
        return next((t for c in self.children if (t := c.trouble) is not None), None)

    async def scrape(self, timeout: float = 3.0) -> list[tuple[str, str]]:
        """(name, /metrics text) of each child that answers in time."""

        async def one(http: aiohttp.ClientSession, child: WorkerProcess) -> tuple[str, str] | None:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(child.metrics_url) as response:
                    if response.status == 200:
                        return f"worker-{child.number}", await response.text()
                    log.warning(
                        "a worker process's metrics were refused",
                        number=child.number,
                        status=response.status,
                    )
            return None

        client_timeout = aiohttp.ClientTimeout(total=timeout)
        headers = {"Authorization": f"Bearer {self.token}"}
        async with aiohttp.ClientSession(timeout=client_timeout, headers=headers) as http:
            texts = await asyncio.gather(*(one(http, c) for c in self.children))
        return [t for t in texts if t is not None]

    async def stop(self) -> None:
        await asyncio.gather(*(c.stop(self.settings.shutdown_grace) for c in self.children))
