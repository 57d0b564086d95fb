"""Podman as this machine runs it, for the container tests (``make test-container``).

No Docker engine runs here and no registry is reachable, but Debian's podman, runc and
mmdebstrap work: a bookworm base is made from Debian's packages and imported, the images are
built on it, and containers run as root with podman's own configuration (``CONTAINERS_CONF``,
``CONTAINERS_STORAGE_CONF``) and its storage under ``LASTSEEN_PODMAN_ROOT``
(``/var/tmp/lastseen-podman``), so that the images outlive a test run and nothing clashes with
another podman on the machine.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from helpers.cli import Finished, run_to_end

ROOT = Path(os.environ.get("LASTSEEN_PODMAN_ROOT", "/var/tmp/lastseen-podman"))

# crun refuses this machine's hybrid cgroups: runc. No systemd: cgroupfs, and events in a file.
# Podman's default rlimits are above what the sandbox lets a process have.
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nproc=4096:4096", "nofile=20000:20000"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""

# What the tests measured (image size, time to ready, ...), printed at the end of the run.
FIGURES: dict[str, str] = {}

HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
APT_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")

# Debian bookworm with Python and its venv module, as the official image has them, from the
# machine's own Debian mirror. The host's CA bundle goes in: a build's downloads from the
# package index need it here.
MMDEBSTRAP = [
    "mmdebstrap",
    "--variant=minbase",
    "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
    "--include=python3,python3-venv,ca-certificates",
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-include=/usr/share/doc/*/copyright",
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
    f"--customize-hook=copy-in {HOST_CA_BUNDLE} /etc/ssl/certs",
    "bookworm",
]


class PodmanError(RuntimeError):
    pass


def _tag(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


class Podman:
    """``podman`` with this machine's configuration; ``run`` blocks, ``__call__`` awaits."""

    def __init__(self, root: Path = ROOT) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        conf = root / "containers.conf"
        conf.write_text(CONTAINERS_CONF)
        storage = root / "storage.conf"
        storage.write_text(
            f'[storage]\ndriver = "overlay"\ngraphroot = "{root / "storage"}"\n'
            f'runroot = "{root / "run"}"\n'
        )
        self.env = {
            **os.environ,
            "CONTAINERS_CONF": str(conf),
            "CONTAINERS_STORAGE_CONF": str(storage),
        }

    def run(self, *args: str, timeout: float = 600.0, check: bool = True) -> Finished:
        done = subprocess.run(
            ["podman", *args],
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        result = Finished(done.returncode, done.stdout, done.stderr)
        if check and result.code != 0:
            raise PodmanError(f"podman {' '.join(args)}: exit {result.code}\n{result.stderr}")
        return result

    async def __call__(self, *args: str, timeout: float = 120.0, check: bool = True) -> Finished:
        result = await run_to_end(["podman", *args], self.env, timeout)
        if check and result.code != 0:
            raise PodmanError(f"podman {' '.join(args)}: exit {result.code}\n{result.stderr}")
        return result

    def exists(self, image: str) -> bool:
        return self.run("image", "exists", image, check=False).code == 0

    def base_image(self) -> str:
        """The bookworm base (made once, then kept under ROOT); its name."""
        mirror = str(APT_SOURCES) if APT_SOURCES.exists() else "http://deb.debian.org/debian"
        command = [*MMDEBSTRAP, mirror]
        name = f"localhost/lastseen-base:{_tag(*command, HOST_CA_BUNDLE.read_text())}"
        if self.exists(name):
            return name
        with tempfile.TemporaryDirectory(dir=self.root) as scratch:
            tarball = Path(scratch) / "base.tar"
            made = subprocess.run(
                [*command[:-1], str(tarball), command[-1]],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=600,
            )
            if made.returncode != 0:
                raise PodmanError(f"mmdebstrap failed:\n{made.stderr[-4000:]}")
            self.run("import", str(tarball), name)
        return name

    def build_once(self, context: Path, name: str, *, base: str) -> str:
        """``context`` (its Containerfile) built on ``base``, once: the tag is a digest of the
        base and the context's files, so that an image is rebuilt only when they change."""
        files = sorted(p for p in context.rglob("*") if p.is_file())
        digest = _tag(base, *(f"{p.relative_to(context)}:{p.read_text()}" for p in files))
        tag = f"{name}:{digest}"
        if not self.exists(tag):
            self.run("build", "--pull=never", "--format=docker", "--build-arg", f"BASE={base}",
                     "--tag", tag, str(context))  # fmt: skip
        return tag


class Container:
    """A container started with ``podman run --detach``."""

    def __init__(self, podman: Podman, name: str, started: float) -> None:
        self.podman = podman
        self.name = name
        self.started = started  # time.monotonic() just before podman run

    async def logs(self) -> str:
        done = await self.podman("logs", self.name, check=False)
        return done.stdout + done.stderr

    async def state(self, field: str) -> str:
        done = await self.podman("inspect", "--format", f"{{{{.State.{field}}}}}", self.name)
        return done.stdout.strip()

    async def stop(self, grace: int) -> tuple[int, float]:
        """SIGTERM (``podman stop``; SIGKILL after ``grace`` s); the exit code and how long
        the stop took."""
        begun = time.monotonic()
        await self.podman("stop", "--time", str(grace), self.name, timeout=grace + 30)
        took = time.monotonic() - begun
        return int(await self.state("ExitCode")), took


class Containers:
    """Starts containers and names volumes for one test; ``remove`` takes all of them away."""

    def __init__(self, podman: Podman) -> None:
        self.podman = podman
        self._containers: list[str] = []
        self._volumes: list[str] = []

    def volume(self) -> str:
        name = unique("lastseen-test-volume")
        self._volumes.append(name)
        return name

    async def run(self, image: str, *args: str, options: tuple[str, ...] = ()) -> Container:
        name = unique("lastseen-test")
        self._containers.append(name)
        started = time.monotonic()
        await self.podman("run", "--detach", "--name", name, *options, image, *args)
        return Container(self.podman, name, started)

    async def remove(self) -> None:
        for name in self._containers:
            await self.podman("rm", "--force", "--time", "0", name, check=False)
        for name in self._volumes:
            await self.podman("volume", "rm", "--force", name, check=False)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def free_port() -> int:
    """A free loopback port (a container on the host network listens on it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def missing() -> str | None:
    """Why the container tests cannot run here, or None."""
    for tool in ("podman", "runc", "mmdebstrap"):
        if shutil.which(tool) is None:
            return f"no {tool}: `make test-container` installs Debian's"
    return None
