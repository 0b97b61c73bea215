"""A stage run as a user runs it in a terminal, to be stopped the way a user stops it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def process_group(
    cmd: list[str], cwd: Path, env: Mapping[str, str] | None = None
) -> Iterator[subprocess.Popen]:
    """``cmd`` in a process group of its own (as a terminal's foreground job: Ctrl-C reaches its
    children too), its output merged into one text pipe, SIGINT at its default: a shell without
    job control (CI's, in the background) hands its children SIGINT ignored, and Python keeps
    ignoring it. Whatever happens in the block, the group is gone after it."""
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=None if env is None else dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=_sigint_default,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def stop_group(proc: subprocess.Popen, sig: int, timeout: float = 60) -> str:
    """Send ``sig`` to ``proc``'s whole group (Ctrl-C: SIGINT) and return its output."""
    os.killpg(proc.pid, sig)
    return output_or_stacks(proc, timeout)


def output_or_stacks(proc: subprocess.Popen, timeout: float) -> str:
    """``proc``'s output once it ends within ``timeout`` s; if it hangs instead, a failure with
    every thread's stack (the child needs ``PYTHONFAULTHANDLER=1``: SIGABRT then dumps them), so
    a stop that hangs once in a loaded run says where."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        try:
            out = proc.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            out = proc.communicate()[0]
        stacks = out[-6000:]
        raise AssertionError(f"no exit {timeout} s after the stop; its stacks:\n{stacks}") from None
