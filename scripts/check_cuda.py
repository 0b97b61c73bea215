"""Check the training pipeline on a CUDA device, end to end, on real photos.

    python scripts/check_cuda.py --images ../shared/data/catsdogs/images --out reports/cuda

For each training path (the default frozen-backbone Lite0, fine-tuning its last blocks, the
MobileNetV3 baseline from scratch, distillation from Lite1, a Lite0 -> Lite1 cascade) it runs the
pipeline's own stages as ``make pipeline`` does, without DVC: fetch (a local folder) and prepare
once, then train on the device, export (the CPU stage: ONNX, its parity check against PyTorch)
and evaluate (the test split through onnxruntime). Then it checks what a CPU-only machine needs
of a checkpoint trained on the GPU: every tensor loads on the CPU, and the model answers the
validation photos on the CPU as it did on the device (same labels, probabilities within
``--tolerance``; cuDNN's TF32 convolutions differ from the CPU's in the third decimal). The
default path is trained on the CPU too, and the two validation accuracies are compared, and a
cut cross-validation (``training.cv``: Lite0, 2 folds) runs on the device.

The result is ``OUT/cuda-check.json`` (figures, timings, pass or fail per check); the exit status
is 1 when a check fails. ``--device cpu`` runs the same checks on the CPU (the test of this
script). MLflow logging goes to ``OUT/mlflow.db`` when MLflow is installed; without it training
warns and goes on.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python scripts/check_cuda.py` from anywhere
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("check_cuda")

# name: (train overrides, what the case checks). Epoch counts are cut: the check is of the code
# path on the device, not of the model's quality (the floor below still catches a broken one).
# Every case starts from the train section without its cascade (ALONE): one model, unless the
# case names a cascade.
ALONE = {"cascade": None}
CASES: dict[str, dict[str, Any]] = {
    "lite0": {},
    "lite0-finetune": {"fine_tune_blocks": 2, "fine_tune_epochs": 2},
    "mobilenet-scratch": {
        "model": "mobilenet_v3_small",
        "pretrained": False,
        "epochs": 3,
        "patience": 3,
    },
    "lite0-distill-lite1": {"distill_from": "efficientnet_lite1"},
    "lite0-cascade-lite1": {"cascade": "efficientnet_lite1", "cascade_below": 0.9},
}
# test accuracy below this on the check's photos means the path is broken (pretrained backbones
# reach 0.97+ on 250 photos a class). The baseline from scratch learns little in 3 epochs on 350
# photos: it only has to lower its training loss (every case does)
ACCURACY_FLOOR: dict[str, float | None] = {"mobilenet-scratch": None}
DEFAULT_FLOOR = 0.9


def run_stage(
    name: str, module: str, env: dict[str, str], log_dir: Path, **options: str | Path
) -> dict[str, Any]:
    """``python -m module --option value ...`` from the repository root (``options``' underscores
    become dashes); its output goes to ``log_dir/name.log``."""
    args = [module]
    for option, value in options.items():
        args += [f"--{option.replace('_', '-')}", str(value)]
    started = time.monotonic()
    log_path = log_dir / f"{name}.log"
    with log_path.open("w") as out:
        rc = subprocess.call(
            [sys.executable, "-m", *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    seconds = round(time.monotonic() - started, 1)
    tail = log_path.read_text(errors="replace").splitlines()[-15:]
    log.info("%s: rc %d in %.1f s", name, rc, seconds)
    if rc:
        log.error("%s failed; the end of %s:\n%s", name, log_path, "\n".join(tail))
    return {"rc": rc, "seconds": seconds, "log": str(log_path), "tail": tail if rc else []}


def write_params(
    base: dict[str, Any],
    path: Path,
    per_class: int,
    train: dict[str, Any],
    export_photos: int | None = None,
    int8: bool = True,
) -> None:
    params = json.loads(json.dumps(base))  # a deep copy
    params["prepare"]["max_per_class"] = per_class
    if export_photos:  # small runs: fewer parity and calibration photos than the pipeline's
        params["export"]["parity_images"] = export_photos
        params["export"]["calibration_images"] = export_photos
    if not int8:
        params["export"]["quantize"] = False
    params["train"].update({**ALONE, **train})
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def checkpoint_tensors_on_cpu(path: Path) -> list[str]:
    """Names of the checkpoint's tensors that are not CPU tensors as saved (none is the pass)."""
    import torch

    payload = torch.load(path, map_location=None, weights_only=True)  # as saved, no remapping
    bad: list[str] = []

    def walk(obj: Any, name: str) -> None:
        if isinstance(obj, torch.Tensor):
            if obj.device.type != "cpu":
                bad.append(f"{name} on {obj.device}")
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{name}.{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{name}[{i}]")

    walk(payload, "checkpoint")
    return bad


def device_agreement(checkpoint: Path, manifest: Path, device: str) -> dict[str, Any]:
    """The served model on the validation photos, on the CPU and on ``device``."""
    import numpy as np
    import torch

    from catsdogs.manifest import read_manifest
    from catsdogs.preprocessing import PreprocessSpec, preprocess_bytes
    from training.models import load_served

    model, meta = load_served(checkpoint)
    spec = PreprocessSpec.from_json(meta["preprocessing"])
    rows = [r for r in read_manifest(manifest) if r.split == "val"]
    x = torch.from_numpy(
        np.stack([preprocess_bytes(Path(r.path).read_bytes(), spec) for r in rows])
    )
    with torch.inference_mode():
        cpu = torch.softmax(model(x).float(), dim=1)
        model.to(device)
        dev = torch.softmax(model(x.to(device)).float(), dim=1).cpu()
    index = {c: i for i, c in enumerate(meta["class_names"])}
    labels = torch.tensor([index[r.label] for r in rows])
    return {
        "photos": len(rows),
        "max_abs_prob_diff": float((cpu - dev).abs().max()),
        "labels_differ": int((cpu.argmax(1) != dev.argmax(1)).sum()),
        "val_accuracy_cpu": float((cpu.argmax(1) == labels).float().mean()),
        "val_accuracy_device": float((dev.argmax(1) == labels).float().mean()),
    }


def environment(device: str) -> dict[str, Any]:
    import onnxruntime
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    if device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True, help="a folder of cat/ and dog/")
    parser.add_argument("--out", type=Path, default=Path("reports/cuda"))
    parser.add_argument("--per-class", type=int, default=250, help="photos kept per class")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated, of: %(default)s")
    parser.add_argument("--tolerance", type=float, default=0.02, help="max |p_cpu - p_device|")
    parser.add_argument(
        "--export-photos",
        type=int,
        help="export.parity_images and calibration_images (default: params.yaml's; the parity "
        "check needs that many test photos)",
    )
    parser.add_argument("--no-int8", action="store_true", help="export fp32 only (a CPU step)")
    parser.add_argument("--no-cv", action="store_true", help="skip the cut cross-validation")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"--cases: unknown {unknown}; known: {', '.join(CASES)}")
    if not (args.images / "cat").is_dir() or not (args.images / "dog").is_dir():
        parser.error(f"--images: {args.images} has no cat/ and dog/ folders")
    out = args.out.resolve()
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"device": args.device, "environment": environment(args.device)}
    if args.device == "cuda" and not report["environment"]["cuda_available"]:
        log.error("--device cuda, but torch sees no CUDA device")
        return 1

    def save() -> None:  # after every case too, so a run cut short still reports what it did
        (out / "cuda-check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")

    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{out / 'mlflow.db'}")
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    source = work / "source.yaml"
    source.write_text(yaml.safe_dump({"source": str(args.images.resolve())}))
    data_params = work / "params-data.yaml"
    write_params(base, data_params, args.per_class, {})
    index, manifest = work / "index.csv", work / "manifest.csv"
    stages = report["data"] = {
        "fetch": run_stage(
            "fetch",
            "training.fetch",
            env,
            work,
            params=data_params,
            source_file=source,
            out=index,
            cache=work / "index-cache.json",
        ),
    }
    if stages["fetch"]["rc"] == 0:
        stages["prepare"] = run_stage(
            "prepare",
            "training.prepare",
            env,
            work,
            params=data_params,
            index=index,
            manifest=manifest,
            report=work / "data.json",
        )
    if any(s["rc"] for s in stages.values()):
        report["failures"] = [f"{name}: rc {s['rc']}" for name, s in stages.items() if s["rc"]]
        report["passed"] = False
        save()
        return 1

    failures: list[str] = []
    report["cases"] = {}
    report["failures"] = failures  # the same list: partial reports show what failed so far
    for name in cases:
        save()
        case: dict[str, Any] = {"overrides": CASES[name]}
        report["cases"][name] = case
        runs = [("", args.device)] + (
            [("-cpu", "cpu")] if name == "lite0" and args.device != "cpu" else []
        )
        for suffix, device in runs:
            d = work / f"{name}{suffix}"
            d.mkdir(exist_ok=True)
            params = d / "params.yaml"
            write_params(
                base,
                params,
                args.per_class,
                dict(CASES[name], device=device),
                args.export_photos,
                not args.no_int8,
            )
            checkpoint = d / "checkpoint.pt"
            case[f"train{suffix}"] = run_stage(
                f"{name}{suffix}-train",
                "training.train",
                env,
                d,
                params=params,
                manifest=manifest,
                model_out=checkpoint,
                reports=d / "train",
                data_report=work / "data.json",
            )
            if case[f"train{suffix}"]["rc"]:
                failures.append(f"{name}{suffix}: train")
                continue
            metrics = json.loads((d / "train" / "metrics.json").read_text())
            case[f"val_accuracy{suffix}"] = metrics["val"]["accuracy"]
            with (d / "train" / "history.csv").open() as f:
                losses = [float(r["train_loss"]) for r in csv.DictReader(f)]
            case[f"train_loss{suffix}"] = {
                "first": losses[0],
                "last": losses[-1],
                "epochs": len(losses),
            }
            if not all(math.isfinite(v) for v in losses) or losses[-1] >= losses[0]:
                failures.append(f"{name}{suffix}: training loss did not fall: {losses}")
        if case.get("train", {}).get("rc"):
            continue
        d = work / name
        checkpoint = d / "checkpoint.pt"
        bad = checkpoint_tensors_on_cpu(checkpoint)
        case["tensors_not_on_cpu"] = bad
        if bad:
            failures.append(f"{name}: checkpoint tensors not on the CPU: {bad[:3]}")
        agreement = case["cpu_vs_device"] = device_agreement(checkpoint, manifest, args.device)
        if agreement["labels_differ"] or agreement["max_abs_prob_diff"] > args.tolerance:
            failures.append(f"{name}: CPU and {args.device} answers differ: {agreement}")
        case["export"] = run_stage(
            f"{name}-export",
            "export.export",
            env,
            d,
            params=d / "params.yaml",
            checkpoint=checkpoint,
            manifest=manifest,
            out=d / "model.onnx",
            int8_dir=d / "int8",
            report=d / "export.json",
        )
        if case["export"]["rc"]:
            failures.append(f"{name}: export")
            continue
        exported = json.loads((d / "export.json").read_text())
        case["parity"] = exported.get("parity")
        case["onnx_bytes"] = exported.get("files", {}).get("served", {}).get("bytes")
        case["evaluate"] = run_stage(
            f"{name}-evaluate",
            "export.evaluate",
            env,
            d,
            params=d / "params.yaml",
            model=d / "model.onnx",
            manifest=manifest,
            metrics=d / "metrics.json",
            plots=d / "plots",
        )
        if case["evaluate"]["rc"]:
            failures.append(f"{name}: evaluate")
            continue
        test = json.loads((d / "metrics.json").read_text())
        case["test_accuracy"], case["test_photos"] = test["accuracy"], test["n"]
        floor = ACCURACY_FLOOR.get(name, DEFAULT_FLOOR)
        if floor is not None and test["accuracy"] < floor:
            failures.append(f"{name}: test accuracy {test['accuracy']} below {floor}")
    lite0 = report["cases"].get("lite0", {})
    if "val_accuracy" in lite0 and "val_accuracy-cpu" in lite0:
        gap = abs(lite0["val_accuracy"] - lite0["val_accuracy-cpu"])
        lite0["val_accuracy_gap_vs_cpu_training"] = round(gap, 6)
        if gap > 0.05:  # the head on features from torch (device) vs onnxruntime (CPU)
            failures.append(
                f"lite0: trained on {args.device} and on the CPU, val accuracy differs by {gap}"
            )

    save()
    if not args.no_cv:
        cv_params = work / "params-cv.yaml"
        write_params(base, cv_params, args.per_class, {"device": args.device})
        cv = yaml.safe_load(cv_params.read_text())
        cv["cv"].update(
            folds=2,
            repeats=1,
            cache_dir=str(work / "cv-cache"),
            configs={"lite0": cv["cv"]["configs"]["lite0"]},
            ensembles={},
            cascades={},
        )
        cv_params.write_text(yaml.safe_dump(cv, sort_keys=False))
        report["cv"] = run_stage(
            "cv",
            "training.cv",
            env,
            work,
            params=cv_params,
            manifest=manifest,
            out=work / "cv",
        )
        if report["cv"]["rc"]:
            failures.append("cv")
        else:
            summary = json.loads((work / "cv" / "summary.json").read_text())
            report["cv"]["summary"] = summary.get("configs", summary)

    report["passed"] = not failures
    save()
    log.info("%s: %s", out / "cuda-check.json", "passed" if not failures else f"FAILED {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
