"""Operations on dead letters, the same from the command line and from the admin routes: list
them by a filter, retry them (with a dry run), discard them.

A retry puts the ids back into the inbox as new callbacks with their original receive times.
Those received more than the TTL ago could change nothing in ``objects`` (their results would be
older than the TTL): they are skipped and counted, unless asked for.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated

import msgspec

from lastseen.errors import InvalidRequest
from lastseen.model import DeadLetter, DeadLetterFilter
from lastseen.storage.database import Database

FILTER_FIELDS = ("reason", "callback_id", "received_before", "received_after")
PAGE_LIMIT = 1000

Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class DeadLetterRequest(msgspec.Struct, forbid_unknown_fields=True):
    """The body of ``POST /dead-letters/retry`` and ``/discard``: which dead letters (times
    in ISO 8601 or epoch seconds), how many at most, and whether only to count them."""

    reason: str | None = None
    callback_id: Int64 | None = None
    received_before: str | float | None = None
    received_after: str | float | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=PAGE_LIMIT)] = PAGE_LIMIT
    dry_run: bool = False
    include_stale: bool = False


_request = msgspec.json.Decoder(DeadLetterRequest)


def decode_request(body: bytes) -> DeadLetterRequest:
    """The request of a dead-letter operation (an empty body asks for the defaults)."""
    if not body.strip():
        return DeadLetterRequest()
    try:
        return _request.decode(body)
    except msgspec.ValidationError as exc:
        raise InvalidRequest("bad_request", str(exc)) from None
    except msgspec.DecodeError:
        raise InvalidRequest("malformed_json", "the body is not valid JSON") from None


def parse_filter(values: Mapping[str, object]) -> DeadLetterFilter:
    """A filter from a query string or a request (times in ISO 8601 or epoch seconds); other
    keys are ignored."""
    reason = values.get("reason")
    callback = values.get("callback_id")
    try:
        return DeadLetterFilter(
            reason=None if reason is None else _text(str(reason)),
            callback_id=None if callback is None else _int64(callback),
            received_before=_time(values.get("received_before")),
            received_after=_time(values.get("received_after")),
        )
    except (TypeError, ValueError) as exc:
        raise InvalidRequest("bad_filter", f"bad dead-letter filter: {exc}") from None


def _text(value: str) -> str:
    # PostgreSQL's text holds no NUL and only what UTF-8 encodes: refused here, as bad input,
    # rather than by the driver, as a database error.
    if "\x00" in value:
        raise ValueError("reason: a NUL byte")
    value.encode("utf-8")  # UnicodeEncodeError (a ValueError) for a lone surrogate
    return value


def _int64(value: object) -> int:
    number = int(str(value))
    if not -(2**63) <= number < 2**63:
        raise ValueError("callback_id must fit 64 bits")
    return number


def _time(value: object) -> datetime | None:
    if value is None:
        return None
    text = str(value)
    try:
        return datetime.fromtimestamp(float(text), UTC)
    except (ValueError, OverflowError, OSError):
        parsed = datetime.fromisoformat(text)
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def as_json(letter: DeadLetter, created_at: datetime) -> dict[str, object]:
    return {
        "callback_id": letter.callback_id,
        "object_id": letter.object_id,
        "received_at": letter.received_at.isoformat(),
        "reason": letter.reason,
        "detail": letter.detail,
        "attempts": letter.attempts,
        "created_at": created_at.isoformat(),
    }


def cursor(letter: DeadLetter, created_at: datetime) -> str:
    """Where a page of dead letters ended, for ``after`` (opaque to callers)."""
    return f"{created_at.isoformat()}/{letter.callback_id}/{letter.object_id}"


def parse_cursor(value: str | None) -> tuple[datetime, int, int] | None:
    """The position a ``cursor`` names; None for the first page."""
    if value is None or value == "":
        return None
    try:
        created, callback_id, object_id = value.rsplit("/", 2)
        at, callback, letter = datetime.fromisoformat(created), int(callback_id), int(object_id)
    except ValueError:
        raise InvalidRequest("bad_cursor", "after: a next_after from a page") from None
    if at.tzinfo is None or not all(-(2**63) <= n < 2**63 for n in (callback, letter)):
        raise InvalidRequest("bad_cursor", "after: a next_after from a page")
    return at, callback, letter


async def retry(
    db: Database,
    which: DeadLetterFilter,
    *,
    ttl: float,
    include_stale: bool,
    limit: int,
    dry_run: bool,
) -> dict[str, object]:
    """Retries the dead letters that match (or counts them, with ``dry_run``)."""
    cutoff = datetime.fromtimestamp(time.time() - ttl, UTC)
    chosen = which if include_stale else which.still_relevant(cutoff)
    skipped = 0 if include_stale else await db.count_matching_dead_letters(which.stale(cutoff))
    if dry_run:
        matching = await db.count_matching_dead_letters(chosen)
        return {"dry_run": True, "would_retry": min(matching, limit), "skipped_stale": skipped}
    created = await db.retry_dead_letters(chosen, limit)
    return {"dry_run": False, "callbacks_created": created, "skipped_stale": skipped}


async def discard(
    db: Database, which: DeadLetterFilter, *, limit: int, dry_run: bool
) -> dict[str, object]:
    """Deletes the dead letters that match (or counts them, with ``dry_run``)."""
    if dry_run:
        matching = await db.count_matching_dead_letters(which)
        return {"dry_run": True, "would_discard": min(matching, limit)}
    return {"dry_run": False, "discarded": await db.discard_dead_letters(which, limit)}
