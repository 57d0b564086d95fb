"""The upstream's rules: what an answer to ``GET /objects/{id}`` says, and which failures are
worth retrying. The HTTP exchange itself is http_client.py's; when to ask is lookups.py's.

Transient, worth retrying: connection errors, timeouts, 5xx, 429, 408, redirects (nothing here
follows them), bodies that do not parse and answers about another id. The last two usually mean
a connection that fell out of step, so that connection is not used again. Permanent: any other
4xx, the upstream's word that the request itself is wrong.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from lastseen.core.errors import LookupFailed
from lastseen.upstream.client import UpstreamClient
from lastseen.upstream.connection import Answer, HttpError


class UpstreamObject(msgspec.Struct):
    id: int
    online: bool


_decoder = msgspec.json.Decoder(UpstreamObject)


Done = Callable[[bool | LookupFailed], None]


class Upstream:
    """Asks the upstream about one object at a time."""

    def __init__(self, client: UpstreamClient) -> None:
        self.client = client

    def ask(self, object_id: int, done: Done) -> None:
        """Asks whether the object is online; ``done`` gets the answer, or ``LookupFailed``
        saying why there is none."""
        ask = _Ask(object_id, done)
        self.client.start(f"/objects/{object_id}", ask.in_step, ask.answered)


class _Ask:
    """One request's view of its answer."""

    __slots__ = ("answer", "done", "object_id")

    def __init__(self, object_id: int, done: Done) -> None:
        self.object_id = object_id
        self.done = done
        self.answer: UpstreamObject | None = None

    def in_step(self, status: int, body: bytes) -> bool:
        # Decoded here, once, so that a connection whose answer is not about this object is
        # retired before anyone else can use it.
        if not 200 <= status < 300:
            return True
        try:
            self.answer = _decoder.decode(body)
        except msgspec.DecodeError:
            return False
        return self.answer.id == self.object_id

    def answered(self, result: Answer | HttpError) -> None:
        self.done(self._outcome(result))

    def _outcome(self, result: Answer | HttpError) -> bool | LookupFailed:
        object_id = self.object_id
        if isinstance(result, HttpError):
            return LookupFailed(object_id, result.reason, result.detail, permanent=False)
        status, body = result
        if 200 <= status < 300:
            answer = self.answer
            if answer is None:
                detail = f"not an object: {body[:200].decode(errors='replace')}"
                return LookupFailed(object_id, "malformed_body", detail, permanent=False)
            if answer.id != object_id:
                detail = f"asked for {object_id}, the answer is about {answer.id}"
                return LookupFailed(object_id, "wrong_id", detail, permanent=False)
            return answer.online
        if status >= 500 or status in (408, 429) or 300 <= status < 400:
            return LookupFailed(object_id, _REASONS.get(status, f"http_{status // 100}xx"),
                                f"status {status}", permanent=False)  # fmt: skip
        detail = f"status {status}: {body[:200].decode(errors='replace')}"
        return LookupFailed(object_id, "http_4xx", detail, permanent=True)


_REASONS = {408: "http_408", 429: "http_429"}
