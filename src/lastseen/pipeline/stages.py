"""The pipeline of one process: leases, worker, lookups, results and reaper, built together in
the order a callback meets them, started together, stopped in order.

Each stage is given, when it is built, where it hands its output: the worker hands ids to the
lookups, the lookups hand outcomes to the results writer, the writer hands finished callbacks
back to the held set, which makes room for the worker.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import structlog

from lastseen.config.instance import instance_name
from lastseen.config.settings import Settings
from lastseen.core.clock import SYSTEM, Clock
from lastseen.core.errors import DatabaseError
from lastseen.core.model import Fetch
from lastseen.core.supervisor import Supervisor
from lastseen.pipeline.leases import HeldCallbacks, Leases
from lastseen.pipeline.lookups import Lookups
from lastseen.pipeline.reaper import Reaper
from lastseen.pipeline.results import ResultWriter
from lastseen.pipeline.worker import Worker
from lastseen.storage.database import Database
from lastseen.telemetry.metrics import Metrics
from lastseen.telemetry.tracing import traced_fetch
from lastseen.upstream.answers import Upstream
from lastseen.upstream.client import UpstreamClient

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

log = structlog.get_logger("lastseen.pipeline.stages")


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        client: UpstreamClient,
        metrics: Metrics,
        supervisor: Supervisor,
        tracer: Tracer | None = None,
        clock: Clock = SYSTEM,
    ) -> None:
        """``clock`` is the one time every stage reads."""
        s = settings
        self.supervisor = supervisor
        wake = asyncio.Event()
        self.held = HeldCallbacks(metrics, on_finished=wake.set)
        self.leases = Leases(
            db,
            self.held,
            instance_name(s),
            lease=s.lease,
            batch=s.claim_batch,
        )
        self.results = ResultWriter(
            db,
            metrics,
            ttl=s.ttl,
            max_batch=s.results_batch,
            interval=s.results_interval,
            on_done=self.held.finish,
            clock=clock,
        )
        fetch: Fetch = Upstream(client).ask
        if tracer is not None:
            fetch = traced_fetch(fetch, tracer)
        self.lookups = Lookups(
            fetch,
            metrics,
            self.results.record,
            max_in_flight=s.max_lookups,
            rate=s.lookup_rps,
            ttl=s.ttl,
            retry_base=s.retry_base,
            retry_max=s.retry_max,
            upstream=s.objects_url,
            clock=clock,
        )
        self.worker = Worker(
            db,
            self.leases,
            self.held,
            wake,
            look_up=self.lookups.add,
            done=self.results.add_done,
            set_aside=self.results.set_aside,
            max_active_ids=s.max_active_ids,
            # Enough to keep every lookup slot busy, whatever the rate so far.
            min_active_ids=2 * s.max_lookups,
            max_claims=s.max_claims,
            ttl=s.ttl,
            poll_interval=s.poll_interval,
            metrics=metrics,
            clock=clock,
        )
        self.reaper = Reaper(
            db,
            metrics,
            ttl=s.ttl,
            interval=s.reap_interval,
            audit_retention=s.audit_retention,
            dead_letter_retention=s.dead_letter_retention,
            prune_interval=s.prune_interval,
            idempotency_retention=s.idempotency_retention,
            clock=clock,
        )
        self._started = False

    def start(self) -> None:
        """Starts every stage under the supervisor (once the schema is in place)."""
        self._started = True
        self.supervisor.start("results", self.results.run())
        self.supervisor.start("leases", self.leases.renew_forever())
        self.supervisor.start("worker", self.worker.run(), finite=True)
        self.supervisor.start("reaper", self.reaper.run())

    async def stop(self, grace: float) -> None:
        """Stops claiming, gives held callbacks ``grace`` seconds to finish, writes what is
        pending and hands the rest back to the inbox."""
        if not self._started:
            return
        self.worker.stop_claiming()
        # A claim under way when claiming stops still lands: wait for the loop to end, so that
        # what follows sees every callback this process holds.
        await self.supervisor.wait("worker", grace)
        await self.held.wait_empty(grace)
        self.lookups.close()
        await self.supervisor.cancel("leases", "reaper", "results")
        try:
            await self.results.flush_all()
            await self.leases.hand_back()
        except DatabaseError as exc:
            log.warning("could not hand back leases; they will lapse", error=str(exc))
        await self.worker.close()
        log.info("pipeline stopped", unfinished_callbacks=len(self.held))
