"""The server's threads by name in the operating system, not only in Python.

``top -H -p PID``, ``ps -L``, ``py-spy dump`` and ``/proc/PID/task/TID/comm`` then say which of
the server's threads uses the CPU or wakes up (the event loop is the process's own name; the
inference and decode threads, the access-log and prediction-log writers each their own), instead
of a dozen ``python`` lines. Python names its threads in the OS itself only from 3.14.
"""

from __future__ import annotations

import threading

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
