"""The API operators can trust: signed or token-bearing intake, an admin token, idempotency
keys, callback status, dead-letter operations, and an OpenAPI document that matches the routes
and that a fuzzer finds honest."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
import standardwebhooks
from aiohttp import web
from helpers.cli import run_cli
from helpers.services import StartService, fast_settings
from hypothesis import given
from hypothesis import strategies as st
from openapi_spec_validator import validate

from lastseen.api.app import build_app
from lastseen.api.openapi import document
from lastseen.api.readiness import Readiness
from lastseen.api.routes import Routes
from lastseen.api.ui import Page
from lastseen.config.settings import Settings
from lastseen.core.errors import ConfigError, Unauthorized
from lastseen.devtools.launch import clean_environment
from lastseen.intake.auth import WebhookVerifier

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


def _signed(body: str, *, at: datetime | None = None, msg_id: str = "msg_1") -> dict[str, str]:
    at = at or datetime.now(UTC)
    signature = standardwebhooks.Webhook(SECRET).sign(msg_id, at, body)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": signature,
    }


@given(
    body=st.text(max_size=300),
    msg_id=st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=40),
    offset=st.floats(-299, 299),
)
def test_the_webhook_check_takes_what_the_standardwebhooks_package_signs(
    body: str, msg_id: str, offset: float
) -> None:
    """Our check (the package's ``verify`` costs twice as much) against the package's own
    signatures: each passes, alone or beside another key's (a rotation), with a timestamp
    anywhere within the tolerance; with another body or id it does not."""
    now = 1_800_000_000.0
    verifier = WebhookVerifier(SECRET, clock=lambda: now)
    at = datetime.fromtimestamp(now + offset, UTC)
    signature = standardwebhooks.Webhook(SECRET).sign(msg_id, at, body)
    other = standardwebhooks.Webhook("whsec_" + base64.b64encode(b"x" * 32).decode())
    headers = {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": f"{other.sign(msg_id, at, body)} {signature}",
    }
    verifier.verify(body.encode(), headers)
    with pytest.raises(Unauthorized):
        verifier.verify(body.encode() + b" ", headers)
    with pytest.raises(Unauthorized):
        verifier.verify(body.encode(), {**headers, "webhook-id": msg_id + "x"})


def test_the_webhook_check_says_why_it_refuses() -> None:
    """A timestamp past the tolerance either way, one that is not a number, a v2 signature
    only, a header that is not UTF-8, a missing header: each refused with its reason; a
    secret that is not base64 is a configuration error."""
    now = 1_800_000_000.0
    verifier = WebhookVerifier(SECRET, clock=lambda: now)
    body = '{"object_ids": [1]}'

    def refusal(**changes: str) -> str:
        headers = _signed(body, at=datetime.fromtimestamp(now, UTC)) | changes
        with pytest.raises(Unauthorized) as refused:
            verifier.verify(body.encode(), {k: v for k, v in headers.items() if v})
        return str(refused.value)

    assert "too old" in refusal(**{"webhook-timestamp": str(int(now) - 301)})
    assert "too new" in refusal(**{"webhook-timestamp": str(int(now) + 301)})
    for stamp in ("soon", "nan", "inf"):
        assert "not a number" in refusal(**{"webhook-timestamp": stamp})
    signed = _signed(body, at=datetime.fromtimestamp(now, UTC))["webhook-signature"]
    assert "no signature" in refusal(**{"webhook-signature": "v2," + signed[3:]})
    assert "no signature" in refusal(**{"webhook-signature": "v1,\udcff"})
    assert "no signature" in refusal(**{"webhook-id": "msg_\udcff"})
    assert "missing" in refusal(**{"webhook-id": ""})
    with pytest.raises(ConfigError):
        WebhookVerifier("whsec_")


async def test_a_signed_callback_is_taken_and_a_bad_one_refused(
    start_service: StartService, sql: asyncpg.Connection
) -> None:
    """With a webhook secret, a request signed with standardwebhooks gets 202; a tampered body,
    a timestamp 6 minutes old and missing headers each get 401 and store nothing."""
    service = await start_service(role="ingest", webhook_secret=SECRET)
    body = '{"object_ids": [1, 2]}'
    assert (await service.post(body, headers=_signed(body)))[0] == 202
    status, error = await service.post('{"object_ids": [1, 3]}', headers=_signed(body, msg_id="m2"))
    assert (status, error["error"]) == (401, "unauthorized")
    old = datetime.now(UTC) - timedelta(minutes=6)
    assert (await service.post(body, headers=_signed(body, at=old, msg_id="m3")))[0] == 401
    status, error = await service.post(body)
    assert status == 401
    assert "missing" in error["detail"]
    assert await sql.fetchval("SELECT count(*) FROM callbacks") == 1
    assert service.sample("lastseen_callbacks_rejected_total", reason="unauthorized") == 3


async def test_an_intake_token_lets_callbacks_in(
    start_service: StartService, sql: asyncpg.Connection
) -> None:
    """With an intake token, the bearer token gets 202 and a wrong or missing one 401; with a
    webhook secret as well, either is enough."""
    service = await start_service(role="ingest", intake_token="t0ken", webhook_secret=SECRET)
    body = '{"object_ids": [5]}'
    assert (await service.post(body, headers={"Authorization": "Bearer t0ken"}))[0] == 202
    assert (await service.post(body, headers={"Authorization": "Bearer nope"}))[0] == 401
    assert (await service.post(body))[0] == 401
    assert (await service.post(body, headers=_signed(body)))[0] == 202
    assert await sql.fetchval("SELECT count(*) FROM callbacks") == 2


async def test_the_admin_token_guards_reads_and_operations_not_probes(
    start_service: StartService,
) -> None:
    """With an admin token, /objects, /callbacks/{id}, /metrics and the dead-letter routes
    need it; /health, /ready and /openapi.json never do; POST /callback is not its business."""
    service = await start_service(role="ingest", admin_token="adm1n")
    for path in ("/objects", "/objects/1", "/callbacks/1", "/metrics", "/dead-letters"):
        status, answer = await service.get(path)
        assert (status, answer["error"]) == (401, "unauthorized"), path
    auth = {"Authorization": "Bearer adm1n"}
    async with service.http.get(service.url + "/objects", headers=auth) as response:
        assert response.status == 200
    async with service.http.post(
        service.url + "/dead-letters/retry", json={}, headers=auth
    ) as response:
        assert response.status == 200
    for path in ("/health", "/ready", "/openapi.json"):
        assert (await service.get(path))[0] == 200, path
    assert (await service.post('{"object_ids": [1]}'))[0] == 202


def test_secrets_come_from_files_and_are_never_shown(tmp_path: Path) -> None:
    """Each secret may be given as a file; giving both is an error; no secret appears in the
    settings' repr or in --help."""
    (tmp_path / "admin").write_text("from-a-file\n")
    settings = Settings.load({"LASTSEEN_ADMIN_TOKEN_FILE": str(tmp_path / "admin")})
    assert settings.admin_token == "from-a-file"
    assert "from-a-file" not in repr(settings)
    with pytest.raises(ConfigError):
        Settings.load(
            {"LASTSEEN_ADMIN_TOKEN": "x", "LASTSEEN_ADMIN_TOKEN_FILE": str(tmp_path / "admin")}
        )
    env = clean_environment(LASTSEEN_ADMIN_TOKEN="do-not-print-me")
    shown = subprocess.run(
        [sys.executable, "-m", "lastseen", "serve", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=True,
    )
    assert "do-not-print-me" not in shown.stdout
    assert "--admin-token-file" in shown.stdout


async def test_an_idempotency_key_stores_once_across_a_restart(
    start_service: StartService, sql: asyncpg.Connection
) -> None:
    """The same Idempotency-Key twice, with a service restart between, answers the same
    callback_id and stores one callback; the same key with another body gets 422."""
    first = await start_service(role="ingest")
    key = {"Idempotency-Key": "order-42"}
    status, answer = await first.post('{"object_ids": [7, 8]}', headers=key)
    assert status == 202
    await first.service.stop()
    second = await start_service(role="ingest")
    assert await second.post('{"object_ids": [7, 8]}', headers=key) == (202, answer)
    status, error = await second.post('{"object_ids": [9]}', headers=key)
    assert (status, error["error"]) == (422, "idempotency_key_reused")
    assert await sql.fetchval("SELECT count(*) FROM callbacks") == 1
    assert (await second.post('{"object_ids": [7, 8]}'))[0] == 202  # no key: a new callback
    assert await sql.fetchval("SELECT count(*) FROM callbacks") == 2


async def test_a_signed_callback_sent_again_is_stored_once(
    start_service: StartService, sql: asyncpg.Connection
) -> None:
    """A signed request's webhook-id is its idempotency key: the same message delivered twice
    is one callback."""
    service = await start_service(role="ingest", webhook_secret=SECRET)
    body = '{"object_ids": [3]}'
    headers = _signed(body, msg_id="msg_same")
    first = await service.post(body, headers=headers)
    assert await service.post(body, headers=headers) == first
    assert await sql.fetchval("SELECT count(*) FROM callbacks") == 1


async def test_a_signed_request_s_key_is_its_webhook_id_whatever_else_it_says(
    start_service: StartService, sql: asyncpg.Connection
) -> None:
    """A captured signed request sent again with an Idempotency-Key of its own is still the
    same message: one callback, the first one's id."""
    service = await start_service(role="ingest", webhook_secret=SECRET)
    body = '{"object_ids": [3]}'
    headers = _signed(body, msg_id="msg_replayed")
    first = await service.post(body, headers=headers)
    again = await service.post(body, headers={**headers, "Idempotency-Key": "fresh"})
    assert again == first
    assert await sql.fetchval("SELECT count(*) FROM callbacks") == 1


async def test_keyed_requests_share_group_commits(
    start_service: StartService, sql: asyncpg.Connection
) -> None:
    """200 signed requests, each sent twice, all at once: committed in groups (far fewer commits
    than requests), each key stored once, a repeat answered with the first one's id; the same
    key with other ids afterwards 422."""
    service = await start_service(role="ingest", webhook_secret=SECRET)
    bodies = [(f"msg_{n}", f'{{"object_ids": [{n}]}}') for n in range(200)]
    answers = await asyncio.gather(
        *(service.post(body, headers=_signed(body, msg_id=key)) for key, body in bodies * 2)
    )
    assert [status for status, _ in answers] == [202] * 400
    assert answers[200:] == answers[:200]
    other = '{"object_ids": [999]}'
    status, error = await service.post(other, headers=_signed(other, msg_id="msg_0"))
    assert (status, error["error"]) == (422, "idempotency_key_reused")
    assert await sql.fetchval("SELECT count(*) FROM callbacks") == 200
    assert await sql.fetchval("SELECT count(*) FROM idempotency_keys") == 200
    commits = service.sample("lastseen_commit_batch_size_count")
    assert 0 < commits < 200


async def test_a_callback_can_be_looked_up_by_its_id(
    start_service: StartService, sql: asyncpg.Connection
) -> None:
    """GET /callbacks/{id}: pending until its ids are looked up, then done with its outcomes
    and dead letters; 404 for an id never stored (or pruned)."""
    service = await start_service(role="ingest")
    status, accepted = await service.post('{"object_ids": [4, 4, 6]}')
    callback_id = accepted["callback_id"]
    status, answer = await service.get(f"/callbacks/{callback_id}")
    assert status == 200
    assert answer["status"] == "pending"
    assert (answer["ids"], answer["distinct_ids"], answer["done_at"]) == (3, 2, None)
    await sql.execute(
        "INSERT INTO dead_letters (callback_id, object_id, received_at, reason, detail, attempts)"
        " VALUES ($1, 6, now(), 'http_4xx', '404', 1)",
        callback_id,
    )
    await sql.execute("UPDATE callbacks SET done_at = now() WHERE id = $1", callback_id)
    status, answer = await service.get(f"/callbacks/{callback_id}")
    assert answer["status"] == "done"
    assert answer["outcomes"] == {"dead_lettered": 1, "resolved": 1}
    assert [d["object_id"] for d in answer["dead_letters"]] == [6]
    assert (await service.get("/callbacks/999999"))[0] == 404
    assert (await service.get("/callbacks/x"))[0] == 400


async def _dead_letters(sql: asyncpg.Connection) -> None:
    """Three dead letters: two recent (http_4xx, poison), one from a day ago (http_4xx)."""
    now = datetime.now(UTC)
    await sql.executemany(
        "INSERT INTO dead_letters (callback_id, object_id, received_at, reason, detail, attempts)"
        " VALUES ($1, $2, $3, $4, '', 1)",
        [
            (1, 10, now, "http_4xx"),
            (2, 20, now, "poison"),
            (3, 30, now - timedelta(days=1), "http_4xx"),
        ],
    )


async def test_dead_letters_are_filtered_retried_and_discarded_by_route(
    start_service: StartService, sql: asyncpg.Connection
) -> None:
    """The admin routes filter dead letters by reason, callback and receive time; a retry's dry
    run counts without moving anything; a retry skips those past the TTL; a discard deletes."""
    await _dead_letters(sql)
    service = await start_service(role="ingest", ttl=30.0)
    status, page = await service.get("/dead-letters?reason=http_4xx")
    assert status == 200
    assert [d["object_id"] for d in page["dead_letters"]] == [10, 30]
    assert page["by_reason"] == {"http_4xx": 2, "poison": 1}
    assert page["matching"] == len(page["dead_letters"])
    _, page = await service.get("/dead-letters?callback_id=2")
    assert [d["object_id"] for d in page["dead_letters"]] == [20]
    assert (await service.get("/dead-letters?received_after=yesterday"))[0] == 400

    async def call(path: str, body: object) -> dict[str, object]:
        async with service.http.post(service.url + path, json=body) as response:
            assert response.status == 200, await response.text()
            answer: dict[str, object] = await response.json()
            return answer

    dry = await call("/dead-letters/retry", {"reason": "http_4xx", "dry_run": True})
    assert dry == {"dry_run": True, "would_retry": 1, "skipped_stale": 1}
    assert await sql.fetchval("SELECT count(*) FROM dead_letters") == 3
    done = await call("/dead-letters/retry", {"reason": "http_4xx"})
    assert done["skipped_stale"] == 1
    assert len(done["callbacks_created"]) == 1  # type: ignore[arg-type]
    gone = await call("/dead-letters/discard", {"reason": "poison"})
    assert gone == {"dry_run": False, "discarded": 1}
    assert await sql.fetchval("SELECT object_id FROM dead_letters") == 30
    async with service.http.post(
        service.url + "/dead-letters/discard", json={"unknown": 1}
    ) as response:
        assert response.status == 400


async def test_dead_letter_commands_filter_and_dry_run(
    db_url: str, sql: asyncpg.Connection
) -> None:
    """`lastseen dead-letters --reason`, `retry-dead-letters --dry-run` and
    `discard-dead-letters` do from the command line what the routes do; a listing says how
    many matched, and a reason no dead letter has is named."""
    await _dead_letters(sql)
    env = {"LASTSEEN_DATABASE_URL": db_url}
    listed = await run_cli("dead-letters", "--reason", "poison", env=env)
    assert [json.loads(line)["object_id"] for line in listed.stdout.splitlines()] == [20]
    # What was listed against what matched and what is stored, not only the stored count.
    summary = "1 listed, newest received first; 1 match; 3 stored (http_4xx: 2, poison: 1)"
    assert summary in listed.stderr
    mistyped = await run_cli("dead-letters", "--reason", "nope", env=env)
    assert mistyped.stdout == ""
    assert "0 match; 3 stored" in mistyped.stderr
    assert "no dead letter has the reason 'nope'" in mistyped.stderr
    dry = await run_cli("retry-dead-letters", "--dry-run", env=env)
    assert "2 dead letters would be queued again" in dry.stderr
    assert "1 dead letters skipped" in dry.stderr
    gone = await run_cli("discard-dead-letters", "--callback", "3", env=env)
    assert "1 dead letters discarded" in gone.stderr
    assert await sql.fetchval("SELECT count(*) FROM dead_letters") == 2


def test_each_command_offers_only_the_flags_it_uses() -> None:
    """--help lists the settings a command uses: no upstream flags for dead letters, and the
    internal flags of serve (set by lastseen itself) are not offered."""

    def help_of(*command: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "lastseen", *command, "--help"],
            capture_output=True, text=True, timeout=30, check=True, env=clean_environment(),
        ).stdout  # fmt: skip

    dead = help_of("dead-letters")
    assert "--database-url" in dead
    assert "--reason" in dead
    for flag in ("--objects-url", "--listen", "--max-lookups", "--commit-timeout"):
        assert flag not in dead, flag
    serve = help_of("serve")
    assert "--parent-pid" not in serve
    assert "--noop-route" not in serve


def test_an_unknown_flag_is_told_with_the_command_s_usage() -> None:
    """`lastseen serve --bogus` says which flag, under serve's usage (the flags that exist),
    not the top level's; exit 2."""
    done = subprocess.run(
        [sys.executable, "-m", "lastseen", "serve", "--bogus"],
        capture_output=True, text=True, timeout=30, env=clean_environment(),
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.startswith("usage: lastseen serve ")
    assert done.stderr.endswith("lastseen serve: error: unrecognized arguments: --bogus\n")


def test_the_openapi_document_is_valid_and_matches_the_routes() -> None:
    """The document validates as OpenAPI 3.1, and its paths and methods are exactly the
    routes of the application (HEAD, which aiohttp adds to each GET, aside), the status
    page's HTML and files aside: they are a page for people, not part of the API."""
    doc = document()
    validate(doc)

    async def handler(request: web.Request) -> web.Response:
        return web.Response()

    settings = fast_settings()
    app = build_app(
        Routes(None, None, Readiness()),  # type: ignore[arg-type]
        handler,
        max_body_bytes=settings.max_body_bytes,
        status=handler,
        page=Page().routes(),
    )
    routes = {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD"
        and route.resource is not None
        and not (route.resource.name or "").startswith("ui")
    }
    assert ("get", "/ui/") not in routes
    documented = {(method, path) for path, item in doc["paths"].items() for method in item}
    assert routes == documented
