"""What every prediction route shares: admission, decoding and batching off the loop, results.

The REST routes and the V2 routes differ only in how images come in and how answers go out;
decoding, the queue, metrics and the monitoring hook are here once.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.contract import ModelContract
from server.errors import ApiError
from server.inference import Batcher, ModelStoppedError, Outcome, QueueFullError, Ticket
from server.metrics import ServerMetrics
from server.monitoring import Monitor, PredictionEvent
from server.preprocessing import ImageDecodeError, PreprocessSpec, preprocess_bytes_info
from server.settings import Settings


@dataclass(frozen=True)
class Prepared:
    """One decoded image, ready for the model, with what monitoring needs about its source."""

    array: np.ndarray  # uint8 (H, W, 3)
    width: int
    height: int
    sha256: str
    brightness: float


def prepare(data: bytes, *, spec: PreprocessSpec, max_pixels: int) -> Prepared:
    """Blocking: decode + preprocess + fingerprint. Runs on the batcher's threads."""
    info = preprocess_bytes_info(data, spec, max_pixels=max_pixels)
    return Prepared(
        info.array,
        info.width,
        info.height,
        hashlib.sha256(data).hexdigest(),
        float(info.array.mean()),
    )


@dataclass(frozen=True)
class Prediction:
    label: str
    confidence: float
    probabilities: dict[str, float]


class Predictor:
    def __init__(
        self,
        settings: Settings,
        contract: ModelContract,
        batcher: Batcher,
        metrics: ServerMetrics,
        monitor: Monitor,
    ) -> None:
        self.settings = settings
        self.contract = contract
        self.batcher = batcher
        self.metrics = metrics
        self.monitor = monitor
        self.class_names = contract.class_names
        self.model_version = contract.model_version

    def admit(self, n: int) -> Ticket:
        try:
            return self.batcher.admit(n)
        except QueueFullError:
            self.metrics.rejected.inc()
            raise ApiError(
                503, "overloaded", "the server is at capacity; retry shortly", {"Retry-After": "1"}
            ) from None
        except ModelStoppedError:
            raise ApiError(
                503, "shutting_down", "the server is shutting down", {"Retry-After": "1"}
            ) from None

    def release(self, ticket: Ticket) -> None:
        self.batcher.release(ticket)

    async def infer(self, blobs: list[bytes], ticket: Ticket) -> list[Outcome]:
        """Decode and classify; per image ``(Prepared, probabilities)`` or its decode error."""
        try:
            outcomes = await self.batcher.predict(blobs, ticket)
        except ModelStoppedError:
            raise ApiError(
                503, "shutting_down", "the server is shutting down", {"Retry-After": "1"}
            ) from None
        for outcome in outcomes:
            if isinstance(outcome, Exception) and not isinstance(outcome, ImageDecodeError):
                raise outcome  # a server fault: this request answers 500, the batch goes on
        return outcomes

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
        *,
        request_id: str,
        route: str,
        latency_ms: float,
    ) -> None:
        """Metrics and the monitoring hook, once per successfully predicted image."""
        self.metrics.predictions.labels(prediction.label).inc()
        self.metrics.confidence.observe(prediction.confidence)
        self.monitor.observe(
            PredictionEvent(
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

    def as_json(self, prediction: Prediction, request_id: str, latency_ms: float) -> dict[str, Any]:
        return {
            "label": prediction.label,
            "confidence": prediction.confidence,
            "probabilities": prediction.probabilities,
            "model_version": self.model_version,
            "request_id": request_id,
            "latency_ms": round(latency_ms, 3),
        }
