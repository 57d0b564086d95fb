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

import standardwebhooks
import standardwebhooks.webhooks

from lastseen.errors import ConfigError


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

    def verified_token(self, headers: Mapping[str, str]) -> str | None:
        """The request's bearer token if it is the intake token."""
        authorization = headers.get("Authorization")
        if self.intake_token is not None and token_matches(authorization, self.intake_token):
            return self.intake_token
        return None

    def signed(self, headers: Mapping[str, str]) -> bool:
        """Whether a request that passed ``refusal`` passed it by its signature."""
        return (
            self.webhook is not None
            and "webhook-signature" in headers
            and self.verified_token(headers) is None
        )

    def refusal(self, headers: Mapping[str, str], body: bytes) -> str | None:
        """None if the request may store a callback, else why not (for a 401)."""
        authorization = headers.get("Authorization")
        if self.verified_token(headers) is not None:
            return None
        if self.webhook is not None:
            if "webhook-signature" not in headers and bearer(authorization) is None:
                return "missing webhook-id, webhook-timestamp and webhook-signature headers"
            try:
                self.webhook.verify(body, {k.lower(): v for k, v in headers.items()})
            except standardwebhooks.webhooks.WebhookVerificationError as exc:
                return f"bad webhook signature: {exc}"
            return None
        return "missing or wrong bearer token"
