"""PyTorch eager reference: the same checkpoint the ONNX file was exported from, same inputs.

Runs in the training environment (it needs torch), with the same preprocessing and thread count
as the in-process onnxruntime baseline, so the two rows of the report differ only by runtime.

    .venv-train/bin/python -m loadtest.torch_ref --checkpoint models/checkpoint.pt --out t.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from catsdogs.photos import load_photos
from catsdogs.preprocessing import PreprocessSpec, preprocess_bytes
from loadtest.inprocess import DEFAULT_PHOTOS, measure
from training.models import CascadeClassifier, load_served


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--limit", type=int, default=0, help="use only the first N photos")
    parser.add_argument("--batch-sizes", default="8")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, meta = load_served(args.checkpoint)
    spec = PreprocessSpec.from_json(meta["preprocessing"])
    photos = [data for _, data in load_photos(args.photos)]
    if args.limit:
        # a spread of cats and dogs, not the first N of one class
        photos = photos[:: max(1, len(photos) // args.limit)][: args.limit]

    def tensor(x: np.ndarray) -> torch.Tensor:
        # writable copy only when needed: decoded arrays may be read-only views of PIL memory
        return torch.from_numpy(np.require(x, requirements="W"))

    # a cascade on views of its own: its other views made for the rows it escalates, as served
    views = model.views if isinstance(model, CascadeClassifier) else None

    @torch.inference_mode()
    def run(x: np.ndarray, photos: Sequence[bytes]) -> np.ndarray:
        if views is None:
            return torch.softmax(model(tensor(x)), 1).numpy()
        probs, unsure = model.probabilities(tensor(x))
        rows = np.flatnonzero(unsure.numpy())
        if len(rows):
            own = [tensor(np.stack([preprocess_bytes(photos[i], v) for i in rows])) for v in views]
            probs[rows] = model.probabilities(tensor(x[rows]), own)[0]
        return probs.numpy()

    sizes = [int(s) for s in args.batch_sizes.split(",") if s]
    result = {
        "runtime": f"torch {torch.__version__} eager",
        "threads": args.threads,
        "photos": len(photos),
        "mlflow_run_id": meta.get("mlflow_run_id"),  # to check it is the ONNX file's own run
        **measure({"eager": run}, photos, spec, sizes),
    }
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
