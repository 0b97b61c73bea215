"""The server's threads by name in the operating system, not only in Python.

``top -H -p PID``, ``ps -L``, ``py-spy dump`` and ``/proc/PID/task/TID/comm`` then say which of
the server's threads uses the CPU or wakes up (the event loop is the process's own name; the
inference and decode threads, the access-log and prediction-log writers each their own), instead
of a dozen ``python`` lines. Python names its threads in the OS itself only from 3.14.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

log = logging.getLogger("server")
T = TypeVar("T")

OS_NAME_BYTES = 15  # the kernel keeps this many bytes of a thread's name


def name_os_thread(name: str | None = None) -> None:
    """Give the calling thread ``name`` (default: its Python name) in the OS. Linux only; a
    no-op where ``/proc`` cannot name it. Usable as a thread pool's ``initializer``."""
    text = (name or threading.current_thread().name)[:OS_NAME_BYTES]
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as fh:
            fh.write(text)
    except Exception:  # a name is cosmetic: it must never break a pool's initializer
        pass


def lower_priority(nice: int) -> None:
    """Run the calling thread ``nice`` lower than the process's main thread (Linux keeps
    niceness per thread, and a thread starts with its creator's: a pool thread started from a
    lowered thread is set to the same level, not lowered twice). Lowering one's own priority
    needs no privilege; a failure only warns."""
    if nice <= 0:
        return
    tid = threading.get_native_id()
    try:
        base = os.getpriority(os.PRIO_PROCESS, os.getpid())  # the main thread's
        os.setpriority(os.PRIO_PROCESS, tid, min(19, base + nice))
    except (AttributeError, OSError) as exc:
        log.warning("cannot lower the priority of thread %s: %s", tid, exc)


def worker_initializer(nice: int) -> Callable[[], None]:
    """A thread pool's ``initializer``: its threads named in the OS and ``nice`` lower."""
    return functools.partial(_start_worker, nice)


def _start_worker(nice: int) -> None:
    name_os_thread()
    lower_priority(nice)


def call_at_lower_priority(fn: Callable[[], T], nice: int, name: str) -> T:
    """``fn()`` on a new thread ``nice`` lower, waited for: the threads it starts (onnxruntime's
    pool threads, when it opens a session) inherit that priority and that thread's name."""
    start = worker_initializer(nice)
    with ThreadPoolExecutor(1, thread_name_prefix=name, initializer=start) as one:
        return one.submit(fn).result()
