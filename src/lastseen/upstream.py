"""The upstream's rules: what an answer to ``GET /objects/{id}`` says, and which failures are
worth retrying. The HTTP exchange itself is http_client.py's; when to ask is lookups.py's.

Transient, worth retrying: connection errors, timeouts, 5xx, 429, 408, redirects (nothing here
follows them), bodies that do not parse and answers about another id. The last two usually mean
a connection that fell out of step, so that connection is not used again. Permanent: any other
4xx, the upstream's word that the request itself is wrong.
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
        answer: UpstreamObject | None = None

        def in_step(status: int, body: bytes) -> bool:
            # Decoded here, once, so that a connection whose answer is not about this object
            # is retired before anyone else can use it.
            nonlocal answer
            if not 200 <= status < 300:
                return True
            try:
                answer = _decoder.decode(body)
            except msgspec.DecodeError:
                return False
            return answer.id == object_id

        try:
            status, body = await self.client.get(f"/objects/{object_id}", in_step)
        except HttpError as exc:
            raise LookupFailed(object_id, exc.reason, exc.detail, permanent=False) from None
        if 200 <= status < 300:
            if answer is None:
                detail = f"not an object: {body[:200].decode(errors='replace')}"
                raise LookupFailed(object_id, "malformed_body", detail, permanent=False)
            if answer.id != object_id:
                detail = f"asked for {object_id}, the answer is about {answer.id}"
                raise LookupFailed(object_id, "wrong_id", detail, permanent=False)
            return answer.online
        if status >= 500 or status in (408, 429) or 300 <= status < 400:
            raise LookupFailed(object_id, _REASONS.get(status, f"http_{status // 100}xx"),
                               f"status {status}", permanent=False)  # fmt: skip
        detail = f"status {status}: {body[:200].decode(errors='replace')}"
        raise LookupFailed(object_id, "http_4xx", detail, permanent=True)


_REASONS = {408: "http_408", 429: "http_429"}
