"""Test metrics of an exported ONNX file, computed the way the server sees photos.

ONE function, :func:`evaluate_session`, is used by the export stage (the ``metrics`` embedded in
the file) and by the evaluate stage (``reports/metrics.json``), so the two always agree.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnxruntime as ort
from sklearn import metrics as skm
from tqdm import tqdm

from export.onnx_export import onnx_outputs
from server.preprocessing import PreprocessSpec, preprocess_bytes_info


def progress(
    items: Iterable[Any] | None = None, *, desc: str, total: int | None = None, unit: str = "photo"
) -> tqdm:
    """A progress bar on stderr, drawn only when stderr is a terminal (CI logs stay clean)."""
    return tqdm(
        items, desc=desc, total=total, unit=unit, leave=False, disable=None, file=sys.stderr
    )


class ManifestRow(NamedTuple):
    path: Path
    label: str
    width: int
    height: int
    split: str
    brightness: float | None  # mean of the preprocessed uint8 input, as prepare measured it


def read_manifest(path: Path, split: str | None = None) -> list[ManifestRow]:
    """Rows of ``data/prepared/manifest.csv`` (optionally one split), in file order.

    Relative image paths are taken from the current directory (the repository root, where DVC
    runs every stage).
    """
    rows = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"path", "label", "split", "width", "height"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: manifest lacks columns {sorted(missing)}")
        for rec in reader:
            if split is not None and rec["split"] != split:
                continue
            brightness = float(rec["brightness"]) if rec.get("brightness") else None
            rows.append(
                ManifestRow(
                    Path(rec["path"]),
                    rec["label"],
                    int(rec["width"]),
                    int(rec["height"]),
                    rec["split"],
                    brightness,
                )
            )
    if not rows:
        raise ValueError(f"{path}: no rows for split {split!r}")
    return rows


class Batch(NamedTuple):
    images: np.ndarray  # uint8 (N, H, W, 3), the server's model input
    widths: np.ndarray  # source sizes in pixels, (N,)
    heights: np.ndarray


def load_batch(paths: Sequence[Path], spec: PreprocessSpec, desc: str = "photos") -> Batch:
    """Read and preprocess photos exactly as the server does (bytes -> uint8 HWC)."""
    arrays, widths, heights = [], [], []
    for p in progress(paths, desc=f"{desc}: preprocess"):
        info = preprocess_bytes_info(Path(p).read_bytes(), spec)
        arrays.append(info.array)
        widths.append(info.width)
        heights.append(info.height)
    return Batch(np.stack(arrays), np.asarray(widths), np.asarray(heights))


def classification_metrics(
    y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str]
) -> dict[str, Any]:
    """accuracy, precision, recall, f1, roc_auc, n.

    Two classes: precision/recall/f1 of the positive class ``class_names[1]`` (``dog``) and the
    ROC AUC of its probability. More classes: macro averages and one-vs-rest AUC.
    """
    y_true = np.asarray(y_true)
    y_pred = probs.argmax(axis=1)
    binary = len(class_names) == 2
    average = "binary" if binary else "macro"
    prec, rec, f1, _ = skm.precision_recall_fscore_support(
        y_true, y_pred, average=average, pos_label=1, zero_division=0
    )
    if len(np.unique(y_true)) < 2:
        auc = float("nan")  # undefined with one class present
    elif binary:
        auc = skm.roc_auc_score(y_true, probs[:, 1])
    else:
        auc = skm.roc_auc_score(y_true, probs, multi_class="ovr", labels=range(len(class_names)))
    return {
        "accuracy": round(float(skm.accuracy_score(y_true, y_pred)), 6),
        "precision": round(float(prec), 6),
        "recall": round(float(rec), 6),
        "f1": round(float(f1), 6),
        "roc_auc": round(float(auc), 6),
        "n": len(y_true),
    }


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, Any]
    y_true: np.ndarray  # (N,) class indices
    probs: np.ndarray  # (N, C) probabilities, columns in class_names order
    class_names: tuple[str, ...]
    batch: Batch


def evaluate_session(
    session: ort.InferenceSession,
    rows: Sequence[ManifestRow],
    spec: PreprocessSpec,
    class_names: Sequence[str],
    *,
    batch: Batch | None = None,
    chunk: int = 32,
    desc: str = "evaluate",
) -> Evaluation:
    """Run the ONNX model on ``rows`` through the server's preprocessing and score it.

    ``batch`` may be passed when the photos were already preprocessed with ``spec``
    (export scores two files on the same photos).
    """
    names = tuple(class_names)
    unknown = sorted({r.label for r in rows} - set(names))
    if unknown:
        raise ValueError(f"labels {unknown} are not among the model's classes {list(names)}")
    y_true = np.asarray([names.index(r.label) for r in rows])
    batch = batch if batch is not None else load_batch([r.path for r in rows], spec, desc)
    n = len(batch.images)
    with progress(desc=f"{desc}: infer", total=n) as bar:
        parts = []
        for i in range(0, n, chunk):
            parts.append(onnx_outputs(session, batch.images[i : i + chunk], chunk=chunk)[1])
            bar.update(len(parts[-1]))
    probs = np.concatenate(parts)
    return Evaluation(classification_metrics(y_true, probs, names), y_true, probs, names, batch)
