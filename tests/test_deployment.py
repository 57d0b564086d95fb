"""docs/guides/deployment.md holds: lastseen serves under a role with exactly the page's grants,
migrated by the owner with the page's command, its password in a pass file; the systemd unit
names only settings that exist, passes ``systemd-analyze verify`` where systemd is installed,
and waits longer than the process's own stop deadline."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest
from helpers.cli import run_cli
from helpers.services import Spawn, StartService, StartUpstream
from helpers.tables import own_database
from helpers.waiting import eventually

from lastseen.config.settings import OPTIONS, Settings
from lastseen.runtime.lifetime import stop_deadline
from lastseen.storage.database import Database

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "guides" / "deployment.md"
UNIT = ROOT / "deploy" / "systemd" / "lastseen.service"
SETTINGS = {option.env for option in OPTIONS}

_names = itertools.count()


def _section_sql(heading: str) -> list[str]:
    """The ```sql blocks of one ``## heading`` of the page, in order."""
    text = PAGE.read_text()
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sql\n(.*?)```", section, re.S)


async def _run(conn: asyncpg.Connection, sql: str) -> None:
    """Each statement of ``sql`` on its own, as psql sends them (CREATE DATABASE cannot share
    a query string)."""
    for statement in filter(None, (part.strip() for part in sql.split(";\n"))):
        await conn.execute(statement)


def _as_user(url: str, user: str, password: str, database: str) -> str:
    """``url`` (a superuser's) with another user, password and database."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{user}:{password}@{host}"
    return urlunsplit(parts._replace(netloc=netloc, path="/" + database))


@pytest.mark.slow
async def test_serve_runs_under_the_documented_role_and_grants(
    pg_url: str, spawn: Spawn, start_upstream: StartUpstream, tmp_path: Path
) -> None:
    """The page's roles, database and grants, renamed for this test: the owner migrates with the
    page's command; ``lastseen serve`` as the serving role (its password in a pass file) takes
    a callback, looks it up, and its reaper and prune delete as they should; the serving role
    cannot alter the owner's tables, and without ``CREATE`` on the schema it cannot even
    start, as the page says."""
    cluster, grants = _section_sql("The PostgreSQL roles")
    n = f"{os.getpid()}_{next(_names)}"
    owner, app, name = f"lastseen_owner_{n}", f"lastseen_app_{n}", f"lastseen_{n}"

    def renamed(sql: str) -> str:
        sql = re.sub(r"\blastseen_owner\b", owner, sql)
        sql = re.sub(r"\blastseen_app\b", app, sql)
        return re.sub(r"\bDATABASE lastseen\b", f"DATABASE {name}", sql)

    def password(role: str) -> str:
        found = re.search(rf"ROLE {role} LOGIN PASSWORD '([^']+)'", cluster)
        assert found, role
        return found[1]

    owner_url = _as_user(pg_url, owner, password("lastseen_owner"), name)
    app_url = _as_user(pg_url, app, password("lastseen_app"), name)
    admin = await asyncpg.connect(pg_url)
    try:
        await _run(admin, renamed(cluster))
        try:
            as_owner = await asyncpg.connect(owner_url)
            try:
                await _run(as_owner, renamed(grants))  # before the first migration
                migrated = await run_cli("migrate", env={"LASTSEEN_DATABASE_URL": owner_url})
                assert migrated.code == 0, migrated.stderr
                assert "migrations applied: 1, 2, 3" in migrated.stderr
                await _run(as_owner, renamed(grants))  # and again after it: idempotent
                tables = await as_owner.fetch(
                    "SELECT tablename, tableowner FROM pg_tables WHERE schemaname = 'public'"
                )
                assert {r["tableowner"] for r in tables} == {owner}
                assert "callbacks" in {r["tablename"] for r in tables}
            finally:
                await as_owner.close()
            await _serve_as(app_url, app, password("lastseen_app"), spawn, start_upstream, tmp_path)
            await _refused_what_the_page_says(app_url)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.execute(f'DROP ROLE IF EXISTS "{app}"')
            await admin.execute(f'DROP ROLE IF EXISTS "{owner}"')
    finally:
        await admin.close()


async def _serve_as(
    app_url: str,
    app: str,
    app_password: str,
    spawn: Spawn,
    start_upstream: StartUpstream,
    tmp_path: Path,
) -> None:
    # The password only in a pass file that the URL names (mode 0600, or it is ignored).
    parts = urlsplit(app_url)
    host = parts.netloc.rpartition("@")[2]
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"*:*:*:{app}:{app_password}\n")
    passfile.chmod(0o600)
    query = "&".join(filter(None, [parts.query, f"passfile={passfile}"]))
    url = urlunsplit(parts._replace(netloc=f"{app}@{host}", query=query))
    _, upstream_url = await start_upstream()
    serve = await spawn(
        "--ttl",
        "2",
        "--reap-interval",
        "0.05",
        "--prune-interval",
        "0.2",
        "--audit-retention",
        "0.5",
        "--idempotency-retention",
        "0.5",
        env={"LASTSEEN_DATABASE_URL": url, "LASTSEEN_OBJECTS_URL": upstream_url},
    )
    async with aiohttp.ClientSession() as http:
        # A keyed callback as well: the idempotency table and the sequence.
        for headers in ({}, {"Idempotency-Key": "deployment-test"}):
            async with http.post(
                serve.url + "/callback", json={"object_ids": [2, 4, 5]}, headers=headers
            ) as response:
                assert response.status == 202, await response.text()

        async def online() -> set[int]:
            async with http.get(serve.url + "/objects") as response:
                assert response.status == 200
                return {o["id"] for o in (await response.json())["objects"]}

        async def looked_up() -> bool:
            return await online() == {2, 4}  # even ids are online upstream

        async def reaped_and_pruned() -> bool:
            if await online():
                return False
            conn = await asyncpg.connect(app_url)
            try:
                row = await conn.fetchrow(
                    "SELECT (SELECT count(*) FROM callbacks) AS c,"
                    " (SELECT count(*) FROM idempotency_keys) AS k"
                )
            finally:
                await conn.close()
            return bool(row["c"] == 0 and row["k"] == 0)

        await eventually(looked_up, timeout=20)
        await eventually(reaped_and_pruned, timeout=20)
    refused = [
        line
        for line in serve.logs
        if "permission denied" in str(line) or "must be owner" in str(line)
    ]
    assert refused == []
    assert await serve.terminate() == 0


async def _refused_what_the_page_says(app_url: str) -> None:
    conn = await asyncpg.connect(app_url)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="must be owner"):
            await conn.execute("ALTER TABLE callbacks SET (fillfactor = 50)")
    finally:
        await conn.close()
    # No CREATE on the schema: no table of its own; and a start's migration, with nothing
    # left to apply, needs none.
    conn = await asyncpg.connect(app_url)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="schema public"):
            await conn.execute("CREATE TABLE of_its_own (i int)")
    finally:
        await conn.close()
    db = await Database.open(app_url, size=1, timeout=10)
    try:
        assert await db.migrate() == []
    finally:
        await db.close()


def _unit() -> dict[str, list[str]]:
    """The unit's directives: name -> values, in order."""
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def test_the_unit_names_settings_that_exist_and_outwaits_the_stop_deadline() -> None:
    """Every LASTSEEN_* the unit sets is a setting, each secret comes from a credential, and
    systemd waits longer than the stop deadline of those settings with the delay the
    manifests use, before it kills what is left."""
    unit = _unit()
    env = dict(
        value.strip('"').split("=", 1) for value in unit["Environment"] if "LASTSEEN_" in value
    )
    assert set(env) <= SETTINGS, set(env) - SETTINGS
    credentials = {value.split(":", 1)[0] for value in unit["LoadCredential"]}
    assert env["LASTSEEN_ADMIN_TOKEN_FILE"] == "%d/admin-token"
    assert env["LASTSEEN_WEBHOOK_SECRET_FILE"] == "%d/webhook-secret"
    assert "passfile=%d/pgpass" in env["LASTSEEN_DATABASE_URL"]
    assert "target_session_attrs=read-write" in env["LASTSEEN_DATABASE_URL"]
    assert credentials == {"admin-token", "webhook-secret", "pgpass"}
    assert unit["KillSignal"] == ["SIGTERM"]
    assert unit["KillMode"] == ["mixed"]
    settings = Settings.load({}, {"shutdown_delay": 5.0})
    assert float(unit["TimeoutStopSec"][0]) > stop_deadline(settings)
    assert unit["StateDirectory"] == ["lastseen"]
    assert env["LASTSEEN_DATA_DIR"] == "%S/lastseen"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd is not installed")
def test_systemd_analyze_verify_finds_nothing_in_the_unit(tmp_path: Path) -> None:
    """``systemd-analyze verify`` (which warns but exits 0) says nothing about the unit, with
    its ExecStart pointed at this environment's lastseen; and it does speak of a broken copy,
    so that its silence means something."""
    lastseen = Path(sys.executable).with_name("lastseen")
    text = UNIT.read_text().replace("/opt/lastseen/bin/lastseen", str(lastseen))

    def verify(unit_text: str) -> str:
        path = tmp_path / "lastseen.service"
        path.write_text(unit_text)
        done = subprocess.run(
            ["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60
        )
        return (done.stdout + done.stderr).strip()

    assert verify(text) == ""
    assert "kill mode" in verify(text.replace("KillMode=mixed", "KillMode=bogus"))


async def test_a_role_that_may_not_migrate_is_told_so(
    pg_url: str, start_service: StartService
) -> None:
    """A serving role on a database nobody migrated, without CREATE on its schema: /ready is
    503 with PostgreSQL's refusal as the reason (migrate with the owner), not "unreachable"."""
    name = f"nomigrate_{os.getpid()}"
    async with own_database(pg_url, name) as url:
        admin = await asyncpg.connect(url)
        try:
            await admin.execute(f'CREATE ROLE "{name}" LOGIN')
            await admin.execute(f'GRANT USAGE ON SCHEMA public TO "{name}"')
            service = await start_service(
                database_url=_as_user(pg_url, name, "", name), role="ingest", migrated=False
            )

            async def refused() -> bool:
                status, answer = await service.get("/ready")
                return status == 503 and "permission denied" in str(answer.get("reason"))

            await eventually(refused, timeout=10)
            _, answer = await service.get("/ready")
            assert str(answer["reason"]).startswith("cannot migrate: ")
            assert "unreachable" not in str(answer["reason"])
            await service.service.stop()
        finally:
            await admin.close()
    cleanup = await asyncpg.connect(pg_url)
    try:
        await cleanup.execute(f'DROP ROLE IF EXISTS "{name}"')
    finally:
        await cleanup.close()
