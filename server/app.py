"""The serving app: ``create_app(settings)`` builds it; nothing heavy happens at import time.

The lifespan loads the model, reads its contract, warms up (every batch size once, and timed
rounds of each with ADAPTIVE_BATCH), starts monitoring and only then reports ready. Run it with
``python -m server`` or ``uvicorn --factory server.app:create_app``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from catsdogs.contract import INPUT_NAME, OUTPUT_PROBABILITIES, ModelContract
from catsdogs.cpus import available_cpus
from server import docs, monitor_routes, openapi, ui, v2
from server.auth import locations_shown
from server.error_handlers import EXCEPTION_HANDLERS
from server.errors import RETRY_SOON, ApiError
from server.inference import Batcher, BatchStats, Escalate, InferenceModel, load_model
from server.limits import Budget, Reservation
from server.logs import configure_logging
from server.loop_lag import LoopLag
from server.malloc import cap_arenas, trim_heap
from server.metrics import REFUSAL_COUNTER, ServerMetrics
from server.middleware import RequestContextMiddleware
from server.monitor import Monitor
from server.service import Predictor, Upload, prepare, view_array
from server.settings import Settings
from server.startup import StartupPhases
from server.threads import call_at_lower_priority, worker_initializer
from server.uploads import MULTIPART, read_body, read_multipart

logger = logging.getLogger("server")

# Room for the multipart envelope around one image (boundaries and part headers).
_MULTIPART_OVERHEAD = 64 * 1024
_RAW_TYPES = ("application/octet-stream",)


# ---------------------------------------------------------------------- health
async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def live(request: Request) -> JSONResponse:
    return JSONResponse({"status": "alive"})


async def ready(request: Request) -> Response:
    """200 while predictions work. The prediction log's state rides along for operators; a log
    that is stuck or dead does NOT make this 503, as predictions are still answered and taking
    the replica out of rotation would turn a logging problem into an outage."""
    state = request.app.state
    if state.ready:
        body = {"status": "ready", "model_version": state.model_version}
        monitor = getattr(state, "monitor", None)
        if monitor is not None:
            body["prediction_log"] = monitor.log_status()
        return JSONResponse(body)
    raise ApiError(503, "not_ready", "the model is not loaded yet or is shutting down")


# ---------------------------------------------------------------------- predictions
def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _elapsed_ms(request: Request) -> float:
    return (time.perf_counter() - request.scope["state"]["started"]) * 1000


async def predict(request: Request) -> JSONResponse:
    """One image: multipart field ``file`` or the raw body with an ``image/*`` Content-Type."""
    settings: Settings = request.app.state.settings
    predictor: Predictor = request.app.state.predictor
    media = _media_type(request)
    if media != MULTIPART and not media.startswith("image/") and media not in _RAW_TYPES:
        raise ApiError(
            415,
            "unsupported_media_type",
            "send multipart/form-data with a 'file' field, or the image itself as image/*",
        )

    async def read(reservation: Reservation) -> list[Upload]:
        if media != MULTIPART:
            return [Upload(await read_body(request, settings.max_upload_bytes, reservation))]
        parts = await read_multipart(
            request,
            field_name="file",
            max_parts=1,
            max_part_bytes=settings.max_upload_bytes,
            max_body_bytes=settings.max_upload_bytes + _MULTIPART_OVERHEAD,
            reservation=reservation,
        )
        if not parts:
            raise ApiError(422, "missing_file", "the form has no 'file' field")
        return [Upload(parts[0].data, parts[0].filename)]

    (result,) = await predictor.run(request, read)
    if result.error is not None:
        raise result.error
    request_id = request.scope["state"]["request_id"]
    return JSONResponse(predictor.as_json(result, request_id, _elapsed_ms(request)))


async def predict_batch(request: Request) -> JSONResponse:
    """Several images as multipart ``files`` fields; each answer or error in request order."""
    settings: Settings = request.app.state.settings
    predictor: Predictor = request.app.state.predictor
    if _media_type(request) != MULTIPART:
        raise ApiError(
            415, "unsupported_media_type", "send multipart/form-data with one 'files' field each"
        )

    async def read(reservation: Reservation) -> list[Upload]:
        parts = await read_multipart(
            request,
            field_name="files",
            max_parts=settings.max_batch_files,
            max_part_bytes=settings.max_upload_bytes,
            max_body_bytes=settings.max_request_bytes,
            reservation=reservation,
        )
        if not parts:
            raise ApiError(422, "missing_files", "the form has no 'files' field")
        return [Upload(p.data, p.filename) for p in parts]

    results = await predictor.run(request, read)
    request_id = request.scope["state"]["request_id"]
    latency_ms = _elapsed_ms(request)
    entries = [predictor.as_json(r, request_id, latency_ms) for r in results]
    body: dict[str, Any] = {"predictions": entries, "model_version": predictor.model_version}
    errors = [r.error for r in results if r.error is not None]
    if len(errors) < len(results):
        return JSONResponse(body)
    # No image succeeded: the status says why (all refused for load -> 503, else the client's).
    statuses = {e.status for e in errors}
    status = statuses.pop() if len(statuses) == 1 else 422
    body["error"] = {"code": "no_valid_image", "message": "no image in the request could be used"}
    headers = RETRY_SOON if status == 503 else None
    return JSONResponse(body, status_code=status, headers=headers)


# ---------------------------------------------------------------------- model facts
async def metadata(request: Request) -> Response:
    state = request.app.state
    settings: Settings = state.settings
    # lineage.source (a path or registry URI) only for token holders when a token is set
    shown, headers = locations_shown(request, settings)
    body = state.metadata_json if shown else state.metadata_json_anonymous
    return Response(body, media_type="application/json", headers=headers)


def build_metadata(
    contract: ModelContract, settings: Settings, *, locations: bool = True
) -> dict[str, Any]:
    """GET /metadata's body; ``locations``: with the model's source (see server.auth)."""
    spec = asdict(contract.preprocessing)
    size = contract.input_size
    return {
        "model_name": contract.model_name,
        "model_version": contract.model_version,
        "served_model_name": settings.served_model_name,
        "class_names": list(contract.class_names),
        "input": {
            "name": INPUT_NAME,
            "datatype": "uint8",
            "shape": [-1, size, size, 3],
            "layout": "NHWC",
            "accepts": "one encoded image (JPEG, PNG, WebP, BMP, GIF) per request or file",
        },
        "outputs": [
            {
                "name": OUTPUT_PROBABILITIES,
                "datatype": "float32",
                "shape": [-1, len(contract.class_names)],
            }
        ],
        "preprocessing": spec,
        "lineage": {
            "mlflow_run_id": contract.mlflow_run_id,
            "git_commit": contract.git_commit,
            "data_version": contract.data_version,
            "exported_at": contract.exported_at,
            "source": settings.model_source if locations else None,
        },
        "metrics": contract.extra.get("metrics"),
        "training": contract.extra.get("training"),
        "quantization": contract.extra.get("quantization", "none"),
        # a cascade file (export.cascade): {"models": the ones past model_name, "below": the
        # first model's probability under which they answer too}; null for one model
        "cascade": contract.extra.get("cascade"),
        "limits": {
            "max_upload_bytes": settings.max_upload_bytes,
            "max_pixels": settings.max_pixels,
            "max_batch_files": settings.max_batch_files,
        },
    }


async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)


# ---------------------------------------------------------------------- lifespan
def _model_path(settings: Settings) -> Path:
    if not settings.model_uri:
        return Path(settings.model_path)
    from server.model_uri import resolve_model_uri

    tracking = settings.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    return resolve_model_uri(
        settings.model_uri,
        tracking_uri=tracking,
        cache_dir=Path(settings.model_cache_dir),
        max_bytes=settings.model_max_bytes,
        allow_local_source=bool(settings.model_allow_local_source),
    )


def load_served_model(settings: Settings) -> InferenceModel:
    """Resolve MODEL_URI or MODEL_PATH and open the model; errors name the file."""
    threads = settings.intra_op_threads or available_cpus()
    path = _model_path(settings)
    # onnxruntime's pool threads start with the sessions and keep the opening thread's priority
    return call_at_lower_priority(
        lambda: load_model(
            path,
            intra_op_threads=threads,
            spinning=settings.intra_op_spinning,
            parallel_runs=parallel_runs(settings),
        ),
        settings.worker_nice,
        "onnxruntime",
    )


def parallel_runs(settings: Settings) -> int:
    return settings.parallel_runs or available_cpus()


def _sample_jpeg(side: int) -> bytes:
    from io import BytesIO

    from PIL import Image

    buffer = BytesIO()
    Image.new("RGB", (side, side), (128, 128, 128)).save(buffer, format="JPEG")
    return buffer.getvalue()


async def _open_model(app: Starlette, settings: Settings) -> InferenceModel:
    # ``python -m server`` loads the model before uvicorn starts, to fail with a plain message.
    model: InferenceModel | None = getattr(app.state, "model", None)
    phases: StartupPhases = app.state.startup
    if model is not None:
        phases.end("uvicorn")  # since the model was loaded, before uvicorn started
        return model
    phases.end("boot")
    try:
        model = await asyncio.to_thread(load_served_model, settings)
        phases.end("model_load")
        return model
    except Exception as exc:
        # The process exits non-zero; the message names the file and what is wrong.
        logger.error("cannot serve: %s", exc)
        raise


def _batch_observer(server_metrics: ServerMetrics) -> Callable[[BatchStats], None]:
    """Per batch: its size, the model run, and each image's queue wait, decode and preprocess."""
    stages = server_metrics.stages
    inference, queue = stages["inference"], stages["queue"]
    decode, preprocess = stages["decode"], stages["preprocess"]

    def on_batch(stats: BatchStats) -> None:
        if stats.escalated:
            server_metrics.escalated.inc(stats.escalated)
        for reason, n in stats.not_escalated.items():
            server_metrics.not_escalated_series[reason].inc(n)
        if stats.size:  # a batch whose images all failed to decode ran nothing
            server_metrics.policy_series(stats.label).inc()
            server_metrics.batch_size.observe(stats.size)
            server_metrics.inference.observe(stats.run_s)
            inference.observe(stats.run_s)
        for wait in stats.queue_wait_s:
            server_metrics.queue_wait.observe(wait)
            queue.observe(wait)
        for prepared in stats.decoded:
            decode.observe(prepared.decode_s)
            preprocess.observe(prepared.preprocess_s)

    return on_batch


def _new_batcher(
    model: InferenceModel,
    settings: Settings,
    server_metrics: ServerMetrics,
    decode_pool: ThreadPoolExecutor,
) -> Batcher:
    pixels = Budget(settings.max_inflight_pixels, "decoded pixels")
    return Batcher(
        model.run,
        functools.partial(
            prepare,
            spec=model.contract.preprocessing,
            max_pixels=settings.max_pixels,
            pixels=pixels,
            wait_s=settings.max_pixels_wait_ms / 1000,
        ),
        decode_pool=decode_pool,
        max_batch_size=settings.max_batch_size,
        max_queue_delay_s=settings.max_queue_delay_ms / 1000,
        max_queue_size=settings.max_queue_size,
        on_batch=_batch_observer(server_metrics),
        on_abandoned=server_metrics.abandoned.inc,
        warm=model.warm,
        adaptive=bool(settings.adaptive_batch),
        run_label=lambda: model.last_policy,
        run_parallel=model.run_parallel if model.parallel is not None else None,
        parallel_runs=parallel_runs(settings),
        thread_initializer=worker_initializer(settings.worker_nice),
        escalate=_escalation(model, settings, pixels) if model.second is not None else None,
    )


def _escalation(model: InferenceModel, settings: Settings, pixels: Budget) -> Escalate:
    """A cascade's second step: its other views, if any, made from the upload as its first
    view was (the same pixel limit and decoded-pixels budget, never waited for: see
    ``InferenceModel.escalate``)."""
    view = functools.partial(view_array, max_pixels=settings.max_pixels, pixels=pixels)
    return functools.partial(model.escalate, view=view)


def _publish(app: Starlette, model: InferenceModel, batcher: Batcher, monitor: Monitor) -> None:
    """Hand the opened resources to the routes through ``app.state`` and the metrics."""
    settings: Settings = app.state.settings
    server_metrics: ServerMetrics = app.state.metrics
    contract = model.contract
    server_metrics.queue_images.set_function(lambda: batcher.admitted)
    server_metrics.batch_limit.set(batcher.batch_limit)
    for n, seconds in batcher.curve.items():
        server_metrics.seconds_per_image.labels(str(n)).set(seconds)
    server_metrics.parallel_runs.set(batcher.parallel_runs)
    server_metrics.parallel_batch_limit.set(batcher.parallel_limit)
    for n, seconds in batcher.parallel_curve.items():
        server_metrics.parallel_seconds_per_image.labels(str(n)).set(seconds)
    server_metrics.model_info.info(
        {
            "name": contract.model_name,
            "version": contract.model_version,
            "served_name": settings.served_model_name,
            "intra_op_threads": str(model.intra_op_threads),
        }
    )
    app.state.model = model
    app.state.contract = contract
    app.state.model_version = contract.model_version
    app.state.batcher = batcher
    app.state.monitor = monitor
    body_bytes = Budget(settings.max_inflight_bytes, "request bytes")
    app.state.predictor = Predictor(
        settings, contract, batcher, server_metrics, monitor, body_bytes
    )
    app.state.metadata_json = json.dumps(build_metadata(contract, settings)).encode()
    anonymous = build_metadata(contract, settings, locations=False)
    app.state.metadata_json_anonymous = json.dumps(anonymous).encode()
    app.state.openapi_json = json.dumps(openapi.build_spec(app, contract, settings)).encode()


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
    settings: Settings = app.state.settings
    phases: StartupPhases = app.state.startup
    model = await _open_model(app, settings)
    contract = model.contract
    decode_pool = ThreadPoolExecutor(
        max_workers=settings.decode_threads or available_cpus(),
        thread_name_prefix="decode",
        initializer=worker_initializer(settings.worker_nice),
    )
    batcher = _new_batcher(model, settings, app.state.metrics, decode_pool)
    await batcher.warmup(contract.input_size, _sample_jpeg(contract.input_size))
    phases.end("warmup")
    monitor = Monitor(settings, contract, app.state.registry)
    await monitor.start()
    batcher.start()
    _publish(app, model, batcher, monitor)
    lag = LoopLag(
        app.state.metrics.loop_lag,
        lambda: {"tasks": len(asyncio.all_tasks()), "queued_images": batcher.admitted},
    )
    lag.start()
    app.state.metrics.gc.start()  # the start-up heap frozen: short collections from now on
    returned = trim_heap()  # what start-up freed, back to the system (server/malloc.py)
    phases.end("services")
    for phase, seconds in phases.seconds.items():
        app.state.metrics.startup.labels(phase).set(seconds)
    # a signal during start-up (a drain begun while warming up) keeps /health/ready at 503: a
    # balancer must not put a replica into rotation that is about to stop accepting
    app.state.ready = not app.state.stopping
    logger.info(
        "ready" if app.state.ready else "started while stopping: /health/ready stays 503",
        extra={
            "fields": {
                # python -m server's address (uvicorn --factory's is uvicorn's own to say)
                "url": getattr(app.state, "url", None),
                "model": str(model.path),
                "model_version": contract.model_version,
                "intra_op_threads": model.intra_op_threads,
                "max_batch_size": settings.max_batch_size,
                "batch_limit": batcher.batch_limit,
                "seconds_per_image": {n: round(t, 6) for n, t in batcher.curve.items()},
                "parallel_runs": batcher.parallel_runs,
                "parallel_batch_limit": batcher.parallel_limit,
                "parallel_seconds_per_image": {
                    n: round(t, 6) for n, t in batcher.parallel_curve.items()
                },
                "startup_seconds": phases.seconds,
                "heap_returned_mb": None if returned is None else round(returned / 2**20, 1),
            }
        },
    )
    try:
        # uvicorn hands this state to every connection: the connection layer counts its
        # refusals there (server.protocol); Starlette copies it into each request's state too
        yield {REFUSAL_COUNTER: app.state.metrics.count_refusal}
    finally:
        app.state.ready = False
        await lag.stop()
        app.state.metrics.gc.stop()
        await batcher.stop()
        await monitor.stop()
        decode_pool.shutdown(wait=True)
        logger.info("stopped")


# ---------------------------------------------------------------------- factory
def create_app(settings: Settings | None = None) -> Starlette:
    # one malloc arena (server/malloc.py); python -m server has capped them already, this is for
    # uvicorn --factory, whose own threads keep theirs
    cap_arenas()
    settings = settings or Settings.from_env()
    configure_logging(settings.log_level)
    registry = CollectorRegistry()
    server_metrics = ServerMetrics(registry)
    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/health/live", live, methods=["GET"]),
        Route("/health/ready", ready, methods=["GET"]),
        Route("/predict", predict, methods=["POST"]),
        Route("/predict/batch", predict_batch, methods=["POST"]),
        Route("/metadata", metadata, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        *docs.routes(),
        *v2.routes,
        *monitor_routes.routes,
        *ui.routes,  # the page for people: GET / and /ui/*
    ]
    # the API's routes (every POST route: predictions, and feedback, whose success is a 201) are
    # exported from the start
    server_metrics.export_api_routes(
        [
            (r.path, "POST", 201 if r.path == "/feedback" else 200)
            for r in routes
            if isinstance(r, Route) and "POST" in (r.methods or ())
        ]
    )
    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(RequestContextMiddleware, metrics=server_metrics, hosts=settings.host_names)
        ],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.startup = StartupPhases()
    app.state.registry = registry
    app.state.metrics = server_metrics
    app.state.ready = False
    app.state.stopping = False  # an exit signal came (server.drain): never ready again
    return app
