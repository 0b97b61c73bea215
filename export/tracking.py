"""MLflow: attach the exported file and its reports to the training run, register a version;
attach the evaluate stage's test metrics and plots to the same run.

The registered folder (``onnx/`` of the run) is a real MLflow Model with the ``onnx`` and
``python_function`` flavors, a tensor signature and an input example, so ``mlflow.pyfunc`` and
``mlflow.onnx`` load a version as they load any other; its ``model.onnx`` is the exported file
byte for byte (the ``sha256`` tag the server checks), never a re-serialised copy.

The tracking store comes only from ``MLFLOW_TRACKING_URI`` (default: the local sqlite store).
MLflow being unreachable is a warning, never a failed export: the file on disk is the product.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import ssl
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from catsdogs.hashing import file_sha256

log = logging.getLogger(__name__)

ONNX_ARTIFACT_DIR = "onnx"  # a registered version's source folder: MLmodel + model.onnx
MODEL_FILE = "model.onnx"  # the name server/model_uri.py looks for in that folder
EXPORT_EXPERIMENT = "catsdogs-export"  # used only when the training run is unknown here


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")


def reachable(uri: str, timeout_s: float = 3.0) -> bool:
    """A quick probe, so an absent server costs seconds, not MLflow's minutes of retries. Any
    HTTP answer counts (an authenticating proxy's 401 too): only a connection that fails or
    times out is absence. TLS as MLflow's client does it: MLFLOW_TRACKING_INSECURE_TLS,
    MLFLOW_TRACKING_SERVER_CERT_PATH."""
    if not uri.startswith(("http://", "https://")):
        return True  # a local store is always there
    context = None
    if uri.startswith("https://"):
        if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
            context = ssl._create_unverified_context()  # what the user asked MLflow for
        else:
            context = ssl.create_default_context(
                cafile=os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or None
            )
    try:
        with urllib.request.urlopen(
            f"{uri.rstrip('/')}/health", timeout=timeout_s, context=context
        ):
            return True
    except urllib.error.HTTPError:
        return True  # it answered
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


def onnx_signature(model: Any) -> Any:
    """The graph's inputs and outputs as an MLflow tensor signature; a symbolic dim is -1.

    Read from the file, so it can never disagree with it: ``image`` uint8 ``[-1, H, W, 3]`` ->
    ``logits``, ``probabilities`` float32 ``[-1, C]`` for an exported model. Inputs with a
    default (a cascade's threshold and other views, export.cascade) are left out: MLflow's
    schema requires every input it lists, so ``mlflow.pyfunc`` refused a cascade fed ``image``
    alone, on which the file answers with its first model (``escalated`` says which rows want
    the second step and its views).
    """
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec
    from onnx.helper import tensor_dtype_to_np_dtype

    def specs(values: Any) -> Schema:
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
            out.append(TensorSpec(np.dtype(tensor_dtype_to_np_dtype(t.elem_type)), shape, v.name))
        return Schema(out)

    defaults = {init.name for init in model.graph.initializer}
    fed = [v for v in model.graph.input if v.name not in defaults]
    return ModelSignature(inputs=specs(fed), outputs=specs(model.graph.output))


def input_example(signature: Any) -> Any:
    """One mid-grey image in the input's own shape and dtype (batch 1): valid for the model."""
    import numpy as np

    spec = signature.inputs.inputs[0]
    shape = tuple(1 if d == -1 else d for d in spec.shape)
    return np.full(shape, 128, dtype=spec.type)


def save_mlflow_model(model_path: Path, dest: Path, metadata: dict[str, str]) -> Path:
    """Write ``dest`` as an MLflow Model (onnx flavor) around the very bytes of ``model_path``.

    ``mlflow.onnx.save_model`` serialises the proto again, which need not give the same bytes;
    the contract (and the ``sha256`` tag) are about the exported file, so it replaces the
    flavor's data file afterwards and the result is checked. Returns ``dest``.
    """
    import mlflow.onnx
    import onnx
    from mlflow.models import Model

    proto = onnx.load(str(model_path))
    signature = onnx_signature(proto)
    mlflow.onnx.save_model(
        proto,
        str(dest),
        signature=signature,
        input_example=input_example(signature),
        metadata=metadata,
        # the served file is one file (contract); external data would split it
        save_as_external_data=False,
        # the server runs it on CPU; pinned requirements skip MLflow's slow inference of them
        onnx_execution_providers=["CPUExecutionProvider"],
        pip_requirements=mlflow.onnx.get_default_pip_requirements(),
    )
    # MLflow pretty-prints the serving example, one number a line: 3.3 MB for one 224 px image;
    # compact JSON is the same document in a quarter of the bytes
    serving_example = dest / "serving_input_example.json"
    if serving_example.is_file():
        serving_example.write_text(json.dumps(json.loads(serving_example.read_text())))
    mlmodel = Model.load(str(dest / "MLmodel"))
    data = mlmodel.flavors["onnx"]["data"]
    if data != MODEL_FILE or mlmodel.flavors["python_function"]["data"] != MODEL_FILE:
        raise RuntimeError(f"MLflow's onnx flavor stores {data!r}, the server expects {MODEL_FILE}")
    shutil.copyfile(model_path, dest / MODEL_FILE)
    digest = file_sha256(dest / MODEL_FILE)
    if digest != metadata.get("sha256", digest):
        raise RuntimeError(f"{model_path} does not have the sha256 its tags give")
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    if mlmodel.model_size_bytes != size:  # what MLflow measured before the two rewrites
        mlmodel.model_size_bytes = size
        mlmodel.save(str(dest / "MLmodel"))
    return dest


def log_and_register(
    *,
    run_id: str,
    model_path: Path,
    reports: Sequence[Path],
    registered_model: str,
    tags: dict[str, str],
    metrics: dict[str, float],
) -> dict[str, str] | None:
    """Log ``model_path`` as an MLflow Model under ``onnx/`` and ``reports`` to the run, register
    a version whose source is that folder.

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
        # the server checks a download against this tag (server/model_uri.py)
        tags = {**tags, "sha256": tags.get("sha256") or file_sha256(model_path)}
        with tempfile.TemporaryDirectory(prefix="mlflow-model-") as tmp:
            folder = save_mlflow_model(model_path, Path(tmp) / ONNX_ARTIFACT_DIR, tags)
            client.log_artifacts(run, str(folder), ONNX_ARTIFACT_DIR)
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
    """Log ``metrics`` as ``{split}_{name}`` (``test_accuracy``) and ``files`` under ``evaluate/``
    to the training run. The train and val splits' metrics are ``eval_train_{name}`` and
    ``eval_val_{name}``: the training run's per-epoch curves are ``train_{name}`` and
    ``val_{name}``, and a point logged there without a step would land in them at step 0.

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
        prefix = split if split == "test" else f"eval_{split}"
        for key, value in metrics.items():
            client.log_metric(run_id, f"{prefix}_{key}", float(value))
        for path in files:
            client.log_artifact(run_id, str(path), EVALUATE_ARTIFACT_DIR)
    except Exception as exc:  # any MLflow failure leaves the stage's files valid
        log.warning(
            "MLflow logging of the %s evaluation failed (%s): %s", split, type(exc).__name__, exc
        )
        return False
    log.info("%s metrics and plots logged to MLflow run %s", split, run_id)
    return True
