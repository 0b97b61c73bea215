"""A cascade file whose models each take their own view of a photo (``train.cascade_views: own``).

The file (``export.cascade``) takes ``image``, the first model's view, and one more input per
other view, named by :func:`view_name`, which only its escalated path reads. Its contract lists
them (``cascade.views``: each input's name and preprocessing), so whoever runs it (the server, the
export and evaluate stages) prepares a photo's other views only when the first model is unsure
of it: :func:`two_step`. No torch here: the server imports it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from catsdogs.contract import INPUT_NAME
from catsdogs.preprocessing import PreprocessSpec

Run = Callable[[dict[str, np.ndarray]], tuple[np.ndarray, np.ndarray]]


def view_name(input_size: int, resize: int | None = None) -> str:
    """The file's input for the view ``input_size`` px of a ``resize`` px shorter side."""
    return f"{INPUT_NAME}@{input_size}" + (f"/{resize}" if resize is not None else "")


def contract_views(cascade: Mapping[str, Any] | None) -> dict[str, PreprocessSpec]:
    """The view inputs a contract's ``cascade`` entry lists (input -> preprocessing); {} for a
    file without any (no cascade, or every model on ``image``)."""
    views = (cascade or {}).get("views") or []
    if not isinstance(views, list):
        raise ValueError(f"cascade.views must be a list, got {type(views).__name__}")
    return {str(v["input"]): PreprocessSpec.from_json(v["preprocessing"]) for v in views}


def views_entry(specs: Mapping[str, PreprocessSpec]) -> list[dict[str, str]]:
    """``contract_views``'s inverse: what the contract's ``cascade.views`` holds."""
    return [{"input": name, "preprocessing": spec.to_json()} for name, spec in specs.items()]


def two_step(
    run: Run, batch: np.ndarray, views: Callable[[np.ndarray], Mapping[str, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
    """A cascade file's answers, its other views prepared only for the rows that escalate.

    ``run(feed)`` runs the file (-> probabilities, escalated); ``views(rows)`` gives every view
    input of those rows (indices into ``batch``). The first call feeds ``image`` alone; the
    escalated rows then run again with their views, and their answers replace the first's.
    Returns (probabilities (N, C), escalated (N,))."""
    probs, escalated = run({INPUT_NAME: batch})
    rows = np.flatnonzero(escalated)
    if len(rows):
        again, _ = run({INPUT_NAME: batch[rows], **views(rows)})
        probs = probs.copy()
        probs[rows] = again
    return probs, escalated
