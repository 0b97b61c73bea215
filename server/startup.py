"""Where a server's start-up time goes: seconds per phase, the first counted from the process's
own start (so interpreter start-up and imports are in it, which no timer inside can see).

Phases, in order: ``boot`` (process start to the model's loading: the interpreter, imports,
settings), ``model_load`` (opening the model's sessions), ``uvicorn`` (``python -m server``
only: the event loop and server set up between the model and the lifespan), ``warmup`` (every
batch size run once, the batch curves timed) and ``services`` (the monitor, the batch loop).
Exported as ``server_startup_seconds{phase}`` and in the "ready" log line.
"""

from __future__ import annotations

import os
import time


def process_age_s() -> float:
    """Seconds since this process started (Linux /proc, 10 ms resolution); NaN elsewhere."""
    try:
        with open("/proc/self/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()  # after "pid (comm)": field 3 on
        with open("/proc/uptime") as uptime:
            now = float(uptime.read().split()[0])
    except (OSError, IndexError, ValueError):
        return float("nan")
    return max(0.0, now - int(fields[19]) / os.sysconf("SC_CLK_TCK"))  # field 22: starttime


class StartupPhases:
    """``end(phase)`` ends ``phase`` now; the first phase began when the process did."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last: float | None = None

    def end(self, phase: str) -> None:
        now = time.monotonic()
        took = process_age_s() if self._last is None else now - self._last
        self.seconds[phase] = round(took, 4)
        self._last = now
