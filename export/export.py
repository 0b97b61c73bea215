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
import dataclasses
import hashlib
import json
import logging
import shutil
import signal
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn
from tqdm.contrib.logging import logging_redirect_tqdm

from catsdogs.cascade import view_name, views_entry
from catsdogs.contract import (
    EVERY_ROW,
    INPUT_NAME,
    NO_ROW,
    OUTPUT_ESCALATED,
    OUTPUT_LOGITS,
    OUTPUT_PROBABILITIES,
    ModelContract,
)
from catsdogs.drift import build_reference_stats
from catsdogs.hashing import file_sha256
from catsdogs.manifest import ManifestRow, read_manifest
from catsdogs.preprocessing import PreprocessSpec
from export import onnx_tools as ox
from export.cascade import export_trained_cascade, trained_views, with_threshold
from export.latency import compare_latency, time_sessions
from export.params import ExportParams, load_export
from export.scoring import Batch, Evaluation, evaluate_session, load_batch, progress
from export.tracking import log_and_register
from training.models import CascadeClassifier
from training.params import ParamsError

log = logging.getLogger("export")

INT8_FILE = "model.int8.onnx"
INT8_DECISION_FILE = "quantization.json"

# (test metrics, quantization) -> the contract embedded in that file
ContractFor = Callable[[dict[str, Any], str], ModelContract]


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
    parity_views: dict[str, np.ndarray] | None = None,
) -> ox.Parity:
    """Export, check, run batches 1/7/32 and prove parity; ``out`` exists only if all pass.

    A cascade (``training.models.CascadeClassifier``) becomes one file with an ONNX ``If``
    (``export.cascade``); its parity is checked on the same real photos, both paths included
    whenever some of them are escalated. Its models on views of their own get the same photos
    at those views (``parity_views``): the file fed ``image`` alone must then give the first
    model's answers, and fed every view the cascade's."""
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        candidate = Path(tmp) / out.name
        if isinstance(model, CascadeClassifier):
            export_trained_cascade(model, candidate, spec=spec, opset=opset)
        else:
            ox.export_onnx(model, candidate, input_size=spec.input_size, opset=opset)
        ox.check_onnx_file(candidate)
        session = ox.make_session(candidate)
        ox.run_batch_checks(session, spec.input_size, n_classes)
        parity = ox.check_parity(model, session, parity_images, atol=atol)
        if isinstance(model, CascadeClassifier) and model.views:
            parity = views_parity(model, session, parity_images, parity_views or {}, atol)
        shutil.move(candidate, out)
    return parity


def views_parity(
    model: CascadeClassifier,
    session: Any,
    images: np.ndarray,
    views: dict[str, np.ndarray],
    atol: float,
) -> ox.Parity:
    """Eager against the file on ``images`` with every view fed: the escalated rows' answers
    come from every model, each on its own view."""
    others: list[torch.Tensor | None] = []
    for v in model.views or []:
        name = view_name(v.input_size, v.resize)
        if name in views:
            others.append(torch.from_numpy(np.require(views[name], requirements=["C", "W"])))
        else:  # the first model's own view: the file feeds it ``image``
            others.append(None)
    with torch.inference_mode():
        x = torch.from_numpy(np.require(images, requirements=["C", "W"]))
        probs, escalated = model.probabilities(x, others)
    expected = torch.log(probs.clamp_min(1e-30)).numpy()
    feed = {INPUT_NAME: images, **views}
    logits, got, flagged = session.run(
        [OUTPUT_LOGITS, OUTPUT_PROBABILITIES, OUTPUT_ESCALATED], feed
    )
    if flagged.tolist() != escalated.numpy().tolist():
        raise ox.ExportError("the cascade file escalates other photos than the eager cascade")
    return ox.parity_of(expected, logits, got, atol=atol, what="fed every view")


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


@dataclass(frozen=True)
class ExportPaths:
    """Where the stage reads and writes (its ``dvc.yaml`` arguments)."""

    checkpoint: Path
    manifest: Path
    out: Path  # the served ONNX file
    int8_dir: Path  # the int8 model (when kept) and its decision
    report: Path


@dataclass(frozen=True)
class Splits:
    train: list[ManifestRow]
    val: list[ManifestRow]
    test: list[ManifestRow]


@dataclass(frozen=True)
class Int8Config:
    """What the int8 step needs: the fp32 file, its test scores and the decision rule."""

    enabled: bool
    fp32_model: Path
    int8_dir: Path
    spec: PreprocessSpec
    train_rows: list[ManifestRow]  # calibration photos are drawn from them
    test_rows: list[ManifestRow]
    test_batch: Batch
    test_fp32: Evaluation
    calibration_images: int
    max_accuracy_drop: float
    bench_threads: int
    contract_for: ContractFor
    skipped: str | None = None  # why no int8 model is made although export.quantize asks


@dataclass(frozen=True)
class Int8Result:
    decision: dict[str, Any]  # written to int8_dir/quantization.json and into the report
    metrics: dict[str, Any] | None = None  # int8 test metrics, when a model was made
    session: Any | None = None  # an onnxruntime session of it for the latency comparison


def run(paths: ExportPaths, params: ExportParams) -> dict[str, Any]:
    """The stage. On any failure (a photo gone, a bad setting, Ctrl-C) neither the served file
    nor the report is left behind: a file without its contract, beside the previous run's
    report, would look like a finished export."""
    steps = Steps()
    try:
        return run_steps(paths, params, steps)
    except BaseException:
        paths.out.unlink(missing_ok=True)
        paths.report.unlink(missing_ok=True)
        raise
    finally:
        steps.close()


def check_data_version(paths: ExportPaths, meta: dict[str, Any]) -> str:
    """The manifest's version; the checkpoint must have been trained on exactly this data."""
    data_version = manifest_version(paths.manifest)
    if meta["data_version"] != data_version:
        raise ox.ExportError(
            f"{paths.checkpoint} was trained on data {meta['data_version'][:12]} but "
            f"{paths.manifest} is {data_version[:12]}: retrain (dvc repro) before exporting"
        )
    return data_version


def read_splits(manifest: Path) -> Splits:
    return Splits(
        train=read_manifest(manifest, "train"),
        val=read_manifest(manifest, "val"),
        test=read_manifest(manifest, "test"),
    )


def load_test_batch(rows: list[ManifestRow], spec: PreprocessSpec, parity_images: int) -> Batch:
    if not rows:
        raise ox.ExportError("the manifest's test split is empty: nothing to check parity on")
    if len(rows) < parity_images:
        # a small data set (prepare.max_per_class for a quick run): every test photo, not none
        log.warning(
            "parity on all %d test photos: export.parity_images asks for %d",
            len(rows),
            parity_images,
        )
    log.info("preprocessing %d test photos through catsdogs.preprocessing", len(rows))
    return load_batch([r.path for r in rows], spec, desc="test")


def contract_maker(
    meta: dict[str, Any],
    reference: dict[str, Any],
    *,
    exported_at: str,
    version: str,
    checkpoint_sha256: str,
) -> ContractFor:
    """The contract of the fp32 or int8 file: the same lineage, its own metrics and quantization,
    and its own model_version (the int8 file's ends in ``-int8``): a server logs, counts and
    judges predictions by model_version, so the two files' must never be mixed up."""
    training = {
        "params": meta.get("params", {}),
        "val_metrics": meta.get("val_metrics", {}),
        "checkpoint_sha256": checkpoint_sha256,
    }

    def contract_for(metrics: dict[str, Any], quantization: str) -> ModelContract:
        extra = {
            "metrics": metrics,
            "reference_stats": reference,
            "training": training,
            "quantization": quantization,
        }
        if meta.get("cascade"):  # the file's models past the first (model_name), and its threshold
            extra["cascade"] = meta["cascade"]
        own = version if quantization == "none" else f"{version}-{quantization.split('_')[0]}"
        return build_contract(meta, exported_at=exported_at, version=own, extra=extra)

    return contract_for


def run_steps(paths: ExportPaths, params: ExportParams, steps: Steps) -> dict[str, Any]:
    from training.models import load_served

    # what is served: the model, or the cascade it starts (the others behind the first's If)
    model, meta = load_served(paths.checkpoint)
    cascade = model if isinstance(model, CascadeClassifier) else None
    data_version = check_data_version(paths, meta)
    spec = PreprocessSpec.from_json(meta["preprocessing"])
    class_names = list(meta["class_names"])
    splits = read_splits(paths.manifest)

    steps.next("preprocess")
    test_batch = load_test_batch(splits.test, spec, params.parity_images)
    # the parity photos spread over the test split, whose rows are sorted by class: the first
    # ones were all cats
    n_parity = min(params.parity_images, len(splits.test))
    step = max(1, len(splits.test) // n_parity)
    parity_rows = splits.test[::step][:n_parity]
    parity_images = test_batch.images[::step][:n_parity]
    # a cascade whose other models take views of their own: those views, for the parity photos
    views = trained_views(cascade, spec) if cascade is not None else {}
    parity_paths = [Path(r.path) for r in parity_rows]
    parity_views = {
        name: load_batch(parity_paths, v, desc=name).images for name, v in views.items()
    }

    paths.out.parent.mkdir(parents=True, exist_ok=True)
    # a failed stage must not leave the previous file or report behind
    paths.out.unlink(missing_ok=True)
    paths.report.unlink(missing_ok=True)
    steps.next("export + parity")
    parity = export_verified(
        model,
        paths.out,
        spec=spec,
        n_classes=len(class_names),
        opset=params.opset,
        parity_images=parity_images,
        atol=params.parity_atol,
        parity_views=parity_views,
    )
    log.info("parity on %d photos: max |logit diff| %.2e", parity.n, parity.max_abs_logit_diff)
    test_fp32, reference = score_fp32(
        paths.out, splits, spec, class_names, test_batch, steps, views
    )
    if views:  # the contract says which inputs the file's other views are, and how to make them
        meta = {**meta, "cascade": {**meta["cascade"], "views": views_entry(views)}}
    version, contract_for = stamp_contract(paths, meta, reference, data_version, test_fp32)

    report: dict[str, Any] = {
        "model_name": meta["model_name"],
        "model_version": version,
        "opset": params.opset,
        "batch_checks": list(ox.BATCH_CHECKS),
        # the fp32 file's, against PyTorch; a served int8 file's distance from that file is
        # int8.agreement_with_fp32 (quantization changes the numbers by design)
        "parity": {**parity.as_dict(), "per_class": dict(Counter(r.label for r in parity_rows))},
        "metrics": {"fp32": test_fp32.metrics},
        "accuracy": {"fp32": test_fp32.metrics["accuracy"]},
    }
    sessions = {"onnxruntime_fp32": ox.make_session(paths.out, params.bench_threads)}
    if cascade is not None:
        report["cascade"] = cascade_report(
            paths.out, cascade, meta, test_batch.images, params, parity_views
        )
    steps.next("int8")
    config = int8_config(paths, params, spec, splits, test_batch, test_fp32, contract_for)
    if cascade is not None:  # onnxruntime's QDQ quantizer (export.quantize) skips If branches
        config = dataclasses.replace(config, enabled=False, skipped="a cascade is served fp32")
    int8 = quantize_stage(config)
    if int8.metrics is not None:
        report["metrics"]["int8"] = int8.metrics
        report["accuracy"]["int8"] = int8.metrics["accuracy"]
        sessions["onnxruntime_int8"] = int8.session
    report["int8"] = int8.decision
    report["served"] = choose_served(params, int8.decision, paths)
    if report["served"] == "int8":  # the version the served file carries, and the registry's tag
        report["model_version"] = int8.decision["model_version"]

    steps.next("latency")
    report.update(latency_report(model, sessions, parity_images, params))
    report["files"] = {"served": file_info(paths.out), "checkpoint": file_info(paths.checkpoint)}
    if int8.decision.get("kept"):
        report["files"]["int8"] = file_info(paths.int8_dir / INT8_FILE)
    write_json(paths.report, report)

    if params.register:
        steps.next("register")
        report["registry"] = register(paths, params, meta, report, data_version)
        write_json(paths.report, report)
    return report


def score_fp32(
    model_path: Path,
    splits: Splits,
    spec: PreprocessSpec,
    class_names: list[str],
    test_batch: Batch,
    steps: Steps,
    views: dict[str, PreprocessSpec] | None = None,
) -> tuple[Evaluation, dict[str, Any]]:
    """Test metrics of the exported file, and the drift reference from validation. ``views``:
    a cascade's other view inputs, made for the photos it escalates."""
    fp32 = ox.make_session(model_path)
    steps.next("metrics")
    test_fp32 = evaluate_session(
        fp32, splits.test, spec, class_names, batch=test_batch, desc="fp32 test", views=views
    )
    log.info("fp32 test metrics: %s", test_fp32.metrics)
    steps.next("reference")
    val = evaluate_session(fp32, splits.val, spec, class_names, desc="val", views=views)
    return test_fp32, reference_stats(val, splits.val, splits.train)


def stamp_contract(
    paths: ExportPaths,
    meta: dict[str, Any],
    reference: dict[str, Any],
    data_version: str,
    test_fp32: Evaluation,
) -> tuple[str, ContractFor]:
    """Name the version, embed the fp32 file's contract and check the file again."""
    exported_at = datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    weights = file_sha256(paths.checkpoint)
    version = ox.model_version(exported_at, data_version, meta.get("git_commit") or "", weights)
    contract_for = contract_maker(
        meta, reference, exported_at=exported_at, version=version, checkpoint_sha256=weights
    )
    ox.embed_metadata(paths.out, contract_for(test_fp32.metrics, "none").to_metadata())
    ox.check_onnx_file(paths.out)
    return version, contract_for


def int8_config(
    paths: ExportPaths,
    params: ExportParams,
    spec: PreprocessSpec,
    splits: Splits,
    test_batch: Batch,
    test_fp32: Evaluation,
    contract_for: ContractFor,
) -> Int8Config:
    return Int8Config(
        enabled=params.quantize,
        fp32_model=paths.out,
        int8_dir=paths.int8_dir,
        spec=spec,
        train_rows=splits.train,
        test_rows=splits.test,
        test_batch=test_batch,
        test_fp32=test_fp32,
        calibration_images=params.calibration_images,
        max_accuracy_drop=params.int8_max_accuracy_drop,
        bench_threads=params.bench_threads,
        contract_for=contract_for,
    )


def choose_served(params: ExportParams, decision: dict[str, Any], paths: ExportPaths) -> str:
    """``export.serve``: keep the fp32 file, or put the kept int8 model in its place."""
    if params.serve != "int8":
        return "fp32"
    if not decision.get("kept"):
        why = decision.get("reason") or (
            f"accuracy drop {decision['accuracy_drop']} > export.int8_max_accuracy_drop "
            f"{decision['max_accuracy_drop']}"
            if decision.get("made")
            else "export.quantize is false"
        )
        raise ox.ExportError(f"export.serve is 'int8' but no int8 model was kept: {why}")
    shutil.copyfile(paths.int8_dir / INT8_FILE, paths.out)
    return "int8"


def latency_report(
    model: nn.Module, sessions: dict[str, Any], images: np.ndarray, params: ExportParams
) -> dict[str, Any]:
    """Median latency of torch eager and each onnxruntime session, and the speedups."""
    log.info("latency: torch eager vs onnxruntime, %d threads", params.bench_threads)
    latency = compare_latency(
        model,
        sessions,
        images,
        batch_sizes=(1, 32),
        threads=params.bench_threads,
        warmup=params.bench_warmup,
        runs=params.bench_runs,
    )
    speedup = {
        name: {
            f"batch_{bs}": round(latency["torch_eager"][f"batch_{bs}_ms"] / v[f"batch_{bs}_ms"], 3)
            for bs in (1, 32)
        }
        for name, v in latency.items()
        if name != "torch_eager"
    }
    return {
        "latency_ms": {
            "threads": params.bench_threads,
            "warmup": params.bench_warmup,
            "runs": params.bench_runs,
            "statistic": "median",
            **latency,
        },
        "speedup_vs_torch_eager": speedup,
    }


def cascade_report(
    path: Path,
    cascade: CascadeClassifier,
    meta: dict[str, Any],
    images: np.ndarray,
    params: ExportParams,
    views: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """What the cascade file escalates on the test photos, and its batch-1 latency on both of
    its paths (no image escalated, every image), the mean at that share beside them. The sure
    path is fed ``image`` alone, the escalated one every view (``views``: their sides)."""
    session = ox.make_session(path, params.bench_threads)
    escalated = np.concatenate(
        [
            session.run([OUTPUT_ESCALATED], {INPUT_NAME: images[i : i + 32]})[0]
            for i in range(0, len(images), 32)
        ]
    )
    share = float(escalated.mean())
    graph = onnx.load(str(path))
    paths = {"sure": with_threshold(graph, NO_ROW), "escalated": with_threshold(graph, EVERY_ROW)}
    size = images.shape[1]
    fed = {INPUT_NAME: size, **{name: v.shape[1] for name, v in (views or {}).items()}}
    timed = time_sessions(
        paths,
        {"sure": size, "escalated": fed},
        batches=(1,),
        threads=params.bench_threads,
        warmup=params.bench_warmup,
        runs=max(params.bench_runs, 10),
    )
    sure, every = timed["sure"]["batch_1_ms"], timed["escalated"]["batch_1_ms"]
    log.info(
        "cascade: %.1f%% of test photos escalated; batch 1 %.1f ms sure, %.1f escalated",
        100 * share,
        sure,
        every,
    )
    return {
        "first": meta["model_name"],
        "models": meta["cascade"]["models"],
        "below": cascade.below,
        "test_escalated": round(share, 6),
        "batch_1_ms": {
            "sure": sure,
            "escalated": every,
            "mean": round(sure + share * (every - sure), 3),
        },
    }


def register(
    paths: ExportPaths,
    params: ExportParams,
    meta: dict[str, Any],
    report: dict[str, Any],
    data_version: str,
) -> dict[str, Any]:
    """Log the served file to the training run and register it as a new model version."""
    served = report["served"]
    return log_and_register(
        run_id=str(meta.get("mlflow_run_id") or ""),
        model_path=paths.out,
        reports=[paths.report, paths.int8_dir / INT8_DECISION_FILE],
        registered_model=params.registered_model,
        tags={
            "model_name": meta["model_name"],
            "model_version": report["model_version"],
            "data_version": data_version,
            "git_commit": str(meta.get("git_commit") or ""),
            "quantization": "int8_qdq" if served == "int8" else "none",
            # the server checks the downloaded file against it (server/model_uri.py)
            "sha256": report["files"]["served"]["sha256"],
        },
        metrics={k: v for k, v in report["metrics"][served].items() if k != "n"},
    )


def quantize_stage(config: Int8Config) -> Int8Result:
    """Optional int8: calibrate on training photos, keep only within the allowed accuracy drop.

    The decision is written to ``int8_dir`` whether or not a model was made or kept.
    """
    # this stage's own files only: the folder may be one the user shares with other files (the
    # models folder itself, with the checkpoint and the fp32 model in it)
    config.int8_dir.mkdir(parents=True, exist_ok=True)
    for name in (INT8_FILE, INT8_DECISION_FILE):
        (config.int8_dir / name).unlink(missing_ok=True)
    decision: dict[str, Any] = {"made": False, "kept": False}
    if config.skipped:
        decision["reason"] = config.skipped
    result = quantize_and_score(config) if config.enabled else Int8Result(decision)
    write_json(config.int8_dir / INT8_DECISION_FILE, result.decision)
    return result


def quantize_and_score(config: Int8Config) -> Int8Result:
    from export.quantize import quantize_int8

    fp32 = config.test_fp32
    # evenly spread over the (hash-ordered) training split, both classes alike
    step = max(1, len(config.train_rows) // config.calibration_images)
    calib_rows = config.train_rows[::step][: config.calibration_images]
    calibration = load_batch([r.path for r in calib_rows], config.spec, desc="calibration").images
    int8_path = config.int8_dir / INT8_FILE
    quantize_int8(config.fp32_model, int8_path, calibration)
    int8 = ox.make_session(int8_path)
    ox.run_batch_checks(int8, config.spec.input_size, len(fp32.class_names))
    test_int8 = evaluate_session(
        int8,
        config.test_rows,
        config.spec,
        fp32.class_names,
        batch=config.test_batch,
        desc="int8 test",
    )
    drop = fp32.metrics["accuracy"] - test_int8.metrics["accuracy"]
    kept = drop <= config.max_accuracy_drop + 1e-9
    decision = {
        "made": True,
        "kept": kept,
        "calibration_images": len(calib_rows),
        "accuracy_fp32": fp32.metrics["accuracy"],
        "accuracy_int8": test_int8.metrics["accuracy"],
        "accuracy_drop": round(drop, 6),
        "max_accuracy_drop": config.max_accuracy_drop,
        "agreement_with_fp32": agreement(fp32.probs, test_int8.probs),
    }
    # the latency comparison times the int8 model whether or not it is kept
    session = ox.make_session(int8_path, config.bench_threads)
    if kept:
        contract = config.contract_for(test_int8.metrics, "int8_qdq")
        ox.embed_metadata(int8_path, contract.to_metadata())
        ox.check_onnx_file(int8_path)
        decision["bytes_int8"] = int8_path.stat().st_size  # the kept file, its contract in it
        decision["model_version"] = contract.model_version
        log.info(
            "int8 kept: accuracy %.4f (fp32 %.4f)",
            decision["accuracy_int8"],
            decision["accuracy_fp32"],
        )
    else:
        decision["bytes_int8_discarded"] = int8_path.stat().st_size
        int8_path.unlink()
        log.warning("int8 discarded: accuracy drop %.4f > %.4f", drop, config.max_accuracy_drop)
    return Int8Result(decision, test_int8.metrics, session)


def agreement(reference: np.ndarray, other: np.ndarray) -> dict[str, Any]:
    """How far ``other``'s probabilities are from ``reference``'s on the same photos: the int8
    file against the fp32 one it was made from, on the test split (the parity check's figures,
    for the file that is not equal by design)."""
    return {
        "n": len(reference),
        "labels_differ": int(np.count_nonzero(reference.argmax(1) != other.argmax(1))),
        "max_abs_prob_diff": float(np.max(np.abs(reference - other))) if len(reference) else 0.0,
    }


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
    try:
        params = load_export(args.params)
    except ParamsError as exc:  # names the key; no traceback for a typo in params.yaml
        log.error("export: %s", exc)
        sys.exit(2)
    paths = ExportPaths(args.checkpoint, args.manifest, args.out, args.int8_dir, args.report)
    # a SIGTERM (a CI job cancelled, docker stop) unwinds like Ctrl-C, so run() removes the
    # model file it was writing: left behind, it looked like a finished export
    signal.signal(signal.SIGTERM, _terminated)
    try:
        with logging_redirect_tqdm():  # log lines print above the progress bars, not through them
            report = run(paths, params)
    except ox.ExportError as exc:  # run() has removed the file and the report
        log.error("export failed: %s", exc)
        sys.exit(1)
    except KeyboardInterrupt:  # the user's own stop, not a crash: one line, the shell's 130
        log.error("export: stopped (Ctrl-C); no model file or report written")
        sys.exit(128 + signal.SIGINT)
    log.info(
        "exported %s (%s): accuracy %s, %d bytes",
        paths.out,
        report["model_version"],
        report["accuracy"],
        report["files"]["served"]["bytes"],
    )


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    main()
