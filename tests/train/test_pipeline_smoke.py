"""The train stage on a handful of photos (MLflow on and off), and the whole DVC pipeline."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.train.process_helpers import output_or_stacks, process_group, stop_group
from training.models import load_checkpoint

pytestmark = pytest.mark.train

ROOT = Path(__file__).resolve().parents[2]
PHOTOS = ROOT.parent / "shared" / "data" / "catsdogs" / "images"
VENV_BIN = Path(sys.executable).parent


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 600):
    return subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        DVC_NO_ANALYTICS="1",
        PYTHONPATH=str(ROOT),
        **extra,
    )
    return env


# One model, unless a test names a cascade: the default's (Lite0, then Lite1 and Lite2 on their
# own 240 and 260 px views) is what CI's real pipeline trains and serves
ALONE = {"cascade": None, "cascade_views": "shared"}


def tiny_params(tmp: Path, **train: object) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["prepare"].update(max_per_class=12, workers=1)
    defaults = {"input_size": 64, "resize": 72, "epochs": 3, "patience": 2, "batch_size": 8}
    defaults.update(ALONE)
    params["train"].update({"augment_views": 1, **defaults, **train})
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def prepared(tmp: Path, env: dict[str, str], params: Path) -> None:
    (tmp / "data").mkdir(exist_ok=True)
    (tmp / "data" / "source.yaml").write_text(f'source: "{PHOTOS}"\nsource_dir: "{PHOTOS}"\n')
    for module in ("training.fetch", "training.prepare"):
        out = run([sys.executable, "-m", module, "--params", str(params)], tmp, env)
        assert out.returncode == 0, out.stderr[-3000:]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["logreg", "mobilenet_v3_small"])
def test_train_logs_everything_to_mlflow(tmp_path: Path, model: str) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = base_env(MLFLOW_TRACKING_URI=uri)
    params = tiny_params(tmp_path, model=model, pretrained=False)
    prepared(tmp_path, env, params)
    out = run([sys.executable, "-m", "training.train", "--params", str(params)], tmp_path, env)
    assert out.returncode == 0, out.stderr[-3000:]
    _, meta = load_checkpoint(tmp_path / "models" / "checkpoint.pt")
    assert meta["model_name"] == model
    assert meta["class_names"] == ["cat", "dog"]
    assert meta["mlflow_run_id"]
    history = (tmp_path / "reports" / "train" / "history.csv").read_text().splitlines()
    epochs = len(history) - 1
    assert 1 <= epochs <= 3

    client = MlflowClient(tracking_uri=uri)
    run_ = client.get_run(meta["mlflow_run_id"])
    assert run_.info.status == "FINISHED"
    assert run_.data.params["train.model"] == model
    assert run_.data.params["prepare.max_per_class"] == "12"
    assert run_.data.tags["data_version"] == meta["data_version"]
    assert run_.data.tags["git_commit"] == meta["git_commit"]
    val_curve = client.get_metric_history(run_.info.run_id, "val_accuracy")
    assert [m.step for m in val_curve] == list(range(1, epochs + 1))
    assert run_.data.metrics["best_val_accuracy"] == meta["val_metrics"]["accuracy"]
    artifacts = {
        f.path
        for d in ("train", "data", "checkpoint")
        for f in client.list_artifacts(run_.info.run_id, d)
    }
    assert {
        "train/curves.png",
        "train/confusion_matrix.png",
        "train/metrics.json",
        "data/data.json",
        "checkpoint/checkpoint.pt",
    } <= artifacts


@pytest.mark.slow
def test_unreachable_tracking_server_only_warns(tmp_path: Path) -> None:
    env = base_env(
        MLFLOW_TRACKING_URI=f"http://127.0.0.1:{closed_port()}",
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
        MLFLOW_HTTP_REQUEST_TIMEOUT="5",
    )
    params = tiny_params(tmp_path, model="logreg")  # train.pretrained: EfficientNet only
    prepared(tmp_path, env, params)
    out = run([sys.executable, "-m", "training.train", "--params", str(params)], tmp_path, env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "MLflow tracking unavailable" in out.stderr
    _, meta = load_checkpoint(tmp_path / "models" / "checkpoint.pt")
    assert meta["mlflow_run_id"] == ""
    metrics = json.loads((tmp_path / "reports" / "train" / "metrics.json").read_text())
    assert 0 <= metrics["val"]["accuracy"] <= 1


def copy_tracked_tree(dest: Path) -> None:
    """The repository as a clone would have it: tracked and unignored files only."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


@pytest.mark.slow
def test_whole_pipeline_with_dvc_repro(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_tracked_tree(repo)
    env = base_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    env.pop("PYTHONPATH")  # the copy's own code runs (python -m from the repo root)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], [*git, "commit", "-qm", "copy"]):
        assert run(cmd, repo, env).returncode == 0
    (repo / "dvc.lock").unlink(missing_ok=True)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["prepare"].update(max_per_class=30)
    params["train"].update(input_size=96, resize=110, epochs=5, patience=3, batch_size=16, **ALONE)
    if "export" in params:
        params["export"].update(
            quantize=False, parity_images=4, bench_runs=1, bench_warmup=0, calibration_images=8
        )
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / "data").mkdir(exist_ok=True)
    (repo / "data" / "source.yaml").write_text(f'source: "{PHOTOS}"\nsource_dir: "{PHOTOS}"\n')

    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    target = [] if "evaluate" in stages else ["train"]
    first = run(["dvc", "repro", *target], repo, env)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    _, meta = load_checkpoint(repo / "models" / "checkpoint.pt")
    assert meta["model_name"] == "efficientnet_lite0"
    assert meta["val_metrics"]["accuracy"] > 0.7  # a pretrained backbone, even on 60 photos
    report = json.loads((repo / "reports" / "data.json").read_text())
    assert report["per_class"] == {"cat": 30, "dog": 30}
    if "evaluate" in stages:
        metrics = json.loads((repo / "reports" / "metrics.json").read_text())
        assert metrics["n"] == report["per_split"]["test"]
        # the test split's figures and plots land in the run that trained the model
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
        run_ = client.get_run(meta["mlflow_run_id"])
        assert run_.data.metrics["test_accuracy"] == metrics["accuracy"]
        assert run_.data.metrics["test_roc_auc"] == metrics["roc_auc"]
        evaluated = {f.path for f in client.list_artifacts(run_.info.run_id, "evaluate")}
        assert {"evaluate/confusion.png", "evaluate/roc.png", "evaluate/metrics.json"} <= evaluated

    # a strict no-op: the photo folder is a real dependency, so not even fetch runs again
    second = run(["dvc", "repro", *target], repo, env)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "Running stage" not in second.stdout, second.stdout
    for stage in list(stages) if not target else ["fetch", "prepare", "train"]:
        assert f"Stage '{stage}' didn't change, skipping" in second.stdout, second.stdout
    # the default pipeline's file: cv/dvc.yaml (make cv) is never run by `dvc repro`
    status = run(["dvc", "status", "dvc.yaml"], repo, env)
    assert status.returncode == 0, status.stderr[-4000:]
    assert status.stdout.strip() == "Data and pipelines are up to date.", status.stdout
    shown = run(["dvc", "metrics", "show", "--json"], repo, env)
    assert shown.returncode == 0
    assert "reports/train/metrics.json" in shown.stdout


@pytest.mark.slow
def test_fine_tuning_the_last_blocks_changes_them(tmp_path: Path) -> None:
    import torch

    env = base_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    # A head that barely learns (lr 1e-6), so the fine-tuning epoch beats it on validation:
    # fine-tuning is kept only then (test_early_stopping: the head alone is kept otherwise).
    params = tiny_params(
        tmp_path, epochs=2, lr=1e-6, fine_tune_blocks=1, fine_tune_epochs=1, fine_tune_lr=1e-3
    )
    prepared(tmp_path, env, params)
    out = run([sys.executable, "-m", "training.train", "--params", str(params)], tmp_path, env)
    assert out.returncode == 0, out.stderr[-3000:]
    model, meta = load_checkpoint(tmp_path / "models" / "checkpoint.pt")
    with open(tmp_path / "reports" / "train" / "history.csv") as fh:
        history = list(csv.DictReader(fh))
    assert len(history) == 3  # 2 head epochs + 1 fine-tuning epoch
    assert float(history[2]["val_loss"]) < min(float(h["val_loss"]) for h in history[:2])
    assert meta["val_metrics"]["best_epoch"] == 3
    from training.models import build_model, default_spec

    fresh = build_model(
        "efficientnet_lite0", 2, pretrained=True, spec=default_spec("efficientnet_lite0", 64, 72)
    )
    tuned = dict(model.backbone.net.named_parameters())
    start = dict(fresh.backbone.net.named_parameters())
    n_blocks = len(model.backbone.net._blocks)
    for name, value in tuned.items():
        changed = not torch.equal(value, start[name])
        in_tail = name.startswith((f"_blocks.{n_blocks - 1}.", "_conv_head", "_bn1"))
        assert changed == in_tail or (in_tail and "bn" in name), name
    # BatchNorm keeps its ImageNet statistics while the tail trains (in train mode it normalised
    # by each batch's statistics and broke the pretrained features)
    start_buffers = dict(fresh.backbone.net.named_buffers())
    running = [(n, b) for n, b in model.backbone.net.named_buffers() if "running_" in n]
    assert any(n.startswith(f"_blocks.{n_blocks - 1}.") for n, _ in running)
    for name, value in running:
        assert torch.equal(value, start_buffers[name]), name
    assert meta["params"]["fine_tune_blocks"] == 1


@pytest.mark.slow
def test_a_stopped_or_failed_training_run_is_recorded_so_in_mlflow(tmp_path: Path) -> None:
    """SIGTERM mid-training (a cancelled job, docker stop) exits 143 with the MLflow run KILLED,
    not left RUNNING; a run that crashes is FAILED, not the FINISHED of MLflow's exit hook; Ctrl-C
    is one line, exit 130, the run KILLED."""
    import signal
    import time

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # PYTHONFAULTHANDLER: a stop that hangs fails with the child's stacks (output_or_stacks)
    env = base_env(MLFLOW_TRACKING_URI=uri, PYTHONFAULTHANDLER="1")
    params = tiny_params(tmp_path, model="mobilenet_v3_small", pretrained=False, epochs=400)
    params.write_text(params.read_text().replace("patience: 2", "patience: 400"))
    prepared(tmp_path, env, params)
    cmd = [sys.executable, "-m", "training.train", "--params", str(params)]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until the run exists and an epoch has begun
            client = MlflowClient(uri)
            exp = client.get_experiment_by_name("catsdogs")
            if exp and client.search_runs([exp.experiment_id]):
                break
            time.sleep(0.5)
        time.sleep(3)
        proc.send_signal(signal.SIGTERM)
        out = output_or_stacks(proc, 60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, out[-3000:]
    assert not (tmp_path / "models" / "checkpoint.pt").exists()
    (stopped,) = MlflowClient(uri).search_runs([exp.experiment_id])
    assert stopped.info.status == "KILLED"

    # a training photo gone after prepare: the stage fails once its run has started
    manifest = tmp_path / "data" / "prepared" / "manifest.csv"
    rows = manifest.read_text().splitlines()
    (i,) = [n for n, row in enumerate(rows) if row.endswith(",train")][:1]
    original = rows[i][: rows[i].index(",")]
    rows[i] = str(tmp_path / "gone.jpg") + rows[i][rows[i].index(",") :]
    manifest.write_text("\n".join(rows) + "\n")
    failed = run(cmd, tmp_path, env)
    assert failed.returncode == 1, failed.stderr[-3000:]
    runs = MlflowClient(uri).search_runs(
        [exp.experiment_id], order_by=["attributes.start_time DESC"]
    )
    assert [r.info.status for r in runs] == ["FAILED", "KILLED"]

    # Ctrl-C in a terminal: SIGINT to the whole process group, the DataLoader's worker included.
    # One line and the shell's 130, the run KILLED; it was a traceback, exit 1
    manifest.write_text("\n".join(rows).replace(str(tmp_path / "gone.jpg"), original) + "\n")
    with process_group(cmd, tmp_path, env) as proc:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(MlflowClient(uri).search_runs(
            [exp.experiment_id])) < 3:  # fmt: skip
            time.sleep(0.5)
        time.sleep(3)
        out = stop_group(proc, signal.SIGINT)
    assert proc.returncode == 130, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert "train: stopped (Ctrl-C)" in out
    runs = MlflowClient(uri).search_runs(
        [exp.experiment_id], order_by=["attributes.start_time DESC"]
    )
    assert [r.info.status for r in runs] == ["KILLED", "FAILED", "KILLED"]


def test_train_parameters_are_bounded_and_exponent_floats_read(tmp_path: Path) -> None:
    """torch enforced these minutes in, in a traceback naming no key; and YAML 1.1 read 1e-5
    (how `dvc exp run -S` writes a small learning rate) as a string, which was refused."""
    params = tiny_params(tmp_path)
    text = params.read_text()
    params.write_text(
        text.replace("  lr: 0.001", "  lr: 1e-3").replace(
            "weight_decay: 0.0001", "weight_decay: 5E-5"
        )
    )
    from training.params import load_train

    loaded = load_train(params)
    assert (loaded.lr, loaded.weight_decay) == (0.001, 5e-5)
    env = base_env()
    for key, bad, rule in (
        ("  lr: 1e-3", "  lr: -0.001", "train.lr: must be > 0, got -0.001"),
        ("  batch_size: 8", "  batch_size: 0", "train.batch_size: must be >= 1, got 0"),
        ("  dropout: 0.2", "  dropout: 1.5", "train.dropout: must be within [0, 1), got 1.5"),
    ):
        broken = tmp_path / "broken.yaml"
        broken.write_text(params.read_text().replace(key, bad))
        out = run([sys.executable, "-m", "training.train", "--params", str(broken)], tmp_path, env)
        assert out.returncode == 2  # a bad parameter, in every stage
        assert out.stderr.strip().splitlines() == [f"train: {rule}"]


def test_a_class_without_training_photos_stops_the_train_stage() -> None:
    """One dog photo that hashed into the test split: the model could never answer 'dog'. It
    trained without a word (or crashed drawing its confusion matrix after its reports)."""
    from training.train import check_classes

    splits = {"train": (["a", "b"], [0, 0]), "val": (["c"], [0]), "test": (["d"], [1])}
    with pytest.raises(
        SystemExit, match=r"class 'dog' has no training photo \(0 in val, 1 in test\)"
    ):
        check_classes(["cat", "dog"], splits)
