"""The end-to-end path in the configuration operators run, beside the default one.

``production``: every secret from a file (webhook secret, admin token, the upstream's API key),
a producer that signs every request with Standard Webhooks, two worker processes, and an HTTPS
upstream whose certificate a CA of the test's own signs, asking for an API key. The same
scenarios run in both: callbacks in, every acknowledged id in ``objects``, the worker
processes' figures in /metrics and /status, a dead letter retried.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime
import itertools
import os
import random
import shutil
import socket
import ssl
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import msgspec
import pytest
import standardwebhooks
from helpers.services import Spawn, StartUpstream, fast_settings
from helpers.waiting import eventually

from lastseen.config.instance import named
from lastseen.devtools import certs
from lastseen.devtools.launch import ServeProcess
from lastseen.runtime import processes as worker_processes
from lastseen.runtime.processes import WorkerProcesses
from lastseen.runtime.service import Service
from lastseen.storage.database import Database
from lastseen.telemetry.metrics import Metrics
from lastseen.upstream.connect import upstream_client

SECRET = "whsec_" + base64.b64encode(b"production-secret-production-sec").decode()
ADMIN = "admin-token-from-a-file"
INTAKE = "intake-token-from-a-file"
API_KEY = "upstream-api-key-from-a-file"
_ids = itertools.count(1)


@dataclasses.dataclass
class Deployment:
    """How one configuration is started and how its clients talk to it."""

    name: str
    env: dict[str, str]
    worker_processes: int
    signs: bool
    upstream: dict[str, Any] = dataclasses.field(default_factory=dict)  # for start_upstream

    def producer_headers(self, body: bytes) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.signs:
            msg_id = f"msg_{next(_ids)}"
            now = time.time()
            signature = standardwebhooks.Webhook(SECRET).sign(msg_id, _datetime(now), body.decode())
            headers.update(
                {
                    "webhook-id": msg_id,
                    "webhook-timestamp": str(int(now)),
                    "webhook-signature": signature,
                }
            )
        return headers

    @property
    def admin_headers(self) -> dict[str, str]:
        if "LASTSEEN_ADMIN_TOKEN_FILE" not in self.env:
            return {}
        return {"Authorization": f"Bearer {ADMIN}"}


def _datetime(epoch: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(epoch, tz=datetime.UTC)


def configured(name: str, tmp_path: Path, db_url: str) -> Deployment:
    """The ``default`` or the ``production`` configuration on the test's database."""
    env = {"LASTSEEN_DATABASE_URL": db_url, "LASTSEEN_TTL": "30"}
    if name == "default":
        return Deployment("default", env, 1, signs=False)
    files = ("webhook-secret", "intake-token", "admin-token", "api-key")
    secret, intake, admin, api_key = (tmp_path / n for n in files)
    secret.write_text(SECRET + "\n")
    intake.write_text(INTAKE + "\n")
    admin.write_text(ADMIN + "\n")
    api_key.write_text(f"Authorization: Bearer {API_KEY}\n")
    for path in (secret, intake, admin, api_key):
        path.chmod(0o400)
    ca, server = certificates(tmp_path)
    env.update(
        LASTSEEN_WEBHOOK_SECRET_FILE=str(secret),
        LASTSEEN_INTAKE_TOKEN_FILE=str(intake),
        LASTSEEN_ADMIN_TOKEN_FILE=str(admin),
        LASTSEEN_UPSTREAM_HEADER_FILE=str(api_key),
        LASTSEEN_UPSTREAM_CA_FILE=str(ca),
        LASTSEEN_WORKER_PROCESSES="2",
    )
    upstream = {"tls": server, "require_header": ("authorization", f"Bearer {API_KEY}")}
    return Deployment("production", env, 2, signs=True, upstream=upstream)


def certificates(directory: Path) -> tuple[Path, ssl.SSLContext]:
    """A CA of the test's own (its PEM file) and a server context whose certificate for
    127.0.0.1 it signs."""
    if not certs.available():
        pytest.skip("no openssl command to make a test CA with")
    made = certs.make(directory)
    return made.ca, made.server_context()


@pytest.fixture(params=["default", "production"])
def deployment(request: pytest.FixtureRequest, tmp_path: Path, db_url: str) -> Deployment:
    return configured(request.param, tmp_path, db_url)


@pytest.fixture
async def production(
    start_upstream: StartUpstream, spawn: Spawn, tmp_path: Path, db_url: str
) -> tuple[Deployment, ServeProcess]:
    """``lastseen serve`` in the production configuration, with its upstream."""
    deployment = configured("production", tmp_path, db_url)
    _, upstream_url = await start_upstream(**deployment.upstream)
    serve = await spawn(env={**deployment.env, "LASTSEEN_OBJECTS_URL": upstream_url})
    return deployment, serve


async def _post(
    http: aiohttp.ClientSession, url: str, deployment: Deployment, ids: list[int]
) -> int:
    body = msgspec.json.encode({"object_ids": ids})
    async with http.post(
        url + "/callback", data=body, headers=deployment.producer_headers(body)
    ) as response:
        return response.status


async def _metrics(http: aiohttp.ClientSession, url: str, headers: Mapping[str, str]) -> str:
    async with http.get(url + "/metrics", headers=headers) as response:
        assert response.status == 200
        return await response.text()


def _total(text: str, name: str) -> float:
    """The sum of every sample of ``name`` (over its labels)."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + " ") or line.startswith(name + "{")
    )


@pytest.mark.slow
async def test_every_acknowledged_id_reaches_objects(
    deployment: Deployment, sql: asyncpg.Connection, start_upstream: StartUpstream, spawn: Spawn
) -> None:
    """60 callbacks of 20 ids, 20 at a time: every one acknowledged, every online id among
    them in ``objects``; /metrics (with the admin token where there is one) shows the worker
    processes' lookups and every worker process up, and /status the pipeline's figures."""
    upstream, upstream_url = await start_upstream(**deployment.upstream)
    serve = await spawn(env={**deployment.env, "LASTSEEN_OBJECTS_URL": upstream_url})
    callbacks = [list(range(i * 10, i * 10 + 20)) for i in range(60)]
    async with aiohttp.ClientSession() as http:
        statuses: list[int] = []
        for start in range(0, len(callbacks), 20):
            statuses += await asyncio.gather(
                *(_post(http, serve.url, deployment, ids) for ids in callbacks[start : start + 20])
            )
        assert statuses == [202] * len(callbacks)
        online = {i for ids in callbacks for i in ids if i % 2 == 0}

        async def all_stored() -> bool:
            rows = await sql.fetch("SELECT id FROM objects")
            return {r["id"] for r in rows} == online

        await eventually(all_stored, timeout=30)
        text = await _metrics(http, serve.url, deployment.admin_headers)
        assert _total(text, "lastseen_lookups_total") >= len(online)
        assert _total(text, "lastseen_worker_processes_up") == deployment.worker_processes
        assert _total(text, "lastseen_worker_process_restarts_total") == 0
        async with http.get(serve.url + "/status", headers=deployment.admin_headers) as response:
            status = await response.json()
        assert status["totals"]["lookups"] >= len(online)
        assert status["totals"]["received"] == len(callbacks)
        assert status["ready"]["upstream"] == "ok"
    assert upstream.stats["requests"] >= len({i for ids in callbacks for i in ids})


@pytest.mark.slow
async def test_an_unreachable_upstream_is_named_with_its_cause(
    deployment: Deployment, spawn: Spawn
) -> None:
    """No upstream listens at the configured URL (a newcomer's `make run`): the log, /ready
    and /status name the URL and the cause, connection refused, in both configurations (in
    the production one the lookups run in worker processes); the role shown is the one
    configured, and the start names the data directory."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"  # closed once the block ends
    serve = await spawn(env={**deployment.env, "LASTSEEN_OBJECTS_URL": url})
    cause = "connection: connection refused"
    failing = f"failing ({cause}) at {url}: lookups held and probed"
    async with aiohttp.ClientSession() as http:
        assert await _post(http, serve.url, deployment, list(range(20))) == 202

        async def says_so() -> bool:
            async with http.get(serve.url + "/ready") as response:
                return bool((await response.json()).get("upstream") == failing)

        await eventually(says_so, timeout=20)
        async with http.get(serve.url + "/status", headers=deployment.admin_headers) as response:
            status = await response.json()
    assert (status["upstream_failing"], status["upstream_failure"]) == (True, cause)
    assert status["upstream_url"] == url
    assert status["role"] == "all"  # as configured, though lookups run in worker processes
    (listening, *_) = serve.events("listening")
    data_dir = Path(os.environ["XDG_DATA_HOME"]) / "lastseen"  # the default, under the run's
    assert (listening["role"], listening["data_dir"]) == ("all", str(data_dir))
    (logged, *_) = serve.events("the upstream is failing; holding lookups and probing")
    assert (logged["upstream"], logged["cause"]) == (url, cause)


@pytest.mark.slow
async def test_a_dead_letter_is_retried(
    deployment: Deployment, sql: asyncpg.Connection, start_upstream: StartUpstream, spawn: Spawn
) -> None:
    """An id the upstream first refuses (400) becomes a dead letter; a retry through the admin
    route (with the admin token where there is one) brings it into ``objects``."""
    upstream, upstream_url = await start_upstream(
        first_faults=("invalid_400",), **deployment.upstream
    )
    serve = await spawn(env={**deployment.env, "LASTSEEN_OBJECTS_URL": upstream_url})
    async with aiohttp.ClientSession() as http:
        assert await _post(http, serve.url, deployment, [42]) == 202
        await eventually(
            lambda: sql.fetchval("SELECT count(*) = 1 FROM dead_letters WHERE object_id = 42"),
            timeout=20,
        )
        callback_id = await sql.fetchval("SELECT callback_id FROM dead_letters")
        async with http.post(
            serve.url + "/dead-letters/retry",
            json={"callback_id": callback_id},
            headers=deployment.admin_headers,
        ) as response:
            assert response.status == 200, await response.text()
            assert len((await response.json())["callbacks_created"]) == 1
        await eventually(
            lambda: sql.fetchval("SELECT count(*) = 1 FROM objects WHERE id = 42"), timeout=20
        )
    assert upstream.requests_by_id[42] == 2


@pytest.mark.slow
async def test_production_refuses_what_it_must(
    sql: asyncpg.Connection, production: tuple[Deployment, ServeProcess]
) -> None:
    """In the production configuration: an unsigned POST gets 401, /metrics without the admin
    token 401, and nothing of either is stored."""
    _, serve = production
    async with aiohttp.ClientSession() as http:
        async with http.post(serve.url + "/callback", json={"object_ids": [1]}) as response:
            assert response.status == 401
        async with http.get(serve.url + "/metrics") as response:
            assert response.status == 401
    assert await sql.fetchval("SELECT count(*) FROM callbacks") == 0


async def test_a_worker_process_that_cannot_start_makes_ready_fail(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker process whose port is taken dies as it starts, again and again: within 10 s
    /ready answers 503 naming the worker process and the child's last line, and the restarts
    are counted; once the port is free, a child starts and /ready answers 200 again."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setattr(worker_processes, "_free_port", lambda: port)
        settings = fast_settings(database_url=db_url, role="ingest", worker_processes=1)
        db = await Database.open(db_url, size=2, timeout=5)
        metrics = Metrics()
        children = WorkerProcesses(named(settings), db, "test-instance", metrics)
        async with upstream_client(settings) as client:
            service = Service(settings, db, client, metrics, worker_processes=children)
            await service.start()
            try:
                url = f"http://127.0.0.1:{service.port}/ready"
                started = time.monotonic()
                async with aiohttp.ClientSession() as http:

                    async def unready() -> bool:
                        async with http.get(url) as response:
                            reason = (await response.json()).get("reason", "")
                            return response.status == 503 and "worker process" in reason

                    await eventually(unready, timeout=10)
                    async with http.get(url) as response:
                        answer = await response.json()
                assert time.monotonic() - started < 10
                assert answer["ready"] is False
                assert answer["reason"].startswith("worker process 0 cannot start")
                assert "address already in use" in answer["reason"].lower()
                restarts = metrics.registry.get_sample_value(
                    "lastseen_worker_process_restarts_total"
                )
                assert restarts is not None
                assert restarts >= 3
                # The port is free again: the next child starts, and /ready is 200 again.
                taken.close()
                async with aiohttp.ClientSession() as http:

                    async def ready() -> bool:
                        async with http.get(url) as response:
                            return response.status == 200

                    await eventually(ready, timeout=30)
            finally:
                await service.stop()
                await db.close()


@pytest.mark.slow
async def test_a_burst_of_signed_posts_is_stored_in_postgresql(
    sql: asyncpg.Connection, production: tuple[Deployment, ServeProcess]
) -> None:
    """2,000 signed POSTs at once against a healthy database, in the production configuration:
    every one acknowledged with its callback id (none spooled), all stored in PostgreSQL."""
    deployment, serve = production
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def post(n: int) -> tuple[int, Any]:
            body = msgspec.json.encode({"object_ids": [n, n + 1]})
            async with http.post(
                serve.url + "/callback", data=body, headers=deployment.producer_headers(body)
            ) as response:
                return response.status, await response.json()

        answers = await asyncio.gather(*(post(n) for n in range(2000)))
        assert [status for status, _ in answers] == [202] * 2000
        assert all(isinstance(answer["callback_id"], int) for _, answer in answers)
        text = await _metrics(http, serve.url, deployment.admin_headers)
    assert _total(text, "lastseen_callbacks_spooled_total") == 0
    assert await sql.fetchval("SELECT count(*) FROM callbacks") == 2000
    assert await sql.fetchval("SELECT count(*) FROM idempotency_keys") == 2000


@pytest.mark.slow
async def test_a_fuzzer_finds_nothing(
    deployment: Deployment, start_upstream: StartUpstream, spawn: Spawn, tmp_path: Path
) -> None:
    """schemathesis, run as an operator's security review would: every check and every phase
    (stateful included), the tokens set where the configuration has them, a seed of its own
    each run. No 5xx, no answer off the document, nothing accepted that it should refuse.
    ``LASTSEEN_FUZZ_SEED`` replays a run; the seed is in the failure's message."""
    _, upstream_url = await start_upstream(**deployment.upstream)
    serve = await spawn(env={**deployment.env, "LASTSEEN_OBJECTS_URL": upstream_url})
    seed = int(os.environ.get("LASTSEEN_FUZZ_SEED") or random.randrange(2**32))
    auth = ""
    if deployment.name == "production":
        auth = (
            f'[auth.openapi.intakeToken]\nbearer = "{INTAKE}"\n'
            f'[auth.openapi.adminToken]\nbearer = "{ADMIN}"\n'
        )
    # An Idempotency-Key sent again with another body is 422, as the IETF's Idempotency-Key
    # draft says; schemathesis reuses the keys it generates, and takes only 409 for that.
    reuse = (
        '[[operations]]\ninclude-path = "/callback"\n'
        "[operations.checks.positive_data_acceptance]\n"
        'expected-statuses = ["2xx", "401", "403", "409", "422", "429"]\n'
    )
    (tmp_path / "schemathesis.toml").write_text(auth + reuse)
    st = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert st is not None
    started = time.monotonic()
    # Not subprocess.run: the service's log pipe is read by this event loop.
    fuzzer = await asyncio.create_subprocess_exec(
        st, "run", serve.url + "/openapi.json",
        "--checks", "all",
        "--phases", "examples,coverage,fuzzing,stateful",
        "--max-examples", "100",
        "--seed", str(seed),
        "--no-color",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=tmp_path,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(fuzzer.communicate(), 400)
    report = out.decode()
    replay = f"replay with LASTSEEN_FUZZ_SEED={seed}\n"
    assert fuzzer.returncode == 0, replay + report[-12000:]
    assert "Tested: 11" in report or "Tested: 12" in report, replay + report[-3000:]
    print(f"schemathesis seed {seed}: {time.monotonic() - started:.0f} s")
