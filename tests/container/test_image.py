"""The image as an operator runs it: its default command, against a PostgreSQL and a simulated
upstream on the host's loopback (``--network=host``), with its data directory on a volume.

Run by ``make test-container``: ready, callbacks looked up by the container's worker process,
a callback spooled while the database is away that reaches ``objects`` from the volume after
the container is replaced, the HEALTHCHECK's command, and SIGTERM within the grace.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import pytest
from helpers.podman import FIGURES, Container, Containers, free_port
from helpers.tables import objects
from helpers.waiting import eventually

from lastseen.devtools.dbproxy import DatabaseProxy
from lastseen.devtools.launch import SimulateProcess

pytestmark = [pytest.mark.container, pytest.mark.timeout(600)]

GRACE = 20  # podman stop's: SIGKILL after it


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    """``lastseen simulate --mode upstream`` on a free loopback port (even ids online)."""
    simulate = SimulateProcess(
        "--mode", "upstream", "--upstream-listen", "127.0.0.1:0",
        "--latency-min", "0.01", "--latency-max", "0.05",
    )  # fmt: skip
    await simulate.start(wait_for_upstream=True)
    yield simulate.upstream_url
    await simulate.terminate()


async def _ready(http: aiohttp.ClientSession, url: str, container: Container) -> dict[str, object]:
    """Waits until /ready answers 200; its body."""
    body: dict[str, object] = {}

    async def ready() -> bool:
        nonlocal body
        if await container.state("Status") != "running":
            raise AssertionError(f"the container stopped:\n{await container.logs()}")
        try:
            async with http.get(url + "/ready") as response:
                body = await response.json(content_type=None)
                return response.status == 200
        except aiohttp.ClientError:
            return False

    try:
        await eventually(ready, timeout=60, every=0.05)
    except TimeoutError:
        raise AssertionError(f"never ready:\n{await container.logs()}") from None
    return body


async def test_the_image_serves_spools_to_its_volume_checks_its_health_and_stops_cleanly(
    image: str,
    containers: Containers,
    db_proxy: DatabaseProxy,
    sql: asyncpg.Connection,
    upstream: str,
) -> None:
    """The default command on the host network: /ready 200; callbacks acknowledged and their
    even ids in ``objects``, looked up by the container; with the database away a callback is
    acknowledged from the spool, the container stops on SIGTERM with exit 0 well within the
    grace, and a new container on the same volume (the same instance id) drains it into the
    inbox, the non-root user having written it there; the HEALTHCHECK's command, on the port of
    LASTSEEN_LISTEN, succeeds inside the container."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    volume = containers.volume()
    options = (
        "--network=host",
        "--volume", f"{volume}:/var/lib/lastseen",
        "--env", f"LASTSEEN_DATABASE_URL={db_proxy.url()}",
        "--env", f"LASTSEEN_LISTEN=127.0.0.1:{port}",
        "--env", f"LASTSEEN_OBJECTS_URL={upstream}",
        "--env", "LASTSEEN_INSTANCE_ID=container-test",
    )  # fmt: skip
    async with aiohttp.ClientSession() as http:
        first = await containers.run(image, options=options)
        await _ready(http, url, first)
        FIGURES["time to ready"] = (
            f"{time.monotonic() - first.started:.2f} s (podman run to /ready 200)"
        )
        assert await first.state("Status") == "running"

        async with http.post(url + "/callback", json={"object_ids": [2, 4, 6, 7]}) as response:
            assert response.status == 202, await response.text()
        await eventually(lambda: _has(sql, {2, 4, 6}), timeout=30)
        assert 7 not in await objects(sql)

        # The database away: acknowledged from the spool, which is on the volume.
        await db_proxy.stop()
        async with http.post(url + "/callback", json={"object_ids": [10, 12]}) as response:
            assert response.status == 202, await response.text()
            spooled = await response.json()
        assert spooled["callback_id"] is None
        assert str(spooled["spooled"]).startswith("spool:"), spooled

        async def degraded() -> bool:
            async with http.get(url + "/ready") as response:
                body = await response.json(content_type=None)
                return response.status == 200 and str(body.get("degraded")).startswith("spooling")

        await eventually(degraded)

        code, took = await first.stop(GRACE)
        assert code == 0, await first.logs()
        assert took < GRACE / 2, took
        FIGURES["SIGTERM to exit"] = f"{took:.2f} s, exit {code} (podman stop, spool not drained)"
        assert await sql.fetchval("SELECT count(*) FROM callbacks") == 1

        await db_proxy.start()
        second = await containers.run(image, options=options)
        await _ready(http, url, second)
        await eventually(lambda: _has(sql, {2, 4, 6, 10, 12}), timeout=30)
        sources = await sql.fetch("SELECT source FROM callbacks ORDER BY id")
        assert [r["source"] for r in sources][1:] == [spooled["spooled"]]

        health = await second.podman("healthcheck", "run", second.name, check=False)
        assert health.code == 0, health.stdout + health.stderr
        assert await second.state("Health.Status") == "healthy"
        config = json.loads(
            (
                await second.podman("inspect", "--format", "{{json .Config.User}}", second.name)
            ).stdout
        )
        assert config not in ("", "root", "0"), config

        code, took = await second.stop(GRACE)
        assert code == 0, await second.logs()
        assert took < GRACE / 2, took


async def _has(sql: asyncpg.Connection, ids: set[int]) -> bool:
    return ids <= set(await objects(sql))
