"""Test metrics of an exported ONNX file, computed the way the server sees photos.

ONE function, :func:`evaluate_session`, is used by the export stage (the ``metrics`` embedded in
the file) and by the evaluate stage (``reports/metrics.json``), so the two always agree.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from catsdogs.cascade import two_step
from catsdogs.contract import OUTPUT_ESCALATED, OUTPUT_PROBABILITIES
from catsdogs.manifest import ManifestRow
from catsdogs.metrics import classification_metrics
from catsdogs.preprocessing import PreprocessSpec, preprocess_bytes_info
from export.onnx_tools import onnx_outputs


def progress(
    items: Iterable[Any] | None = None, *, desc: str, total: int | None = None, unit: str = "photo"
) -> tqdm:
    """A progress bar on stderr, drawn only when stderr is a terminal (CI logs stay clean)."""
    return tqdm(
        items, desc=desc, total=total, unit=unit, leave=False, disable=None, file=sys.stderr
    )


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


def cascade_outputs(
    session: ort.InferenceSession,
    images: np.ndarray,
    paths: Sequence[Path],
    views: Mapping[str, PreprocessSpec],
) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, escalated) of a cascade file whose other models take views of their own:
    ``images`` (the first model's view of ``paths``) first, then each escalated photo's views."""

    def run(feed: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        probs, escalated = session.run([OUTPUT_PROBABILITIES, OUTPUT_ESCALATED], feed)
        return probs, escalated

    def prepared(rows: np.ndarray) -> dict[str, np.ndarray]:
        chosen = [paths[i] for i in rows]
        return {name: load_batch(chosen, spec, desc=name).images for name, spec in views.items()}

    return two_step(run, images, prepared)


def rounded_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """:func:`catsdogs.metrics.classification_metrics`, rounded as reports/metrics.json shows it."""
    return {
        k: v if k == "n" else round(float(v), 6)
        for k, v in classification_metrics(y_true, probs).items()
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
    views: Mapping[str, PreprocessSpec] | None = None,
) -> Evaluation:
    """Run the ONNX model on ``rows`` through the server's preprocessing and score it.

    ``batch`` may be passed when the photos were already preprocessed with ``spec``
    (export scores two files on the same photos). ``views``: a cascade file's other view inputs
    (``catsdogs.cascade``), prepared from the photo, as the server does, for the rows its first
    model escalates.
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
            images = batch.images[i : i + chunk]
            if views:
                paths = [Path(r.path) for r in rows[i : i + chunk]]
                parts.append(cascade_outputs(session, images, paths, views)[0])
            else:
                parts.append(onnx_outputs(session, images, chunk=chunk)[1])
            bar.update(len(parts[-1]))
    probs = np.concatenate(parts)
    return Evaluation(rounded_metrics(y_true, probs), y_true, probs, names, batch)
