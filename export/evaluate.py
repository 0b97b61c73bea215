"""The ``evaluate`` stage: score the file that ships, as the server would run it.

    python -m export.evaluate --model models/model.onnx --manifest data/prepared/manifest.csv \
        --metrics reports/metrics.json --plots reports/plots

Only the ONNX file and the manifest: class names and preprocessing come from the file's own
contract, inference from onnxruntime, pixels from ``catsdogs.preprocessing``. The metrics and plots
are also logged to the MLflow run that trained the model (the file's ``mlflow_run_id``).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
from sklearn import metrics as skm

from catsdogs.cascade import contract_views
from catsdogs.hashing import file_sha256
from catsdogs.manifest import read_manifest
from catsdogs.modelfile import LoadedModel, load_model_file
from export.params import EvaluateParams, load_evaluate
from export.scoring import Evaluation, evaluate_session
from export.tracking import log_evaluation
from training.params import ParamsError

log = logging.getLogger("export.evaluate")


def evaluate_file(model: Path, manifest: Path, params: EvaluateParams) -> Evaluation:
    return evaluate_loaded(load_model_file(model), manifest, params)


def evaluate_loaded(loaded: LoadedModel, manifest: Path, params: EvaluateParams) -> Evaluation:
    rows = read_manifest(manifest, params.split)
    c = loaded.contract
    return evaluate_session(
        loaded.session,
        rows,
        c.preprocessing,
        c.class_names,
        chunk=params.batch_size,
        desc=params.split,
        views=contract_views(c.extra.get("cascade")),  # a cascade's other views, if any
    )


def write_plots(ev: Evaluation, out_dir: Path) -> dict[str, Path]:
    """Confusion pairs (CSV, DVC's confusion template), ROC points (JSON), and both as PNG."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = ev.class_names
    pred = ev.probs.argmax(axis=1)
    confusion_csv = out_dir / "confusion.csv"
    with open(confusion_csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["actual", "predicted"])
        writer.writerows((names[t], names[p]) for t, p in zip(ev.y_true, pred, strict=True))

    # ROC of the positive class (class_names[1]); one curve for the binary product
    fpr, tpr, thresholds = skm.roc_curve(ev.y_true == 1, ev.probs[:, 1])
    roc_json = out_dir / "roc.json"
    points = [
        {"fpr": round(float(a), 6), "tpr": round(float(b), 6), "threshold": round(float(t), 6)}
        for a, b, t in zip(fpr, tpr, np.minimum(thresholds, 1.0), strict=True)
    ]
    roc_json.write_text(json.dumps({"roc": points}, indent=1) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = skm.confusion_matrix(ev.y_true, pred, labels=range(len(names)))
    fig, ax = plt.subplots(figsize=(4, 4))
    skm.ConfusionMatrixDisplay(cm, display_labels=list(names)).plot(ax=ax, colorbar=False)
    ax.set_title(f"test, n={len(ev.y_true)}")
    fig.tight_layout()
    confusion_png = out_dir / "confusion.png"
    fig.savefig(confusion_png, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(fpr, tpr, label=f"AUC {ev.metrics['roc_auc']:.4f}")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel(f"true positive rate ({names[1]})")
    ax.legend(loc="lower right")
    fig.tight_layout()
    roc_png = out_dir / "roc.png"
    fig.savefig(roc_png, dpi=100)
    plt.close(fig)
    return {
        "confusion_csv": confusion_csv,
        "roc_json": roc_json,
        "confusion_png": confusion_png,
        "roc_png": roc_png,
    }


def main(argv: list[str] | None = None) -> None:
    # our own progress at INFO; libraries (onnxruntime's quantizer logs per weight) at WARNING
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    logging.getLogger("export").setLevel(logging.INFO)
    parser = argparse.ArgumentParser(prog="python -m export.evaluate", description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--plots", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        params = load_evaluate(args.params)
    except ParamsError as exc:  # names the key; no traceback for a typo in params.yaml
        log.error("evaluate: %s", exc)
        sys.exit(2)
    loaded = load_model_file(args.model)
    data = file_sha256(args.manifest)  # the data_version the export stage records
    if loaded.contract.data_version != data:
        log.warning(
            "%s was trained on data %s, %s is %s: its %s split may hold training photos",
            args.model,
            loaded.contract.data_version[:12],
            args.manifest,
            data[:12],
            params.split,
        )
    ev = evaluate_loaded(loaded, args.manifest, params)
    metrics: dict[str, Any] = ev.metrics
    args.metrics.parent.mkdir(parents=True, exist_ok=True)
    args.metrics.write_text(json.dumps(metrics, indent=2) + "\n")
    plots = write_plots(ev, args.plots)
    log.info("%s on %s split: %s", args.model, params.split, metrics)
    log_evaluation(
        run_id=loaded.contract.mlflow_run_id,
        split=params.split,
        metrics=metrics,
        files=[args.metrics, *plots.values()],  # the PNGs and the data to redraw them
    )


if __name__ == "__main__":
    main()
