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
import logging
import threading
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from catsdogs import drift
from catsdogs.contract import ModelContract
from server.live_figures import LiveFigures
from server.monitor_metrics import MonitorCollector
from server.settings import Settings
from server.store import (
    FeedbackResult,
    PredictionEvent,
    PrunedPrediction,
    StoreTimeoutError,
    WriterStore,
)
from server.store_sqlite import SqliteStore

__all__ = ["Monitor", "PredictionEvent"]

log = logging.getLogger("server.monitoring")  # the name operators filter logs by

DRIFT_MIN_SAMPLES = 30  # fewer recent predictions than this say too little to score drift
# monitoring/alerts.yml's InputDrift waits for a window this large: PSI over 10 bins on fewer
# predictions is noise (tests/serve/test_monitoring.py holds the two numbers together)
DRIFT_ALERT_MIN_WINDOW = 200
DRIFT_CACHE_S = 1.0  # scrapes and dashboards may poll; recompute at most this often
# Shared store: feedback may reach this replica before the replica that served the prediction
# has committed it, so an unknown id is looked up again (waits from the first to the second
# value, doubling) for half of STORE_TIMEOUT_S before it is a 404; the other half stays for
# the last lookup.
UNKNOWN_ID_RETRY_S = (0.05, 1.0)


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
        if self.reference is not None and self.window_size < DRIFT_ALERT_MIN_WINDOW:
            # said once at start: otherwise the drift alert is silent and nothing says why
            log.warning(
                "DRIFT_WINDOW=%d is under the %d predictions the InputDrift alert waits for: "
                "drift is scored and exported, but never alerts",
                self.window_size,
                DRIFT_ALERT_MIN_WINDOW,
            )

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
        # each replica counts the feedback it stored, so a recent window of it sums over
        # replicas and survives restarts (increase()); monitor_live_accuracy is every retained
        # label of a version, which a sudden regression moves too slowly
        self.feedback_labels = Counter(
            "feedback_labels",
            "Feedback stored by this replica, by the prediction's model version and whether its "
            "label was right (a label that replaces an earlier one is not counted again)",
            ["model_version", "result"],
            registry=registry,
        )
        for result in ("correct", "wrong"):  # at 0 from the start: rate() needs a first sample
            self.feedback_labels.labels(self.model_version, result)
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
        registry.register(MonitorCollector(self))

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
            # the prediction never reached the writer: a lost row, counted every time (the
            # alert on prediction_log_write_failures_total sees it); logged once, not per request
            self._count_failures(1)
            if not self._observe_failed:
                log.exception("monitoring: could not observe a prediction")
                self._observe_failed = True

    # ------------------------------------------------------------------ feedback
    async def add_feedback(
        self, true_label: str, *, prediction_id: str | None = None, request_id: str | None = None
    ) -> FeedbackResult | None:
        """Store the true label of one logged prediction; None when the id is unknown.

        Raises :class:`AmbiguousRequestIdError` when a request id names several photos (a
        retried photo, logged again under its id, is one: its last answer gets the label),
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
    def summary(self, locations: bool = True) -> dict[str, Any]:
        """``locations``: with the log's path or database address (else null: see server.auth)."""
        return {
            "model_version": self.model_version,
            "class_names": list(self.class_names),
            "model_versions": self.figures.snapshot(),
            "store": self._store_summary(locations),
        }

    def _store_summary(self, locations: bool) -> dict[str, Any]:
        status = self.store.status()
        where: dict[str, Any] = {"backend": self.store.backend}
        if self.log_path is not None:
            where["path"] = str(self.log_path) if locations else None
        else:  # host, port and database: no credentials
            where["url"] = self.store.describe() if locations else None
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
