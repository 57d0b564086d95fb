"""How a process ends: a second signal, a stop that overruns its deadline, and a launcher that
dies without stopping what it started (a test run killed, a terminal closed)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
from helpers.services import Spawn
from helpers.waiting import eventually

from lastseen.devtools.launch import clean_environment

pytestmark = pytest.mark.slow


def _gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


async def test_a_second_signal_ends_a_stop_at_once(db_url: str, spawn: Spawn) -> None:
    """The first SIGTERM starts an orderly stop (here one that waits 60 s for load
    balancers); a second one, as from a developer's second Ctrl-C, ends the process at once
    with 128 + the signal, worker processes included."""
    serve = await spawn(env={"LASTSEEN_DATABASE_URL": db_url, "LASTSEEN_SHUTDOWN_DELAY": "60"})
    await eventually(lambda: len(psutil.Process(serve.pid).children()) == 1)
    (child,) = psutil.Process(serve.pid).children()
    serve.signal(signal.SIGTERM)
    await eventually(lambda: bool(serve.events("stopping")))
    assert serve.proc is not None
    assert serve.proc.returncode is None  # waiting out the delay
    started = time.monotonic()
    serve.signal(signal.SIGTERM)
    assert await serve.wait(timeout=10) == 128 + signal.SIGTERM
    assert time.monotonic() - started < 5
    await eventually(lambda: _gone(child.pid), timeout=20)


async def test_ctrl_c_stops_the_worker_processes_in_order(db_url: str, spawn: Spawn) -> None:
    """Ctrl-C reaches the whole process group, the worker processes too, and then their
    parent's SIGTERM: a worker process leaves SIGINT to its parent, so it stops in order
    (to the end: its leases handed back) instead of taking the SIGTERM for a second signal;
    serve exits 0."""
    serve = await spawn(env={"LASTSEEN_DATABASE_URL": db_url})
    await eventually(lambda: len(psutil.Process(serve.pid).children()) == 1)
    (child,) = psutil.Process(serve.pid).children()
    await eventually(lambda: len(serve.events("listening")) == 2)  # the worker's own
    child.send_signal(signal.SIGINT)
    serve.signal(signal.SIGINT)
    assert await serve.wait(timeout=30) == 0
    assert not serve.events("a second signal: exiting without finishing the stop")
    assert len(serve.events("stopped")) == 2  # both, to the end of their stop


def test_a_stop_that_overruns_its_deadline_exits_anyway() -> None:
    """A stop that hangs (here the event loop itself, blocked) ends at its deadline, exit 1:
    the deadline is a thread's, not the loop's."""
    script = textwrap.dedent(
        """
        import asyncio, time
        from lastseen.runtime.lifetime import Shutdown

        async def main():
            shutdown = Shutdown(0.5)
            shutdown.install()
            shutdown.arm()
            time.sleep(60)  # a stop that never ends, holding the loop

        asyncio.run(main())
        """
    )
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", script], env=clean_environment(), capture_output=True, timeout=30
    )
    assert done.returncode == 1, done.stderr
    assert time.monotonic() - started < 20
    assert b"the stop overran its deadline" in done.stdout + done.stderr


LAUNCHER = """
import asyncio, sys
from lastseen.devtools.launch import ServeProcess

async def main():
    serve = await ServeProcess(env={"LASTSEEN_DATABASE_URL": sys.argv[1]}).start()
    print(serve.pid, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_a_service_does_not_outlive_the_tool_that_launched_it(db_url: str) -> None:
    """A launcher (a test run, the bench) killed with -9 leaves nothing running: the
    service it started, which has lost its log reader too, stops and takes its worker
    process with it."""
    launcher = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        LAUNCHER,
        db_url,
        stdout=asyncio.subprocess.PIPE,
        env=clean_environment(),
    )
    left: list[psutil.Process] = []
    try:
        assert launcher.stdout is not None
        line = await asyncio.wait_for(launcher.stdout.readline(), 60)
        serve = psutil.Process(int(line))
        left.append(serve)
        await eventually(lambda: len(serve.children()) == 1, timeout=20)
        (child,) = serve.children()
        left.append(child)
        launcher.kill()
        await launcher.wait()
        await eventually(lambda: _gone(serve.pid) and _gone(child.pid), timeout=30)
    finally:
        if launcher.returncode is None:
            launcher.kill()
            await launcher.wait()
        for process in left:  # what a failure left running
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()


async def test_a_task_that_loses_its_cancel_is_cancelled_again() -> None:
    """A task that goes on after a cancel (as one looping around Python 3.11's wait_for does
    when the cancel lands as the inner call completes) is cancelled again: the supervisor's
    stop ends, instead of waiting for it forever."""
    from lastseen.core.supervisor import RECANCEL_EVERY, Supervisor

    cancels = 0

    async def deaf() -> None:
        nonlocal cancels
        while True:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancels += 1
                if cancels == 1:
                    continue  # the first cancel lost
                raise

    supervisor = Supervisor()
    supervisor.start("deaf", deaf())
    await asyncio.sleep(0)
    started = time.monotonic()
    await asyncio.wait_for(supervisor.stop(), timeout=10 * RECANCEL_EVERY)
    assert cancels == 2
    assert time.monotonic() - started < 3 * RECANCEL_EVERY
