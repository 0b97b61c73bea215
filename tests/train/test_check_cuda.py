"""scripts/check_cuda.py, the GPU training check (`make check-cuda`), run with ``--device cpu``.

The check itself needs a CUDA machine (README "Training on a GPU" gives its last run there); this
runs the same stages and comparisons on the CPU, so a change to a stage's outputs that would break
the check is caught here rather than in the little GPU time a run gets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.train

ROOT = Path(__file__).resolve().parents[2]
PHOTOS = ROOT.parent / "shared" / "data" / "catsdogs" / "images"
SCRIPT = ROOT / "scripts" / "check_cuda.py"


def check(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_check_runs_train_export_evaluate_and_cv_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "cuda"
    done = check(
        "--images", str(PHOTOS), "--out", str(out), "--device", "cpu", "--per-class", "40",
        "--cases", "lite0", "--export-photos", "8", "--no-int8",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((out / "cuda-check.json").read_text())
    assert report["passed"] is True
    assert report["failures"] == []
    assert report["device"] == "cpu"
    assert report["environment"]["torch"]
    case = report["cases"]["lite0"]
    assert case["train"]["rc"] == case["export"]["rc"] == case["evaluate"]["rc"] == 0
    assert case["train_loss"]["last"] < case["train_loss"]["first"]
    assert case["tensors_not_on_cpu"] == []
    agreement = case["cpu_vs_device"]
    assert agreement["photos"] > 0
    assert agreement["labels_differ"] == 0
    assert agreement["max_abs_prob_diff"] == 0.0  # the same device twice: bit for bit
    assert case["parity"]["ok"] is True
    assert case["parity"]["n"] == 8
    assert 0.9 <= case["test_accuracy"] <= 1.0
    assert case["test_photos"] > 0
    assert (out / "work" / "lite0" / "model.onnx").stat().st_size == case["onnx_bytes"]
    assert not (out / "work" / "lite0" / "int8" / "model.int8.onnx").exists()  # --no-int8
    cv = report["cv"]
    assert cv["rc"] == 0
    assert cv["summary"]["lite0"]["n"] == 80
    assert len(cv["summary"]["lite0"]["fold_accuracy"]) == 2


def test_check_refuses_unknown_cases_and_missing_folders(tmp_path: Path) -> None:
    done = check("--images", str(PHOTOS), "--out", str(tmp_path), "--cases", "lite9", timeout=60)
    assert done.returncode == 2
    assert "--cases: unknown ['lite9']" in done.stderr
    done = check("--images", str(tmp_path), "--out", str(tmp_path), timeout=60)
    assert done.returncode == 2
    assert "has no cat/ and dog/ folders" in done.stderr


def test_check_fails_with_a_report_when_the_data_stages_fail(tmp_path: Path) -> None:
    images = tmp_path / "images"
    for label in ("cat", "dog"):
        (images / label).mkdir(parents=True)
    (images / "cat" / "broken.jpg").write_bytes(b"not a photo")
    done = check("--images", str(images), "--out", str(tmp_path / "out"), "--device", "cpu")
    assert done.returncode == 1, done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "cuda-check.json").read_text())
    assert report["passed"] is False
    assert report["failures"]
    assert all(f.startswith(("fetch:", "prepare:")) for f in report["failures"])
