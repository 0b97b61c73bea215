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

A cascade (``cv.cascades``) is priced on its own graph (``export.cascade``: one file, the first
model on every image and the others behind an ONNX ``If`` for the unsure ones), timed on both of
its paths (no image escalated, every image escalated) in the same turns as the single models; its
mean is the sure path plus the share ``make cv`` escalated of the difference.

    python -m export.cost --summary reports/cv/summary.json --out reports/cost

Writes ``cost.json`` and ``table.md`` (the README's accuracy/latency table: every figure from
``summary.json`` and this run), and adds the latency and size to each configuration's MLflow run.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import onnx
import torch

from catsdogs.contract import EVERY_ROW, INPUT_NAME, NO_ROW
from catsdogs.cv_text import accuracy_text, arch_key, mistakes_text, parse_arch, row_label
from export import onnx_tools as ox
from export.cascade import Member, export_cascade, view_inputs, with_threshold
from export.latency import time_sessions
from export.params import load_export
from training.models import LITE_VARIANTS, ORT_BATCH, build_model, default_spec
from training.params import PARAMS_FILE, load_cv, load_train

log = logging.getLogger("export.cost")


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


def served_model(served: dict[str, Any], n_classes: int) -> torch.nn.Module:
    """The served architecture (``served``: model, input size, network size if it resizes in
    the graph) with its ImageNet backbone and a fresh head: cost does not depend on weights."""
    name, size = served["model"], served["input_size"]
    return build_model(
        name,
        n_classes,
        pretrained=name in LITE_VARIANTS,
        spec=default_spec(name, size, size),
        network_size=served.get("network_size"),
    ).eval()


def export_arch(served: dict[str, Any], n_classes: int, out: Path, opset: int) -> tuple[Path, int]:
    """The architecture's ONNX file (checked) and its multiply-adds per image."""
    model = served_model(served, n_classes)
    size = served["input_size"]
    path = out / f"{arch_key(served).replace('>', '-net')}.onnx"
    ox.export_onnx(model, path, input_size=size, opset=opset)
    ox.check_onnx_file(path)
    return path, count_macs(model, size)


def cascade_key(summary: dict[str, Any], cascade: str) -> str:
    """A cascade's served graph: its first architecture, then the others' (the threshold is
    one number in the file and does not change what a path costs)."""
    s = summary["cascades"][cascade]
    configs = summary["configs"]
    then = [arch_key(configs[m]["served"]) for m in s["then_members"]]
    first = arch_key(configs[s["first"]]["served"])
    return f"cascade:{first} then {'+'.join(then)}"


def export_cascade_arch(
    summary: dict[str, Any], cascade: str, n_classes: int, out: Path, opset: int
) -> tuple[Path, dict[str, int]]:
    """The cascade as one ONNX file (``export.cascade``), its members' ImageNet backbones with
    fresh heads, each on its own view as ``make cv`` measured it, and the side of each of the
    file's image inputs (``image``, then the views only the escalated path reads)."""
    s = summary["cascades"][cascade]
    configs = summary["configs"]

    def member(name: str) -> Member:
        served = configs[name]["served"]
        model = served_model(served, n_classes)
        return Member(name, model, served["input_size"], configs[name].get("resize"))

    first = member(s["first"])
    then = [first if m == s["first"] else member(m) for m in s["then_members"]]
    path = out / f"cascade-{len(list(out.glob('cascade-*')))}.onnx"
    export_cascade(first, then, s["below"], path, opset=opset)
    return path, {INPUT_NAME: first.input_size, **view_inputs(first, then)}


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
    models of its second step that the first is not one of on the share it escalated.

    Latency is measured on the cascade's own graph when the stage timed it (``cost`` has its
    :func:`cascade_key`): the sure path (no row escalated) plus the escalated share of the
    difference to the path where every row escalates; its file is that graph's. Otherwise
    (a summary priced without the graph) latency and files are the members' figures added up.
    Multiply-adds are always the members' (the in-graph resize has none)."""
    s = summary["cascades"][cascade]
    configs = summary["configs"]
    paths = cost.get(cascade_key(summary, cascade))
    first = cost[arch_key(configs[s["first"]]["served"])]
    extra = [cost[arch_key(configs[m]["served"])] for m in s["then_members"] if m != s["first"]]
    out = {k: v + s["escalated"] * sum(c[k] for c in extra) for k, v in first.items()}
    out["bytes"] = first["bytes"] + sum(c["bytes"] for c in extra)
    if paths is None:
        return out
    sure, every = paths["sure"], paths["escalated"]
    for key in sure:
        out[key] = round(sure[key] + s["escalated"] * (every[key] - sure[key]), 3)
    out["bytes"] = paths["bytes"]
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
            archs.setdefault(key, parse_arch(key))
    # batch ORT_BATCH is how the train stage computes frozen features: its rate prices training
    batches = tuple(sorted({1, cv.latency_batch, ORT_BATCH}))
    with tempfile.TemporaryDirectory() as tmp:
        exported = {k: export_arch(a, 2, Path(tmp), export.opset) for k, a in archs.items()}
        files: dict[str, Path | bytes] = {k: path for k, (path, _) in exported.items()}
        sizes = {k: a["input_size"] for k, a in archs.items()}
        cost: dict[str, dict[str, Any]] = {
            k: {"bytes": path.stat().st_size, "macs": macs} for k, (path, macs) in exported.items()
        }
        # each distinct cascade graph, timed on its two paths: no row escalated, every row
        for name in summary.get("cascades", {}):
            key = cascade_key(summary, name)
            if key in cost:
                continue
            path, inputs = export_cascade_arch(summary, name, 2, Path(tmp), export.opset)
            model = onnx.load(str(path))
            cost[key] = {"bytes": path.stat().st_size, "inputs": inputs}
            # the sure path is fed the first model's view alone, as a server would feed it
            first_view = {INPUT_NAME: inputs[INPUT_NAME]}
            paths = (("sure", NO_ROW, first_view), ("escalated", EVERY_ROW, inputs))
            for path_name, below, fed in paths:
                files[f"{key}:{path_name}"] = with_threshold(model, below)
                sizes[f"{key}:{path_name}"] = fed
        log.info(
            "timing %s, %d runs each, %d threads",
            list(files),
            cv.latency_runs,
            export.bench_threads,
        )
        timings = time_sessions(
            files,
            sizes,
            batches=batches,
            threads=export.bench_threads,
            warmup=export.bench_warmup,
            runs=cv.latency_runs,
        )
    for key, t in timings.items():
        if key.startswith("cascade:"):
            arch, path_name = key.rsplit(":", 1)
            cost[arch][path_name] = t
        else:
            cost[key].update(t)
    # a configuration is one model: where the train section is a cascade, its command says so
    alone = {"cascade": None} if load_train(params_path).cascade else {}
    for s in summary["configs"].values():
        s["reproduce"] = reproduce_command({**s["overrides"], **alone})
        s["train_seconds_estimate"] = train_estimate(s, cost)
    for s in summary.get("ensembles", {}).values():  # not one model: no single command
        s["reproduce"] = "the members' commands; their answers averaged"
        s["train_seconds_estimate"] = sum(
            summary["configs"][m]["train_seconds_estimate"] for m in s["members"]
        )
    for name, s in summary.get("cascades", {}).items():  # served by the pipeline: train.cascade
        own = len(cost[cascade_key(summary, name)].get("inputs", {})) > 1
        views = "train.cascade_views=own: each model on its own view" if own else "one input"
        s["reproduce"] = f"make cv; served: train.cascade ({views})"
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
                "graph": cascade_key(summary, name),  # its two paths' timings: architectures
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
