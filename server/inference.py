"""The model and the dynamic batcher.

One ``onnxruntime.InferenceSession`` per process. Decoding and ``session.run`` (both release the
GIL) run on one dedicated thread (decoding fans out to a small pool), so the event loop never
blocks and runs never compete for the cores (the session's own intra-op pool uses them all).
The batcher groups requests that arrive while the model is busy into one batch; a request that
finds the model idle and nothing else on its way is worked on at once, so batching never adds
latency to a lone request.
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
from typing import Any, Protocol

import numpy as np

from catsdogs.contract import INPUT_NAME, OUTPUT_PROBABILITIES, ContractError, ModelContract

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
    # INTRA_OP_SPINNING=2: a second session whose pool threads spin, for lone images only
    lone_session: object | None = None

    def run(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) -> float32 probabilities (N, C)."""
        lone = self.lone_session is not None and len(batch) == 1
        session = self.lone_session if lone else self.session
        (probs,) = session.run([OUTPUT_PROBABILITIES], {INPUT_NAME: batch})
        return probs


SLEEP, SPIN, ADAPTIVE = 0, 1, 2  # INTRA_OP_SPINNING: what onnxruntime's idle pool threads do


def load_model(path: Path, *, intra_op_threads: int, spinning: int = SLEEP) -> InferenceModel:
    """Open ``path`` as an ONNX session and read its contract; any failure names the file.

    ``spinning``: SLEEP (idle pool threads block: they never take a core from decoding), SPIN
    (they spin-wait: a lone image starts sooner, busy cores suffer) or ADAPTIVE (two sessions:
    lone images run on a spinning one, batches on a sleeping one).
    """
    session, contract = _open_session(path, intra_op_threads, spinning == SPIN)
    lone = _open_session(path, intra_op_threads, True)[0] if spinning == ADAPTIVE else None
    return InferenceModel(session, contract, path, intra_op_threads, lone)


def _open_session(path: Path, threads: int, spinning: bool) -> tuple[object, ModelContract]:
    import onnxruntime as ort  # heavy: imported when a model is loaded, not with the module

    from catsdogs.modelfile import ModelFileError, load_model_file

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
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
    return loaded.session, loaded.contract


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


class Decoded(Protocol):
    """What ``prepare`` makes of one encoded image: at least the model input."""

    array: np.ndarray  # uint8 (H, W, 3)


# Per image: what ``prepare`` made of it with its row of probabilities, or why it failed
# (an ImageDecodeError for bad input; anything else is a server fault).
Outcome = tuple[Any, np.ndarray] | Exception


@dataclass(eq=False)
class _Job:
    blobs: list[bytes]  # encoded images
    future: asyncio.Future[list[Outcome]]
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class BatchStats:
    size: int  # images in the run
    queue_wait_s: list[float]  # per job, from enqueue to the start of its work
    decode_s: float  # the batch's decode phase, wall time
    run_s: float
    decoded: list[Any]  # what ``prepare`` made of each image that decoded


class Batcher:
    """Groups concurrent requests into batches of at most ``max_batch_size`` images.

    A batch is worked on by one thread in two phases: decode all its images (in parallel on the
    decode pool), then one ``session.run``. Decoding never overlaps a run, so the two never fight
    over the cores (onnxruntime's parallel sections stall when a decode thread preempts one of its
    workers), and a lone request costs a single thread hop.

    Admission (``admit``/``release``) bounds the images in the system, from the moment a request's
    body is in until it is answered. Bodies still arriving hold no queue slot (a slow client
    cannot starve others); they only tell ``_fill`` that more work is on its way.
    """

    def __init__(
        self,
        run: Callable[[np.ndarray], np.ndarray],
        prepare: Callable[[bytes], Decoded],
        *,
        decode_pool: ThreadPoolExecutor,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_size: int,
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> None:
        self.run = run
        self.prepare = prepare
        self.decode_pool = decode_pool
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self.on_batch = on_batch
        self.admitted = 0  # images accepted and not yet answered
        self._incoming = 0  # prediction requests whose body is arriving: they may join soon
        self._queue: deque[_Job] = deque()
        self._queued_images = 0
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
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
        return Ticket(n)

    def release(self, ticket: Ticket) -> None:
        self.admitted -= ticket.images
        ticket.images = 0  # released once, even if called again

    def body_started(self) -> None:
        """A prediction request started receiving its body (a hint for ``_fill``)."""
        self._incoming += 1

    def body_finished(self) -> None:
        self._incoming -= 1

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

    async def warmup(self, side: int, sample: bytes) -> None:
        """Before the server is ready: decode ``sample`` once and run every batch size once.

        On the inference thread itself, so the first request finds its thread, the decoder
        plugins and onnxruntime's buffers for each batch size all in place.
        """
        await asyncio.get_running_loop().run_in_executor(self._executor, self._warmup, side, sample)

    def _warmup(self, side: int, sample: bytes) -> None:
        self.prepare(sample)
        for n in range(1, self.max_batch_size + 1):
            self.run(np.zeros((n, side, side, 3), dtype=np.uint8))

    # ------------------------------------------------------------------ inference
    async def predict(self, blobs: list[bytes], ticket: Ticket) -> list[Outcome]:
        """Decode and classify encoded images admitted under ``ticket``; one outcome each."""
        if self._task is None or self._task.done():
            raise ModelStoppedError("the batcher is not running")
        n = len(blobs)
        loop = asyncio.get_running_loop()
        # A request larger than a batch is split, so no run exceeds the warmed-up sizes.
        futures = []
        for start in range(0, n, self.max_batch_size):
            chunk = blobs[start : start + self.max_batch_size]
            future: asyncio.Future[list[Outcome]] = loop.create_future()
            self._queue.append(_Job(chunk, future))
            self._queued_images += len(chunk)
            futures.append(future)
        self._wakeup.set()
        if len(futures) == 1:
            return await futures[0]
        return [o for part in await asyncio.gather(*futures) for o in part]

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
            blobs = [blob for job in jobs for blob in job.blobs]
            started = time.perf_counter()
            try:
                outcomes, decode_s, run_s = await loop.run_in_executor(
                    self._executor, self._work, blobs
                )
            except Exception as exc:  # a failed run fails its requests, never the loop
                logger.exception("inference failed for a batch of %d", len(blobs))
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            offset = 0
            for job in jobs:
                n = len(job.blobs)
                if not job.future.done():
                    job.future.set_result(outcomes[offset : offset + n])
                offset += n
            if self.on_batch is not None:
                good = [o[0] for o in outcomes if not isinstance(o, Exception)]
                waits = [started - job.enqueued for job in jobs]
                self.on_batch(BatchStats(len(good), waits, decode_s, run_s, good))

    def _decode(self, blob: bytes) -> Decoded | Exception:
        """Any failure stays with its own image, so one odd file never fails a whole batch."""
        try:
            return self.prepare(blob)
        except Exception as exc:
            return exc

    def _work(self, blobs: list[bytes]) -> tuple[list[Outcome], float, float]:
        """Blocking, on the inference thread: decode the batch, then one run."""
        started = time.perf_counter()
        if len(blobs) == 1:
            decoded = [self._decode(blobs[0])]
        else:
            decoded = list(self.decode_pool.map(self._decode, blobs))
        good = [d for d in decoded if not isinstance(d, Exception)]
        decoded_at = time.perf_counter()
        if not good:
            return decoded, decoded_at - started, 0.0
        # A lone image needs no stacking copy: a view with a batch axis is enough.
        batch = good[0].array[None] if len(good) == 1 else np.stack([d.array for d in good])
        probs = self.run(batch)
        run_s = time.perf_counter() - decoded_at
        rows = iter(probs)
        outcomes: list[Outcome] = [
            d if isinstance(d, Exception) else (d, next(rows)) for d in decoded
        ]
        return outcomes, decoded_at - started, run_s

    async def _fill(self) -> None:
        """Wait briefly for more images, but only while others are known to be on their way.

        Requests whose bodies are arriving right now join within a few milliseconds; with none
        of them, waiting would only add latency (a lone request never waits).
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
        """Jobs for the next batch: whole requests, up to ``max_batch_size`` images."""
        jobs: list[_Job] = []
        count = 0
        while self._queue:
            job = self._queue[0]
            if job.future.done():  # its caller gave up (deadline): skip the work
                self._queue.popleft()
                self._queued_images -= len(job.blobs)
                continue
            if jobs and count + len(job.blobs) > self.max_batch_size:
                break
            self._queue.popleft()
            self._queued_images -= len(job.blobs)
            jobs.append(job)
            count += len(job.blobs)
        return jobs
