"""Guards every route shares: requests a browser was tricked into sending, and text that
PostgreSQL cannot hold.

- A state-changing request (anything but GET, HEAD, OPTIONS) that a browser marks as coming
  from another site (``Sec-Fetch-Site: cross-site`` or ``same-site``; without that header, an
  ``Origin`` that is not this server's) is refused with 403, with or without an admin token:
  with none (the loopback default), any page the operator visits could otherwise discard dead
  letters with a no-cors POST. Producers and the CLI send neither header; the status page sends
  ``same-origin``.
- The admin POST routes take only ``application/json``, which a no-cors request cannot send.
- A query parameter holding a NUL byte or text that is not UTF-8 is a 400, never a driver error.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from urllib.parse import unquote_to_bytes, urlsplit

from aiohttp import web

from lastseen.core.replies import error_response

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_JSON_ONLY = ("/dead-letters/",)


def _from_elsewhere(request: web.Request) -> bool:
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None:
        # The browser's own word; Origin is compared only without it, since a proxy that
        # rewrites Host would make the status page's own requests look foreign.
        return fetch_site.lower() in ("cross-site", "same-site")
    origin = request.headers.get("Origin")
    if origin is None:
        return False
    if origin == "null":
        return True
    host = urlsplit(origin).netloc.lower()
    own = {request.host.lower(), request.headers.get("X-Forwarded-Host", "").lower()}
    return host not in own


def _unfit_query(raw: str) -> bool:
    """Whether a query string, as sent (percent-encoded), holds a NUL byte or bytes that are
    not UTF-8 (which the parsed query would have turned into replacement characters)."""
    if not raw:
        return False
    data = unquote_to_bytes(raw.replace("+", " "))
    if b"\x00" in data:
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.method not in _SAFE_METHODS:
        if _from_elsewhere(request):
            detail = "a state-changing request from another site is not accepted"
            return error_response(403, "cross_site", detail)
        if request.path.startswith(_JSON_ONLY) and request.content_type != "application/json":
            detail = "this route takes a JSON body: Content-Type: application/json"
            return error_response(415, "unsupported_media_type", detail)
    if _unfit_query(request.rel_url.raw_query_string):
        detail = "the query holds a NUL byte or bytes that are not UTF-8"
        return error_response(400, "bad_query", detail)
    return await handler(request)
