"""Remote storage against a real S3-compatible server: ``moto_server`` on 127.0.0.1.

One tiny pipeline run feeds every test: ``make pipeline`` in a copy of the repository whose DVC
remote was switched to S3 (as the README says) finds the remote empty, trains and pushes; MLflow
logs to a tracking server whose artifact store is the same bucket. Then a fresh ``git clone``
pulls the very same bytes and its ``make pipeline`` runs no stage, the default remote (a folder
under ``~/.cache``) serves another clone, and the registry hands back the model the run logged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.train.test_pipeline_smoke import PHOTOS, copy_tracked_tree

pytestmark = [pytest.mark.train, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(sys.executable).parent.parent  # not resolved: .venv-train, not the base Python
BUCKET = "catsdogs"
STAGES = ("download", "fetch", "prepare", "train", "export", "evaluate")
# the files a clone must get back byte for byte: data index, manifest, checkpoint, model, metrics
RESTORED = (
    "data/raw/index.csv",
    "data/prepared/manifest.csv",
    "models/checkpoint.pt",
    "models/model.onnx",
    "reports/metrics.json",
)
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]


@dataclass(frozen=True)
class S3:
    endpoint: str
    env: dict[str, str]  # credentials and region for every client (DVC, boto3, MLflow server)

    def client(self) -> Any:  # boto3's client classes are generated at run time
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, **_boto_kwargs(self.env))

    def get(self, key: str) -> bytes:
        return self.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()

    def keys(self, prefix: str) -> set[str]:
        pager = self.client().get_paginator("list_objects_v2")
        pages = pager.paginate(Bucket=BUCKET, Prefix=prefix)
        return {obj["Key"] for page in pages for obj in page.get("Contents", [])}


@dataclass(frozen=True)
class Pushed:
    repo: Path
    env: dict[str, str]
    make: subprocess.CompletedProcess[str]


def _boto_kwargs(env: dict[str, str]) -> dict[str, str]:
    return {
        "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
        "region_name": env["AWS_DEFAULT_REGION"],
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(
    cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def make(
    target: str, cwd: Path, env: dict[str, str], timeout: int = 300
) -> subprocess.CompletedProcess[str]:
    """``make TARGET`` on the training venv as it is (``-o``: never rebuilt from a copy's files)."""
    stamp = VENV / ".installed"
    return run(
        ["make", "-o", str(stamp), target, f"TRAIN_VENV={VENV}", f"DATA={PHOTOS}"],
        cwd,
        env,
        timeout,
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def start(cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    """A server in its own process group, so stopping it takes its workers too."""
    with log.open("wb") as out:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the group, SIGKILL to whatever of it is still there 20 s later."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # workers may outlive the leader for a moment
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        proc.poll()  # reap the leader, or it counts as a member forever
        time.sleep(0.2)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{url} never answered:\n{log.read_text()[-2000:]}")
        time.sleep(0.3)


def isolated_env(home: Path, **extra: str) -> dict[str, str]:
    """No user's AWS, MLflow or make settings leak in; HOME is a temp folder (``~`` remotes)."""
    drop = ("AWS_", "MLFLOW_", "MAKE", "MFLAGS")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(
        HOME=str(home),
        PATH=f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        DVC_NO_ANALYTICS="1",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_CONFIG_FILE=str(home / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(home / "no-aws-credentials"),
        **extra,
    )
    env.pop("PYTHONPATH", None)  # each copy runs its own code (python -m from its root)
    return env


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory, home: Path) -> Iterator[S3]:
    tmp = tmp_path_factory.mktemp("moto")
    port = free_port()
    env = isolated_env(home)
    log = tmp / "moto.log"
    proc = start(
        [str(VENV / "bin" / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], log, env, tmp
    )
    try:
        endpoint = f"http://127.0.0.1:{port}"
        wait_http(f"{endpoint}/moto-api/", proc, log, timeout_s=60)
        server = S3(endpoint, env)
        server.client().create_bucket(Bucket=BUCKET)
        yield server
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def mlflow_s3(tmp_path_factory: pytest.TempPathFactory, s3: S3, home: Path) -> Iterator[str]:
    """A tracking server that keeps artifacts in the bucket and proxies them to its clients."""
    tmp = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    env = isolated_env(
        home,
        MLFLOW_S3_ENDPOINT_URL=s3.endpoint,  # the server alone talks to S3
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",  # no job workers: not used here
    )
    log = tmp / "server.log"
    cmd = [
        str(VENV / "bin" / "mlflow"),
        "server",
        "--host=127.0.0.1",
        f"--port={port}",
        "--workers=1",
        f"--backend-store-uri=sqlite:///{tmp / 'mlflow.db'}",
        f"--artifacts-destination=s3://{BUCKET}/mlflow",
    ]
    proc = start(cmd, log, env, tmp)
    try:
        uri = f"http://127.0.0.1:{port}"
        wait_http(f"{uri}/health", proc, log)
        yield uri
    finally:
        stop(proc)


def tiny_params(repo: Path) -> None:
    """The smoke run's scale: a pixel logistic regression on 20 photos per class."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["prepare"].update(max_per_class=20, workers=1)
    params["train"].update(
        model="logreg", input_size=64, resize=72, epochs=3, patience=2, batch_size=8, cascade=None
    )
    params["export"].update(
        quantize=False, parity_images=4, bench_runs=1, bench_warmup=0, calibration_images=8
    )
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory, s3: S3, mlflow_s3: str, home: Path) -> Pushed:
    """A repo switched to the S3 remote, whose `make pipeline` met an empty bucket."""
    repo = tmp_path_factory.mktemp("clones") / "repo"
    repo.mkdir()
    copy_tracked_tree(repo)
    tiny_params(repo)
    env = isolated_env(home, MLFLOW_TRACKING_URI=mlflow_s3)
    # the README's switch to S3: the URL and endpoint are committed, the credentials never are
    for cmd in (
        ["git", "init", "-q"],
        ["dvc", "remote", "add", "-d", "s3", f"s3://{BUCKET}/dvc"],
        ["dvc", "remote", "modify", "s3", "endpointurl", s3.endpoint],
        ["git", "add", "-A"],
        [*GIT, "commit", "-qm", "copy, remote on S3"],
    ):
        out = run(cmd, repo, env)
        assert out.returncode == 0, out.stderr
    # dvc.lock stays: the pull looks for the outputs it names and finds an empty bucket
    made = make("pipeline", repo, env, timeout=600)
    assert made.returncode == 0, made.stdout[-4000:] + made.stderr[-4000:]
    for cmd in (["git", "add", "dvc.lock"], [*GIT, "commit", "-qm", "pipeline run"]):
        out = run(cmd, repo, env)
        assert out.returncode == 0, out.stderr
    return Pushed(repo, env, made)


def lock_outs(repo: Path) -> dict[str, str]:
    """path -> md5 of every output dvc.lock records."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for stage in lock["stages"].values() for o in stage.get("outs", [])}


def test_pipeline_on_an_empty_remote_trains_and_pushes(pushed: Pushed, s3: S3) -> None:
    out = pushed.make.stdout
    assert "Missing cache files" in pushed.make.stderr  # the pull found the bucket empty
    assert "WARNING: dvc pull failed" not in pushed.make.stderr  # ... which is no failure
    for stage in STAGES:
        assert f"Running stage '{stage}'" in out, out
    assert "WARNING: dvc push failed" not in pushed.make.stderr
    stored = s3.keys("dvc/files/md5/")
    outs = lock_outs(pushed.repo)
    assert set(outs) >= {"data/raw", "data/prepared", "models/checkpoint.pt", "models/model.onnx"}
    for path, md5 in outs.items():
        assert f"dvc/files/md5/{md5[:2]}/{md5[2:]}" in stored, path
    model_md5 = outs["models/model.onnx"]
    model_key = f"dvc/files/md5/{model_md5[:2]}/{model_md5[2:]}"
    assert s3.get(model_key) == (pushed.repo / "models" / "model.onnx").read_bytes()


def clone_of(pushed: Pushed, dest: Path) -> Path:
    out = run(["git", "clone", "-q", str(pushed.repo), str(dest)], dest.parent, pushed.env)
    assert out.returncode == 0, out.stderr
    assert not (dest / "models").exists()
    return dest


def test_a_fresh_clone_pulls_the_same_bytes_and_repro_runs_no_stage(
    pushed: Pushed, tmp_path: Path
) -> None:
    clone = clone_of(pushed, tmp_path / "clone")
    env = pushed.env
    assert run(["make", "data-source", f"DATA={PHOTOS}"], clone, env).returncode == 0
    pulled = run(["dvc", "pull"], clone, env)
    assert pulled.returncode == 0, pulled.stderr
    for rel in RESTORED:
        assert sha256(clone / rel) == sha256(pushed.repo / rel), rel
    status = run(["dvc", "status", "dvc.yaml"], clone, env)  # cv/dvc.yaml: make cv, not pulled
    assert status.returncode == 0, status.stderr
    assert status.stdout.strip() == "Data and pipelines are up to date.", status.stdout
    repro = run(["dvc", "repro"], clone, env)
    assert repro.returncode == 0, repro.stderr
    assert "Running stage" not in repro.stdout, repro.stdout
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in repro.stdout, repro.stdout


def test_make_pipeline_in_a_fresh_clone_pulls_instead_of_training(
    pushed: Pushed, tmp_path: Path
) -> None:
    """What CI runs: `make pipeline` alone, in a clone with nothing but git's files."""
    clone = clone_of(pushed, tmp_path / "clone")
    made = make("pipeline", clone, pushed.env)
    assert made.returncode == 0, made.stdout[-4000:] + made.stderr[-4000:]
    assert "Running stage" not in made.stdout, made.stdout
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in made.stdout, made.stdout
    last = made.stdout.strip().splitlines()[-1]
    assert last == "Everything is up to date.", made.stdout  # the push: nothing new
    for rel in RESTORED:
        assert sha256(clone / rel) == sha256(pushed.repo / rel), rel
    assert run(["git", "status", "--porcelain"], clone, pushed.env).stdout == ""  # same dvc.lock


def test_the_default_remote_is_a_folder_any_clone_on_the_machine_reads(
    pushed: Pushed, home: Path, tmp_path: Path
) -> None:
    env = pushed.env
    pushed_local = run(["dvc", "push", "-r", "local"], pushed.repo, env)
    assert pushed_local.returncode == 0, pushed_local.stderr
    folder = home / ".cache" / "catsdogs" / "dvc-remote"
    assert (folder / "files" / "md5").is_dir()  # `~` is the user's home, outside every clone

    clone = clone_of(pushed, tmp_path / "clone")
    # back to the project's own config: the default remote is that folder, nothing to set up
    (clone / ".dvc" / "config").write_text((ROOT / ".dvc" / "config").read_text())
    pulled = make("pull", clone, env)
    assert pulled.returncode == 0, pulled.stdout[-2000:] + pulled.stderr[-2000:]
    for rel in RESTORED:
        assert sha256(clone / rel) == sha256(pushed.repo / rel), rel


def test_mlflow_keeps_the_run_model_on_s3_and_loads_it_back(
    pushed: Pushed, s3: S3, mlflow_s3: str, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    from catsdogs.modelfile import load_model_file
    from server.model_uri import resolve_model_uri

    model = pushed.repo / "models" / "model.onnx"
    registered = json.loads((pushed.repo / "reports" / "export.json").read_text())["registry"]
    assert registered is not None, "the export stage did not register the model"
    source = registered["source"]
    assert source.startswith("mlflow-artifacts:/"), source  # proxied: clients need no S3 keys
    # the bytes in the bucket are the file the pipeline wrote
    prefix = f"mlflow/{source.removeprefix('mlflow-artifacts:/')}"
    assert s3.get(f"{prefix}/model.onnx") == model.read_bytes()
    run_id = registered["run_id"]
    checkpoint_key = prefix.replace("/artifacts/onnx", "/artifacts/checkpoint/checkpoint.pt")
    assert s3.get(checkpoint_key) == (pushed.repo / "models" / "checkpoint.pt").read_bytes()

    client = MlflowClient(mlflow_s3)
    assert client.get_run(run_id).data.params["train.model"] == "logreg"
    loaded = resolve_model_uri(
        f"models:/{registered['name']}/{registered['version']}",
        tracking_uri=mlflow_s3,
        cache_dir=tmp_path / "cache",
    )
    assert loaded.read_bytes() == model.read_bytes()
    assert load_model_file(loaded).contract.mlflow_run_id == run_id
