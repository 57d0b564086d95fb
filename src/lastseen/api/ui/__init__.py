"""The status page: one HTML page, a stylesheet and a script, shipped as package data and
served by the instance itself at ``/ui/`` (``/`` leads there).

The page holds no figures of its own: its script reads ``GET /status`` every two seconds, and
the dead-letter and object routes when asked. Every address it uses is relative to the page,
so the page works unchanged behind a reverse proxy that serves the instance under a path
prefix. The files themselves need no token (they hold nothing but code); the routes they read
ask for the admin token when one is set, and the script then asks the operator for it once.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

MODES = ("off", "read", "full")

_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
_ASSETS = ("index.html", "app.js", "app.css")
# Only the page's own files and its own routes: a dead letter's text, shown on the page, can
# never load or run anything.
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class Page:
    """The page's files, read once, and the routes that serve them."""

    def __init__(self) -> None:
        folder = resources.files(__name__)
        self._files = {name: (folder / name).read_bytes() for name in _ASSETS}

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/", self._to_page, name="ui-root"),
            web.get("/ui", self._to_page, name="ui-bare"),
            web.get("/ui/", self._index, name="ui"),
            web.get("/ui/{asset}", self._asset, name="ui-asset"),
        ]

    async def _to_page(self, request: web.Request) -> web.Response:
        # Relative, so that a proxy's path prefix is kept: from /p/ and from /p/ui alike.
        raise web.HTTPFound("ui/")

    async def _index(self, request: web.Request) -> web.Response:
        return self._serve("index.html")

    async def _asset(self, request: web.Request) -> web.Response:
        name = request.match_info["asset"]
        if name not in self._files:
            raise web.HTTPNotFound()
        return self._serve(name)

    def _serve(self, name: str) -> web.Response:
        content_type = _TYPES[name[name.rindex(".") :]]
        return web.Response(
            body=self._files[name],
            content_type=content_type,
            charset="utf-8",
            headers=_HEADERS,
        )
