"""Lay out ``../shared/data/catsdogs`` (``images/{cat,dog}``, ``originals/{cat,dog}``) from the
public photo set, for hosts that lack it (GitHub-hosted runners).

    python3 scripts/ci_photos.py --root ../shared/data/catsdogs --per-class 400 --originals 100

The archive and its checksum are the ones ``params.yaml`` gives the pipeline's fetch stage; files
that are empty or not complete JPEGs (the public set has a few) are skipped. ``originals/`` keeps
the source bytes; ``images/`` is re-encoded to at most 320 px (JPEG quality 90) when Pillow is
installed, as in the shared folder, else the source bytes too.
"""

from __future__ import annotations

import argparse
import io
import logging
import re
import shutil
import urllib.request
import zipfile
from pathlib import Path

from catsdogs.hashing import file_sha256

log = logging.getLogger("ci_photos")


def fetch_params(path: Path) -> tuple[str, str]:
    """url and sha256 of the `fetch:` section, read without a YAML library."""
    section = re.search(r"^fetch:\n((?:[ \t].*\n|\n)+)", path.read_text(), re.MULTILINE)
    if not section:
        raise SystemExit(f"{path}: no fetch section")
    url = re.search(r"^\s+url:\s*(\S+)", section.group(1), re.MULTILINE)
    sha = re.search(r"^\s+sha256:\s*([0-9a-f]{64})", section.group(1), re.MULTILINE)
    if not (url and sha):
        raise SystemExit(f"{path}: fetch.url or fetch.sha256 missing")
    return url.group(1), sha.group(1)


def download(url: str, sha256: str, dest: Path) -> Path:
    if dest.exists() and file_sha256(dest) == sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(".part")
    log.info("downloading %s", url)
    with urllib.request.urlopen(url, timeout=60) as resp, part.open("wb") as out:
        shutil.copyfileobj(resp, out, 1 << 20)
    if file_sha256(part) != sha256:
        raise SystemExit(f"{url}: sha256 mismatch")
    part.replace(dest)
    return dest


def complete_jpeg(data: bytes) -> bool:
    return len(data) > 1024 and data[:2] == b"\xff\xd8" and data.rstrip(b"\x00")[-2:] == b"\xff\xd9"


def shrink(data: bytes, side: int = 320) -> bytes:
    try:
        from PIL import Image  # optional: only for the smaller images/ copies
    except ImportError:
        return data
    with Image.open(io.BytesIO(data)) as img:
        if max(img.size) <= side:
            return data
        img = img.convert("RGB")
        img.thumbnail((side, side))
        out = io.BytesIO()
        img.save(out, format="JPEG", quality=90)
        return out.getvalue()


def extract(archive: Path, root: Path, per_class: int, originals: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    with zipfile.ZipFile(archive) as zf:
        names = sorted(n for n in zf.namelist() if n.lower().endswith(".jpg"))
        for name in names:
            parts = Path(name).parts  # PetImages/Cat/123.jpg
            label = parts[-2].lower() if len(parts) >= 2 else ""
            if label not in ("cat", "dog") or counts.get(label, 0) >= per_class:
                continue
            data = zf.read(name)
            if not complete_jpeg(data):
                continue
            try:
                small = shrink(data)
            except Exception:  # undecodable despite its markers: leave it out, like the pipeline
                continue
            file_name = f"{label}.{Path(name).stem}.jpg"
            n = counts.get(label, 0)
            for folder, payload, keep in (
                ("images", small, True),
                ("originals", data, n < originals),
            ):
                if keep:
                    target = root / folder / label / file_name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(payload)
            counts[label] = n + 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("../shared/data/catsdogs"))
    parser.add_argument("--per-class", type=int, default=400)
    parser.add_argument("--originals", type=int, default=100, help="of those, kept full size")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "catsdogs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[ci_photos] %(message)s")
    folders = [args.root / f / c for f in ("images", "originals") for c in ("cat", "dog")]
    if all(f.is_dir() and any(f.iterdir()) for f in folders):
        log.info("%s already holds images/ and originals/", args.root)
        return
    url, sha256 = fetch_params(args.params)
    archive = download(url, sha256, args.cache / url.rsplit("/", 1)[-1])
    counts = extract(archive, args.root, args.per_class, args.originals)
    log.info("wrote %s photos per class to %s", counts, args.root)


if __name__ == "__main__":
    main()
