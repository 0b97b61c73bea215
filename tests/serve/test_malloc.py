"""server/malloc.py: one glibc malloc arena for the server process (its peak RSS; README
"Serving"), checked in a process of its own and in a real ``python -m server``."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import httpx
from conftest import ROOT, ServerProcess, build_tiny_model, image_bytes, tiny_contract

from catsdogs.preprocessing import PreprocessSpec

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


TRIM_SCRIPT = """
import numpy as np
from server.malloc import cap_arenas, resident_bytes, trim_heap
cap_arenas()
# 64 MiB in 16 KiB blocks: glibc's heap, not mmap; one block kept above them, as start-up keeps
# live objects above the buffers it frees, so glibc cannot give the freed space back by itself
blocks = [np.ones(2048) for _ in range(4096)]
pinned = np.ones(2048)
del blocks
before = resident_bytes()
returned = trim_heap()
print(before, resident_bytes(), returned)
"""


def test_trim_heap_returns_freed_heap_below_a_live_block() -> None:
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", TRIM_SCRIPT], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    before, after, returned = (int(x) for x in out.stdout.split())
    assert before - after == returned
    assert returned > 48 * 2**20  # most of the 64 MiB freed


def test_the_server_returns_its_start_up_heap_when_ready(server_process, tmp_path) -> None:
    """A real server trims its heap once start-up is done and says how much in its ready line:
    at the production input size its warm-up frees megabytes (the default cascade: about 30)."""
    contract = replace(
        tiny_contract(), input_size=224, preprocessing=PreprocessSpec(input_size=224, resize=256)
    )
    model = build_tiny_model(tmp_path / "tiny224.onnx", contract)
    server = server_process(MODEL_PATH=str(model))
    server.wait_ready()
    (ready,) = [
        json.loads(line)
        for line in server.output(tail=10**6).splitlines()
        if line.startswith("{") and json.loads(line).get("message") == "ready"
    ]
    assert ready["heap_returned_mb"] > 0
