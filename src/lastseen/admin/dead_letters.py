"""Operations on dead letters, the same from the command line and from the admin routes: list
them by a filter, retry them (with a dry run), discard them.

A retry puts the ids back into the inbox as new callbacks with their original receive times.
Those received more than the TTL ago could change nothing in ``objects`` (their results would be
older than the TTL): they are skipped and counted, unless asked for.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import msgspec

from lastseen.core.errors import InvalidRequest
from lastseen.core.model import DeadLetter, DeadLetterFilter
from lastseen.core.parsers import (
    INT64_MAX,
    INT64_MIN,
    PAGE_LIMIT,
    integer,
    integral_floats,
    iso_or_epoch,
)
from lastseen.core.replies import DeadLetterOut, DiscardResult, RetryResult
from lastseen.storage.database import Database

FILTER_FIELDS = ("reason", "callback_id", "received_before", "received_after")

Int64 = Annotated[int, msgspec.Meta(ge=INT64_MIN, le=INT64_MAX)]

# What the filters accept, declared in the OpenAPI document and enforced here alike, so that
# whatever the document allows the server takes: a text PostgreSQL can hold (no NUL), and a
# time as an ISO 8601 date-time or as epoch seconds (at most 11 digits: year 5138, within
# what datetime and PostgreSQL hold).
TEXT_PATTERN = "^[^\\x00]*$"
EPOCH_PATTERN = "^[0-9]{1,11}(\\.[0-9]{1,6})?$"
LATEST_EPOCH = 99_999_999_999.999999
TIME_SCHEMA: dict[str, Any] = {
    "type": "string",
    "anyOf": [{"format": "date-time"}, {"pattern": EPOCH_PATTERN}],
}
# A page's end: when the last dead letter was recorded (epoch microseconds), its callback and
# its object. Every string of this form is a position, even one no page ends at.
CURSOR_PATTERN = "^[0-9]{1,16}/-?[0-9]{1,19}/-?[0-9]{1,19}$"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)

Text = Annotated[str, msgspec.Meta(pattern=TEXT_PATTERN)]
Time = Annotated[str, msgspec.Meta(extra_json_schema={"anyOf": TIME_SCHEMA["anyOf"]})]
Epoch = Annotated[float, msgspec.Meta(ge=0, le=LATEST_EPOCH)]


class DeadLetterRequest(msgspec.Struct, forbid_unknown_fields=True):
    """The body of ``POST /dead-letters/retry`` and ``/discard``: which dead letters (times
    in ISO 8601 or epoch seconds), how many at most, and whether only to count them."""

    reason: Text | None = None
    callback_id: Int64 | None = None
    received_before: Time | Epoch | None = None
    received_after: Time | Epoch | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=PAGE_LIMIT)] = PAGE_LIMIT
    dry_run: bool = False
    include_stale: bool = False


_request = msgspec.json.Decoder(DeadLetterRequest)


def decode_request(body: bytes) -> DeadLetterRequest:
    """The request of a dead-letter operation: a JSON object (``{}`` asks for the defaults:
    every dead letter, so an empty body is not taken for it)."""
    if not body.strip():
        raise InvalidRequest("malformed_json", "the body must be a JSON object ({} for all)")
    try:
        return _request.decode(body)
    except msgspec.ValidationError as exc:
        if "got `float`" in str(exc) and (integral := integral_floats(body)) is not None:
            return decode_request(integral)
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
    number = value if isinstance(value, int) else integer(str(value))
    if not INT64_MIN <= number <= INT64_MAX:
        raise ValueError("callback_id must fit 64 bits")
    return number


def _time(value: object) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, float | int):
        return datetime.fromtimestamp(value, UTC)
    return iso_or_epoch(str(value))


def summary(listed: int, matching: int, counts: dict[str, int], which: DeadLetterFilter) -> str:
    """What a listing showed, against what matched and what is stored: a filter that matches
    nothing says so, and names the reasons there are (a mistyped reason is not silent)."""
    stored = sum(counts.values())
    by_reason = ", ".join(f"{reason}: {n}" for reason, n in counts.items()) or "none"
    line = (
        f"{listed} listed, newest received first; {matching} match; {stored} stored ({by_reason})"
    )
    if which.reason is not None and which.reason not in counts:
        line += f"; no dead letter has the reason {which.reason!r}"
    return line


def as_json(letter: DeadLetter, created_at: datetime) -> DeadLetterOut:
    return DeadLetterOut(
        callback_id=letter.callback_id,
        object_id=letter.object_id,
        received_at=letter.received_at.isoformat(),
        reason=letter.reason,
        detail=letter.detail,
        attempts=letter.attempts,
        created_at=created_at.isoformat(),
    )


def cursor(letter: DeadLetter) -> str:
    """Where a page of dead letters ended, for ``after`` (opaque to callers)."""
    micros = (letter.received_at - _EPOCH) // _MICROSECOND
    return f"{micros}/{letter.callback_id}/{letter.object_id}"


def parse_cursor(value: str | None) -> tuple[datetime, int, int] | None:
    """The position a ``cursor`` names; None for the first page. Ids past 64 bits stand for
    the nearest that is not: the position is the same."""
    if value is None or value == "":
        return None
    if not re.fullmatch(CURSOR_PATTERN, value):
        raise InvalidRequest("bad_cursor", "after: a next_after from a page")
    micros, callback_id, object_id = (int(part) for part in value.split("/"))
    at = _EPOCH + micros * _MICROSECOND
    return at, _clamp(callback_id), _clamp(object_id)


def _clamp(number: int) -> int:
    return max(INT64_MIN, min(INT64_MAX, number))


async def retry(
    db: Database,
    which: DeadLetterFilter,
    *,
    ttl: float,
    include_stale: bool,
    limit: int,
    dry_run: bool,
) -> RetryResult:
    """Retries the dead letters that match (or counts them, with ``dry_run``)."""
    # By the clock receive times are in, whatever this host's says.
    cutoff = await db.now() - timedelta(seconds=ttl)
    chosen = which if include_stale else which.still_relevant(cutoff)
    skipped = 0 if include_stale else await db.count_matching_dead_letters(which.stale(cutoff))
    if dry_run:
        matching = await db.count_matching_dead_letters(chosen)
        return RetryResult(dry_run=True, would_retry=min(matching, limit), skipped_stale=skipped)
    created = await db.retry_dead_letters(chosen, limit)
    return RetryResult(dry_run=False, callbacks_created=created, skipped_stale=skipped)


async def discard(
    db: Database, which: DeadLetterFilter, *, limit: int, dry_run: bool
) -> DiscardResult:
    """Deletes the dead letters that match (or counts them, with ``dry_run``)."""
    if dry_run:
        matching = await db.count_matching_dead_letters(which)
        return DiscardResult(dry_run=True, would_discard=min(matching, limit))
    return DiscardResult(dry_run=False, discarded=await db.discard_dead_letters(which, limit))
