"""`lastseen import`: callbacks from files through the durable inbox, bad records skipped and
reported, idempotent by source position."""

from __future__ import annotations

import asyncio
import gzip
import json
import signal
import time
from pathlib import Path

import asyncpg
import pytest
from helpers.cli import run_cli
from helpers.services import StartService, StartUpstream
from helpers.waiting import all_done, eventually

from lastseen.devtools.launch import LASTSEEN, clean_environment


async def _stored(sql: asyncpg.Connection) -> list[list[int]]:
    rows = await sql.fetch("SELECT object_ids FROM callbacks ORDER BY id")
    return [list(r[0]) for r in rows]


async def test_good_records_are_stored_and_bad_ones_reported(
    db_url: str, sql: asyncpg.Connection, tmp_path: Path
) -> None:
    """Every good row is stored, each bad one (an id that is not a number, one out of range,
    broken quoting, a cut last line) is skipped and reported with its line and reason, and
    the exit status says something was rejected."""
    source = tmp_path / "calls.csv"
    source.write_text(
        "object_ids,received_at\n"
        '"[1,2,3]",\n'
        "x y,\n"
        '"[1, 99999999999999999999]",\n'
        "4 5 6,\n"
        '"1 2\n'
        "7;8,\n"
        '"[9, 1'
    )
    rejects = tmp_path / "rejects.tsv"
    env = {"LASTSEEN_DATABASE_URL": db_url}
    done = await run_cli("import", source, "--rejects", rejects, env=env)
    assert done.code == 1, done.stderr
    assert "7 records read, 3 stored, 0 already present, 4 skipped" in done.stdout
    assert await _stored(sql) == [[1, 2, 3], [4, 5, 6], [7, 8]]
    written = rejects.read_text()
    assert written.endswith("\n")
    rows = [line.split("\t", 3) for line in written.splitlines()]
    assert all(len(row) == 4 and row[2] for row in rows), rows  # where, reason, detail, text
    assert rows[1][3] == '"[1, 99999999999999999999]",'  # the record as it was read
    reported = [row[:2] for row in rows]
    assert reported == [
        [f"{source}:3", "invalid_id"],
        [f"{source}:4", "id_out_of_range"],
        [f"{source}:6", "bad_csv"],
        [f"{source}:8", "bad_csv"],
    ]
    allowed = await run_cli("import", source, "--allow-rejects", env=env)
    assert allowed.code == 0


async def test_a_csv_without_the_column_is_refused(db_url: str, tmp_path: Path) -> None:
    """A header without the column to read stops the import at once, naming the columns."""
    source = tmp_path / "ids.csv"
    source.write_text("ids\n1\n")
    done = await run_cli("import", source, env={"LASTSEEN_DATABASE_URL": db_url})
    assert done.code == 2
    assert "no 'object_ids' column" in done.stderr


async def test_receive_times_that_cannot_be_are_rejected_and_the_import_goes_on(
    db_url: str, sql: asyncpg.Connection, tmp_path: Path
) -> None:
    """A receive time in 2100, infinite, not a number, or not a time at all is a rejected
    record (bad_received_at), named on standard error without --rejects; the records around
    them are stored, in the same chunk."""
    now = time.time()
    lines = [
        {"object_ids": [1], "received_at": now - 5},
        {"object_ids": [2], "received_at": "2100-01-01T00:00:00Z"},
        {"object_ids": [3], "received_at": 1e400},
        {"object_ids": [4], "received_at": "nan"},
        {"object_ids": [5], "received_at": "inf"},
        {"object_ids": [6], "received_at": "yesterday"},
        {"object_ids": [7], "received_at": now + 10},  # a clock a little ahead
    ]
    source = tmp_path / "replay.jsonl"
    source.write_text("\n".join(json.dumps(line) for line in lines).replace("Infinity", "1e400"))
    done = await run_cli("import", source, env={"LASTSEEN_DATABASE_URL": db_url})
    assert done.code == 1, done.stderr
    assert await _stored(sql) == [[1], [7]]
    for line in range(2, 7):
        assert f"{source}:{line}: skipped, bad_received_at" in done.stderr
    csv_source = tmp_path / "times.csv"
    csv_source.write_text("object_ids,received_at\n500,yesterday\n501,\n")
    done = await run_cli("import", csv_source, env={"LASTSEEN_DATABASE_URL": db_url})
    assert f"{csv_source}:2: skipped, bad_received_at" in done.stderr
    assert await _stored(sql) == [[1], [7], [501]]


async def test_a_csv_of_one_id_column_reads_one_id_per_row(
    db_url: str, sql: asyncpg.Connection, tmp_path: Path
) -> None:
    """A CSV whose only column is ``id`` (or ``object_id``) is one id per row, as with
    --column; any other header names the file and suggests --column."""
    source = tmp_path / "ids.csv"
    source.write_text("id\n1\n2\n3\n")
    env = {"LASTSEEN_DATABASE_URL": db_url}
    done = await run_cli("import", source, env=env)
    assert done.code == 0, done.stderr
    assert sorted(i for ids in await _stored(sql) for i in ids) == [1, 2, 3]
    other = tmp_path / "other.csv"
    other.write_text("thing\n1\n")
    refused = await run_cli("import", other, env=env)
    assert refused.code == 2
    assert str(other) in refused.stderr
    assert "--column" in refused.stderr


async def test_a_second_import_stores_nothing(
    db_url: str, sql: asyncpg.Connection, tmp_path: Path
) -> None:
    """One id per row (--column) is grouped into callbacks; importing the same file again
    stores nothing and says how many records were already there."""
    source = tmp_path / "ids.csv"
    source.write_text("id,name\n" + "".join(f"{i},n{i}\n" for i in range(7)))
    env = {"LASTSEEN_DATABASE_URL": db_url}
    args = ("import", source, "--column", "id", "--ids-per-callback", "3")
    first = await run_cli(*args, env=env)
    assert first.code == 0, first.stderr
    assert await _stored(sql) == [[0, 1, 2], [3, 4, 5], [6]]
    again = await run_cli(*args, env=env)
    assert again.code == 0
    assert "7 records read (3 callbacks), 0 stored, 3 already present" in again.stdout
    assert len(await _stored(sql)) == 3


@pytest.mark.slow
async def test_a_gzip_replay_keeps_its_receive_times_and_reaches_objects(
    start_service: StartService,
    start_upstream: StartUpstream,
    db_url: str,
    sql: asyncpg.Connection,
    tmp_path: Path,
) -> None:
    """A gzip file of JSON lines with receive times is stored with those times; the running
    service's workers pick it up: the recent record's online ids appear in objects, the one
    older than the TTL is completed without a lookup."""
    upstream, url = await start_upstream()
    await start_service(objects_url=url, ttl=30)
    recent, old = time.time() - 1, time.time() - 3600
    source = tmp_path / "replay.jsonl.gz"
    with gzip.open(source, "wt") as out:
        out.write(json.dumps({"object_ids": [2, 3], "received_at": recent}) + "\n")
        out.write(json.dumps({"object_ids": [4], "received_at": old}) + "\n")
    done = await run_cli("import", source, env={"LASTSEEN_DATABASE_URL": db_url})
    assert done.code == 0, done.stderr
    rows = await sql.fetch("SELECT received_at FROM callbacks ORDER BY id")
    times = [r[0].timestamp() for r in rows]
    assert times == pytest.approx([recent, old], abs=1e-3)
    await all_done(sql, 2)
    assert [r[0] for r in await sql.fetch("SELECT id FROM objects")] == [2]
    assert upstream.requests_by_id[4] == 0


@pytest.mark.slow
async def test_an_import_killed_midway_resumes_to_one_clean_import(
    db_url: str, sql: asyncpg.Connection, tmp_path: Path
) -> None:
    """SIGKILL in the middle of an import, then the same import again: the inbox ends with
    exactly the callbacks of one clean import, none twice."""
    count = 20_000
    source = tmp_path / "big.csv"
    source.write_text("object_ids\n" + "".join(f"{i}\n" for i in range(count)))
    env = clean_environment(LASTSEEN_DATABASE_URL=db_url, LASTSEEN_LOG_FORMAT="json")
    proc = await asyncio.create_subprocess_exec(
        *LASTSEEN, "import", str(source), "--chunk", "5",
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip

    async def started() -> bool:
        return bool(await sql.fetchval("SELECT count(*) FROM callbacks") >= 100)

    await eventually(started, timeout=30)
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    assert await sql.fetchval("SELECT count(*) FROM callbacks") < count
    resumed = await run_cli("import", source, "--chunk", "500", env=env, timeout=120)
    assert resumed.code == 0, resumed.stderr
    assert " already present" in resumed.stdout
    rows = await sql.fetch("SELECT object_ids[1] FROM callbacks")
    assert sorted(r[0] for r in rows) == list(range(count))


async def test_a_corrupt_gzip_stream_stops_cleanly_keeping_what_was_stored(
    db_url: str, sql: asyncpg.Connection, tmp_path: Path
) -> None:
    """A gzip file cut in the middle of its stream ends the import with an error that names
    the file (exit 2, no traceback), after storing the records read before the cut."""
    whole = gzip.compress(
        "".join(json.dumps({"object_ids": [i]}) + "\n" for i in range(20_000)).encode()
    )
    source = tmp_path / "cut.jsonl.gz"
    source.write_bytes(whole[: len(whole) // 2])
    env = {"LASTSEEN_DATABASE_URL": db_url}
    done = await run_cli("import", source, "--chunk", "100", env=env)
    assert done.code == 2, done.stderr
    assert f"{source}: cannot read on" in done.stderr
    assert "Traceback" not in done.stderr
    stored = await sql.fetchval("SELECT count(*) FROM callbacks")
    assert 0 < stored < 20_000
