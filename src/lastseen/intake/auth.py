"""Who may write and who may read (all off by default: the reference producer sends no
credentials).

- Intake (``POST /callback``): a Standard Webhooks signature (``LASTSEEN_WEBHOOK_SECRET``,
  5 minutes of tolerance), or a bearer token (``LASTSEEN_INTAKE_TOKEN``). With both set, either
  is enough.
- Admin (``GET /objects``, ``GET /callbacks/{id}``, ``/metrics``, the dead-letter routes,
  ``/openapi.json`` stays open): a bearer token (``LASTSEEN_ADMIN_TOKEN``). ``/health`` and
  ``/ready`` never need one: probes carry no secrets.

Tokens are compared in constant time. No secret ever reaches a log line, an error or a metric.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import math
import time
from collections.abc import Callable, Mapping
from typing import Literal

from lastseen.core.errors import ConfigError, Unauthorized

# What let a request in: the intake token, or a Standard Webhooks signature.
Credential = Literal["token", "signature"]


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header."""
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return None


def token_matches(authorization: str | None, token: str) -> bool:
    """Whether the header carries ``token`` (in constant time)."""
    given = bearer(authorization)
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


class WebhookVerifier:
    """The Standard Webhooks check of a signed request: an HMAC-SHA256 of
    ``{webhook-id}.{webhook-timestamp}.{body}`` under the secret, among the ``v1,`` signatures
    of ``webhook-signature`` (several during a key rotation), sent within ``tolerance``
    seconds of ``clock()``.

    Our own, on the hot path: the ``standardwebhooks`` package's ``verify`` costs 10 µs per
    200-id body (it decodes the body to text and back, builds datetimes and an HMAC object),
    this 4.5 µs (docs/explanation/design-decisions.md); the tests check it against the
    package's signatures.
    """

    def __init__(
        self, secret: str, *, tolerance: float = 300.0, clock: Callable[[], float] = time.time
    ) -> None:
        try:
            # As the package reads it: base64 after the prefix, its padding optional.
            self.key = base64.b64decode(secret.removeprefix("whsec_") + "==")
        except (binascii.Error, ValueError):
            self.key = b""
        if not self.key:
            raise ConfigError("LASTSEEN_WEBHOOK_SECRET", "not a webhook secret")
        self.tolerance = tolerance
        self.clock = clock

    def verify(self, body: bytes, headers: Mapping[str, str]) -> None:
        """Returns if the request is signed with the secret; else ``Unauthorized`` saying why."""
        msg_id = headers.get("webhook-id")
        stamp = headers.get("webhook-timestamp")
        signatures = headers.get("webhook-signature")
        if not (msg_id and stamp and signatures):
            raise Unauthorized("bad webhook signature: missing webhook-id or webhook-timestamp")
        try:
            sent = math.floor(float(stamp))
        except (ValueError, OverflowError):
            raise Unauthorized("bad webhook signature: the timestamp is not a number") from None
        now = self.clock()
        if sent < now - self.tolerance:
            raise Unauthorized("bad webhook signature: the timestamp is too old")
        if sent > now + self.tolerance:
            raise Unauthorized("bad webhook signature: the timestamp is too new")
        # Header text holds the bytes as sent (aiohttp decodes them with surrogateescape).
        signed = b"%s.%d.%s" % (msg_id.encode("utf-8", "surrogateescape"), sent, body)
        expected = base64.b64encode(hmac.digest(self.key, signed, "sha256"))
        for given in signatures.split(" "):
            version, _, value = given.partition(",")
            if version == "v1" and hmac.compare_digest(
                value.encode("utf-8", "surrogateescape"), expected
            ):
                return
        raise Unauthorized("bad webhook signature: no signature matches")


class IntakeAuth:
    """The check of ``POST /callback``; ``None`` settings are not required."""

    def __init__(self, webhook_secret: str | None, intake_token: str | None) -> None:
        self.intake_token = intake_token
        self.webhook = None if webhook_secret is None else WebhookVerifier(webhook_secret)

    @property
    def required(self) -> bool:
        return self.webhook is not None or self.intake_token is not None

    def check(self, headers: Mapping[str, str], body: bytes) -> Credential:
        """Which credential lets the request store a callback; ``Unauthorized`` (for a 401)
        saying why none does."""
        authorization = headers.get("Authorization")
        if self.intake_token is not None and token_matches(authorization, self.intake_token):
            return "token"
        if self.webhook is not None:
            if "webhook-signature" not in headers and bearer(authorization) is None:
                raise Unauthorized(
                    "missing webhook-id, webhook-timestamp and webhook-signature headers"
                )
            self.webhook.verify(body, headers)
            return "signature"
        raise Unauthorized("missing or wrong bearer token")
