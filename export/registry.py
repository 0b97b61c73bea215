"""Model registry commands: ``python -m export.registry promote --version N``, ``list``.

``promote`` is gated: the candidate version is served by a fresh server process (the serving
environment, ``python -m server``, on a free 127.0.0.1 port), judged by the post-deployment
evaluation (``monitoring/evaluate_deployment.py``, a labelled photo folder and an accuracy
minimum) and only when that passes does the alias (default ``champion``) move to it. Either
way the evaluation's figures become tags of the version (``deployment_eval_*``, and
``promoted_at`` when it moved). Servers, CD and Kubernetes then load
``models:/catsdogs@champion``.

There is no ``--force``: a rollback (promote the previous champion) passes the same gate, which
a model that served well before passes again; an alias that skips the evaluation is a change
made by hand in MLflow, on purpose, not a flag.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from catsdogs.hashing import file_sha256
from export.params import load_export
from export.tracking import MODEL_FILE, reachable, tracking_uri

log = logging.getLogger("export.registry")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SERVE_PYTHON = ROOT / ".venv-serve" / "bin" / "python"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "catsdogs" / "images"
# the prepare stage's manifest: its test split is what a version trained on it never saw
MANIFEST = ROOT / "data" / "prepared" / "manifest.csv"


def default_data() -> Path:
    """The gate's photos: the manifest's test split when there is one, else the shared folder
    (whose photos a model trained on them has seen: the tags record ``held_out``)."""
    return MANIFEST if MANIFEST.is_file() else DEFAULT_DATA


EXIT_REFUSED = 1


class PromotionRefusedError(RuntimeError):
    """The candidate failed (or could not run) its evaluation; the alias did not move."""


@dataclass(frozen=True)
class Gate:
    """How a candidate is judged: the knobs of ``make evaluate-deployment``."""

    data: Path = DEFAULT_DATA
    min_accuracy: float = 0.95
    limit: int | None = None
    serve_python: Path = DEFAULT_SERVE_PYTHON
    out: Path | None = None  # results.json + summary.json; None: a temp folder
    ready_timeout_s: float = 180.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _on_local_disk(source: str) -> bool:
    """A version registered from a local store (``make run``, then ``make mlflow-ui``): its
    source is an absolute path or a ``file:`` URI, which servers refuse by default."""
    return source.startswith(("/", "file:"))


def _model_source_env(client: Any, name: str, version: str, workdir: Path) -> dict[str, str]:
    """How the candidate server finds the version: through the tracking server by URI, or
    (a local store, or a version whose files are on this machine's disk: the server refuses a
    local source unless told otherwise) a checked download that it serves by path."""
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        source = client.get_model_version(name, version).source
        if not _on_local_disk(source):  # what production servers resolve: test that path
            return {"MODEL_URI": f"models:/{name}/{version}", "MLFLOW_TRACKING_URI": uri}
    import mlflow.artifacts

    dst = workdir / "download"
    dst.mkdir()
    folder = mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{name}/{version}", dst_path=str(dst)
    )
    path = Path(folder) / MODEL_FILE
    expected = client.get_model_version(name, version).tags.get("sha256")
    if not path.is_file() or (expected and file_sha256(path) != expected):
        raise PromotionRefusedError(
            f"version {version}: {path} is missing or not the tagged sha256"
        )
    return {"MODEL_PATH": str(path), "MODEL_URI": ""}


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float, log_file: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_file.read_text(errors="replace")[-2000:]
            raise PromotionRefusedError(f"the candidate server exited ({proc.returncode}):\n{tail}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"{url}/health/ready", timeout=2) as resp,
        ):
            if resp.status == 200:
                return
        time.sleep(0.5)
    raise PromotionRefusedError(f"the candidate server was not ready within {timeout_s:.0f} s")


@contextlib.contextmanager
def candidate_server(source_env: dict[str, str], gate: Gate, workdir: Path) -> Iterator[str]:
    """``python -m server`` on the candidate, with its own throwaway prediction log; stopped
    by PID (SIGTERM, then SIGKILL) however the evaluation ends. Yields its base URL."""
    port = _free_port()
    env = {
        **os.environ,
        **source_env,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "MODEL_CACHE_DIR": str(workdir / "cache"),
        "PREDICTION_LOG_PATH": str(workdir / "predictions.db"),
        "PREDICTION_LOG_URL": "",  # never the production store
        "LOG_LEVEL": "warning",
    }
    log_file = workdir / "server.log"
    with log_file.open("wb") as out:
        proc = subprocess.Popen(
            [str(gate.serve_python), "-m", "server"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, proc, gate.ready_timeout_s, log_file)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def evaluate_candidate(url: str, gate: Gate, out: Path) -> dict[str, Any]:
    """``monitoring.evaluate_deployment`` against ``url``; its summary (``passed`` decides)."""
    out = out.absolute()  # the evaluation runs in the repository root, this process may not
    cmd = [
        str(gate.serve_python),
        "-m",
        "monitoring.evaluate_deployment",
        "--url",
        url,
        "--data",
        str(gate.data.absolute()),
        "--out",
        str(out),
        "--min-accuracy",
        str(gate.min_accuracy),
    ]
    if gate.limit:
        cmd += ["--limit", str(gate.limit)]
    summary_file = out / "summary.json"
    summary_file.unlink(missing_ok=True)  # never judge by an earlier run's summary
    proc = subprocess.run(cmd, cwd=ROOT, check=False, timeout=3600)
    if not summary_file.is_file():  # exit 2: no server answer, no usable folder
        raise PromotionRefusedError(f"the evaluation could not run (exit {proc.returncode})")
    summary = json.loads(summary_file.read_text())
    summary["passed"] = bool(summary.get("passed")) and proc.returncode == 0
    return summary


def _eval_tags(summary: dict[str, Any], gate: Gate, served_ok: bool) -> dict[str, str]:
    return {
        "deployment_eval_accuracy": f"{summary['accuracy']:.4f}",
        "deployment_eval_n": str(summary["n"]),
        "deployment_eval_errors": str(summary["errors"]),
        "deployment_eval_min_accuracy": str(gate.min_accuracy),
        "deployment_eval_data": str(gate.data),
        # true: photos the version never trained on (a manifest's test split); null: unknown
        "deployment_eval_held_out": json.dumps(summary.get("held_out")),
        "deployment_eval_served_version": str(summary.get("model_version")),
        "deployment_eval_passed": str(summary["passed"] and served_ok).lower(),
        "deployment_eval_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def promote(
    name: str, version: str, alias: str = "champion", gate: Gate | None = None
) -> dict[str, Any]:
    """Evaluate ``name`` version ``version`` on a live server; move ``alias`` only if it passes.

    Returns the evaluation summary; raises :class:`PromotionRefusedError` (alias untouched) when the
    candidate fails, serves another model version than its tag, or cannot be evaluated.
    """
    from mlflow import MlflowClient

    gate = gate or Gate()
    if not gate.serve_python.is_file():
        raise PromotionRefusedError(f"no serving Python at {gate.serve_python} (make venv-serve)")
    client = MlflowClient(tracking_uri())
    mv = client.get_model_version(name, version)  # fails clearly if the version does not exist
    before = client.get_registered_model(name).aliases.get(alias)
    with tempfile.TemporaryDirectory(prefix="promote-") as tmp:
        workdir = Path(tmp)
        out = gate.out or workdir / "evaluation"
        source = _model_source_env(client, name, version, workdir)
        with candidate_server(source, gate, workdir) as url:
            log.info("evaluating %s version %s at %s on %s", name, version, url, gate.data)
            summary = evaluate_candidate(url, gate, out)
    # the server must have served this very version (the file's contract vs the version's tag)
    expected = mv.tags.get("model_version")
    served_ok = expected is None or summary.get("model_version") == expected
    tags = _eval_tags(summary, gate, served_ok)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    if tags["deployment_eval_passed"] != "true":
        why = (
            f"it served model_version {summary.get('model_version')!r}, tagged {expected!r}"
            if not served_ok
            else f"accuracy {summary['accuracy']:.4f} (minimum {gate.min_accuracy}), "
            f"{summary['errors']} failed requests"
        )
        raise PromotionRefusedError(
            f"{name} version {version} not promoted: {why}; {alias} stays at {before or 'none'}"
        )
    client.set_registered_model_alias(name, alias, version)
    client.set_model_version_tag(
        name, version, "promoted_at", datetime.now(UTC).isoformat(timespec="seconds")
    )
    log.info(
        "%s@%s -> version %s (was %s): accuracy %.4f on %d photos (%s)",
        name,
        alias,
        version,
        before or "none",
        summary["accuracy"],
        summary["n"],
        tracking_uri(),
    )
    return summary


def list_versions(name: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri())
    aliases: dict[str, list[str]] = {}
    for alias, version in client.get_registered_model(name).aliases.items():
        aliases.setdefault(str(version), []).append(alias)
    for mv in client.search_model_versions(f"name='{name}'"):
        log.info(
            "version %s  accuracy %s  deployed-eval %s  data %s  %s",
            mv.version,
            mv.tags.get("test_accuracy", "?"),
            mv.tags.get("deployment_eval_accuracy", "-"),
            mv.tags.get("data_version", "?")[:8],
            ",".join(aliases.get(str(mv.version), [])),
        )


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(
        prog="python -m export.registry",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--name", help="registered model name (default: export.registered_model)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("promote", help="evaluate a version on a live server, then set the alias")
    p.add_argument("--version", required=True)
    p.add_argument("--alias", default="champion")
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="labelled folder (cat/, dog/) or the prepare stage's manifest, whose test split is "
        "sent (default: data/prepared/manifest.csv if present, else the shared photos)",
    )
    p.add_argument("--min-accuracy", type=float, default=0.95)
    p.add_argument("--limit", type=int, default=None, help="at most this many photos")
    p.add_argument("--out", type=Path, default=None, help="folder for results/summary JSON")
    p.add_argument("--serve-python", type=Path, default=DEFAULT_SERVE_PYTHON)
    sub.add_parser("list", help="list versions")
    args = parser.parse_args(argv)
    name = args.name or load_export(args.params).registered_model
    # an absent tracking server: one line in seconds (MLflow retried for about 4 minutes); a
    # present one keeps MLflow's retries, so a passing 5xx never fails a gated promotion
    if not reachable(tracking_uri()):
        log.error("%s: the MLflow tracking server does not answer", tracking_uri())
        sys.exit(EXIT_REFUSED)
    from mlflow.exceptions import MlflowException

    if args.command == "list":
        try:
            list_versions(name)
        except MlflowException as exc:  # e.g. nothing registered yet: one line, no traceback
            log.error("%s: %s", tracking_uri(), str(exc).splitlines()[0])
            sys.exit(EXIT_REFUSED)
        return
    gate = Gate(
        data=(args.data or default_data()).absolute(),
        min_accuracy=args.min_accuracy,
        limit=args.limit,
        # absolute, never resolved: a venv's python is a symlink that must stay one
        serve_python=args.serve_python.absolute(),
        out=args.out.absolute() if args.out else None,
    )
    try:
        promote(name, args.version, args.alias, gate)
    except (PromotionRefusedError, MlflowException) as exc:  # e.g. no such version
        log.error("%s", exc)
        sys.exit(EXIT_REFUSED)


if __name__ == "__main__":
    main()
