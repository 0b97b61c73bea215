"""The ``export`` stage: checkpoint -> verified, self-describing ``models/model.onnx``.

    python -m export.export --checkpoint models/checkpoint.pt \
        --manifest data/prepared/manifest.csv --out models/model.onnx \
        --int8-dir models/int8 --report reports/export.json

Steps: export (dynamo, one file) -> full ONNX check + batches 1, 7, 32 -> parity with PyTorch on
real test photos (fails the stage) -> test metrics of the file -> drift reference from validation
-> contract into metadata_props -> optional int8 -> latency -> MLflow log + registry version.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from tqdm.contrib.logging import logging_redirect_tqdm

from catsdogs.contract import ModelContract
from catsdogs.drift import build_reference_stats
from catsdogs.hashing import file_sha256
from catsdogs.manifest import ManifestRow, read_manifest
from catsdogs.preprocessing import PreprocessSpec
from export import onnx_export as ox
from export.bench import compare_latency
from export.evaluation import Evaluation, evaluate_session, load_batch, progress
from export.params import ExportParams, load_export
from export.tracking import log_and_register

log = logging.getLogger("export")

INT8_FILE = "model.int8.onnx"
INT8_DECISION_FILE = "quantization.json"


def manifest_version(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_contract(
    meta: dict[str, Any], *, exported_at: str, version: str, extra: dict[str, Any]
) -> ModelContract:
    """The file's contract from the checkpoint's meta: lineage comes from training."""
    spec = PreprocessSpec.from_json(meta["preprocessing"])
    return ModelContract(
        class_names=tuple(meta["class_names"]),
        input_size=spec.input_size,
        preprocessing=spec,
        model_name=str(meta["model_name"]),
        model_version=version,
        mlflow_run_id=str(meta.get("mlflow_run_id") or ""),
        git_commit=str(meta.get("git_commit") or ""),
        data_version=str(meta["data_version"]),
        exported_at=exported_at,
        extra=extra,
    )


def export_verified(
    model: nn.Module,
    out: Path,
    *,
    spec: PreprocessSpec,
    n_classes: int,
    opset: int,
    parity_images: np.ndarray,
    atol: float,
) -> ox.Parity:
    """Export, check, run batches 1/7/32 and prove parity; ``out`` exists only if all pass."""
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        candidate = Path(tmp) / out.name
        ox.export_onnx(model, candidate, input_size=spec.input_size, opset=opset)
        ox.check_onnx_file(candidate)
        session = ox.make_session(candidate)
        ox.run_batch_checks(session, spec.input_size, n_classes)
        parity = ox.check_parity(model, session, parity_images, atol=atol)
        shutil.move(candidate, out)
    return parity


def reference_stats(
    val: Evaluation, val_rows: list[ManifestRow], train_rows: list[ManifestRow]
) -> dict[str, Any]:
    """Drift reference: class balance of training, predictions and confidence on validation,
    and source size and input brightness of training and validation photos alike.

    The manifest's brightness was measured by prepare with the training sizes; it is used only
    if it equals what this model's preprocessing gives on the validation photos (else the
    validation photos alone are the reference, measured here).
    """
    measured = val.batch.images.reshape(len(val.batch.images), -1).mean(axis=1)
    listed = np.array([r.brightness if r.brightness is not None else np.nan for r in val_rows])
    sizes = [(r.width, r.height) for r in val_rows]
    consistent = bool(np.allclose(listed, measured, atol=0.01)) and sizes == list(
        zip(val.batch.widths.tolist(), val.batch.heights.tolist(), strict=True)
    )
    rows = train_rows + val_rows
    if consistent:
        widths = [r.width for r in rows]
        heights = [r.height for r in rows]
        brightness = [float(r.brightness) for r in rows]  # type: ignore[arg-type]
    else:
        log.warning("manifest brightness/size differ from this model's input: using val only")
        widths, heights = val.batch.widths.tolist(), val.batch.heights.tolist()
        brightness = measured.tolist()
    return build_reference_stats(
        class_names=val.class_names,
        train_labels=[r.label for r in train_rows],
        val_probabilities=val.probs,
        widths=widths,
        heights=heights,
        brightness=brightness,
    )


class Steps:
    """The stage's overall progress bar: one tick per finished step, the current one named."""

    NAMES = ("preprocess", "export + parity", "metrics", "reference", "int8", "latency", "register")

    def __init__(self) -> None:
        self.bar = progress(desc="export", total=len(self.NAMES), unit="step")
        self.current: str | None = None

    def next(self, name: str) -> None:
        if self.current is not None:
            self.bar.update()
        self.current = name
        self.bar.set_postfix_str(name)

    def close(self) -> None:
        self.bar.update(self.bar.total - self.bar.n)
        self.bar.close()


def file_info(path: Path) -> dict[str, Any]:
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def run(args: argparse.Namespace, params: ExportParams) -> dict[str, Any]:
    steps = Steps()
    try:
        return run_steps(args, params, steps)
    finally:
        steps.close()


def run_steps(args: argparse.Namespace, params: ExportParams, steps: Steps) -> dict[str, Any]:
    from training.models import load_checkpoint

    model, meta = load_checkpoint(args.checkpoint)
    data_version = manifest_version(args.manifest)
    if meta["data_version"] != data_version:
        raise ox.ExportError(
            f"{args.checkpoint} was trained on data {meta['data_version'][:12]} but "
            f"{args.manifest} is {data_version[:12]}: retrain (dvc repro) before exporting"
        )
    spec = PreprocessSpec.from_json(meta["preprocessing"])
    class_names = list(meta["class_names"])
    test_rows = read_manifest(args.manifest, "test")
    val_rows = read_manifest(args.manifest, "val")
    train_rows = read_manifest(args.manifest, "train")

    steps.next("preprocess")
    log.info("preprocessing %d test photos through catsdogs.preprocessing", len(test_rows))
    test_batch = load_batch([r.path for r in test_rows], spec, desc="test")
    if len(test_rows) < params.parity_images:
        raise ox.ExportError(
            f"parity needs {params.parity_images} test photos, the manifest has {len(test_rows)}"
        )
    parity_images = test_batch.images[: params.parity_images]

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.unlink(missing_ok=True)  # a failed stage must not leave the previous file behind
    steps.next("export + parity")
    parity = export_verified(
        model,
        args.out,
        spec=spec,
        n_classes=len(class_names),
        opset=params.opset,
        parity_images=parity_images,
        atol=params.parity_atol,
    )
    log.info("parity on %d photos: max |logit diff| %.2e", parity.n, parity.max_abs_logit_diff)

    fp32 = ox.make_session(args.out)
    steps.next("metrics")
    test_fp32 = evaluate_session(
        fp32, test_rows, spec, class_names, batch=test_batch, desc="fp32 test"
    )
    log.info("fp32 test metrics: %s", test_fp32.metrics)
    steps.next("reference")
    val = evaluate_session(fp32, val_rows, spec, class_names, desc="val")
    reference = reference_stats(val, val_rows, train_rows)

    exported_at = datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    weights = file_sha256(args.checkpoint)
    version = ox.model_version(exported_at, data_version, meta.get("git_commit") or "", weights)
    training = {
        "params": meta.get("params", {}),
        "val_metrics": meta.get("val_metrics", {}),
        "checkpoint_sha256": weights,
    }

    def contract_for(metrics: dict[str, Any], quantization: str) -> ModelContract:
        extra = {
            "metrics": metrics,
            "reference_stats": reference,
            "training": training,
            "quantization": quantization,
        }
        return build_contract(meta, exported_at=exported_at, version=version, extra=extra)

    fp32_contract = contract_for(test_fp32.metrics, "none")
    ox.embed_metadata(args.out, fp32_contract.to_metadata())
    ox.check_onnx_file(args.out)

    report: dict[str, Any] = {
        "model_name": meta["model_name"],
        "model_version": version,
        "opset": params.opset,
        "batch_checks": list(ox.BATCH_CHECKS),
        "parity": parity.as_dict(),
        "metrics": {"fp32": test_fp32.metrics},
        "accuracy": {"fp32": test_fp32.metrics["accuracy"]},
    }
    sessions = {"onnxruntime_fp32": ox.make_session(args.out, params.bench_threads)}
    steps.next("int8")
    int8_decision = quantize_stage(
        args,
        params,
        spec,
        train_rows,
        test_rows,
        test_batch,
        test_fp32,
        contract_for,
        report,
        sessions,
    )
    served = "fp32"
    if params.serve == "int8":
        if not int8_decision.get("kept"):
            raise ox.ExportError("export.serve is 'int8' but no int8 model was kept")
        shutil.copyfile(args.int8_dir / INT8_FILE, args.out)
        served = "int8"
    report["served"] = served

    steps.next("latency")
    log.info("latency: torch eager vs onnxruntime, %d threads", params.bench_threads)
    latency = compare_latency(
        model,
        sessions,
        parity_images,
        batch_sizes=(1, 32),
        threads=params.bench_threads,
        warmup=params.bench_warmup,
        runs=params.bench_runs,
    )
    report["latency_ms"] = {
        "threads": params.bench_threads,
        "warmup": params.bench_warmup,
        "runs": params.bench_runs,
        "statistic": "median",
        **latency,
    }
    report["speedup_vs_torch_eager"] = {
        name: {
            f"batch_{bs}": round(latency["torch_eager"][f"batch_{bs}_ms"] / v[f"batch_{bs}_ms"], 3)
            for bs in (1, 32)
        }
        for name, v in latency.items()
        if name != "torch_eager"
    }
    report["files"] = {"served": file_info(args.out), "checkpoint": file_info(args.checkpoint)}
    if int8_decision.get("kept"):
        report["files"]["int8"] = file_info(args.int8_dir / INT8_FILE)
    write_json(args.report, report)

    if params.register:
        steps.next("register")
        served_metrics = report["metrics"][served]
        registered = log_and_register(
            run_id=str(meta.get("mlflow_run_id") or ""),
            model_path=args.out,
            reports=[args.report, args.int8_dir / INT8_DECISION_FILE],
            registered_model=params.registered_model,
            tags={
                "model_name": meta["model_name"],
                "model_version": version,
                "data_version": data_version,
                "git_commit": str(meta.get("git_commit") or ""),
                "quantization": "int8_qdq" if served == "int8" else "none",
                # the server checks the downloaded file against it (server/model_uri.py)
                "sha256": report["files"]["served"]["sha256"],
            },
            metrics={k: v for k, v in served_metrics.items() if k != "n"},
        )
        report["registry"] = registered
        write_json(args.report, report)
    return report


def quantize_stage(
    args: argparse.Namespace,
    params: ExportParams,
    spec: PreprocessSpec,
    train_rows: list,
    test_rows: list,
    test_batch: Any,
    test_fp32: Evaluation,
    contract_for: Any,
    report: dict[str, Any],
    sessions: dict[str, Any],
) -> dict[str, Any]:
    """Optional int8: calibrate on training photos, keep only within the allowed accuracy drop."""
    if args.int8_dir.exists():
        shutil.rmtree(args.int8_dir)
    args.int8_dir.mkdir(parents=True)
    decision: dict[str, Any] = {"made": False, "kept": False}
    if params.quantize:
        from export.quantize import quantize_int8

        # evenly spread over the (hash-ordered) training split, both classes alike
        step = max(1, len(train_rows) // params.calibration_images)
        calib_rows = train_rows[::step][: params.calibration_images]
        calibration = load_batch([r.path for r in calib_rows], spec, desc="calibration").images
        int8_path = args.int8_dir / INT8_FILE
        quantize_int8(args.out, int8_path, calibration)
        int8 = ox.make_session(int8_path)
        ox.run_batch_checks(int8, spec.input_size, len(test_fp32.class_names))
        test_int8 = evaluate_session(
            int8, test_rows, spec, test_fp32.class_names, batch=test_batch, desc="int8 test"
        )
        drop = test_fp32.metrics["accuracy"] - test_int8.metrics["accuracy"]
        kept = drop <= params.int8_max_accuracy_drop + 1e-9
        decision = {
            "made": True,
            "kept": kept,
            "calibration_images": len(calib_rows),
            "accuracy_fp32": test_fp32.metrics["accuracy"],
            "accuracy_int8": test_int8.metrics["accuracy"],
            "accuracy_drop": round(drop, 6),
            "max_accuracy_drop": params.int8_max_accuracy_drop,
            "bytes_int8": int8_path.stat().st_size,
        }
        report["metrics"]["int8"] = test_int8.metrics
        report["accuracy"]["int8"] = test_int8.metrics["accuracy"]
        sessions["onnxruntime_int8"] = ox.make_session(int8_path, params.bench_threads)
        if kept:
            ox.embed_metadata(int8_path, contract_for(test_int8.metrics, "int8_qdq").to_metadata())
            ox.check_onnx_file(int8_path)
            log.info(
                "int8 kept: accuracy %.4f (fp32 %.4f)",
                decision["accuracy_int8"],
                decision["accuracy_fp32"],
            )
        else:
            decision["bytes_int8_discarded"] = decision.pop("bytes_int8")
            int8_path.unlink()
            log.warning(
                "int8 discarded: accuracy drop %.4f > %.4f", drop, params.int8_max_accuracy_drop
            )
    report["int8"] = decision
    write_json(args.int8_dir / INT8_DECISION_FILE, decision)
    return decision


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    # our own progress at INFO; libraries (onnxruntime's quantizer logs per weight) at WARNING
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    logging.getLogger("export").setLevel(logging.INFO)
    parser = argparse.ArgumentParser(prog="python -m export.export", description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="the served ONNX file")
    parser.add_argument("--int8-dir", type=Path, required=True, help="int8 model + decision")
    parser.add_argument("--report", type=Path, required=True, help="export report JSON")
    args = parser.parse_args(argv)
    params = load_export(args.params)
    try:
        with logging_redirect_tqdm():  # log lines print above the progress bars, not through them
            report = run(args, params)
    except ox.ExportError as exc:
        args.out.unlink(missing_ok=True)
        log.error("export failed: %s", exc)
        sys.exit(1)
    log.info(
        "exported %s (%s): accuracy %s, %d bytes",
        args.out,
        report["model_version"],
        report["accuracy"],
        report["files"]["served"]["bytes"],
    )


if __name__ == "__main__":
    main()
