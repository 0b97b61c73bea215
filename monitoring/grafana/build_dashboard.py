"""Writes grafana/dashboards/catsdogs.json: ``python -m monitoring.grafana.build_dashboard``.

The dashboard is generated, so its queries are reviewed here as code, one panel a line.
"""

from __future__ import annotations

import json
from pathlib import Path

DS = {"type": "prometheus", "uid": "prometheus"}
OUT = Path(__file__).parent / "dashboards" / "catsdogs.json"


def target(expr: str, legend: str, ref: str) -> dict:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref}


def panel(
    title: str,
    kind: str,
    targets: list[tuple[str, str]],
    grid: tuple[int, int, int, int],
    unit: str = "short",
    thresholds: list[tuple[str, float | None]] | None = None,
    description: str = "",
) -> dict:
    x, y, w, h = grid
    steps = [{"color": c, "value": v} for c, v in (thresholds or [("green", None)])]
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {
            "defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps}},
            "overrides": [],
        },
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [target(e, leg, chr(ord("A") + i)) for i, (e, leg) in enumerate(targets)],
    }


def q(expr: str, per: str = "le") -> str:
    return f"sum by ({per}) (rate({expr}[$__rate_interval]))"


def quantile(p: float, bucket: str) -> tuple[str, str]:
    return f"histogram_quantile({p}, {q(bucket)})", f"p{round(p * 100)}"


PREDICTION_LATENCY = 'http_request_duration_seconds_bucket{route=~"/predict|/v2/models/.+/infer"}'

PANELS = [
    panel(
        "Requests per second by route and status",
        "timeseries",
        [
            (q("http_requests_total", "route, status"), "{{route}} {{status}}"),
            (q("http_refused_total", "reason"), "refused before the app: {{reason}}"),
        ],
        (0, 0, 12, 8),
        "reqps",
        description="Refused before the app: over MAX_CONNECTIONS (503), not HTTP (400), head "
        "too slow (408) or too large (431), too many pipelined requests (closed).",
    ),
    panel(
        "Prediction latency percentiles by route",
        "timeseries",
        [
            (
                f"histogram_quantile({p}, {q(PREDICTION_LATENCY, 'le, route')})",
                f"{{{{route}}}} p{round(p * 100)}",
            )
            for p in (0.5, 0.9, 0.99)
        ],
        (12, 0, 12, 8),
        "s",
        description="The routes that take one image a request, as PredictLatencyHigh watches "
        "them: /predict and the V2 infer routes (KServe's clients call these). "
        "/predict/batch grows with its size.",
    ),
    panel(
        "Batch sizes (images per onnxruntime run)",
        "timeseries",
        [
            (
                q("inference_batch_size_sum", "job")
                + " / "
                + q("inference_batch_size_count", "job"),
                "mean",
            ),
            # shares read off the buckets' edges, which are whole sizes: exact, where a
            # histogram_quantile would interpolate sizes no run can have (0.5, 3.49)
            (
                q('inference_batch_size_bucket{le="1"}', "job")
                + " / "
                + q("inference_batch_size_count", "job"),
                "share of runs of 1 image",
            ),
            (
                "1 - "
                + q('inference_batch_size_bucket{le="8"}', "job")
                + " / "
                + q("inference_batch_size_count", "job"),
                "share of runs of over 8 images",
            ),
        ],
        (0, 8, 8, 8),
    ),
    panel(
        "Queue wait and inference time",
        "timeseries",
        [
            (quantile(0.9, "inference_queue_wait_seconds_bucket")[0], "queue wait p90"),
            (quantile(0.9, "inference_run_seconds_bucket")[0], "run p90"),
        ],
        (8, 8, 8, 8),
        "s",
    ),
    panel(
        "In flight, queued images, 503s",
        "timeseries",
        [
            ("sum(http_requests_in_flight)", "in flight"),
            ("sum(inference_queue_images)", "queued images"),
            (q("inference_rejected_total", "job"), "rejected / s"),
            (q("inference_abandoned_images_total", "job"), "skipped: 504 or hung up / s"),
        ],
        (16, 8, 8, 8),
    ),
    panel(
        "Predictions by label",
        "timeseries",
        [(q("predictions_total", "label"), "{{label}}")],
        (0, 16, 12, 8),
        "reqps",
    ),
    panel(
        "Confidence of predictions (p10, p50)",
        "timeseries",
        [
            (quantile(0.1, "prediction_confidence_bucket")[0], "p10"),
            (quantile(0.5, "prediction_confidence_bucket")[0], "p50"),
        ],
        (12, 16, 12, 8),
        "percentunit",
    ),
    panel(
        "Live accuracy (on feedback)",
        "stat",
        [("monitor_live_accuracy", "{{model_version}}")],
        (0, 24, 6, 8),
        "percentunit",
        [("red", None), ("orange", 0.9), ("green", 0.95)],
        "Share of predictions whose feedback label matches, per model version",
    ),
    panel(
        "Live accuracy over time",
        "timeseries",
        [
            ("monitor_live_accuracy", "{{model_version}}"),
            (
                '1 - sum by (model_version) (increase(feedback_labels_total{result="wrong"}[6h]))'
                " / clamp_min(sum by (model_version) (increase(feedback_labels_total[6h])), 1)",
                "last 6 h {{model_version}}",
            ),
            ("monitor_feedback", "feedback {{model_version}}"),
        ],
        (6, 24, 10, 8),
        description="All retained feedback of a version (monitor_live_accuracy: LiveAccuracyLow), "
        "and the last 6 hours' alone (LiveAccuracyDropped), which a sudden regression moves.",
    ),
    panel(
        "Confusion (feedback)",
        "table",
        [
            (
                "monitor_confusion",
                "{{model_version}} true={{true_label}} predicted={{predicted_label}}",
            )
        ],
        (16, 24, 8, 8),
    ),
    panel(
        "Drift (PSI) against the training reference",
        "timeseries",
        [('drift_score{method="psi"}', "{{feature}}")],
        (0, 32, 12, 8),
        "short",
        [("green", None), ("orange", 0.1), ("red", 0.25)],
        "PSI < 0.1 stable, 0.1-0.25 moderate, > 0.25 significant",
    ),
    panel(
        "Drift (KS) against the training reference",
        "timeseries",
        [('drift_score{method="ks"}', "{{feature}}")],
        (12, 32, 12, 8),
    ),
    panel(
        "Prediction log",
        "timeseries",
        [
            (q("prediction_log_write_failures_total", "job"), "failed writes / s"),
            (q("prediction_log_dropped_total", "job"), "dropped / s"),
            ("prediction_log_queued", "queued"),
            ("prediction_log_healthy", "healthy"),
        ],
        (0, 40, 12, 6),
    ),
    panel(
        "Event loop lag and GC pauses",
        "timeseries",
        [
            *(quantile(p, "event_loop_lag_seconds_bucket") for p in (0.5, 0.99)),
            (quantile(0.99, "python_gc_pause_seconds_bucket")[0], "GC pause p99"),
        ],
        (12, 40, 12, 6),
        "s",
        [("green", None), ("orange", 0.025), ("red", 0.1)],
        "How late the server's event loop wakes a 100 ms timer: every request and probe waits as "
        "long (alert ServeEventLoopStalled: more than 5 wake-ups over 100 ms late in 5 minutes); "
        "the garbage collector's pauses hold it too",
    ),
    panel(
        "Memory per replica",
        "timeseries",
        [("process_resident_memory_bytes", "RSS {{instance}}")],
        (0, 46, 12, 6),
        "bytes",
        description="Each server process's resident memory; compare with the pod's memory limit.",
    ),
    panel(
        "Restarts per replica (15 min)",
        "timeseries",
        [("changes(process_start_time_seconds[15m])", "{{instance}}")],
        (12, 46, 12, 6),
        "short",
        [("green", None), ("red", 2)],
        "New process start times seen in 15 minutes (ServeRestarting pages at 2: a crash loop)",
    ),
    panel(
        "Cascade: unsure photos passed on, or kept",
        "timeseries",
        [
            (q("inference_escalated_images_total", "job"), "passed to the second step / s"),
            (q("inference_escalation_skipped_images_total", "reason"), "kept, {{reason}} / s"),
        ],
        (0, 52, 12, 6),
        "short",
        description="A cascade file's photos its first model was unsure of: passed on to the "
        "second step, or kept at the first answer because their other views could not be made "
        "(pixels: the decoded-pixel budget was full; decode: the view was refused). "
        "CascadeEscalationSkipped files a ticket past 5% kept. 0 for a one-model file.",
    ),
]


def dashboard() -> dict:
    return {
        "uid": "catsdogs-serve",
        "title": "Cats and dogs: serving and model health",
        "tags": ["catsdogs"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "panels": [{**p, "id": i + 1} for i, p in enumerate(PANELS)],
    }


def main() -> None:
    OUT.write_text(json.dumps(dashboard(), indent=2) + "\n")


if __name__ == "__main__":
    main()
