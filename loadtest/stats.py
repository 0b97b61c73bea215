"""Latency statistics shared by the load generator, the benchmark and the report."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by ``numpy.percentile`` (method "linear").

    NaN for an empty sequence: no requests means no latency, not zero.
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    if not values:
        return math.nan
    return float(np.percentile(values, q))


def summarize_ms(latencies_s: Sequence[float]) -> dict[str, float]:
    """Seconds in, milliseconds out: n, mean, p50, p90, p99, max."""
    ms = [1000.0 * v for v in latencies_s]
    if not ms:
        nan = math.nan
        return {"n": 0, "mean": nan, "p50": nan, "p90": nan, "p99": nan, "max": nan}
    return {
        "n": len(ms),
        "mean": sum(ms) / len(ms),
        "p50": percentile(ms, 50),
        "p90": percentile(ms, 90),
        "p99": percentile(ms, 99),
        "max": max(ms),
    }
