"""Watching the deployed model: prediction log, feedback, live accuracy and drift.

The app creates one :class:`Monitor` in its lifespan and calls :meth:`Monitor.observe` once per
predicted image. Everything ``observe`` does is O(1) in memory; the database is written by the
store's own thread. Figures served at ``/monitoring/*`` and on ``/metrics`` come from caches the
writer thread keeps up to date after each commit, never from a query on the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from server import drift
from server.contract import ModelContract
from server.store import (
    FeedbackResult,
    PredictionEvent,
    SqliteStore,
    StoreUnavailableError,
    iter_aggregates,
)

__all__ = ["Monitor", "PredictionEvent", "routes"]

log = logging.getLogger("server.monitoring")

DEFAULT_LOG_PATH = "var/predictions.db"
DEFAULT_DRIFT_WINDOW = 500
DEFAULT_LOG_QUEUE = 10_000
DRIFT_MIN_SAMPLES = 30  # fewer recent predictions than this say too little to score drift
DRIFT_CACHE_S = 1.0  # scrapes and dashboards may poll; recompute at most this often
MAX_FEEDBACK_BYTES = 16 * 1024
MAX_REQUEST_ID_CHARS = 200
CONFIDENCE_EDGES = drift.CONFIDENCE_EDGES


@dataclass
class VersionFigures:
    """Running figures of one model version, from the whole prediction log."""

    labels: collections.Counter[str] = field(default_factory=collections.Counter)
    confidence_counts: list[int] = field(default_factory=lambda: [0] * (len(CONFIDENCE_EDGES) - 1))
    confidence_sum: float = 0.0
    # (true_label, predicted_label) -> count of requests with feedback
    confusion: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)

    def as_json(self) -> dict[str, Any]:
        n = sum(self.labels.values())
        n_feedback = sum(self.confusion.values())
        correct = sum(c for (t, p), c in self.confusion.items() if t == p)
        matrix: dict[str, dict[str, int]] = {}
        for (true, pred), count in sorted(self.confusion.items()):
            if count:
                matrix.setdefault(true, {})[pred] = count
        return {
            "predictions": n,
            "labels": dict(sorted(self.labels.items())),
            "confidence": {
                "edges": list(CONFIDENCE_EDGES),
                "counts": list(self.confidence_counts),
                "mean": self.confidence_sum / n if n else None,
            },
            "feedback": n_feedback,
            "correct": correct,
            "accuracy": correct / n_feedback if n_feedback else None,
            "confusion": matrix,  # true label -> predicted label -> count
        }


class LiveFigures:
    """Per-version figures, updated by the writer thread after each commit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._versions: dict[str, VersionFigures] = {}

    def _get(self, version: str) -> VersionFigures:
        if version not in self._versions:
            self._versions[version] = VersionFigures()
        return self._versions[version]

    def load(self, conn: sqlite3.Connection) -> None:
        """Seed from the log already on disk, so figures survive restarts."""
        predictions, feedback = iter_aggregates(conn, CONFIDENCE_EDGES)
        with self._lock:
            self._versions.clear()
            for version, label, bin_index, count, conf_sum in predictions:
                fig = self._get(version)
                fig.labels[label] += count
                fig.confidence_counts[int(bin_index)] += count
                fig.confidence_sum += conf_sum or 0.0
            for version, true_label, predicted, count in feedback:
                self._get(version).confusion[(true_label, predicted)] += count

    def add_predictions(self, rows: list[PredictionEvent]) -> None:
        bins = drift.bin_counts([r.confidence for r in rows], CONFIDENCE_EDGES)
        with self._lock:
            for row in rows:
                fig = self._get(row.model_version)
                fig.labels[row.label] += 1
                fig.confidence_sum += row.confidence
            # one version per process in practice; bin per version when several are mixed
            versions = {r.model_version for r in rows}
            if len(versions) == 1:
                fig = self._get(next(iter(versions)))
                for i, c in enumerate(bins):
                    fig.confidence_counts[i] += int(c)
            else:
                for row in rows:
                    i = int(np.argmax(drift.bin_counts([row.confidence], CONFIDENCE_EDGES)))
                    self._get(row.model_version).confidence_counts[i] += 1

    def add_feedback(self, results: list[FeedbackResult]) -> None:
        with self._lock:
            for r in results:
                fig = self._get(r.model_version)
                if r.previous_label is not None:  # a correction replaces the earlier label
                    fig.confusion[(r.previous_label, r.predicted_label)] -= 1
                fig.confusion[(r.true_label, r.predicted_label)] += 1

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {v: fig.as_json() for v, fig in sorted(self._versions.items())}


class Monitor:
    """Prediction log, feedback, live accuracy and drift for one served model."""

    def __init__(self, settings: Any, contract: ModelContract, registry: CollectorRegistry) -> None:
        self.contract = contract
        self.model_version = contract.model_version
        self.class_names = tuple(contract.class_names)
        self.log_path = Path(getattr(settings, "prediction_log_path", None) or DEFAULT_LOG_PATH)
        window = int(getattr(settings, "drift_window", None) or DEFAULT_DRIFT_WINDOW)
        self.window_size = max(1, window)
        reference = contract.extra.get("reference_stats")
        self.reference: dict[str, Any] | None = reference if isinstance(reference, dict) else None

        self.figures = LiveFigures()
        self.write_failures = Counter(
            "prediction_log_write_failures",
            "Predictions that could not be written to the prediction log",
            registry=registry,
        )
        self.dropped = Counter(
            "prediction_log_dropped",
            "Predictions dropped because the prediction log's write queue was full",
            registry=registry,
        )
        self.feedback_received = Counter(
            "feedback_requests",
            "Feedback requests by outcome",
            ["outcome"],
            registry=registry,
        )
        queue = int(getattr(settings, "prediction_log_queue", None) or DEFAULT_LOG_QUEUE)
        self.store = SqliteStore(
            self.log_path,
            max_queue=queue,
            on_open=self._load_figures,
            on_predictions=self.figures.add_predictions,
            on_feedback=self.figures.add_feedback,
            on_write_failure=self._count_failures,
            on_drop=self._count_drops,
        )
        # rolling window of recent traffic: (confidence, width, height, brightness, label)
        self._window: collections.deque[tuple[float, int, int, float, str]] = collections.deque(
            maxlen=self.window_size
        )
        self._window_lock = threading.Lock()
        self._observed = 0
        self._drift_cache: tuple[int, float, dict[str, Any]] | None = None
        self._observe_failed = False
        self._reference_failed = False
        self._counts_lock = threading.Lock()
        self.n_write_failures = 0
        self.n_dropped = 0
        registry.register(_MonitorCollector(self))

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        await asyncio.to_thread(self.store.start)

    async def stop(self) -> None:
        await asyncio.to_thread(self.store.stop)

    def _count_failures(self, n: int) -> None:
        self.write_failures.inc(n)
        with self._counts_lock:
            self.n_write_failures += n

    def _count_drops(self, n: int) -> None:
        self.dropped.inc(n)
        with self._counts_lock:
            self.n_dropped += n

    def _load_figures(self, conn: sqlite3.Connection) -> None:
        try:
            self.figures.load(conn)
        except sqlite3.Error:
            log.exception("prediction log: could not read past figures; counting from zero")

    # ------------------------------------------------------------------ hot path
    def observe(self, event: PredictionEvent) -> None:
        """Record one prediction: O(1), never blocks, never raises."""
        try:
            with self._window_lock:
                self._window.append(
                    (
                        float(event.confidence),
                        int(event.width),
                        int(event.height),
                        float(event.brightness),
                        str(event.label),
                    )
                )
                self._observed += 1
            self.store.record(event)
        except Exception:
            if not self._observe_failed:  # once: a bug here must not flood the log per request
                log.exception("monitoring: could not observe a prediction")
                self._observe_failed = True

    # ------------------------------------------------------------------ feedback
    async def add_feedback(self, request_id: str, true_label: str) -> FeedbackResult | None:
        """Store the true label of a request; None when the request id is unknown."""
        future = self.store.submit_feedback(request_id, true_label, time.time())
        return await asyncio.wrap_future(future)

    # ------------------------------------------------------------------ figures
    def summary(self) -> dict[str, Any]:
        return {
            "model_version": self.model_version,
            "class_names": list(self.class_names),
            "model_versions": self.figures.snapshot(),
            "store": {
                "backend": "sqlite",
                "path": str(self.log_path),
                "healthy": self.store.healthy,
                "queued": self.store.queued(),
                "open_error": self.store.open_error is not None,
                "dropped": self.n_dropped,
                "write_failures": self.n_write_failures,
            },
        }

    def drift(self) -> dict[str, Any]:
        """Drift scores of the rolling window against the model's reference statistics."""
        now = time.monotonic()
        cached = self._drift_cache
        if cached is not None and cached[0] == self._observed and now - cached[1] < DRIFT_CACHE_S:
            return cached[2]
        with self._window_lock:
            window = list(self._window)
            observed = self._observed
        result: dict[str, Any] = {
            "model_version": self.model_version,
            "window": {"size": len(window), "capacity": self.window_size},
            "min_samples": DRIFT_MIN_SAMPLES,
            "reference": self.reference is not None,
            "thresholds": {
                "psi_moderate": drift.PSI_MODERATE,
                "psi_significant": drift.PSI_SIGNIFICANT,
            },
            "features": {},
        }
        if self.reference is None:
            result["status"] = "no_reference"
            result["message"] = "the model carries no reference_stats, so drift cannot be scored"
        elif len(window) < DRIFT_MIN_SAMPLES:
            result["status"] = "insufficient_data"
            result["message"] = (
                f"{len(window)} recent predictions; drift is scored from {DRIFT_MIN_SAMPLES}"
            )
        else:
            conf, width, height, bright, labels = zip(*window, strict=True)
            try:
                result["features"] = drift.drift_scores(
                    self.reference,
                    confidence=conf,
                    width=width,
                    height=height,
                    brightness=bright,
                    labels=labels,
                )
            except (ValueError, TypeError, KeyError, AttributeError):
                # a garbled reference must not take /metrics down with it
                if not self._reference_failed:
                    log.exception("monitoring: the model's reference_stats cannot be used")
                    self._reference_failed = True
                result["status"] = "invalid_reference"
                result["message"] = "the model's reference_stats are malformed"
            else:
                psis = [f["psi"] for f in result["features"].values()]
                result["max_psi"] = max(psis) if psis else None
                result["status"] = drift.psi_level(max(psis)) if psis else "no_reference"
        self._drift_cache = (observed, now, result)
        return result


class _MonitorCollector:
    """Prometheus figures read from the monitor's caches at scrape time (no database query)."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor

    def describe(self) -> list[Any]:
        return []  # dynamic families; nothing to check for name clashes at registration

    def collect(self) -> Any:
        m = self.monitor
        versions = m.figures.snapshot()
        logged = GaugeMetricFamily(
            "monitor_logged_predictions",
            "Predictions in the prediction log, by model version and predicted label",
            labels=["model_version", "label"],
        )
        feedback = GaugeMetricFamily(
            "monitor_feedback", "Predictions with ground-truth feedback", labels=["model_version"]
        )
        accuracy = GaugeMetricFamily(
            "monitor_live_accuracy",
            "Accuracy on the predictions that received feedback",
            labels=["model_version"],
        )
        confusion = GaugeMetricFamily(
            "monitor_confusion",
            "Feedback counts by true and predicted label",
            labels=["model_version", "true_label", "predicted_label"],
        )
        confidence = HistogramMetricFamily(
            "monitor_confidence",
            "Confidence (max probability) of logged predictions; bins are [a, b)",
            labels=["model_version"],
        )
        for version, fig in versions.items():
            for label, count in fig["labels"].items():
                logged.add_metric([version, label], count)
            feedback.add_metric([version], fig["feedback"])
            if fig["accuracy"] is not None:
                accuracy.add_metric([version], fig["accuracy"])
            for true, row in fig["confusion"].items():
                for pred, count in row.items():
                    confusion.add_metric([version, true, pred], count)
            counts = fig["confidence"]["counts"]
            edges = fig["confidence"]["edges"]
            cumulative = np.cumsum(counts).tolist()
            buckets = [(repr(float(e)), c) for e, c in zip(edges[1:], cumulative, strict=True)]
            buckets.append(("+Inf", cumulative[-1]))
            total = (fig["confidence"]["mean"] or 0.0) * fig["predictions"]
            confidence.add_metric([version], buckets, total)
        yield from (logged, feedback, accuracy, confusion, confidence)

        queued = GaugeMetricFamily("prediction_log_queued", "Writes waiting for the log writer")
        queued.add_metric([], m.store.queued())
        healthy = GaugeMetricFamily(
            "prediction_log_healthy", "1 when the last write to the prediction log succeeded"
        )
        healthy.add_metric([], 1.0 if m.store.healthy else 0.0)
        yield from (queued, healthy)

        report = m.drift()
        score = GaugeMetricFamily(
            "drift_score",
            "Drift of recent traffic against the model's reference statistics",
            labels=["model_version", "feature", "method"],
        )
        for feature, values in report["features"].items():
            for method in ("psi", "ks"):
                value = values[method]
                if value is not None and math.isfinite(value):
                    score.add_metric([m.model_version, feature, method], value)
        window = GaugeMetricFamily("drift_window_size", "Predictions in the drift window")
        window.add_metric([], report["window"]["size"])
        yield from (score, window)


# ---------------------------------------------------------------------- routes
def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


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


async def feedback_endpoint(request: Request) -> JSONResponse:
    """POST /feedback {"request_id": "...", "label": "dog"}: the true label of a prediction."""
    monitor: Monitor = request.app.state.monitor
    outcome = monitor.feedback_received.labels
    body = await _read_limited(request, MAX_FEEDBACK_BYTES)
    if body is None:
        outcome("too_large").inc()
        return _error(
            413, "payload_too_large", f"feedback bodies are at most {MAX_FEEDBACK_BYTES} bytes"
        )
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        outcome("bad_request").inc()
        return _error(
            400, "invalid_json", 'the body must be JSON: {"request_id": "...", "label": "..."}'
        )
    if not isinstance(payload, dict):
        outcome("bad_request").inc()
        return _error(400, "invalid_json", "the body must be a JSON object")
    request_id = payload.get("request_id")
    label = payload.get("label")
    if not isinstance(request_id, str) or not 0 < len(request_id) <= MAX_REQUEST_ID_CHARS:
        outcome("invalid").inc()
        return _error(
            422,
            "invalid_request_id",
            f"request_id must be a string of 1 to {MAX_REQUEST_ID_CHARS} characters",
        )
    if not isinstance(label, str) or label not in monitor.class_names:
        outcome("invalid").inc()
        names = ", ".join(monitor.class_names)
        return _error(422, "invalid_label", f"label must be one of the model's classes: {names}")
    try:
        result = await monitor.add_feedback(request_id, label)
    except StoreUnavailableError:
        outcome("unavailable").inc()
        return _error(503, "store_unavailable", "the prediction log cannot store feedback now")
    if result is None:
        outcome("unknown_request_id").inc()
        return _error(404, "unknown_request_id", "no prediction with this request_id is logged")
    outcome("stored").inc()
    return JSONResponse(
        {
            "request_id": result.request_id,
            "label": result.true_label,
            "predicted_label": result.predicted_label,
            "correct": result.true_label == result.predicted_label,
            "model_version": result.model_version,
        },
        status_code=201,
    )


async def summary_endpoint(request: Request) -> JSONResponse:
    """GET /monitoring/summary: live accuracy, confusion and distributions per model version."""
    monitor: Monitor = request.app.state.monitor
    return JSONResponse(monitor.summary())


async def drift_endpoint(request: Request) -> JSONResponse:
    """GET /monitoring/drift: PSI and KS of recent traffic against the reference statistics."""
    monitor: Monitor = request.app.state.monitor
    return JSONResponse(await run_in_threadpool(monitor.drift))


routes: list[BaseRoute] = [
    Route("/feedback", feedback_endpoint, methods=["POST"], name="feedback"),
    Route("/monitoring/summary", summary_endpoint, methods=["GET"], name="monitoring_summary"),
    Route("/monitoring/drift", drift_endpoint, methods=["GET"], name="monitoring_drift"),
]
