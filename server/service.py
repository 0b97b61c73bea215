"""The one request path every prediction route shares (the data plane).

``Predictor.run`` does, in this order and in this one place: read the body within its size
limit, its deadline and the server-wide byte budget; admit the images into the queue (only once
the body is in, so slow clients never hold queue slots); decode and classify them off the event
loop (a bad image fails only its own slot); give each good image a unique ``prediction_id``,
count it and log it; answer. The REST and V2 routes only translate their wire formats into
:class:`Upload` lists and the :class:`ImageResult` list back out.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.requests import ClientDisconnect, Request

from catsdogs.contract import ModelContract
from catsdogs.preprocessing import ImageDecodeError, PreprocessSpec, preprocess_bytes_info
from server.auth import require_token
from server.errors import RETRY_SOON, ApiError, shutting_down
from server.ids import new_id
from server.inference import (
    Batcher,
    ModelStoppedError,
    Outcome,
    QueueFullError,
    RequestAbandonedError,
    Ticket,
)
from server.limits import Budget, OverBudgetError, Reservation
from server.metrics import ServerMetrics
from server.middleware import ON_CLIENT_GONE, route_template
from server.monitor import Monitor, PredictionEvent
from server.settings import Settings
from server.uploads import Body, as_bytes, overloaded

log = logging.getLogger("server.service")


_UINT32_SUM_MAX_VALUES = (2**32 - 1) // 255  # uint8 values whose sum cannot overflow 32 bits


def brightness(array: np.ndarray) -> float:
    """Mean value of a uint8 model input: exactly ``array.mean()``, in about a third of the time
    (it runs before every model run) where the integer sum fits in 32 bits."""
    dtype = np.uint32 if array.size <= _UINT32_SUM_MAX_VALUES else np.uint64
    return int(array.sum(dtype=dtype)) / array.size


@dataclass(frozen=True)
class Prepared:
    """One decoded image, ready for the model, with what monitoring needs about its source."""

    array: np.ndarray  # uint8 (H, W, 3)
    width: int
    height: int
    sha256: str
    brightness: float
    decode_s: float = 0.0
    preprocess_s: float = 0.0


def prepare(
    blob: bytes | Body,
    *,
    spec: PreprocessSpec,
    max_pixels: int,
    pixels: Budget | None = None,
    wait_s: float = 0.0,
) -> Prepared:
    """Blocking: decode + preprocess + fingerprint. Runs on the batcher's threads.

    ``pixels``: the server-wide budget of pixels being decoded; an image that does not fit
    waits up to ``wait_s`` seconds for other decodes to release theirs (``MAX_PIXELS_WAIT_MS``),
    then raises :class:`OverBudgetError` before its pixels are decoded.
    """
    # Waiting here cannot deadlock: the pixels are held only inside preprocess_bytes_info's
    # decode and conversion of this one image, which reserves nothing else and waits for
    # nothing, on a thread that is running it (a decode thread, or a batch's own thread in
    # parallel mode or for a lone image). So every holder releases within one decode, and the
    # settings keep MAX_INFLIGHT_PIXELS >= MAX_PIXELS, so any image fits an empty budget.
    data = as_bytes(blob)
    reserve = functools.partial(pixels.hold, wait_s=wait_s) if pixels is not None else None
    info = preprocess_bytes_info(data, spec, max_pixels=max_pixels, reserve=reserve)
    return Prepared(
        info.array,
        info.width,
        info.height,
        hashlib.sha256(data).hexdigest(),
        brightness(info.array),
        info.decode_s,
        info.preprocess_s,
    )


def view_array(
    blob: bytes | Body, spec: PreprocessSpec, *, max_pixels: int, pixels: Budget | None = None
) -> np.ndarray:
    """Blocking: ``blob``'s model input at ``spec`` alone (a cascade's other view), under the
    limits ``prepare`` applies; no fingerprint or brightness, which the first view has given.

    It never waits for room in ``pixels``: it runs on a batch's thread after the batch's model
    run, where a wait would hold every answer of the batch (see ``InferenceModel.escalate``).
    """
    reserve = pixels.hold if pixels is not None else None
    return preprocess_bytes_info(as_bytes(blob), spec, max_pixels=max_pixels, reserve=reserve).array


@dataclass(frozen=True)
class Prediction:
    label: str
    confidence: float
    probabilities: dict[str, float]


@dataclass(frozen=True)
class Upload:
    """One encoded image as it came in, with the client's file name where it had one."""

    data: bytes | Body
    filename: str | None = None


@dataclass(frozen=True)
class ImageResult:
    """The answer for one image: a prediction with its id, or the error of that image alone."""

    filename: str | None
    prediction: Prediction | None = None
    prediction_id: str | None = None
    error: ApiError | None = None


# Traffic that is answered but kept out of production's monitoring (a deployment's own checks):
# its images are not logged, not in the drift window or live accuracy, and not counted in
# predictions_total (evaluation_predictions_total counts them instead).
TRAFFIC_HEADER = "x-traffic-class"
TRAFFIC_CLASSES = ("production", "evaluation")


def is_evaluation(request: Request, settings: Settings) -> bool:
    """Whether the request declares itself evaluation traffic (``X-Traffic-Class: evaluation``).

    Any other value, or the header sent more than once, is a 400 naming it: a caller that meant
    to stay out of the log must not be logged silently. With ``API_TOKEN`` set, evaluation
    traffic needs the bearer token (401, 403), since it hides predictions from monitoring.
    """
    values = request.headers.getlist(TRAFFIC_HEADER)
    if not values:
        return False
    value = values[0].strip(" \t").lower()  # HTTP's optional whitespace, nothing else
    if len(values) > 1 or value not in TRAFFIC_CLASSES:
        raise ApiError(
            400,
            "invalid_traffic_class",
            "the X-Traffic-Class header must be sent at most once, as 'production' or 'evaluation'",
        )
    if value == "production":
        return False
    require_token(request, settings)
    return True


# A route's reader: the request body (within the byte budget held by the reservation) as
# uploads. It raises ApiError for a malformed body; nothing is admitted before it returns.
Reader = Callable[[Reservation], Awaitable[list[Upload]]]


class Predictor:
    def __init__(
        self,
        settings: Settings,
        contract: ModelContract,
        batcher: Batcher,
        metrics: ServerMetrics,
        monitor: Monitor,
        body_bytes: Budget,
    ) -> None:
        self.settings = settings
        self.contract = contract
        self.batcher = batcher
        self.metrics = metrics
        self.monitor = monitor
        self.body_bytes = body_bytes
        self.class_names = contract.class_names
        self.model_version = contract.model_version

    # ------------------------------------------------------------------ the request path
    async def run(
        self, request: Request, read: Reader, *, atomic: bool = False
    ) -> list[ImageResult]:
        """Read, admit, infer, record: the whole life of a prediction request (logged under
        its route's template, as its metrics are).

        ``atomic``: the wire format has no per-image errors (V2), so one failed image fails
        the request, with its index, and nothing of it is logged.

        Evaluation traffic (:func:`is_evaluation`, checked before the body is read) is answered
        alike, and nothing of it is logged or observed by the monitor.
        """
        evaluation = is_evaluation(request, self.settings)
        if evaluation:  # in its access log line whatever the answer, and confirmed in it
            request.scope["state"]["traffic"] = "evaluation"
        reservation = Reservation(self.body_bytes)
        try:
            uploads = await self._read(read, reservation)
            outcomes = await self._infer([u.data for u in uploads], request.scope["state"])
        finally:
            reservation.release()
        errors = [self._error(outcome) for outcome in outcomes]
        if any(isinstance(outcome, OverBudgetError) for outcome in outcomes):
            self.metrics.rejected_series["pixels"].inc()  # once for the request
        if atomic:
            for i, error in enumerate(errors):
                if error is not None:
                    raise ApiError(
                        error.status, error.code, f"image {i}: {error.message}", error.headers
                    )
        state = request.scope["state"]
        route = route_template(request.scope)
        latency_ms = (time.perf_counter() - state["started"]) * 1000
        results = [
            ImageResult(upload.filename, error=error)
            if error is not None
            else self._predicted(
                upload, outcome, state["request_id"], route, latency_ms, evaluation=evaluation
            )
            for upload, outcome, error in zip(uploads, outcomes, errors, strict=True)
        ]
        state["images"] = len(results)
        state["handled_at"] = time.perf_counter()  # the rest is building and sending the answer
        if len(results) == 1 and results[0].prediction is not None:
            state["label"] = results[0].prediction.label
            state["confidence"] = results[0].prediction.confidence
        return results

    async def _read(self, read: Reader, reservation: Reservation) -> list[Upload]:
        deadline = self.settings.body_timeout_s
        self.batcher.body_started()
        started = time.perf_counter()
        try:
            async with asyncio.timeout(deadline):
                uploads = await read(reservation)
            self.metrics.stages["body"].observe(time.perf_counter() - started)
            return uploads
        except ApiError as exc:
            if exc.status == 503 and exc.code == "overloaded":  # the byte budget (uploads.reserve)
                self.metrics.rejected_series["bytes"].inc()
            raise
        except TimeoutError:
            raise ApiError(
                408, "request_timeout", f"the request body did not arrive within {deadline:g} s"
            ) from None
        finally:
            self.batcher.body_finished()

    async def _infer(self, blobs: list[bytes], state: dict[str, Any]) -> list[Outcome]:
        """The images' outcomes. A client that hangs up meanwhile (``server.protocol`` calls
        ``ON_CLIENT_GONE``) stops the work not yet started for it, and the request ends as
        499 with nothing logged; a request past its deadline stops it too (504)."""
        ticket = self._admit(len(blobs))
        state[ON_CLIENT_GONE] = functools.partial(self.batcher.abandon, ticket)
        try:
            async with asyncio.timeout(self.settings.request_timeout_s):
                outcomes = await self.batcher.predict(blobs, ticket)
        except TimeoutError:
            seconds = self.settings.request_timeout_s
            raise ApiError(
                504, "timeout", f"the request did not finish within {seconds:g} s"
            ) from None
        except ModelStoppedError:
            raise shutting_down() from None
        finally:
            del state[ON_CLIENT_GONE]
            self.batcher.release(ticket)
        if any(isinstance(outcome, RequestAbandonedError) for outcome in outcomes):
            raise ClientDisconnect  # nobody to answer: the middleware logs 499
        return outcomes

    def _admit(self, n: int) -> Ticket:
        most = self.batcher.max_queue_size
        if n > most:  # would never fit: not a 503 to retry
            raise ApiError(
                413,
                "too_many_files",
                f"this server admits at most {most} images at once (MAX_QUEUE_SIZE); "
                "send fewer per request",
            )
        try:
            return self.batcher.admit(n)
        except QueueFullError:
            self.metrics.rejected_series["queue_full"].inc()
            raise ApiError(
                503, "overloaded", "the server is at capacity; retry shortly", RETRY_SOON
            ) from None
        except ModelStoppedError:
            raise shutting_down() from None

    def _error(self, outcome: Outcome) -> ApiError | None:
        """The client-facing error of one image's outcome; None when it was predicted."""
        if isinstance(outcome, ImageDecodeError):
            return ApiError.from_decode(outcome)
        if isinstance(outcome, OverBudgetError):
            return overloaded(outcome)
        if isinstance(outcome, Exception):
            raise outcome  # a server fault: this request answers 500, the batch goes on
        probs = outcome[1]
        if not np.isfinite(probs).all():
            # a model that overflows on some inputs: never an answer, never a logged prediction
            log.error(
                "the model answered non-finite probabilities %s for an image; answered 500",
                probs.tolist(),
            )
            return ApiError(
                500,
                "invalid_model_output",
                "the model's answer for this image is not a number; nothing was predicted",
            )
        return None

    def _predicted(
        self,
        upload: Upload,
        outcome: Outcome,
        request_id: str,
        route: str,
        latency_ms: float,
        *,
        evaluation: bool,
    ) -> ImageResult:
        prepared, probs = outcome
        prediction = self.describe(probs)
        prediction_id = new_id()
        if evaluation:
            self.metrics.evaluation_series(prediction.label).inc()
        else:
            self.record(prediction, prepared, prediction_id, request_id, route, latency_ms)
        return ImageResult(upload.filename, prediction, prediction_id)

    # ------------------------------------------------------------------ results
    def describe(self, probs: np.ndarray) -> Prediction:
        """One row of probabilities -> label, confidence and the per-class dict."""
        values = probs.tolist()
        best = int(np.argmax(probs))
        return Prediction(
            self.class_names[best],
            values[best],
            dict(zip(self.class_names, values, strict=True)),
        )

    def record(
        self,
        prediction: Prediction,
        prepared: Prepared,
        prediction_id: str,
        request_id: str,
        route: str,
        latency_ms: float,
    ) -> None:
        """Metrics and the monitoring hook, once per successfully predicted image."""
        self.metrics.prediction_series(prediction.label).inc()
        self.metrics.confidence.observe(prediction.confidence)
        self.monitor.observe(
            PredictionEvent(
                prediction_id=prediction_id,
                request_id=request_id,
                timestamp=time.time(),
                model_version=self.model_version,
                label=prediction.label,
                confidence=prediction.confidence,
                probabilities=prediction.probabilities,
                input_sha256=prepared.sha256,
                width=prepared.width,
                height=prepared.height,
                brightness=prepared.brightness,
                latency_ms=latency_ms,
                route=route,
            )
        )

    def as_json(self, result: ImageResult, request_id: str, latency_ms: float) -> dict[str, Any]:
        """One image's REST answer: its prediction, or its error object."""
        if result.prediction is None:
            assert result.error is not None
            entry: dict[str, Any] = result.error.body()
        else:
            entry = {
                "label": result.prediction.label,
                "confidence": result.prediction.confidence,
                "probabilities": result.prediction.probabilities,
                "model_version": self.model_version,
                "request_id": request_id,
                "prediction_id": result.prediction_id,
                "latency_ms": round(latency_ms, 3),
            }
        if result.filename is not None:
            entry["filename"] = result.filename
        return entry
