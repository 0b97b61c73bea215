"""Stage ``prepare``: check every photo, drop what cannot be used, split by content hash.

Reads ``data/raw/index.csv``, decodes each file fully with the server's decoder (so training
never sees a photo the server would reject), drops corrupt, truncated, empty, non-image, tiny,
oversized and duplicate files with a reason, and writes

- ``data/prepared/manifest.csv``: path,label,sha256,width,height,brightness,split
- ``reports/data.json``: counts per class and split, and every dropped file with its reason.

The split of a photo depends only on its bytes (sha256 -> a number in [0, 1)), so adding photos
never moves an existing one to another split, and a duplicate can never straddle two splits.

    python -m training.prepare
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import signal
import sys
from collections import Counter
from dataclasses import dataclass
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from catsdogs.manifest import SPLITS, ManifestRow, write_manifest
from catsdogs.preprocessing import (
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    PreprocessSpec,
    decode_image,
    preprocess_bytes_info,
)
from training.fetch import IndexRow, read_index
from training.params import (
    PARAMS_FILE,
    ParamsError,
    PrepareParams,
    load_prepare,
    load_train,
    refuse,
)

log = logging.getLogger("training.prepare")


@dataclass(frozen=True)
class Checked:
    """The verdict on one file: ``reason`` is None for a usable photo."""

    path: str
    label: str
    sha256: str
    reason: str | None = None
    detail: str = ""
    width: int = 0
    height: int = 0
    brightness: float = 0.0
    mode: str = ""


def split_of(sha256: str, val_fraction: float, test_fraction: float, salt: str) -> str:
    """train/val/test from the content hash alone: stable when photos are added or removed."""
    bucket = hash_unit(f"{salt}:split:{sha256}")
    if bucket < test_fraction:
        return "test"
    if bucket < test_fraction + val_fraction:
        return "val"
    return "train"


def hash_unit(text: str) -> float:
    """A deterministic number in [0, 1) from a string."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:16], 16) / float(1 << 64)


def check_file(row: IndexRow, spec: PreprocessSpec, min_side: int, max_pixels: int) -> Checked:
    """Decode ``row.path`` fully; a usable photo gets its size and mean brightness."""
    try:
        data = Path(row.path).read_bytes()
    except OSError as exc:
        return Checked(row.path, row.label, row.sha256, "unreadable", type(exc).__name__)
    digest = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as probe:
            mode = probe.mode
    except Exception:  # the full decode below names the problem
        mode = ""
    try:
        decode_image(data, max_pixels=max_pixels)  # full decode: truncation shows up here
        # what the model will see (the server's path, JPEG draft included), and the stored size
        info = preprocess_bytes_info(data, spec, max_pixels=max_pixels)
        arr, width, height = info.array, info.width, info.height
    except ImageDecodeError as exc:
        return Checked(row.path, row.label, digest, exc.code, exc.message, mode=mode)
    if min(width, height) < min_side:
        detail = f"{width}x{height}, smaller than {min_side} px a side"
        return Checked(row.path, row.label, digest, "too_small", detail, width, height, mode=mode)
    brightness = round(float(arr.mean()), 4)
    return Checked(row.path, row.label, digest, None, "", width, height, brightness, mode)


def _check_star(args: tuple) -> Checked:
    return check_file(*args)


def check_all(rows: list[IndexRow], spec: PreprocessSpec, params: PrepareParams) -> list[Checked]:
    jobs = [(row, spec, params.min_side, params.max_pixels) for row in rows]
    if params.workers <= 1:
        return [_check_star(j) for j in tqdm(jobs, desc="prepare", unit="file", mininterval=1.0)]
    # Threads, not processes: decoding, resizing and hashing release the GIL, so two threads
    # check as fast as two processes did (1,600 shared photos: 1.47-1.53 s against 1.61-1.78 s,
    # alone 2.48 s), with no start-up, and a stop is the main thread's alone: a process pool
    # stopped as a whole (Ctrl-C, a group's SIGTERM) printed a traceback per worker, and could
    # hang for good when a worker died holding the task queue's lock. Leaving the block lets
    # each thread finish its photo.
    with ThreadPool(params.workers) as pool:
        results = pool.imap(_check_star, jobs, chunksize=16)
        return list(tqdm(results, total=len(jobs), desc="prepare", unit="file", mininterval=1.0))


def select(
    checked: list[Checked], params: PrepareParams
) -> tuple[list[tuple[Checked, str]], list[dict[str, str]]]:
    """Drop bad files and duplicates, cap per class, assign splits. Returns (kept, dropped)."""
    dropped: list[dict[str, str]] = []
    good: list[Checked] = []
    for c in checked:
        if c.reason:
            dropped.append(
                {"path": c.path, "label": c.label, "reason": c.reason, "detail": c.detail}
            )
        else:
            good.append(c)
    # exact duplicates: keep the first path of each content; two labels for one content = drop all
    by_hash: dict[str, list[Checked]] = {}
    for c in sorted(good, key=lambda c: c.path):
        by_hash.setdefault(c.sha256, []).append(c)
    unique: list[Checked] = []
    for copies in by_hash.values():
        if len({c.label for c in copies}) > 1:
            labels = ",".join(sorted({c.label for c in copies}))
            for c in copies:
                detail = f"the same bytes are labelled {labels}"
                dropped.append(
                    {"path": c.path, "label": c.label, "reason": "label_conflict", "detail": detail}
                )
            continue
        unique.append(copies[0])
        for c in copies[1:]:
            detail = f"same bytes as {copies[0].path}"
            dropped.append(
                {"path": c.path, "label": c.label, "reason": "duplicate", "detail": detail}
            )
    if params.max_per_class is not None:
        # a hash order, not the file order, so the cap samples every part of the folder
        unique.sort(key=lambda c: hash_unit(f"{params.split_salt}:subset:{c.sha256}"))
        seen: Counter[str] = Counter()
        capped = []
        for c in unique:
            seen[c.label] += 1
            if seen[c.label] <= params.max_per_class:
                capped.append(c)
        unique = capped
    unique.sort(key=lambda c: (c.label, c.path))
    kept = [
        (c, split_of(c.sha256, params.val_fraction, params.test_fraction, params.split_salt))
        for c in unique
    ]
    dropped.sort(key=lambda d: (d["reason"], d["path"]))
    return kept, dropped


def manifest_rows(kept: list[tuple[Checked, str]]) -> list[ManifestRow]:
    return [
        ManifestRow(Path(c.path), c.label, c.sha256, c.width, c.height, c.brightness, split)
        for c, split in kept
    ]


def data_report(
    n_files: int,
    checked: list[Checked],
    kept: list[tuple[Checked, str]],
    dropped: list[dict[str, str]],
) -> dict[str, Any]:
    classes = sorted({c.label for c in checked})
    counts = {s: dict.fromkeys(classes, 0) for s in SPLITS}
    for c, split in kept:
        counts[split][c.label] += 1
    converted = Counter(c.mode for c, _ in kept if c.mode and c.mode != "RGB")
    # usable photos prepare.max_per_class left out: neither kept nor dropped as bad
    unused = Counter(c.label for c in checked)
    unused.subtract(d["label"] for d in dropped)
    unused.subtract(c.label for c, _ in kept)
    return {
        "files": n_files,
        "kept": len(kept),
        "dropped_count": len(dropped),
        "capped_count": sum(unused.values()),
        "capped_by_class": {k: unused[k] for k in classes},
        "class_names": classes,
        "counts": counts,
        "per_class": {k: sum(counts[s][k] for s in SPLITS) for k in classes},
        "per_split": {s: sum(counts[s].values()) for s in SPLITS},
        "dropped_by_reason": dict(sorted(Counter(d["reason"] for d in dropped).items())),
        "converted_to_rgb": dict(sorted(converted.items())),
        "dropped": dropped,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=PARAMS_FILE)
    parser.add_argument("--index", default="data/raw/index.csv")
    parser.add_argument("--manifest", default="data/prepared/manifest.csv")
    parser.add_argument("--report", default="reports/data.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    try:
        params = load_prepare(args.params)
        if params.max_pixels > DEFAULT_MAX_PIXELS:
            # train, export and evaluate decode under the default limit, as the server does: a
            # larger photo kept here would stop the train stage
            raise ParamsError(f"prepare.max_pixels: must be at most {DEFAULT_MAX_PIXELS}")
        train = load_train(args.params)
    except ParamsError as exc:  # one line naming the key, no traceback
        refuse("prepare", exc)
    # brightness is measured on exactly the input the model gets (drift reference): the same
    # sizes and resampling filter (mean and std apply after it, to the model's floats)
    spec = PreprocessSpec(
        input_size=train.input_size, resize=train.resize, interpolation=train.interpolation
    )
    rows = read_index(Path(args.index))
    # a SIGTERM unwinds like Ctrl-C: one line, the shell's 143, no manifest
    signal.signal(signal.SIGTERM, _terminated)
    try:
        checked = check_all(rows, spec, params)
    except KeyboardInterrupt:  # the user's own stop: one line, the shell's 130
        print("prepare: stopped (Ctrl-C); no manifest written", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
    kept, dropped = select(checked, params)
    if len({c.label for c, _ in kept}) < 2:
        raise SystemExit("prepare: fewer than two classes left after dropping bad files")
    write_manifest(manifest_rows(kept), Path(args.manifest))
    report = data_report(len(rows), checked, kept, dropped)
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    for d in dropped:
        log.warning("dropped %s: %s (%s)", d["path"], d["reason"], d["detail"])
    log.info("kept %d of %d files: %s", len(kept), len(rows), report["counts"])


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    main()
