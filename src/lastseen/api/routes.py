"""Every route but ``POST /callback`` (ingest.py) and the status page: health, readiness,
metrics, the objects read API, callbacks and dead letters, the OpenAPI document."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime

import msgspec
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from lastseen.admin import dead_letters
from lastseen.api import openapi
from lastseen.api.readiness import Readiness
from lastseen.api.status import database_figures
from lastseen.core.errors import InvalidRequest
from lastseen.core.model import DeadLetterFilter
from lastseen.core.parsers import INT64_MAX, INT64_MIN, PAGE_LIMIT, integer
from lastseen.core.replies import (
    CallbackStatus,
    DeadLettersPage,
    Health,
    ObjectOut,
    ObjectsPage,
    Outcomes,
    error_response,
    json_response,
)
from lastseen.intake.ingest import parse_callback
from lastseen.storage.database import Database
from lastseen.telemetry.metrics import Metrics, merge

log = structlog.get_logger("lastseen.api.routes")


def _object(object_id: int, last_seen: datetime) -> ObjectOut:
    return ObjectOut(object_id, last_seen.isoformat())


class Routes:
    def __init__(
        self,
        db: Database,
        metrics: Metrics,
        readiness: Readiness,
        other_processes: Callable[[], Awaitable[list[tuple[str, str]]]] | None = None,
        *,
        samples_database: bool = True,
        ttl: float = 30.0,
    ) -> None:
        self.db = db
        self.ttl = ttl
        self._openapi = msgspec.json.encode(openapi.document())
        self.metrics = metrics
        self.readiness = readiness
        self.other_processes = other_processes
        # A worker process leaves the database-wide gauges to its parent, which adds the
        # processes' metrics up: sampled in both, they would count twice.
        self.samples_database = samples_database

    async def health(self, request: web.Request) -> web.Response:
        return json_response(Health("alive"))

    async def ready(self, request: web.Request) -> web.Response:
        answer = self.readiness.answer()
        return json_response(answer, status=200 if answer.ready else 503)

    async def metrics_page(self, request: web.Request) -> web.Response:
        # Figures that live in the database are sampled on scrape; a slow database only makes
        # them stale, never the scrape fail.
        figures = None
        if self.readiness.migrated and self.samples_database:
            figures = await database_figures(self.db)
        if figures is not None:
            # A reason with none left must drop out, not keep its last count.
            self.metrics.dead_letters_pending.clear()
            for reason, count in figures.dead_letters.items():
                self.metrics.dead_letters_pending.labels(reason).set(count)
            self.metrics.inbox_pending.set(figures.pending or 0)
            self.metrics.inbox_oldest_age.set(figures.oldest_age or 0.0)
            self.metrics.objects_online.set(figures.online or 0)
        if self.other_processes is None:
            body = self.metrics.render()
        else:
            others = await self.other_processes()
            self.metrics.worker_processes_up.set(len(others))
            body = merge([("http", self.metrics.render().decode()), *others])
        response = web.Response(body=body)
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def list_objects(self, request: web.Request) -> web.Response:
        try:
            given = request.query.get("after")
            after = None if given is None else integer(given)
            limit = integer(request.query.get("limit", str(PAGE_LIMIT)))
            if not 1 <= limit <= PAGE_LIMIT or not INT64_MIN <= (after or 0) <= INT64_MAX:
                raise ValueError(limit)
        except ValueError:
            return error_response(400, "bad_query", f"after: an id; limit: 1 to {PAGE_LIMIT}")
        rows = await self.db.list_objects(after, limit)
        return json_response(
            ObjectsPage(
                objects=[_object(i, seen) for i, seen in rows],
                next_after=rows[-1][0] if len(rows) == limit else None,
            )
        )

    async def get_object(self, request: web.Request) -> web.Response:
        try:
            object_id = integer(request.match_info["object_id"])
        except ValueError:
            return error_response(400, "bad_id", "the id must be an integer")
        if not INT64_MIN <= object_id <= INT64_MAX:
            return error_response(400, "bad_id", "the id must fit 64 bits")
        last_seen = await self.db.get_object(object_id)
        if last_seen is None:
            return error_response(404, "not_found", f"object {object_id} is not online")
        return json_response(_object(object_id, last_seen))

    async def get_callback(self, request: web.Request) -> web.Response:
        callback_id = _int64(request.match_info["callback_id"], "callback_id")
        row = await self.db.callback_status(callback_id)
        if row is None:
            detail = f"callback {callback_id} is not stored (never, or pruned after its audit)"
            return error_response(404, "not_found", detail)
        which = DeadLetterFilter(callback_id=callback_id)
        letters = await self.db.list_dead_letters(which, PAGE_LIMIT)
        done = row["done_at"] is not None
        answer = CallbackStatus(
            callback_id=callback_id,
            received_at=row["received_at"].isoformat(),
            status="done" if done else "pending",
            done_at=row["done_at"].isoformat() if done else None,
            ids=row["ids"],
            distinct_ids=row["distinct_ids"],
            claims=row["claims"],
            outcomes=Outcomes(
                dead_lettered=len(letters),
                # Looked up (online or not), or expired past the TTL.
                resolved=row["distinct_ids"] - len(letters) if done else None,
            ),
            dead_letters=[dead_letters.as_json(d, at) for d, at in letters],
        )
        return json_response(answer)

    async def list_dead_letters(self, request: web.Request) -> web.Response:
        which = dead_letters.parse_filter(request.query)
        limit = _limit(request.query.get("limit"))
        after = dead_letters.parse_cursor(request.query.get("after"))
        letters = await self.db.list_dead_letters(which, limit, after)
        matching = await self.db.count_matching_dead_letters(which)
        counts = await self.db.count_dead_letters()
        last = letters[-1] if len(letters) == limit else None
        return json_response(
            DeadLettersPage(
                dead_letters=[dead_letters.as_json(d, at) for d, at in letters],
                matching=matching,
                by_reason=counts,
                next_after=None if last is None else dead_letters.cursor(last[0]),
            )
        )

    async def retry_dead_letters(self, request: web.Request) -> web.Response:
        asked, which = await _dead_letter_request(request)
        answer = await dead_letters.retry(
            self.db,
            which,
            ttl=self.ttl,
            include_stale=asked.include_stale,
            limit=asked.limit,
            dry_run=asked.dry_run,
        )
        return json_response(answer)

    async def discard_dead_letters(self, request: web.Request) -> web.Response:
        asked, which = await _dead_letter_request(request)
        answer = await dead_letters.discard(
            self.db, which, limit=asked.limit, dry_run=asked.dry_run
        )
        return json_response(answer)

    async def openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=self._openapi, content_type="application/json")


async def _dead_letter_request(
    request: web.Request,
) -> tuple[dead_letters.DeadLetterRequest, DeadLetterFilter]:
    """The body of a retry or a discard, and the dead letters it is about."""
    asked = dead_letters.decode_request(await request.read())
    return asked, dead_letters.parse_filter(msgspec.structs.asdict(asked))


def _int64(text: str, name: str) -> int:
    try:
        value = integer(text)
    except ValueError:
        raise InvalidRequest("bad_id", f"{name} must be an integer") from None
    if not INT64_MIN <= value <= INT64_MAX:
        raise InvalidRequest("bad_id", f"{name} must fit 64 bits")
    return value


def _limit(value: object) -> int:
    if value is None:
        return PAGE_LIMIT
    try:
        limit = integer(str(value))
    except ValueError:
        limit = 0
    if not 1 <= limit <= PAGE_LIMIT:
        raise InvalidRequest("bad_limit", f"limit: 1 to {PAGE_LIMIT}")
    return limit


async def noop_callback(request: web.Request) -> web.Response:
    """The do-nothing handler that ``lastseen bench`` compares /callback with: it reads the
    body and decodes it as /callback does (msgspec), and stores nothing."""
    parse_callback(await request.read())
    return web.Response(status=202, body=b'{"callback_id":0}', content_type="application/json")
