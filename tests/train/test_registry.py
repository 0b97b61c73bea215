"""Model registry: export registers a version, promote sets the alias, the server resolves it.

A real ``mlflow server`` on 127.0.0.1 (its own process group, stopped as a group); the server
side resolves ``models:/`` URIs with the standard library only. Each version is a real MLflow
Model (onnx flavor) around the exported file; ``promote`` evaluates the candidate on a real
``python -m server`` before it moves the alias, and a fresh server started from the alias serves
the promoted version.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import export.onnx_tools as ox
from catsdogs.hashing import file_sha256
from catsdogs.modelfile import load_model_file
from catsdogs.preprocessing import preprocess_bytes
from export.registry import Gate, PromotionRefusedError, promote
from export.tracking import log_and_register
from server.model_uri import RegistryError, resolve_model_uri
from tests.train.export_helpers import (
    CLASS_NAMES,
    SPEC,
    color_contract,
    color_model,
    export_color_model,
    solid_png,
)

pytestmark = [pytest.mark.train, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
MLFLOW = ROOT / ".venv-train" / "bin" / "mlflow"
SERVE_PY = ROOT / ".venv-serve" / "bin" / "python"
TRAIN_PY = ROOT / ".venv-train" / "bin" / "python"
FIRST_VERSION = "20261126-aaaaaaaa-bbbbbbb-cccccc"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("mlflow")
    with running_mlflow(tmp, "--artifacts-destination", str(tmp / "artifacts")) as uri:
        yield uri


@contextlib.contextmanager
def running_mlflow(tmp: Path, *options: str) -> Iterator[str]:
    """``mlflow server`` over ``tmp/mlflow.db`` on a free port, its process group stopped after."""
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
            *options,
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
        path, model_version=FIRST_VERSION, git_commit="bbbbbbb", data_version="a" * 64
    )


def export_scaled_model(path: Path, scale: float, model_version: str) -> Path:
    """The colour model with its weights times ``scale``: -1 swaps the labels (red -> "dog"),
    2 keeps them with other probabilities, so a served version can be told apart."""
    model = color_model()
    with torch.no_grad():
        model.head[1].weight.mul_(scale)
    ox.export_onnx(model, path, input_size=SPEC.input_size, opset=18)
    return ox.embed_metadata(path, color_contract(model_version=model_version).to_metadata())


def register(model_path: Path, model_version: str, run_id: str = "") -> dict[str, str]:
    """As the export stage does (no run id: a run of its own, so no other version's folder
    is overwritten); MLFLOW_TRACKING_URI must be set."""
    got = log_and_register(
        run_id=run_id,
        model_path=model_path,
        reports=[],
        registered_model="catsdogs",
        tags={"data_version": "a" * 64, "model_version": model_version},
        metrics={"accuracy": 1.0},
    )
    assert got is not None, "registration failed"
    return got


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A labelled folder the colour model gets right: red shades are cats, blue ones dogs."""
    root = tmp_path_factory.mktemp("photos")
    for label, colours in {
        "cat": [(200, 30, 30), (160, 20, 40), (230, 60, 50)],
        "dog": [(30, 30, 200), (20, 40, 160), (50, 60, 230)],
    }.items():
        (root / label).mkdir()
        for i, rgb in enumerate(colours):
            (root / label / f"{i}.png").write_bytes(solid_png(rgb))
    return root


def gate(photos: Path, out: Path) -> Gate:
    return Gate(data=photos, min_accuracy=0.95, serve_python=SERVE_PY, out=out)


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
                    tags={"data_version": "a" * 64, "model_version": FIRST_VERSION},
                    metrics={"accuracy": accuracy},
                )
            )
    finally:
        mp.undo()
    return versions


def test_export_registers_versions_on_the_training_run(
    registered: list[dict[str, str]], mlflow_server: str, model_file: Path
) -> None:
    from mlflow import MlflowClient

    assert [v["version"] for v in registered] == ["1", "2"]
    client = MlflowClient(mlflow_server)
    mv = client.get_model_version("catsdogs", "2")
    assert mv.run_id == registered[0]["run_id"]
    assert mv.tags["data_version"] == "a" * 64
    assert mv.tags["test_accuracy"] == "0.95"
    assert mv.tags["sha256"] == file_sha256(model_file)  # added when the caller gives none
    names = {a.path for a in client.list_artifacts(mv.run_id, "onnx")}
    assert {"onnx/MLmodel", "onnx/model.onnx", "onnx/input_example.json"} <= names
    assert {a.path for a in client.list_artifacts(mv.run_id, "export")} == {"export/export.json"}


def test_version_is_an_mlflow_onnx_model(
    registered: list[dict[str, str]],
    mlflow_server: str,
    model_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """MLflow's own tools load a version; its model.onnx is the exported file, byte for byte."""
    import mlflow.artifacts
    import mlflow.onnx
    import mlflow.pyfunc
    import onnxruntime as ort
    from mlflow.models import Model

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    local = Path(mlflow.artifacts.download_artifacts("models:/catsdogs/1", dst_path=str(tmp_path)))
    assert (local / "model.onnx").read_bytes() == model_file.read_bytes()
    mlmodel = Model.load(str(local / "MLmodel"))
    assert mlmodel.flavors["onnx"]["data"] == "model.onnx"
    assert mlmodel.flavors["python_function"]["loader_module"] == "mlflow.onnx"
    assert mlmodel.metadata["sha256"] == file_sha256(model_file)
    side = SPEC.input_size
    stored = mlmodel.signature.to_dict()  # as the MLmodel file holds it (JSON strings)
    assert json.loads(stored["inputs"]) == [
        {
            "name": "image",
            "type": "tensor",
            "tensor-spec": {"dtype": "uint8", "shape": [-1, side, side, 3]},
        }
    ]
    assert json.loads(stored["outputs"]) == [
        {"name": name, "type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 2]}}
        for name in ("logits", "probabilities")
    ]
    example = mlmodel.load_input_example(str(local))["image"]  # keyed by the signature's name
    assert example.dtype == np.uint8
    assert example.shape == (1, side, side, 3)
    serving = json.loads((local / "serving_input_example.json").read_text())
    assert np.asarray(serving["inputs"]).shape == (1, side, side, 3)

    # a red and a blue image: pyfunc (signature enforced) predicts as onnxruntime on the file
    batch = np.zeros((2, side, side, 3), np.uint8)
    batch[0, ..., 0] = 200
    batch[1, ..., 2] = 200
    pyfunc = mlflow.pyfunc.load_model("models:/catsdogs/1")
    got = pyfunc.predict(batch)["probabilities"]
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    want = session.run(["probabilities"], {"image": batch})[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert list(got.argmax(axis=1)) == [0, 1]  # cat, dog
    proto = mlflow.onnx.load_model("models:/catsdogs/1")
    assert [i.name for i in proto.graph.input] == ["image"]


def test_promote_then_resolve_alias_and_version(
    registered: list[dict[str, str]],
    mlflow_server: str,
    model_file: Path,
    photos: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    summary = promote("catsdogs", "1", "champion", gate(photos, tmp_path / "eval"))
    assert summary["accuracy"] == 1.0
    assert summary["n"] == 6
    assert summary["model_version"] == FIRST_VERSION
    tags = MlflowClient(mlflow_server).get_model_version("catsdogs", "1").tags
    assert tags["deployment_eval_passed"] == "true"
    assert tags["deployment_eval_accuracy"] == "1.0000"
    assert tags["deployment_eval_n"] == "6"
    assert tags["deployment_eval_held_out"] == "null"  # a folder: unknown to the gate
    assert "promoted_at" in tags
    assert (tmp_path / "eval" / "summary.json").is_file()
    cache = tmp_path / "cache"
    by_alias = resolve_model_uri(
        "models:/catsdogs@champion", tracking_uri=mlflow_server, cache_dir=cache
    )
    assert by_alias == cache / "catsdogs" / "1" / "model.onnx"
    assert by_alias.read_bytes() == model_file.read_bytes()
    assert load_model_file(by_alias).contract.class_names == CLASS_NAMES

    promote("catsdogs", "2", "champion", gate(photos, tmp_path / "eval"))  # the alias moves
    moved = resolve_model_uri(
        "models:/catsdogs@champion", tracking_uri=mlflow_server, cache_dir=cache
    )
    assert moved == cache / "catsdogs" / "2" / "model.onnx"
    by_number = resolve_model_uri(
        "models:/catsdogs/2", tracking_uri=mlflow_server, cache_dir=tmp_path / "other"
    )
    assert by_number.read_bytes() == model_file.read_bytes()


def test_promote_refuses_a_candidate_that_fails_the_evaluation(
    registered: list[dict[str, str]],
    mlflow_server: str,
    photos: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Swapped labels: the live evaluation fails, the CLI exits 1 and champion stays put."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    client = MlflowClient(mlflow_server)
    before = client.get_registered_model("catsdogs").aliases["champion"]
    swapped = export_scaled_model(tmp_path / "swapped.onnx", -1.0, "20261127-swapped")
    version = register(swapped, "20261127-swapped")["version"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    proc = subprocess.run(
        [
            str(TRAIN_PY),
            "-m",
            "export.registry",
            "--name",
            "catsdogs",
            "promote",
            "--version",
            version,
            "--data",
            str(photos),
            "--serve-python",
            str(SERVE_PY),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        env=env,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"catsdogs version {version} not promoted: accuracy 0.0000" in proc.stderr
    assert client.get_registered_model("catsdogs").aliases["champion"] == before
    tags = client.get_model_version("catsdogs", version).tags
    assert tags["deployment_eval_passed"] == "false"
    assert tags["deployment_eval_accuracy"] == "0.0000"
    assert tags["deployment_eval_served_version"] == "20261127-swapped"
    assert "promoted_at" not in tags

    with pytest.raises(PromotionRefusedError, match="not promoted"):  # the library call too
        promote("catsdogs", version, "champion", gate(photos, tmp_path / "eval"))
    assert client.get_registered_model("catsdogs").aliases["champion"] == before


def test_promote_with_the_local_store(
    model_file: Path, photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No tracking server (MLflow's sqlite default): the candidate is downloaded, checked
    against its sha256 tag and served by path; the gate is the same."""
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)  # the local store keeps artifacts in ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    version = register(model_file, FIRST_VERSION)["version"]
    summary = promote("catsdogs", version, "champion", gate(photos, tmp_path / "eval"))
    assert summary["accuracy"] == 1.0
    assert summary["model_version"] == FIRST_VERSION
    assert str(MlflowClient(uri).get_registered_model("catsdogs").aliases["champion"]) == version


def test_promote_through_a_server_over_the_local_store(
    model_file: Path, photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's way: train with the local store, then ``make mlflow-ui`` and promote through
    it. The version's source is a path on this disk, which a server refuses to download from:
    the promotion failed for a reason that had nothing to do with the model."""
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    version = register(model_file, FIRST_VERSION)["version"]
    with running_mlflow(tmp_path) as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        assert MlflowClient(uri).get_model_version("catsdogs", version).source.startswith("/")
        summary = promote("catsdogs", version, "champion", gate(photos, tmp_path / "eval"))
        assert (summary["accuracy"], summary["model_version"]) == (1.0, FIRST_VERSION)
        aliases = MlflowClient(uri).get_registered_model("catsdogs").aliases
    assert str(aliases["champion"]) == version


@contextlib.contextmanager
def serving(env: dict[str, str], tmp: Path) -> Iterator[str]:
    """A fresh ``python -m server`` with ``env`` on a free port, stopped by PID."""
    port = free_port()
    env = {
        **os.environ,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "MODEL_CACHE_DIR": str(tmp / "cache"),
        "PREDICTION_LOG_PATH": str(tmp / "predictions.db"),
        **env,
    }
    log = open(tmp / "server.log", "wb")  # noqa: SIM115 - closed after the server stops
    proc = subprocess.Popen(
        [str(SERVE_PY), "-m", "server"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health/ready", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((tmp / "server.log").read_text()[-2000:])
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def test_fresh_server_from_the_alias_serves_the_promoted_version(
    registered: list[dict[str, str]],
    mlflow_server: str,
    photos: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What ``promote`` promoted is what a fresh server on models:/catsdogs@champion serves."""
    import onnxruntime as ort
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    sharper = export_scaled_model(tmp_path / "sharper.onnx", 2.0, "20261128-sharper")
    version = register(sharper, "20261128-sharper")["version"]
    promote("catsdogs", version, "champion", gate(photos, tmp_path / "eval"))
    client = MlflowClient(mlflow_server)
    assert client.get_registered_model("catsdogs").aliases["champion"] == version
    tag = client.get_model_version("catsdogs", version).tags["model_version"]

    env = {"MODEL_URI": "models:/catsdogs@champion", "MLFLOW_TRACKING_URI": mlflow_server}
    with serving(env, tmp_path) as url:
        with urllib.request.urlopen(f"{url}/metadata", timeout=10) as resp:
            assert json.load(resp)["model_version"] == tag
        image = solid_png((180, 40, 40))
        req = urllib.request.Request(
            f"{url}/predict", data=image, headers={"Content-Type": "image/png"}
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            body = json.load(resp)
    assert body["model_version"] == tag
    assert body["label"] == "cat"
    session = ort.InferenceSession(str(sharper), providers=["CPUExecutionProvider"])
    want = session.run(["probabilities"], {"image": preprocess_bytes(image, SPEC)[None]})[0][0]
    got = [body["probabilities"][name] for name in CLASS_NAMES]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    cached = tmp_path / "cache" / "catsdogs" / version / "model.onnx"
    assert cached.read_bytes() == sharper.read_bytes()


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
        "from server.model_uri import resolve_model_uri\n"
        "from catsdogs.modelfile import load_model_file\n"
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


def registry_cli(args: list[str], tracking: str) -> subprocess.CompletedProcess[str]:
    """``python -m export.registry ARGS`` (what make registry-list and promote run)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking}
    return subprocess.run(
        [sys.executable, "-m", "export.registry", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_listing_an_empty_registry_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    """A clone that pulled the pipeline from the DVC remote ran no stage and registered nothing:
    `make registry-list` then ended in MLflow's traceback."""
    proc = registry_cli(["list"], f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert proc.returncode == 1, proc.stderr
    assert "catsdogs" in proc.stderr
    assert "not found" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", [["list"], ["promote", "--version", "1"]])
def test_an_absent_tracking_server_is_one_line_in_seconds(command: list[str]) -> None:
    """MLflow retried for about 4 minutes before `make registry-list` or `make promote` said
    anything; the server's absence is said at once."""
    started = time.monotonic()
    proc = registry_cli(command, f"http://127.0.0.1:{free_port()}")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().endswith("the MLflow tracking server does not answer")
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - started < 60


def test_a_tracking_server_that_answers_anything_is_there() -> None:
    """The quick probe took an authenticating proxy's 401 on /health for an absent server, and
    make registry-list refused to ask it; only a failed connection is absence."""
    import http.server
    import threading

    from export.tracking import reachable

    class Refusing(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert reachable(f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
    assert not reachable(f"http://127.0.0.1:{free_port()}")
