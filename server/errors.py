"""Errors the API answers, and their JSON shape: ``{"error": {"code", "message"}}``, or under
``/v2`` the Open Inference Protocol's ``{"error": "message"}`` (:func:`error_body` alone decides).

Handlers raise :class:`ApiError`; the app turns it into a response. The message is always
written here for the client, never an exception's text.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from catsdogs.preprocessing import ImageDecodeError

# A decode failure is the client's bytes, not the server: 413 for a decompression bomb, 415 for an
# image format the API does not take, else 422.
_DECODE_STATUS = {"too_many_pixels": 413, "unsupported_format": 415}


# Load refusals (503) say when to come back: the queue and the budgets drain within a second
# at this model's speed.
RETRY_SOON = {"Retry-After": "1"}


class ApiError(Exception):
    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers

    @classmethod
    def from_decode(cls, exc: ImageDecodeError) -> ApiError:
        return cls(_DECODE_STATUS.get(exc.code, 422), exc.code, exc.message)

    def body(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}


def shutting_down() -> ApiError:
    """A request the server will not finish because it is stopping."""
    return ApiError(503, "shutting_down", "the server is shutting down", RETRY_SOON)


def is_v2(path: str) -> bool:
    """Whether ``path`` is one of the V2 (Open Inference Protocol) routes."""
    return path == "/v2" or path.startswith("/v2/")


def error_body(path: str, code: str, message: str) -> dict[str, Any]:
    """An error's JSON body in the shape of ``path``'s protocol: the V2 routes answer
    ``{"error": "message"}`` (their protocol has no codes), every other route the API's shape."""
    if is_v2(path):
        return {"error": message}
    return {"error": {"code": code, "message": message}}


def error_response(
    path: str, status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The error as the route at ``path`` answers it (:func:`error_body`)."""
    return JSONResponse(error_body(path, code, message), status_code=status, headers=headers)
