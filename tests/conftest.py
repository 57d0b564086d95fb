"""Fixtures: one real PostgreSQL per test session, one fresh database per test, real HTTP servers.

The embedded server is started once; the schema is migrated once into a template database; each
test gets ``CREATE DATABASE ... TEMPLATE`` of it, which takes milliseconds. Set
``LASTSEEN_TEST_DATABASE_URL`` to run the suite against another server instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import os
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from helpers.podman import FIGURES, Containers, Podman
from helpers.podman import missing as podman_missing
from helpers.services import Running, Spawn, StartService, StartUpstream, fast_settings
from helpers.tables import own_database

from lastseen.core.clock import SYSTEM, Clock
from lastseen.devtools.database import with_database
from lastseen.devtools.dbproxy import DatabaseProxy
from lastseen.devtools.launch import ServeProcess
from lastseen.devtools.simulate.upstream import Upstream, UpstreamConfig
from lastseen.runtime.service import Service
from lastseen.storage.database import Database
from lastseen.storage.embedded import EmbeddedPostgres
from lastseen.telemetry import logs
from lastseen.upstream.connect import upstream_client

logs.configure("console", "warning")

_names = itertools.count()


@pytest.fixture(scope="session", autouse=True)
def own_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Whatever lastseen a test starts keeps its data (an embedded server, a spool) under the
    run's temporary directory, never in the user's data directory: in this process by its
    setting, in the processes it spawns (which get no LASTSEEN_* of this one) by the default,
    the user's data directory, moved under the run's."""
    data = tmp_path_factory.mktemp("data")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LASTSEEN_DATA_DIR", str(data / "lastseen"))
        patch.setenv("XDG_DATA_HOME", str(data))
        yield


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
    async with own_database(pg_url, f"t_{os.getpid()}_{next(_names)}", template_name) as url:
        yield url


@pytest.fixture
async def db_proxy(db_url: str) -> AsyncIterator[DatabaseProxy]:
    """The test's database behind a proxy that can take it away (``stop``) and bring it back
    (``start``); ``db_proxy.url()`` is the database through it."""
    proxy = DatabaseProxy(db_url)
    await proxy.start()
    yield proxy
    await proxy.stop()


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


@pytest.fixture
async def start_upstream() -> AsyncIterator[StartUpstream]:
    """Starts simulated upstreams: ``await start_upstream(latency_min=..., ...)`` (``tls=`` an
    SSL context for HTTPS)."""
    upstreams: list[Upstream] = []

    async def start(tls: ssl.SSLContext | None = None, **config: Any) -> tuple[Upstream, str]:
        config.setdefault("latency_min", 0.01)
        config.setdefault("latency_max", 0.05)
        config.setdefault("seed", 1)
        upstream = Upstream(UpstreamConfig(**config))
        upstreams.append(upstream)
        return upstream, await upstream.serve("127.0.0.1", 0, tls=tls)

    yield start
    for upstream in upstreams:
        await upstream.close()


@pytest.fixture
async def start_service(db_url: str) -> AsyncIterator[StartService]:
    """Starts services on the test's database: ``await start_service(objects_url=..., ...)``
    (settings by field name; ``tracer=`` an OpenTelemetry tracer; ``clock=`` the host's clock
    it runs on; ``migrated=False`` returns as soon as it listens, before it has migrated)."""
    started: list[tuple[Service, Database, contextlib.AbstractAsyncContextManager[Any]]] = []
    http = aiohttp.ClientSession()

    async def start(
        tracer: Any = None, migrated: bool = True, clock: Clock = SYSTEM, **overrides: Any
    ) -> Running:
        overrides.setdefault("database_url", db_url)
        settings = fast_settings(**overrides)
        database = await Database.open(settings.database_url or "", size=5, timeout=5)
        client_context = upstream_client(settings)
        client = await client_context.__aenter__()
        service = Service(settings, database, client, tracer=tracer, clock=clock)
        await service.start()
        started.append((service, database, client_context))
        running = Running(service, http)
        if migrated:
            await running.wait_ready()
        return running

    yield start
    for service, database, client_context in reversed(started):
        try:
            async with asyncio.timeout(STOP_WITHIN):
                await service.stop()
        except TimeoutError:
            pytest.fail(f"the service did not stop within {STOP_WITHIN} s:\n{_task_stacks()}")
        await client_context.__aexit__(None, None, None)
        await database.close()
    await http.close()


@pytest.fixture(autouse=True)
async def no_task_outlives_its_test() -> AsyncIterator[None]:
    """The event loop is the session's: a task a test leaves running would run into the
    next tests. Whatever a test started and has not ended a second after its teardown fails
    it (and is cancelled)."""
    before = asyncio.all_tasks()
    yield
    mine = asyncio.current_task()

    def left() -> set[asyncio.Task[Any]]:
        return {t for t in asyncio.all_tasks() - before if t is not mine and not t.done()}

    for _ in range(50):
        if not left():
            return
        await asyncio.sleep(0.02)
    leaked = left()
    names = sorted(t.get_name() + ": " + repr(t.get_coro()) for t in leaked)
    for task in leaked:
        task.cancel()
    await asyncio.gather(*leaked, return_exceptions=True)
    pytest.fail(f"tasks outlived their test: {names}")


STOP_WITHIN = 30.0  # seconds: a stop that takes longer is a bug worth its stack traces


def _task_stacks() -> str:
    out = io.StringIO()
    for task in asyncio.all_tasks():
        task.print_stack(file=out)
    return out.getvalue()


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


# The container tests (make test-container): the bookworm base is made once and kept under the
# podman root; lastseen's image is built on it by `make image`, as a user with podman would.


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The figures the container tests measured."""
    if FIGURES:
        terminalreporter.section("container figures")
        for name, value in FIGURES.items():
            terminalreporter.write_line(f"{name}: {value}")


@pytest.fixture(scope="session")
def podman() -> Podman:
    reason = podman_missing()
    if reason is not None:
        pytest.fail(reason)
    return Podman()


@pytest.fixture(scope="session")
def base_image(podman: Podman) -> str:
    """Debian bookworm with Python, made with mmdebstrap (once: it is kept)."""
    return podman.base_image()


@pytest.fixture(scope="session")
def image(podman: Podman, base_image: str) -> Iterator[str]:
    """lastseen's image, built by ``make image`` with podman on the bookworm base."""
    tag = f"localhost/lastseen:test-{os.getpid()}"
    make = ["make", "--no-print-directory", "image", "ENGINE=podman"]
    built = subprocess.run(
        [*make, f"BASE={base_image}", f"IMAGE={tag}"],
        cwd=Path(__file__).resolve().parent.parent,
        env=podman.env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]
    size = int(podman.run("image", "inspect", "--format", "{{.Size}}", tag).stdout)
    FIGURES["image size"] = f"{size / 1e6:.0f} MB (on {base_image})"
    yield tag
    podman.run("rmi", "--force", tag, check=False)


@pytest.fixture(scope="session")
def postgres_image(podman: Podman, base_image: str) -> str:
    """A stand-in for the official postgres image on the bookworm base (its Containerfile is
    in tests/container/postgres)."""
    context = Path(__file__).resolve().parent / "container" / "postgres"
    return podman.build_once(context, "localhost/lastseen-postgres", base=base_image)


@pytest.fixture
async def containers(podman: Podman) -> AsyncIterator[Containers]:
    """Starts a test's containers (``await containers.run(image, ...)``); removes them, and
    the volumes it named, at its end."""
    started = Containers(podman)
    yield started
    await started.remove()
