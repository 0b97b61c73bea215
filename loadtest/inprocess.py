"""The bare floor: what decoding, preprocessing and the model cost with nothing around them.

One process, no HTTP, no queue, no event loop and no threads beyond onnxruntime's own: the
project's preprocessing (``catsdogs.preprocessing.preprocess_bytes``) and a plain onnxruntime
session (``catsdogs.modelfile``; a cascade: one per step, run as the server runs them).
onnxruntime's pool threads can spin-wait for work or sleep when idle; which is faster depends
on the case (a lone image pays for waking sleeping threads), so every case is measured under
both policies, interleaved, and the faster one is the floor.
Runs in the serving environment:

    .venv-serve/bin/python -m loadtest.inprocess --model models/model.onnx --out floor.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from catsdogs.cascade import contract_views, first_step, second_feed, second_step
from catsdogs.contract import INPUT_NAME, OUTPUT_ESCALATED, OUTPUT_PROBABILITIES, ModelContract
from catsdogs.cpus import available_cpus
from catsdogs.modelfile import load_model_file
from catsdogs.photos import load_photos
from catsdogs.preprocessing import PreprocessSpec, preprocess_bytes
from loadtest.serverproc import DEFAULT_PHOTOS
from loadtest.stats import summarize_ms

POLICIES = ("spin", "sleep")  # onnxruntime's intra-op threads when idle

# uint8 (N, H, W, 3) and the N encoded photos it was made from -> probabilities (N, C); a
# cascade makes its other views from the photos, for the rows it escalates
RunFn = Callable[[np.ndarray, Sequence[bytes]], np.ndarray]


@dataclass
class CascadeRun:
    """A cascade file run as the server runs it (``server.inference``): its first step
    (``catsdogs.cascade.first_step``) on the batch, then its second step (``second_step``: the
    file without its first model) on the rows the first model is unsure of, fed that model's
    answers, with their other views made from their photos. So no model runs twice on a photo,
    and the floor does the server's work, escalated photos included."""

    first: Any  # onnxruntime session of the first step
    second: Any  # ... of the second step
    answers: str  # the second step's input for the first model's answers
    views: dict[str, PreprocessSpec]  # its other models' own views: input -> preprocessing

    def __call__(self, batch: np.ndarray, photos: Sequence[bytes]) -> np.ndarray:
        probs, escalated = self.first.run(
            [OUTPUT_PROBABILITIES, OUTPUT_ESCALATED], {INPUT_NAME: batch}
        )
        rows = np.flatnonzero(escalated)
        if not len(rows):
            return probs
        views = {
            name: np.stack([preprocess_bytes(photos[i], spec) for i in rows])
            for name, spec in self.views.items()
        }
        feed = second_feed(self.answers, batch[rows], probs[rows], views)
        (again,) = self.second.run([OUTPUT_PROBABILITIES], feed)
        probs = probs.copy()
        probs[rows] = again
        return probs


def open_runs(
    path: Path, threads: int, policies: Sequence[str] = POLICIES
) -> tuple[dict[str, RunFn], ModelContract]:
    """One run per thread policy in ``policies``, its sessions with the same threads and graph
    optimisations; the model's contract (its preprocessing and classes). A cascade file runs in
    its two steps, as the server runs it (:class:`CascadeRun`)."""
    import onnxruntime as ort

    if not policies or any(p not in POLICIES for p in policies):
        raise ValueError(f"policies must be some of {POLICIES}, not {policies!r}")
    data = path.read_bytes()
    step = first_step(data)
    later = second_step(data) if step is not None else None
    del data
    runs: dict[str, RunFn] = {}
    contract = None
    for policy in policies:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if policy == "spin" else "0"
        )
        loaded = load_model_file(path, sess_options=options, source=step)
        contract = loaded.contract
        if later is None:
            runs[policy] = partial(_plain, loaded.session)
            continue
        second = ort.InferenceSession(later[0], options, providers=["CPUExecutionProvider"])
        views = contract_views(contract.extra.get("cascade"))
        runs[policy] = CascadeRun(loaded.session, second, later[1], views)
    assert contract is not None
    return runs, contract


def _plain(session: Any, batch: np.ndarray, photos: Sequence[bytes]) -> np.ndarray:
    (probs,) = session.run([OUTPUT_PROBABILITIES], {INPUT_NAME: batch})
    return probs


BLOCK = 25  # photos (or batches) a policy runs in a row before the other takes over
SETTLE_S = 0.05  # pause between blocks: a spinning pool stops before the other policy runs


def in_blocks(n: int, policies: Sequence[str], block: int = BLOCK) -> list[tuple[str, int]]:
    """(policy, item index) pairs: each policy runs every item, ``block`` items in a row, the
    policies taking turns block by block and alternating which goes first (ABBA).

    Never interleaved item by item: a spinning session's pool threads keep spinning for a
    while after its run and take a core from the other policy's next run. On 2 cores that
    slowed both and made the floor noisy: a lone image's run took 9.0 ms on the spinning
    session and 11.4 ms on the sleeping one, against 6.0 and 7.1 ms when each session ran the
    200 photos in a row (medians of 400 and 600 runs; a third, spinning session that stops
    after each run was in both rotations).
    """
    order: list[tuple[str, int]] = []
    for b, start in enumerate(range(0, n, block)):
        names = list(policies) if b % 2 == 0 else list(policies)[::-1]
        for policy in names:
            order.extend((policy, i) for i in range(start, min(n, start + block)))
    return order


def _settle_between(order: list[tuple[str, int]], k: int) -> None:
    if k and order[k - 1][0] != order[k][0]:
        time.sleep(SETTLE_S)


def per_image(
    runs: dict[str, RunFn], photos: Sequence[bytes], spec: PreprocessSpec
) -> dict[str, Any]:
    """Each photo alone: decode + preprocess + a batch-1 run, under each policy in blocks."""
    times: dict[str, dict[str, list[float]]] = {
        p: {"total": [], "prep": [], "infer": []} for p in runs
    }
    order = in_blocks(len(photos), list(runs))
    for k, (policy, i) in enumerate(order):
        _settle_between(order, k)
        t0 = time.perf_counter()
        arr = preprocess_bytes(photos[i], spec)
        t1 = time.perf_counter()
        runs[policy](arr[None], photos[i : i + 1])
        t2 = time.perf_counter()
        times[policy]["total"].append(t2 - t0)
        times[policy]["prep"].append(t1 - t0)
        times[policy]["infer"].append(t2 - t1)
    by_policy = {
        policy: {
            "latency_ms": summarize_ms(t["total"]),
            "preprocess_ms": summarize_ms(t["prep"]),
            "inference_ms": summarize_ms(t["infer"]),
            "images_per_s": len(t["total"]) / sum(t["total"]),
        }
        for policy, t in times.items()
    }
    best = min(by_policy, key=lambda p: by_policy[p]["latency_ms"]["p50"])
    return {**by_policy[best], "policy": best, "policies": by_policy}


def images(
    run: RunFn, photos: Sequence[bytes], spec: PreprocessSpec, start: int, count: int
) -> list[float]:
    """Seconds of decode + preprocess + a batch-1 run for ``count`` photos from ``start``
    (wrapping around), one policy: a short block that ``make bench`` interleaves with HTTP."""
    seconds = []
    for k in range(count):
        photo = photos[(start + k) % len(photos)]
        t0 = time.perf_counter()
        run(preprocess_bytes(photo, spec)[None], [photo])
        seconds.append(time.perf_counter() - t0)
    return seconds


def batched(
    runs: dict[str, RunFn], photos: Sequence[bytes], spec: PreprocessSpec, size: int
) -> dict[str, Any]:
    """All photos in batches of ``size`` (the last wraps around): decode all, run once; the
    policies in blocks of batches, as in :func:`per_image`."""
    n_batches = -(-len(photos) // size)
    batch_s: dict[str, list[float]] = {p: [] for p in runs}
    infer_s: dict[str, list[float]] = {p: [] for p in runs}
    order = in_blocks(n_batches, list(runs), block=max(1, BLOCK // size))
    for k, (policy, b) in enumerate(order):
        _settle_between(order, k)
        chunk = [photos[(b * size + i) % len(photos)] for i in range(size)]
        t0 = time.perf_counter()
        x = np.stack([preprocess_bytes(d, spec) for d in chunk])
        t1 = time.perf_counter()
        runs[policy](x, chunk)
        t2 = time.perf_counter()
        batch_s[policy].append(t2 - t0)
        infer_s[policy].append(t2 - t1)
    images = n_batches * size
    by_policy = {
        p: {
            "batch_latency_ms": summarize_ms(batch_s[p]),
            "images_per_s": images / sum(batch_s[p]),
            "inference_only_images_per_s": images / sum(infer_s[p]),
        }
        for p in runs
    }
    best = max(by_policy, key=lambda p: by_policy[p]["images_per_s"])
    return {"batch_size": size, "images": images, **by_policy[best], "policy": best,
            "policies": by_policy}  # fmt: skip


def warm(runs: dict[str, RunFn], photos: Sequence[bytes], spec: PreprocessSpec, sizes) -> None:
    for run in runs.values():  # every shape once, as the server does before it is ready
        for size in (1, *sizes):
            run(np.stack([preprocess_bytes(photos[0], spec)] * size), [photos[0]] * size)


def measure(
    runs: dict[str, RunFn], photos: Sequence[bytes], spec: PreprocessSpec, sizes: Sequence[int]
) -> dict[str, Any]:
    return {
        "per_image": per_image(runs, photos, spec),
        "batched": [batched(runs, photos, spec, size) for size in sizes],
    }


def labels(runs: dict[str, RunFn], photos: Sequence[bytes], spec: PreprocessSpec) -> list:
    """Per photo, in order: [class index, probabilities] from the plain in-process path."""
    run = next(iter(runs.values()))
    out = []
    for data in photos:
        probs = run(preprocess_bytes(data, spec)[None], [data])[0]
        out.append([int(np.argmax(probs)), [float(p) for p in probs]])
    return out


def serve_commands(
    runs: dict[str, RunFn], photos: Sequence[bytes], spec: PreprocessSpec,
    sizes: Sequence[int], header: dict[str, Any],
) -> None:  # fmt: skip
    """Worker mode: one JSON command per stdin line, one JSON answer per stdout line.

    The benchmark keeps this process (and its loaded sessions) alive for the whole run, so it
    can interleave floor measurements with HTTP ones at no start-up cost:
    ops ``full``, ``per_image``, ``batched`` (all sizes), ``labels`` (each photo's class index
    and probabilities, for the HTTP answers to be compared with), ``images`` (a block of photos
    on one policy, with ``policy``, ``start`` and ``count``: see :func:`images`) and ``quit``,
    as ``{"op": "..."}``.
    """
    warm(runs, photos, spec, sizes)
    print(json.dumps({"ready": True, **header}), flush=True)
    for line in sys.stdin:
        op = json.loads(line).get("op")
        if op == "quit":
            break
        if op == "full":
            answer = {**header, **measure(runs, photos, spec, sizes)}
        elif op == "per_image":
            answer = per_image(runs, photos, spec)
        elif op == "batched":
            answer = {"batched": [batched(runs, photos, spec, size) for size in sizes]}
        elif op == "labels":
            answer = {"labels": labels(runs, photos, spec)}
        elif op == "images":
            args = json.loads(line)
            run = runs[args["policy"]]
            answer = {"seconds": images(run, photos, spec, args["start"], args["count"])}
        else:
            answer = {"error": f"unknown op {op!r}"}
        print(json.dumps(answer), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS)
    parser.add_argument("--threads", type=int, default=0, help="0 = as the server: usable CPUs")
    parser.add_argument("--batch-sizes", default="4,8,16,32")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", type=Path, help="measure once, write JSON here")
    target.add_argument("--worker", action="store_true", help="answer commands on stdin")
    args = parser.parse_args()
    threads = args.threads or available_cpus()
    runs, contract = open_runs(args.model, threads)
    spec = contract.preprocessing
    photos = [data for _, data in load_photos(args.photos)]
    sizes = [int(s) for s in args.batch_sizes.split(",") if s]
    header = {"runtime": "onnxruntime", "threads": threads, "photos": len(photos),
              "policies": list(POLICIES)}  # fmt: skip
    if args.worker:
        serve_commands(runs, photos, spec, sizes, header)
        return
    warm(runs, photos, spec, sizes)
    args.out.write_text(json.dumps({**header, **measure(runs, photos, spec, sizes)}, indent=2))


if __name__ == "__main__":
    main()
