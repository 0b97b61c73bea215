"""Evaluate: metrics of the exported file, confusion and ROC plots in DVC's formats."""

from __future__ import annotations

import csv
import fcntl
import itertools
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest

from catsdogs.metrics import classification_metrics
from catsdogs.modelfile import ModelFileError
from export import onnx_tools as ox
from export.evaluate import evaluate_file, main, write_plots
from export.params import EvaluateParams
from export.scoring import evaluate_session, load_batch
from tests.train.export_helpers import (
    CLASS_NAMES,
    SPEC,
    export_color_model,
    shared_photos,
    solid_png,
    write_manifest,
)

pytestmark = pytest.mark.train


def test_metrics_match_hand_counts() -> None:
    # 4 cats, 4 dogs; one cat called dog, two dogs called cat (positive class: dog)
    y_true = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p_dog = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.45, 0.7, 0.9])
    probs = np.stack([1 - p_dog, p_dog], axis=1)
    m = classification_metrics(y_true, probs)
    assert m["n"] == 8
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["precision"] == pytest.approx(2 / 3)  # predicted dog: 3, of which 2 are dogs
    assert m["recall"] == pytest.approx(2 / 4)
    assert m["f1"] == pytest.approx(2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2), abs=1e-6)
    # pairs (dog, cat) with the dog scored higher: 14 of 16
    assert m["roc_auc"] == pytest.approx(14 / 16)


@pytest.fixture
def colored(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny exported model and a manifest of solid photos whose right labels are known."""
    model = tmp_path / "model.onnx"
    export_color_model(model, model_version="v", data_version="d")
    photos = []
    # reds are cats, blues dogs; the last "cat" is blue, so exactly one mistake
    for i, rgb in enumerate([(200, 10, 10), (180, 40, 30), (220, 90, 20), (10, 10, 200)]):
        p = tmp_path / f"cat{i}.png"
        p.write_bytes(solid_png(rgb))
        photos.append((p, "cat"))
    for i, rgb in enumerate([(10, 10, 200), (30, 60, 220), (40, 20, 180)]):
        p = tmp_path / f"dog{i}.png"
        p.write_bytes(solid_png(rgb))
        photos.append((p, "dog"))
    manifest = tmp_path / "manifest.csv"
    write_manifest(manifest, {"test": photos, "train": photos[:2]})
    return model, manifest


def test_evaluate_stage_writes_metrics_and_plots(
    colored: tuple[Path, Path], tmp_path: Path
) -> None:
    model, manifest = colored
    params = tmp_path / "params.yaml"
    params.write_text("evaluate:\n  split: test\n  batch_size: 2\n")
    metrics, plots = tmp_path / "out" / "metrics.json", tmp_path / "out" / "plots"
    main([
        "--params", str(params), "--model", str(model), "--manifest", str(manifest),
        "--metrics", str(metrics), "--plots", str(plots),
    ])  # fmt: skip
    m = json.loads(metrics.read_text())
    assert set(m) == {"accuracy", "precision", "recall", "f1", "roc_auc", "n"}
    assert m["n"] == 7
    assert m["accuracy"] == pytest.approx(6 / 7)
    assert m["recall"] == 1.0
    assert m["precision"] == pytest.approx(3 / 4)
    with open(plots / "confusion.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 7
    assert sum(r["actual"] != r["predicted"] for r in rows) == 1
    assert {"actual": "cat", "predicted": "dog"} in rows
    roc = json.loads((plots / "roc.json").read_text())["roc"]
    assert roc[0]["fpr"] == 0.0
    assert roc[-1]["tpr"] == 1.0
    assert all(a["fpr"] <= b["fpr"] for a, b in itertools.pairwise(roc))
    for png in ("confusion.png", "roc.png"):
        assert (plots / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_names_a_bad_split_and_warns_of_other_data(
    colored: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A typo in evaluate.split is one line naming it (it was a traceback); a manifest other
    than the model's training data is scored, with a warning that its split may hold training
    photos (the model here says data "d")."""
    model, manifest = colored
    params = tmp_path / "params.yaml"
    out = ["--metrics", str(tmp_path / "m.json"), "--plots", str(tmp_path / "plots")]
    args = ["--params", str(params), "--model", str(model), "--manifest", str(manifest), *out]
    params.write_text("evaluate:\n  split: tset\n  batch_size: 2\n")
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert "split: expected one of train, val, test, got 'tset'" in caplog.text
    params.write_text("evaluate:\n  split: test\n  batch_size: 2\n")
    main(args)
    assert "was trained on data d, " in caplog.text
    assert "its test split may hold training photos" in caplog.text


def test_evaluate_uses_the_file_contract_not_params(colored: tuple[Path, Path]) -> None:
    """Same numbers through evaluate_file (contract from the file) and evaluate_session."""
    model, manifest = colored
    ev = evaluate_file(model, manifest, EvaluateParams(split="test", batch_size=3))
    from catsdogs.manifest import read_manifest

    rows = read_manifest(manifest, "test")
    direct = evaluate_session(ox.make_session(model), rows, SPEC, CLASS_NAMES)
    assert ev.metrics == direct.metrics
    np.testing.assert_allclose(ev.probs, direct.probs, atol=1e-7)


def test_evaluate_on_real_photos_runs_server_preprocessing(tmp_path: Path) -> None:
    photos = shared_photos(3)
    batch = load_batch([p for p, _ in photos], SPEC)
    assert batch.images.shape == (6, SPEC.input_size, SPEC.input_size, 3)
    assert batch.images.dtype == np.uint8
    assert (batch.widths > 0).all()
    assert (batch.heights > 0).all()


def test_bad_model_file_is_named(colored: tuple[Path, Path], tmp_path: Path) -> None:
    _, manifest = colored
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    with pytest.raises(ModelFileError, match=r"broken\.onnx"):
        evaluate_file(bad, manifest, EvaluateParams(split="test", batch_size=2))


def test_plots_for_three_classes_still_write_confusion(tmp_path: Path) -> None:
    from export.scoring import Batch, Evaluation

    probs = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])
    y = np.array([0, 1, 2, 2])
    names = ("a", "b", "c")
    empty = Batch(np.zeros((4, 1, 1, 3), np.uint8), np.ones(4), np.ones(4))
    ev = Evaluation(classification_metrics(y, probs), y, probs, names, empty)
    assert ev.metrics["accuracy"] == 0.75
    out = write_plots(ev, tmp_path)
    assert out["confusion_csv"].read_text().splitlines()[-1] == "c,a"


def evaluate_args(model: Path, manifest: Path, out: Path) -> list[str]:
    params = out / "params.yaml"
    out.mkdir(parents=True, exist_ok=True)
    params.write_text("evaluate:\n  split: test\n  batch_size: 2\n")
    return [
        "--params", str(params), "--model", str(model), "--manifest", str(manifest),
        "--metrics", str(out / "metrics.json"), "--plots", str(out / "plots"),
    ]  # fmt: skip


def test_other_splits_never_land_in_the_training_curves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The training run's per-epoch curves are train_* and val_*: evaluate on those splits logs
    eval_train_* and eval_val_*, where a point without a step would have joined the curve."""
    from mlflow import MlflowClient

    from export.tracking import log_evaluation

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    exp = client.create_experiment("catsdogs", artifact_location=(tmp_path / "art").as_uri())
    run_id = client.create_run(exp, run_name="training").info.run_id
    for epoch, value in enumerate([0.7, 0.8, 0.9]):
        client.log_metric(run_id, "val_accuracy", value, step=epoch + 1)
    for split in ("val", "train", "test"):
        assert log_evaluation(run_id=run_id, split=split, metrics={"accuracy": 0.5}, files=[])
    curve = client.get_metric_history(run_id, "val_accuracy")
    assert [(m.step, m.value) for m in curve] == [(1, 0.7), (2, 0.8), (3, 0.9)]
    logged = client.get_run(run_id).data.metrics
    assert logged["eval_val_accuracy"] == logged["eval_train_accuracy"] == 0.5
    assert logged["test_accuracy"] == 0.5
    assert "train_accuracy" not in logged


def test_evaluate_logs_test_metrics_and_plots_to_the_training_run(
    colored: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The run named by the file's mlflow_run_id gets test_* metrics and the plots as artifacts."""
    from mlflow import MlflowClient

    _, manifest = colored
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    exp = client.create_experiment("catsdogs", artifact_location=(tmp_path / "art").as_uri())
    run_id = client.create_run(exp, run_name="training").info.run_id
    client.set_terminated(run_id)
    model = export_color_model(
        tmp_path / "model.onnx", model_version="v", data_version="d", mlflow_run_id=run_id
    )
    out = tmp_path / "out"
    main(evaluate_args(model, manifest, out))

    logged = client.get_run(run_id).data.metrics
    assert logged["test_accuracy"] == pytest.approx(6 / 7)
    assert logged["test_recall"] == 1.0
    assert logged["test_n"] == 7
    names = {a.path for a in client.list_artifacts(run_id, "evaluate")}
    assert names == {
        "evaluate/metrics.json",
        "evaluate/confusion.png",
        "evaluate/roc.png",
        "evaluate/confusion.csv",
        "evaluate/roc.json",
    }
    fetched = Path(client.download_artifacts(run_id, "evaluate/confusion.png", str(tmp_path)))
    assert fetched.read_bytes() == (out / "plots" / "confusion.png").read_bytes()
    assert fetched.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a run this store does not know: the stage still succeeds, with a warning, and logs nothing
    stranger = export_color_model(
        tmp_path / "other.onnx", model_version="v", data_version="d", mlflow_run_id="f" * 32
    )
    main(evaluate_args(stranger, manifest, tmp_path / "out2"))
    assert json.loads((tmp_path / "out2" / "metrics.json").read_text())["n"] == 7
    assert f"training run {'f' * 32} is not in" in caplog.text
    assert len(client.search_runs([exp])) == 1  # no run was made up for it


def run_evaluate(args: list[str], stderr_tty: bool) -> tuple[int, str]:
    """``python -m export.evaluate`` with stderr on a pipe or on a pseudo-terminal."""
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "export.evaluate", *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    if not stderr_tty:
        proc = subprocess.run(
            cmd, cwd=root, env=env, capture_output=True, text=True, timeout=120, check=False
        )
        return proc.returncode, proc.stderr
    master, slave = pty.openpty()
    # a terminal 100 columns wide (a fresh pty has 0 columns, where tqdm draws nothing)
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    with subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=slave) as p:
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        os.close(master)
        code = p.wait(timeout=120)
    return code, b"".join(chunks).decode(errors="replace")


def test_progress_bars_only_on_a_terminal_and_outputs_unchanged(
    colored: tuple[Path, Path], tmp_path: Path
) -> None:
    model, manifest = colored
    code, piped = run_evaluate(evaluate_args(model, manifest, tmp_path / "piped"), False)
    assert code == 0, piped
    assert "test: preprocess" not in piped  # CI logs stay clean
    assert "\r" not in piped
    code, tty = run_evaluate(evaluate_args(model, manifest, tmp_path / "tty"), True)
    assert code == 0, tty
    assert "test: preprocess" in tty
    assert "test: infer" in tty
    for name in ("metrics.json", "plots/confusion.csv", "plots/roc.json"):
        assert (tmp_path / "tty" / name).read_bytes() == (tmp_path / "piped" / name).read_bytes()
