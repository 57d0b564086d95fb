"""Services, upstreams and HTTP servers started inside the test process, with compressed time."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from lastseen.config.settings import Settings
from lastseen.devtools.launch import ServeProcess
from lastseen.devtools.simulate.upstream import Upstream
from lastseen.runtime.service import Service

StartUpstream = Callable[..., Awaitable[tuple[Upstream, str]]]
StartService = Callable[..., Coroutine[Any, Any, "Running"]]
Spawn = Callable[..., Coroutine[Any, Any, ServeProcess]]


def fast_settings(**overrides: Any) -> Settings:
    """Settings with time compressed for tests; ``overrides`` by field name.

    Two differ from production's on purpose: the commit timeout is 2 s, not 0.8 s, since a
    test machine's two cores are shared with the database and the test itself, and a commit
    taking longer there says nothing about the code; and there is no spool, which the spool's
    tests turn on with a file of their own (with one, a slow commit would answer with a spool
    key where a test checks the callback id). The production configuration itself, spool and
    timeouts included, runs in the tests that spawn `lastseen serve` (test_production,
    test_durability, test_failover), on production's event loop (uvloop); the in-process
    services share pytest-asyncio's loop (asyncio's), which the unit layer's virtual clock
    builds on."""
    base: dict[str, Any] = dict(
        listen=("127.0.0.1", 0),
        ttl=2.0,
        lease=2.0,
        poll_interval=0.1,
        lookup_timeout=2.0,
        retry_base=0.02,
        retry_max=0.1,
        results_interval=0.002,
        reap_interval=0.05,
        prune_interval=0.5,
        shutdown_grace=2.0,
        commit_timeout=2.0,
        data_dir=Path("/nonexistent-lastseen-test-dir"),
        spool_max_bytes=0,
    )
    base.update(overrides)
    return Settings.load({}, base)


class Running:
    """A service started in this process, with a client for its HTTP API."""

    def __init__(self, service: Service, http: aiohttp.ClientSession) -> None:
        self.service = service
        self.http = http
        self.url = f"http://127.0.0.1:{service.port}"

    async def post(self, body: bytes | str, **kwargs: Any) -> tuple[int, Any]:
        async with self.http.post(self.url + "/callback", data=body, **kwargs) as response:
            return response.status, await response.json(content_type=None)

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.http.get(self.url + path) as response:
            return response.status, await response.json(content_type=None)

    def sample(self, name: str, **labels: str) -> float:
        """The current value of one metric sample (0 if it has none yet)."""
        value = self.service.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    async def wait_ready(self, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not self.service.readiness.migrated:
                await asyncio.sleep(0.01)


async def serve_app(app: web.Application) -> tuple[web.AppRunner, str]:
    """Serves ``app`` on a free loopback port; returns the runner and the base URL."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"
