"""What the prediction-log tests share: a prediction event, a bounded wait, failure counters."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from server.store import PredictionEvent


def event(
    i: int,
    label: str = "cat",
    confidence: float = 0.9,
    version: str = "v1",
    *,
    request_id: str | None = None,
    ts: float | None = None,
    **changes: Any,
) -> PredictionEvent:
    """Prediction ``req-{i}`` of a cat/dog model, photo ``i`` (its own input_sha256); ``changes``
    replace any other field."""
    other = 1.0 - confidence
    probs = (
        {"cat": confidence, "dog": other} if label == "cat" else {"cat": other, "dog": confidence}
    )
    prediction = PredictionEvent(
        prediction_id=f"req-{i}",
        request_id=request_id or f"req-{i}",
        timestamp=time.time() if ts is None else ts,
        model_version=version,
        label=label,
        confidence=confidence,
        probabilities=probs,
        input_sha256=hashlib.sha256(str(i).encode()).hexdigest(),
        width=320,
        height=240,
        brightness=120.0,
        latency_ms=3.5,
        route="/predict",
    )
    return replace(prediction, **changes)


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


class Counts:
    """The store's on_write_failure and on_drop callbacks, counted."""

    def __init__(self) -> None:
        self.failures = 0
        self.drops = 0

    def fail(self, n: int) -> None:
        self.failures += n

    def drop(self, n: int) -> None:
        self.drops += n
