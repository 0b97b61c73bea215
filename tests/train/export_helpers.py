"""Tiny models, checkpoints and manifests for the export, evaluate and registry tests."""

from __future__ import annotations

import csv
import hashlib
import io
from pathlib import Path

import torch
from PIL import Image

import export.onnx_tools as ox
from catsdogs.contract import ModelContract
from catsdogs.preprocessing import PreprocessSpec, preprocess_bytes_info
from training.models import ImageClassifier, build_model, save_checkpoint

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "catsdogs" / "images"
CLASS_NAMES = ("cat", "dog")
SPEC = PreprocessSpec(input_size=32, resize=36)


def color_model(spec: PreprocessSpec = SPEC) -> ImageClassifier:
    """A pixel logistic regression with hand-set weights: red photos are "cat", blue are "dog".

    Its right answer is known without training, so a test can check predictions, not just shapes.
    """
    model = build_model("logreg", 2, pretrained=False, spec=spec)
    linear = model.head[1]
    side = spec.input_size // 4  # logreg pools by 4: features are (3, side, side) flattened
    per_channel = side * side
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.zero_()
        linear.weight[0, :per_channel] = 1.0 / per_channel  # red -> cat
        linear.weight[0, 2 * per_channel :] = -1.0 / per_channel
        linear.weight[1] = -linear.weight[0]  # blue -> dog
    return model.eval()


def color_contract(**overrides: object) -> ModelContract:
    """A complete contract for :func:`color_model`; ``overrides`` replace any field."""
    fields: dict[str, object] = {
        "class_names": CLASS_NAMES,
        "input_size": SPEC.input_size,
        "preprocessing": SPEC,
        "model_name": "logreg",
        "model_version": "v1",
        "mlflow_run_id": "",
        "git_commit": "g",
        "data_version": "d" * 64,
        "exported_at": "2026-11-26T00:00:00Z",
    }
    fields.update(overrides)
    return ModelContract(**fields)  # type: ignore[arg-type]


def export_color_model(path: Path, **contract_overrides: object) -> Path:
    """:func:`color_model` exported to ``path`` with its contract embedded."""
    ox.export_onnx(color_model(), path, input_size=SPEC.input_size, opset=18)
    return ox.embed_metadata(path, color_contract(**contract_overrides).to_metadata())


def solid_png(rgb: tuple[int, int, int], size: tuple[int, int] = (48, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format="PNG")
    return buf.getvalue()


def shared_photos(per_class: int, offset: int = 0) -> list[tuple[Path, str]]:
    """The first photos of each class from the shared folder (sorted names: deterministic)."""
    out = []
    for label in CLASS_NAMES:
        files = sorted((SHARED / label).iterdir())[offset : offset + per_class]
        assert len(files) == per_class, f"{SHARED / label} has too few photos"
        out += [(p, label) for p in files]
    return out


def write_manifest(
    path: Path, splits: dict[str, list[tuple[Path, str]]], spec: PreprocessSpec = SPEC
) -> str:
    """A manifest.csv in the prepare stage's format; returns its sha256 (the data version).

    Size and brightness are measured as prepare does: the server's preprocessing with ``spec``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "sha256", "width", "height", "brightness", "split"])
        for split, rows in splits.items():
            for photo, label in rows:
                data = photo.read_bytes()
                info = preprocess_bytes_info(data, spec)
                arr, w, h = info.array, info.width, info.height
                digest = hashlib.sha256(data).hexdigest()
                bright = round(float(arr.mean()), 4)
                writer.writerow([str(photo), label, digest, w, h, bright, split])
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_checkpoint(path: Path, model: ImageClassifier, data_version: str, spec=SPEC) -> Path:
    meta = {
        "model_name": "logreg",
        "class_names": list(CLASS_NAMES),
        "preprocessing": spec.to_json(),
        "mlflow_run_id": "",
        "data_version": data_version,
        "git_commit": "0123456789abcdef",
        "params": {"model": "logreg", "input_size": spec.input_size},
        "val_metrics": {"accuracy": 0.5},
    }
    save_checkpoint(path, model, meta)
    return path


def run_export_stage(
    tmp: Path, checkpoint: Path, manifest: Path, params: Path | None = None, **export: object
) -> dict:
    """``python -m export.export`` in-process on ``checkpoint``, its files under ``tmp``, the
    repository's params with ``export`` overrides (registry off); returns the stage's report."""
    import json

    import yaml

    from export.export import main as export_main

    source = params or Path(__file__).resolve().parents[2] / "params.yaml"
    raw = yaml.safe_load(source.read_text())
    raw["export"].update({"register": False, **export})
    (tmp / "export-params.yaml").write_text(yaml.safe_dump(raw))
    args = {
        "--params": tmp / "export-params.yaml",
        "--checkpoint": checkpoint,
        "--manifest": manifest,
        "--out": tmp / "model.onnx",
        "--int8-dir": tmp / "int8",
        "--report": tmp / "export.json",
    }
    export_main([x for kv in args.items() for x in (kv[0], str(kv[1]))])
    return json.loads((tmp / "export.json").read_text())
