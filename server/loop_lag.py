"""How late the event loop runs: the signal of a server that is up but stalled.

Every request, health probe and answer goes through the one event loop. Anything that holds it
(CPU-bound work left on it by mistake, a C extension keeping the GIL, a process starved of CPU by
its neighbours or its cgroup quota) delays all of them at once, and no single request's stage
timings say why. :class:`LoopLag` asks to be woken every ``INTERVAL_S`` and records how late each
wake-up came in ``event_loop_lag_seconds`` (the alert ``ServeEventLoopStalled`` counts those
over 100 ms late). A wake-up ``LOG_AFTER_S`` late or more is logged with what the
server held at that moment, at most once per ``LOG_EVERY_S``; that line counts the late
wake-ups since the last one and gives the worst. It also says which kind of stall it was: the
CPU the event loop's thread used while the timer waited (``loop_cpu_ms``) is close to the wait
(``lag_ms`` plus the 100 ms asked for) when something ran on the loop for that long, and near
zero when the thread could not run at all (no CPU for the process, or another thread holding the
GIL); ``stall`` names the case: ``busy`` or ``starved``.

Cost: 10 wake-ups a second, as many as uvicorn's own tick (README, "Observability").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import Histogram

log = logging.getLogger("server.loop")

INTERVAL_S = 0.1
LOG_AFTER_S = 0.1
LOG_EVERY_S = 10.0
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class LoopLag:
    """A task on the event loop that measures how late the loop wakes it.

    ``context`` returns what the log line adds about the server's state (queued images...).
    """

    def __init__(
        self,
        histogram: Histogram,
        context: Callable[[], dict[str, Any]] = dict,
        *,
        interval_s: float = INTERVAL_S,
        log_after_s: float = LOG_AFTER_S,
        log_every_s: float = LOG_EVERY_S,
    ) -> None:
        self.histogram = histogram
        self.context = context
        self.interval_s = interval_s
        self.log_after_s = log_after_s
        self.log_every_s = log_every_s
        self._task: asyncio.Task[None] | None = None
        self._late = 0  # wake-ups at least log_after_s late since the last log line
        self._worst = 0.0
        self._logged_at = float("-inf")

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        clock, cpu = time.perf_counter, time.thread_time
        while True:
            due, cpu_before = clock() + self.interval_s, cpu()
            await asyncio.sleep(self.interval_s)
            self.record(max(0.0, clock() - due), cpu() - cpu_before)

    def record(self, lag: float, cpu_s: float = 0.0) -> None:
        """One wake-up, ``lag`` seconds late; ``cpu_s``: the loop thread's CPU since the timer
        was set."""
        self.histogram.observe(lag)
        if lag < self.log_after_s:
            return
        self._late += 1
        self._worst = max(self._worst, lag)
        now = time.monotonic()
        if now - self._logged_at < self.log_every_s:
            return
        fields = {
            "lag_ms": round(lag * 1000, 1),
            "loop_cpu_ms": round(cpu_s * 1000, 1),
            "stall": "busy" if cpu_s >= (lag + self.interval_s) / 2 else "starved",
            "late_wakeups": self._late,
            "worst_lag_ms": round(self._worst * 1000, 1),
            **self.context(),
        }
        log.warning("the event loop ran late", extra={"fields": fields})
        self._logged_at = now
        self._late = 0
        self._worst = 0.0
