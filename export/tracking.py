"""MLflow: attach the exported file and its reports to the training run, register a version;
attach the evaluate stage's test metrics and plots to the same run.

The tracking store comes only from ``MLFLOW_TRACKING_URI`` (default: the local sqlite store).
MLflow being unreachable is a warning, never a failed export: the file on disk is the product.
"""

from __future__ import annotations

import logging
import os
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ONNX_ARTIFACT_DIR = "onnx"  # a registered version's source folder; holds model.onnx
EXPORT_EXPERIMENT = "catsdogs-export"  # used only when the training run is unknown here


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")


def reachable(uri: str, timeout_s: float = 3.0) -> bool:
    """A quick probe, so an absent server costs seconds, not MLflow's minutes of retries."""
    if not uri.startswith(("http://", "https://")):
        return True  # a local store is always there
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as resp:
            return resp.status == 200
    except OSError:
        return False


def _run_id(client: Any, run_id: str, model_version: str) -> str:
    """The training run if this store knows it, else a new run in the export experiment."""
    from mlflow.exceptions import MlflowException

    if run_id:
        try:
            client.get_run(run_id)
            return run_id
        except MlflowException:
            log.warning(
                "training run %s is not in %s; logging to a new run", run_id, tracking_uri()
            )
    exp = client.get_experiment_by_name(EXPORT_EXPERIMENT)
    exp_id = exp.experiment_id if exp else client.create_experiment(EXPORT_EXPERIMENT)
    run = client.create_run(exp_id, run_name=f"export-{model_version}")
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def log_and_register(
    *,
    run_id: str,
    model_path: Path,
    reports: Sequence[Path],
    registered_model: str,
    tags: dict[str, str],
    metrics: dict[str, float],
) -> dict[str, str] | None:
    """Log ``model_path`` (as ``onnx/model.onnx``) and ``reports`` to the run, register a version.

    Returns ``{"run_id", "name", "version", "source"}``, or None when MLflow is unreachable or
    refuses (with a warning).
    """
    uri = tracking_uri()
    if not reachable(uri):
        log.warning("MLflow at %s is unreachable: the model is not registered", uri)
        return None
    try:
        import mlflow
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        mlflow.set_tracking_uri(uri)
        client = MlflowClient(uri)
        run = _run_id(client, run_id, tags.get("model_version", ""))
        client.log_artifact(run, str(model_path), ONNX_ARTIFACT_DIR)
        for report in reports:
            client.log_artifact(run, str(report), "export")
        for key, value in metrics.items():
            client.log_metric(run, f"onnx_test_{key}", float(value))
        try:
            client.get_registered_model(registered_model)
        except MlflowException:
            client.create_registered_model(
                registered_model, description="Cat-or-dog photo classifier (ONNX, uint8 NHWC)"
            )
        source = f"{client.get_run(run).info.artifact_uri}/{ONNX_ARTIFACT_DIR}"
        mv = client.create_model_version(
            registered_model,
            source=source,
            run_id=run,
            tags={**tags, **{f"test_{k}": str(v) for k, v in metrics.items()}},
            description=f"{tags.get('model_name', '')} {tags.get('model_version', '')}".strip(),
        )
    except Exception as exc:  # any MLflow failure leaves the exported file valid
        log.warning("MLflow logging/registration failed (%s): %s", type(exc).__name__, exc)
        return None
    log.info("registered %s version %s from run %s", registered_model, mv.version, run)
    return {"run_id": run, "name": registered_model, "version": str(mv.version), "source": source}


EVALUATE_ARTIFACT_DIR = "evaluate"  # the evaluate stage's metrics and plots in the training run


def log_evaluation(
    *, run_id: str, split: str, metrics: dict[str, float], files: Sequence[Path]
) -> bool:
    """Log ``metrics`` as ``{split}_{name}`` and ``files`` under ``evaluate/`` to the training run.

    Only to the run the model file names (its ``mlflow_run_id``): with no run id, or a run this
    store does not know, nothing is logged (a warning, never a failed stage). True when logged.
    """
    if not run_id:
        log.info("the model names no MLflow run: %s metrics and plots stay on disk", split)
        return False
    uri = tracking_uri()
    if not reachable(uri):
        log.warning("MLflow at %s is unreachable: %s metrics and plots not logged", uri, split)
        return False
    try:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        client = MlflowClient(uri)
        try:
            client.get_run(run_id)
        except MlflowException:
            log.warning("training run %s is not in %s: %s plots not logged", run_id, uri, split)
            return False
        for key, value in metrics.items():
            client.log_metric(run_id, f"{split}_{key}", float(value))
        for path in files:
            client.log_artifact(run_id, str(path), EVALUATE_ARTIFACT_DIR)
    except Exception as exc:  # any MLflow failure leaves the stage's files valid
        log.warning(
            "MLflow logging of the %s evaluation failed (%s): %s", split, type(exc).__name__, exc
        )
        return False
    log.info("%s metrics and plots logged to MLflow run %s", split, run_id)
    return True
