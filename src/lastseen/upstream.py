"""The upstream's rules: what an answer to ``GET /objects/{id}`` says, and which failures are
worth retrying. The HTTP exchange itself is http_client.py's; when to ask is lookups.py's.

Connection errors, timeouts, 5xx, 429 and bodies that do not parse are transient; any other
4xx, or an answer about a different id, is permanent.
"""

from __future__ import annotations

import msgspec

from lastseen.errors import LookupFailed
from lastseen.http_client import HttpError, UpstreamClient


class UpstreamObject(msgspec.Struct):
    id: int
    online: bool


_decoder = msgspec.json.Decoder(UpstreamObject)


class Upstream:
    """Asks the upstream about one object at a time."""

    def __init__(self, client: UpstreamClient) -> None:
        self.client = client

    async def online(self, object_id: int) -> bool:
        """Whether the object is online, or ``LookupFailed`` saying why there is no answer."""
        try:
            status, body = await self.client.get(f"/objects/{object_id}")
        except HttpError as exc:
            raise LookupFailed(object_id, exc.reason, exc.detail, permanent=False) from None
        if status >= 500 or status == 429:
            reason = "http_429" if status == 429 else "http_5xx"
            raise LookupFailed(object_id, reason, f"status {status}", permanent=False)
        if not 200 <= status < 300:
            detail = f"status {status}: {body[:200].decode(errors='replace')}"
            raise LookupFailed(object_id, "http_4xx", detail, permanent=True)
        try:
            answer = _decoder.decode(body)
        except msgspec.DecodeError as exc:
            detail = f"{exc}: {body[:200].decode(errors='replace')}"
            raise LookupFailed(object_id, "malformed_body", detail, permanent=False) from None
        if answer.id != object_id:
            detail = f"asked for {object_id}, the answer is about {answer.id}"
            raise LookupFailed(object_id, "wrong_id", detail, permanent=True)
        return answer.online
