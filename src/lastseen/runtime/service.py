"""The composition root: builds the pool, the upstream client and the components, runs, stops.

Long-lived resources are opened here once and closed here, in reverse order. Shutdown: stop
listening, let requests in flight finish and their commits land, stop the pipeline (pipeline.py
says in what order), and only then close the client, the pool and the embedded PostgreSQL.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import psutil
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from lastseen.api.app import build_app
from lastseen.api.readiness import Readiness, upstream_failure
from lastseen.api.routes import Routes
from lastseen.api.status import StatusBoard
from lastseen.api.ui import Page
from lastseen.config.instance import instance_name, named
from lastseen.config.settings import Settings
from lastseen.core.backoff import backoff
from lastseen.core.clock import SYSTEM, Clock, DatabaseClock
from lastseen.core.errors import ConfigError, DatabaseError, DatabaseUnavailable, SpoolFailed
from lastseen.core.supervisor import Supervisor
from lastseen.intake.admission import ClientLimits
from lastseen.intake.auth import IntakeAuth
from lastseen.intake.group_commit import GroupCommit
from lastseen.intake.ingest import CallbackHandler
from lastseen.intake.spool import Spool, spool_path
from lastseen.pipeline.stages import Pipeline
from lastseen.runtime.lifetime import Shutdown, die_with_parent, stop_deadline
from lastseen.runtime.limits import fit_lookups
from lastseen.runtime.processes import WorkerProcesses
from lastseen.storage.connect import database
from lastseen.storage.database import Database
from lastseen.telemetry.metrics import Metrics
from lastseen.telemetry.promtext import Reading
from lastseen.telemetry.tracing import Submit, start_tracing, traced_handler, traced_submit
from lastseen.upstream.client import UpstreamClient
from lastseen.upstream.connect import upstream_client

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

log = structlog.get_logger("lastseen.runtime.service")


class Service:
    """One lastseen instance: the HTTP server and what its role runs behind it: the front door
    (group commit), the pipeline, or worker processes that run the pipeline."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        client: UpstreamClient,
        metrics: Metrics | None = None,
        worker_processes: WorkerProcesses | None = None,
        tracer: Tracer | None = None,
        clock: Clock = SYSTEM,
    ) -> None:
        """``clock`` is the host's; the instance reads it set to PostgreSQL's
        (``DatabaseClock``), corrected with every readiness ping."""
        self.settings = s = named(settings)
        self.clock = DatabaseClock(clock)
        self.db = db
        self.metrics = m = metrics or Metrics()
        self.worker_processes = worker_processes
        # As the operator configured it: with worker processes, this process takes the
        # callbacks and they look them up, and together they are role all.
        self.role = "all" if worker_processes is not None else s.role
        self.supervisor = Supervisor()
        self.commit: GroupCommit | None = None
        self.spool: Spool | None = None
        callback_handler = None
        if s.takes_callbacks:
            if s.spool_max_bytes > 0:
                self.spool = Spool(spool_path(s), s.spool_max_bytes)
            self.commit = GroupCommit(
                db,
                m,
                max_batch=s.commit_max_batch,
                concurrency=s.commit_concurrency,
                timeout=s.commit_timeout,
                spool=self.spool,
                clock=self.clock,
            )
            submit: Submit = self.commit.submit
            if tracer is not None:
                submit = traced_submit(submit, tracer)
            limits = None
            if s.client_rate > 0:
                limits = ClientLimits(s.client_rate, s.client_burst or s.client_rate)
            handle: Handler = CallbackHandler(
                submit,
                m,
                max_body_bytes=s.max_body_bytes,
                max_ids=s.max_ids,
                limits=limits,
                auth=IntakeAuth(s.webhook_secret, s.intake_token),
                submit_keyed=self.commit.submit_keyed,
                clock=self.clock,
            ).handle
            callback_handler = handle if tracer is None else traced_handler(handle, tracer)
        self.pipeline: Pipeline | None = None
        if s.runs_pipeline:
            self.pipeline = Pipeline(s, db, client, m, self.supervisor, tracer, self.clock)
        runs_lookups = self.pipeline is not None or worker_processes is not None
        self.readiness = Readiness(
            self._upstream_failure if runs_lookups else None,
            self.commit if self.spool is not None else None,
            worker_processes.trouble if worker_processes is not None else None,
            upstream=s.objects_url,
            clock=clock.wall,
            read_clock=self._read_clock,
        )
        scrape = worker_processes.scrape if worker_processes else None
        # The status page belongs to the instance, so to its first process, not to each
        # worker process.
        self.status: StatusBoard | None = None
        if s.parent_pid is None:
            self.status = StatusBoard(
                db,
                m,
                self.readiness,
                scrape,
                instance=instance_name(s),
                role=self.role,
                ui=s.ui,
            )
        self.app = build_app(
            Routes(db, m, self.readiness, scrape, samples_database=s.parent_pid is None, ttl=s.ttl),
            callback_handler,
            max_body_bytes=s.max_body_bytes,
            noop=s.noop_route,
            admin_token=s.admin_token,
            status=None if self.status is None else self.status.handle,
            page=Page().routes() if self.status is not None and s.ui != "off" else None,
        )
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=5.0)
        self._stopped = False
        self._group_commit_tasks: list[str] = []
        self.port: int | None = None

    def _read_clock(self, sent: float, answered: float, database: float) -> None:
        self.clock.read(sent, answered, database)
        self.metrics.clock_skew.set(self.clock.offset)

    async def _upstream_failure(self) -> str | None:
        """Why this instance's lookups see the upstream failing, here or in a worker process,
        or None while they do not."""
        if self.pipeline is not None:
            lookups = self.pipeline.lookups
            return (lookups.failure or "failing") if lookups.outage else None
        assert self.worker_processes is not None
        texts = await self.worker_processes.scrape(timeout=1.0)
        return upstream_failure(Reading.summed(Reading.of_text(text) for _, text in texts))

    async def start(self) -> None:
        """Listens at once (so /health and /ready answer), and migrates in the background."""
        host, port = self.settings.listen
        if self.spool is not None:
            try:
                await self.spool.open()
            except SpoolFailed as exc:
                # Start all the same: with the database there, nothing is missing; without it,
                # callbacks get 503 as they would with no spool.
                log.error(
                    "the spool cannot be used: set LASTSEEN_SPOOL_PATH or LASTSEEN_DATA_DIR to "
                    "a writable place (LASTSEEN_SPOOL_MAX_BYTES=0 turns it off)",
                    path=str(self.spool.path),
                    error=str(exc),
                )
            if self.spool.depth:
                log.info(
                    "the spool holds callbacks; they drain once the database answers",
                    callbacks=self.spool.depth,
                    path=str(self.spool.path),
                )
        await self._runner.setup()
        # A deep accept queue: a burst of producers connecting at once must not see SYN drops.
        site = web.TCPSite(self._runner, host, port, reuse_address=True, backlog=4096)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            if self.spool is not None:
                await self.spool.close()
            why = (os.strerror(exc.errno) if exc.errno else str(exc)).lower()
            raise ConfigError(
                "LASTSEEN_LISTEN", f"cannot listen on {host}:{port}: {why} (--listen picks another)"
            ) from None
        self.port = self._runner.addresses[0][1]
        loop = type(asyncio.get_running_loop()).__module__.partition(".")[0]
        where = {}
        if self.settings.parent_pid is None:  # the instance's data, said once
            where["data_dir"] = str(self.settings.data_dir)
            if self.spool is not None:
                where["spool"] = str(self.spool.path)
        log.info(
            "listening",
            url=f"http://{host}:{self.port}",
            role=self.role,
            event_loop=loop,
            **where,
        )
        if self.status is not None and self.settings.ui != "off":
            log.info("status page", url=f"http://{host}:{self.port}/ui/", mode=self.settings.ui)
        if not ipaddress.ip_address(_resolved(host)).is_loopback:
            s = self.settings
            if s.takes_callbacks and s.webhook_secret is None and s.intake_token is None:
                log.warning(
                    "POST /callback is open to anyone who can reach this address: set "
                    "LASTSEEN_WEBHOOK_SECRET or LASTSEEN_INTAKE_TOKEN",
                    host=host,
                )
            if s.admin_token is None:
                log.warning(
                    "the read and admin routes are open to anyone who can reach this address: "
                    "set LASTSEEN_ADMIN_TOKEN",
                    host=host,
                )
        if self.commit is not None and self.spool is not None:
            # With a spool, callbacks are taken from the start, whatever the database does.
            self._start_group_commit(self.commit)
        self.supervisor.start("readiness", self.readiness.watch(self.db))
        self.supervisor.start("migrate", self._migrate_then_work(), finite=True)

    def _start_group_commit(self, commit: GroupCommit) -> None:
        self.supervisor.start("group-commit", commit.run(), finite=True)
        side = commit.side_tasks()
        self._group_commit_tasks = list(side)
        for name, coro in side.items():
            self.supervisor.start(name, coro)

    async def _migrate_then_work(self) -> None:
        failures = 0
        while True:
            try:
                applied = await self.db.migrate()
                break
            except DatabaseError as exc:
                failures += 1
                delay = backoff(failures, 0.1, 5.0)
                if isinstance(exc, DatabaseUnavailable):
                    self.readiness.reason = "cannot migrate: the database is unreachable"
                    self.readiness.unreachable = True
                else:  # reached, and refused (a privilege, a schema): the operator's to fix
                    self.readiness.reason = f"cannot migrate: {exc.detail}"
                if self.commit is not None:
                    self.commit.lose_database(str(exc))
                log.warning("database not ready, retrying", error=str(exc), retry_in=delay)
                await asyncio.sleep(delay)
        if applied:
            log.info("migrations applied", versions=applied)
        # PostgreSQL's time, before the pipeline takes a cutoff from it (the readiness watch
        # keeps it from now on).
        await self.readiness.ping(self.db)
        self.readiness.set_migrated()
        if self.worker_processes is not None:
            for child in self.worker_processes.children:
                self.supervisor.start(f"worker-process-{child.number}", child.run(), finite=True)
        if self.commit is not None:
            self.commit.open()
            if self.spool is None:
                self._start_group_commit(self.commit)
        if self.pipeline is not None:
            self.pipeline.start()
            if self.settings.gc_threshold > 0:
                self.supervisor.start(
                    "full-gc", collect_when_grown(FULL_COLLECTION_CHECK, FULL_COLLECTION_GROWTH)
                )

    async def run_until(
        self, stop: asyncio.Event, stopping: Callable[[], None] = lambda: None
    ) -> str | None:
        """Runs until ``stop`` is set or a background task dies, then calls ``stopping`` and
        stops; returns the failure, if any."""
        await self.start()
        stopped = asyncio.create_task(stop.wait(), name="stop-signal")
        failed = asyncio.create_task(self.supervisor.failed.wait(), name="task-failure")
        await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        failed.cancel()
        stopping()
        await self.stop()
        return self.supervisor.failure

    async def stop(self) -> None:
        """Stops, in order: /ready (for ``shutdown_delay`` while callbacks are still taken),
        taking callbacks, the listener (requests in flight are answered and their commits
        land), the worker processes, the pipeline, and whatever else runs."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.settings.shutdown_grace
        log.info("stopping", grace=grace)
        if self.settings.shutdown_delay > 0 and self.commit is not None:
            # Load balancers stop sending once /ready fails; until they notice, callbacks
            # that still arrive are taken as usual. A process that takes none has no reason
            # to wait.
            self.readiness.draining = True
            await asyncio.sleep(self.settings.shutdown_delay)
        if self.commit is not None:
            self.commit.close()
        await self._runner.cleanup()
        await self.supervisor.wait("group-commit", grace)
        await self.supervisor.cancel("group-commit", *self._group_commit_tasks)
        if self.spool is not None:
            await self.spool.close()
        if self.worker_processes is not None:
            await self.worker_processes.stop()
        if self.pipeline is not None:
            await self.pipeline.stop(grace)
        await self.supervisor.stop()
        log.info("stopped")


def _resolved(host: str) -> str:
    """An address for ``host`` (a name is taken for what it resolves to; "" is every address)."""
    if not host or host in ("0.0.0.0", "::"):
        return "0.0.0.0"
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        try:
            return socket.gethostbyname(host)
        except OSError:
            return "0.0.0.0"


# With young collections made rare, reference cycles that outlive a young collection reach
# the oldest generation, which Python then almost never collects: under a hostile upstream
# (every failed connection is a cycle of asyncio's) a worker's RSS grew 6 MiB a minute, and
# stayed flat with Python's thresholds. A full collection bounds it, but pauses the process:
# every minute, it raised the lag's p99 to 140-380 ms in the benchmark's steps that had one. So
# it runs only when the RSS has grown by this much since the last one
# (docs/explanation/design-decisions.md).
FULL_COLLECTION_GROWTH = 16 << 20  # bytes
FULL_COLLECTION_CHECK = 10.0  # seconds between looks at the RSS


async def collect_when_grown(
    every: float, growth: int, collect: Callable[[], int] = gc.collect
) -> None:
    """A full garbage collection (``collect``) whenever the RSS has grown by ``growth`` bytes
    from its lowest since the last one (looked at every ``every`` seconds), until cancelled."""
    process = psutil.Process()
    baseline = process.memory_info().rss
    while True:
        await asyncio.sleep(every)
        rss = process.memory_info().rss
        # Memory the allocator hands back lowers the mark: growth counts from there.
        baseline = min(baseline, rss)
        if rss - baseline < growth:
            continue
        started = time.perf_counter()
        found = collect()
        # Freed memory stays with the allocator, and is used again: the next collection
        # waits for growth beyond what the process holds now.
        baseline = process.memory_info().rss
        log.info(
            "full garbage collection",
            seconds=round(time.perf_counter() - started, 3),
            unreachable=found,
            rss_mib=round(baseline / 2**20, 1),
        )


def tune_gc(threshold: int) -> None:
    """Cheaper garbage collection: ``gc.freeze()`` takes everything built at start-up out of
    the collector's sight; in a pipeline process a ``threshold`` (> 0) also makes young
    collections rarer.

    A worker keeps tens of thousands of connection objects alive, and with Python's default
    thresholds the collector's passes over them were most of the lag's p99 (265 ms against
    36 ms at about 5,000 lookups/s). The HTTP process is the other way round: its garbage is
    short-lived, and rare large collections raised its reply p99 from 21 to about 55 ms, so it
    keeps Python's thresholds (docs/explanation/design-decisions.md).
    """
    gc.collect()
    gc.freeze()
    if threshold > 0:
        gc.set_threshold(threshold, 50, 1000)


async def run(settings: Settings) -> int:
    """``lastseen serve``: runs one instance until SIGTERM or SIGINT; returns the exit status."""
    shutdown = Shutdown(stop_deadline(settings))
    child = settings.role == "worker" and settings.parent_pid is not None
    shutdown.install(interrupts=not child)
    if child and settings.parent_pid is not None:
        die_with_parent(settings.parent_pid)
    settings = named(settings)
    # With worker processes, the pipeline moves to them; this process keeps the front door.
    spawns_workers = settings.role == "all" and settings.worker_processes > 0
    here = settings.replace(role="ingest") if spawns_workers else settings
    if here.runs_pipeline:
        here = fit_lookups(here)
    tune_gc(here.gc_threshold if here.runs_pipeline else 0)
    tracing = start_tracing(settings.otlp_endpoint)
    tracer = None if tracing is None else tracing[0]
    try:
        async with database(settings) as db, upstream_client(here) as client:
            metrics = Metrics()
            children = None
            if spawns_workers:
                children = WorkerProcesses(settings, db, instance_name(settings), metrics)
            service = Service(here, db, client, metrics, worker_processes=children, tracer=tracer)
            failure = await service.run_until(shutdown.requested, shutdown.arm)
    finally:
        shutdown.disarm()
        if tracing is not None:
            await asyncio.to_thread(tracing[1])  # flushes what is left
    if failure:
        log.error("stopped after a failure", failure=failure)
        return 1
    return 0
