"""Prometheus metrics of one app, registered in its own ``CollectorRegistry``.

Label values are bounded: routes are templates (``/v2/models/{name}/infer``), an unmatched path
is one label, methods other than HTTP's usual ones one label (``OTHER``), and prediction labels
come from the model's fixed class list.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector

from server import loop_lag
from server.gc_pauses import GcPauses
from server.logs import access_lines_dropped

UNMATCHED_ROUTE = "<unmatched>"
# Methods counted under their own name; any other verb the HTTP parser accepts (WebDAV's
# PROPFIND or MKCOL, M-SEARCH, ...) counts as OTHER, so a client cannot multiply the series.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
OTHER_METHOD = "OTHER"
# The failure statuses of an API route exported from the start, at 0 (with its success status):
# a series born at its first event has no earlier sample, so rate() and increase() miss that
# event (the first failure of each route after a start would be invisible to the error alert).
API_FAILURE_STATUSES = ("500", "503", "504")


def method_label(method: str) -> str:
    return method if method in METHODS else OTHER_METHOD


_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10)
_FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_STAGE_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128,
    0.256, 1.0,
)  # fmt: skip
_CONFIDENCE_BUCKETS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
# Where a prediction request's time goes (README, "Where the time goes"): head (first byte to
# app), body, queue, decode, preprocess, inference (per batch), respond (answer built and sent),
# log (metrics and the access log, after the answer).
STAGES = ("head", "body", "queue", "decode", "preprocess", "inference", "respond", "log")
# Why the connection layer (server.protocol) refused a request before the app's routes saw it:
# not HTTP (400), a head not complete within HEADER_TIMEOUT_S (408) or over MAX_HEADER_BYTES
# (431), too many pipelined, all in no other series; and over MAX_CONNECTIONS (the middleware's
# 503 too_many_connections) or a body in pieces of a few bytes (its 400), both also in
# http_requests_total.
REFUSALS = (
    "connection_limit",
    "malformed",
    "head_timeout",
    "head_too_large",
    "pipelining",
    "fragmented_body",
)
# Why a prediction request was answered 503 for load (inference_rejected_total's reason)
REJECTIONS = ("queue_full", "bytes", "pixels")
# Why a photo a cascade's first model was unsure of kept its answer (server.inference.Escalation)
ESCALATION_SKIPS = ("pixels", "decode")
# The key under which the lifespan hands the connection layer its counter (uvicorn gives every
# connection the lifespan's state): a callable taking one of REFUSALS.
REFUSAL_COUNTER = "catsdogs.count_refusal"


class Children:
    """The children of a labelled metric, looked up once per label values.

    ``metric.labels(...)`` validates the values and takes a lock on every call; a request
    records about a dozen labelled series, so the hot path keeps the children it has seen.
    Children are never removed from these metrics, so a kept child stays the live one.
    """

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: Counter | Histogram) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        # process_start_time_seconds (a restart, which no counter reset shows reliably: requests
        # cut by a crash are never counted), process_resident_memory_bytes, CPU and open fds
        ProcessCollector(registry=registry)
        self.requests = Counter(
            "http_requests",
            "HTTP requests by route template, method and status.",
            ["route", "method", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "http_request_duration_seconds",
            "HTTP request latency, first byte in to last byte out.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "http_requests_in_flight", "HTTP requests being handled.", registry=registry
        )
        self.queue_wait = Histogram(
            "inference_queue_wait_seconds",
            "Time a request waits in the batch queue before its run starts.",
            buckets=_FAST_BUCKETS,
            registry=registry,
        )
        self.inference = Histogram(
            "inference_run_seconds",
            "Duration of one batch's model work: its onnxruntime run and, for a cascade file, the "
            "second step with the views it decodes for the photos it escalates.",
            buckets=_FAST_BUCKETS,
            registry=registry,
        )
        self.batch_limit = Gauge(
            "inference_batch_limit",
            "Most images per run now: MAX_BATCH_SIZE, or less where the warm-up measured no gain.",
            registry=registry,
        )
        self.seconds_per_image = Gauge(
            "inference_warmup_seconds_per_image",
            "The warm-up's time per image of a run, by batch size (ADAPTIVE_BATCH=1).",
            ["batch_size"],
            registry=registry,
        )
        self.startup = Gauge(
            "server_startup_seconds",
            "Seconds this process spent in each start-up phase, the first (boot: interpreter "
            "and imports) from the process's own start; server.startup lists the phases.",
            ["phase"],
            registry=registry,
        )
        self.parallel_runs = Gauge(
            "inference_parallel_runs",
            "Runs side by side under load, one core each (PARALLEL_RUNS); 1: one run at a time.",
            registry=registry,
        )
        self.parallel_batch_limit = Gauge(
            "inference_parallel_batch_limit",
            "Most images per parallel run, as the warm-up measured on the one-thread session.",
            registry=registry,
        )
        self.parallel_seconds_per_image = Gauge(
            "inference_warmup_parallel_seconds_per_image",
            "The warm-up's time per image of a one-thread (parallel) run, by batch size.",
            ["batch_size"],
            registry=registry,
        )
        self.policy_runs = Counter(
            "inference_policy_runs",
            "onnxruntime runs by the pool threads' policy (sleep or spin), as INTRA_OP_SPINNING=2 "
            "chose it for each run, or parallel (one-thread runs side by side under load).",
            ["policy"],
            registry=registry,
        )
        self.batch_size = Histogram(
            "inference_batch_size",
            "Images per onnxruntime run.",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
            registry=registry,
        )
        self.escalated = Counter(
            "inference_escalated_images",
            "Images a cascade file's first model was unsure of, passed on to the file's second "
            "step (with their other views where its models take views of their own); 0 for any "
            "other model.",
            registry=registry,
        )
        self.not_escalated = Counter(
            "inference_escalation_skipped_images",
            "Images a cascade file's first model was unsure of that kept its answer because their "
            "other views could not be made, by reason (ESCALATION_SKIPS): the decoded-pixel "
            "budget full (pixels: not waited for) or the view refused where the first was not "
            "(decode). 0 for any other model.",
            ["reason"],
            registry=registry,
        )
        # exported at 0 from the start, as the rejections are
        self.not_escalated_series = {
            reason: self.not_escalated.labels(reason) for reason in ESCALATION_SKIPS
        }
        self.abandoned = Counter(
            "inference_abandoned_images",
            "Images not decoded or not run because nobody waited for them any more: their "
            "request was answered 504 (REQUEST_TIMEOUT_S) or its client hung up (499).",
            registry=registry,
        )
        self.queue_images = Gauge(
            "inference_queue_images", "Images admitted and not yet answered.", registry=registry
        )
        self.rejected = Counter(
            "inference_rejected",
            "Prediction requests answered 503 for load, once each, by reason (REJECTIONS): the "
            "queue full (queue_full), the in-flight byte budget (bytes), or the decoded-pixel "
            "budget (pixels: counted once for a batch with any image refused).",
            ["reason"],
            registry=registry,
        )
        # exported at 0 from the start (see API_FAILURE_STATUSES)
        self.rejected_series = {reason: self.rejected.labels(reason) for reason in REJECTIONS}
        self.refused = Counter(
            "http_refused",
            "Requests and connections refused before the app's routes saw them, by reason "
            "(REFUSALS): not in http_requests_total, but for connection_limit and "
            "fragmented_body, whose 503 and 400 the app's middleware answers.",
            ["reason"],
            registry=registry,
        )
        self.refused_series = {reason: self.refused.labels(reason) for reason in REFUSALS}
        self.predictions = Counter(
            "predictions", "Predicted images by label.", ["label"], registry=registry
        )
        self.evaluation_predictions = Counter(
            "evaluation_predictions",
            "Predicted images of evaluation traffic (X-Traffic-Class: evaluation) by label: "
            "answered, never logged or monitored, and not in predictions_total.",
            ["label"],
            registry=registry,
        )
        self.confidence = Histogram(
            "prediction_confidence",
            "Probability of the predicted label.",
            buckets=_CONFIDENCE_BUCKETS,
            registry=registry,
        )
        self.access_log_dropped = Gauge(
            "access_log_dropped_lines",
            "Access log lines dropped because the log writer thread fell behind.",
            registry=registry,
        )
        self.access_log_dropped.set_function(access_lines_dropped)
        self.model_info = Info("model", "The served model.", registry=registry)
        self.loop_lag = Histogram(
            "event_loop_lag_seconds",
            "How late the event loop woke a timer set every 100 ms: a stalled loop delays every "
            "request and probe at once.",
            buckets=loop_lag.BUCKETS,
            registry=registry,
        )
        self.gc = GcPauses()  # started by the lifespan once start-up is done
        registry.register(self.gc)
        # where a request's time goes, stage by stage (STAGES)
        self.stage = Histogram(
            "request_stage_seconds",
            "Time spent in each stage of a prediction request.",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=registry,
        )
        # the hot path's series, each resolved once (every stage is exported from the start)
        self.stages = {name: self.stage.labels(name) for name in STAGES}
        self.request_series = Children(self.requests)
        self.latency_series = Children(self.latency)
        self.prediction_series = Children(self.predictions)
        self.evaluation_series = Children(self.evaluation_predictions)
        self.policy_series = Children(self.policy_runs)

    def export_api_routes(self, routes: list[tuple[str, str, int]]) -> None:
        """Export the request and latency series of the API's (route template, method, success
        status) at 0 (see ``API_FAILURE_STATUSES``)."""
        for route, method, success in routes:
            for status in (str(success), *API_FAILURE_STATUSES):
                self.request_series(route, method, status)
            self.latency_series(route)

    def count_refusal(self, reason: str) -> None:
        self.refused_series[reason].inc()
