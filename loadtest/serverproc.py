"""Start the real server as a subprocess on a free loopback port, and always stop it.

Used by ``make load``, ``make bench`` and the slow tests. The server runs in the serving
environment (``.venv-serve``), in its own process group, and is stopped by that group's id.
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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
SERVE_PYTHON = ROOT / ".venv-serve" / "bin" / "python"


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

    def alive(self) -> bool:
        return self.proc.poll() is None

    def memory_kb(self) -> dict[str, int]:
        """VmRSS (now) and VmHWM (peak) of the server process, in kB, from /proc."""
        out: dict[str, int] = {}
        with contextlib.suppress(OSError), open(f"/proc/{self.pid}/status") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(rest.split()[0])
        return out

    def cpu_s(self) -> float:
        """User + system CPU seconds the server has used so far (all its threads)."""
        with open(f"/proc/{self.pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def http_status(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def wait_ready(server: ServerProcess, started: float, timeout_s: float) -> None:
    deadline = started + timeout_s
    while time.perf_counter() < deadline:
        if not server.alive():
            raise RuntimeError(
                f"the server exited with {server.proc.returncode} before it was ready; "
                f"see {server.log_path}"
            )
        if http_status(server.url + "/health/ready", timeout=1.0) == 200:
            server.ready_s = time.perf_counter() - started
            return
        time.sleep(0.02)
    raise TimeoutError(f"the server was not ready within {timeout_s} s; see {server.log_path}")


def start_server(
    model: Path,
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    python: Path = SERVE_PYTHON,
    ready_timeout_s: float = 60.0,
) -> ServerProcess:
    """Spawn ``python -m server`` on a free port and wait for ``/health/ready``."""
    port = free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    child_env = {**os.environ, **(env or {})}
    cmd = [str(python), "-m", "server", "--model", str(model), "--host", "127.0.0.1"]
    cmd += ["--port", str(port)]
    with log_path.open("wb") as log_file:
        started = time.perf_counter()
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=child_env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, stopped as a whole
        )
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", log_path)
    log.info("server pid %d on %s (log %s)", proc.pid, server.url, log_path)
    try:
        wait_ready(server, started, ready_timeout_s)
    except BaseException:
        stop_server(server)
        raise
    return server


def stop_server(server: ServerProcess, grace_s: float = 15.0) -> int | None:
    """SIGTERM the server's process group, SIGKILL it after ``grace_s``; the exit code."""
    if server.alive():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            log.warning("server pid %d ignored SIGTERM for %.0f s; killing", server.pid, grace_s)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.proc.wait(timeout=10)
    return server.proc.returncode


@contextlib.contextmanager
def running_server(model: Path, log_path: Path, **kwargs: object) -> Iterator[ServerProcess]:
    server = start_server(model, log_path, **kwargs)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        stop_server(server)
