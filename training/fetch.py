"""Stage ``fetch``: find the photos and write ``data/raw/index.csv`` (path, label, sha256, size).

The source comes from ``data/source.yaml`` (written by ``make data-source``): ``source`` is
``download`` or a photo folder, ``source_dir`` the folder DVC hashes as the fetch stage's
dependency (the photo folder itself, or ``fetch.download_dir`` for a download). Two steps, two
DVC stages:

    python -m training.fetch --download   # stage download: zip -> fetch.download_dir
    python -m training.fetch              # stage fetch: photos -> data/raw/index.csv

``--download`` streams the public Microsoft PetImages zip (resumable, sha256-checked) and extracts
it under ``fetch.download_dir``; for a local folder it only writes a small state file there, so
nothing touches the network. Photos are never copied: the index lists paths (relative to the
repository root) with content hashes.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import re
import shutil
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import requests
import yaml
from tqdm import tqdm

from catsdogs.hashing import file_sha256
from training.params import PARAMS_FILE, FetchParams, ParamsError, load_fetch, refuse

log = logging.getLogger("training.fetch")

INDEX_COLUMNS = ("path", "label", "sha256", "size")
_KAGGLE_NAME = re.compile(r"^([A-Za-z]+)\.\d+\.[A-Za-z0-9]+$")  # cat.123.jpg
# a class with fewer photos than this share of the largest class's is warned of (a stray?)
STRAY_CLASS_SHARE = 0.02


class FetchError(RuntimeError):
    """The source cannot be used: bad layout, failed download, checksum mismatch."""


class IndexRow(NamedTuple):
    path: str
    label: str
    sha256: str
    size: int


# ---------------------------------------------------------------------------- download


def download(
    url: str,
    dest: Path,
    *,
    sha256: str,
    size: int | None = None,
    timeout_s: float = 60.0,
    chunk_bytes: int = 1 << 20,
) -> Path:
    """Stream ``url`` to ``dest`` through ``dest.part``, resuming a partial file with HTTP Range.

    A complete file whose checksum differs from ``sha256`` is deleted and reported, so the next
    run starts clean instead of resuming garbage.
    """
    if dest.exists():
        if file_sha256(dest) == sha256:
            log.info("%s already downloaded and verified", dest)
            return dest
        log.warning("%s does not match the pinned sha256; downloading again", dest)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    try:
        _stream(url, part, have, size, timeout_s, chunk_bytes)
    except requests.RequestException as exc:
        got = part.stat().st_size if part.exists() else 0
        raise FetchError(
            f"download of {url} stopped at {got} bytes ({exc}); rerun to resume"
        ) from exc
    got = part.stat().st_size
    if size is not None and got != size:
        if got > size:
            part.unlink()
        raise FetchError(f"{dest.name}: got {got} bytes, expected {size}; rerun to resume")
    digest = file_sha256(part)
    if digest != sha256:
        part.unlink()
        raise FetchError(f"{dest.name}: sha256 {digest} does not match the pinned {sha256}")
    part.replace(dest)
    return dest


def _stream(
    url: str, part: Path, have: int, size: int | None, timeout_s: float, chunk: int
) -> None:
    """Append the rest of ``url`` to ``part`` (or rewrite it when the server ignores Range)."""
    headers = {"Range": f"bytes={have}-"} if have else {}
    with requests.get(url, headers=headers, stream=True, timeout=timeout_s) as resp:
        if resp.status_code == 416 and have:  # the part file already holds every byte
            return
        if resp.status_code not in (200, 206):
            raise FetchError(f"GET {url} answered HTTP {resp.status_code}")
        if resp.status_code == 200 and have:
            log.info("the server ignored the Range request; starting again from byte 0")
            have = 0
        total = (have + int(resp.headers.get("Content-Length", 0))) or size
        with (
            open(part, "ab" if have else "wb") as fh,
            tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=part.name) as bar,
        ):
            for block in resp.iter_content(chunk_size=chunk):
                fh.write(block)
                bar.update(len(block))


def extract(zip_path: Path, out_dir: Path, stamp: str) -> Path:
    """Extract ``zip_path`` into ``out_dir`` once (a stamp file names the verified zip)."""
    marker = out_dir / ".extracted"
    if marker.exists() and marker.read_text().strip() == stamp:
        return out_dir
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    with zipfile.ZipFile(zip_path) as zf:
        for member in tqdm(zf.infolist(), desc=f"extract {zip_path.name}", unit="file"):
            target = (tmp / member.filename).resolve()
            if not target.is_relative_to(tmp.resolve()):  # zip slip: ../ or absolute names
                raise FetchError(f"{zip_path.name}: unsafe member name {member.filename!r}")
            zf.extract(member, tmp)
    tmp.rename(out_dir)
    marker.write_text(stamp + "\n")
    return out_dir


def fetch_download(params: FetchParams) -> Path:
    """The extracted photos of the pinned zip, downloading and extracting only what is missing."""
    root = Path(params.download_dir)
    extracted = root / "extracted"
    marker = extracted / ".extracted"
    if marker.exists() and marker.read_text().strip() == params.sha256:
        return extracted  # extracted from the verified zip: no need to hash 800 MB again
    name = params.url.rsplit("/", 1)[-1] or "download.zip"
    zip_path = download(
        params.url,
        root / name,
        sha256=params.sha256,
        size=params.size,
        timeout_s=params.timeout_s,
        chunk_bytes=params.chunk_bytes,
    )
    return extract(zip_path, extracted, params.sha256)


# ---------------------------------------------------------------------------- layouts


_IGNORED_DIRS = ("__MACOSX",)  # what macOS's Archive Utility adds to a zip: never a class


def _hidden(name: str) -> bool:
    return name.startswith(".") or name in _IGNORED_DIRS


def _visible_files(folder: Path, skipped: list[str]) -> Iterator[Path]:
    """The files under ``folder`` (hidden ones left out), broken links included: the index
    lists those without a hash and prepare reports them ``unreadable``. Linked folders are not
    followed; each is named in ``skipped``."""
    for path in sorted(folder.rglob("*")):
        if any(_hidden(p) for p in path.relative_to(folder).parts):
            continue
        if path.is_symlink() and path.is_dir():
            skipped.append(f"{path}: a linked folder, not followed")
        elif path.is_file() or (path.is_symlink() and not path.exists()):
            yield path


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not _hidden(p.name))


def _kaggle_labels(folder: Path) -> set[str]:
    """The classes that the names of ``folder``'s own files give, Kaggle style (cat.123.jpg)."""
    return {
        m.group(1).lower()
        for f in folder.iterdir()
        if f.is_file() and (m := _KAGGLE_NAME.match(f.name)) is not None
    }


def find_photos(root: Path) -> list[tuple[Path, str]]:
    """(file, label) for every file of a data folder; labels are lower-cased class names.

    Layouts: ``root/<class>/*`` (cat/, dog/), Microsoft ``root/PetImages/{Cat,Dog}/*`` (also one
    folder deeper, as the zip extracts), and Kaggle's flat ``root/cat.123.jpg``. Files the
    layout puts in no class are logged, with the reason, never dropped silently.
    """
    if not root.exists():
        raise FetchError(f"data source {root} does not exist")
    if not root.is_dir():
        raise FetchError(f"data source {root} is not a folder")
    for candidate in (root / "PetImages", *(d / "PetImages" for d in _class_dirs(root))):
        if candidate.is_dir():
            root = candidate
            break
    dirs = _class_dirs(root)
    loose = sorted(p for p in root.iterdir() if not p.is_dir() and not _hidden(p.name))
    if len(dirs) == 1 and not loose:
        log.warning(
            "%s holds one folder, %s: reading it as the data source (its subfolders, or its "
            "files' names, give the classes)",
            root,
            dirs[0].name,
        )
        return find_photos(dirs[0])  # a zip that wraps everything in one top folder
    photos: list[tuple[Path, str]] = []
    skipped: list[str] = []
    if dirs:
        for d in dirs:
            named = _kaggle_labels(d)
            if len(named) >= 2:  # Kaggle's train.zip (cat.1.jpg, dog.1.jpg) beside test1.zip
                raise FetchError(
                    f"{d} holds files named like cat.1.jpg ({', '.join(sorted(named))}): that is "
                    f"one folder of every class, not the class {d.name!r}; point the data "
                    f"source at {d} itself"
                )
            files = list(_visible_files(d, skipped))
            if not files:
                skipped.append(f"{d}: an empty class folder")
            photos += [(f, d.name.lower()) for f in files]
        skipped += [f"{p}: beside the class folders, in no class" for p in loose]
    else:
        for f in loose:
            match = _KAGGLE_NAME.match(f.name)
            if f.is_file() and match:
                photos.append((f, match.group(1).lower()))
            else:
                skipped.append(f"{f}: not named like cat.1.jpg, so in no class")
    for reason in skipped:
        log.warning("not indexed: %s", reason)
    labels = sorted({label for _, label in photos})
    _warn_of_stray_classes(photos, bool(dirs))
    if len(labels) < 2:
        empty = [r for r in skipped if r.endswith("an empty class folder")]
        raise FetchError(
            f"{root}: expected one subfolder per class (cat/, dog/), PetImages/, or files named "
            f"like cat.1.jpg; found classes {labels}" + (f" ({'; '.join(empty)})" if empty else "")
        )
    return photos


def _warn_of_stray_classes(photos: list[tuple[Path, str]], folders: bool) -> None:
    """A class far smaller than the largest is most likely a stray folder or file name (a flat
    folder's IMG.0001.jpg makes a class "img"): every class becomes an output of the model."""
    counts = Counter(label for _, label in photos)
    if len(counts) < 3:
        return
    largest = max(counts.values())
    where = "a folder" if folders else "the part of a file's name before its first dot"
    for label, n in sorted(counts.items()):
        if n < STRAY_CLASS_SHARE * largest:
            example = next(path for path, lbl in photos if lbl == label)
            log.warning(
                "class %r has %d photo(s) against %d for the largest (e.g. %s): a stray "
                "file? Every class (%s) becomes an answer of the model",
                label,
                n,
                largest,
                example,
                where,
            )


# ---------------------------------------------------------------------------- index


def _rel(path: Path) -> str:
    """Paths relative to the repository root, so the index is the same in every clone.

    Symbolic links are kept as they are (``../shared`` stays ``../shared`` when it links to a
    folder elsewhere): resolving them would write where the link points, which depends on where
    the clone sits, and the index, the manifest and every stage after them would differ between
    clones of the same run. Only a path whose ``..`` cannot be read as written (a link followed
    by ``..``) is resolved.
    """
    plain = os.path.abspath(path)
    try:
        same = os.path.samefile(plain, path)
    except OSError:  # read as written, it names nothing, or a link to nothing (kept: its name)
        same = os.path.islink(plain)
    return os.path.relpath(plain if same else path.resolve(), Path.cwd())


def build_index(photos: list[tuple[Path, str]], cache_path: Path | None = None) -> list[IndexRow]:
    """Hash every photo; a cache keyed by (path, size, mtime) makes a rerun nearly free."""
    cache: dict[str, list] = {}
    if cache_path and cache_path.exists():
        try:
            cache = json.loads(cache_path.read_text())
        except json.JSONDecodeError:
            cache = {}
    rows, fresh = [], {}
    for path, label in tqdm(photos, desc="index", unit="file", mininterval=1.0):
        if not _utf8(str(path)):  # the index is UTF-8 text: such a name cannot be written in it
            log.warning("not indexed: %r: its name is not valid UTF-8 (rename it)", str(path))
            continue
        try:
            st = path.stat()
            key = str(path.resolve())
            hit = cache.get(key)
            if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
                digest = hit[2]
            else:
                digest = file_sha256(path)
        except OSError as exc:  # listed, then unreadable: prepare reports it and goes on
            log.warning("%s cannot be read (%s): indexed without a hash", path, exc)
            rows.append(IndexRow(_rel(path), label, "", 0))
            continue
        fresh[key] = [st.st_size, st.st_mtime_ns, digest]
        rows.append(IndexRow(_rel(path), label, digest, st.st_size))
    if cache_path:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_text(json.dumps(fresh))
    rows.sort(key=lambda r: (r.label, r.path))
    return rows


def _utf8(text: str) -> bool:
    """False for a file name whose bytes are not UTF-8 (Python keeps them as surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def write_index(rows: list[IndexRow], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(INDEX_COLUMNS)
        writer.writerows(rows)


def read_index(path: Path) -> list[IndexRow]:
    with open(path, newline="", encoding="utf-8") as fh:
        return [
            IndexRow(r["path"], r["label"], r["sha256"], int(r["size"])) for r in csv.DictReader(fh)
        ]


class Source(NamedTuple):
    source: str  # "download" or a photo folder
    source_dir: str | None  # the folder DVC hashes for the fetch stage (None: not given)


def read_source(path: Path) -> Source:
    if not path.exists():
        raise FetchError(f"{path} is missing: run `make pipeline DATA=/folder` or `make pipeline`")
    data = yaml.safe_load(path.read_text()) or {}
    source = data.get("source") if isinstance(data, dict) else None
    if not isinstance(source, str) or not source:
        raise FetchError(f'{path}: expected `source: "download"` or `source: "/abs/folder"`')
    source_dir = data.get("source_dir")
    if source_dir is not None and (not isinstance(source_dir, str) or not source_dir):
        raise FetchError(f"{path}: source_dir must be a folder path, got {source_dir!r}")
    return Source(source, source_dir)


def check_source_dir(src: Source, params: FetchParams, source_file: Path) -> None:
    """DVC hashes ``source_dir``: it must be the folder this stage reads, or changes go unseen."""
    if src.source_dir is None:
        return
    expected = params.download_dir if src.source == "download" else src.source
    if Path(src.source_dir).resolve() != Path(expected).resolve():
        raise FetchError(
            f"{source_file}: source_dir is {src.source_dir!r} but source {src.source!r} reads "
            f"{expected!r}; rewrite it with `make pipeline DATA=...` (or `make data-source`)"
        )


def write_state(params: FetchParams, source: str) -> None:
    """The download folder's state file: the download stage's output always holds something."""
    root = Path(params.download_dir)
    root.mkdir(parents=True, exist_ok=True)
    if source == "download":
        text = f"source: download\nurl: {params.url}\nsha256: {params.sha256}\n"
    else:  # a local folder: the stage exists for downloads only, so it writes this and stops
        text = f"source: {source}\nnothing downloaded: the photos are read in place\n"
    state = root / "state.txt"
    if not state.exists() or state.read_text() != text:
        state.write_text(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=PARAMS_FILE)
    parser.add_argument("--source-file", default="data/source.yaml")
    parser.add_argument("--out", default="data/raw/index.csv")
    parser.add_argument("--download", action="store_true", help="only fill fetch.download_dir")
    parser.add_argument(
        "--cache",
        default="data/index-cache.json",
        help="hash cache, outside every DVC output (keyed by path, size and mtime)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        run(args)
    except ParamsError as exc:  # one line naming the key, no traceback
        refuse("fetch", exc)
    except FetchError as exc:  # a download, a layout or a source the stage cannot use: one line
        raise SystemExit(f"fetch: {exc}") from None


def run(args: argparse.Namespace) -> None:
    params = load_fetch(args.params)
    source_file = Path(args.source_file)
    src = read_source(source_file)
    check_source_dir(src, params, source_file)
    if args.download:
        if src.source == "download":
            fetch_download(params)
        write_state(params, src.source)
        return
    root = fetch_download(params) if src.source == "download" else Path(src.source)
    photos = find_photos(root)
    rows = build_index(photos, Path(args.cache))
    write_index(rows, Path(args.out))
    counts = {
        label: sum(r.label == label for r in rows) for label in sorted({r.label for r in rows})
    }
    log.info("indexed %d files from %s: %s", len(rows), root, counts)


if __name__ == "__main__":
    main()
