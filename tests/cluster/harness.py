"""The parts of the cluster test: server replicas, HAProxy and a load generator, all real
processes on 127.0.0.1 (PostgreSQL comes from tests/serve/pg_server.py).

The load generator is a closed loop of asyncio workers on httpx: each predicts an image through
the balancer, then posts feedback for that prediction's ``prediction_id``, and records every
request's outcome (status, the replica that answered from HAProxy's ``X-Served-By``, the phase
of the test it started in), so each scenario is judged on what clients really saw.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
BACKEND = "serve"  # the backend's name in haproxy.cfg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, step: float = 0.05) -> float:
    """Seconds until ``predicate()`` held; fails the test after ``timeout``."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(step)
    return time.monotonic() - started


# ---------------------------------------------------------------------- replicas
class Replica:
    """``python -m server`` on a fixed port (a restart comes back where HAProxy expects it)."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **env, "HOST": "127.0.0.1", "PORT": str(self.port)}
        self.log = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "server"],
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def ready(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited: {self.tail()}")
        try:
            return httpx.get(f"{self.url}/health/ready", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def sigterm(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", timeout=5)

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


# ---------------------------------------------------------------------- HAProxy
class HAProxy:
    """haproxy -db on the committed config, pointed at the replicas through its environment."""

    def __init__(self, replicas: list[Replica], workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.socket = workdir / "haproxy.sock"
        self.log = workdir / "haproxy.log"
        self.env = {
            **os.environ,
            "HAPROXY_BIND": f"127.0.0.1:{self.port}",
            "HAPROXY_STATS_SOCKET": str(self.socket),
            **{f"SERVE_{i + 1}": f"127.0.0.1:{r.port}" for i, r in enumerate(replicas)},
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [binary, "-db", "-f", str(HAPROXY_CFG)],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_for(self.socket.exists, 10, "haproxy's stats socket")

    def states(self) -> dict[str, str]:
        """Each replica's check status as HAProxy sees it: UP, DOWN, UP 1/2, DOWN 1/2, ..."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(str(self.socket))
            s.sendall(b"show stat\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        text = b"".join(chunks).decode().lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {
            r["svname"]: r["status"]
            for r in rows
            if r["pxname"] == BACKEND and r["svname"] not in ("BACKEND", "FRONTEND")
        }

    def state(self, name: str) -> str:
        return self.states()[name]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


# ---------------------------------------------------------------------- load
@dataclass
class Outcome:
    kind: str  # predict or feedback
    phase: str  # the test's phase when the request started
    started: float  # monotonic seconds
    ended: float
    status: int | None  # None: no HTTP answer (connection refused, reset, timeout)
    served_by: str | None  # the replica that answered (X-Served-By)
    prediction_id: str | None = None
    label: str | None = None  # feedback: the true label sent
    predicted_label: str | None = None
    predicted_by: str | None = None  # feedback: the replica that served the prediction
    error: str | None = None  # no HTTP answer: what the client saw

    @property
    def ok(self) -> bool:
        return self.status == (200 if self.kind == "predict" else 201)


class LoadGenerator:
    """``workers`` clients, each: predict, then feedback for that prediction, then a short
    pause; every ``wrong_every``-th feedback names the other class (accuracy below 1)."""

    def __init__(
        self,
        url: str,
        images: dict[str, bytes],
        *,
        workers: int = 6,
        pause_s: float = 0.02,
        wrong_every: int = 5,
    ) -> None:
        self.url = url
        self.images = images  # true label -> an image the model gets right
        self.workers = workers
        self.pause_s = pause_s
        self.wrong_every = wrong_every
        self.phase = "start"
        self.outcomes: list[Outcome] = []
        self.inflight = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sent = 0

    # ------------------------------------------------------------------ control
    def start(self) -> None:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)

    # ------------------------------------------------------------------ the loop
    async def _main(self) -> None:
        limits = httpx.Limits(max_connections=self.workers, max_keepalive_connections=self.workers)
        async with httpx.AsyncClient(base_url=self.url, timeout=30, limits=limits) as client:
            await asyncio.gather(*(self._worker(client, i) for i in range(self.workers)))

    async def _worker(self, client: httpx.AsyncClient, index: int) -> None:
        labels = sorted(self.images)
        n = index
        while not self._stop.is_set():
            truth = labels[n % len(labels)]
            n += 1
            predicted = await self._predict(client, truth)
            if predicted is not None:
                with self._lock:
                    self._sent += 1
                    wrong = self._sent % self.wrong_every == 0
                other = labels[(labels.index(truth) + 1) % len(labels)]
                await self._feedback(client, predicted, other if wrong else truth)
            await asyncio.sleep(self.pause_s)

    async def _request(self, call) -> tuple[httpx.Response | str, float, float, str]:
        """The response, or the client's error as ``Type: message``, with timing and phase."""
        phase = self.phase
        with self._lock:
            self.inflight += 1
        started = time.monotonic()
        try:
            response: httpx.Response | str = await call()
        except httpx.HTTPError as exc:
            response = f"{type(exc).__name__}: {exc}"
        finally:
            with self._lock:
                self.inflight -= 1
        return response, started, time.monotonic(), phase

    async def _predict(self, client: httpx.AsyncClient, truth: str) -> Outcome | None:
        image = self.images[truth]
        response, started, ended, phase = await self._request(
            lambda: client.post("/predict", content=image, headers={"content-type": "image/jpeg"})
        )
        outcome = Outcome("predict", phase, started, ended, None, None)
        if isinstance(response, str):
            outcome.error = response
        else:
            outcome.status = response.status_code
            outcome.served_by = response.headers.get("x-served-by")
            if response.status_code == 200:
                body = response.json()
                outcome.prediction_id = body["prediction_id"]
                outcome.predicted_label = body["label"]
        self._record(outcome)
        return outcome if outcome.ok else None

    async def _feedback(self, client: httpx.AsyncClient, predicted: Outcome, label: str) -> None:
        body = {"prediction_id": predicted.prediction_id, "label": label}
        response, started, ended, phase = await self._request(
            lambda: client.post("/feedback", json=body)
        )
        answered = not isinstance(response, str)
        outcome = Outcome(
            "feedback",
            phase,
            started,
            ended,
            response.status_code if answered else None,
            response.headers.get("x-served-by") if answered else None,
            prediction_id=predicted.prediction_id,
            label=label,
            predicted_label=predicted.predicted_label,
            predicted_by=predicted.served_by,
            error=None if answered else response,
        )
        self._record(outcome)

    def _record(self, outcome: Outcome) -> None:
        with self._lock:
            self.outcomes.append(outcome)
