"""The composition root: builds the pool, the HTTP session and the components, runs, and stops.

Long-lived resources are opened here once and closed here, in reverse order. Shutdown: stop
listening, let requests in flight finish and their commits land, stop claiming, give held
callbacks ``shutdown_grace`` seconds to finish, write what is pending, hand back the leases of
what is left, and only then close the session, the pool and the embedded PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from collections.abc import AsyncIterator

import structlog
from aiohttp import web

from lastseen.db import Database
from lastseen.embedded import EmbeddedPostgres
from lastseen.errors import DatabaseError
from lastseen.http_client import UpstreamClient
from lastseen.inbox import GroupCommit, Leases
from lastseen.ingest import CallbackHandler
from lastseen.lookups import Lookups
from lastseen.metrics import Metrics
from lastseen.reaper import Reaper
from lastseen.results import ResultWriter
from lastseen.settings import Settings
from lastseen.supervisor import Supervisor
from lastseen.web import Readiness, Routes, build_app
from lastseen.worker import Worker
from lastseen.workers import WorkerProcesses, die_with_parent

log = structlog.get_logger("lastseen.app")

DB_TIMEOUT = 10.0


class Service:
    """One lastseen instance: the HTTP server and, unless ``role`` says otherwise, the pipeline."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        session: UpstreamClient,
        metrics: Metrics | None = None,
        workers: WorkerProcesses | None = None,
    ) -> None:
        self.settings = s = settings
        self.workers = workers
        self.db = db
        self.metrics = m = metrics or Metrics()
        self.readiness = Readiness()
        self.supervisor = Supervisor()
        self.ingests = s.role in ("all", "ingest")
        self.works = s.role in ("all", "worker")
        self.commit = GroupCommit(
            db,
            m,
            max_batch=s.commit_max_batch,
            concurrency=s.commit_concurrency,
            timeout=s.commit_timeout,
        )
        self.leases = Leases(db, Worker.new_id(), lease=s.lease, batch=s.claim_batch)
        self.worker = Worker(
            db, m, self.leases, max_active=s.max_active_callbacks, poll_interval=s.poll_interval
        )
        self.lookups = Lookups(
            session,
            m,
            self.worker.deliver,
            max_in_flight=s.max_lookups,
            rate=s.lookup_rps,
            timeout=s.lookup_timeout,
            max_attempts=s.max_attempts,
            retry_base=s.retry_base,
            retry_max=s.retry_max,
        )
        self.results = ResultWriter(
            db,
            m,
            ttl=s.ttl,
            max_batch=s.results_batch,
            interval=s.results_interval,
            on_done=self.worker.done,
        )
        self.worker.lookups = self.lookups
        self.worker.results = self.results
        self.reaper = Reaper(
            db,
            m,
            ttl=s.ttl,
            interval=s.reap_interval,
            audit_retention=s.audit_retention,
            prune_interval=s.prune_interval,
        )
        handler = CallbackHandler(self.commit, m, s.max_body_bytes) if self.ingests else None
        self.app = build_app(
            Routes(
                db,
                m,
                self.readiness,
                workers.scrape if workers else None,
                samples_database=s.parent_pid is None,
            ),
            handler,
            max_body_bytes=s.max_body_bytes,
            noop=s.noop_route,
        )
        self._runner: web.AppRunner | None = None
        self._stopped = False
        self.port: int | None = None

    async def start(self) -> None:
        """Listens at once (so /health and /ready answer), and migrates in the background."""
        host, port = self.settings.listen
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=5.0)
        await self._runner.setup()
        # A deep accept queue: a burst of producers connecting at once must not see SYN drops.
        site = web.TCPSite(self._runner, host, port, reuse_address=True, backlog=4096)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        log.info("listening", url=f"http://{host}:{self.port}", role=self.settings.role)
        self.supervisor.start("migrate", self._migrate_then_work(), finite=True)

    async def _migrate_then_work(self) -> None:
        delay = 0.1
        while True:
            try:
                applied = await self.db.migrate()
                break
            except DatabaseError as exc:
                self.readiness.reason = f"cannot migrate: {exc}"
                log.warning("database not ready, retrying", error=str(exc), retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        if applied:
            log.info("migrations applied", versions=applied)
        self.readiness.migrated = True
        if self.workers is not None:
            for child in self.workers.children:
                self.supervisor.start(f"worker-process-{child.number}", child.run(), finite=True)
        if self.ingests:
            self.commit.open()
            self.supervisor.start("group-commit", self.commit.run(), finite=True)
        if self.works:
            self.supervisor.start("results", self.results.run())
            self.supervisor.start("leases", self.leases.renew_forever(self.worker.jobs.keys))
            self.supervisor.start("worker", self.worker.run(), finite=True)
            self.supervisor.start("reaper", self.reaper.run())

    async def run_until(self, stop: asyncio.Event) -> str | None:
        """Runs until ``stop`` is set or a background task dies; returns the failure, if any."""
        await self.start()
        stopped = asyncio.create_task(stop.wait(), name="stop-signal")
        failed = asyncio.create_task(self.supervisor.failed.wait(), name="task-failure")
        await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        failed.cancel()
        await self.stop()
        return self.supervisor.failure

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        s = self.settings
        log.info("stopping", grace=s.shutdown_grace)
        self.commit.close()
        if self._runner is not None:
            # Stops listening and waits for requests in flight, whose commits the group commit
            # still performs (it drains its queue after close()).
            await self._runner.cleanup()
        await self.supervisor.wait("group-commit", s.shutdown_grace)
        if self.workers is not None:
            await self.workers.stop()
        if self.works and self.readiness.migrated:
            self.worker.stop_claiming()
            # A claim under way when claiming stops still lands: wait for the loop to end, so
            # that drain sees every callback this worker holds.
            await self.supervisor.wait("worker", s.shutdown_grace)
            await self.worker.drain(s.shutdown_grace)
            await self.lookups.close()
        # The rest run until cancelled; then the writer's last batch is written here.
        await self.supervisor.stop()
        if self.works and self.readiness.migrated:
            try:
                while self.results.pending:
                    before = self.results.pending
                    await self.results.flush()
                    if self.results.pending >= before:
                        break
                await self.leases.release(list(self.worker.jobs))
            except DatabaseError as exc:
                log.warning("could not hand back leases; they will lapse", error=str(exc))
        await self.worker.close()
        log.info("stopped", unfinished_callbacks=len(self.worker.jobs))


@contextlib.asynccontextmanager
async def client_session(settings: Settings) -> AsyncIterator[UpstreamClient]:
    """The one upstream client of a process, closed on exit. Lookups cap its concurrency."""
    client = UpstreamClient(settings.objects_url, timeout=settings.lookup_timeout)
    try:
        yield client
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def database(settings: Settings) -> AsyncIterator[Database]:
    """The pool, on the configured database or on an embedded one started for it; on exit the
    pool closes, then the embedded server stops (if no other lastseen process uses it)."""
    embedded = None
    url = settings.database_url
    if url is None:
        embedded = EmbeddedPostgres(settings.data_dir)
        url = await asyncio.to_thread(embedded.start)
    try:
        db = await Database.open(url, size=settings.pool_size, timeout=DB_TIMEOUT)
        try:
            yield db
        finally:
            await db.close()
    finally:
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)


def tune_gc(threshold: int) -> None:
    """Cheaper garbage collection: ``gc.freeze()`` takes everything built at start-up out of
    the collector's sight; in a pipeline process a ``threshold`` (> 0) also makes young
    collections rarer.

    A worker keeps tens of thousands of connection objects alive, and with Python's default
    thresholds the collector's passes over them were most of the lag's p99 (265 ms against
    36 ms at about 5,000 lookups/s). The HTTP process is the other way round: its garbage is
    short-lived, and rare large collections raised its reply p99 from 21 to about 55 ms, so it
    keeps Python's thresholds (docs/benchmarks.md).
    """
    gc.collect()
    gc.freeze()
    if threshold > 0:
        gc.set_threshold(threshold, 50, 1000)


async def run(settings: Settings) -> int:
    """``lastseen serve``: runs one instance until SIGTERM or SIGINT; returns the exit status."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if settings.role == "worker" and settings.parent_pid is not None:
        die_with_parent(settings.parent_pid)
    runs_pipeline = settings.role == "worker" or (
        settings.role == "all" and settings.worker_processes == 0
    )
    tune_gc(settings.gc_threshold if runs_pipeline else 0)
    async with database(settings) as db, client_session(settings) as session:
        workers = None
        if settings.role == "all" and settings.worker_processes > 0:
            # The pipeline moves to child processes; this one keeps the front door.
            workers = WorkerProcesses(settings, db.url)
            settings = settings.replace(role="ingest")
        service = Service(settings, db, session, workers=workers)
        failure = await service.run_until(stop)
    if failure:
        log.error("stopped after a failure", failure=failure)
        return 1
    return 0
