"""`lastseen reset-data`: back to a clean slate, never taking what a running server or an
undelivered callback still needs."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.cli import run_cli
from helpers.services import Spawn

from lastseen.intake.spool import Spool
from lastseen.storage.arrays import id_array

pytestmark = pytest.mark.slow


async def test_reset_lists_then_deletes_and_refuses_a_running_server(
    tmp_path: Path, spawn: Spawn
) -> None:
    """While `lastseen serve` runs on its embedded PostgreSQL, the reset refuses (exit 2,
    naming the process); without --yes it only lists; with --yes, once the server is gone,
    the data directory is empty."""
    data = tmp_path / "data"
    env = {"LASTSEEN_DATA_DIR": str(data)}
    serve = await spawn(env=env)  # no database URL: the embedded PostgreSQL, in ``data``
    refused = await run_cli("reset-data", "--yes", env=env)
    assert refused.code == 2
    assert f"{data} is in use by lastseen (pid" in refused.stderr
    assert (data / "pgdata" / "PG_VERSION").exists()
    assert await serve.terminate() == 0

    listed = await run_cli("reset-data", env=env)
    assert listed.code == 0, listed.stderr
    assert str(data / "pgdata") in listed.stdout
    assert "run again with --yes to delete it" in listed.stderr
    assert (data / "pgdata" / "PG_VERSION").exists()

    done = await run_cli("reset-data", "--yes", env=env)
    assert done.code == 0, done.stderr
    assert data.is_dir()
    assert list(data.iterdir()) == []


async def test_reset_keeps_a_spool_that_holds_callbacks(tmp_path: Path) -> None:
    """A spool with callbacks not delivered yet is not deleted: the reset names it and how to
    deliver them (drain-spool); once it is empty, the reset goes ahead."""
    data = tmp_path / "data"
    spool = Spool(data / "spool" / "host_9090.sqlite3", max_bytes=1 << 20)
    await spool.open()
    await spool.append([(1_700_000_000.0, id_array([1, 2]))])
    await spool.close()
    env = {"LASTSEEN_DATA_DIR": str(data)}
    refused = await run_cli("reset-data", "--yes", env=env)
    assert refused.code == 2
    assert "holds 1 callbacks not delivered yet" in refused.stderr
    assert "lastseen drain-spool" in refused.stderr
    assert (data / "spool" / "host_9090.sqlite3").exists()

    again = Spool(data / "spool" / "host_9090.sqlite3", max_bytes=1 << 20)
    await again.open()
    in_use = await run_cli("reset-data", "--yes", env=env)
    assert "in use by a running instance" in in_use.stderr
    await again.forget(await again.peek(10))
    await again.close()
    done = await run_cli("reset-data", "--yes", env=env)
    assert done.code == 0, done.stderr
    assert list(data.iterdir()) == []
