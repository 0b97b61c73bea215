"""Exception handlers: an :class:`ApiError` or Starlette's 404/405 -> the API's error body.

V2 (Open Inference Protocol) paths answer in that protocol's shape (``server.errors.error_body``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from server.errors import ApiError, error_response

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


async def api_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    path = request.scope["path"]
    return error_response(path, exc.status, exc.code, exc.message, exc.headers)


async def http_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    message = {
        404: f"no endpoint at {request.url.path}",
        405: f"{request.method} is not allowed on {request.url.path}",
    }.get(exc.status_code, "the request could not be handled")
    return error_response(request.scope["path"], exc.status_code, code, message, exc.headers)


EXCEPTION_HANDLERS: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
    ApiError: api_error_handler,
    HTTPException: http_error_handler,
}
