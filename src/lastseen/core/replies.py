"""The JSON replies of every route, errors in one shape."""

from __future__ import annotations

import msgspec
from aiohttp import web


def json_response(
    data: object, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=msgspec.json.encode(data),
        content_type="application/json",
        headers=headers,
    )


def error_response(
    status: int, error: str, detail: str, headers: dict[str, str] | None = None
) -> web.Response:
    """The one shape of every error: ``{"error": code, "detail": text}``."""
    return json_response({"error": error, "detail": detail}, status, headers)
