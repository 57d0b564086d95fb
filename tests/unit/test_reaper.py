"""What the reaper (pipeline/reaper.py) does while the database refuses its rounds; its rounds
on PostgreSQL are test_results.py's."""

from __future__ import annotations

import asyncio
import contextlib

from structlog.testing import capture_logs

from lastseen.core.clock import ManualClock
from lastseen.pipeline.reaper import Reaper
from lastseen.telemetry.metrics import Metrics

from .fakes import no_database, sample
from .virtual import run


def test_refused_rounds_back_off_and_are_said_once(clock: ManualClock, metrics: Metrics) -> None:
    """A minute of a database that refuses every round (away, read-only): one warning, not
    one per round, and rounds backed off from the 0.2 s interval to one every 2 s (about 33
    in the minute, not 300)."""

    async def main() -> None:
        async with no_database() as db:
            reaper = Reaper(
                db,
                metrics,
                ttl=30,
                interval=0.2,
                audit_retention=3600,
                dead_letter_retention=3600,
                prune_interval=10,
                idempotency_retention=3600,
                clock=clock,
            )
            task = asyncio.create_task(reaper.run())
            await asyncio.sleep(60)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    with capture_logs() as logs:
        run(clock, main())
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert [e["event"] for e in warnings] == ["reaper round failed; retrying"], logs
    assert 28 <= sample(metrics, "lastseen_reaper_rounds_failed_total") <= 36
