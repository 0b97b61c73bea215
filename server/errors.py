"""Errors the API answers, and their one JSON shape: ``{"error": {"code", "message"}}``.

Handlers raise :class:`ApiError`; the app turns it into a response. The message is always
written here for the client, never an exception's text.
"""

from __future__ import annotations

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


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


def v2_error_response(status: int, message: str, headers: dict[str, str] | None = None):
    """The Open Inference Protocol's own error shape."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)
