"""POST /callback: validate, group-commit into the inbox, answer 202 with the stored id.

The reply comes only after the commit: a 202 is a promise that the callback survives a crash.
The body is parsed whatever its Content-Type says; producers are not all careful about it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, TypeVar

import msgspec
import structlog
from aiohttp import web

from lastseen.core.clock import SYSTEM, Clock
from lastseen.core.errors import (
    CommitTimeout,
    DatabaseError,
    DatabaseUnavailable,
    IdempotencyConflict,
    InvalidCallback,
    NotAccepting,
    RateLimited,
    SpoolFailed,
    SpoolFull,
    TooManyIds,
    Unauthorized,
)
from lastseen.core.parsers import INT64_MAX, INT64_MIN, integral_floats
from lastseen.core.replies import Accepted, error_response, json_response
from lastseen.intake.admission import ClientLimits, client_of, retry_after
from lastseen.intake.auth import IntakeAuth
from lastseen.telemetry.metrics import Metrics

log = structlog.get_logger("lastseen.intake.ingest")

# An idempotency key or a webhook-id: 1 to 255 printable ASCII characters, as the IETF draft's
# sf-string, not starting or ending with a space (HTTP strips those from a header's value).
# The OpenAPI document declares the same pattern.
IDEMPOTENCY_KEY_PATTERN = "^[\\x21-\\x7e]([\\x20-\\x7e]{0,253}[\\x21-\\x7e])?$"
_KEY = re.compile(IDEMPOTENCY_KEY_PATTERN)

ObjectId = Annotated[int, msgspec.Meta(ge=INT64_MIN, le=INT64_MAX)]


class CallbackBody(msgspec.Struct):
    """The request body; unknown fields are ignored."""

    object_ids: list[ObjectId]


_decoder = msgspec.json.Decoder(CallbackBody)
Body = TypeVar("Body", bound=CallbackBody)


def parse_callback(body: bytes) -> list[int]:
    """The ids of a callback body, or ``InvalidCallback`` saying what is wrong."""
    return decode_callback(body, _decoder).object_ids


def decode_callback(body: bytes, decoder: msgspec.json.Decoder[Body]) -> Body:
    """A callback body decoded by ``decoder``, or ``InvalidCallback`` saying what is wrong."""
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        message = str(exc)
        if "got `float`" in message and (integral := integral_floats(body)) is not None:
            return decode_callback(integral, decoder)
        if "at `$.object_ids[" in message:
            reason = "id_out_of_range" if "=" in message else "invalid_id"
        elif "at `$.object_ids`" in message:
            reason = "object_ids_not_a_list"
        elif "missing required field" in message:
            reason = "missing_object_ids"
        elif "at `$.received_at`" in message:
            reason = "bad_received_at"
        else:
            reason = "not_an_object"
        raise InvalidCallback(reason, message) from None
    except msgspec.DecodeError as exc:
        raise InvalidCallback("malformed_json", f"body is not valid JSON: {exc}") from None


class CallbackHandler:
    """The request handler; counts every outcome."""

    def __init__(
        self,
        submit: Callable[[float, Sequence[int]], Awaitable[int | str]],
        metrics: Metrics,
        *,
        max_body_bytes: int,
        max_ids: int,
        limits: ClientLimits | None = None,
        auth: IntakeAuth | None = None,
        submit_keyed: Callable[[float, Sequence[int], str], Awaitable[int | str]] | None = None,
        clock: Clock = SYSTEM,
    ) -> None:
        """``submit(received_at, ids)`` stores a callback durably and gives its id, or its
        spool key if it went to the spool: the group commit's (traced, where tracing is on).
        A callback's receive time is ``clock``'s (the instance's: PostgreSQL's time)."""
        self.submit = submit
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.max_ids = max_ids
        self.limits = limits
        self.auth = auth if auth is not None and auth.required else None
        self.submit_keyed = submit_keyed
        self.clock = clock

    async def handle(self, request: web.Request) -> web.Response:
        # The hot path: one coroutine, no per-request timers, duplicates left for the worker
        # (it removes them when it claims the callback, off the request path).
        started = time.perf_counter()
        received_at = self.clock.wall()
        try:
            body = await request.read()
            credential = None if self.auth is None else self.auth.check(request.headers, body)
            if self.limits is not None:
                # Only a verified credential names a client: random tokens must not each get
                # a fresh bucket.
                token = self.auth.intake_token if self.auth and credential == "token" else None
                client = client_of(token, request.remote)
                wait = self.limits.admit(client)
                if wait:
                    self.metrics.clients_limited.labels(self.limits.label(client)).inc()
                    raise RateLimited(self.limits.rate, wait)
            ids = parse_callback(body)
            if len(ids) > self.max_ids:
                # Each id costs a lookup and bookkeeping: one body must not hold a flood.
                raise TooManyIds(len(ids), self.max_ids)
            key = self._idempotency_key(request, signed=credential == "signature")
            if key is not None and self.submit_keyed is not None:
                callback_id = await self.submit_keyed(received_at, ids, key)
            else:
                callback_id = await self.submit(received_at, ids)
        except web.HTTPRequestEntityTooLarge:
            detail = f"body is larger than {self.max_body_bytes} bytes"
            response = self._reject(413, "body_too_large", detail)
        except RateLimited as exc:
            detail = f"more than {exc.rate:g} callbacks per second from this client"
            headers = {"Retry-After": retry_after(exc.wait)}
            response = self._reject(429, "rate_limited", detail, headers)
        except IdempotencyConflict as exc:
            response = self._reject(422, "idempotency_key_reused", str(exc))
        except Unauthorized as exc:
            response = self._reject(401, "unauthorized", str(exc), {"WWW-Authenticate": "Bearer"})
        except TooManyIds as exc:
            response = self._reject(413, exc.reason, exc.detail)
        except InvalidCallback as exc:
            response = self._reject(400, exc.reason, exc.detail)
        except (CommitTimeout, NotAccepting, SpoolFull) as exc:
            response = self._reject(503, "not_stored", f"not stored: {exc}", {"Retry-After": "1"})
        except SpoolFailed:
            detail = "not stored: the database is unavailable and the spool cannot be written"
            response = self._reject(503, "not_stored", detail, {"Retry-After": "1"})
        except DatabaseUnavailable as exc:
            log.warning("callback not stored", error=str(exc))
            detail = "not stored: the database is unavailable"
            response = self._reject(503, "not_stored", detail, {"Retry-After": "1"})
        except DatabaseError as exc:
            log.error("callback not stored", error=str(exc))
            response = self._reject(500, "database_error", "the callback was not stored")
        else:
            self.metrics.callbacks_received.inc()
            self.metrics.ids_received.inc(len(ids))
            if isinstance(callback_id, int):
                response = json_response(Accepted(callback_id, len(ids)), 202)
            else:  # in the spool: it gets its inbox id when the spool drains
                response = json_response(Accepted(None, len(ids), spooled=callback_id), 202)
        self.metrics.reply_seconds.observe(time.perf_counter() - started)
        return response

    def _idempotency_key(self, request: web.Request, *, signed: bool) -> str | None:
        """The webhook-id of a signed request (Standard Webhooks: the same message sent again
        keeps its id; it is signed, so no other header may replace it), else the request's
        Idempotency-Key; ``InvalidCallback`` if unusable."""
        headers = request.headers
        if signed:
            key, kind = headers.get("webhook-id"), "webhook"
        else:
            key, kind = headers.get("Idempotency-Key"), "key"
        if key is None:
            return None
        if not _KEY.fullmatch(key):
            detail = "Idempotency-Key: 1 to 255 printable ASCII characters"
            raise InvalidCallback("bad_idempotency_key", detail)
        return f"{kind}:{key}"  # a key and a webhook-id with the same text are not the same

    def _reject(
        self, status: int, reason: str, detail: str, headers: dict[str, str] | None = None
    ) -> web.Response:
        self.metrics.callbacks_rejected.labels(reason).inc()
        return error_response(status, reason, detail, headers)
