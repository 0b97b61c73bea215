"""Running figures of the prediction log, per model version: labels, confidence, feedback.

The store's writer thread (SQLite) or refresher thread (PostgreSQL) updates them; the summary
route and the Prometheus collector read a snapshot, never the database.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from catsdogs import drift
from server.store import FeedbackResult, PredictionEvent, PrunedPrediction
from server.store_sqlite import iter_aggregates

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
