"""The API's documentation: ``GET /openapi.json`` and a Swagger UI page at ``/docs``.

The spec is built once in the lifespan (``server.openapi``); the page's script and styles are
served from the ``swagger-ui-bundle`` package, so nothing is fetched from the internet.
"""

from __future__ import annotations

from pathlib import Path

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import Scope

from server.ui import PAGE_HEADERS, WholeFiles, content_security_policy

_DOCS_HTML = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Cats and dogs classifier: API</title>
<link rel="stylesheet" href="/docs/static/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="/docs/static/swagger-ui-bundle.js"></script>
<script src="/ui/docs-init.js"></script>
</body>
</html>
"""
# The classifier page's headers, its policy as loose as Swagger UI needs: inline styles (it sets
# them) and its icons as data: images. Scripts still come from this origin only (its start-up is
# a file, server/static/docs-init.js), and it is never inside another site's frame (its "Try it
# out" sends real requests).
DOCS_HEADERS = {k: v for k, v in PAGE_HEADERS.items() if k != "Cache-Control"} | {
    "Content-Security-Policy": content_security_policy(
        style_src="'self' 'unsafe-inline'", img_src="'self' data:"
    )
}
# What the page loads from the swagger-ui-bundle package; its other files (a stock index.html
# that loads a petstore spec from the internet, an OAuth redirect page, templates, source maps)
# are not served.
DOCS_ASSETS = frozenset({"swagger-ui-bundle.js", "swagger-ui.css"})


async def docs(request: Request) -> HTMLResponse:
    return HTMLResponse(_DOCS_HTML, headers=DOCS_HEADERS)


class DocsAssets(WholeFiles):
    """The package's files that the docs page loads, and no other."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        if path not in DOCS_ASSETS:
            raise HTTPException(status_code=404)
        response = await super().get_response(path, scope)
        response.headers.update(DOCS_HEADERS)
        return response


async def openapi_json(request: Request) -> Response:
    return Response(request.app.state.openapi_json, media_type="application/json")


def _swagger_ui_dir() -> Path:
    from swagger_ui_bundle import swagger_ui_path  # only a path: no Jinja2 import

    return Path(str(swagger_ui_path))


def routes() -> list[BaseRoute]:
    """The docs routes; a function, as the static folder is looked up when the app is built."""
    return [
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/docs", docs, methods=["GET"]),
        Mount("/docs/static", DocsAssets(directory=_swagger_ui_dir()), name="swagger_ui"),
    ]
