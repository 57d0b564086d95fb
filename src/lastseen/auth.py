"""Who may write and who may read (all off by default: the reference producer sends no
credentials).

- Intake (``POST /callback``): a Standard Webhooks signature (``LASTSEEN_WEBHOOK_SECRET``,
  verified by the ``standardwebhooks`` package, 5 minutes of tolerance), or a bearer token
  (``LASTSEEN_INTAKE_TOKEN``). With both set, either is enough.
- Admin (``GET /objects``, ``GET /callbacks/{id}``, ``/metrics``, the dead-letter routes,
  ``/openapi.json`` stays open): a bearer token (``LASTSEEN_ADMIN_TOKEN``). ``/health`` and
  ``/ready`` never need one: probes carry no secrets.

Tokens are compared in constant time. No secret ever reaches a log line, an error or a metric.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Literal

import standardwebhooks
import standardwebhooks.webhooks

from lastseen.errors import ConfigError, Unauthorized

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


class IntakeAuth:
    """The check of ``POST /callback``; ``None`` settings are not required."""

    def __init__(self, webhook_secret: str | None, intake_token: str | None) -> None:
        self.intake_token = intake_token
        self.webhook: standardwebhooks.Webhook | None = None
        if webhook_secret is not None:
            try:
                self.webhook = standardwebhooks.Webhook(webhook_secret)
            except Exception as exc:  # the package raises whatever base64 raises
                raise ConfigError("LASTSEEN_WEBHOOK_SECRET", "not a webhook secret") from exc

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
            try:
                self.webhook.verify(body, {k.lower(): v for k, v in headers.items()})
            except standardwebhooks.webhooks.WebhookVerificationError as exc:
                raise Unauthorized(f"bad webhook signature: {exc}") from None
            return "signature"
        raise Unauthorized("missing or wrong bearer token")
