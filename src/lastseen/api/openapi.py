"""The OpenAPI 3.1 description of the HTTP API, served at ``GET /openapi.json``.

Its schemas are made by msgspec from the types that decode the requests (``CallbackBody``,
``DeadLetterRequest``) and from the types the handlers encode their answers from
(``core.replies``, and ``Status`` for the status page's data): one definition per reply. The
test suite checks that its paths and methods are exactly the application's routes, validates it
with
``openapi-spec-validator``, and fuzzes the running service with ``schemathesis`` against it.
"""

from __future__ import annotations

from typing import Any

import msgspec

from lastseen import __version__
from lastseen.admin.dead_letters import CURSOR_PATTERN, TEXT_PATTERN, TIME_SCHEMA, DeadLetterRequest
from lastseen.api.status import Status
from lastseen.core.parsers import INT64_MAX, INT64_MIN, PAGE_LIMIT
from lastseen.core.replies import (
    Accepted,
    CallbackStatus,
    DeadLettersPage,
    DiscardResult,
    Error,
    Health,
    ObjectsPage,
    Ready,
    RetryResult,
)
from lastseen.intake.ingest import IDEMPOTENCY_KEY_PATTERN, CallbackBody

_TYPES = (
    CallbackBody,
    DeadLetterRequest,
    Accepted,
    Error,
    Health,
    Ready,
    ObjectsPage,
    DeadLettersPage,
    CallbackStatus,
    RetryResult,
    DiscardResult,
    Status,
)
_REF = "#/components/schemas/{name}"
_INT64 = {"type": "integer", "minimum": INT64_MIN, "maximum": INT64_MAX}
_PUBLIC: list[dict[str, list[str]]] = [{}]
_ADMIN: list[dict[str, list[str]]] = [{}, {"adminToken": []}]


def _json(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": _REF.format(name=name)}}}


def _answer(description: str, schema: str = "Error") -> dict[str, Any]:
    return {"description": description, "content": _json(schema)}


def _errors(*codes: int) -> dict[str, Any]:
    what = {
        400: "bad input",
        401: "missing or wrong credentials",
        403: "sent by a page of another site",
        404: "not found",
        413: "too large",
        415: "not a JSON body (Content-Type: application/json)",
        422: "an Idempotency-Key used with another body",
        429: "over the client's rate",
        503: "the database is unavailable",
    }
    return {str(code): _answer(what[code]) for code in codes}


def document() -> dict[str, Any]:
    """The OpenAPI document."""
    _, components = msgspec.json.schema_components(_TYPES, ref_template=_REF)
    limit = {
        "name": "limit",
        "in": "query",
        "schema": {"type": "integer", "minimum": 1, "maximum": PAGE_LIMIT},
    }
    filters = [
        {"name": "reason", "in": "query", "schema": {"type": "string", "pattern": TEXT_PATTERN}},
        {"name": "callback_id", "in": "query", "schema": _INT64},
        {"name": "received_before", "in": "query", "schema": TIME_SCHEMA},
        {"name": "received_after", "in": "query", "schema": TIME_SCHEMA},
        limit,
    ]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "lastseen",
            "version": __version__,
            "description": "Durable callback service: keeps the online objects and when they "
            "were last seen.",
        },
        "components": {
            "schemas": components,
            "securitySchemes": {
                "intakeToken": {"type": "http", "scheme": "bearer"},
                "webhookSignature": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "webhook-signature",
                    "description": "Standard Webhooks: with webhook-id and webhook-timestamp",
                },
                "adminToken": {"type": "http", "scheme": "bearer"},
            },
        },
        "paths": {
            "/callback": {
                "post": {
                    "summary": "Store a callback; 202 once it is durable",
                    "security": [{}, {"intakeToken": []}, {"webhookSignature": []}],
                    "parameters": [
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "schema": {"type": "string", "pattern": IDEMPOTENCY_KEY_PATTERN},
                        }
                    ],
                    "requestBody": {"required": True, "content": _json("CallbackBody")},
                    "responses": {
                        "202": _answer("stored", "Accepted"),
                        **_errors(400, 401, 403, 413, 422, 429, 503),
                    },
                }
            },
            "/health": {
                "get": {
                    "summary": "Liveness",
                    "security": _PUBLIC,
                    "responses": {"200": _answer("alive", "Health")},
                }
            },
            "/ready": {
                "get": {
                    "summary": "Readiness, with why not, and degraded states",
                    "security": _PUBLIC,
                    "responses": {
                        "200": _answer("ready", "Ready"),
                        "503": _answer("not ready", "Ready"),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics of every process of this instance",
                    "security": _ADMIN,
                    "responses": {
                        "200": {
                            "description": "metrics",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                        **_errors(401),
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "security": _PUBLIC,
                    "responses": {
                        "200": {
                            "description": "the document",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
            "/status": {
                "get": {
                    "summary": "What this instance is doing: the status page's figures",
                    "security": _ADMIN,
                    "responses": {"200": _answer("the figures", "Status"), **_errors(401)},
                }
            },
            "/objects": {
                "get": {
                    "summary": "The online objects, in id order, a page at a time",
                    "security": _ADMIN,
                    "parameters": [
                        {"name": "after", "in": "query", "schema": _INT64},
                        limit,
                    ],
                    "responses": {
                        "200": _answer("a page", "ObjectsPage"),
                        **_errors(400, 401, 503),
                    },
                }
            },
            "/objects/{object_id}": {
                "get": {
                    "summary": "One online object",
                    "security": _ADMIN,
                    "parameters": [
                        {"name": "object_id", "in": "path", "required": True, "schema": _INT64}
                    ],
                    "responses": {
                        "200": {"description": "online", "content": _json("ObjectOut")},
                        **_errors(400, 401, 404, 503),
                    },
                }
            },
            "/callbacks/{callback_id}": {
                "get": {
                    "summary": "A stored callback: pending or done, its outcomes, dead letters",
                    "security": _ADMIN,
                    "parameters": [
                        {"name": "callback_id", "in": "path", "required": True, "schema": _INT64}
                    ],
                    "responses": {
                        "200": _answer("the callback", "CallbackStatus"),
                        **_errors(400, 401, 404, 503),
                    },
                }
            },
            "/dead-letters": {
                "get": {
                    "summary": "Dead letters that match a filter, newest received first, paged",
                    "security": _ADMIN,
                    "parameters": [
                        *filters,
                        {
                            "name": "after",
                            "in": "query",
                            "schema": {"type": "string", "pattern": f"{CURSOR_PATTERN}|^$"},
                        },
                    ],
                    "responses": {
                        "200": _answer("dead letters", "DeadLettersPage"),
                        **_errors(400, 401, 503),
                    },
                }
            },
            "/dead-letters/retry": {
                "post": {
                    "summary": "Queue the ids of matching dead letters again (or count them)",
                    "security": _ADMIN,
                    "requestBody": {"required": True, "content": _json("DeadLetterRequest")},
                    "responses": {
                        "200": _answer("done", "RetryResult"),
                        **_errors(400, 401, 403, 415, 503),
                    },
                }
            },
            "/dead-letters/discard": {
                "post": {
                    "summary": "Give up on matching dead letters (or count them)",
                    "security": _ADMIN,
                    "requestBody": {"required": True, "content": _json("DeadLetterRequest")},
                    "responses": {
                        "200": _answer("done", "DiscardResult"),
                        **_errors(400, 401, 403, 415, 503),
                    },
                }
            },
        },
    }
