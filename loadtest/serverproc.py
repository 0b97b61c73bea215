"""Start the real server as a subprocess on a free loopback port, and always stop it.

Used by ``make load``, ``make bench`` and the test suites (tests/serve/conftest.py). The server
runs in the serving environment (``.venv-serve``), in its own process group, and is stopped by
that group's id. Standard library only, so every environment can import it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
SERVE_PYTHON = ROOT / ".venv-serve" / "bin" / "python"
# the 200 original-size shared photos (cat/, dog/): what load tests and benchmarks send
DEFAULT_PHOTOS = ROOT.parent / "shared" / "data" / "catsdogs" / "originals"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path
    ready_s: float = float("nan")  # seconds from spawn to the first 200 on /health/ready

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def log(self) -> Path:
        return self.log_path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self, tail: int = 4000) -> str:
        """The end of the server's log (stdout and stderr), for error messages."""
        return self.log_path.read_text(errors="replace")[-tail:]

    def wait_ready(self, timeout: float = 30.0, started: float | None = None) -> float:
        """Poll ``/health/ready`` until 200; seconds since ``started`` (default: now)."""
        started = time.perf_counter() if started is None else started
        deadline = started + timeout
        while time.perf_counter() < deadline:
            if not self.alive():
                raise RuntimeError(
                    f"the server exited with {self.proc.returncode} before it was ready "
                    f"({self.log_path}): {self.output()}"
                )
            if http_status(self.url + "/health/ready", timeout=1.0) == 200:
                self.ready_s = time.perf_counter() - started
                return self.ready_s
            time.sleep(0.02)
        raise TimeoutError(
            f"the server was not ready within {timeout} s ({self.log_path}): {self.output()}"
        )

    def terminate(self, timeout: float = 20.0) -> int | None:
        return stop_server(self, timeout)

    def memory_kb(self) -> dict[str, int]:
        """VmRSS (now) and VmHWM (peak) of the server process, in kB, from /proc."""
        out: dict[str, int] = {}
        with contextlib.suppress(OSError), open(f"/proc/{self.pid}/status") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(rest.split()[0])
        return out

    def thread_cpu_s(self) -> dict[int, float]:
        """CPU seconds each thread of the server has used so far (see :func:`thread_cpu_s`)."""
        return thread_cpu_s(self.pid)

    def cpu_s(self) -> float:
        """User + system CPU seconds the server has used so far (all its threads)."""
        with open(f"/proc/{self.pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds each thread of process ``pid`` has used so far, by thread id; the main
    thread (where uvicorn runs the event loop) has the process's id. From
    /proc/PID/task/TID/schedstat (nanoseconds); a thread that ends meanwhile is skipped."""
    out: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            out[int(task.name)] = int((task / "schedstat").read_text().split()[0]) / 1e9
    return out


def http_status(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def _memory_ceiling(limit: int) -> Callable[[], None]:
    """preexec_fn: cap the child's address space, so a runaway allocation fails in the server
    (MemoryError, or the kernel's refusal) instead of taking the machine down."""

    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def spawn_server(
    log_path: Path,
    args: Sequence[str] = (),
    *,
    env: Mapping[str, str] | None = None,
    python: Path = SERVE_PYTHON,
    memory_limit: int | None = None,
    module: str = "server",
) -> ServerProcess:
    """Spawn ``python -m server ARGS`` on a free port without waiting for it to be ready.

    ``env`` is added to this process's environment; ``memory_limit`` caps the child's address
    space (bytes); ``module`` runs another server that reads HOST and PORT the same way. A PORT
    in ``env`` is kept (a server restarted where its clients and scraper expect it)."""
    port = int(env["PORT"]) if env and "PORT" in env else free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # the address by environment, so ARGS stay exactly the caller's (flags would override it)
    child_env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port), **(env or {})}
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [str(python), "-m", module, *args],
            cwd=ROOT,
            env=child_env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, stopped as a whole
            preexec_fn=_memory_ceiling(memory_limit) if memory_limit else None,
        )
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", log_path)
    log.info("server pid %d on %s (log %s)", proc.pid, server.url, log_path)
    return server


def start_server(
    model: Path,
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    python: Path = SERVE_PYTHON,
    ready_timeout_s: float = 60.0,
    module: str = "server",
) -> ServerProcess:
    """Spawn ``python -m server --model MODEL`` on a free port and wait for ``/health/ready``."""
    started = time.perf_counter()
    server = spawn_server(log_path, ["--model", str(model)], env=env, python=python, module=module)
    try:
        server.wait_ready(ready_timeout_s, started)
    except BaseException:
        stop_server(server)
        raise
    return server


def exit_on_sigterm() -> None:
    """Make SIGTERM unwind this process as Ctrl-C does, so the servers it started are stopped.

    By default SIGTERM ends Python at once, skipping every ``finally`` and context manager; a
    server in its own process group (spawn_server) then outlives the tool that started it (a CI
    job's timeout, ``kill``, a terminal closed). Raising SystemExit(143) runs them instead."""

    def unwind(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, unwind)


def _signal(server: ServerProcess, sig: signal.Signals) -> None:
    """The server's process group when it leads one (spawn_server), else the process alone."""
    with contextlib.suppress(ProcessLookupError):
        if os.getpgid(server.pid) == server.pid:
            os.killpg(server.pid, sig)
        else:
            server.proc.send_signal(sig)


def stop_server(server: ServerProcess, grace_s: float = 15.0) -> int | None:
    """SIGTERM the server's process group, SIGKILL it after ``grace_s``; the exit code."""
    if server.alive():
        _signal(server, signal.SIGTERM)
        try:
            server.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            log.warning("server pid %d ignored SIGTERM for %.0f s; killing", server.pid, grace_s)
            _signal(server, signal.SIGKILL)
            server.proc.wait(timeout=10)
    return server.proc.returncode


@contextlib.contextmanager
def running_server(model: Path, log_path: Path, **kwargs: object) -> Iterator[ServerProcess]:
    server = start_server(model, log_path, **kwargs)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        stop_server(server)
