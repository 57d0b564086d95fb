"""``lastseen simulate``: the simulated upstream and producer in one process, or either alone.

``Simulator`` is also what the demo runs: it starts the upstream first (its URL is the
service's ``objects_url``), the producer once the service listens, and stops them in the
opposite order, closing the truth files last so that they hold everything both parts did.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import ssl

import structlog

from lastseen.devtools.simulate.config import SimulatorConfig
from lastseen.devtools.simulate.producer import Producer
from lastseen.devtools.simulate.truth import ANSWERS, CALLBACKS, TruthWriter
from lastseen.devtools.simulate.upstream import Upstream
from lastseen.runtime.limits import raise_open_file_limit

log = structlog.get_logger("lastseen.devtools.simulate")


class Simulator:
    """The upstream and the producer of one run, and the files of its ground truth."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.upstream: Upstream | None = None
        self.producer: Producer | None = None
        self.upstream_url: str | None = None
        self._writers: list[TruthWriter] = []
        self._producing: asyncio.Task[None] | None = None

    def _writer(self, name: str) -> TruthWriter | None:
        if self.config.truth_dir is None:
            return None
        writer = TruthWriter(self.config.truth_dir / name)
        self._writers.append(writer)
        return writer

    async def start_upstream(self) -> str:
        """Listens (port 0: a free one); returns the base URL. A taken port is an error."""
        writer = self._writer(ANSWERS)
        self.upstream = Upstream(self.config.upstream, writer.write if writer else None)
        host, port = self.config.upstream_listen
        reuse_port = self.config.upstream_reuse_port
        tls = None
        if self.config.upstream_tls is not None:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(*self.config.upstream_tls)
        self.upstream_url = await self.upstream.serve(host, port, reuse_port=reuse_port, tls=tls)
        log.info("upstream listening", url=self.upstream_url, online=self.config.online_rule)
        return self.upstream_url

    def start_producer(self, target: str | None = None) -> None:
        """Starts posting callbacks, to ``target`` if given, else to the configured one."""
        writer = self._writer(CALLBACKS)
        config = self.config.producer
        if target is not None:
            config = dataclasses.replace(config, target=target)
        self.producer = Producer(config, writer.write if writer else None)
        self._producing = asyncio.create_task(self.producer.run(), name="producer")
        mode = f"{config.rate:g}/s open loop" if config.rate > 0 else f"every {config.period:g} s"
        if config.story is not None:
            mode = f"the demo's story, a tick every {config.period:g} s"
        log.info("producer started", target=config.target, mode=mode)

    async def stop_producer(self) -> None:
        """Sends no more; returns once the POSTs under way have ended (within their timeout)."""
        if self.producer is not None and self._producing is not None:
            self.producer.stop()
            await self._producing

    def flush(self) -> None:
        """Writes out the truth recorded so far (for a verification while the upstream runs)."""
        for writer in self._writers:
            writer.flush()

    async def stop(self) -> None:
        """Stops the producer, then the upstream, then closes the truth files."""
        try:
            await self.stop_producer()
            if self.upstream is not None:
                # Requests still hanging when the run stops are not worth waiting for.
                await self.upstream.close()
        finally:
            for writer in self._writers:
                writer.close()

    def summary(self) -> list[str]:
        lines = []
        if self.producer is not None:
            s = self.producer.stats
            lines.append(
                f"producer: {s['sent']} callbacks sent, {s['acknowledged']} acknowledged, "
                f"{self.producer.failed} not acknowledged ({s['timeout']} timed out, "
                f"{s['error']} connection errors, {s['rejected']} rejected)"
                + (f", {s['skipped']} skipped (behind schedule)" if s["skipped"] else "")
            )
        if self.upstream is not None:
            u = self.upstream.stats
            faults = ", ".join(
                f"{kind}: {n}" for kind, n in sorted(u.items()) if kind not in ("requests", "ok")
            )
            lines.append(
                f"upstream: {u['requests']} requests, {u['ok']} answered"
                + (f", faults: {faults}" if faults else "")
            )
        if self.config.truth_dir is not None:
            lines.append(f"ground truth: {self.config.truth_dir}")
        return lines


async def run(config: SimulatorConfig) -> int:
    """Runs until SIGINT, SIGTERM or ``duration``; prints a summary; returns the exit status."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    simulator = Simulator(config)
    raise_open_file_limit()  # an upstream holds a connection per request in flight
    try:
        if config.runs_upstream:
            await simulator.start_upstream()
            upstream = simulator.upstream
            assert upstream is not None

            def toggle() -> None:
                upstream.toggle_outage()
                log.info("upstream outage", down=upstream.down)

            # An outage on demand, for the benchmark: SIGUSR1 starts it, the next one ends it.
            loop.add_signal_handler(signal.SIGUSR1, toggle)
        if config.runs_producer:
            simulator.start_producer()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), config.duration)
    finally:
        await simulator.stop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            loop.remove_signal_handler(sig)
    for line in simulator.summary():
        print(line)
    return 0
