"""Fixtures of the serving suite: a tiny ONNX model with a full contract, apps, real servers.

The tiny model follows the real model's contract exactly (uint8 NHWC ``image`` with a symbolic
batch, ``logits`` and ``probabilities``, complete metadata) and its answer depends on the
picture: mostly red -> cat, mostly blue -> dog, so tests can check outcomes, not just shapes.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from catsdogs.contract import ModelContract
from catsdogs.preprocessing import PreprocessSpec
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
    """uint8 (N, H, W, 3) -> mean colour -> logits (cat: red - blue, dog: blue - red)."""
    contract = contract or tiny_contract()
    size = contract.input_size
    weights = np.array([[0.005, -0.005], [0.0, 0.0], [-0.005, 0.005]], dtype=np.float32)  # (3, C)
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT),
            helper.make_node("ReduceMean", ["pixels"], ["mean"], axes=[1, 2], keepdims=0),
            helper.make_node("MatMul", ["mean", "weights"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "tiny_color",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", size, size, 3])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 2]),
        ],
        initializer=[helper.make_tensor("weights", TensorProto.FLOAT, [3, 2], weights.ravel())],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    for key, value in contract.to_metadata().items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


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
    )


def image_bytes(color: tuple[int, int, int], size: tuple[int, int] = (64, 48), fmt="JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


RED = (220, 30, 30)
BLUE = (30, 30, 220)


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


def with_settings(settings: Settings, **changes) -> Settings:
    return replace(settings, **changes)


@pytest.fixture
def make_app(settings: Settings):
    def factory(**changes):
        return create_app(replace(settings, **changes))

    return factory


# ---------------------------------------------------------------------- real processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path) -> None:
        self.proc = proc
        self.url = url
        self.log = log

    def wait_ready(self, timeout: float = 30.0) -> float:
        start = time.perf_counter()
        while time.perf_counter() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.output()}")
            try:
                if httpx.get(f"{self.url}/health/ready", timeout=1).status_code == 200:
                    return time.perf_counter() - start
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server not ready within {timeout} s: {self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def terminate(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)


def _memory_ceiling(limit: int):
    """preexec_fn: cap the child's address space, so a runaway allocation fails in the server
    (MemoryError, or the kernel's refusal) instead of taking the machine down."""

    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def start_server(
    env_extra: dict[str, str],
    log: Path,
    args: list[str] | None = None,
    *,
    memory_limit: int | None = None,
):
    """``python -m server`` on a free port; ``memory_limit`` caps its address space (bytes)."""
    port = free_port()
    env = {
        **os.environ,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "LOG_LEVEL": "info",
        **env_extra,
    }
    out = log.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", *(args or [])],
        cwd=ROOT,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        preexec_fn=_memory_ceiling(memory_limit) if memory_limit else None,
    )
    return ServerProcess(proc, f"http://127.0.0.1:{port}", log)


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
