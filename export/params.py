"""The ``export`` and ``evaluate`` sections of ``params.yaml`` as frozen, typed dataclasses."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from catsdogs.manifest import SPLITS

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
        # each bound names its key: the stage fails here, not after minutes of work
        at_least = {
            "opset": (self.opset, 7),
            "parity_images": (self.parity_images, 1),
            "calibration_images": (self.calibration_images, 1),
            "bench_threads": (self.bench_threads, 1),
            "bench_warmup": (self.bench_warmup, 0),
            "bench_runs": (self.bench_runs, 1),
        }
        for key, (value, low) in at_least.items():
            if value < low:
                raise ValueError(f"{key}: must be >= {low}, got {value}")
        if not self.parity_atol > 0 or not math.isfinite(self.parity_atol):
            raise ValueError(f"parity_atol: must be a finite number > 0, got {self.parity_atol}")
        drop = self.int8_max_accuracy_drop
        if not 0 <= drop <= 1:
            raise ValueError(f"int8_max_accuracy_drop: must be within [0, 1], got {drop}")


@dataclasses.dataclass(frozen=True)
class EvaluateParams:
    split: str  # manifest split to score
    batch_size: int  # images per onnxruntime call

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split: expected one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")


def load_export(path: Path | str = "params.yaml") -> ExportParams:
    return load_section(ExportParams, "export", path)


def load_evaluate(path: Path | str = "params.yaml") -> EvaluateParams:
    return load_section(EvaluateParams, "evaluate", path)
