"""``lastseen demo``: everything in one process, with a live dashboard, then a verification.

It starts the simulated upstream, the embedded PostgreSQL (in ``DATA_DIR/demo``, emptied at
each start: the demo's data are its own), the service, and the simulated producer. It shows
the dashboard until Ctrl-C or ``--duration``; then it stops the producer, waits (at most
``--drain-timeout``) for the service to finish every callback, verifies the run against the
ground truth while the service still runs (its reaper must keep deleting what expires), stops
everything in reverse order, and prints a summary. The exit status is 1 if verification fails.

A second Ctrl-C skips the waiting and the verification, and just stops.

With the story (the default scenario, simulate/story.py) the producer and the upstream follow a
script measured in the TTL, the run lasts the story's length unless ``--duration`` says
otherwise, the demo itself retries the story's dead letter (``POST /dead-letters/retry``, as an
operator would), the dashboard's events name each deletion and dead letter as the database
shows it, and the verification expects deletions by the TTL and by offline, if the run lasted
until they were due.

With a terminal, the dashboard is a live view and the logs go to ``DATA_DIR/demo/demo.log``;
without one, a plain progress line is printed every ``--progress-every`` seconds and the logs
stay on stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import structlog
from rich.console import Console, RenderableType
from rich.live import Live

from lastseen.config.settings import Settings
from lastseen.core.errors import DatabaseError, LastseenError
from lastseen.devtools import dashboard
from lastseen.devtools import database as devdb
from lastseen.devtools.simulate.config import SimulatorConfig
from lastseen.devtools.simulate.run import Simulator
from lastseen.devtools.simulate.story import Story
from lastseen.devtools.verify import EXPECTABLE, Report, verify
from lastseen.runtime.service import Service
from lastseen.storage.connect import database
from lastseen.storage.database import Database
from lastseen.upstream.connect import upstream_client

log = structlog.get_logger("lastseen.devtools.demo")


class NotEmpty(LastseenError):
    """The demo was pointed at a database that holds data it must not touch."""


@dataclasses.dataclass(frozen=True)
class DemoOptions:
    refresh: float = 0.5  # seconds between frames of the live view
    progress_every: float = 5.0  # seconds between plain progress lines
    drain_timeout: float = 30.0  # seconds to wait for the last callbacks after the producer
    window: float = 30.0  # seconds of history behind the latency quantiles and rates
    edge: float = 0.25  # verification: tolerance at the TTL edge (see verify.py)
    live: bool | None = None  # None: a live view when stdout is a terminal


async def start_fresh(db: Database, owned: bool) -> None:
    """Migrates, and empties the tables of a database that is the demo's own (``owned``);
    refuses one that is not and holds callbacks or objects, since verification needs a
    database that holds this run only."""
    await db.migrate()
    if owned:
        await devdb.empty_tables(db)
        return
    if await devdb.holds_data(db):
        raise NotEmpty(
            "the demo needs an empty database to verify its run, and this one holds callbacks "
            "or objects: leave out --database-url to use the demo's own embedded one"
        )


async def wait_drained(db: Database, timeout: float) -> bool:
    """Waits until no callback is pending; False if some still are after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(DatabaseError):
            pending, _ = await db.inbox_stats()
            if pending == 0:
                return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.1)


class _Stops:
    """Ctrl-C and SIGTERM: the first stops the run gracefully, the second hurries it."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.hurry = asyncio.Event()

    def signalled(self) -> None:
        if self.stop.is_set():
            self.hurry.set()
        self.stop.set()


def _logs_to_file(path: Path) -> TextIO:
    """Sends the logs to the file at ``path``: on a terminal they would tear the live view
    apart. Returns the open file, to be closed once the logs go back to stderr."""
    path.parent.mkdir(parents=True, exist_ok=True)
    file = open(path, "a", buffering=1)  # noqa: SIM115 - the caller closes it
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file))
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(logging.StreamHandler(file))
    return file


async def run(settings: Settings, sim: SimulatorConfig, options: DemoOptions) -> int:
    """Runs the demo; returns the exit status."""
    demo_dir = settings.data_dir / "demo"
    sim = dataclasses.replace(sim, mode="both", truth_dir=sim.truth_dir or demo_dir / "truth")
    if sim.story is not None and sim.duration is None:
        sim = dataclasses.replace(sim, duration=sim.story.length)
    assert sim.truth_dir is not None
    live = sys.stdout.isatty() if options.live is None else options.live
    log_file = _logs_to_file(demo_dir / "demo.log") if live else None
    stops = _Stops()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stops.signalled)
    console = Console()
    simulator = Simulator(sim)
    report: Report | None = None
    try:
        upstream_url = await simulator.start_upstream()
        settings = settings.replace(objects_url=upstream_url, data_dir=demo_dir)
        async with database(settings) as db:
            try:
                await start_fresh(db, owned=settings.database_url is None)
                async with upstream_client(settings) as session:
                    service = Service(settings, db, session)
                    await service.start()
                    try:
                        report = await _run_service(
                            service,
                            simulator,
                            settings,
                            sim.truth_dir,
                            options,
                            stops,
                            live,
                            console,
                        )
                    finally:
                        await service.stop()
            finally:
                await simulator.stop()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if log_file is not None:
            structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
            log_file.close()
    for text in simulator.summary():
        console.print(text, highlight=False, soft_wrap=True, markup=False)
    if log_file is not None:
        console.print(f"logs: {demo_dir / 'demo.log'}", highlight=False, soft_wrap=True)
    if report is None:
        console.print("verification skipped (stopped by a second Ctrl-C)", highlight=False)
        return 1
    if sim.story is not None and not report.expect:
        console.print(
            f"(the run stopped before {sim.story.settled_at:g} s into the story: its deletions "
            "were not all due yet, and are not required)",
            highlight=False,
            soft_wrap=True,
        )
    for text in report.lines():
        console.print(text, highlight=False, soft_wrap=True, markup=False)
    return 0 if report.ok else 1


async def _retry_dead_letters(
    url: str, token: str | None, story: Story, stops: _Stops, say: Callable[[str], None]
) -> None:
    """The story's operator: at ``retry_at`` into the story, retries the dead letters through
    the admin API, as ``curl -X POST .../dead-letters/retry -d '{}'`` would."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    due = story.retry_at
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        while not stops.stop.is_set():
            elapsed = story.elapsed(time.time())
            if elapsed is None or elapsed < due:
                await asyncio.sleep(0.05)
                continue
            created = 0
            try:
                async with http.post(url, data=b"{}", headers=headers) as response:
                    reply = await response.json(content_type=None)
                queued = reply.get("callbacks_created") if isinstance(reply, dict) else None
                created = len(queued) if isinstance(queued, list) else 0
                say(f"demo: POST /dead-letters/retry: {response.status}, {created} queued")
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                say(f"demo: POST /dead-letters/retry failed: {exc}")
            # None to retry yet (a slow machine): again a period later, while a retry's
            # answer can still make a row.
            due = elapsed + story.period
            if created or due > story.ttl * 0.75:
                return


async def _run_service(
    service: Service,
    simulator: Simulator,
    settings: Settings,
    truth_dir: Path,
    options: DemoOptions,
    stops: _Stops,
    live: bool,
    console: Console,
) -> Report | None:
    """From the service's start to the verification, with the dashboard on show."""
    async with asyncio.timeout(30):
        await service.readiness.wait_migrated()
    host, _ = settings.listen
    host = "127.0.0.1" if host in ("", "0.0.0.0") else host
    simulator.start_producer(target=f"http://{host}:{service.port}/callback")
    if settings.ui != "off":
        console.print(f"status page: http://{host}:{service.port}/ui/", highlight=False)
    board = dashboard.Dashboard(service, simulator, window=options.window)
    story = simulator.config.story
    retrying: asyncio.Future[None] | None = None
    if story is not None:
        for text in story.lines():
            console.print(text, highlight=False, markup=False, soft_wrap=True)
        retrying = asyncio.ensure_future(
            _retry_dead_letters(
                f"http://{host}:{service.port}/dead-letters/retry",
                settings.admin_token,
                story,
                stops,
                board.note,
            )
        )
    duration = simulator.config.duration
    deadline = None if duration is None else time.monotonic() + duration
    failed = asyncio.ensure_future(service.supervisor.failed.wait())
    try:
        if live:
            frame = dashboard.render(await board.sample())
            with Live(frame, console=console, auto_refresh=False, transient=False) as view:

                def update(frame: RenderableType) -> None:
                    view.update(frame, refresh=True)

                await _show(board, options.refresh, deadline, stops, failed, update)
        else:
            # Sampled as often as the live view, so that each event is printed when it
            # happens; the progress line only every progress_every.
            await _show(
                board, options.refresh, deadline, stops, failed, None, options.progress_every
            )
        console.print("stopping the producer; waiting for the last callbacks", highlight=False)
        told = None if story is None else story.elapsed(time.time())
        if retrying is not None:
            # The story's operator stops with its producer: a retry made after this would be a
            # callback the drain below might not wait for.
            retrying.cancel()
            await asyncio.gather(retrying, return_exceptions=True)
        await simulator.stop_producer()
        if service.supervisor.failure:
            console.print(f"the service failed: {service.supervisor.failure}", highlight=False)
        elif not stops.hurry.is_set():
            drained = asyncio.ensure_future(wait_drained(service.db, options.drain_timeout))
            hurried = asyncio.ensure_future(stops.hurry.wait())
            await asyncio.wait({drained, hurried}, return_when=asyncio.FIRST_COMPLETED)
            hurried.cancel()
            if not drained.done():
                drained.cancel()
            elif not drained.result():
                console.print(
                    f"callbacks still pending after {options.drain_timeout:g} s", highlight=False
                )
        if stops.hurry.is_set():
            return None
        figures = await board.sample()
        if not live:
            _print_events(figures)
            print(dashboard.line(figures), flush=True)
        console.print(dashboard.deletions(figures), highlight=False, soft_wrap=True)
        simulator.flush()
        settled = story is not None and told is not None and told >= story.settled_at
        return await verify(
            service.db,
            truth_dir,
            ttl=settings.ttl,
            reap_interval=settings.reap_interval,
            audit_retention=settings.audit_retention,
            edge=options.edge,
            expect=EXPECTABLE if settled else (),
        )
    finally:
        failed.cancel()
        if retrying is not None:
            retrying.cancel()


def _print_events(figures: dashboard.Figures) -> None:
    for text in figures.new_events:
        print(text, flush=True)


async def _show(
    board: dashboard.Dashboard,
    every: float,
    deadline: float | None,
    stops: _Stops,
    failed: asyncio.Future[Any],
    update: Callable[[RenderableType], None] | None,
    progress_every: float = 0.0,
) -> None:
    """Samples every ``every`` seconds until a stop, and shows a frame (live) or prints the new
    events, and a progress line every ``progress_every`` seconds (plain)."""
    stopped = asyncio.ensure_future(stops.stop.wait())
    printed = time.monotonic()
    try:
        while not (stopped.done() or failed.done()):
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return
            pause = every if remaining is None else min(every, remaining)
            waiting: set[asyncio.Future[Any]] = {stopped, failed}
            await asyncio.wait(waiting, timeout=pause)
            figures = await board.sample()
            if update is not None:
                update(dashboard.render(figures))
                continue
            _print_events(figures)
            if time.monotonic() - printed >= progress_every - every / 2:
                printed = time.monotonic()
                print(dashboard.line(figures), flush=True)
    finally:
        stopped.cancel()
