"""Watching the deployed model: prediction log, feedback, live accuracy and drift.

The app creates one :class:`Monitor` in its lifespan and calls :meth:`Monitor.observe` once per
predicted image. Everything ``observe`` does is O(1) in memory; the database is written by the
store's own thread. Figures served at ``/monitoring/*`` and on ``/metrics`` come from caches,
never from a query on the event loop:

- SQLite (one process per file): the writer thread updates the figures after each commit and
  the drift window holds this process's recent predictions; exact and instant.
- PostgreSQL (shared by every replica): no process sees the others' writes, so the store's
  refresher thread re-reads the figures and the drift window (the model version's last
  ``DRIFT_WINDOW`` predictions, whoever served them) from the database every
  ``PREDICTION_LOG_REFRESH_S``; every replica then answers the same.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
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
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from catsdogs import drift
from catsdogs.contract import ModelContract
from server.auth import require_token
from server.errors import ApiError, error_response
from server.ids import is_valid_id
from server.settings import Settings
from server.store import (
    AmbiguousRequestIdError,
    FeedbackResult,
    PredictionEvent,
    PrunedPrediction,
    SqliteStore,
    StoreTimeoutError,
    StoreUnavailableError,
    WriterStore,
    iter_aggregates,
)

__all__ = ["Monitor", "PredictionEvent", "routes"]

log = logging.getLogger("server.monitoring")

DRIFT_MIN_SAMPLES = 30  # fewer recent predictions than this say too little to score drift
DRIFT_CACHE_S = 1.0  # scrapes and dashboards may poll; recompute at most this often
MAX_FEEDBACK_BYTES = 16 * 1024
# Shared store: feedback may reach this replica before the replica that served the prediction
# has committed it, so an unknown id is looked up again (waits from the first to the second
# value, doubling) for half of STORE_TIMEOUT_S before it is a 404; the other half stays for
# the last lookup.
UNKNOWN_ID_RETRY_S = (0.05, 1.0)
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

    def load(self, conn: Any) -> None:
        """Replace the figures with the log's (a sqlite3 or psycopg connection): seeds them at
        start, so they survive restarts, and refreshes them from a shared store."""
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

    def remove(self, rows: list[PrunedPrediction]) -> None:
        """Forget predictions retention deleted, so figures describe the log as retained.

        Subtracting exactly what was deleted costs O(rows), where reloading would scan the
        whole table on the writer thread after every prune.
        """
        with self._lock:
            for row in rows:
                fig = self._versions.get(row.model_version)
                if fig is None:
                    continue
                fig.labels[row.label] -= 1
                fig.confidence_sum -= row.confidence
                i = int(np.argmax(drift.bin_counts([row.confidence], CONFIDENCE_EDGES)))
                fig.confidence_counts[i] -= 1
                if row.true_label is not None:
                    fig.confusion[(row.true_label, row.label)] -= 1
            for version, fig in list(self._versions.items()):
                fig.labels = +fig.labels  # drop labels no retained row has (as load does)
                fig.confusion = +fig.confusion
                if not fig.labels:
                    del self._versions[version]

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {v: fig.as_json() for v, fig in sorted(self._versions.items())}


class Monitor:
    """Prediction log, feedback, live accuracy and drift for one served model."""

    def __init__(
        self, settings: Settings, contract: ModelContract, registry: CollectorRegistry
    ) -> None:
        self.contract = contract
        self.model_version = contract.model_version
        self.class_names = tuple(contract.class_names)
        self.log_backend, log_target = settings.prediction_log
        self.log_path = Path(log_target) if self.log_backend == "sqlite" else None
        self.window_size = settings.drift_window
        self.store_timeout_s = settings.store_timeout_s
        self.retention_days = settings.prediction_log_retention_days
        self.max_rows = settings.prediction_log_max_rows
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
        self.restarts = Counter(
            "prediction_log_writer_restarts",
            "Times the prediction log's writer thread had stopped and was restarted",
            registry=registry,
        )
        self.pruned = Counter(
            "prediction_log_pruned",
            "Predictions deleted from the prediction log by retention (age or row limit)",
            registry=registry,
        )
        self.feedback_received = Counter(
            "feedback_requests",
            "Feedback requests by outcome",
            ["outcome"],
            registry=registry,
        )
        self.store: WriterStore = self._open_store(settings, log_target)
        self.shared = self.store.shared
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

    def _open_store(self, settings: Settings, target: str) -> WriterStore:
        common: dict[str, Any] = {
            "max_queue": settings.prediction_log_queue,
            "timeout_s": settings.store_timeout_s,
            "retention_days": settings.prediction_log_retention_days,
            "max_rows": settings.prediction_log_max_rows,
            "reconnect_min_s": settings.prediction_log_reconnect_min_s,
            "reconnect_max_s": settings.prediction_log_reconnect_max_s,
            "on_write_failure": self._count_failures,
            "on_drop": self._count_drops,
            "on_restart": self.restarts.inc,
        }
        if self.log_backend == "sqlite":
            return SqliteStore(
                target,
                on_open=self.figures.load,
                on_predictions=self.figures.add_predictions,
                on_feedback=self.figures.add_feedback,
                on_pruned=self._forget,
                **common,
            )
        from server.store_postgres import PostgresStore  # psycopg only when it is used

        # figures come from the database (refresh), not from this process's own writes
        return PostgresStore(
            target,
            pool_size=settings.prediction_log_pool_size,
            refresh_s=settings.prediction_log_refresh_s,
            on_refresh=self._refresh,
            on_pruned=lambda rows: self.pruned.inc(len(rows)),
            **common,
        )

    def _refresh(self, conn: Any) -> None:
        """Shared store, refresher thread: figures and drift window as the database has them."""
        from server.store_postgres import recent_window

        self.figures.load(conn)
        window = recent_window(conn, self.model_version, self.window_size)
        with self._window_lock:
            self._window = collections.deque(window, maxlen=self.window_size)
            self._observed += 1  # a new window: the drift cache is stale

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

    def _forget(self, rows: list[PrunedPrediction]) -> None:
        self.figures.remove(rows)
        self.pruned.inc(len(rows))

    def log_status(self) -> str:
        """The prediction log writer's state: ok, behind, stuck, failing, dead or unavailable."""
        return self.store.status()

    # ------------------------------------------------------------------ hot path
    def observe(self, event: PredictionEvent) -> None:
        """Record one prediction: O(1), never blocks, never raises."""
        try:
            if not isinstance(event, PredictionEvent):  # never let garbage reach the writer
                raise TypeError(f"not a PredictionEvent: {type(event).__name__}")
            if self.shared:  # the window is the database's (refreshed), not this process's
                self.store.record(event)
                return
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
    async def add_feedback(
        self, true_label: str, *, prediction_id: str | None = None, request_id: str | None = None
    ) -> FeedbackResult | None:
        """Store the true label of one logged prediction; None when the id is unknown.

        Raises :class:`AmbiguousRequestIdError` when a request id names several images,
        :class:`StoreTimeoutError` when the writer does not answer within ``store_timeout_s``
        (the feedback is then withdrawn unless the writer already took it: a retry is safe,
        feedback for one prediction replaces the earlier label), and
        :class:`StoreUnavailableError` when the log cannot store it. With a shared store an
        unknown id is looked up again for half of ``store_timeout_s`` (the replica that served
        the prediction may not have committed it yet), so only that late is it None.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.store_timeout_s
        grace_end = loop.time() + self.store_timeout_s / 2  # unknown ids, shared store
        ts = time.time()
        pause, longest = UNKNOWN_ID_RETRY_S
        while True:
            future = self.store.submit_feedback(
                true_label, ts, prediction_id=prediction_id, request_id=request_id
            )
            try:
                result = await asyncio.wait_for(
                    asyncio.wrap_future(future), max(deadline - loop.time(), 0.0)
                )
            except TimeoutError:
                future.cancel()
                raise StoreTimeoutError("the prediction log did not answer in time") from None
            # in a shared store the prediction may still be in another replica's queue
            now = loop.time()
            if result is not None or not self.shared or now >= grace_end:
                return result
            await asyncio.sleep(min(pause, grace_end - now))
            pause = min(pause * 2, longest)

    # ------------------------------------------------------------------ figures
    def summary(self) -> dict[str, Any]:
        return {
            "model_version": self.model_version,
            "class_names": list(self.class_names),
            "model_versions": self.figures.snapshot(),
            "store": self._store_summary(),
        }

    def _store_summary(self) -> dict[str, Any]:
        status = self.store.status()
        where: dict[str, Any] = {"backend": self.store.backend}
        if self.log_path is not None:
            where["path"] = str(self.log_path)
        else:
            where["url"] = self.store.describe()  # host, port and database: no credentials
        return {
            **where,
            "shared": self.shared,
            "figures": self._figures_source(),
            "status": status,
            "healthy": status == "ok",
            "writer_up": self.store.writer_alive() and not self.store.writer_stuck(),
            "queued": self.store.queued(),
            "oldest_queued_s": round(self.store.oldest_queued_s(), 3),
            "open_error": self.store.open_error is not None,
            "dropped": self.n_dropped,
            "write_failures": self.n_write_failures,
            "writer_restarts": self.store.restarts,
            "outages": self.store.outages,  # times the database was unreachable (writes waited)
            "pruned": self.store.rows_pruned,
            "retention": {"days": self.retention_days, "max_rows": self.max_rows},
        }

    def _figures_source(self) -> dict[str, Any]:
        """Where /monitoring/* figures come from, and how fresh a shared store's are."""
        if not self.shared:
            return {"source": "this process (after each commit)"}
        age = self.store.refreshed_s_ago()
        return {
            "source": "database (refreshed)",
            "refresh_interval_s": self.store.refresh_s,
            "refreshed_s_ago": None if age is None else round(age, 3),
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
        age = m.store.refreshed_s_ago()
        if age is not None:  # a shared store: figures are as fresh as the last refresh
            fresh = GaugeMetricFamily(
                "monitor_figures_age_seconds",
                "Seconds since the monitor_* figures were last read from the shared store",
            )
            fresh.add_metric([], age)
            yield fresh

        yield from _log_gauges(m)

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


def _log_gauges(m: Monitor) -> list[GaugeMetricFamily]:
    """The writer's health: status first, as it also restarts a writer that died."""
    status = m.store.status()
    gauges = [
        (
            "prediction_log_healthy",
            "1 when the prediction log writer's status is ok",
            status == "ok",
        ),
        (
            "prediction_log_writer_up",
            "1 when the prediction log writer thread runs and is not stuck",
            m.store.writer_alive() and not m.store.writer_stuck(),
        ),
        ("prediction_log_queued", "Writes waiting for the log writer", m.store.queued()),
        (
            "prediction_log_oldest_queued_seconds",
            "Age of the oldest write waiting for the log writer (0 when none waits)",
            m.store.oldest_queued_s(),
        ),
    ]
    families = []
    for name, doc, value in gauges:
        family = GaugeMetricFamily(name, doc)
        family.add_metric([], float(value))
        families.append(family)
    return families


# ---------------------------------------------------------------------- routes
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
            "several logged images share this request_id (a reused X-Request-ID or a batch); "
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
        return error_response(exc.status, exc.code, exc.message, exc.headers)
    monitor.feedback_received.labels("stored").inc()
    return JSONResponse(
        {
            "prediction_id": result.prediction_id,
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
