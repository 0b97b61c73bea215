"""Stage ``cost`` (``cv/dvc.yaml``): what serving each cross-validated configuration costs.

For every distinct served architecture in ``reports/cv/summary.json`` (model and input size: a
distilled Lite0 is served exactly like any Lite0), the full model (backbone and head) is exported
to ONE ONNX file as the export stage does, checked, and timed through onnxruntime with
``export.bench_threads`` threads at batch 1 and batch ``cv.latency_batch``. The models take turns
within every run, so a busy neighbour slows all of them alike. Latency and file size do not depend
on the trained weights, so the ImageNet backbone with a fresh head stands in for each.

Measured latency on a shared machine moves by tens of percent from run to run (Lite1 took 1.10x
to 2.45x Lite0's batch-1 time in four runs of this stage), so each architecture's multiply-adds
per image (:func:`count_macs`, every convolution and linear layer at its real input size) are
reported too: a cost figure that is the same on every run and every machine.

    python -m export.cost --summary reports/cv/summary.json --out reports/cost

Writes ``cost.json`` and ``table.md`` (the README's accuracy/latency table: every figure from
``summary.json`` and this run), and adds the latency and size to each configuration's MLflow run.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from catsdogs.contract import INPUT_NAME, OUTPUT_PROBABILITIES
from catsdogs.cv_text import accuracy_text, mistakes_text, row_label
from export import onnx_tools as ox
from export.params import load_export
from training.models import LITE_VARIANTS, ORT_BATCH, build_model, default_spec
from training.params import PARAMS_FILE, load_cv

log = logging.getLogger("export.cost")


def arch_key(served: dict[str, Any]) -> str:
    return f"{served['model']}@{served['input_size']}"


def count_macs(model: torch.nn.Module, input_size: int) -> int:
    """Multiply-adds of one image through ``model``: every Conv2d and Linear, from the shapes
    of a real forward pass at batch 1 (element-wise work, pooling and activations excluded)."""
    total = 0

    def conv(module: torch.nn.Conv2d, _inputs: Any, output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        total += output.numel() * (module.in_channels // module.groups) * kh * kw

    def linear(module: torch.nn.Linear, _inputs: Any, output: torch.Tensor) -> None:
        nonlocal total
        total += output.numel() * module.in_features

    hooks = [
        m.register_forward_hook(conv if isinstance(m, torch.nn.Conv2d) else linear)
        for m in model.modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]
    try:
        with torch.no_grad():
            model(torch.zeros((1, input_size, input_size, 3), dtype=torch.uint8))
    finally:
        for hook in hooks:
            hook.remove()
    return total


def export_arch(
    model_name: str, input_size: int, n_classes: int, out: Path, opset: int
) -> tuple[Path, int]:
    """The architecture's ONNX file (checked) and its multiply-adds per image."""
    spec = default_spec(model_name, input_size, input_size)
    model = build_model(
        model_name, n_classes, pretrained=model_name in LITE_VARIANTS, spec=spec
    ).eval()
    path = out / f"{model_name}-{input_size}.onnx"
    ox.export_onnx(model, path, input_size=input_size, opset=opset)
    ox.check_onnx_file(path)
    return path, count_macs(model, input_size)


def time_sessions(
    files: dict[str, Path],
    sizes: dict[str, int],
    *,
    batches: tuple[int, ...],
    threads: int,
    warmup: int,
    runs: int,
) -> dict[str, dict[str, float]]:
    """Median ms per call, per file and batch size; the files take turns within every run."""
    rng = np.random.default_rng(0)
    sessions = {k: ox.make_session(p, threads) for k, p in files.items()}
    inputs = {
        (k, b): rng.integers(0, 256, (b, sizes[k], sizes[k], 3), dtype=np.uint8)
        for k in files
        for b in batches
    }

    def call(key: str, batch: int) -> float:
        start = time.perf_counter()
        sessions[key].run([OUTPUT_PROBABILITIES], {INPUT_NAME: inputs[key, batch]})
        return (time.perf_counter() - start) * 1000.0

    for key in files:
        for b in batches:
            for _ in range(warmup):
                call(key, b)
    samples: dict[tuple[str, int], list[float]] = {kb: [] for kb in inputs}
    for _ in range(runs):
        for key, b in inputs:
            samples[key, b].append(call(key, b))
    out: dict[str, dict[str, float]] = {}
    for (key, b), values in samples.items():
        med = statistics.median(values)
        out.setdefault(key, {})[f"batch_{b}_ms"] = round(med, 3)
        out[key][f"batch_{b}_ms_per_image"] = round(med / b, 3)
    return out


def reproduce_command(overrides: dict[str, Any]) -> str:
    """``dvc exp run -S ...``: the configuration trained, exported and evaluated by the default
    pipeline (its overrides of the train section, as ``cv.configs`` lists them)."""
    sets = [f"-S train.{k}={'null' if v is None else v}" for k, v in overrides.items()]
    return " ".join(["dvc exp run", *sets])


def train_estimate(s: dict[str, Any], cost: dict[str, dict[str, Any]]) -> float:
    """The train stage's time for a configuration: every image it passes through each backbone
    (``train_images``, sources included) at the per-image rate timed here at batch ORT_BATCH,
    plus the head fits ``make cv`` measured on the standard split. Decoding the photos (a few ms
    each, the same for every row) is not included."""
    features = sum(
        n * cost[arch][f"batch_{ORT_BATCH}_ms_per_image"] / 1000.0
        for arch, n in s["train_images"].items()
    )
    return round(features + s["split_head_seconds"], 1)


def members_cost(
    summary: dict[str, Any], cost: dict[str, dict[str, Any]], ensemble: str
) -> dict[str, Any]:
    """An ensemble runs every member on every image: each cost figure is the members' sum."""
    members = [
        cost[arch_key(summary["configs"][m]["served"])]
        for m in summary["ensembles"][ensemble]["members"]
    ]
    return {k: sum(c[k] for c in members) for k in members[0]}


def cascade_cost(
    summary: dict[str, Any], cost: dict[str, dict[str, Any]], cascade: str
) -> dict[str, Any]:
    """What a cascade costs per image on average: the first model on every photo, and the
    models of its second step that the first is not one of on the share it escalated. Its
    files are all of theirs."""
    s = summary["cascades"][cascade]
    configs = summary["configs"]
    first = cost[arch_key(configs[s["first"]]["served"])]
    extra = [cost[arch_key(configs[m]["served"])] for m in s["then_members"] if m != s["first"]]
    out = {k: v + s["escalated"] * sum(c[k] for c in extra) for k, v in first.items()}
    out["bytes"] = first["bytes"] + sum(c["bytes"] for c in extra)
    return out


def cost_table(
    summary: dict[str, Any], cost: dict[str, dict[str, Any]], batch: int, reference: str
) -> str:
    ref = cost[reference]["batch_1_ms"]
    lines = [
        "| configuration | CV accuracy (95% CI) | CV mistakes (mean ± sd, range) | test accuracy "
        f"| multiply-adds per image (G) | batch 1 (ms) | batch {batch} (ms/image) | ONNX (MB) "
        "| train time (s, est.) | reproduce |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    ref_macs = cost[reference]["macs"]
    rows = [(name, s, cost[arch_key(s["served"])]) for name, s in summary["configs"].items()]
    for name, s in summary.get("ensembles", {}).items():
        rows.append((name, s, members_cost(summary, cost, name)))
    for name, s in summary.get("cascades", {}).items():
        rows.append((name, s, cascade_cost(summary, cost, name)))
    for name, s, c in rows:
        label = row_label(name, s, " **(default)**" if name == summary.get("default") else "")
        lines.append(
            f"| {label} | {accuracy_text(s)} "
            f"| {mistakes_text(s)} | {s['test_accuracy']:.4f} "
            f"| {c['macs'] / 1e9:.3f} ({c['macs'] / ref_macs:.2f}x) "
            f"| {c['batch_1_ms']:.1f} ({c['batch_1_ms'] / ref:.2f}x) "
            f"| {c[f'batch_{batch}_ms_per_image']:.1f} | {c['bytes'] / 1e6:.1f} "
            f"| {s['train_seconds_estimate']:.0f} | `{s['reproduce']}` |"
        )
    return "\n".join(lines) + "\n"


def log_to_runs(summary: dict[str, Any], cost: dict[str, dict[str, Any]], batch: int) -> None:
    """Latency and size into each configuration's MLflow run; a failure only warns."""
    try:
        from mlflow import MlflowClient

        client = MlflowClient()
        for s in summary["configs"].values():
            run_id = s.get("mlflow_run_id")
            if not run_id:
                continue
            c = cost[arch_key(s["served"])]
            for key in ("batch_1_ms", f"batch_{batch}_ms_per_image", "bytes"):
                client.log_metric(run_id, f"onnx_{key}", float(c[key]))
            client.log_metric(run_id, "macs_per_image", float(c["macs"]))
    except Exception as exc:  # the reports on disk are the product
        log.warning("MLflow unavailable, latency not logged to the cv runs: %s", exc)


def run(summary_path: Path, out: Path, params_path: str | Path) -> dict[str, Any]:
    cv, _ = load_cv(params_path)
    export = load_export(params_path)
    summary = json.loads(summary_path.read_text())
    archs = {arch_key(s["served"]): s["served"] for s in summary["configs"].values()}
    for s in summary["configs"].values():  # sources too: their feature pass prices training
        for key in s["train_images"]:
            model, size = key.split("@")
            archs.setdefault(key, {"model": model, "input_size": int(size)})
    # batch ORT_BATCH is how the train stage computes frozen features: its rate prices training
    batches = tuple(sorted({1, cv.latency_batch, ORT_BATCH}))
    with tempfile.TemporaryDirectory() as tmp:
        exported = {
            k: export_arch(a["model"], a["input_size"], 2, Path(tmp), export.opset)
            for k, a in archs.items()
        }
        files = {k: path for k, (path, _) in exported.items()}
        cost: dict[str, dict[str, Any]] = {
            k: {"bytes": path.stat().st_size, "macs": macs} for k, (path, macs) in exported.items()
        }
        log.info(
            "timing %s, %d runs each, %d threads",
            list(files),
            cv.latency_runs,
            export.bench_threads,
        )
        timings = time_sessions(
            files,
            {k: a["input_size"] for k, a in archs.items()},
            batches=batches,
            threads=export.bench_threads,
            warmup=export.bench_warmup,
            runs=cv.latency_runs,
        )
    for key, t in timings.items():
        cost[key].update(t)
    for s in summary["configs"].values():
        s["reproduce"] = reproduce_command(s["overrides"])
        s["train_seconds_estimate"] = train_estimate(s, cost)
    for s in summary.get("ensembles", {}).values():  # not one model: no single command
        s["reproduce"] = "the members' commands; their answers averaged"
        s["train_seconds_estimate"] = sum(
            summary["configs"][m]["train_seconds_estimate"] for m in s["members"]
        )
    for s in summary.get("cascades", {}).values():  # a measurement: the pipeline has no cascade
        s["reproduce"] = "make cv (not a pipeline option)"
        s["train_seconds_estimate"] = sum(
            summary["configs"][m]["train_seconds_estimate"]
            for m in dict.fromkeys([s["first"], *s["then_members"]])
        )
    # ratios against the baseline configuration (today's served model), else the first one
    baseline = summary.get("baseline") or next(iter(summary["configs"]))
    reference = arch_key(summary["configs"][baseline]["served"])

    def ratios(s: dict[str, Any], c: dict[str, Any]) -> dict[str, Any]:
        return {
            "batch_1_vs_reference": round(c["batch_1_ms"] / cost[reference]["batch_1_ms"], 3),
            "macs_vs_reference": round(c["macs"] / cost[reference]["macs"], 3),
            "train_seconds_estimate": s["train_seconds_estimate"],
        }

    report = {
        "threads": export.bench_threads,
        "runs": cv.latency_runs,
        "statistic": "median",
        "reference": reference,
        "architectures": cost,
        "configs": {
            name: {
                "served": arch_key(s["served"]),
                **ratios(s, cost[arch_key(s["served"])]),
                "reproduce": s["reproduce"],
            }
            for name, s in summary["configs"].items()
        },
        "ensembles": {
            name: {"members": s["members"], **ratios(s, members_cost(summary, cost, name))}
            for name, s in summary.get("ensembles", {}).items()
        },
        "cascades": {
            name: {
                **{k: s[k] for k in ("first", "then", "below", "escalated")},
                **ratios(s, cascade_cost(summary, cost, name)),
            }
            for name, s in summary.get("cascades", {}).items()
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "cost.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "table.md").write_text(cost_table(summary, cost, cv.latency_batch, reference))
    log_to_runs(summary, cost, cv.latency_batch)
    return report


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    log.setLevel(logging.INFO)
    parser = argparse.ArgumentParser(prog="python -m export.cost", description=__doc__)
    parser.add_argument("--params", default=PARAMS_FILE)
    parser.add_argument("--summary", type=Path, default=Path("reports/cv/summary.json"))
    parser.add_argument("--out", type=Path, default=Path("reports/cost"))
    args = parser.parse_args(argv)
    run(args.summary, args.out, args.params)


if __name__ == "__main__":
    main()
