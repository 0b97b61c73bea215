"""HTTP routes of the monitor: POST /feedback, GET /monitoring/summary, GET /monitoring/drift."""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from server.auth import locations_shown, require_token
from server.errors import ApiError
from server.ids import is_valid_id
from server.monitor import Monitor
from server.settings import Settings
from server.store import (
    AmbiguousRequestIdError,
    FeedbackResult,
    StoreTimeoutError,
    StoreUnavailableError,
)
from server.uploads import check_identity_encoding

__all__ = ["routes"]

MAX_FEEDBACK_BYTES = 16 * 1024

# the outcome label of feedback_requests_total for each refusal
_OUTCOMES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "unknown_id",
    408: "timeout",
    409: "ambiguous",
    413: "too_large",
    415: "bad_request",
    422: "invalid",
    503: "unavailable",
}
_ID_RULE = "1 to 128 characters among A-Z a-z 0-9 . _ : -"


@dataclass(frozen=True)
class FeedbackRequest:
    true_label: str
    prediction_id: str | None
    request_id: str | None


async def _read_limited(request: Request, limit: int) -> bytes | None:
    """The body, or None as soon as it grows past ``limit`` (never buffered whole)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_json_body(request: Request, settings: Settings) -> bytes:
    """The body of a JSON request: 415 for another type, 413 too large, 408 too slow."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        # a browser page can post text/plain or a form cross-site without asking; not JSON
        raise ApiError(415, "unsupported_media_type", "send the feedback as application/json")
    check_identity_encoding(request)
    too_large = ApiError(
        413, "payload_too_large", f"feedback bodies are at most {MAX_FEEDBACK_BYTES} bytes"
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_FEEDBACK_BYTES:
        raise too_large
    try:
        async with asyncio.timeout(settings.body_timeout_s):
            body = await _read_limited(request, MAX_FEEDBACK_BYTES)
    except TimeoutError:
        raise ApiError(
            408, "request_timeout", f"the body did not arrive within {settings.body_timeout_s:g} s"
        ) from None
    if body is None:
        raise too_large
    return body


def _parse_feedback(body: bytes, class_names: tuple[str, ...]) -> FeedbackRequest:
    """The JSON body -> which prediction and its true label; ids follow the X-Request-ID rule."""
    try:
        payload = json.loads(body)
    # JSONDecodeError and an integer past Python's digit limit are ValueErrors; deep nesting
    # is a RecursionError: all the client's mistake
    except (ValueError, RecursionError, UnicodeDecodeError):
        raise ApiError(
            400, "invalid_json", 'the body must be JSON: {"prediction_id": "...", "label": "..."}'
        ) from None
    if not isinstance(payload, dict):
        raise ApiError(400, "invalid_json", "the body must be a JSON object")
    prediction_id = payload.get("prediction_id")
    request_id = payload.get("request_id")
    if (prediction_id is None) == (request_id is None):
        raise ApiError(
            422,
            "missing_id",
            'name the prediction by exactly one of "prediction_id" (preferred) or "request_id"',
        )
    for name, value in (("prediction_id", prediction_id), ("request_id", request_id)):
        if value is not None and not is_valid_id(value):
            raise ApiError(422, f"invalid_{name}", f"{name} must be {_ID_RULE}")
    label = payload.get("label")
    if not isinstance(label, str) or label not in class_names:
        names = ", ".join(class_names)
        raise ApiError(422, "invalid_label", f"label must be one of the model's classes: {names}")
    return FeedbackRequest(label, prediction_id, request_id)


async def _store_feedback(monitor: Monitor, item: FeedbackRequest) -> FeedbackResult:
    retry = {"Retry-After": str(max(1, math.ceil(monitor.store_timeout_s)))}
    try:
        result = await monitor.add_feedback(
            item.true_label, prediction_id=item.prediction_id, request_id=item.request_id
        )
    except StoreTimeoutError:
        raise ApiError(
            503, "store_timeout", "the prediction log did not answer in time; retry", retry
        ) from None
    except StoreUnavailableError:
        raise ApiError(
            503, "store_unavailable", "the prediction log cannot store feedback now", retry
        ) from None
    except AmbiguousRequestIdError:
        raise ApiError(
            409,
            "ambiguous_request_id",
            "several logged photos share this request_id (a batch, or an X-Request-ID reused "
            "for another photo); "
            "send the prediction_id of the image instead",
        ) from None
    if result is None:
        if item.prediction_id is not None:
            raise ApiError(404, "unknown_prediction_id", "no prediction with this id is logged")
        raise ApiError(404, "unknown_request_id", "no prediction with this request_id is logged")
    return result


async def feedback_endpoint(request: Request) -> Response:
    """POST /feedback {"prediction_id": "...", "label": "dog"}: the true label of a prediction.

    ``{"request_id": ...}`` also works while that request logged exactly one image (409
    otherwise). JSON only; with ``API_TOKEN`` set, it needs ``Authorization: Bearer <token>``.
    """
    monitor: Monitor = request.app.state.monitor
    settings: Settings = request.app.state.settings
    try:
        require_token(request, settings)
        body = await _read_json_body(request, settings)
        item = _parse_feedback(body, monitor.class_names)
        result = await _store_feedback(monitor, item)
    except ApiError as exc:
        monitor.feedback_received.labels(_OUTCOMES.get(exc.status, "error")).inc()
        raise
    monitor.feedback_received.labels("stored").inc()
    correct = result.true_label == result.predicted_label
    if result.previous_label is None:
        result_label = "correct" if correct else "wrong"
        monitor.feedback_labels.labels(result.model_version, result_label).inc()
    return JSONResponse(
        {
            "prediction_id": result.prediction_id,
            "request_id": result.request_id,
            "label": result.true_label,
            "predicted_label": result.predicted_label,
            "correct": correct,
            "model_version": result.model_version,
        },
        status_code=201,
    )


async def summary_endpoint(request: Request) -> JSONResponse:
    """GET /monitoring/summary: live accuracy, confusion and distributions per model version."""
    monitor: Monitor = request.app.state.monitor
    shown, headers = locations_shown(request, request.app.state.settings)
    return JSONResponse(monitor.summary(shown), headers=headers)


async def drift_endpoint(request: Request) -> JSONResponse:
    """GET /monitoring/drift: PSI and KS of recent traffic against the reference statistics."""
    monitor: Monitor = request.app.state.monitor
    return JSONResponse(await run_in_threadpool(monitor.drift))


routes: list[BaseRoute] = [
    Route("/feedback", feedback_endpoint, methods=["POST"], name="feedback"),
    Route("/monitoring/summary", summary_endpoint, methods=["GET"], name="monitoring_summary"),
    Route("/monitoring/drift", drift_endpoint, methods=["GET"], name="monitoring_drift"),
]
