"""Fixtures: one real PostgreSQL per test session, one fresh database per test, real HTTP servers.

The embedded server is started once; the schema is migrated once into a template database; each
test gets ``CREATE DATABASE ... TEMPLATE`` of it, which takes milliseconds. Set
``LASTSEEN_TEST_DATABASE_URL`` to run the suite against another server instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from lastseen import logs
from lastseen.app import Service, upstream_client
from lastseen.devtools.launch import ServeProcess
from lastseen.devtools.simulate.upstream import Upstream, UpstreamConfig
from lastseen.settings import Settings
from lastseen.storage.database import Database
from lastseen.storage.embedded import EmbeddedPostgres

logs.configure("console", "warning")

_names = itertools.count()


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


@pytest.fixture(scope="session")
def pg_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of the session's PostgreSQL server (its maintenance database)."""
    external = os.environ.get("LASTSEEN_TEST_DATABASE_URL")
    if external:
        yield external
        return
    server = EmbeddedPostgres(tmp_path_factory.mktemp("pg"))
    url = server.start()

    async def tune() -> None:
        conn = await asyncpg.connect(url)
        # Test data need not survive a power cut; group commit is still exercised.
        await conn.execute("ALTER SYSTEM SET fsync = off")
        await conn.execute("ALTER SYSTEM SET synchronous_commit = off")
        await conn.execute("SELECT pg_reload_conf()")
        await conn.close()

    asyncio.run(tune())
    yield url
    server.stop()


@pytest.fixture(scope="session")
def template_name(pg_url: str) -> str:
    """A database with the schema migrated, to copy for each test."""
    name = f"lastseen_template_{os.getpid()}"

    async def build() -> None:
        conn = await asyncpg.connect(pg_url)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await conn.execute(f'CREATE DATABASE "{name}"')
        await conn.close()
        db = await Database.open(with_database(pg_url, name), size=2, timeout=10)
        await db.migrate()
        await db.close()

    asyncio.run(build())
    return name


@pytest.fixture
async def db_url(pg_url: str, template_name: str) -> AsyncIterator[str]:
    """A fresh, migrated database of this test's own."""
    name = f"t_{os.getpid()}_{next(_names)}"
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_name}"')
    finally:
        await conn.close()
    yield with_database(pg_url, name)
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = await Database.open(db_url, size=5, timeout=10)
    yield database
    await database.close()


@pytest.fixture
async def sql(db_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection to the test's database, for checking what was stored."""
    conn = await asyncpg.connect(db_url)
    yield conn
    await conn.close()


async def serve_app(app: web.Application) -> tuple[web.AppRunner, str]:
    """Serves ``app`` on a free loopback port; returns the runner and the base URL."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert isinstance(server, asyncio.Server)
    port = server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}"


StartUpstream = Callable[..., Awaitable[tuple[Upstream, str]]]


@pytest.fixture
async def start_upstream() -> AsyncIterator[StartUpstream]:
    """Starts simulated upstreams: ``await start_upstream(latency_min=..., ...)``."""
    upstreams: list[Upstream] = []

    async def start(**config: Any) -> tuple[Upstream, str]:
        config.setdefault("latency_min", 0.01)
        config.setdefault("latency_max", 0.05)
        config.setdefault("seed", 1)
        upstream = Upstream(UpstreamConfig(**config))
        upstreams.append(upstream)
        return upstream, await upstream.serve("127.0.0.1", 0)

    yield start
    for upstream in upstreams:
        await upstream.close()


def fast_settings(**overrides: Any) -> Settings:
    """Settings with time compressed for tests; ``overrides`` by field name."""
    base: dict[str, Any] = dict(
        listen=("127.0.0.1", 0),
        ttl=2.0,
        lease=2.0,
        poll_interval=0.1,
        lookup_timeout=2.0,
        retry_base=0.02,
        retry_max=0.1,
        max_attempts=4,
        results_interval=0.002,
        reap_interval=0.05,
        prune_interval=0.5,
        shutdown_grace=2.0,
        commit_timeout=2.0,
        data_dir=Path("/nonexistent-lastseen-test-dir"),
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


StartService = Callable[..., Coroutine[Any, Any, Running]]


@pytest.fixture
async def start_service(db_url: str) -> AsyncIterator[StartService]:
    """Starts services on the test's database: ``await start_service(objects_url=..., ...)``."""
    started: list[tuple[Service, Database, contextlib.AbstractAsyncContextManager[Any]]] = []
    http = aiohttp.ClientSession()

    async def start(**overrides: Any) -> Running:
        overrides.setdefault("database_url", db_url)
        settings = fast_settings(**overrides)
        database = await Database.open(settings.database_url or "", size=5, timeout=5)
        client_context = upstream_client(settings)
        service = Service(settings, database, await client_context.__aenter__())
        await service.start()
        started.append((service, database, client_context))
        running = Running(service, http)
        await running.wait_ready()
        return running

    yield start
    for service, database, client_context in reversed(started):
        await service.stop()
        await client_context.__aexit__(None, None, None)
        await database.close()
    await http.close()


Spawn = Callable[..., Coroutine[Any, Any, ServeProcess]]


@pytest.fixture
async def spawn() -> AsyncIterator[Spawn]:
    """Starts ``lastseen serve`` subprocesses (``await spawn(*args, env=...)``), ready to use;
    whatever is still running at the end of the test is killed."""
    started: list[ServeProcess] = []

    async def start(*args: str, env: dict[str, str] | None = None) -> ServeProcess:
        process = ServeProcess(*args, env=env)
        started.append(process)
        return await process.start()

    yield start
    for process in started:
        await process.stop()


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0, every: float = 0.02
) -> None:
    """Waits until ``check()`` (plain or async) is true; fails the test after ``timeout`` s."""
    async with asyncio.timeout(timeout):
        while True:
            result = check()
            if await result if inspect.isawaitable(result) else result:
                return
            await asyncio.sleep(every)
