"""The model and the dynamic batcher.

One ``onnxruntime.InferenceSession`` per process. ``session.run`` releases the GIL and runs on a
single dedicated thread, so the event loop never blocks and runs never compete for the cores
(the session's own intra-op pool uses them all). The batcher groups images that arrive while
the model is busy into one run; an image that finds the model idle and nothing else on its way
is run at once, so batching never adds latency to a lone request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from server.contract import INPUT_NAME, OUTPUT_PROBABILITIES, ContractError, ModelContract

logger = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The model file is missing, unreadable, not ONNX, or does not match its contract."""


class QueueFullError(RuntimeError):
    """More images are admitted than the queue may hold: the caller answers 503."""


class ModelStoppedError(RuntimeError):
    """The batcher is shutting down and takes no new work."""


@dataclass
class InferenceModel:
    """The loaded session with its contract. ``run`` is blocking: call it from a worker thread."""

    session: object  # onnxruntime.InferenceSession
    contract: ModelContract
    path: Path
    intra_op_threads: int

    def run(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) -> float32 probabilities (N, C)."""
        (probs,) = self.session.run([OUTPUT_PROBABILITIES], {INPUT_NAME: batch})
        return probs


def load_model(path: Path, *, intra_op_threads: int, spinning: bool = False) -> InferenceModel:
    """Open ``path`` as an ONNX session and read its contract; any failure names the file."""
    import onnxruntime as ort  # heavy: imported when a model is loaded, not with the module

    from server.registry import ModelFileError, load_model_file

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # onnxruntime's own warnings are noise in service logs
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    try:
        loaded = load_model_file(path, sess_options=options)
    except (ModelFileError, ContractError) as exc:
        raise ModelLoadError(str(exc)) from exc
    _check_signature(loaded.session, loaded.contract, path)
    return InferenceModel(loaded.session, loaded.contract, path, intra_op_threads)


def _check_signature(session: object, contract: ModelContract, path: Path) -> None:
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name for o in session.get_outputs()}
    spec = inputs.get(INPUT_NAME)
    if spec is None or spec.type != "tensor(uint8)" or len(spec.shape) != 4:
        raise ModelLoadError(f"{path}: needs a uint8 (batch, H, W, 3) input named {INPUT_NAME!r}")
    size = contract.input_size
    if list(spec.shape[1:]) != [size, size, 3]:
        raise ModelLoadError(f"{path}: input shape {spec.shape} does not match input_size {size}")
    if OUTPUT_PROBABILITIES not in outputs:
        raise ModelLoadError(f"{path}: no {OUTPUT_PROBABILITIES!r} output")


@dataclass(eq=False)
class Ticket:
    """Room reserved in the queue for one request's images."""

    images: int
    pending: int  # not yet handed to ``predict``


@dataclass(eq=False)
class _Job:
    images: list[np.ndarray]  # uint8 (H, W, 3) each
    future: asyncio.Future[np.ndarray]
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class BatchStats:
    size: int  # images in the run
    queue_wait_s: list[float]  # per job, from enqueue to the start of its run
    run_s: float


class Batcher:
    """Groups concurrent requests into batches of at most ``max_batch_size`` images.

    Admission (``admit``/``release``) bounds the images in the system, from the moment a request
    is accepted until it is answered, so an overloaded server refuses work before decoding it.
    """

    def __init__(
        self,
        run: Callable[[np.ndarray], np.ndarray],
        *,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_size: int,
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> None:
        self.run = run
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self.on_batch = on_batch
        self.admitted = 0  # images accepted and not yet answered
        self._incoming = 0  # admitted, still being read or decoded: they will join the queue
        self._queue: deque[_Job] = deque()
        self._queued_images = 0
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnxruntime")
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    # ------------------------------------------------------------------ admission
    def admit(self, n: int = 1) -> Ticket:
        """Reserve room for ``n`` images or raise; pair with :meth:`release` in a ``finally``."""
        if self._stopping:
            raise ModelStoppedError("the server is shutting down")
        if self.admitted + n > self.max_queue_size:
            raise QueueFullError(f"{self.admitted} images queued, limit {self.max_queue_size}")
        self.admitted += n
        self._incoming += n
        return Ticket(n, n)

    def release(self, ticket: Ticket) -> None:
        self.admitted -= ticket.images
        self._incoming -= ticket.pending  # images that never reached the queue (bad input)
        ticket.pending = 0
        ticket.images = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    async def stop(self) -> None:
        """Finish what is queued, then stop the loop and the inference thread."""
        self._stopping = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    def warmup(self) -> None:
        """One blocking run per batch size the batcher can form, before the server is ready."""
        size = self._input_side()
        for n in range(1, self.max_batch_size + 1):
            self.run(np.zeros((n, size, size, 3), dtype=np.uint8))

    def _input_side(self) -> int:
        model = getattr(self.run, "__self__", None)
        return model.contract.input_size if isinstance(model, InferenceModel) else 224

    # ------------------------------------------------------------------ inference
    async def predict(self, images: list[np.ndarray], ticket: Ticket) -> np.ndarray:
        """Probabilities (len(images), C) for images admitted under ``ticket``."""
        if self._task is None or self._task.done():
            raise ModelStoppedError("the batcher is not running")
        n = len(images)
        ticket.pending -= n
        self._incoming -= n
        loop = asyncio.get_running_loop()
        # A request larger than a batch is split, so no run exceeds the warmed-up sizes.
        futures = []
        for start in range(0, n, self.max_batch_size):
            chunk = images[start : start + self.max_batch_size]
            future: asyncio.Future[np.ndarray] = loop.create_future()
            self._queue.append(_Job(chunk, future))
            self._queued_images += len(chunk)
            futures.append(future)
        self._wakeup.set()
        if len(futures) == 1:
            return await futures[0]
        return np.concatenate(await asyncio.gather(*futures))

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._stopping:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._fill()
            jobs = self._take()
            if not jobs:
                continue
            images = [img for job in jobs for img in job.images]
            # A lone image needs no stacking copy: a view with a batch axis is enough.
            batch = images[0][None] if len(images) == 1 else np.stack(images)
            started = time.perf_counter()
            try:
                probs = await loop.run_in_executor(self._executor, self.run, batch)
            except Exception as exc:  # a failed run fails its requests, never the loop
                logger.exception("inference failed for a batch of %d", len(images))
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            run_s = time.perf_counter() - started
            offset = 0
            for job in jobs:
                n = len(job.images)
                if not job.future.done():
                    job.future.set_result(probs[offset : offset + n])
                offset += n
            if self.on_batch is not None:
                waits = [started - job.enqueued for job in jobs]
                self.on_batch(BatchStats(len(images), waits, run_s))

    async def _fill(self) -> None:
        """Wait briefly for more images, but only while others are known to be on their way.

        Requests being decoded right now (admitted, not yet queued) will join within a few
        milliseconds; with none of them, waiting would only add latency.
        """
        if self.max_batch_size == 1 or self.max_queue_delay_s <= 0:
            return
        deadline = self._queue[0].enqueued + self.max_queue_delay_s
        while (
            self._queued_images < self.max_batch_size and self._incoming > 0 and not self._stopping
        ):
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _take(self) -> list[_Job]:
        """Jobs for the next run: whole requests, up to ``max_batch_size`` images."""
        jobs: list[_Job] = []
        count = 0
        while self._queue:
            job = self._queue[0]
            if job.future.done():  # its caller gave up (deadline): skip the work
                self._queue.popleft()
                self._queued_images -= len(job.images)
                continue
            if jobs and count + len(job.images) > self.max_batch_size:
                break
            self._queue.popleft()
            self._queued_images -= len(job.images)
            jobs.append(job)
            count += len(job.images)
        return jobs
