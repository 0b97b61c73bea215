"""Lay out a labelled photo folder (``cat/``, ``dog/``) from the public photo set, for hosts that
lack ``../shared/data/catsdogs`` (GitHub-hosted runners). Standard library only.

    python3 scripts/ci_photos.py --out ../shared/data/catsdogs/images --per-class 400

The archive and its checksum are the ones ``params.yaml`` gives the pipeline's fetch stage; files
that are empty or not complete JPEGs (the public set has a few) are skipped.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import re
import shutil
import urllib.request
import zipfile
from pathlib import Path

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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, sha256: str, dest: Path) -> Path:
    if dest.exists() and sha256_file(dest) == sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(".part")
    log.info("downloading %s", url)
    with urllib.request.urlopen(url, timeout=60) as resp, part.open("wb") as out:
        shutil.copyfileobj(resp, out, 1 << 20)
    if sha256_file(part) != sha256:
        raise SystemExit(f"{url}: sha256 mismatch")
    part.replace(dest)
    return dest


def complete_jpeg(data: bytes) -> bool:
    return len(data) > 1024 and data[:2] == b"\xff\xd8" and data.rstrip(b"\x00")[-2:] == b"\xff\xd9"


def extract(archive: Path, out: Path, per_class: int) -> dict[str, int]:
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
            target = out / label / f"{label}.{Path(name).stem}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            counts[label] = counts.get(label, 0) + 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("../shared/data/catsdogs/images"))
    parser.add_argument("--per-class", type=int, default=400)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "catsdogs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[ci_photos] %(message)s")
    if all((args.out / c).is_dir() and any((args.out / c).iterdir()) for c in ("cat", "dog")):
        log.info("%s already holds cat/ and dog/", args.out)
        return
    url, sha256 = fetch_params(args.params)
    archive = download(url, sha256, args.cache / url.rsplit("/", 1)[-1])
    counts = extract(archive, args.out, args.per_class)
    log.info("wrote %s to %s", counts, args.out)


if __name__ == "__main__":
    main()
