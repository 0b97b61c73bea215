"""Model registry: export registers a version, promote sets the alias, the server resolves it.

A real ``mlflow server`` on 127.0.0.1 (its own process group, stopped as a group); the server
side resolves ``models:/`` URIs with the standard library only.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from export.registry import promote
from export.tracking import log_and_register
from server.registry import RegistryError, load_model_file, resolve_model_uri
from tests.train.export_helpers import CLASS_NAMES, export_color_model

pytestmark = [pytest.mark.train, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
MLFLOW = ROOT / ".venv-train" / "bin" / "mlflow"
SERVE_PY = ROOT / ".venv-serve" / "bin" / "python"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log = open(tmp / "server.log", "wb")  # noqa: SIM115 - closed after the server stops
    proc = subprocess.Popen(
        [
            str(MLFLOW),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp / 'mlflow.db'}",
            "--artifacts-destination",
            str(tmp / "artifacts"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((tmp / "server.log").read_text()[-2000:])
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "model.onnx"
    return export_color_model(
        path,
        model_version="20261126-aaaaaaaa-bbbbbbb-cccccc",
        git_commit="bbbbbbb",
        data_version="a" * 64,
    )


@pytest.fixture(scope="module")
def registered(
    mlflow_server: str, model_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> list[dict[str, str]]:
    import mlflow

    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    try:
        mlflow.set_tracking_uri(mlflow_server)
        exp = mlflow.set_experiment("catsdogs")
        with mlflow.start_run(experiment_id=exp.experiment_id) as run:  # the "training run"
            mlflow.log_param("model", "logreg")
        report = tmp_path_factory.mktemp("rep") / "export.json"
        report.write_text(json.dumps({"ok": True}))
        versions = []
        for accuracy in (0.9, 0.95):
            versions.append(
                log_and_register(
                    run_id=run.info.run_id,
                    model_path=model_file,
                    reports=[report],
                    registered_model="catsdogs",
                    tags={"data_version": "a" * 64, "model_version": "v"},
                    metrics={"accuracy": accuracy},
                )
            )
    finally:
        mp.undo()
    return versions


def test_export_registers_versions_on_the_training_run(
    registered: list[dict[str, str]], mlflow_server: str
) -> None:
    from mlflow import MlflowClient

    assert [v["version"] for v in registered] == ["1", "2"]
    client = MlflowClient(mlflow_server)
    mv = client.get_model_version("catsdogs", "2")
    assert mv.run_id == registered[0]["run_id"]
    assert mv.tags["data_version"] == "a" * 64
    assert mv.tags["test_accuracy"] == "0.95"
    names = {a.path for a in client.list_artifacts(mv.run_id, "onnx")}
    assert names == {"onnx/model.onnx"}
    assert {a.path for a in client.list_artifacts(mv.run_id, "export")} == {"export/export.json"}


def test_promote_then_resolve_alias_and_version(
    registered: list[dict[str, str]],
    mlflow_server: str,
    model_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    promote("catsdogs", "1", "champion")
    cache = tmp_path / "cache"
    by_alias = resolve_model_uri(
        "models:/catsdogs@champion", tracking_uri=mlflow_server, cache_dir=cache
    )
    assert by_alias == cache / "catsdogs" / "1" / "model.onnx"
    assert by_alias.read_bytes() == model_file.read_bytes()
    assert load_model_file(by_alias).contract.class_names == CLASS_NAMES

    promote("catsdogs", "2", "champion")  # the alias moves; the next resolve follows it
    moved = resolve_model_uri(
        "models:/catsdogs@champion", tracking_uri=mlflow_server, cache_dir=cache
    )
    assert moved == cache / "catsdogs" / "2" / "model.onnx"
    by_number = resolve_model_uri(
        "models:/catsdogs/2", tracking_uri=mlflow_server, cache_dir=tmp_path / "other"
    )
    assert by_number.read_bytes() == model_file.read_bytes()


def test_resolve_errors_are_clear(
    registered: list[dict[str, str]], mlflow_server: str, tmp_path: Path
) -> None:
    with pytest.raises(RegistryError, match="alias nobody not found"):
        resolve_model_uri("models:/catsdogs@nobody", tracking_uri=mlflow_server, cache_dir=tmp_path)
    with pytest.raises(RegistryError, match="expected models:/NAME@ALIAS"):
        resolve_model_uri("models:/catsdogs", tracking_uri=mlflow_server, cache_dir=tmp_path)
    with pytest.raises(RegistryError, match="needs an MLflow tracking server"):
        resolve_model_uri("models:/catsdogs/1", tracking_uri="sqlite:///x.db", cache_dir=tmp_path)


def test_resolve_in_serving_env_without_mlflow(
    registered: list[dict[str, str]], mlflow_server: str, tmp_path: Path
) -> None:
    """The server's side: no mlflow, no torch, only the standard library and onnxruntime."""
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from server.registry import resolve_model_uri, load_model_file\n"
        "for mod in ('mlflow', 'torch'):\n"
        "    try:\n"
        "        __import__(mod); sys.exit(mod + ' importable')\n"
        "    except ImportError: pass\n"
        "p = resolve_model_uri('models:/catsdogs/1', tracking_uri=sys.argv[1],"
        " cache_dir=Path(sys.argv[2]))\n"
        "print(load_model_file(p).contract.model_version)\n"
    )
    proc = subprocess.run(
        [str(SERVE_PY), "-c", script, mlflow_server, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "20261126-aaaaaaaa-bbbbbbb-cccccc"


def test_unreachable_mlflow_warns_and_returns_none(
    model_file: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    start = time.monotonic()
    got = log_and_register(
        run_id="r",
        model_path=model_file,
        reports=[],
        registered_model="catsdogs",
        tags={},
        metrics={"accuracy": 1.0},
    )
    assert got is None
    assert time.monotonic() - start < 30
    assert "unreachable" in caplog.text


def test_local_paths_resolve_without_a_server(model_file: Path, tmp_path: Path) -> None:
    assert resolve_model_uri(str(model_file), tracking_uri="", cache_dir=tmp_path) == model_file
    uri = model_file.as_uri()
    assert resolve_model_uri(uri, tracking_uri="", cache_dir=tmp_path) == model_file
