"""Drift: reference statistics that travel inside the model, and scores against live traffic.

At export, :func:`build_reference_stats` summarises what the model saw in training and
validation as histograms over FIXED bin edges (defined here, so export and server always bin
the same way). The server keeps a rolling window of recent predictions and scores each feature
against the reference with the Population Stability Index (PSI) and a binned two-sample
Kolmogorov-Smirnov statistic (the largest gap between the two cumulative distributions).

numpy only: this module is imported by the torch-free server and by the export stage.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# Fixed bin edges. Values below the first edge fall into the first bin and values above the
# last into the last bin, so every observation is counted and no edge needs to be infinite
# (JSON has no infinity).
CONFIDENCE_EDGES: tuple[float, ...] = (
    0.0,
    0.5,
    0.6,
    0.7,
    0.8,
    0.9,
    0.95,
    0.98,
    0.99,
    0.995,
    0.999,
    1.0,
)
# Source image side in pixels: thumbnails, web photos, phone photos.
SIZE_EDGES: tuple[float, ...] = (
    0,
    64,
    128,
    192,
    256,
    320,
    400,
    500,
    640,
    800,
    1024,
    1280,
    1600,
    2048,
    3000,
    4000,
    100_000,
)
# Mean of the preprocessed uint8 model input.
BRIGHTNESS_EDGES: tuple[float, ...] = tuple(float(v) for v in range(0, 257, 16))

NUMERIC_FEATURES: dict[str, tuple[float, ...]] = {
    "confidence": CONFIDENCE_EDGES,
    "width": SIZE_EDGES,
    "height": SIZE_EDGES,
    "brightness": BRIGHTNESS_EDGES,
}
LABEL_FEATURE = "predicted_label"  # compared with reference_stats["predicted_balance"]

PSI_EPS = 1e-4  # floor for empty bins, so log(0) never happens
PSI_MODERATE = 0.1  # the usual rule of thumb: < 0.1 stable, 0.1-0.25 moderate, > 0.25 shifted
PSI_SIGNIFICANT = 0.25


def bin_counts(values: Sequence[float] | np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Counts of ``values`` in the bins of ``edges`` (len(edges) - 1 bins, outliers clipped)."""
    arr = np.asarray(values, dtype=np.float64).ravel()
    arr = arr[np.isfinite(arr)]
    inner = np.asarray(edges[1:-1], dtype=np.float64)
    # side="right": a value equal to an edge belongs to the bin that starts there
    idx = np.searchsorted(inner, arr, side="right")
    return np.bincount(idx, minlength=len(edges) - 1).astype(np.int64)


def histogram(values: Sequence[float] | np.ndarray, edges: Sequence[float]) -> dict[str, Any]:
    """The reference JSON of one numeric feature: fixed edges, counts, and summary moments."""
    arr = np.asarray(values, dtype=np.float64).ravel()
    arr = arr[np.isfinite(arr)]
    return {
        "edges": [float(e) for e in edges],
        "counts": [int(c) for c in bin_counts(arr, edges)],
        "mean": float(arr.mean()) if arr.size else None,
        "std": float(arr.std()) if arr.size else None,
    }


def _proportions(counts: Sequence[float] | np.ndarray) -> np.ndarray:
    arr = np.asarray(counts, dtype=np.float64)
    total = arr.sum()
    if total <= 0:
        raise ValueError("a distribution with no observations has no proportions")
    return arr / total


def psi(reference: Sequence[float] | np.ndarray, current: Sequence[float] | np.ndarray) -> float:
    """Population Stability Index between two binned distributions (counts or proportions).

    PSI = sum((c - r) * ln(c / r)) over bins, with empty bins floored at ``PSI_EPS``.
    0 means identical; it grows without bound as the distributions separate.
    """
    ref = np.maximum(_proportions(reference), PSI_EPS)
    cur = np.maximum(_proportions(current), PSI_EPS)
    if ref.shape != cur.shape:
        raise ValueError(f"bin count mismatch: {ref.shape} vs {cur.shape}")
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def ks_binned(
    reference: Sequence[float] | np.ndarray, current: Sequence[float] | np.ndarray
) -> float:
    """Two-sample Kolmogorov-Smirnov statistic on binned data: max |CDF_ref - CDF_cur|, 0..1."""
    ref = np.cumsum(_proportions(reference))
    cur = np.cumsum(_proportions(current))
    if ref.shape != cur.shape:
        raise ValueError(f"bin count mismatch: {ref.shape} vs {cur.shape}")
    return float(np.max(np.abs(ref - cur)))


def psi_level(value: float) -> str:
    if value >= PSI_SIGNIFICANT:
        return "significant"
    if value >= PSI_MODERATE:
        return "moderate"
    return "none"


def balance(labels: Sequence[str], class_names: Sequence[str]) -> dict[str, float]:
    """Share of each class name among ``labels`` (0.0 for a class never seen)."""
    n = len(labels)
    if n == 0:
        raise ValueError("no labels to compute a balance from")
    unknown = sorted(set(labels) - set(class_names))
    if unknown:
        raise ValueError(f"labels not among class_names: {unknown}")
    return {name: sum(1 for x in labels if x == name) / n for name in class_names}


def build_reference_stats(
    *,
    class_names: Sequence[str],
    train_labels: Sequence[str],
    val_probabilities: np.ndarray,
    widths: Sequence[int],
    heights: Sequence[int],
    brightness: Sequence[float],
) -> dict[str, Any]:
    """The ``reference_stats`` JSON stored in the model's metadata (see catsdogs/contract.py).

    ``train_labels``: class name of every training image (class balance).
    ``val_probabilities``: (n_val, n_classes) model probabilities on validation, columns in
    ``class_names`` order (predicted balance and confidence histogram).
    ``widths``, ``heights``: source pixel sizes; ``brightness``: mean of the preprocessed uint8
    input, 0..255 (same length as each other; training and validation images alike).
    """
    names = [str(c) for c in class_names]
    probs = np.asarray(val_probabilities, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(names) or probs.shape[0] == 0:
        raise ValueError(
            f"val_probabilities must be (n > 0, {len(names)}), got {tuple(probs.shape)}"
        )
    if not (len(widths) == len(heights) == len(brightness)) or len(widths) == 0:
        raise ValueError("widths, heights and brightness must be non-empty and of equal length")
    predicted = [names[i] for i in probs.argmax(axis=1)]
    return {
        "n": len(widths),
        "n_val": int(probs.shape[0]),
        "class_names": names,
        "class_balance": balance([str(x) for x in train_labels], names),
        "predicted_balance": balance(predicted, names),
        "confidence": histogram(probs.max(axis=1), CONFIDENCE_EDGES),
        "width": histogram(widths, SIZE_EDGES),
        "height": histogram(heights, SIZE_EDGES),
        "brightness": histogram(brightness, BRIGHTNESS_EDGES),
    }


def _score(ref_counts: Sequence[float], cur_counts: np.ndarray) -> dict[str, Any]:
    value = psi(ref_counts, cur_counts)
    return {
        "psi": round(value, 6),
        "ks": round(ks_binned(ref_counts, cur_counts), 6),
        "level": psi_level(value),
    }


def drift_scores(
    reference: Mapping[str, Any],
    *,
    confidence: Sequence[float],
    width: Sequence[float],
    height: Sequence[float],
    brightness: Sequence[float],
    labels: Sequence[str],
) -> dict[str, dict[str, Any]]:
    """PSI and KS of a window of recent traffic against ``reference`` (a reference_stats dict).

    A numeric feature is scored when the reference carries its histogram: the window is binned
    with the reference's own edges, so a reference made with other edges than this module's
    still compares like with like. The predicted-label balance is scored against
    ``predicted_balance``. Features the reference lacks are left out, never guessed.
    """
    window = {"confidence": confidence, "width": width, "height": height, "brightness": brightness}
    out: dict[str, dict[str, Any]] = {}
    for name, values in window.items():
        ref = reference.get(name)
        if not isinstance(ref, Mapping) or "edges" not in ref or "counts" not in ref:
            continue
        edges = [float(e) for e in ref["edges"]]
        if len(values) == 0 or sum(ref["counts"]) <= 0:
            continue
        cur = bin_counts(values, edges)
        out[name] = _score(ref["counts"], cur)
    ref_balance = reference.get("predicted_balance")
    if isinstance(ref_balance, Mapping) and labels:
        names = list(ref_balance)
        # labels the reference never had go into an extra bin, which the reference has at 0
        ref_p = [float(ref_balance[k]) for k in names] + [0.0]
        cur_c = [sum(1 for x in labels if x == k) for k in names]
        cur_c.append(len(labels) - sum(cur_c))
        if not math.isclose(sum(ref_p), 0.0):
            out[LABEL_FEATURE] = _score(ref_p, np.asarray(cur_c, dtype=np.float64))
    return out
