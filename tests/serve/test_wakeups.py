"""Background threads of a real server: named in the OS, and woken per burst, not per request.

The access log and the prediction log are written by threads of their own. Waking each of them
once per request cost a thread switch and a turn at the GIL while the next request was read and
run; they now let a burst gather and wake a few times a second (server/logs.py AccessWriter,
server/store.py _WriteQueue). Counted here from the kernel's own per-thread context switches.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest
from conftest import RED, access_records, image_bytes

pytestmark = pytest.mark.serve

REQUESTS = 300


def _threads(pid: int) -> dict[int, tuple[str, int]]:
    """Thread id -> (OS name, voluntary context switches so far)."""
    found = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except OSError:
            continue  # it ended meanwhile
        switches = next(
            int(line.split()[1])
            for line in status.splitlines()
            if line.startswith("voluntary_ctxt_switches")
        )
        found[int(tid)] = (name, switches)
    return found


def _by_name(threads: dict[int, tuple[str, int]], name: str) -> tuple[int, int]:
    matches = [(tid, n) for tid, (comm, n) in threads.items() if comm == name]
    assert len(matches) == 1, (name, sorted(comm for comm, _ in threads.values()))
    return matches[0]


def test_writer_threads_are_named_and_wake_per_burst_not_per_request(server_process):
    server = server_process()
    server.wait_ready()
    body = image_bytes(RED)
    with httpx.Client(base_url=server.url, timeout=10.0) as client:
        for _ in range(5):  # every thread started, the writers' first rounds done
            client.post("/predict", content=body, headers={"Content-Type": "image/jpeg"})
        time.sleep(0.3)
        before = _threads(server.pid)
        names = {comm for comm, _ in before.values()}
        assert {"access-log", "predlog-writer", "inference_0"} <= names, sorted(names)
        started = time.monotonic()
        for _ in range(REQUESTS):
            r = client.post("/predict", content=body, headers={"Content-Type": "image/jpeg"})
            assert r.status_code == 200, r.text
        elapsed = time.monotonic() - started
        after = _threads(server.pid)
    for name in ("access-log", "predlog-writer"):
        tid, then = _by_name(before, name)
        assert _by_name(after, name)[0] == tid, name  # the same thread throughout
        woke = _by_name(after, name)[1] - then
        # One line at a time, each record found the writer asleep and woke it: at least one
        # switch per request. Now a burst costs a few (a wait for its first line, the linger,
        # turns at the GIL), however many requests it holds: measured 0.2 to 0.35 per request
        # here, with requests of 3 to 5 ms.
        assert woke < 0.75 * REQUESTS, (name, woke, REQUESTS, f"{elapsed:.2f} s")
    # nothing is lost by lingering: every prediction's access line is written
    access = access_records(server, lambda a: len(_predictions(a)) >= REQUESTS + 5)
    assert len(_predictions(access)) == REQUESTS + 5
    assert all(x["status"] == 200 for x in _predictions(access))


def _predictions(access: list[dict]) -> list[dict]:
    return [x for x in access if x.get("route") == "/predict"]


def test_a_thread_takes_its_python_name_in_the_os_cut_to_fifteen_bytes():
    import threading

    from server.threads import name_os_thread

    seen: list[str] = []

    def work() -> None:
        name_os_thread()
        tid = threading.get_native_id()
        seen.append(Path(f"/proc/self/task/{tid}/comm").read_text().strip())
        name_os_thread("a-much-longer-name-than-fits")
        seen.append(Path(f"/proc/self/task/{tid}/comm").read_text().strip())

    thread = threading.Thread(target=work, name="decode_3")
    thread.start()
    thread.join(timeout=10)
    assert seen == ["decode_3", "a-much-longer-n"]


def _nice(pid: int, tid: int) -> int:
    stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])  # field 19, counted after "(comm)"


@pytest.mark.parametrize("worker_nice", [None, "0"])
def test_the_heavy_threads_yield_to_the_event_loop(server_process, worker_nice) -> None:
    """Decoding, preprocessing and the model run on threads WORKER_NICE (10) lower than the
    event loop's, onnxruntime's own pool threads included: on saturated cores the loop still
    answers probes and refuses work at once."""
    env = {"INTRA_OP_THREADS": "2", "PARALLEL_RUNS": "1"}  # batches decode on the pool
    if worker_nice is not None:
        env["WORKER_NICE"] = worker_nice
    server = server_process(**env)
    server.wait_ready()
    files = [("files", (f"{i}.jpg", image_bytes(RED), "image/jpeg")) for i in range(4)]
    with httpx.Client(base_url=server.url, timeout=10.0) as client:
        for _ in range(3):  # every pool has started its threads
            assert client.post("/predict/batch", files=files).status_code == 200
            r = client.post(
                "/predict", content=image_bytes(RED), headers={"Content-Type": "image/jpeg"}
            )
            assert r.status_code == 200
    threads = _threads(server.pid)
    nice = {tid: _nice(server.pid, tid) for tid in threads}
    expected = 10 if worker_nice is None else 0
    names = {comm for comm, _ in threads.values()}
    assert not threads[server.pid][0].startswith("onnxruntime")  # the event loop's thread
    assert nice[server.pid] == 0
    heavy = {
        tid: comm
        for tid, (comm, _) in threads.items()
        if comm.startswith(("inference", "decode", "parallel", "onnxruntime"))
    }
    # onnxruntime's pool threads inherit the name and priority of the thread that opened it
    assert "onnxruntime_0" in names, sorted(names)
    assert "inference_0" in names, sorted(names)
    assert any(name.startswith("decode") for name in names), sorted(names)
    wrong = {(comm, nice[tid]) for tid, comm in heavy.items() if nice[tid] != expected}
    assert not wrong, (expected, sorted(wrong))
    for comm in ("access-log", "predlog-writer"):
        tid, _ = _by_name(threads, comm)
        assert nice[tid] == 0, comm
