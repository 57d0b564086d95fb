"""How a process ends: on a signal, in order but within a deadline, and never after the
process that launched it.

A stop waits on work in flight, and some of that work waits on the network: a results write
on a database behind a partition waited 33-42 s for its connection's cancel. An orchestrator
kills such a process in the end, but a developer's second Ctrl-C, or a test run, must not wait
for it, and a process whose launcher died (a test run killed, a terminal closed) must not go
on running with nobody to stop it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import threading
import time

import structlog

from lastseen.config.settings import Settings
from lastseen.storage.connect import DB_TIMEOUT

log = structlog.get_logger("lastseen.runtime.lifetime")

_PR_SET_PDEATHSIG = 1


def stop_deadline(settings: Settings) -> float:
    """Seconds an orderly stop may take before the process exits anyway: the delay for load
    balancers, each stage's grace (the commits, the worker processes, the pipeline), and the
    database's timeout for the last writes and the pool's close."""
    return settings.shutdown_delay + 3 * settings.shutdown_grace + 3 * DB_TIMEOUT


class Shutdown:
    """The first SIGTERM or SIGINT sets ``requested`` (an orderly stop); a second one, or a
    stop that overruns ``deadline`` seconds from ``arm``, exits the process at once."""

    def __init__(self, deadline: float) -> None:
        self.requested = asyncio.Event()
        self.deadline = deadline
        self._timer: threading.Timer | None = None

    def install(self, *, interrupts: bool = True) -> None:
        """``interrupts``: whether SIGINT stops this process. A worker process leaves Ctrl-C,
        which reaches the whole process group, to its parent, which stops it with SIGTERM:
        taken as two signals, that would end its stop before its leases were handed back."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._signalled, signal.SIGTERM)
        if interrupts:
            loop.add_signal_handler(signal.SIGINT, self._signalled, signal.SIGINT)
        else:
            loop.add_signal_handler(signal.SIGINT, lambda: None)

    def _signalled(self, sig: signal.Signals) -> None:
        if self.requested.is_set():
            log.warning("a second signal: exiting without finishing the stop", signal=sig.name)
            os._exit(128 + sig)
        self.requested.set()

    def arm(self) -> None:
        """The stop begins: from now on it has ``deadline`` seconds. A thread, not a task:
        what overruns may be the event loop itself."""
        if self._timer is None:
            self._timer = threading.Timer(self.deadline, self._overdue)
            self._timer.name = "stop-deadline"
            self._timer.daemon = True
            self._timer.start()

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _overdue(self) -> None:
        log.error("the stop overran its deadline; exiting", deadline=self.deadline)
        os._exit(1)


def die_with_parent(parent_pid: int) -> None:
    """In a worker process: get SIGTERM when the parent goes away (Linux), or exit now if it
    already has. Called by the child itself: a pre-exec hook is unsafe in a threaded parent."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)


def watch_launcher(launcher_pid: int, deadline: float, every: float = 0.5) -> None:
    """SIGTERM to this process once ``launcher_pid`` is no longer its parent (it died, and
    the process was handed on), and an exit ``deadline`` seconds later if that did not end
    it. A thread that polls, not PR_SET_PDEATHSIG: that fires when the launching *thread*
    ends, which in a launcher that starts processes from a thread pool is any time."""

    def watch() -> None:
        while os.getppid() == launcher_pid:
            time.sleep(every)
        log.warning("the process that launched this one is gone; stopping", launcher=launcher_pid)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(deadline)
        os._exit(1)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()
