"""The JSON replies of every route, errors in one shape: the types the handlers encode and the
OpenAPI document describes (api/openapi.py), so that what is sent is what is documented."""

from __future__ import annotations

import msgspec
from aiohttp import web


class Accepted(msgspec.Struct, omit_defaults=True):
    """A stored callback: its inbox id, or (while PostgreSQL is away) null and its spool key."""

    callback_id: int | None
    ids: int
    spooled: str | None = None


class Error(msgspec.Struct):
    """Every error of every route."""

    error: str
    detail: str


class Health(msgspec.Struct):
    status: str


class Ready(msgspec.Struct, omit_defaults=True):
    ready: bool
    reason: str | None = None
    degraded: str | None = None
    upstream: str | None = None


class ObjectOut(msgspec.Struct):
    id: int
    last_seen: str


class ObjectsPage(msgspec.Struct):
    objects: list[ObjectOut]
    next_after: int | None


class DeadLetterOut(msgspec.Struct):
    callback_id: int
    object_id: int
    received_at: str
    reason: str
    detail: str
    attempts: int
    created_at: str


class DeadLettersPage(msgspec.Struct):
    dead_letters: list[DeadLetterOut]
    matching: int  # how many match the filter, over every page
    by_reason: dict[str, int]  # every dead letter stored, by reason: not only those that match
    next_after: str | None


class Outcomes(msgspec.Struct):
    dead_lettered: int
    resolved: int | None


class CallbackStatus(msgspec.Struct):
    callback_id: int
    received_at: str
    status: str
    done_at: str | None
    ids: int
    distinct_ids: int
    claims: int
    outcomes: Outcomes
    dead_letters: list[DeadLetterOut]


class RetryResult(msgspec.Struct, omit_defaults=True):
    dry_run: bool
    skipped_stale: int
    would_retry: int | None = None
    callbacks_created: list[int] | None = None


class DiscardResult(msgspec.Struct, omit_defaults=True):
    dry_run: bool
    would_discard: int | None = None
    discarded: int | None = None


def json_response(
    data: msgspec.Struct, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=msgspec.json.encode(data),
        content_type="application/json",
        headers=headers,
    )


def error_response(
    status: int, error: str, detail: str, headers: dict[str, str] | None = None
) -> web.Response:
    """The one shape of every error: ``{"error": code, "detail": text}``."""
    return json_response(Error(error, detail), status, headers)
