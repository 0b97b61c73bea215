"""The API's documentation: ``GET /openapi.json`` and a Swagger UI page at ``/docs``.

The spec is built once in the lifespan (``server.openapi``); the page's script and styles are
served from the ``swagger-ui-bundle`` package, so nothing is fetched from the internet.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from server.ui import WholeFiles

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
<script>
window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});
</script>
</body>
</html>
"""


async def docs(request: Request) -> HTMLResponse:
    return HTMLResponse(_DOCS_HTML)


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
        Mount("/docs/static", WholeFiles(directory=_swagger_ui_dir()), name="swagger_ui"),
    ]
