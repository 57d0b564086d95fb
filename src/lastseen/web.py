"""The HTTP surface: the application, its JSON replies and errors, and every route but
``POST /callback`` (ingest.py): health, readiness, metrics, the objects read API.

Every error, from any route, is a JSON body ``{"error": ..., "detail": ...}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Protocol

import msgspec
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from lastseen import dead_letters, openapi
from lastseen.auth import token_matches
from lastseen.errors import DatabaseError, InvalidRequest
from lastseen.guards import guard
from lastseen.ingest import parse_callback
from lastseen.metrics import Metrics, merge
from lastseen.model import DeadLetterFilter
from lastseen.parsers import INT64_MAX, INT64_MIN, integer
from lastseen.replies import error_response, json_response
from lastseen.status import database_figures
from lastseen.storage.database import Database

log = structlog.get_logger("lastseen.web")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PAGE_LIMIT = 1000
# How often /ready's state is brought up to date, and how long a ping may take before the
# database counts as unreachable.
READY_CHECK_EVERY = 0.25
READY_CHECK_TIMEOUT = 1.0
UPSTREAM_CHECK_EVERY = 2.0


class Spooling(Protocol):
    """What readiness asks of a group commit with a spool."""

    @property
    def accepting(self) -> bool: ...

    @property
    def spooling(self) -> bool: ...


class Readiness:
    """Whether this instance can do its work: migrations applied, database reachable; and, as
    details that do not make it unready (it still stores callbacks), whether the upstream is
    failing, asked of ``upstream_failing`` (None where no pipeline runs), and whether callbacks
    go to the local spool, asked of ``spool`` (None where there is none): an instance that
    cannot reach its database but can spool is ready, degraded. A worker process that keeps
    failing to start, asked of ``worker_trouble``, makes it unready: nothing would be looked up.

    ``watch`` keeps the database's and the upstream's state current in the background, and
    ``answer`` reads it: ``GET /ready`` never waits on the database (a kubelet gives a probe
    1 s, and a server behind a partition that drops packets would hold a ping far longer)."""

    def __init__(
        self,
        upstream_failing: Callable[[], Awaitable[bool]] | None = None,
        spool: Spooling | None = None,
        worker_trouble: Callable[[], str | None] | None = None,
        *,
        clock: Callable[[], float] = time.time,
        skew: Callable[[float], None] | None = None,
    ) -> None:
        """``skew`` is told, after each ping, this instance's ``clock`` minus the database's."""
        self.upstream_failing = upstream_failing
        self.spool = spool
        self.worker_trouble = worker_trouble
        self.clock = clock
        self.skew = skew
        self.unreachable = False  # the last check (or migration) found no database
        self.upstream_is_failing = False  # as ``watch`` last found it
        self.reason = "migrations not applied yet"
        self.draining = False  # shutting down: tell load balancers, while still serving
        self._migrated = asyncio.Event()
        self._pinging_since: float | None = None  # loop time a ping in progress started
        self._timeout = READY_CHECK_TIMEOUT

    @property
    def migrated(self) -> bool:
        return self._migrated.is_set()

    def set_migrated(self) -> None:
        self.unreachable = False
        self._migrated.set()

    async def wait_migrated(self) -> None:
        await self._migrated.wait()

    async def watch(
        self, db: Database, every: float = READY_CHECK_EVERY, timeout: float = READY_CHECK_TIMEOUT
    ) -> None:
        """Pings the database (once migrated) every ``every`` seconds, and asks whether the
        upstream is failing every ``UPSTREAM_CHECK_EVERY`` (in worker processes, that is a
        scrape of their metrics), until cancelled; a ping that takes longer than ``timeout``
        counts as unreachable while it lasts."""
        self._timeout = timeout
        loop = asyncio.get_running_loop()
        asked_upstream = -UPSTREAM_CHECK_EVERY
        while True:
            if self.migrated:
                self._pinging_since = loop.time()
                sent = self.clock()
                try:
                    database_time = await asyncio.wait_for(db.ping(), timeout)
                    reachable, error = True, ""
                except (DatabaseError, TimeoutError) as exc:
                    reachable, error = False, str(exc) or "timeout"
                self._pinging_since = None
                if reachable and self.skew is not None:
                    # The database read its clock about halfway through the round trip.
                    self.skew((sent + self.clock()) / 2 - database_time)
                if not reachable and not self.unreachable:
                    # The driver's text (hosts, ports, errno) is for the logs, not for callers.
                    log.warning("readiness check failed", error=error)
                self.unreachable = not reachable
            due = loop.time() - asked_upstream >= UPSTREAM_CHECK_EVERY
            if self.upstream_failing is not None and due:
                asked_upstream = loop.time()
                with contextlib.suppress(TimeoutError):
                    asked = self.upstream_failing()
                    self.upstream_is_failing = await asyncio.wait_for(asked, timeout)
            await asyncio.sleep(every)

    def _database_unreachable(self) -> bool:
        if self._pinging_since is not None:
            overdue = asyncio.get_running_loop().time() - self._pinging_since > self._timeout
            if overdue:
                return True
        return self.unreachable

    def check(self) -> str | None:
        """None when ready, otherwise why not."""
        if self.draining:
            return "shutting down"
        if not self.migrated:
            return self.reason
        return "database unreachable" if self._database_unreachable() else None

    def answer(self, upstream_failing: bool | None = None) -> dict[str, str | bool]:
        """What ``GET /ready`` answers: ``ready``, and why not, or in what way degraded.
        ``upstream_failing``, when the caller knows it more recently, replaces what ``watch``
        found."""
        reason = self.check()
        trouble = None if self.worker_trouble is None else self.worker_trouble()
        if reason is None and trouble is not None:
            return {"ready": False, "reason": trouble}
        answer: dict[str, str | bool] = {"ready": True}
        spool = self.spool
        unreachable = self._database_unreachable()
        if reason is not None and (spool is None or not unreachable or self.draining):
            return {"ready": False, "reason": reason}
        # The spool takes callbacks once a commit found the database gone, which may be
        # before the next ping does.
        if spool is not None and (reason is not None or spool.spooling):
            if not spool.accepting:
                full = f"{reason or 'spooling'}, and the spool cannot take more"
                return {"ready": False, "reason": full}
            why = f" {reason};" if reason else ""
            answer["degraded"] = f"spooling:{why} callbacks are stored on local disk"
        if self.upstream_failing is not None:
            failing = self.upstream_is_failing if upstream_failing is None else upstream_failing
            answer["upstream"] = "failing: lookups held and probed" if failing else "ok"
        return answer


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except InvalidRequest as exc:
        return error_response(400, exc.reason, exc.detail)
    except DatabaseError as exc:
        log.warning("request failed on the database", path=request.path, error=str(exc))
        detail = "the database did not answer; try again"
        return error_response(503, "database_unavailable", detail, {"Retry-After": "1"})
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error = exc.reason.lower().replace(" ", "_")
        headers = {k: v for k, v in exc.headers.items() if k.lower() != "content-type"}
        detail = f"{request.method} {request.path}: {exc.reason}"
        return error_response(exc.status, error, detail, headers)


def _object(object_id: int, last_seen: datetime) -> dict[str, object]:
    return {"id": object_id, "last_seen": last_seen.isoformat()}


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
        return json_response({"status": "alive"})

    async def ready(self, request: web.Request) -> web.Response:
        answer = self.readiness.answer()
        return json_response(answer, status=200 if answer["ready"] else 503)

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
            {
                "objects": [_object(i, seen) for i, seen in rows],
                "next_after": rows[-1][0] if len(rows) == limit else None,
            }
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
        answer: dict[str, object] = {
            "callback_id": callback_id,
            "received_at": row["received_at"].isoformat(),
            "status": "done" if done else "pending",
            "done_at": row["done_at"].isoformat() if done else None,
            "ids": row["ids"],
            "distinct_ids": row["distinct_ids"],
            "claims": row["claims"],
            "outcomes": {
                "dead_lettered": len(letters),
                # Looked up (online or not), or expired past the TTL.
                "resolved": row["distinct_ids"] - len(letters) if done else None,
            },
            "dead_letters": [dead_letters.as_json(d, at) for d, at in letters],
        }
        return json_response(answer)

    async def list_dead_letters(self, request: web.Request) -> web.Response:
        which = dead_letters.parse_filter(request.query)
        limit = _limit(request.query.get("limit"))
        after = dead_letters.parse_cursor(request.query.get("after"))
        letters = await self.db.list_dead_letters(which, limit, after)
        counts = await self.db.count_dead_letters()
        last = letters[-1] if len(letters) == limit else None
        return json_response(
            {
                "dead_letters": [dead_letters.as_json(d, at) for d, at in letters],
                "by_reason": counts,
                "next_after": None if last is None else dead_letters.cursor(*last),
            }
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


async def _noop(request: web.Request) -> web.Response:
    """The do-nothing handler that ``lastseen bench`` compares /callback with: it reads the
    body and decodes it as /callback does (msgspec), and stores nothing."""
    parse_callback(await request.read())
    return web.Response(status=202, body=b'{"callback_id":0}', content_type="application/json")


# What the admin token guards: everything that reads what producers sent, and the operations.
_ADMIN_PREFIXES = ("/objects", "/callbacks/", "/metrics", "/dead-letters", "/status")


def admin_only(token: str) -> web.middleware:  # type: ignore[valid-type]
    """A middleware that asks for ``Authorization: Bearer <token>`` on the admin routes."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith(_ADMIN_PREFIXES) and not token_matches(
            request.headers.get("Authorization"), token
        ):
            return error_response(
                401,
                "unauthorized",
                "this route needs the admin bearer token",
                {"WWW-Authenticate": "Bearer"},
            )
        return await handler(request)

    return check


def build_app(
    routes: Routes,
    callbacks: Handler | None,
    *,
    max_body_bytes: int,
    noop: bool = False,
    admin_token: str | None = None,
    status: Handler | None = None,
    page: list[web.RouteDef] | None = None,
) -> web.Application:
    """The aiohttp application; ``callbacks`` is None on an instance that does not ingest,
    ``status`` and ``page`` (the status page's routes) on one that does not serve them."""
    middlewares: list[Handler | object] = [json_errors, guard]
    if admin_token is not None:
        middlewares.append(admin_only(admin_token))
    app = web.Application(middlewares=middlewares, client_max_size=max_body_bytes)  # type: ignore[arg-type]
    if callbacks is not None:
        app.router.add_post("/callback", callbacks)
    if noop:
        app.router.add_post("/noop", _noop)
    app.router.add_get("/health", routes.health)
    app.router.add_get("/ready", routes.ready)
    app.router.add_get("/metrics", routes.metrics_page)
    app.router.add_get("/openapi.json", routes.openapi)
    app.router.add_get("/objects", routes.list_objects)
    app.router.add_get("/objects/{object_id}", routes.get_object)
    app.router.add_get("/callbacks/{callback_id}", routes.get_callback)
    app.router.add_get("/dead-letters", routes.list_dead_letters)
    app.router.add_post("/dead-letters/retry", routes.retry_dead_letters)
    app.router.add_post("/dead-letters/discard", routes.discard_dead_letters)
    if status is not None:
        app.router.add_get("/status", status)
    if page is not None:
        app.router.add_routes(page)
    return app
