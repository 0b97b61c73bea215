"""PyTorch classifier -> one self-describing ONNX file, proven equal to the model it came from.

The exported graph takes the uint8 NHWC batch that ``catsdogs.preprocessing`` makes (input
``image``, symbolic batch) and returns ``logits`` and ``probabilities``; normalisation is inside
the graph. The contract (class names, preprocessing, lineage, metrics, drift reference) goes into
``metadata_props`` so the server needs nothing but the file.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from catsdogs.contract import INPUT_NAME, OUTPUT_ESCALATED, OUTPUT_LOGITS, OUTPUT_PROBABILITIES

log = logging.getLogger(__name__)

BATCH_CHECKS = (1, 7, 32)  # batch sizes every exported file must run, to prove the batch is free


class ExportError(RuntimeError):
    """The exported file is not the model it came from, or not a valid deployable file."""


class ClassifierWithProbabilities(nn.Module):
    """uint8 (N, H, W, 3) -> (logits (N, C), probabilities (N, C)): the served graph."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(image)
        return logits, torch.softmax(logits, dim=-1)


def export_onnx(model: nn.Module, path: Path, *, input_size: int, opset: int) -> Path:
    """Export ``model`` (uint8 NHWC in, logits out) to ONE ``.onnx`` file with a free batch dim."""
    wrapped = ClassifierWithProbabilities(model).eval()
    # batch 2 in the example: a size-1 example lets the tracer specialise the batch to 1
    example = torch.zeros((2, input_size, input_size, 3), dtype=torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            wrapped,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_LOGITS, OUTPUT_PROBABILITIES],
            dynamic_shapes={"image": {0: torch.export.Dim("batch")}},
            opset_version=opset,
            external_data=False,  # one file: the weights inside, no .onnx.data beside it
            dynamo=True,
            verbose=False,
        )
    stray = path.with_name(path.name + ".data")
    if stray.exists():
        raise ExportError(f"{path}: the exporter wrote external data {stray}; expected one file")
    written = file_opset(path)
    if written != opset:
        # torch's exporter writes its own opset and converts down only where ONNX's converter
        # can; it may leave the file at another opset with a warning in the log
        raise ExportError(
            f"export.opset is {opset} but the exporter wrote opset {written} (it could not "
            f"convert this graph); set export.opset to {written}, or to what your runtime reads"
        )
    return path


def file_opset(path: Path) -> int:
    """The default (ai.onnx) domain's opset that ``path`` imports."""
    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def check_onnx_file(path: Path) -> onnx.ModelProto:
    """Full ONNX checker (with shape inference) and the interface the server relies on."""
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    # inputs with an initializer are optional (a cascade's overridable threshold): not fed
    initialized = {init.name for init in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initialized]
    outputs = [o.name for o in model.graph.output]
    # a cascade (export.cascade) also says which rows it escalated
    served = (
        [OUTPUT_LOGITS, OUTPUT_PROBABILITIES],
        [OUTPUT_LOGITS, OUTPUT_PROBABILITIES, OUTPUT_ESCALATED],
    )
    if inputs != [INPUT_NAME] or outputs not in served:
        raise ExportError(f"{path}: interface is {inputs} -> {outputs}")
    image = model.graph.input[0].type.tensor_type
    if image.elem_type != onnx.TensorProto.UINT8:
        raise ExportError(f"{path}: input {INPUT_NAME!r} is not uint8")
    batch = image.shape.dim[0]
    if not batch.dim_param or batch.HasField("dim_value"):
        raise ExportError(
            f"{path}: the batch dimension is fixed at {batch.dim_value}, not symbolic"
        )
    for out in model.graph.output:
        if not out.type.tensor_type.shape.dim[0].dim_param:
            raise ExportError(f"{path}: output {out.name!r} has a fixed batch dimension")
    return model


def make_session(path: Path | str | bytes, threads: int = 0) -> ort.InferenceSession:
    """A CPU session; ``threads`` > 0 fixes intra-op threads (otherwise onnxruntime's default)."""
    opts = ort.SessionOptions()
    if threads > 0:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def run_batch_checks(session: ort.InferenceSession, input_size: int, n_classes: int) -> list[int]:
    """Run batches of 1, 7 and 32: a graph with a baked-in batch size fails here."""
    rng = np.random.default_rng(0)
    for n in BATCH_CHECKS:
        x = rng.integers(0, 256, size=(n, input_size, input_size, 3), dtype=np.uint8)
        logits, probs = session.run([OUTPUT_LOGITS, OUTPUT_PROBABILITIES], {INPUT_NAME: x})
        if logits.shape != (n, n_classes) or probs.shape != (n, n_classes):
            raise ExportError(f"batch {n}: got shapes {logits.shape}, {probs.shape}")
        if not np.allclose(probs.sum(axis=1), 1.0, atol=1e-5):
            raise ExportError(f"batch {n}: probabilities do not sum to 1")
    return list(BATCH_CHECKS)


@dataclass(frozen=True)
class Parity:
    n: int
    max_abs_logit_diff: float
    max_abs_prob_diff: float
    label_mismatches: int
    atol: float

    @property
    def ok(self) -> bool:
        # the probabilities are what the server answers: they are held to the same tolerance
        # (softmax moves less than its logits do). NaN compares False: never ok.
        return (
            self.max_abs_logit_diff <= self.atol
            and self.max_abs_prob_diff <= self.atol
            and self.label_mismatches == 0
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "max_abs_logit_diff": self.max_abs_logit_diff,
            "max_abs_prob_diff": self.max_abs_prob_diff,
            "label_mismatches": self.label_mismatches,
            "atol": self.atol,
            "ok": self.ok,
        }


def torch_logits(model: nn.Module, batch: np.ndarray, chunk: int = 32) -> np.ndarray:
    """Eager PyTorch logits of a uint8 (N, H, W, 3) batch, in chunks to bound memory."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(batch), chunk):
            part = np.require(batch[i : i + chunk], requirements=["C", "W"])  # torch wants writable
            out.append(model(torch.from_numpy(part)).float().numpy())
    return np.concatenate(out)


def onnx_outputs(
    session: ort.InferenceSession, batch: np.ndarray, chunk: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """(logits, probabilities) of a uint8 (N, H, W, 3) batch from an onnxruntime session."""
    logits, probs = [], []
    for i in range(0, len(batch), chunk):
        lg, pr = session.run(
            [OUTPUT_LOGITS, OUTPUT_PROBABILITIES], {INPUT_NAME: batch[i : i + chunk]}
        )
        logits.append(lg)
        probs.append(pr)
    return np.concatenate(logits), np.concatenate(probs)


def check_parity(
    model: nn.Module, session: ort.InferenceSession, batch: np.ndarray, *, atol: float
) -> Parity:
    """Compare eager PyTorch with onnxruntime on real inputs; raise :class:`ExportError` on a gap.

    ``batch``: uint8 (N, H, W, 3) made by the server's preprocessing from real photos.
    """
    expected = torch_logits(model, batch)
    logits, probs = onnx_outputs(session, batch)
    return parity_of(expected, logits, probs, atol=atol)


def parity_of(
    expected: np.ndarray, logits: np.ndarray, probs: np.ndarray, *, atol: float, what: str = ""
) -> Parity:
    """The :class:`Parity` of eager logits ``expected`` and the file's ``logits`` and ``probs``;
    raises :class:`ExportError` on a gap (``what``: which run of the file, for the message)."""
    expected_probs = torch.softmax(torch.from_numpy(expected), dim=-1).numpy()
    parity = Parity(
        n=len(expected),
        max_abs_logit_diff=float(np.max(np.abs(expected - logits))),
        max_abs_prob_diff=float(np.max(np.abs(expected_probs - probs))),
        # a photo whose label by the logits or by the probabilities is not eager PyTorch's
        label_mismatches=int(
            np.sum(
                (expected.argmax(1) != logits.argmax(1)) | (expected.argmax(1) != probs.argmax(1))
            )
        ),
        atol=atol,
    )
    if not parity.ok:
        raise ExportError(
            f"ONNX output{' ' + what if what else ''} differs from PyTorch on {parity.n} photos:"
            f" max |logit diff| {parity.max_abs_logit_diff:.3g}, max |probability diff| "
            f"{parity.max_abs_prob_diff:.3g} (allowed {atol:g}), "
            f"{parity.label_mismatches} different labels"
        )
    return parity


def embed_metadata(path: Path, meta: dict[str, str], dest: Path | None = None) -> Path:
    """Write ``meta`` into the file's ``metadata_props`` (replacing same-named keys), atomically."""
    model = onnx.load(str(path))
    keep = [p for p in model.metadata_props if p.key not in meta]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in meta.items():
        if not isinstance(value, str):
            raise TypeError(f"metadata {key!r} must be a string, got {type(value).__name__}")
        model.metadata_props.add(key=key, value=value)
    dest = dest or path
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name, suffix=".tmp")
    os.close(fd)
    try:
        onnx.save_model(model, tmp, save_as_external_data=False)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the server may run as another user
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return dest


def read_metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def model_version(exported_at: str, data_version: str, git_commit: str, weights: str) -> str:
    """``YYYYMMDD-<data8>-<git7>-<weights6>``: when, on which data, from which code and weights.

    Two exports of the same checkpoint on the same day get the same version; any change of
    data, code or weights gives a new one.
    """
    day = exported_at[:10].replace("-", "")
    git = (git_commit or "nogit")[:7]
    return f"{day}-{data_version[:8]}-{git}-{weights[:6]}"
