"""The report's charts, drawn by matplotlib and written as SVG files beside the Markdown."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt
import numpy as np

SIZE_IN = (6.4, 3.0)
# no creation date in the file, and fixed element ids: the same figures give the same bytes
plt.rcParams["svg.hashsalt"] = "catsdogs"
# titles, legends and ticks are the model's names and versions: text, never TeX ('$' in a version
# was parsed as mathematics, and a stray one stopped the report)
plt.rcParams["text.parse_math"] = False
_METADATA = {"Date": None}


def _save(fig: plt.Figure, path: Path, title: str, y_label: str) -> None:
    ax = fig.axes[0]
    ax.set_title(title)
    ax.set_ylabel(y_label)
    ax.set_ylim(bottom=0)
    ax.grid(axis="y", color="#ddd")
    ax.set_axisbelow(True)
    ax.legend(loc="upper left", fontsize="small", frameon=False)
    fig.tight_layout()
    fig.savefig(path, format="svg", metadata=_METADATA)
    plt.close(fig)


def bar_chart(
    path: Path,
    title: str,
    categories: Sequence[str],
    series: dict[str, Sequence[float]],
    y_label: str,
) -> None:
    """Grouped bars: one group per category, one bar per series."""
    fig, ax = plt.subplots(figsize=SIZE_IN)
    x = np.arange(len(categories))
    width = 0.8 / max(1, len(series))
    for s, (name, values) in enumerate(series.items()):
        heights = [v if math.isfinite(v) else 0.0 for v in values]
        ax.bar(x + (s - (len(series) - 1) / 2) * width, heights, width, label=name)
    step = max(1, len(categories) // 12)
    ax.set_xticks(x[::step], list(categories)[::step], rotation=30, ha="right")
    _save(fig, path, title, y_label)


def line_chart(
    path: Path,
    title: str,
    x_labels: Sequence[str],
    series: dict[str, Sequence[float | None]],
    y_label: str,
) -> None:
    """Lines over ordered points (e.g. time buckets); None leaves a gap."""
    fig, ax = plt.subplots(figsize=SIZE_IN)
    x = np.arange(len(x_labels))
    for name, values in series.items():
        y = np.array([np.nan if v is None else v for v in values], dtype=float)
        ax.plot(x, y, marker="o", markersize=3, linewidth=2, label=name)
    step = max(1, math.ceil(len(x_labels) / 6))  # about six labels, so they never overlap
    ax.set_xticks(x[::step], list(x_labels)[::step])
    _save(fig, path, title, y_label)
