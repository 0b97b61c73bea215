"""The page for people: ``GET /`` and its static files under ``/ui/``.

Plain HTML, CSS and JS from ``server/static`` (nothing from a CDN, no build step). Every answer of
the page carries a strict Content-Security-Policy (own origin only, no inline script or style) so
that even a text from the server that ends up in the page cannot run as code.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

STATIC_DIR = Path(__file__).resolve().with_name("static")

_DIRECTIVES = {
    "default-src": "'none'",
    "script-src": "'self'",
    "style-src": "'self'",
    "img-src": "'self' blob:",  # blob: for the preview of the chosen photo
    "connect-src": "'self'",
    "base-uri": "'none'",
    "form-action": "'none'",
    "frame-ancestors": "'none'",
}


def content_security_policy(**changes: str) -> str:
    """The page's policy; ``changes`` replace directives (``style_src`` for ``style-src``)."""
    directives = _DIRECTIVES | {k.replace("_", "-"): v for k, v in changes.items()}
    return "; ".join(f"{name} {sources}" for name, sources in directives.items())


CONTENT_SECURITY_POLICY = content_security_policy()
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",  # for browsers that ignore frame-ancestors
    # revalidate (ETag, Last-Modified): a new release's page never runs with old scripts
    "Cache-Control": "no-cache",
    "Accept-Ranges": "none",  # sent whole (_whole); Starlette said "bytes"
}


def _whole(scope: Scope) -> Scope:
    """``scope`` without Range headers: these files are small and always sent whole (RFC 9110
    lets a server ignore Range). Starlette answered a Range it could not serve with a plain-text
    400 or 416 of its own, without the page's security headers or the API's error shape."""
    headers = [(k, v) for k, v in scope["headers"] if k not in (b"range", b"if-range")]
    return {**scope, "headers": headers}


class WholeFile(FileResponse):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await super().__call__(_whole(scope), receive, send)


class WholeFiles(StaticFiles):
    """StaticFiles whose files are always sent whole (see ``_whole``), and say so."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await super().__call__(_whole(scope), receive, send)

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers["Accept-Ranges"] = "none"  # Starlette's "bytes" promised what is ignored
        return response


async def index(request: Request) -> Response:
    """The classifier page (HTML): drop a photo, see the answer, say whether it was right."""
    return WholeFile(STATIC_DIR / "index.html", media_type="text/html", headers=PAGE_HEADERS)


class PageFiles(WholeFiles):
    """Static files whose answers carry the page's security headers too."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(PAGE_HEADERS)
        return response


routes: list[BaseRoute] = [
    Route("/", index, methods=["GET"], name="ui_index"),
    # /ui redirects here (the mount's slash); the folder itself is the page too, not a 404
    Route("/ui/", index, methods=["GET"], include_in_schema=False),
    Mount("/ui", PageFiles(directory=STATIC_DIR), name="ui"),
]
