"""POST /callback: validation, durable storage before 202, group commit, operations endpoints."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest
from helpers.services import StartService
from hypothesis import given
from hypothesis import strategies as st

from lastseen.core.errors import InvalidCallback
from lastseen.intake.admission import ClientLimits
from lastseen.intake.group_commit import GroupCommit
from lastseen.intake.ingest import parse_callback
from lastseen.storage.database import Database
from lastseen.telemetry.metrics import Metrics

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


@given(st.lists(INT64, max_size=300))
def test_any_list_of_int64_ids_is_accepted(ids: list[int]) -> None:
    """Every list of signed 64-bit integers parses back to itself, duplicates and 0 included."""
    body = ('{"object_ids": [' + ",".join(map(str, ids)) + "]}").encode()
    assert parse_callback(body) == ids


@given(st.one_of(st.integers(min_value=2**63), st.integers(max_value=-(2**63) - 1)))
def test_ids_outside_int64_are_refused(n: int) -> None:
    """An id that does not fit a signed 64-bit integer is an out-of-range error."""
    with pytest.raises(InvalidCallback) as caught:
        parse_callback(f'{{"object_ids": [1, {n}]}}'.encode())
    assert caught.value.reason == "id_out_of_range"


BAD_BODIES = [
    (b"", "malformed_json"),
    (b'{"object_ids": [1, 2', "malformed_json"),
    (b"not json", "malformed_json"),
    (b"[1, 2]", "not_an_object"),
    (b'"object_ids"', "not_an_object"),
    (b"{}", "missing_object_ids"),
    (b'{"ids": [1]}', "missing_object_ids"),
    (b'{"object_ids": null}', "object_ids_not_a_list"),
    (b'{"object_ids": 7}', "object_ids_not_a_list"),
    (b'{"object_ids": {"a": 1}}', "object_ids_not_a_list"),
    (b'{"object_ids": ["1"]}', "invalid_id"),
    (b'{"object_ids": [1.5]}', "invalid_id"),
    (b'{"object_ids": [1e19]}', "id_out_of_range"),  # an integer, but past int64
    (b'{"object_ids": [true]}', "invalid_id"),
    (b'{"object_ids": [null]}', "invalid_id"),
    (b'{"object_ids": [9223372036854775808]}', "id_out_of_range"),
    (b'{"object_ids": [-9223372036854775809]}', "id_out_of_range"),
]


@pytest.mark.parametrize(("body", "reason"), BAD_BODIES)
async def test_bad_bodies_get_400_and_store_nothing(
    start_service: StartService, sql: asyncpg.Connection, body: bytes, reason: str
) -> None:
    """Each kind of bad body gets 400 with a JSON error naming the problem; nothing is stored."""
    service = await start_service(role="ingest")
    status, answer = await service.post(body, headers={"Content-Type": "application/json"})
    assert status == 400
    assert answer["error"] == reason
    assert answer["detail"]
    assert await sql.fetchval("SELECT count(*) FROM callbacks") == 0
    assert service.sample("lastseen_callbacks_rejected_total", reason=reason) == 1


async def test_a_body_over_the_limit_gets_413(
    start_service: StartService, sql: asyncpg.Connection
) -> None:
    """A body larger than the configured limit gets 413 with a JSON error; nothing is stored."""
    service = await start_service(role="ingest", max_body_bytes=1000)
    body = '{"object_ids": [' + ",".join(["1"] * 600) + "]}"
    status, answer = await service.post(body)
    assert status == 413
    assert answer["error"] == "body_too_large"
    status, _ = await service.post('{"object_ids": [1, 2, 3]}')
    assert status == 202
    assert await sql.fetchval("SELECT count(*) FROM callbacks") == 1


async def test_a_callback_over_the_id_limit_gets_413(
    start_service: StartService, sql: asyncpg.Connection
) -> None:
    """A callback with more ids than LASTSEEN_MAX_IDS gets 413 too_many_ids; nothing is
    stored; one at the limit is accepted."""
    service = await start_service(role="ingest", max_ids=100)
    status, answer = await service.post('{"object_ids": [' + ",".join(["7"] * 101) + "]}")
    assert status == 413
    assert answer["error"] == "too_many_ids"
    assert await sql.fetchval("SELECT count(*) FROM callbacks") == 0
    status, _ = await service.post('{"object_ids": [' + ",".join(["7"] * 100) + "]}")
    assert status == 202


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
async def test_other_methods_get_405(start_service: StartService, method: str) -> None:
    """Methods other than POST on /callback get 405 with a JSON error and an Allow header."""
    service = await start_service(role="ingest")
    async with service.http.request(method, service.url + "/callback") as response:
        assert response.status == 405
        assert "POST" in response.headers["Allow"]
        assert (await response.json())["error"] == "method_not_allowed"


async def test_a_callback_is_stored_before_202(
    start_service: StartService, sql: asyncpg.Connection
) -> None:
    """The 202 names the stored row, which holds the receive time and the ids as received."""
    service = await start_service(role="ingest")
    before = await sql.fetchval("SELECT now()")
    status, answer = await service.post(
        '{"object_ids": [5, 0, 5, -3, 0], "sent_by": "producer-1"}',
        headers={"Content-Type": "text/plain"},
    )
    assert status == 202
    assert answer == {"callback_id": answer["callback_id"], "ids": 5}
    row = await sql.fetchrow("SELECT * FROM callbacks WHERE id = $1", answer["callback_id"])
    assert row is not None
    assert row["object_ids"] == [5, 0, 5, -3, 0]
    assert row["done_at"] is None
    assert abs((row["received_at"] - before).total_seconds()) < 5


async def test_an_empty_list_is_a_valid_callback(
    start_service: StartService, sql: asyncpg.Connection
) -> None:
    """{"object_ids": []} is accepted and stored."""
    service = await start_service(role="ingest")
    status, answer = await service.post('{"object_ids": []}')
    assert status == 202
    stored = await sql.fetchval(
        "SELECT object_ids FROM callbacks WHERE id = $1", answer["callback_id"]
    )
    assert stored == []


async def test_concurrent_requests_share_commits(
    start_service: StartService, sql: asyncpg.Connection
) -> None:
    """200 concurrent callbacks all get 202 with their own ids, in fewer commits than requests."""
    service = await start_service(role="ingest")
    bodies = [f'{{"object_ids": [{i}, {i + 1}]}}' for i in range(200)]
    replies = await asyncio.gather(*(service.post(body) for body in bodies))
    assert all(status == 202 for status, _ in replies)
    ids = [answer["callback_id"] for _, answer in replies]
    assert len(set(ids)) == 200
    rows = await sql.fetch("SELECT id, object_ids FROM callbacks")
    assert {r["id"]: r["object_ids"] for r in rows} == {
        answer["callback_id"]: [i, i + 1] for i, (_, answer) in enumerate(replies)
    }
    commits = service.sample("lastseen_commit_batch_size_count")
    assert 0 < commits < 200


async def test_health_ready_and_metrics(start_service: StartService) -> None:
    """/health answers, /ready says ready, /metrics counts what was received and rejected."""
    service = await start_service(role="ingest")
    assert await service.get("/health") == (200, {"status": "alive"})
    assert await service.get("/ready") == (200, {"ready": True})
    await service.post('{"object_ids": [1, 1, 2]}')
    await service.post("{")
    async with service.http.get(service.url + "/metrics") as response:
        assert response.status == 200
        text = await response.text()
    assert "lastseen_callbacks_received_total 1.0" in text
    assert "lastseen_ids_received_total 3.0" in text
    assert 'lastseen_callbacks_rejected_total{reason="malformed_json"} 1.0' in text
    assert "lastseen_reply_seconds_bucket" in text
    assert "lastseen_commit_batch_size_bucket" in text
    assert "lastseen_inbox_pending 1.0" in text


async def test_unknown_paths_get_a_json_404(start_service: StartService) -> None:
    """Errors on any path are JSON."""
    service = await start_service(role="ingest")
    status, answer = await service.get("/nowhere")
    assert status == 404
    assert answer["error"] == "not_found"


async def test_a_group_commit_closes_at_its_byte_limit(
    db: Database, sql: asyncpg.Connection
) -> None:
    """Callbacks queued together are split into several commits once a batch holds the byte
    limit's worth of ids; each is stored and gets its own id."""
    commit = GroupCommit(
        db, Metrics(), max_batch=1000, concurrency=1, timeout=5, max_batch_bytes=2000
    )
    commit.open()
    runner = asyncio.create_task(commit.run())
    ids = list(range(100))  # about 300 bytes as an array literal
    futures = [commit.submit(time.time(), ids) for _ in range(20)]
    stored = await asyncio.gather(*futures)
    commit.close()
    await runner
    assert len(set(stored)) == 20
    assert await sql.fetchval("SELECT count(*) FROM callbacks") == 20
    commits = commit.metrics.registry.get_sample_value("lastseen_commit_batch_size_count")
    assert commits is not None
    assert commits >= 3  # 20 x ~300 bytes at 2,000 bytes a batch


async def test_shutdown_delay_fails_readiness_while_callbacks_are_still_taken(
    start_service: StartService, sql: asyncpg.Connection
) -> None:
    """After a stop is asked for, /ready answers 503 for LASTSEEN_SHUTDOWN_DELAY while
    POST /callback still answers 202 (a load balancer's time to notice), then it stops."""
    service = await start_service(role="ingest", shutdown_delay=1.0)
    stopping = asyncio.create_task(service.service.stop())
    await asyncio.sleep(0.1)
    status, ready = await service.get("/ready")
    assert (status, ready["reason"]) == (503, "shutting down")
    status, _ = await service.post('{"object_ids": [1]}')
    assert status == 202
    await stopping
    assert await sql.fetchval("SELECT count(*) FROM callbacks") == 1


async def test_a_client_over_its_rate_gets_429(
    start_service: StartService, sql: asyncpg.Connection
) -> None:
    """With a per-client rate, a client beyond its burst gets 429 with Retry-After and nothing
    is stored; the metric names a client by a digest of its verified token, never the token; a
    wrong token is refused (401) before any bucket is asked."""
    service = await start_service(
        role="ingest", client_rate=1.0, client_burst=2.0, intake_token="secret-token-a"
    )
    a = {"Authorization": "Bearer secret-token-a"}
    assert (await service.post('{"object_ids": [1]}', headers=a))[0] == 202
    assert (await service.post('{"object_ids": [2]}', headers=a))[0] == 202
    async with service.http.post(
        service.url + "/callback", data='{"object_ids": [3]}', headers=a
    ) as response:
        assert response.status == 429
        assert response.headers["Retry-After"] == "1"
        assert (await response.json())["error"] == "rate_limited"
    wrong = {"Authorization": "Bearer secret-token-b"}
    assert (await service.post('{"object_ids": [4]}', headers=wrong))[0] == 401
    assert await sql.fetchval("SELECT count(*) FROM callbacks") == 2
    async with service.http.get(service.url + "/metrics") as response:
        text = await response.text()
    assert "secret-token" not in text
    limited = [line for line in text.splitlines() if "lastseen_client_rate_limited_total{" in line]
    assert len(limited) == 1
    assert limited[0].startswith('lastseen_client_rate_limited_total{client="token:')


async def test_unverified_tokens_do_not_get_buckets_of_their_own(
    start_service: StartService, sql: asyncpg.Connection
) -> None:
    """With no intake token, a bearer token proves nothing: a client sending a new random
    token with every request is limited by its address like any other."""
    service = await start_service(role="ingest", client_rate=1.0, client_burst=2.0)
    statuses = [
        (await service.post('{"object_ids": [1]}', headers={"Authorization": f"Bearer r{n}"}))[0]
        for n in range(3)
    ]
    assert statuses == [202, 202, 429]
    assert await sql.fetchval("SELECT count(*) FROM callbacks") == 2


def test_client_limits_refill_and_stay_bounded() -> None:
    """A bucket refills at the rate; the metric names at most 100 clients, then "other"."""
    limits = ClientLimits(rate=1000.0, burst=1.0)
    assert limits.admit("a") == 0.0
    assert 0.0 < limits.admit("a") <= 0.001
    time.sleep(0.002)
    assert limits.admit("a") == 0.0
    labels = {limits.label(f"10.0.0.{n}") for n in range(150)}
    assert len(labels) == 101
    assert "other" in labels
