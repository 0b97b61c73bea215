"""The model contract: what ``models/model.onnx`` carries in its ``metadata_props``.

Export writes these keys and the server reads them; no class list, size or normalisation
constant is repeated anywhere else. Values are strings (ONNX metadata is string -> string);
JSON values are decoded here.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from catsdogs.preprocessing import PreprocessSpec

INPUT_NAME = "image"  # uint8 (batch, H, W, 3)
OUTPUT_LOGITS = "logits"  # float32 (batch, n_classes)
OUTPUT_PROBABILITIES = "probabilities"  # float32 (batch, n_classes), softmax of logits
# a cascade (export.cascade) adds: bool (batch,), the rows its first model escalated
OUTPUT_ESCALATED = "escalated"
# ... and its threshold as an overridable initializer (a graph input with a default). Fed, it picks
# the path on purpose: NO_ROW (no probability is < 0) sends no row on, EVERY_ROW (each is < 2)
# every row, so the export stage can time each path, and the server's second step runs every row
# its first step escalated. A client's request never sets it
CASCADE_BELOW = "cascade/below"
EVERY_ROW, NO_ROW = 2.0, 0.0

REQUIRED_KEYS = (
    "class_names",  # JSON list, sorted, index i = output column i
    "input_size",  # int, side of the square input
    "preprocessing",  # JSON of PreprocessSpec
    "model_name",
    "model_version",
    "mlflow_run_id",
    "git_commit",
    "data_version",  # sha256 of the prepared data manifest
    "exported_at",  # ISO 8601 UTC
)
# Optional JSON keys: "metrics" (test metrics of this file), "reference_stats" (drift reference),
# "training" (params summary), "quantization" ("none" | "int8_qdq"), "cascade" (a cascade file:
# {"models": the models past model_name, "below": the threshold}).
JSON_KEYS = ("class_names", "preprocessing", "metrics", "reference_stats", "training", "cascade")


class ContractError(ValueError):
    """The model file lacks or garbles part of its contract."""


# A class name or a model version becomes a Prometheus label value, a log field, a chart title
# and a header: printable text of a bounded length (a contract is read from a registry too)
MAX_CLASSES = 1000
MAX_NAME_CHARS = 128


def _printable(value: str) -> bool:
    """No control or format characters (CR, LF, ESC, a right-to-left override), no spaces
    around it, and not empty."""
    return (
        0 < len(value) <= MAX_NAME_CHARS
        and value == value.strip()
        and not any(unicodedata.category(c).startswith("C") for c in value)
    )


@dataclass(frozen=True)
class ModelContract:
    class_names: tuple[str, ...]
    input_size: int
    preprocessing: PreprocessSpec
    model_name: str
    model_version: str
    mlflow_run_id: str
    git_commit: str
    data_version: str
    exported_at: str
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_metadata(cls, meta: dict[str, str], source: str = "model") -> ModelContract:
        missing = [k for k in REQUIRED_KEYS if k not in meta]
        if missing:
            raise ContractError(f"{source}: metadata_props lacks {missing}")
        decoded: dict[str, Any] = {}
        for key, value in meta.items():
            if key in JSON_KEYS:
                try:
                    decoded[key] = json.loads(value)
                except json.JSONDecodeError as exc:
                    raise ContractError(f"{source}: metadata {key!r} is not valid JSON") from exc
            else:
                decoded[key] = value
        names = decoded["class_names"]
        valid = isinstance(names, list) and all(isinstance(n, str) for n in names)
        if not valid or len(names) < 2:
            raise ContractError(f"{source}: class_names must be a JSON list of >= 2 strings")
        if len(set(names)) != len(names):
            raise ContractError(f"{source}: class_names has duplicates")
        if len(names) > MAX_CLASSES:
            raise ContractError(f"{source}: class_names has more than {MAX_CLASSES} classes")
        for what, values in (
            ("class_names", names),
            ("model_name", [meta["model_name"]]),
            ("model_version", [meta["model_version"]]),
        ):
            bad = next((v for v in values if not _printable(v)), None)
            if bad is not None:
                raise ContractError(
                    f"{source}: {what}: {bad[:40]!r} is not a printable name of 1 to "
                    f"{MAX_NAME_CHARS} characters without spaces around it"
                )
        try:
            spec = PreprocessSpec.from_json(meta["preprocessing"])
            input_size = int(decoded["input_size"])
        except (ValueError, TypeError) as exc:
            raise ContractError(f"{source}: bad preprocessing metadata: {exc}") from exc
        if input_size != spec.input_size:
            raise ContractError(f"{source}: input_size {input_size} != preprocessing.input_size")
        extra = {k: v for k, v in decoded.items() if k not in REQUIRED_KEYS}
        return cls(
            class_names=tuple(names),
            input_size=input_size,
            preprocessing=spec,
            model_name=str(decoded["model_name"]),
            model_version=str(decoded["model_version"]),
            mlflow_run_id=str(decoded["mlflow_run_id"]),
            git_commit=str(decoded["git_commit"]),
            data_version=str(decoded["data_version"]),
            exported_at=str(decoded["exported_at"]),
            extra=extra,
        )

    def to_metadata(self) -> dict[str, str]:
        """The inverse of :meth:`from_metadata`: string -> string, ready for ``metadata_props``."""
        meta = {
            "class_names": json.dumps(list(self.class_names)),
            "input_size": str(self.input_size),
            "preprocessing": self.preprocessing.to_json(),
            "model_name": self.model_name,
            "model_version": self.model_version,
            "mlflow_run_id": self.mlflow_run_id,
            "git_commit": self.git_commit,
            "data_version": self.data_version,
            "exported_at": self.exported_at,
        }
        for key, value in self.extra.items():
            meta[key] = json.dumps(value) if key in JSON_KEYS else str(value)
        return meta
