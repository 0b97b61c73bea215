"""One malloc arena for the whole server process (glibc).

glibc gives each new thread a malloc arena of its own, up to eight per core, and an arena keeps
the memory freed into it. The server's threads (the decode pool, the inference and parallel-run
threads, onnxruntime's pools, the log writers) each filled one with the buffers of the images
they decoded and let go: the default cascade's peak RSS after 600 requests was 308-315 MB with
glibc's default and 293-298 MB with one arena, at the same latency and throughput (README,
"Serving"). Contention on the one arena's lock stays low: Python's small objects have
their own allocator, and onnxruntime's tensors its arena.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping

M_ARENA_MAX = -8  # mallopt's parameter (malloc.h)


def cap_arenas(env: Mapping[str, str] = os.environ) -> bool:
    """Cap glibc's malloc arenas at one: threads that have an arena keep it, so call it before
    any starts (``python -m server`` does; ``create_app`` again, for other launchers). glibc's own
    ``MALLOC_ARENA_MAX``, when set, wins and nothing is changed. Returns whether it capped them
    (False also where the C library has no ``mallopt``)."""
    if "MALLOC_ARENA_MAX" in env:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return mallopt(M_ARENA_MAX, 1) == 1
