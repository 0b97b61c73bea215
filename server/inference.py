"""The model and the dynamic batcher.

The model's sessions are opened once per process. Decoding and ``session.run`` (both release
the GIL) run off the event loop, in one of two modes:

- alone: a request that finds the server idle runs on one dedicated thread, its model run using
  every core (the session's intra-op pool), so a lone image is answered as fast as the machine
  allows;
- parallel (``parallel_runs`` > 1): while several requests are in the server, up to
  ``parallel_runs`` batches run at once, each decoding its own images and running them on a
  one-thread session, one core each. No core waits for another inside a run (an intra-op pool
  synchronises at every operator, and a decode or the event loop preempting one of its threads
  stalls the run), so under load the cores do more images per second (README, "Load tests
  and benchmarks").

The batcher groups requests that arrive while the model is busy into batches; a request that
finds the model idle and nothing else on its way is worked on at once, so batching never adds
latency to a lone request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol

import numpy as np

from catsdogs.cascade import contract_views, first_step, second_feed, second_step, threshold
from catsdogs.contract import (
    CASCADE_BELOW,
    INPUT_NAME,
    OUTPUT_PROBABILITIES,
    ContractError,
    ModelContract,
)
from catsdogs.preprocessing import ImageDecodeError, PreprocessSpec
from server.limits import OverBudgetError
from server.threads import name_os_thread

logger = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The model file is missing, unreadable, not ONNX, or does not match its contract."""


class QueueFullError(RuntimeError):
    """More images are admitted than the queue may hold: the caller answers 503."""


class ModelStoppedError(RuntimeError):
    """The batcher is shutting down and takes no new work."""


class RequestAbandonedError(RuntimeError):
    """The image's request stopped waiting (its deadline, or its client hung up) before the
    image was decoded or run: its work was skipped, and the request has nobody to answer."""


SLEEP, SPIN, AUTO = 0, 1, 2  # INTRA_OP_SPINNING: what onnxruntime's pool threads do between ops

# AUTO keeps this many recent lone-image run times per policy, and tries the policy it is not
# using once every EXPLORE_EVERY runs, so a change in the machine's load (another process
# taking a core) flips the choice within a few dozen runs.
WINDOW = 16
EXPLORE_EVERY = 16


class PolicyChooser:
    """Picks, for lone images, the faster of two thread policies, by measuring both.

    Spinning pool threads start each parallel section sooner (a lone image gains about a
    millisecond on a quiet machine) but lose badly when another process wants the cores;
    sleeping threads are the safe choice under contention. Which one wins is a property of the
    machine at the moment, so it is measured: each lone run's time is recorded, the policy with
    the lower median of its last ``WINDOW`` runs is used, and the other one is tried once every
    ``EXPLORE_EVERY`` runs, so the choice follows the machine's load.
    """

    def __init__(self, policies: tuple[str, ...]) -> None:
        self.policies = policies
        self._times: dict[str, deque[float]] = {p: deque(maxlen=WINDOW) for p in policies}
        self._runs = 0

    def choose(self) -> str:
        if len(self.policies) == 1:
            return self.policies[0]
        self._runs += 1
        for policy in self.policies:  # every policy gets a few runs before medians count
            if len(self._times[policy]) < 3:
                return policy
        ranked = sorted(self.policies, key=self._median)
        return ranked[1] if self._runs % EXPLORE_EVERY == 0 else ranked[0]

    def record(self, policy: str, seconds: float) -> None:
        self._times[policy].append(seconds)

    def preferred(self) -> str | None:
        """The policy lone images use now; None while still measuring."""
        if any(len(self._times[p]) < 3 for p in self.policies):
            return None
        return min(self.policies, key=self._median)

    def _median(self, policy: str) -> float:
        return float(np.median(self._times[policy]))


class Escalation(NamedTuple):
    """What a cascade's second step made of a batch (``InferenceModel.escalate``)."""

    probs: np.ndarray  # the batch's answers, the escalated rows' replaced
    sent: int  # rows that went through the second step
    # rows the first model was unsure of that kept its answer, by reason (ESCALATION_SKIPS in
    # server/metrics.py: "pixels", "decode")
    skipped: Mapping[str, int] = MappingProxyType({})


@dataclass
class InferenceModel:
    """The loaded session(s) with the contract. ``run`` is blocking: call it from one thread.

    One session per thread policy in use (``sessions``: policy name -> session). With two
    (INTRA_OP_SPINNING=2), ``chooser`` picks one for each lone image, and batches run on the
    sleeping one: a batch's parallel sections are long enough that waking threads costs little,
    and the spinning session then needs buffers for one image only (about 40 MB less).
    """

    sessions: dict[str, object]  # onnxruntime.InferenceSession per policy ("sleep", "spin")
    contract: ModelContract
    path: Path
    intra_op_threads: int
    chooser: PolicyChooser
    last_policy: str = ""
    # a one-thread session for parallel runs (``run_parallel``); None with parallel_runs <= 1
    parallel: object | None = None
    # a cascade file (export.cascade): the sessions above run its first step alone
    # (catsdogs.cascade.first_step: the first model, whatever its answers), so warm-up and the
    # batch curves time the path most images take; this one runs its second step alone
    # (second_step), for the rows the first model is unsure of (``escalate``), fed the first
    # step's answers as ``first_answers``
    second: object | None = None
    first_answers: str = ""
    # ... whose other models may take views of their own (catsdogs.cascade): input -> how to
    # prepare it, only for the photos the first model is unsure of
    views: dict[str, PreprocessSpec] = field(default_factory=dict)
    below: float = 0.0  # the file's own threshold (its cascade/below), which its contract repeats

    @property
    def cascade(self) -> bool:
        return self.second is not None

    def _second_feed(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """What warm-up feeds the second step: answers of 0.5 and blank views, every row on."""
        answers = np.full((len(batch), len(self.contract.class_names)), 0.5, np.float32)
        views = {
            name: np.zeros((len(batch), spec.input_size, spec.input_size, 3), np.uint8)
            for name, spec in self.views.items()
        }
        return second_feed(self.first_answers, batch, answers, views)

    def escalate(
        self,
        probs: np.ndarray,
        batch: np.ndarray,
        blobs: list[bytes],
        view: Callable[[bytes, PreprocessSpec], np.ndarray],
    ) -> Escalation:
        """A cascade's second step.

        ``probs``: the first step's answers to ``batch``; ``blobs``: the encoded images of its
        rows. The rows the first model is unsure of (the file's own test: top probability under
        its threshold, in float32) go through the file's second step (``second``) with those
        answers, and with their other views made by ``view`` where its other models take views
        of their own; the first model does not run again. Their answers replace the first's. The
        second session serves alone and parallel runs alike, on every core (a rare path: about
        one photo in twenty on the default cascade).

        A row whose view cannot be made keeps the first model's answer, logged and counted in
        ``Escalation.skipped`` by reason: ``pixels``, the decoded-pixels budget full, or
        ``decode``, the view refused where the first was not (a JPEG decoded at a larger scale
        for a larger view can pass ``MAX_PIXELS``). The server's ``view`` does not wait for room
        in the budget (``server.service.view_array``), as a first decode does: this runs on the
        batch's thread after its model run, so a wait would hold every answer of the batch, and
        the thread, for other batches' decodes (about 0.35 s for one 40 MP PNG) to improve a few
        uncertain answers; under that load a skip, counted, is the cheaper loss. Only parallel
        runs can find the budget full here: a batch running alone has released its own pixels,
        and no other batch decodes meanwhile.
        """
        if self.second is None:
            return Escalation(probs, 0)
        rows = np.flatnonzero(probs.max(axis=1) < np.float32(self.below))
        if not len(rows):
            return Escalation(probs, 0)
        kept: list[int] = []
        skipped: dict[str, int] = {}
        made: dict[str, list[np.ndarray]] = {name: [] for name in self.views}
        for i in rows.tolist():
            try:
                arrays = {name: view(blobs[i], spec) for name, spec in self.views.items()}
            except (OverBudgetError, ImageDecodeError) as exc:
                # the budget full under load (the image decoded once already); anything else is
                # a server fault, never a silently different answer
                reason = "pixels" if isinstance(exc, OverBudgetError) else "decode"
                skipped[reason] = skipped.get(reason, 0) + 1
                logger.warning(
                    "cascade: image %d not escalated (%s), its view failed: %s", i, reason, exc
                )
                continue
            kept.append(i)
            for name, array in arrays.items():
                made[name].append(array)
        if not kept:
            return Escalation(probs, 0, skipped)
        views = {n: np.stack(a) for n, a in made.items()}
        feed = second_feed(self.first_answers, batch[kept], probs[kept], views)
        (again,) = self.second.run([OUTPUT_PROBABILITIES], feed)  # type: ignore[attr-defined]
        out = probs.copy()
        out[kept] = again
        return Escalation(out, len(kept), skipped)

    @property
    def batch_policy(self) -> str:
        return "sleep" if "sleep" in self.sessions else next(iter(self.sessions))

    def run(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) -> float32 probabilities (N, C): a cascade's first step only."""
        lone = len(batch) == 1
        policy = self.chooser.choose() if lone else self.batch_policy
        started = time.perf_counter()
        (probs,) = self.sessions[policy].run([OUTPUT_PROBABILITIES], {INPUT_NAME: batch})
        if lone:
            self.chooser.record(policy, time.perf_counter() - started)
        self.last_policy = policy
        return probs

    def run_parallel(self, batch: np.ndarray) -> np.ndarray:
        """Like ``run``, on the one-thread session: safe to call from several threads at once."""
        assert self.parallel is not None, "opened without parallel runs"
        (probs,) = self.parallel.run([OUTPUT_PROBABILITIES], {INPUT_NAME: batch})
        return probs

    def warm(self, batch: np.ndarray) -> None:
        """Run ``batch`` once on each session that will see its size, before any traffic.

        A cascade: lone images on its second session too, so the later models' weights are
        prepacked before a request needs them (the escalated path costs several times the sure
        one: warming every size of it would double the time to ready for sub-batches whose size
        traffic picks anyway).
        """
        lone = len(batch) == 1
        sessions = [s for p, s in self.sessions.items() if lone or p == self.batch_policy]
        if self.parallel is not None:
            sessions.append(self.parallel)
        for session in sessions:
            session.run([OUTPUT_PROBABILITIES], {INPUT_NAME: batch})
        if lone and self.second is not None:
            self.second.run([OUTPUT_PROBABILITIES], self._second_feed(batch))


POLICIES = {SLEEP: ("sleep",), SPIN: ("spin",), AUTO: ("sleep", "spin")}


def load_model(
    path: Path, *, intra_op_threads: int, spinning: int = AUTO, parallel_runs: int = 1
) -> InferenceModel:
    """Open ``path`` as an ONNX session and read its contract; any failure names the file.

    ``spinning``: SLEEP (idle pool threads block: they never take a core from anything else),
    SPIN (they spin-wait between the operators of a run, and stop when the run ends) or AUTO
    (one session of each; :class:`PolicyChooser` measures which is faster for lone images).
    ``parallel_runs`` > 1 also opens a one-thread session that several threads run at once.
    """
    if spinning not in POLICIES:
        raise ValueError(f"spinning must be one of {sorted(POLICIES)}, not {spinning!r}")
    with _session_maker(path) as opened:
        first, later = opened.first, opened.second
        # the largest first: the buffers it frees once open are there for the others
        second = later(intra_op_threads, False) if later is not None else None
        sessions = {p: first(intra_op_threads, p == "spin") for p in POLICIES[spinning]}
        parallel = first(1, False) if parallel_runs > 1 else None
    chooser = PolicyChooser(POLICIES[spinning])
    contract, overridable = opened.contract, opened.overridable
    entry = contract.extra.get("cascade") or {}
    if not isinstance(entry, dict):
        raise ModelLoadError(f"{path}: the contract's cascade is not an object")
    try:
        views = contract_views(entry)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelLoadError(f"{path}: the contract's cascade.views is malformed: {exc}") from exc
    for name, spec in views.items():
        info = overridable.get(name)
        if info is None or list(info.shape[1:]) != [spec.input_size, spec.input_size, 3]:
            raise ModelLoadError(
                f"{path}: the contract's view {name!r} ({spec.input_size} px) is not an input"
                " of the file"
            )
    below = 0.0
    if opened.below is not None:  # a cascade: its contract states the file's own threshold
        stated = entry.get("below")
        if isinstance(stated, bool) or not isinstance(stated, int | float):
            raise ModelLoadError(f"{path}: a cascade file whose contract has no cascade.below")
        if np.float32(stated) != np.float32(opened.below):
            raise ModelLoadError(
                f"{path}: the contract's cascade.below ({stated}) is not the file's own"
                f" threshold ({opened.below:.6g})"
            )
        below = opened.below
    model = InferenceModel(
        sessions,
        contract,
        path,
        intra_op_threads,
        chooser,
        parallel=parallel,
        views=views,
        below=below,
        second=second,
        first_answers=opened.answers,
    )
    _check_answers(model, path)
    return model


def _check_answers(model: InferenceModel, path: Path) -> None:
    """One blank image through every step: each must answer one probability per class the
    contract names. The file's declared output shape may leave that width open (a cascade's
    does), and a contract with one class more or less than the model answers would otherwise
    pass every check and fail each request with a 500."""
    side, classes = model.contract.input_size, len(model.contract.class_names)
    blank = np.zeros((1, side, side, 3), np.uint8)
    steps = [("the model", next(iter(model.sessions.values())), {INPUT_NAME: blank})]
    if model.second is not None:
        steps.append(("its second step", model.second, model._second_feed(blank)))
    for what, session, feed in steps:
        try:
            (probs,) = session.run([OUTPUT_PROBABILITIES], feed)  # type: ignore[attr-defined]
        except Exception as exc:  # onnxruntime's own errors: a feed the graph does not take
            raise ModelLoadError(f"{path}: {what} fails on a blank image: {exc}") from exc
        if probs.shape != (1, classes):
            raise ModelLoadError(
                f"{path}: {what} answers {OUTPUT_PROBABILITIES!r} of shape"
                f" {list(probs.shape)} for one image; the contract names {classes} classes"
                f" ({', '.join(model.contract.class_names)})"
            )
        row = probs[0].astype(np.float64)
        if not (np.isfinite(row).all() and (row >= 0).all() and abs(row.sum() - 1) <= 1e-3):
            # NaN weights (a broken second step answers only the photos it is given: 500s)
            raise ModelLoadError(
                f"{path}: {what} answers {OUTPUT_PROBABILITIES!r} {row.tolist()} for a blank"
                " image: not probabilities (NaN, infinite, negative or not summing to 1)"
            )


_shared_arena = False
_arena_lock = threading.Lock()


def _share_arena(ort: Any) -> None:
    """Register one CPU arena for the whole process, once; sessions opt in to it.

    Each session otherwise keeps its own arena, sized by the largest batch it ever ran: with a
    latency session, a sleeping one and a one-thread session for parallel runs, that was about
    90 MB of RSS more than one shared arena (measured on Lite0, batches 1-4).
    """
    global _shared_arena
    with _arena_lock:
        if _shared_arena:
            return
        cpu = ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR
        info = ort.OrtMemoryInfo("Cpu", cpu, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
        _shared_arena = True


def _options(ort: Any, threads: int, spinning: bool) -> Any:
    _share_arena(ort)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.use_env_allocators", "1")
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # onnxruntime's own warnings are noise in service logs
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    # spin only while a run is active: between requests the threads sleep and cost nothing
    options.add_session_config_entry("session.force_spinning_stop", "1")
    return options


# A session maker: (intra-op threads, spinning) -> an onnxruntime session
OpenSession = Callable[[int, bool], object]
CPU = ["CPUExecutionProvider"]


# What ``_session_maker``'s child process runs: the graph in file argv[1] optimised, saved to
# argv[2] in onnxruntime's own format
OPTIMIZE = """
import sys
import onnxruntime as ort
options = ort.SessionOptions()
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
options.intra_op_num_threads = 1
options.log_severity_level = 3
options.optimized_model_filepath = sys.argv[2]
options.add_session_config_entry("session.save_model_format", "ORT")
ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
"""
OPTIMIZE_TIMEOUT_S = 300


class _Opened(NamedTuple):
    """What ``_session_maker`` yields: a checked file's contract and session makers."""

    contract: ModelContract
    overridable: dict[str, Any]  # its overridable initializers (name -> onnxruntime NodeArg)
    first: OpenSession  # sessions of its first model (a cascade: its first step)
    second: OpenSession | None  # a cascade: sessions of its second step; else None
    answers: str  # a cascade: the second step's input for the first model's answers
    below: float | None  # a cascade: the file's own threshold; else None


@contextlib.contextmanager
def _session_maker(path: Path) -> Iterator[_Opened]:
    """Check ``path`` and yield its contract and the makers of its sessions (:class:`_Opened`),
    which work until the context exits.

    Each graph is optimised once and saved in onnxruntime's own format to a file in memory;
    every session is opened from that without optimising it again. A session that optimises a
    graph itself keeps both the weights it loaded and their rewritten copies (the optimiser puts
    convolution weights into a blocked layout): a 50 MB cascade file took 110 MB in each of the
    server's sessions, 53 MB opened from its optimised graph. Each model's weights are held
    once: the sessions of the first step (``first_step``, 13.6 MB of that file) hold the first
    model's, the one of the second step (``second_step``, 36 MB) the others'. The second step is
    optimised in a child process, while this one opens the first step: optimising it here would
    leave this process's heap about 150 MB larger for good (freed, not given back to the
    system).
    """
    import onnxruntime as ort  # heavy: imported when a model is loaded, not with the module

    from catsdogs.modelfile import ModelFileError, load_model_file

    unreadable = ""  # why the file's steps could not be made, if they could not
    later: tuple[bytes, str] | None = None
    below: float | None = None
    try:
        data = path.read_bytes()
        step = first_step(data)
        if step is not None:
            later, below = second_step(data), threshold(data)
    except (OSError, ValueError) as exc:  # load_model_file names what is wrong with the file
        step, later, below, unreadable = None, None, None, str(exc)
    finally:
        data = b""  # 50 MB for a cascade: not kept while the sessions open
    with contextlib.ExitStack() as stack:
        child: subprocess.Popen[bytes] | None = None
        answers = ""
        if later is not None:  # the child optimises the second step while this opens the first
            (graph, answers), later = later, None
            child, later_ort = _optimise_in_child(stack, graph)
            del graph
        first_ort, _ = _scratch(stack, ".ort")
        options = _options(ort, 1, False)
        options.optimized_model_filepath = first_ort
        options.add_session_config_entry("session.save_model_format", "ORT")
        try:  # the file checked (a cascade: its first step, which has the same contract)
            loaded = load_model_file(path, sess_options=options, source=step)
        except (ModelFileError, ContractError) as exc:
            raise ModelLoadError(str(exc)) from exc
        _check_signature(loaded.session, loaded.contract, path)
        contract = loaded.contract
        inputs = {i.name: i for i in loaded.session.get_overridable_initializers()}
        del loaded  # holds its own copies of the weights
        if step is None and CASCADE_BELOW in inputs:  # a cascade whose If is not export's
            raise ModelLoadError(
                f"{path}: a cascade file whose steps cannot be split: {unreadable}"
            )
        second = None
        if child is not None:
            _wait_optimised(child, path)
            second = _saved(ort, later_ort)
        yield _Opened(contract, inputs, _saved(ort, first_ort), second, answers, below)


def _scratch(stack: contextlib.ExitStack, suffix: str) -> tuple[str, int]:
    """A file in memory (Linux) or else a temporary one, removed when ``stack`` closes: its
    path, and an fd to pass on (-1: none). onnxruntime reads a path ending in .ort as its own
    format."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create(f"catsdogs-model{suffix}", 0)
        stack.callback(os.close, fd)
        return f"/proc/self/fd/{fd}", fd
    fd, name = tempfile.mkstemp(suffix=suffix)
    os.close(fd)
    stack.callback(Path(name).unlink, missing_ok=True)
    return name, -1


def _optimise_in_child(
    stack: contextlib.ExitStack, graph: bytes
) -> tuple[subprocess.Popen[bytes], str]:
    """Start a child process that optimises ``graph`` (an ONNX model) and saves it in
    onnxruntime's format; returns the child (reaped when ``stack`` closes) and the saved file's
    path."""
    source, source_fd = _scratch(stack, ".onnx")
    # a copy of the memfd's descriptor is closed after the write, the memfd stays open
    with open(os.dup(source_fd) if source_fd >= 0 else source, "wb") as out:
        out.write(graph)
    saved, fd = _scratch(stack, ".ort")
    child = subprocess.Popen(
        [sys.executable, "-c", OPTIMIZE, source, saved],
        pass_fds=tuple(f for f in (source_fd, fd) if f >= 0),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    stack.callback(_reap, child)
    _children.add(child)
    stack.callback(_children.discard, child)
    return child, saved


def _wait_optimised(child: subprocess.Popen[bytes], path: Path) -> None:
    """Wait for :func:`_optimise_in_child`'s child; :class:`ModelLoadError` if it failed."""
    try:
        _, error = child.communicate(timeout=OPTIMIZE_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise ModelLoadError(f"{path}: optimising the cascade took over {exc.timeout} s") from exc
    if child.returncode != 0:
        last = error.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise ModelLoadError(f"{path}: optimising the cascade failed: {last[0][:300]}")


def _saved(ort: Any, graph: str) -> OpenSession:
    """The maker of sessions of a graph that ``_session_maker`` optimised and saved."""

    def open_saved(threads: int, spinning: bool) -> object:
        options = _options(ort, threads, spinning)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.add_session_config_entry("session.load_model_format", "ORT")
        return ort.InferenceSession(graph, options, providers=CPU)

    return open_saved


# Child processes a model load is waiting for (the cascade's optimiser); see stop_children.
_children: set[subprocess.Popen[bytes]] = set()


def stop_children() -> None:
    """Kill the child processes of loads in progress: ``python -m server``'s SIGTERM handler
    during start-up. The load waiting for a child then fails at once and its thread unwinds,
    reaping it, instead of the whole optimisation running to its end first."""
    for child in list(_children):
        with contextlib.suppress(OSError):
            child.kill()


def _reap(child: subprocess.Popen[bytes]) -> None:
    if child.poll() is None:
        child.kill()
    child.wait()


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


# A larger batch must save at least this share of the best time per image to be worth its wait.
BATCH_TOLERANCE = 0.05


def batch_limit(curve: dict[int, float]) -> int:
    """The smallest batch size whose time per image is within BATCH_TOLERANCE of the best.

    Past that size a batch only makes its images wait longer: on 2 cores EfficientNet-Lite0's
    time per image stops falling at 2-4 images.
    """
    best = min(curve.values())
    return min(n for n, seconds in curve.items() if seconds <= best * (1 + BATCH_TOLERANCE))


@dataclass(eq=False)
class Ticket:
    """Room reserved in the queue for one request's images, and their work once queued."""

    images: int
    jobs: list[_Job] = field(default_factory=list)


class Decoded(Protocol):
    """What ``prepare`` makes of one encoded image: at least the model input."""

    array: np.ndarray  # uint8 (H, W, 3)


# A cascade's second step: (probabilities, batch, its rows' encoded images) -> its Escalation
# (InferenceModel.escalate with its view maker bound)
Escalate = Callable[[np.ndarray, np.ndarray, list[bytes]], Escalation]

# Per image: what ``prepare`` made of it with its row of probabilities, or why it failed
# (an ImageDecodeError for bad input; anything else is a server fault).
Outcome = tuple[Any, np.ndarray] | Exception


@dataclass(eq=False)
class _Job:
    blobs: list[bytes]  # encoded images
    future: asyncio.Future[list[Outcome]]
    enqueued: float = field(default_factory=time.perf_counter)
    # set on the event loop when the request stops waiting for the answer (its deadline, its
    # client gone), read by the batch's thread: what it has not started of the images, it skips
    abandoned: bool = False


@dataclass(frozen=True)
class BatchStats:
    size: int  # images in the run
    queue_wait_s: list[float]  # per job, from enqueue to the start of its work
    run_s: float
    decoded: list[Any]  # what ``prepare`` made of each image that decoded
    label: str = ""  # the thread policy it ran on ("spin", "sleep" or "parallel")
    escalated: int = 0  # images sent to a cascade's second step (with their other views)
    # images a cascade's first model was unsure of that kept its answer, by reason (Escalation)
    not_escalated: Mapping[str, int] = field(default_factory=dict)


class Batcher:
    """Groups concurrent requests into batches of at most ``max_batch_size`` images.

    Alone (the default mode, and the only one with ``parallel_runs`` 1), a batch is worked on by
    one thread in two phases: decode all its images (in parallel on the decode pool), then one
    ``session.run`` on every core. Decoding never overlaps a run, so the two never fight over
    the cores (onnxruntime's parallel sections stall when a decode thread preempts one of its
    workers), and a lone request costs a single thread hop.

    Parallel: from the moment a request arrives while another is in the server until the server
    is idle again, up to ``parallel_runs`` batches run at once, each on its own thread, decoding
    its images and running them on ``run_parallel`` (one core). A lone request never runs in
    parallel mode, and the modes never overlap: the one running finishes first.

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
        on_abandoned: Callable[[int], None] | None = None,
        warm: Callable[[np.ndarray], object] | None = None,
        adaptive: bool = False,
        run_label: Callable[[], str] | None = None,
        run_parallel: Callable[[np.ndarray], np.ndarray] | None = None,
        parallel_runs: int = 1,
        thread_initializer: Callable[[], None] = name_os_thread,
        escalate: Escalate | None = None,
    ) -> None:
        self.run = run
        # a cascade's second step on the rows it escalates (InferenceModel.escalate), if any
        self.escalate = escalate
        self.run_label = run_label
        self.run_parallel = run_parallel
        self.parallel_runs = parallel_runs if run_parallel is not None else 1
        self.parallel_limit = max_batch_size  # parallel mode's batch limit (see calibrate)
        self.parallel_curve: dict[int, float] = {}
        self._parallel = False  # the mode of the next batch (see predict)
        self.warm = warm or run  # warm-up runs: not timed as traffic (see InferenceModel.warm)
        # adaptive: batches stop growing where the warm-up's measured time per image stops
        # falling (see calibrate); otherwise max_batch_size is the limit
        self.adaptive = adaptive
        self.batch_limit = max_batch_size
        self.curve: dict[int, float] = {}  # batch size -> measured seconds per image
        self.prepare = prepare
        self.decode_pool = decode_pool
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self.on_batch = on_batch
        # images skipped because their request stopped waiting (see abandon)
        self.on_abandoned = on_abandoned
        self.admitted = 0  # images accepted and not yet answered
        self._incoming = 0  # prediction requests whose body is arriving: they may join soon
        self._queue: deque[_Job] = deque()
        self._queued_images = 0
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="inference", initializer=thread_initializer
        )
        self._parallel_pool = (
            ThreadPoolExecutor(
                max_workers=self.parallel_runs,
                thread_name_prefix="parallel",
                initializer=thread_initializer,
            )
            if self.parallel_runs > 1
            else None
        )
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        # batches handed to a thread and not yet done, each with its mode (True: parallel).
        # At most two per thread, the one running and the next, so a thread never waits for
        # the event loop between batches.
        self._in_flight: dict[asyncio.Task[None], bool] = {}

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

    def abandon(self, ticket: Ticket) -> None:
        """Nobody waits for the answer of ``ticket``'s request any more (its client hung up):
        its room in the queue is free at once, what has not started of its images is skipped,
        and ``predict`` returns with :class:`RequestAbandonedError` for each skipped image."""
        self.release(ticket)
        for job in ticket.jobs:
            job.abandoned = True
        self._wakeup.set()  # queued, they are answered at the next batch's forming

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
        if self._in_flight:
            await asyncio.gather(*self._in_flight)
        self._executor.shutdown(wait=True)
        if self._parallel_pool is not None:
            self._parallel_pool.shutdown(wait=True)

    async def warmup(self, side: int, sample: bytes) -> None:
        """Before the server is ready: decode ``sample`` once and run every batch size once.

        On the inference thread itself, so the first request finds its thread, the decoder
        plugins and onnxruntime's buffers for each batch size all in place.
        """
        await asyncio.get_running_loop().run_in_executor(self._executor, self._warmup, side, sample)

    def _warmup(self, side: int, sample: bytes) -> None:
        self.prepare(sample)
        for n in range(1, self.max_batch_size + 1):
            self.warm(np.zeros((n, side, side, 3), dtype=np.uint8))
        if self.adaptive and self.max_batch_size > 1:
            self.curve = self._measure_curve(self.run, side)
            self.batch_limit = batch_limit(self.curve)
            if self.run_parallel is not None and self._parallel_pool is not None:
                # timed alone, two rounds: timing the threads at once sized the shared arena
                # for two concurrent batches of every size (+30 MB RSS) and saved no time
                self.parallel_curve = self._measure_curve(self.run_parallel, side, rounds=2)
                self.parallel_limit = batch_limit(self.parallel_curve)

    def _measure_curve(
        self, run: Callable[[np.ndarray], np.ndarray], side: int, rounds: int = 3
    ) -> dict[int, float]:
        """Seconds per image of ``run`` at each batch size up to ``max_batch_size``: the best of
        ``rounds`` runs, sizes interleaved so a passing load spike hits all of them alike."""
        best = dict.fromkeys(range(1, self.max_batch_size + 1), float("inf"))
        batches = {n: np.zeros((n, side, side, 3), dtype=np.uint8) for n in best}
        for _ in range(rounds):
            for n, batch in batches.items():
                started = time.perf_counter()
                run(batch)
                best[n] = min(best[n], (time.perf_counter() - started) / n)
        return best

    # ------------------------------------------------------------------ inference
    async def predict(self, blobs: list[bytes], ticket: Ticket) -> list[Outcome]:
        """Decode and classify encoded images admitted under ``ticket``; one outcome each."""
        if self._task is None or self._task.done():
            raise ModelStoppedError("the batcher is not running")
        n = len(blobs)
        loop = asyncio.get_running_loop()
        # The mode follows who else is here: a request that finds nothing queued or running
        # (a lone client) runs alone on every core; one that finds company, or brings more
        # images than one batch holds, switches the server to parallel runs until it is idle.
        company = bool(self._in_flight or self._queue) or n > self.batch_limit
        self._parallel = self.parallel_runs > 1 and company
        # A request larger than a batch is split, so no run exceeds the warmed-up sizes.
        jobs = ticket.jobs
        for start in range(0, n, self.batch_limit):
            chunk = blobs[start : start + self.batch_limit]
            job = _Job(chunk, loop.create_future())
            self._queue.append(job)
            self._queued_images += len(chunk)
            jobs.append(job)
        self._wakeup.set()
        try:
            if len(jobs) == 1:
                return await jobs[0].future
            return [o for part in await asyncio.gather(*(j.future for j in jobs)) for o in part]
        except BaseException:
            # the caller's deadline (a 504), or one part of a split request failed (a 500):
            # nobody waits for the rest. Queued, its images are dropped; in a batch that has
            # begun, what has not started of them is skipped (``_work``)
            for job in jobs:
                job.abandoned = True
            raise

    async def _loop(self) -> None:
        while True:
            if not self._queue or not self._may_take():
                if self._stopping and not self._queue:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            parallel = self._parallel
            if not self._in_flight and not parallel:
                await self._fill()
            self._dispatch(parallel)

    def _dispatch(self, parallel: bool) -> None:
        """Form the next batch and hand it to its thread now; a task answers its requests."""
        jobs = self._take(self.parallel_limit if parallel else self.batch_limit)
        if not jobs:
            return
        blobs = [blob for job in jobs for blob in job.blobs]
        owners = [job for job in jobs for _ in job.blobs]
        pool = self._parallel_pool if parallel else self._executor
        work = asyncio.get_running_loop().run_in_executor(pool, self._work, blobs, parallel, owners)
        task = asyncio.create_task(self._process(jobs, blobs, work), name="batch")
        self._in_flight[task] = parallel
        task.add_done_callback(self._batch_done)

    def _may_take(self) -> bool:
        """Whether the next batch may be formed now.

        Parallel mode: while fewer than ``parallel_runs`` parallel batches run, plus one queued
        behind each (a thread that finishes one starts the next without waiting for the event
        loop), and no batch that runs alone (it has every core: it finishes first).

        Alone: with the model idle, at once (``_fill`` then decides how long to wait). With a
        batch running, only a full batch goes next, queued on the inference thread behind it,
        so the thread starts it without waiting for the event loop; a partial one keeps
        gathering images until the running batch ends. Never more than two batches in flight,
        and none while parallel ones run.
        """
        if not self._in_flight:
            return True
        modes = self._in_flight.values()
        if self._parallel:
            return all(modes) and len(self._in_flight) < 2 * self.parallel_runs
        if any(modes):
            return False
        return len(self._in_flight) < 2 and self._queued_images >= self.batch_limit

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.pop(task, None)
        self._wakeup.set()

    def _ran(self) -> None:
        """The current batch's work is done: it no longer counts as in flight, before its
        answers go out (the next request its client sends must find the server idle)."""
        task = asyncio.current_task()
        if task is not None:
            self._batch_done(task)

    async def _process(
        self, jobs: list[_Job], blobs: list[bytes], work: asyncio.Future[Any]
    ) -> None:
        """One batch: wait for its ``work`` on a thread, then give each request its share."""
        try:
            outcomes, started, run_s, label, escalation = await work
        except Exception as exc:  # a failed run fails its requests, never the loop
            self._ran()
            logger.exception("inference failed for a batch of %d", len(blobs))
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        self._ran()
        offset = 0
        for job in jobs:
            n = len(job.blobs)
            if not job.future.done():
                job.future.set_result(outcomes[offset : offset + n])
            offset += n
        if self.on_abandoned is not None and any(job.abandoned for job in jobs):
            self.on_abandoned(sum(isinstance(o, RequestAbandonedError) for o in outcomes))
        if self.on_batch is not None:
            good = [o[0] for o in outcomes if not isinstance(o, Exception)]
            waits = [max(0.0, started - job.enqueued) for job in jobs]
            stats = BatchStats(
                len(good), waits, run_s, good, label, escalation.sent, escalation.skipped
            )
            self.on_batch(stats)

    def _decode(self, blob: bytes, owner: _Job | None = None) -> Decoded | Exception:
        """Any failure stays with its own image, so one odd file never fails a whole batch.
        An image whose request has stopped waiting is not decoded (nor answered: a failure
        meanwhile, such as its wait for pixels running out, is not counted as a refusal)."""
        if owner is not None and owner.abandoned:
            return RequestAbandonedError()
        try:
            return self.prepare(blob)
        except Exception as exc:
            return RequestAbandonedError() if owner is not None and owner.abandoned else exc

    def _work(
        self, blobs: list[bytes], parallel: bool = False, owners: list[_Job] | None = None
    ) -> tuple[list[Outcome], float, float, str, Escalation]:
        """Blocking, on a batch's thread: decode the batch, then one run.

        Alone, the images decode on the decode pool; in parallel mode, one after the other on
        this thread (the other runs keep the other cores busy). Returns the outcomes, when the
        work started, the run's seconds (a cascade's second step included; each image's decode is in
        its own ``Decoded``), the run's label and what its second step did (``Escalation``).

        ``owners``: each image's request. Images of a request that has stopped waiting (its
        deadline, its client gone) are not decoded, and the run is skipped when every request
        of the batch has stopped: a 504 or a hang-up ends the server's work for it within one
        image's decode, not after the whole batch (a few requests of large images would
        otherwise keep every thread busy for nobody long after their answers had gone)."""
        started = time.perf_counter()
        owned = owners if owners is not None else [None] * len(blobs)
        if len(blobs) == 1 or parallel:
            decoded = [self._decode(blob, owner) for blob, owner in zip(blobs, owned, strict=True)]
        else:
            decoded = list(self.decode_pool.map(self._decode, blobs, owned))
        if owners is not None and all(owner.abandoned for owner in owners):
            decoded = [RequestAbandonedError() for _ in decoded]
        good = [d for d in decoded if not isinstance(d, Exception)]
        decoded_at = time.perf_counter()
        if not good:
            return decoded, started, 0.0, "", Escalation(np.empty((0, 0), np.float32), 0)
        # A lone image needs no stacking copy: a view with a batch axis is enough.
        batch = good[0].array[None] if len(good) == 1 else np.stack([d.array for d in good])
        if parallel:
            assert self.run_parallel is not None
            probs = self.run_parallel(batch)
            label = "parallel"
        else:
            probs = self.run(batch)
            label = self.run_label() if self.run_label is not None else ""
        escalation = Escalation(probs, 0)
        if self.escalate is not None:
            ran = [b for b, d in zip(blobs, decoded, strict=True) if not isinstance(d, Exception)]
            escalation = self.escalate(probs, batch, ran)
        run_s = time.perf_counter() - decoded_at
        rows = iter(escalation.probs)
        outcomes: list[Outcome] = [
            d if isinstance(d, Exception) else (d, next(rows)) for d in decoded
        ]
        return outcomes, started, run_s, label, escalation

    async def _fill(self) -> None:
        """Wait briefly for more images, but only while others are known to be on their way.

        Requests whose bodies are arriving right now join within a few milliseconds; with none
        of them, waiting would only add latency (a lone request never waits).
        """
        if self.batch_limit == 1 or self.max_queue_delay_s <= 0:
            return
        deadline = self._queue[0].enqueued + self.max_queue_delay_s
        while self._queued_images < self.batch_limit and self._incoming > 0 and not self._stopping:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _take(self, limit: int) -> list[_Job]:
        """Jobs for the next batch: whole requests, up to ``limit`` images."""
        jobs: list[_Job] = []
        count = 0
        while self._queue:
            job = self._queue[0]
            if job.abandoned:  # nobody waits for it (a deadline, a client gone): skip the work
                self._queue.popleft()
                self._queued_images -= len(job.blobs)
                if not job.future.done():
                    job.future.set_result([RequestAbandonedError() for _ in job.blobs])
                if self.on_abandoned is not None:
                    self.on_abandoned(len(job.blobs))
                continue
            if jobs and count + len(job.blobs) > limit:
                break
            self._queue.popleft()
            self._queued_images -= len(job.blobs)
            jobs.append(job)
            count += len(job.blobs)
        return jobs
