"""The HTTP application: its routes (routes.py, and ``POST /callback`` from ingest.py), the
admin token's guard, and the errors.

Every error, from any route, is a JSON body ``{"error": ..., "detail": ...}``.
"""

from __future__ import annotations

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from lastseen.api.routes import Routes, noop_callback
from lastseen.core.errors import DatabaseError, InvalidRequest
from lastseen.core.replies import error_response
from lastseen.intake.auth import token_matches
from lastseen.intake.guards import guard

log = structlog.get_logger("lastseen.api.app")


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
        app.router.add_post("/noop", noop_callback)
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
