"""In-process baseline: what the model costs with no HTTP, no queue and no event loop.

Decode + preprocess with the server's own ``server.preprocessing.preprocess_bytes``, then the
server's own ``server.inference.load_model`` session (same options, same intra-op threads),
per image at batch 1 and in batches. Runs in the serving environment:

    .venv-serve/bin/python -m loadtest.inprocess --model models/model.onnx --out base.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.stats import summarize_ms
from server.preprocessing import PreprocessSpec, preprocess_bytes

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PHOTOS = ROOT.parent / "shared" / "data" / "catsdogs" / "originals"

RunFn = Callable[[np.ndarray], np.ndarray]  # uint8 (N, H, W, 3) -> probabilities (N, C)


def load_photos(folder: Path) -> list[bytes]:
    files = sorted(p for p in folder.rglob("*.jpg"))
    if not files:
        raise RuntimeError(f"no .jpg photos under {folder}")
    return [p.read_bytes() for p in files]


def per_image(run: RunFn, photos: Sequence[bytes], spec: PreprocessSpec) -> dict[str, Any]:
    """Each photo alone: decode + preprocess + a batch-1 run, timed end to end and by part."""
    total, prep, infer = [], [], []
    for data in photos:
        t0 = time.perf_counter()
        arr = preprocess_bytes(data, spec)
        t1 = time.perf_counter()
        run(arr[None])
        t2 = time.perf_counter()
        total.append(t2 - t0)
        prep.append(t1 - t0)
        infer.append(t2 - t1)
    return {
        "latency_ms": summarize_ms(total),
        "preprocess_ms": summarize_ms(prep),
        "inference_ms": summarize_ms(infer),
        "images_per_s": len(total) / sum(total),
    }


def batched(run: RunFn, photos: Sequence[bytes], spec: PreprocessSpec, size: int) -> dict[str, Any]:
    """All photos in batches of ``size`` (the last one wraps around): decode all, run once."""
    n_batches = -(-len(photos) // size)
    batch_s, infer_s = [], []
    for b in range(n_batches):
        chunk = [photos[(b * size + i) % len(photos)] for i in range(size)]
        t0 = time.perf_counter()
        x = np.stack([preprocess_bytes(d, spec) for d in chunk])
        t1 = time.perf_counter()
        run(x)
        t2 = time.perf_counter()
        batch_s.append(t2 - t0)
        infer_s.append(t2 - t1)
    images = n_batches * size
    return {
        "batch_size": size,
        "images": images,
        "batch_latency_ms": summarize_ms(batch_s),
        "images_per_s": images / sum(batch_s),
        "inference_only_images_per_s": images / sum(infer_s),
    }


def measure(
    run: RunFn, photos: Sequence[bytes], spec: PreprocessSpec, batch_sizes: Sequence[int]
) -> dict[str, Any]:
    for size in (1, *batch_sizes):  # warm every shape first, as the server does before ready
        run(np.stack([preprocess_bytes(photos[0], spec)] * size))
    return {
        "per_image": per_image(run, photos, spec),
        "batched": [batched(run, photos, spec, size) for size in batch_sizes],
    }


def serve_commands(
    run: RunFn, photos: Sequence[bytes], spec: PreprocessSpec, sizes: Sequence[int], header: dict
) -> None:
    """Worker mode: one JSON command per stdin line, one JSON answer per stdout line.

    The benchmark keeps this process (and its loaded session) alive for the whole run, so it can
    interleave in-process measurements with HTTP ones at no start-up cost:
    ops ``full``, ``per_image``, ``batched`` (all sizes) and ``quit``, as ``{"op": "..."}``.
    """
    for size in (1, *sizes):  # warm every shape once, as the server does before ready
        run(np.stack([preprocess_bytes(photos[0], spec)] * size))
    print(json.dumps({"ready": True, **header}), flush=True)
    for line in sys.stdin:
        op = json.loads(line).get("op")
        if op == "quit":
            break
        if op == "full":
            answer = {**header, **measure(run, photos, spec, sizes)}
        elif op == "per_image":
            answer = per_image(run, photos, spec)
        elif op == "batched":
            answer = {"batched": [batched(run, photos, spec, size) for size in sizes]}
        else:
            answer = {"error": f"unknown op {op!r}"}
        print(json.dumps(answer), flush=True)


def main() -> None:
    from server.inference import load_model
    from server.settings import available_cpus

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS)
    parser.add_argument("--threads", type=int, default=0, help="0 = as the server: usable CPUs")
    parser.add_argument("--batch-sizes", default="8,16,32")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", type=Path, help="measure once, write JSON here")
    target.add_argument("--worker", action="store_true", help="answer commands on stdin")
    args = parser.parse_args()
    threads = args.threads or available_cpus()
    model = load_model(args.model, intra_op_threads=threads)
    photos = load_photos(args.photos)
    sizes = [int(s) for s in args.batch_sizes.split(",") if s]
    header = {"runtime": "onnxruntime", "threads": threads, "photos": len(photos)}
    spec = model.contract.preprocessing
    if args.worker:
        serve_commands(model.run, photos, spec, sizes, header)
        return
    args.out.write_text(json.dumps({**header, **measure(model.run, photos, spec, sizes)}, indent=2))


if __name__ == "__main__":
    main()
