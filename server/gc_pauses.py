"""The garbage collector's pauses: the start-up heap frozen, every collection timed.

A full (generation 2) collection walks every object the collector tracks, with the GIL held, on
whichever thread allocated last: the event loop, and every request on it, waits as long. A
started server holds about 45,000 such objects (modules, the app, the model's contract), and a
full collection took 17-33 ms on this project's 2-core VM, the largest stall of the event loop
the hostile suite's liveness probe saw. So once start-up is done the server collects once and
freezes what is left (``gc.freeze()``): those objects are never walked again, and a full
collection then took about 2 ms (about 4,000 objects tracked). Frozen objects are still freed by
reference counting when released; only a reference cycle among them would never be collected.

Every collection's pause is exported as ``python_gc_pause_seconds{generation}`` and the frozen
objects as ``python_gc_frozen_objects``. The timing runs inside ``gc.callbacks`` (no collection
starts while one runs) and touches no lock: plain integer and float updates under the GIL.
"""

from __future__ import annotations

import bisect
import gc
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
GENERATIONS = 3


class GcPauses(Collector):
    """Freezes the heap at :meth:`start` and times every collection until :meth:`stop`."""

    def __init__(self) -> None:
        # per generation: observations per bucket (the last one past every bound), their sum
        self._counts = [[0] * (len(BUCKETS) + 1) for _ in range(GENERATIONS)]
        self._sums = [0.0] * GENERATIONS
        self._started: float | None = None
        self._running = False

    def start(self) -> None:
        """Once start-up is done: collect, freeze what is left, time collections from now on."""
        gc.collect()
        gc.freeze()
        if not self._running:
            gc.callbacks.append(self._callback)
            self._running = True

    def stop(self) -> None:
        if self._running:
            gc.callbacks.remove(self._callback)
            self._running = False
        gc.unfreeze()

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        now = time.perf_counter()
        if phase == "start":
            self._started = now
            return
        if self._started is None:
            return
        seconds, self._started = now - self._started, None
        generation = info["generation"]
        self._counts[generation][bisect.bisect_left(BUCKETS, seconds)] += 1
        self._sums[generation] += seconds

    def collect(self) -> Iterator[Metric]:
        pauses = HistogramMetricFamily(
            "python_gc_pause_seconds",
            "Pauses of the garbage collector by generation; the GIL is held throughout, so the "
            "event loop waits as long.",
            labels=["generation"],
        )
        for generation in range(GENERATIONS):
            counts, total, buckets = self._counts[generation], 0, []
            for bound, count in zip((*map(str, BUCKETS), "+Inf"), counts, strict=True):
                total += count
                buckets.append((bound, total))
            pauses.add_metric([str(generation)], buckets, self._sums[generation])
        yield pauses
        yield GaugeMetricFamily(
            "python_gc_frozen_objects",
            "Objects frozen after start-up: never walked by a collection.",
            value=gc.get_freeze_count(),
        )
