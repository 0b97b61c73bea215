"""The ``export`` and ``evaluate`` sections of ``params.yaml`` as frozen, typed dataclasses."""

from __future__ import annotations

import dataclasses
from pathlib import Path

# the pipeline's one params reader: unknown, missing or mistyped keys are named in the error
from training.params import load_section


@dataclasses.dataclass(frozen=True)
class ExportParams:
    registered_model: str  # MLflow registry name of the served model
    opset: int
    parity_images: int  # real test photos compared between PyTorch and onnxruntime
    parity_atol: float  # largest allowed |logit difference|
    quantize: bool  # also make a static int8 (QDQ) model
    calibration_images: int  # training photos that calibrate int8 activation ranges
    int8_max_accuracy_drop: float  # keep int8 only if fp32 accuracy - int8 accuracy <= this
    serve: str  # "fp32" or "int8": which model becomes models/model.onnx
    bench_threads: int  # the same thread count for torch and onnxruntime
    bench_warmup: int
    bench_runs: int
    register: bool  # log to MLflow and register a model version

    def __post_init__(self) -> None:
        if self.serve not in ("fp32", "int8"):
            raise ValueError(f"serve: expected 'fp32' or 'int8', got {self.serve!r}")
        if self.parity_images < 1 or self.calibration_images < 1 or self.bench_runs < 1:
            raise ValueError("parity_images, calibration_images, bench_runs must be >= 1")


@dataclasses.dataclass(frozen=True)
class EvaluateParams:
    split: str  # manifest split to score
    batch_size: int  # images per onnxruntime call


def load_export(path: Path | str = "params.yaml") -> ExportParams:
    return load_section(ExportParams, "export", path)


def load_evaluate(path: Path | str = "params.yaml") -> EvaluateParams:
    return load_section(EvaluateParams, "evaluate", path)
