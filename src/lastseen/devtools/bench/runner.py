"""``lastseen bench``: the same measurements every time, end to end, over loopback. This module
holds what every scenario runs on: the options, the processes of a run and CPU metering; main.py
runs the scenarios (scenarios.py) and writes the results, report.py the table and the plot.

Each component runs as its own process, as in production: PostgreSQL (the embedded server, in
a fresh data directory, fsync on: durable commits are what is measured), ``lastseen serve``,
and the simulator's upstream and producer. Results go to ``OUT/results.json`` (every figure,
every setting, the machine), ``OUT/report.txt`` (the human table) and ``OUT/bench.png``.

The machine is shared and noisy: compare figures from one run, not across runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import aiohttp
import asyncpg
import psutil

from lastseen.devtools import database as devdb
from lastseen.devtools.certs import Certificates
from lastseen.devtools.database import with_database
from lastseen.devtools.launch import ServeProcess, SimulateProcess
from lastseen.storage.database import Database
from lastseen.storage.embedded import EmbeddedPostgres
from lastseen.telemetry.promtext import Reading


@dataclasses.dataclass
class BenchOptions:
    scenarios: Sequence[str]
    out_dir: Path
    database_url: str | None = None
    worker_processes: int | None = None  # for every serve with the default role [its default]
    upstream_processes: int = 1  # pipeline: the simulated upstream's, sharing one port
    # ingest
    seconds: float = 5.0
    # Issue 13's measure. 128 keeps the group commit's batches fuller (about 10% more durable
    # callbacks a second on 2026-11-21) at the cost of a longer p99.
    connections: int = 64
    rounds: int = 3
    ids_per_callback: int = 200
    watch_status: bool = False  # read /status every 2 s, as an open status page does
    # pipeline
    rates: Sequence[float] = (10, 20, 40, 60, 80, 100, 120)
    tls_rate: float = 20.0  # tls: callbacks/s of unique ids, well within what this box keeps up
    tls_client_gets: int = 1000  # tls: GETs at once, when the lookup client is timed alone
    step_seconds: float = 20.0
    latency_min: float = 0.3
    latency_max: float = 4.3
    # expiry
    ttl: float = 5.0
    expiry_objects: int = 2000
    # soak
    soak_seconds: float = 600.0
    soak_rate: float = 20.0
    sample_every: float = 2.0
    # crash
    crash_seconds: float = 60.0
    # hostile-upstream
    hostile_seconds: float = 120.0
    # database-outage
    db_outage_seconds: float = 15.0
    db_outage_before: float = 5.0
    db_outage_runs: int = 5
    # overload: 3 times the ~4,000 lookups/s this machine sustains, then half of it
    overload_rate: float = 120.0
    overload_normal_rate: float = 20.0
    overload_seconds: float = 120.0
    overload_after_seconds: float = 90.0
    # reaper
    reaper_callbacks: int = 5000
    # scale
    scale_rates: Sequence[float] = (30, 50)
    # inflight: lookups held this long by the upstream, as many as the worker takes at once
    inflight_lookups: int = 50_000
    inflight_hold: float = 40.0
    # nemesis: each fault this long, with this long of the producer before and after it
    nemesis_fault_seconds: float = 12.0
    nemesis_before: float = 5.0
    nemesis_after: float = 5.0
    nemesis_ttl: float = 30.0
    nemesis_configurations: Sequence[str] = ("reference", "production")
    # bytes left on the spool's disk as the fault starts: about half the fault's callbacks
    # fit (a commit to SQLite's WAL takes a page or two, 4 KiB each)
    nemesis_spool_disk_free: int = 192 * 1024
    # upstream-outage
    outage_warmup: float = 6.0
    outage_seconds: float = 12.0
    seed: int = 1

    def smoke(self) -> BenchOptions:
        """The same scenarios, tiny and in seconds: for the test suite, not for figures."""
        return dataclasses.replace(
            self,
            seconds=0.5,
            connections=4,
            rounds=1,
            rates=(5.0,),
            tls_rate=5.0,
            tls_client_gets=20,
            step_seconds=2.0,
            upstream_processes=2,  # the path a 10,000 lookups/s run needs, exercised
            latency_min=0.01,
            latency_max=0.05,
            ttl=3.0,
            expiry_objects=20,
            soak_seconds=2.0,
            soak_rate=5.0,
            crash_seconds=5.0,
            nemesis_fault_seconds=2.0,
            nemesis_before=1.0,
            nemesis_after=1.0,
            nemesis_ttl=10.0,  # the skew fault waits for expiry
            nemesis_spool_disk_free=48 * 1024,  # less than a fresh spool file needs: all 503
            outage_warmup=2.0,
            outage_seconds=3.0,
            hostile_seconds=3.0,
            db_outage_seconds=2.0,
            db_outage_before=1.0,
            db_outage_runs=1,
            overload_rate=10.0,
            overload_normal_rate=5.0,
            overload_seconds=3.0,
            overload_after_seconds=3.0,
            reaper_callbacks=50,
            scale_rates=(5.0,),
            inflight_lookups=400,
            inflight_hold=3.0,
            sample_every=0.5,
        )


class CpuMeter:
    """CPU seconds used by processes (and their children) between ``start`` and ``stop``."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._start: dict[str, float] = {}
        self._t0 = 0.0
        self.used: dict[str, float] = {}  # CPU seconds per process, once stopped

    @staticmethod
    def _cpu(pid: int) -> float:
        try:
            root = psutil.Process(abs(pid))
            times = root.cpu_times()
            total = times.user + times.system
            if pid > 0:
                # Children that ended (PostgreSQL backends come and go) are in the parent's
                # children_* times once reaped; the ones alive are counted one by one.
                total += times.children_user + times.children_system
                for proc in root.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        child = proc.cpu_times()
                        total += child.user + child.system
            return float(total)
        except psutil.Error:
            return 0.0

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._start = {name: self._cpu(pid) for name, pid in self.pids.items()}

    def stop(self) -> dict[str, float]:
        """Per process, the share of one core used, in percent."""
        elapsed = time.perf_counter() - self._t0
        self.used = {name: self._cpu(pid) - self._start[name] for name, pid in self.pids.items()}
        return {name: round(100 * used / elapsed, 1) for name, used in self.used.items()}

    def per_unit(self, units: float) -> dict[str, float]:
        """CPU microseconds per unit of work (a lookup, a callback), per process and in all."""
        if units <= 0:
            return {}
        each = {name: round(used / units * 1e6, 1) for name, used in self.used.items()}
        each["total"] = round(sum(self.used.values()) / units * 1e6, 1)
        return each


class Bench:
    """The processes of one bench run and the database they share."""

    def __init__(self, options: BenchOptions) -> None:
        self.options = options
        self.embedded: EmbeddedPostgres | None = None
        self.server_url = ""
        self.pg_pid: int | None = None
        self.serves: list[ServeProcess] = []
        self.simulators: list[SimulateProcess] = []

    async def __aenter__(self) -> Bench:
        if self.options.database_url:
            self.server_url = self.options.database_url
        else:
            self.embedded = EmbeddedPostgres(self.options.out_dir / "postgres")
            self.server_url = await asyncio.to_thread(self.embedded.start)
            self.pg_pid = self.embedded.pid
        return self

    async def __aexit__(self, *exc: object) -> None:
        for serve in self.serves:
            await serve.stop()
        for simulator in self.simulators:
            if simulator.proc is not None and simulator.proc.returncode is None:
                await simulator.terminate()
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)

    async def fresh_database(self, name: str) -> str:
        # Names of databases cannot be parameters: no statement of queries.sql can do this.
        conn = await asyncpg.connect(self.server_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return with_database(self.server_url, name)

    async def serve(self, database_url: str, *args: str, **env: str) -> ServeProcess:
        # The bench's own data directory: a spool made in a scenario stays with its results.
        environment = {
            "LASTSEEN_DATABASE_URL": database_url,
            "LASTSEEN_DATA_DIR": str(self.options.out_dir / "data"),
        }
        if self.options.worker_processes is not None and "--role" not in args:
            env.setdefault("worker_processes", str(self.options.worker_processes))
        environment.update({f"LASTSEEN_{k.upper()}": v for k, v in env.items()})
        serve = ServeProcess(*args, env=environment, keep_logs=1000)
        self.serves.append(serve)
        await serve.start()
        if "--role" not in args and env.get("worker_processes") != "0":
            # /ready speaks for the front door; the pipeline's process starts after it.
            async with asyncio.timeout(60):
                while not (await self.read_metrics(serve)).get("lastseen_worker_processes_up"):
                    await asyncio.sleep(0.05)
        return serve

    async def simulate(self, *args: str, upstream: bool) -> SimulateProcess:
        process = SimulateProcess(*args)
        self.simulators.append(process)
        return await process.start(wait_for_upstream=upstream)

    async def upstream(
        self,
        latency_min: float,
        latency_max: float,
        *,
        listen: str = "127.0.0.1:0",
        n: int = 0,
        tls: Certificates | None = None,
    ) -> SimulateProcess:
        """The simulated upstream (even ids online) on a free port, or as the ``n``-th of
        several processes sharing ``listen``'s port; over HTTPS with ``tls``."""
        shared = ["--upstream-reuse-port"] if self.options.upstream_processes > 1 else []
        if tls is not None:
            shared += ["--upstream-cert", str(tls.cert), "--upstream-key", str(tls.key)]
        return await self.simulate(
            "--mode", "upstream", "--upstream-listen", listen, *shared,
            "--latency-min", str(latency_min), "--latency-max", str(latency_max),
            "--seed", str(self.options.seed + 1000 * n), upstream=True,
        )  # fmt: skip

    async def upstreams(self, latency_min: float, latency_max: float) -> list[SimulateProcess]:
        """``upstream``, in ``upstream_processes`` processes that share one port."""
        first = await self.upstream(latency_min, latency_max)
        listen = first.upstream_url.removeprefix("http://")
        return [first] + [
            await self.upstream(latency_min, latency_max, listen=listen, n=n)
            for n in range(1, self.options.upstream_processes)
        ]

    async def producer(
        self,
        serve: ServeProcess,
        rate: float,
        seconds: float,
        *,
        connections: int,
        max_ids: int | None = None,
        universe: int | None = None,
    ) -> SimulateProcess:
        """The simulated producer, open loop at ``rate`` for ``seconds``; the id draws are the
        simulator's defaults (the reference's) unless given."""
        args = ["--mode", "producer", "--target", serve.url + "/callback", "--rate", str(rate),
                "--connections", str(connections), "--duration", str(seconds),
                "--seed", str(self.options.seed)]  # fmt: skip
        if max_ids is not None:
            args += ["--max-ids-per-callback", str(max_ids)]
        if universe is not None:
            args += ["--id-universe", str(universe)]
        return await self.simulate(*args, upstream=False)

    @contextlib.asynccontextmanager
    async def database(self, url: str) -> AsyncIterator[Database]:
        """A small pool on one of this run's databases, for the scenarios' own reads."""
        db = await Database.open(url, size=2, timeout=10)
        try:
            yield db
        finally:
            await db.close()

    async def postgres_version(self) -> str:
        async with self.database(self.server_url) as db:
            return await devdb.server_version(db)

    async def read_metrics(self, serve: ServeProcess) -> Reading:
        """One reading of a service's /metrics."""
        async with (
            aiohttp.ClientSession(headers=serve.admin_headers) as http,
            http.get(serve.url + "/metrics") as response,
        ):
            return Reading.of_text(await response.text())

    @staticmethod
    def progress(message: str) -> None:
        print(f"[bench] {message}", file=sys.stderr, flush=True)

    def cpu(self, **pids: int) -> CpuMeter:
        named = dict(pids)
        named["bench"] = -os.getpid()  # negative: this process alone, not its children
        if self.pg_pid is not None:
            named["postgres"] = self.pg_pid
        return CpuMeter(named)
