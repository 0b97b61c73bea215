"""Where a served model comes from: a local ``.onnx`` path or the MLflow model registry.

``resolve_model_uri`` turns ``models:/catsdogs@champion`` or ``models:/catsdogs/3`` into a local
file through MLflow's REST API, with nothing but the standard library (the serving environment
has no mlflow). ``load_model_file`` opens a file as an onnxruntime session and reads its contract,
failing with an error that names the file when it is missing, truncated or not ONNX at all.

Registry layout written by ``export``: each version's ``source`` is an artifact folder holding
``model.onnx`` (or a path that ends in ``.onnx`` itself).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from server.contract import INPUT_NAME, OUTPUT_LOGITS, OUTPUT_PROBABILITIES, ModelContract

if TYPE_CHECKING:
    import onnxruntime as ort

MODEL_FILE_NAME = "model.onnx"  # the file inside a registered version's artifact folder
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")
_TIMEOUT_S = 30.0


class RegistryError(RuntimeError):
    """A ``models:/`` URI could not be turned into a local model file."""


class ModelFileError(ValueError):
    """A model file is missing, unreadable or not a usable ONNX model. The message names it."""


class LoadedModel(NamedTuple):
    session: ort.InferenceSession
    contract: ModelContract
    path: Path


# ---------------------------------------------------------------- registry


def _get_json(url: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as resp:
            return json.loads(resp.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")[:500]
        with contextlib.suppress(ValueError, KeyError, TypeError):
            detail = json.loads(detail)["message"]  # MLflow: {"error_code", "message"}
        raise RegistryError(f"GET {url} answered {exc.code}: {detail}") from exc
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise RegistryError(f"GET {url} failed: {exc}") from exc


def _model_version(name: str, alias: str | None, version: str | None, api: str) -> dict[str, Any]:
    if alias is not None:
        query = urllib.parse.urlencode({"name": name, "alias": alias})
        body = _get_json(f"{api}/registered-models/alias?{query}")
    else:
        query = urllib.parse.urlencode({"name": name, "version": version})
        body = _get_json(f"{api}/model-versions/get?{query}")
    mv = body.get("model_version")
    if not isinstance(mv, dict) or "source" not in mv:
        raise RegistryError(f"registry answer for models:/{name} lacks model_version.source")
    return mv


def _download_url(tracking_uri: str, mv: dict[str, Any]) -> str | Path:
    """The URL (or local path) of the version's ONNX file, from its ``source``."""
    source = str(mv["source"]).rstrip("/")
    rel = "" if source.endswith(".onnx") else "/" + MODEL_FILE_NAME
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme == "mlflow-artifacts":
        # mlflow-artifacts:/1/<run>/artifacts/onnx (or with a host): served by the proxy endpoint
        path = urllib.parse.quote(parsed.path.lstrip("/") + rel)
        return f"{tracking_uri}/api/2.0/mlflow-artifacts/artifacts/{path}"
    if parsed.scheme == "runs":
        run_id, _, art_path = parsed.path.lstrip("/").partition("/")
        run_id = run_id or parsed.netloc
        query = urllib.parse.urlencode({"run_uuid": run_id, "path": art_path + rel})
        return f"{tracking_uri}/get-artifact?{query}"
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path) + rel)
    if parsed.scheme == "" and source.startswith("/"):
        return Path(source + rel)
    # any other store (s3, gs, ...): ask the tracking server to read it for us
    query = urllib.parse.urlencode(
        {"name": mv["name"], "version": mv["version"], "path": rel.lstrip("/") or ""}
    )
    return f"{tracking_uri}/model-versions/get-artifact?{query}"


def _fetch(url: str, dest: Path) -> None:
    """Download ``url`` to ``dest`` atomically: a half-written file never has the final name."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=_TIMEOUT_S) as resp:
            shutil.copyfileobj(resp, out, length=1 << 20)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, dest)
    except urllib.error.HTTPError as exc:
        raise RegistryError(f"download {url} answered {exc.code}") from exc
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise RegistryError(f"download {url} failed: {exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def resolve_model_uri(uri: str, *, tracking_uri: str, cache_dir: Path) -> Path:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> a local ONNX file.

    Anything else is taken as a local path (``file:`` URIs included). Downloads land in
    ``cache_dir/NAME/VERSION/model.onnx``; a version's files never change, so a cached file is
    reused. The alias is resolved on every call, so a promotion is picked up on the next start.
    """
    match = _MODELS_URI.match(uri)
    if match is None:
        if uri.startswith("models:"):
            raise RegistryError(f"{uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
        parsed = urllib.parse.urlparse(uri)
        if parsed.scheme == "file":
            return Path(urllib.request.url2pathname(parsed.path))
        return Path(uri)
    if not tracking_uri.startswith(("http://", "https://")):
        raise RegistryError(
            f"{uri!r} needs an MLflow tracking server (http://...), got tracking URI "
            f"{tracking_uri!r}"
        )
    base = tracking_uri.rstrip("/")
    name = match["name"]
    mv = _model_version(name, match["alias"], match["version"], f"{base}/api/2.0/mlflow")
    target = _download_url(base, mv)
    if isinstance(target, Path):
        if not target.is_file():
            raise RegistryError(f"{uri!r} -> version {mv.get('version')}: no file at {target}")
        return target
    dest = Path(cache_dir) / name / str(mv["version"]) / MODEL_FILE_NAME
    if not dest.is_file():
        _fetch(target, dest)
    return dest


# ---------------------------------------------------------------- model file


def load_model_file(
    path: str | Path, *, sess_options: ort.SessionOptions | None = None
) -> LoadedModel:
    """Open an ONNX file as a CPU session and read its contract, or fail naming the file."""
    import onnxruntime as ort  # here, so that resolving a URI needs only the standard library

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist")
    if path.stat().st_size == 0:
        raise ModelFileError(f"model file {path} is empty (0 bytes)")
    try:
        session = ort.InferenceSession(
            str(path), sess_options=sess_options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own exception types for bad files
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ModelFileError(
            f"model file {path} is not a valid ONNX model (truncated or another format?): {reason}"
        ) from exc
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if inputs != [INPUT_NAME] or not {OUTPUT_LOGITS, OUTPUT_PROBABILITIES} <= set(outputs):
        raise ModelFileError(
            f"model file {path}: expected input [{INPUT_NAME!r}] and outputs "
            f"{OUTPUT_LOGITS!r}, {OUTPUT_PROBABILITIES!r}; found {inputs} -> {outputs}"
        )
    meta = session.get_modelmeta().custom_metadata_map
    contract = ModelContract.from_metadata(dict(meta), source=str(path))
    return LoadedModel(session, contract, path)
