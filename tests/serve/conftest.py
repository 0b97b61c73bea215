"""Fixtures of the serving suite: a tiny ONNX model with a full contract, apps, real servers.

The tiny model follows the real model's contract exactly (uint8 NHWC ``image`` with a symbolic
batch, ``logits`` and ``probabilities``, complete metadata) and its answer depends on the
picture: mostly red -> cat, mostly blue -> dog, so tests can check outcomes, not just shapes.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from PIL import Image

from catsdogs.contract import ModelContract
from catsdogs.preprocessing import PreprocessSpec
from loadtest.serverproc import ServerProcess, spawn_server
from loadtest.serverproc import free_port as free_port  # re-exported for the suites
from loadtest.tiny_model import write_tiny_model
from server.app import create_app
from server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
PHOTOS = ROOT.parent / "shared" / "data" / "catsdogs"
TINY_SIZE = 32
CLASS_NAMES = ("cat", "dog")
TINY_VERSION = "tiny-1"


def tiny_contract() -> ModelContract:
    return ModelContract(
        class_names=CLASS_NAMES,
        input_size=TINY_SIZE,
        preprocessing=PreprocessSpec(input_size=TINY_SIZE, resize=36),
        model_name="tiny_color",
        model_version=TINY_VERSION,
        mlflow_run_id="run-0",
        git_commit="0" * 40,
        data_version="d" * 64,
        exported_at="2026-01-01T00:00:00Z",
        extra={"metrics": {"accuracy": 1.0, "n": 4}, "quantization": "none"},
    )


def build_tiny_model(path: Path, contract: ModelContract | None = None) -> Path:
    """The shared tiny model (loadtest.tiny_model) with this suite's contract: red -> cat."""
    return write_tiny_model(path, contract=contract or tiny_contract())


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny.onnx")


@pytest.fixture
def settings(tiny_model: Path, tmp_path: Path) -> Settings:
    return Settings(
        model_path=str(tiny_model),
        prediction_log_path=str(tmp_path / "predictions.db"),
        intra_op_threads=1,
        decode_threads=2,
        log_level="warning",
        # batches grow to exactly the MAX_BATCH_SIZE a test sets (test_batching.py tests the
        # measured limit of ADAPTIVE_BATCH=1, the server's default)
        adaptive_batch=0,
        # one batch at a time, so batches form as the tests expect (test_parallel_runs.py tests
        # PARALLEL_RUNS, the server's default of one run per CPU under load)
        parallel_runs=1,
    )


def image_bytes(color: tuple[int, int, int], size: tuple[int, int] = (64, 48), fmt="JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


RED = (220, 30, 30)
BLUE = (30, 30, 220)


def solid_png(side: int, color: tuple[int, int, int] = RED) -> bytes:
    """A ``side`` x ``side`` PNG: a few kB to send (about side**2 / 1000 bytes), ``side**2``
    pixels to decode (about 80 ms for 3000 px on one core)."""
    buf = io.BytesIO()
    Image.new("RGB", (side, side), color).save(buf, "PNG")
    return buf.getvalue()


def send_batches_and_hang_up(
    url: str, images: list[bytes], *, clients: int, after_s: float
) -> None:
    """``clients`` connections each send ``POST /predict/batch`` of ``images`` (PNG) to
    ``url`` (http://host:port, raw HTTP/1.1), wait ``after_s`` and close without reading."""
    files = [("files", (f"{i}.png", png, "image/png")) for i, png in enumerate(images)]
    request = httpx.Request("POST", f"{url}/predict/batch", files=files)
    body = request.read()
    head = (
        f"POST /predict/batch HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: {request.headers['content-type']}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sockets = [socket.create_connection((host, int(port)), timeout=10) for _ in range(clients)]
    try:
        for sock in sockets:
            sock.sendall(head + body)
        time.sleep(after_s)
    finally:
        for sock in sockets:
            sock.close()


def predict_jpegs(url: str, n: int, color: tuple[int, int, int] = RED) -> None:
    """``n`` raw-JPEG ``POST /predict`` to a real server at ``url``, each answered 200."""
    body = image_bytes(color)
    for _ in range(n):
        r = httpx.post(f"{url}/predict", content=body, headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 200, r.text


def photos(label: str, n: int, folder: str = "images") -> list[Path]:
    return sorted((PHOTOS / folder / label).iterdir())[:n]


def prom(text: str, metric: str, /, **labels: str) -> float:
    """Sum of the samples called ``metric`` whose labels include ``labels``."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == metric and labels.items() <= sample.labels.items()
    )


# ---------------------------------------------------------------------- in-process app
@contextlib.asynccontextmanager
async def serve(app) -> AsyncIterator[httpx.AsyncClient]:
    """Run the app's lifespan and give an httpx client talking to it in-process."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def make_app(settings: Settings):
    def factory(**changes):
        return create_app(replace(settings, **changes))

    return factory


# ---------------------------------------------------------------------- real processes
def start_server(
    env_extra: dict[str, str],
    log: Path,
    args: list[str] | None = None,
    *,
    memory_limit: int | None = None,
) -> ServerProcess:
    """``python -m server`` of this environment on a free port, not yet ready; ``memory_limit``
    caps its address space (bytes)."""
    return spawn_server(
        log,
        args or [],
        env={"LOG_LEVEL": "info", **env_extra},
        python=Path(sys.executable),
        memory_limit=memory_limit,
    )


def access_records(
    server: ServerProcess, done: Callable[[list[dict]], bool], timeout: float = 5.0
) -> list[dict]:
    """A real server's access-log records (JSON), read again until ``done`` holds for them or
    ``timeout`` s pass. The access log is written by its own thread, which lets a burst gather
    for up to 50 ms (``server.logs.AccessWriter``): a line can follow its answer by that long."""
    deadline = time.monotonic() + timeout
    while True:
        lines = server.output(tail=10**9).splitlines()
        records = [json.loads(line) for line in lines if line.startswith("{")]
        access = [r for r in records if r.get("logger") == "server.access"]
        if done(access) or time.monotonic() > deadline:
            return access
        time.sleep(0.05)


@pytest.fixture
def server_process(tiny_model: Path, tmp_path: Path) -> Iterator:
    started: list[ServerProcess] = []

    def factory(**env: str) -> ServerProcess:
        base = {
            "MODEL_PATH": str(tiny_model),
            "PREDICTION_LOG_PATH": str(tmp_path / "predictions.db"),
            "INTRA_OP_THREADS": "1",
        }
        server = start_server({**base, **env}, tmp_path / f"server{len(started)}.log")
        started.append(server)
        return server

    yield factory
    for server in started:
        server.terminate()


# ---------------------------------------------------------------------- PostgreSQL
@pytest.fixture(scope="session")
def postgres() -> Iterator:
    """One throwaway PostgreSQL server for the session (tests/serve/pg_server.py); each test
    that needs a database creates its own with ``create_database``."""
    from pg_server import PostgresServer

    with PostgresServer() as server:
        yield server
