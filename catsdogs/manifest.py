"""The prepared-data manifest (``data/prepared/manifest.csv``): one row per kept photo.

Written by the prepare stage, read by training, export and evaluation. Paths are relative to
the repository root, where DVC runs every stage.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

MANIFEST_COLUMNS = ("path", "label", "sha256", "width", "height", "brightness", "split")
SPLITS = ("train", "val", "test")


class ManifestRow(NamedTuple):
    path: Path
    label: str
    sha256: str
    width: int  # source size in pixels
    height: int
    brightness: float | None  # mean of the preprocessed uint8 input, as prepare measured it
    split: str


def write_manifest(rows: Iterable[ManifestRow], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(MANIFEST_COLUMNS)
        for r in rows:
            writer.writerow([r.path, r.label, r.sha256, r.width, r.height, r.brightness, r.split])


def read_manifest(path: str | Path, split: str | None = None) -> list[ManifestRow]:
    """Rows of the manifest (optionally one split), in file order; none at all is an error."""
    rows = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"path", "label", "split", "width", "height"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: manifest lacks columns {sorted(missing)}")
        for rec in reader:
            if split is not None and rec["split"] != split:
                continue
            brightness = float(rec["brightness"]) if rec.get("brightness") else None
            rows.append(
                ManifestRow(
                    Path(rec["path"]),
                    rec["label"],
                    rec.get("sha256", ""),
                    int(rec["width"]),
                    int(rec["height"]),
                    brightness,
                    rec["split"],
                )
            )
    if not rows:
        raise ValueError(f"{path}: no rows for split {split!r}")
    return rows
