"""Open an ONNX model file and read the contract it carries; every failure names the file."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from catsdogs.contract import INPUT_NAME, OUTPUT_LOGITS, OUTPUT_PROBABILITIES, ModelContract

if TYPE_CHECKING:
    import onnxruntime as ort


class ModelFileError(ValueError):
    """A model file is missing, unreadable or not a usable ONNX model. The message names it."""


class LoadedModel(NamedTuple):
    session: ort.InferenceSession
    contract: ModelContract
    path: Path


def load_model_file(
    path: str | Path,
    *,
    sess_options: ort.SessionOptions | None = None,
    source: bytes | str | None = None,
) -> LoadedModel:
    """Open an ONNX file as a CPU session and read its contract, or fail naming the file.

    ``source``: what onnxruntime opens instead of the file itself, made from it (the server and
    ``make bench`` open a cascade's first step); it is checked as the file would be.
    """
    import onnxruntime as ort  # heavy: imported when a model is opened, not with the module

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist")
    if path.stat().st_size == 0:
        raise ModelFileError(f"model file {path} is empty (0 bytes)")
    if sess_options is None:
        sess_options = ort.SessionOptions()
        # a cascade's overridable initializers (its threshold, its second model's sizes) are
        # graph inputs on purpose; onnxruntime warns about each one, which is noise here
        sess_options.log_severity_level = 3
    try:
        session = ort.InferenceSession(
            str(path) if source is None else source,
            sess_options=sess_options,
            providers=["CPUExecutionProvider"],
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
