"""compose.yaml's demo profile run with podman-compose, as ``docker compose --profile demo up``
runs it: PostgreSQL (a stand-in for the official image, tests/container/postgres), the ingest
and worker roles, the simulated upstream and producer, on the project's own network, the
ingest port published on a free loopback port. Run by ``make test-container``."""

from __future__ import annotations

import asyncio
import shutil
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers.podman import FIGURES, Podman, free_port, unique
from helpers.waiting import eventually

pytestmark = [pytest.mark.container, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
SERVICES = {"postgres", "ingest", "worker", "upstream", "producer"}


def _podman_compose() -> str:
    beside = Path(sys.executable).parent / "podman-compose"
    found = str(beside) if beside.exists() else shutil.which("podman-compose")
    if found is None:
        pytest.fail("no podman-compose: `make test-container` installs it into .venv")
    return found


class Stack:
    """One compose project of compose.yaml, with the images and the published port given."""

    def __init__(self, podman: Podman, image: str, postgres_image: str) -> None:
        self.podman = podman
        self.project = unique("lastseen-test")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # None of the shell's LASTSEEN_* reaches the file's variables but these.
        self.env = {k: v for k, v in podman.env.items() if not k.startswith("LASTSEEN_")} | {
            "LASTSEEN_IMAGE": image,
            "LASTSEEN_POSTGRES_IMAGE": postgres_image,
            "LASTSEEN_PUBLISH": f"127.0.0.1:{self.port}",
        }
        self.command = [
            _podman_compose(), "--project-name", self.project,
            "--file", str(ROOT / "compose.yaml"), "--profile", "demo",
        ]  # fmt: skip

    async def compose(self, *args: str, timeout: float = 120.0) -> str:
        proc = await asyncio.create_subprocess_exec(
            *self.command,
            *args,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        assert proc.returncode == 0, f"podman-compose {' '.join(args)}:\n{out.decode()[-4000:]}"
        return out.decode()

    async def ids(self) -> list[str]:
        listed = await self.podman(
            "ps", "--all", "--quiet", "--filter", f"label=io.podman.compose.project={self.project}"
        )
        return listed.stdout.split()

    async def containers(self) -> dict[str, str]:
        """Each of the project's containers: its service and its state."""
        ids = await self.ids()
        inspected = await self.podman(
            "inspect", "--format",
            '{{index .Config.Labels "com.docker.compose.service"}} {{.State.Status}}', *ids,
        )  # fmt: skip
        return dict(line.split() for line in inspected.stdout.splitlines())

    async def logs(self) -> str:
        return await self.compose("logs", "--tail", "20")

    async def down(self) -> None:
        """Stops and removes it all: containers, network, named and anonymous volumes."""
        volumes: list[str] = []
        for container in await self.ids():
            mounts = await self.podman(
                "inspect", "--format", "{{range .Mounts}}{{.Name}} {{end}}", container
            )
            volumes += mounts.stdout.split()
        await self.compose("down", "--volumes", "--timeout", "30")
        for volume in volumes:
            await self.podman("volume", "rm", "--force", volume, check=False)


@pytest.fixture
async def stack(podman: Podman, image: str, postgres_image: str) -> AsyncIterator[Stack]:
    made = Stack(podman, image, postgres_image)
    yield made
    await made.down()


async def _get(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    try:
        async with http.get(url) as response:
            return response.status, await response.json(content_type=None)
    except (aiohttp.ClientError, ValueError):
        return 0, None


async def test_the_demo_profile_runs_the_whole_system(stack: Stack) -> None:
    """``--profile demo up``: all five services run; the published port answers /ready, the
    producer's callbacks reach the ingest instance by its service name, the worker looks their
    ids up at the simulated upstream by its name, and the objects it found online (the even
    ids) appear; the status page and its data answer."""
    began = time.monotonic()
    await stack.compose("up", "--detach", "--no-build")
    async with aiohttp.ClientSession() as http:
        objects: list[dict[str, Any]] = []

        async def some_objects() -> bool:
            nonlocal objects
            status, body = await _get(http, stack.url + "/objects")
            objects = body["objects"] if status == 200 else []
            return bool(objects)

        try:
            await eventually(some_objects, timeout=90, every=0.2)
        except TimeoutError:
            raise AssertionError(f"no object appeared:\n{await stack.logs()}") from None
        FIGURES["compose: first object"] = f"{time.monotonic() - began:.1f} s (up to GET /objects)"
        assert all(o["id"] % 2 == 0 for o in objects), objects
        assert await stack.containers() == dict.fromkeys(SERVICES, "running")

        status, ready = await _get(http, stack.url + "/ready")
        assert (status, ready) == (200, {"ready": True})
        status, page = await _get(http, stack.url + "/status")
        assert status == 200
        assert page["role"] == "ingest"
        assert page["totals"]["received"] > 0
        assert page["objects_online"] > 0
        async with http.get(stack.url + "/ui/") as response:
            assert response.status == 200
            assert response.content_type == "text/html"
