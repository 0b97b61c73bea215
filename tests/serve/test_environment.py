"""The serving environment is torch-free, and importing the app loads nothing heavy."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, ServerProcess, free_port, predict_jpegs

from catsdogs.telemetry import CI_MARKERS, OPT_OUTS

pytestmark = pytest.mark.serve


def test_torch_is_not_installed():
    with pytest.raises(ImportError):
        import torch  # noqa: F401


@pytest.mark.parametrize("name", ["torch", "torchvision", "mlflow", "dvc"])
def test_training_stack_absent(name):
    assert importlib.util.find_spec(name) is None


def test_import_is_light():
    """Importing the app module neither loads onnxruntime nor a model."""
    code = "import sys, server.app; print('onnxruntime' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


_QUIETING = CI_MARKERS | {name for name, _ in OPT_OUTS}


def deployment_env(home: Path) -> dict[str, str]:
    """This process's environment as a deployment's: no CI markers, no opt-out, its own HOME."""
    env = {k: v for k, v in os.environ.items() if k not in _QUIETING}
    return env | {"HOME": str(home)}


def test_the_server_starts_no_onnxruntime_telemetry(tiny_model: Path, tmp_path: Path) -> None:
    """onnxruntime 1.32's wheels report usage to Microsoft from the moment they are imported
    (a device id and an event cache under ~/.cache/Microsoft, an uploader thread): the real
    server, started as a deployment starts it, must not."""
    home = tmp_path / "home"
    home.mkdir()
    reporting = home / ".cache" / "Microsoft"
    # this onnxruntime does report when nothing opts out: what the check below guards against
    subprocess.run(
        [sys.executable, "-c", "import onnxruntime"], env=deployment_env(home), check=True,
        capture_output=True, timeout=120,
    )  # fmt: skip
    assert reporting.is_dir()
    shutil.rmtree(home / ".cache")
    port = free_port()
    env = deployment_env(home) | {
        "MODEL_PATH": str(tiny_model),
        "PREDICTION_LOG_PATH": str(tmp_path / "predictions.db"),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "INTRA_OP_THREADS": "1",
    }
    log = tmp_path / "server.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "server"], cwd=ROOT, env=env, stdout=log.open("wb"),
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", log)
    try:
        server.wait_ready(timeout=60)
        predict_jpegs(server.url, 2)
    finally:
        assert server.terminate() == 0, server.output()
    assert not reporting.exists(), sorted(p.name for p in reporting.rglob("*"))
    assert "telemetry" not in server.output()
