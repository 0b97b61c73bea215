"""Prometheus figures of the monitor, read from its caches at scrape time (no database query)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily

if TYPE_CHECKING:
    from server.monitor import Monitor


class MonitorCollector:
    """A custom collector: registered once per monitor, collected at every scrape."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor

    def describe(self) -> list[Any]:
        return []  # dynamic families; nothing to check for name clashes at registration

    def collect(self) -> Any:
        m = self.monitor
        yield from _figure_families(m.figures.snapshot())
        age = m.store.refreshed_s_ago()
        if age is not None:  # a shared store: figures are as fresh as the last refresh
            fresh = GaugeMetricFamily(
                "monitor_figures_age_seconds",
                "Seconds since the monitor_* figures were last read from the shared store",
            )
            fresh.add_metric([], age)
            yield fresh
        yield from _log_gauges(m)
        yield from _drift_families(m)


def _figure_families(versions: dict[str, dict[str, Any]]) -> list[Any]:
    """Per model version: logged labels, feedback, live accuracy, confusion and confidence."""
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
    return [logged, feedback, accuracy, confusion, confidence]


def _drift_families(m: Monitor) -> list[GaugeMetricFamily]:
    """PSI and KS per feature of the drift window, and the window's size."""
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
    return [score, window]


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
