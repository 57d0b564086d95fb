"""The nemesis: the production failures of the database and of the processes, one after the
other, each under the reference producer's behaviour (5 callbacks/s of 20 unique online ids,
a 1 s client timeout, no retry; TTL 30 s, the upstream's lookups as the run's latencies) on a
fresh database and service, and all judged by one checker (check.py) over the producer's
acknowledgements and the history of ``objects``.

The faults, each for ``nemesis_fault_seconds`` unless said:

- refused: PostgreSQL refuses connections and cuts the open ones, as a stopped server does;
- read-only: the server refuses writes and keeps its connections (SQLSTATE 25006), as a
  standby does that a failover left at the service's address;
- partition: a network that drops packets: connections stay open and no byte passes;
- failover: a primary with a synchronous standby, the primary crashed (``-m immediate``) and the
  standby promoted 3 s later, the service given both hosts in libpq's multi-host form;
- paused-worker: the worker processes of one of two instances stopped (SIGSTOP: a VM pause, a
  long GC) past their lease, then continued;
- spool-disk-full: PostgreSQL away while the spool's disk (a small tmpfs) fills;
- skew: two ingest instances on hosts whose clocks are 2 s ahead and 2 s behind PostgreSQL's,
  the POSTs taken in turn, a worker instance beside them; run past the TTL to see when each
  object is deleted.

Every fault runs in each configuration asked for: the reference's (no credentials, one worker
process) and production's (the webhook secret and an admin token from files, every POST
signed, two worker processes). A fault that cannot be made here (no superuser, no standby
binaries, no mount) says why.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import itertools
import os
import secrets as secrets_module
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import psutil

from lastseen.config.settings import Settings
from lastseen.devtools import database as devdb
from lastseen.devtools import replication
from lastseen.devtools.bench.check import Checker, observe
from lastseen.devtools.bench.processes import workers
from lastseen.devtools.clocks import ShiftedClock
from lastseen.devtools.dbproxy import DatabaseProxy
from lastseen.devtools.launch import ServeProcess, SimulateProcess
from lastseen.runtime.service import Service
from lastseen.storage.connect import database
from lastseen.upstream.connect import upstream_client

if TYPE_CHECKING:
    from lastseen.devtools.bench.runner import Bench

LEASE = 5.0  # s: the default; the paused worker's lease runs out well within the fault
PROMOTE_AFTER = 3.0  # s from the primary's crash to the standby's promotion

Inject = Callable[[], Awaitable[None]]
Fault = Callable[["Bench", "Setup"], Awaitable[dict[str, Any]]]


@dataclasses.dataclass
class Setup:
    """What each fault runs with: the upstream, the ids not sent yet, and how the instances are
    configured (``settings`` by field name, as ``Bench.serve`` takes them; ``secret``: the
    webhook secret each POST is signed with, if they require one)."""

    upstream: SimulateProcess
    ids: Iterator[int]
    configuration: str
    settings: dict[str, str]
    secret: str | None = None

    def env(self, bench: Bench, **more: str) -> dict[str, str]:
        ttl = str(bench.options.nemesis_ttl)
        return {"objects_url": self.upstream.upstream_url, "ttl": ttl, **self.settings, **more}


def _configure(bench: Bench, name: str, upstream: SimulateProcess, ids: Iterator[int]) -> Setup:
    """The reference's configuration (no credentials, one worker process), or production's:
    the webhook secret and an admin token from files, every POST signed, two worker
    processes."""
    if name == "reference":
        return Setup(upstream, ids, name, {})
    secrets = bench.options.out_dir / "secrets"
    secrets.mkdir(mode=0o700, parents=True, exist_ok=True)
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    files = {"webhook_secret_file": secret, "admin_token_file": secrets_module.token_urlsafe(32)}
    settings = {"worker_processes": "2"}
    for setting, value in files.items():
        path = secrets / setting.removesuffix("_file")
        path.write_text(value + "\n")
        path.chmod(0o600)
        settings[setting] = str(path)
    return Setup(upstream, ids, name, settings, secret)


async def nemesis(bench: Bench) -> dict[str, Any]:
    """Each fault in turn, in each configuration; the checker's figures for each."""
    o = bench.options
    upstream = await bench.upstream(o.latency_min, o.latency_max)
    ids = itertools.count(0, 2)  # even: online; unique across the faults
    configurations: dict[str, dict[str, Any]] = {}
    try:
        for configuration in o.nemesis_configurations:
            setup = _configure(bench, configuration, upstream, ids)
            faults = configurations.setdefault(configuration, {})
            for name, fault in FAULTS.items():
                bench.progress(f"nemesis, {configuration}: {name}")
                faults[name] = await fault(bench, setup)
                bench.progress(f"nemesis, {configuration}: {name}: {_summary(faults[name])}")
    finally:
        await upstream.terminate()
    return {
        "ttl_s": o.nemesis_ttl,
        "fault_s": o.nemesis_fault_seconds,
        "latency_s": [o.latency_min, o.latency_max],
        "configurations": configurations,
        "goal": "every POST acknowledged (a 503 only from a spool that cannot take more, never "
        "a false 202); every acknowledged id in objects before its TTL; /ready within 1 s",
    }


def _summary(result: dict[str, Any]) -> str:
    if "skipped" in result:
        return f"skipped: {result['skipped']}"
    return (
        f"{result['acknowledged']}/{result['posts']} acknowledged, {result['missed_ids']} ids "
        f"missed, worst id {result['worst_id_delay_s']} s, /ready worst {result['ready_worst_s']} s"
    )


async def _run(
    bench: Bench, setup: Setup, serve: ServeProcess, watch_url: str, inject: Inject
) -> dict[str, Any]:
    """The producer, the watch over ``objects`` and the /ready probe around ``inject``; then
    ``serve`` is stopped."""
    o = bench.options
    checker = Checker(o.nemesis_ttl)

    async def fault() -> None:
        await asyncio.sleep(o.nemesis_before)
        began = time.time()
        await inject()
        checker.fault = (began, time.time())
        await asyncio.sleep(o.nemesis_after)

    try:
        await observe(checker, [serve.url], watch_url, fault(), setup.ids, secret=setup.secret)
    finally:
        await serve.terminate()
    return checker.result()


@contextlib.asynccontextmanager
async def _proxied(bench: Bench, name: str) -> AsyncIterator[tuple[str, DatabaseProxy]]:
    """A fresh database and a proxy in front of its server."""
    url = await bench.fresh_database(f"bench_nemesis_{name}")
    proxy = DatabaseProxy(url)
    await proxy.start()
    try:
        yield url, proxy
    finally:
        proxy.heal()
        await proxy.stop()


async def refused(bench: Bench, setup: Setup) -> dict[str, Any]:
    async with _proxied(bench, "refused") as (url, proxy):
        serve = await bench.serve(proxy.url(), **setup.env(bench))

        async def inject() -> None:
            await proxy.stop()
            await asyncio.sleep(bench.options.nemesis_fault_seconds)
            await proxy.start()

        return await _run(bench, setup, serve, url, inject)


async def read_only(bench: Bench, setup: Setup) -> dict[str, Any]:
    async with bench.database(bench.server_url) as server:
        if not await devdb.is_superuser(server):
            return {"skipped": "the benchmark's role may not make the server read-only"}
        url = await bench.fresh_database("bench_nemesis_read_only")
        serve = await bench.serve(url, **setup.env(bench))

        async def inject() -> None:
            await devdb.set_read_only(server, True)
            try:
                await asyncio.sleep(bench.options.nemesis_fault_seconds)
            finally:
                await devdb.set_read_only(server, False)

        return await _run(bench, setup, serve, url, inject)


async def partition(bench: Bench, setup: Setup) -> dict[str, Any]:
    async with _proxied(bench, "partition") as (url, proxy):
        serve = await bench.serve(proxy.url(), **setup.env(bench))

        async def inject() -> None:
            proxy.partition()
            await asyncio.sleep(bench.options.nemesis_fault_seconds)
            proxy.heal()

        return await _run(bench, setup, serve, url, inject)


async def failover(bench: Bench, setup: Setup) -> dict[str, Any]:
    why = replication.missing()
    if why is not None:
        return {"skipped": why}
    pair = replication.Pair()
    try:
        await asyncio.to_thread(pair.start)
        await pair.wait_synchronous()
        serve = await bench.serve(pair.url, **setup.env(bench))

        async def inject() -> None:
            await asyncio.to_thread(pair.crash_primary)
            await asyncio.sleep(PROMOTE_AFTER)
            await asyncio.to_thread(pair.promote_standby)

        return await _run(bench, setup, serve, pair.url, inject) | {
            "promoted_after_s": PROMOTE_AFTER
        }
    finally:
        await asyncio.to_thread(pair.stop)


async def paused_worker(bench: Bench, setup: Setup) -> dict[str, Any]:
    url = await bench.fresh_database("bench_nemesis_paused_worker")
    # The producer's instance's worker processes are paused; the other's take over.
    env = setup.env(bench, lease=str(LEASE))
    first = await bench.serve(url, **env)
    other = await bench.serve(url, **env)
    paused = workers(first)
    if not paused:
        await first.terminate()
        await other.terminate()
        return {"skipped": "no worker process to pause (--worker-processes 0)"}

    def send(sig: signal.Signals) -> None:
        for process in paused:
            with contextlib.suppress(psutil.Error):
                process.send_signal(sig)

    async def inject() -> None:
        send(signal.SIGSTOP)
        try:
            await asyncio.sleep(bench.options.nemesis_fault_seconds)
        finally:
            send(signal.SIGCONT)

    try:
        return await _run(bench, setup, first, url, inject) | {"lease_s": LEASE}
    finally:
        send(signal.SIGCONT)  # _run stopped the first; a stopped process would not end
        await other.terminate()


async def spool_disk_full(bench: Bench, setup: Setup) -> dict[str, Any]:
    free = bench.options.nemesis_spool_disk_free
    disk = bench.options.out_dir / "nemesis-spool-disk"
    disk.mkdir(parents=True, exist_ok=True)
    mounted = await asyncio.to_thread(
        subprocess.run,
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
        capture_output=True,
    )
    if mounted.returncode != 0:
        return {"skipped": f"cannot mount a small disk: {mounted.stderr.decode().strip()}"}
    try:
        async with _proxied(bench, "spool_disk_full") as (url, proxy):
            spool = disk / "spool.sqlite3"
            serve = await bench.serve(proxy.url(), **setup.env(bench, spool_path=str(spool)))

            async def inject() -> None:
                _fill(disk, leave=free)
                await proxy.stop()
                await asyncio.sleep(bench.options.nemesis_fault_seconds)
                (disk / "filler").unlink()
                await proxy.start()

            return await _run(bench, setup, serve, url, inject) | {"disk_free_bytes_at_start": free}
    finally:
        await asyncio.to_thread(subprocess.run, ["umount", "-l", str(disk)], check=False)


def _fill(disk: Path, *, leave: int) -> None:
    """A file that takes all of ``disk`` but ``leave`` bytes."""
    free = os.statvfs(disk)
    size = free.f_bavail * free.f_frsize - leave
    with (disk / "filler").open("wb") as filler:
        filler.write(b"\0" * max(0, size))


SKEW = 2.0  # s: one ingest instance's host this far ahead of PostgreSQL's clock, one behind


async def skew(bench: Bench, setup: Setup) -> dict[str, Any]:
    """The ingest instances run in this process: a clock is a process's own, and the shifted
    one is handed to them as their host's."""
    o = bench.options
    url = await bench.fresh_database("bench_nemesis_skew")
    worker = await bench.serve(url, "--role", "worker", **setup.env(bench))
    checker = Checker(o.nemesis_ttl)

    async def fault() -> None:
        began = time.time()
        await asyncio.sleep(o.nemesis_before + o.nemesis_fault_seconds + o.nemesis_after)
        checker.fault = (began, time.time())

    try:
        async with (
            _shifted_instance(bench, setup, url, "ahead", SKEW) as ahead,
            _shifted_instance(bench, setup, url, "behind", -SKEW) as behind,
        ):
            await observe(
                checker, [ahead, behind], url, fault(), setup.ids, expiry=True, secret=setup.secret
            )
    finally:
        await worker.terminate()
    return checker.result() | {
        "skew_s": SKEW,
        "expiry": {"ahead": checker.expiry(0), "behind": checker.expiry(1)},
    }


@contextlib.asynccontextmanager
async def _shifted_instance(
    bench: Bench, setup: Setup, url: str, name: str, shift: float
) -> AsyncIterator[str]:
    """An ingest instance in this process on a host clock ``shift`` seconds off; its URL."""
    secrets = {k: Path(v) for k, v in setup.settings.items() if k.endswith("_file")}
    settings = Settings.load(
        {},
        {
            "database_url": url,
            "role": "ingest",
            "listen": ("127.0.0.1", 0),
            "instance_id": f"nemesis-{name}",
            "data_dir": bench.options.out_dir / "data",
            "ttl": bench.options.nemesis_ttl,
            **secrets,
        },
    )
    async with database(settings) as db, upstream_client(settings) as client:
        service = Service(settings, db, client, clock=ShiftedClock(shift))
        await service.start()
        try:
            address = f"http://127.0.0.1:{service.port}"
            async with asyncio.timeout(30), aiohttp.ClientSession() as http:
                while True:
                    async with http.get(address + "/ready") as response:
                        if response.status == 200:
                            break
                    await asyncio.sleep(0.05)
            yield address
        finally:
            await service.stop()


FAULTS: dict[str, Fault] = {
    "refused": refused,
    "read-only": read_only,
    "partition": partition,
    "failover": failover,
    "paused-worker": paused_worker,
    "spool-disk-full": spool_disk_full,
    "skew": skew,
}
