"""server/malloc.py: one glibc malloc arena for the server process (its peak RSS; README
"Serving"), checked in a process of its own and in a real ``python -m server``."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import httpx
from conftest import ROOT, ServerProcess, image_bytes

HEAP = 64 * 1024 * 1024  # glibc's HEAP_MAX_SIZE on 64-bit: each arena past the main one is one


def arena_heaps(pid: int) -> int:
    """How many glibc arena heaps process ``pid`` maps: anonymous regions starting on a 64 MiB
    boundary that add up to a whole number of 64 MiB (each heap is its used part, then its
    reserved rest). Heaps mapped one after another merge into one span: counted one per 64 MiB
    (an exact 64 MiB missed them, and the control saw no heap in about 1 run in 4)."""
    spans: dict[int, int] = {}
    start_of: dict[int, int] = {}  # a mapping's end -> the region's start it continues
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) > 5:  # a file or a named region ([stack], [heap], ...)
            continue
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        first = start_of.pop(lo, lo)
        spans[first] = spans.get(first, 0) + hi - lo
        start_of[hi] = first
    return sum(size // HEAP for lo, size in spans.items() if lo % HEAP == 0 and size % HEAP == 0)


SCRIPT = """
import ctypes, sys, threading
import numpy as np
from server.malloc import cap_arenas
capped = cap_arenas()
go = threading.Barrier(4)
def work():
    go.wait()
    kept = [np.ones(50_000) for _ in range(20)]  # malloc'd, not Python's small-object pool
    del kept
threads = [threading.Thread(target=work) for _ in range(4)]
[t.start() for t in threads]
[t.join() for t in threads]
sys.stderr.flush()
ctypes.CDLL(None).malloc_stats()  # one "Arena N:" block per arena, on stderr
print(capped)
"""


def run_script(env_extra: dict[str, str]) -> tuple[bool, int]:
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", **env_extra}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip() == "True", out.stderr.count("Arena ")


def test_threads_share_one_arena_unless_malloc_arena_max_says_otherwise() -> None:
    capped, arenas = run_script({})
    assert capped
    assert arenas == 1
    # glibc's own variable wins: the server leaves it, and each thread gets an arena of its own
    capped, arenas = run_script({"MALLOC_ARENA_MAX": "8"})
    assert not capped
    assert arenas > 1


def test_the_server_process_runs_on_one_arena(server_process) -> None:
    """A real server under concurrent requests maps no arena heap of its own beyond glibc's
    main one; told ``MALLOC_ARENA_MAX=8``, its threads make several."""

    def heaps_after_load(server: ServerProcess, rounds: int = 1) -> int:
        server.wait_ready()
        # a photo-sized upload: its decode and resize allocate megabytes on the decode threads
        # while the event loop parses the next bodies (a 64x48 one met in malloc too rarely)
        body = image_bytes((200, 40, 40), (640, 480))

        def post() -> None:
            for _ in range(8):
                r = httpx.post(
                    f"{server.url}/predict",
                    content=body,
                    headers={"Content-Type": "image/jpeg"},
                    timeout=30,
                )
                assert r.status_code == 200, r.text

        for _ in range(rounds):  # glibc adds a thread arena only when threads meet in malloc
            clients = [threading.Thread(target=post) for _ in range(6)]
            [c.start() for c in clients]
            [c.join() for c in clients]
            if arena_heaps(server.pid):
                break
        return arena_heaps(server.pid)

    assert heaps_after_load(server_process(), rounds=3) == 0
    # the control: without the cap, the same traffic makes arenas (it stops at the first round
    # that shows one)
    assert heaps_after_load(server_process(MALLOC_ARENA_MAX="8"), rounds=5) > 0
