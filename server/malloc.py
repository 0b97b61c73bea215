"""One malloc arena for the whole server process (glibc).

glibc gives each new thread a malloc arena of its own, up to eight per core, and an arena keeps
the memory freed into it. The server's threads (the decode pool, the inference and parallel-run
threads, onnxruntime's pools, the log writers) each filled one with the buffers of the images
they decoded and let go: the default cascade's peak RSS after 600 requests was 308-315 MB with
glibc's default and 293-298 MB with one arena, at the same latency and throughput (README,
"Serving"). Contention on the one arena's lock stays low: Python's small objects have
their own allocator, and onnxruntime's tensors its arena.

The heap that start-up frees (the contract check's session, the warm-up's buffers) stays with
the process too: glibc returns the top of its heap only, and start-up leaves live blocks above
the freed ones. ``trim_heap`` hands it back once, when the server is ready: the default cascade's
idle RSS 252 -> 220 MB, its peak under load 18-43 MB lower, the latency the same (2026-12-05,
interleaved A/B). It takes about 2 ms.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping
from pathlib import Path

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


def resident_bytes() -> int:
    """This process's resident set size, from ``/proc/self/statm`` (0 where there is none)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def trim_heap() -> int | None:
    """Return the freed memory glibc's heap keeps to the system (``malloc_trim(0)``, every
    arena); the bytes the resident set shrank by, or None where the C library has no
    ``malloc_trim``."""
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    malloc_trim.argtypes = [ctypes.c_size_t]
    before = resident_bytes()
    malloc_trim(0)
    return max(before - resident_bytes(), 0)
