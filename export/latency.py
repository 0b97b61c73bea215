"""In-process latency: eager PyTorch against onnxruntime, same model, same threads, interleaved."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from catsdogs.contract import INPUT_NAME, OUTPUT_PROBABILITIES


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000.0


def compare_latency(
    torch_model: nn.Module,
    sessions: dict[str, ort.InferenceSession],
    images: np.ndarray,
    *,
    batch_sizes: tuple[int, ...],
    threads: int,
    warmup: int,
    runs: int,
) -> dict[str, dict[str, float]]:
    """Median milliseconds per call for ``torch_eager`` and each named session, per batch size.

    Variants take turns within each run (torch, then each session), so a noisy neighbour on the
    machine slows them all alike instead of one variant's whole series. ``images`` is a uint8
    (N, H, W, 3) pool of real preprocessed photos, cycled to fill a batch.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out: dict[str, dict[str, float]] = {}
        for bs in batch_sizes:
            idx = np.arange(bs) % len(images)
            x = np.ascontiguousarray(images[idx])
            xt = torch.from_numpy(x)
            calls: dict[str, Callable[[], object]] = {}

            def eager(xt: torch.Tensor = xt) -> object:
                with torch.inference_mode():
                    return torch_model(xt)

            calls["torch_eager"] = eager
            for name, sess in sessions.items():
                calls[name] = lambda s=sess, x=x: s.run([OUTPUT_PROBABILITIES], {INPUT_NAME: x})
            for fn in calls.values():
                for _ in range(warmup):
                    fn()
            samples: dict[str, list[float]] = {name: [] for name in calls}
            for _ in range(runs):
                for name, fn in calls.items():
                    samples[name].append(_timed(fn))
            for name, values in samples.items():
                med = statistics.median(values)
                out.setdefault(name, {})[f"batch_{bs}_ms"] = round(med, 3)
                out[name][f"batch_{bs}_ms_per_image"] = round(med / bs, 3)
        return out
    finally:
        torch.set_num_threads(previous)


def sleeping_session(model: Path | bytes, threads: int) -> ort.InferenceSession:
    """A CPU session with ``threads`` intra-op threads that sleep as soon as a call ends."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=opts, providers=["CPUExecutionProvider"])


def time_sessions(
    files: dict[str, Path | bytes],
    sizes: Mapping[str, int | Mapping[str, int]],
    *,
    batches: tuple[int, ...],
    threads: int,
    warmup: int,
    runs: int,
) -> dict[str, dict[str, float]]:
    """Median ms per call, per file and batch size; the files take turns within every run.

    ``sizes``: each file's input side, or {input: side} for a file fed several image inputs (a
    cascade's views, export.cascade). The sessions' pool threads sleep as soon as a call ends
    instead of spinning: taking turns, one session's spinning threads would hold the cores
    through the next session's call (Lite0's batch 1 measured 18 ms that way against 5 ms
    alone)."""
    rng = np.random.default_rng(0)
    sessions = {k: sleeping_session(p, threads) for k, p in files.items()}

    def feed(key: str, batch: int) -> dict[str, np.ndarray]:
        side = sizes[key]
        sides = {INPUT_NAME: side} if isinstance(side, int) else side
        return {
            name: rng.integers(0, 256, (batch, s, s, 3), dtype=np.uint8)
            for name, s in sides.items()
        }

    inputs = {(k, b): feed(k, b) for k in files for b in batches}

    def call(key: str, batch: int) -> float:
        start = time.perf_counter()
        sessions[key].run([OUTPUT_PROBABILITIES], inputs[key, batch])
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
