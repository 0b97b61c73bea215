"""Drift and performance report from the prediction log, per model version.

    python -m monitoring.drift_report --db var/predictions.db --model models/model.onnx \
        --out reports/monitoring

Writes ``report.md`` (Markdown with SVG charts beside it) and ``report.json`` (the same figures).
For each model version: volume, live accuracy on the feedback received, confusion and per-class
precision/recall, label and confidence distributions, latency percentiles, and drift (PSI and KS)
of the latest window and over time against the reference statistics carried by the model.
Runs in the load environment (numpy and matplotlib; onnx only to read the model's metadata).
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import logging
import re
import sqlite3
import sys
from pathlib import Path
from typing import Any

import numpy as np

from catsdogs import drift
from monitoring import charts

log = logging.getLogger("monitoring.drift_report")

TIME_BUCKETS = 12  # points on the over-time charts
# fewer predictions than this (the latest window, or a time bucket) are not scored for drift:
# a handful of photos gives any PSI at all (the live server's /monitoring/drift does the same)
MIN_BUCKET_ROWS = 30


def load_reference(
    model: str | None, reference: str | None
) -> tuple[dict[str, Any] | None, str | None]:
    """reference_stats from a JSON file, or from the ONNX model's metadata_props, and the model
    version they describe (None from a JSON file: every version is scored against it)."""
    if reference:
        return json.loads(Path(reference).read_text()), None
    if not model:
        return None, None
    path = Path(model)
    if not path.is_file():
        log.warning("model %s not found; drift is not scored", path)
        return None, None
    import onnx  # only here: the report also runs without a model

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    raw = props.get("reference_stats")
    if not raw:
        log.warning("model %s carries no reference_stats; drift is not scored", path)
        return None, None
    return json.loads(raw), props.get("model_version")


def _feedback_key(conn: sqlite3.Connection) -> str:
    """The column feedback refers to: prediction_id since schema 1, request_id before (a log
    no server has opened since it was written still has the old schema; the report is read-only)."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    return "prediction_id" if version >= 1 else "request_id"


def read_version(conn: sqlite3.Connection, version: str, since: float | None) -> dict[str, Any]:
    key = _feedback_key(conn)
    rows = conn.execute(
        "SELECT p.ts, p.label, p.confidence, p.width, p.height, p.brightness, p.latency_ms, "
        f"f.true_label FROM predictions p LEFT JOIN feedback f ON f.{key} = p.{key} "
        "WHERE p.model_version = ? AND p.ts >= ? ORDER BY p.ts",
        (version, since or 0.0),
    ).fetchall()
    if not rows:
        return {}
    ts, label, conf, width, height, bright, latency, truth = zip(*rows, strict=True)
    return {
        "ts": np.asarray(ts, dtype=np.float64),
        "label": np.asarray(label, dtype=object),
        "confidence": np.asarray(conf, dtype=np.float64),
        "width": np.asarray(width, dtype=np.float64),
        "height": np.asarray(height, dtype=np.float64),
        "brightness": np.asarray(bright, dtype=np.float64),
        "latency_ms": np.asarray(latency, dtype=np.float64),
        "truth": np.asarray(truth, dtype=object),
    }


def performance(data: dict[str, Any]) -> dict[str, Any]:
    labelled = data["truth"] != None  # noqa: E711 (element-wise comparison on an object array)
    truth, pred = data["truth"][labelled], data["label"][labelled]
    classes = sorted(set(data["label"]) | set(truth))
    confusion = {t: {p: int(np.sum((truth == t) & (pred == p))) for p in classes} for t in classes}
    per_class = {}
    for c in classes:
        tp = confusion[c][c]
        predicted = sum(confusion[t][c] for t in classes)
        actual = sum(confusion[c].values())
        per_class[c] = {
            "precision": tp / predicted if predicted else None,
            "recall": tp / actual if actual else None,
            "support": actual,
        }
    n_fb = int(labelled.sum())
    correct = int(np.sum(truth == pred))
    return {
        "predictions": len(data["ts"]),
        "first": _iso(data["ts"][0]),
        "last": _iso(data["ts"][-1]),
        "labels": {c: int(np.sum(data["label"] == c)) for c in sorted(set(data["label"]))},
        "feedback": n_fb,
        "correct": correct,
        "accuracy": correct / n_fb if n_fb else None,
        "confusion": confusion,
        "per_class": per_class,
        "confidence": drift.histogram(data["confidence"], drift.CONFIDENCE_EDGES),
        "latency_ms": {f"p{q}": float(np.percentile(data["latency_ms"], q)) for q in (50, 90, 99)},
    }


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(float(ts), dt.UTC).isoformat(timespec="seconds")


def _window(data: dict[str, Any], sl: slice | np.ndarray) -> dict[str, Any]:
    return {
        "confidence": data["confidence"][sl],
        "width": data["width"][sl],
        "height": data["height"][sl],
        "brightness": data["brightness"][sl],
        "labels": list(data["label"][sl]),
    }


def drift_figures(data: dict[str, Any], reference: dict[str, Any], window: int) -> dict[str, Any]:
    """Drift of the latest ``window`` predictions, and PSI per time bucket (each scored from
    ``MIN_BUCKET_ROWS`` predictions: fewer give {})."""
    n_latest = min(window, len(data["ts"]))
    latest = (
        drift.drift_scores(reference, **_window(data, slice(-window, None)))
        if n_latest >= MIN_BUCKET_ROWS
        else {}
    )
    edges = np.linspace(data["ts"][0], data["ts"][-1] + 1e-6, TIME_BUCKETS + 1)
    buckets = []
    for lo, hi in itertools.pairwise(edges):
        mask = (data["ts"] >= lo) & (data["ts"] < hi)
        n = int(mask.sum())
        scores = (
            drift.drift_scores(reference, **_window(data, mask)) if n >= MIN_BUCKET_ROWS else {}
        )
        buckets.append({"start": _iso(lo), "n": n, "psi": {k: v["psi"] for k, v in scores.items()}})
    return {"window": min(window, len(data["ts"])), "latest": latest, "over_time": buckets}


def accuracy_over_time(data: dict[str, Any]) -> list[dict[str, Any]]:
    edges = np.linspace(data["ts"][0], data["ts"][-1] + 1e-6, TIME_BUCKETS + 1)
    out = []
    for lo, hi in itertools.pairwise(edges):
        mask = (data["ts"] >= lo) & (data["ts"] < hi)
        labelled = mask & (data["truth"] != None)  # noqa: E711
        n = int(labelled.sum())
        hits = int(np.sum(data["truth"][labelled] == data["label"][labelled]))
        out.append(
            {
                "start": _iso(lo),
                "predictions": int(mask.sum()),
                "feedback": n,
                "accuracy": hits / n if n else None,
            }
        )
    return out


def _slug(version: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", version)[:80] or "version"


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def write_charts(out: Path, version: str, fig: dict[str, Any], ref: dict | None) -> list[str]:
    slug = _slug(version)
    names = []
    conf = fig["performance"]["confidence"]
    edges = conf["edges"]
    cats = [f"{a:g}-{b:g}" for a, b in itertools.pairwise(edges)]
    total = max(1, sum(conf["counts"]))
    series = {"live": [c / total for c in conf["counts"]]}
    if ref and "confidence" in ref and ref["confidence"]["edges"] == edges:
        ref_total = max(1, sum(ref["confidence"]["counts"]))
        series["reference (validation)"] = [c / ref_total for c in ref["confidence"]["counts"]]
    name = f"{slug}-confidence.svg"
    charts.bar_chart(out / name, f"Confidence, {version}", cats, series, "share")
    names.append(name)

    over = fig["over_time"]
    x = [b["start"][5:16].replace("T", " ") for b in over]
    name = f"{slug}-accuracy.svg"
    charts.line_chart(
        out / name,
        f"Live accuracy on feedback, {version}",
        x,
        {"accuracy": [b["accuracy"] for b in over]},
        "accuracy",
    )
    names.append(name)
    if fig.get("drift"):
        buckets = fig["drift"]["over_time"]
        features = sorted({k for b in buckets for k in b["psi"]})
        series_psi = {f: [b["psi"].get(f) for b in buckets] for f in features}
        name = f"{slug}-drift.svg"
        charts.line_chart(out / name, f"Drift (PSI) over time, {version}", x, series_psi, "PSI")
        names.append(name)
    return names


def render_markdown(report: dict[str, Any], charts: dict[str, list[str]]) -> str:
    lines = [
        "# Prediction log report",
        "",
        f"Database `{report['db']}`, generated {report['generated_at']}. "
        f"Reference statistics: {report['reference_source'] or 'none (drift not scored)'}.",
        "",
    ]
    for version, fig in report["versions"].items():
        perf = fig["performance"]
        lines += [
            f"## Model version `{version}`",
            "",
            f"- predictions: {perf['predictions']} ({perf['first']} to {perf['last']})",
            f"- feedback: {perf['feedback']}, live accuracy: {_fmt(perf['accuracy'])}",
            "- latency (server, ms): "
            + ", ".join(f"{k} {v:.1f}" for k, v in perf["latency_ms"].items()),
            "- predicted labels: " + ", ".join(f"{k} {v}" for k, v in perf["labels"].items()),
            "",
        ]
        if perf["feedback"]:
            classes = list(perf["confusion"])
            lines += [
                "| true \\ predicted | " + " | ".join(classes) + " | recall |",
                "|---" * (len(classes) + 2) + "|",
            ]
            for t in classes:
                row = " | ".join(str(perf["confusion"][t][p]) for p in classes)
                lines.append(f"| {t} | {row} | {_fmt(perf['per_class'][t]['recall'], 3)} |")
            precision = " | ".join(_fmt(perf["per_class"][p]["precision"], 3) for p in classes)
            lines += [f"| precision | {precision} | |", ""]
        if fig.get("drift_not_scored"):
            lines += [f"Drift: not scored ({fig['drift_not_scored']}).", ""]
        if fig.get("drift") and not fig["drift"]["latest"]:
            lines += [
                f"Drift of the latest {fig['drift']['window']} predictions: not scored (drift is "
                f"scored from {MIN_BUCKET_ROWS} predictions).",
                "",
            ]
        elif fig.get("drift"):
            d = fig["drift"]
            lines += [
                f"Drift of the latest {d['window']} predictions against the reference:",
                "",
                "| feature | PSI | KS | level |",
                "|---|---|---|---|",
            ]
            for feature, s in d["latest"].items():
                lines.append(f"| {feature} | {s['psi']:.4f} | {s['ks']:.4f} | {s['level']} |")
            lines.append("")
        for name in charts.get(version, []):
            lines += [f"![{name}]({name})", ""]
    return "\n".join(lines)


def build_report(
    db: Path,
    reference: dict | None,
    window: int,
    since: float | None,
    reference_version: str | None = None,
) -> dict:
    """Each logged version's figures; drift against ``reference`` for the version it describes
    (``reference_version``; None: every version). Another version's traffic scored against it
    called the model change itself drift."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        versions = [
            r[0]
            for r in conn.execute(
                "SELECT model_version FROM predictions GROUP BY model_version ORDER BY MIN(ts)"
            )
        ]
        out: dict[str, Any] = {}
        for version in versions:
            data = read_version(conn, version, since)
            if not data:
                continue
            fig: dict[str, Any] = {
                "performance": performance(data),
                "over_time": accuracy_over_time(data),
            }
            if reference is not None and reference_version in (None, version):
                fig["drift"] = drift_figures(data, reference, window)
            elif reference is not None:
                fig["drift_not_scored"] = (
                    f"the reference statistics are model version {reference_version}'s; run the "
                    f"report with {version}'s model file to score it"
                )
            out[version] = fig
        return out
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    p = argparse.ArgumentParser(description="Drift and performance report from the prediction log")
    p.add_argument("--db", default="var/predictions.db")
    p.add_argument("--out", default="reports/monitoring")
    p.add_argument("--model", default=None, help="ONNX model whose reference_stats score drift")
    p.add_argument("--reference", default=None, help="reference_stats JSON (instead of --model)")
    p.add_argument("--window", type=int, default=500, help="latest predictions scored for drift")
    p.add_argument("--since-hours", type=float, default=None, help="only this recent a history")
    args = p.parse_args(argv)
    db = Path(args.db)
    if not db.is_file():
        log.error("no prediction log at %s", db)
        return 2
    reference, reference_version = load_reference(args.model, args.reference)
    since = None
    if args.since_hours is not None:
        since = dt.datetime.now(dt.UTC).timestamp() - args.since_hours * 3600
    versions = build_report(db, reference, args.window, since, reference_version)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "db": str(db),
        "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "reference_source": args.reference or (args.model if reference else None),
        "versions": versions,
    }
    charts = {
        v: write_charts(out, v, fig, reference if "drift" in fig else None)
        for v, fig in versions.items()
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(render_markdown(report, charts) + "\n")
    log.info("report for %d model version(s) written to %s", len(versions), out / "report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
