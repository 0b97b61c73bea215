"""fetch: data folder layouts, the index, and the download path against a local HTTP server."""

from __future__ import annotations

import hashlib
import io
import os
import re
import signal
import socket
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training import fetch
from training.fetch import FetchError, build_index, download, extract, find_photos, read_index

pytestmark = pytest.mark.train

SERVER = Path(__file__).with_name("range_server.py")


def jpeg_bytes(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def petimages_zip(path: Path, n: int = 3) -> bytes:
    """A small zip laid out like the Microsoft release: PetImages/{Cat,Dog}/N.jpg + Thumbs.db."""
    with zipfile.ZipFile(path, "w") as zf:
        for cls_i, cls in enumerate(("Cat", "Dog")):
            for i in range(n):
                zf.writestr(f"PetImages/{cls}/{i}.jpg", jpeg_bytes(cls_i * 100 + i))
            zf.writestr(f"PetImages/{cls}/Thumbs.db", b"\x00" * 64)
        zf.writestr("readme[1].txt", "photos")
    return path.read_bytes()


@pytest.fixture
def served_zip(tmp_path: Path) -> Iterator:
    """Start range_server.py on a free port; yields start(args) -> (url, log path)."""
    procs: list[subprocess.Popen] = []
    zip_path = tmp_path / "src" / "kagglecatsanddogs.zip"
    zip_path.parent.mkdir()
    data = petimages_zip(zip_path)

    def start(*args: str) -> tuple[str, Path]:
        log = tmp_path / f"ranges-{len(procs)}.log"
        proc = subprocess.Popen(
            [sys.executable, str(SERVER), str(zip_path), "--log", str(log), *args],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        procs.append(proc)
        port = int(proc.stdout.readline())
        return f"http://127.0.0.1:{port}/kagglecatsanddogs.zip", log

    start.data = data  # type: ignore[attr-defined]
    start.sha256 = hashlib.sha256(data).hexdigest()  # type: ignore[attr-defined]
    yield start
    for proc in procs:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


def test_download_verifies_and_extracts_petimages(served_zip, tmp_path: Path) -> None:
    url, _ = served_zip()
    dest = tmp_path / "dl" / "pets.zip"
    got = download(url, dest, sha256=served_zip.sha256, size=len(served_zip.data), timeout_s=10)
    assert got.read_bytes() == served_zip.data
    assert not dest.with_name("pets.zip.part").exists()
    root = extract(got, tmp_path / "dl" / "extracted", served_zip.sha256)
    photos = find_photos(root)
    labels = sorted({label for _, label in photos})
    assert labels == ["cat", "dog"]
    # every file of the class folders is listed (Thumbs.db too: prepare drops it with a reason)
    assert len(photos) == 8
    assert {p.name for p, _ in photos} >= {"0.jpg", "Thumbs.db"}


def test_download_resumes_with_range_after_a_dropped_connection(served_zip, tmp_path) -> None:
    half = len(served_zip.data) // 2
    url, log = served_zip("--drop-after", str(half))
    dest = tmp_path / "pets.zip"
    part = tmp_path / "pets.zip.part"
    kwargs = {"sha256": served_zip.sha256, "size": len(served_zip.data), "timeout_s": 10}
    with pytest.raises(FetchError, match="rerun to resume"):
        download(url, dest, chunk_bytes=1024, **kwargs)
    kept = part.stat().st_size
    assert 0 < kept <= half  # whole chunks received before the drop stay on disk
    assert part.read_bytes() == served_zip.data[:kept]
    download(url, dest, chunk_bytes=1024, **kwargs)
    assert dest.read_bytes() == served_zip.data
    assert log.read_text().splitlines() == ["-", f"bytes={kept}-"]


def test_download_restarts_when_the_server_ignores_range(served_zip, tmp_path) -> None:
    url, log = served_zip("--ignore-range")
    dest = tmp_path / "pets.zip"
    dest.with_name("pets.zip.part").write_bytes(served_zip.data[:100])
    download(url, dest, sha256=served_zip.sha256, size=len(served_zip.data), timeout_s=10)
    assert dest.read_bytes() == served_zip.data
    assert log.read_text().splitlines() == ["bytes=100-"]


def test_download_rejects_a_checksum_mismatch_and_discards_it(served_zip, tmp_path) -> None:
    url, _ = served_zip()
    dest = tmp_path / "pets.zip"
    with pytest.raises(FetchError, match="does not match the pinned"):
        download(url, dest, sha256="0" * 64, size=len(served_zip.data), timeout_s=10)
    assert not dest.exists()
    assert not dest.with_name("pets.zip.part").exists()  # the next run starts clean


def test_download_rejects_a_wrong_size(served_zip, tmp_path) -> None:
    url, _ = served_zip()
    with pytest.raises(FetchError, match="expected"):
        download(url, tmp_path / "p.zip", sha256=served_zip.sha256, size=10, timeout_s=10)


def test_download_reports_an_unreachable_server(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(FetchError, match="rerun to resume"):
        download(f"http://127.0.0.1:{port}/x.zip", tmp_path / "x.zip", sha256="0" * 64, timeout_s=5)


def test_extract_refuses_paths_outside_the_target(tmp_path: Path) -> None:
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../outside.txt", "x")
    with pytest.raises(FetchError, match="unsafe"):
        extract(evil, tmp_path / "out", "stamp")
    assert not (tmp_path / "outside.txt").exists()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_layouts_class_folders_kaggle_flat_and_petimages(tmp_path: Path) -> None:
    _write(tmp_path / "a" / "cat" / "x.jpg", jpeg_bytes(1))
    _write(tmp_path / "a" / "dog" / "y.png", jpeg_bytes(2))
    _write(tmp_path / "a" / "dog" / ".hidden", b"x")
    assert [(p.name, lbl) for p, lbl in find_photos(tmp_path / "a")] == [
        ("x.jpg", "cat"),
        ("y.png", "dog"),
    ]
    _write(tmp_path / "b" / "cat.1.jpg", jpeg_bytes(3))
    _write(tmp_path / "b" / "dog.22.jpg", jpeg_bytes(4))
    _write(tmp_path / "b" / "notes.txt", b"not a photo name")
    assert [lbl for _, lbl in find_photos(tmp_path / "b")] == ["cat", "dog"]
    _write(tmp_path / "c" / "PetImages" / "Cat" / "1.jpg", jpeg_bytes(5))
    _write(tmp_path / "c" / "PetImages" / "Dog" / "1.jpg", jpeg_bytes(6))
    assert [lbl for _, lbl in find_photos(tmp_path / "c")] == ["cat", "dog"]


def test_a_folder_with_one_class_is_an_error(tmp_path: Path) -> None:
    _write(tmp_path / "cat" / "x.jpg", jpeg_bytes(1))
    _write(tmp_path / "cat" / "y.jpg", jpeg_bytes(2))
    _write(tmp_path / "other.txt", b"x")
    with pytest.raises(FetchError, match="one subfolder per class"):
        find_photos(tmp_path)
    with pytest.raises(FetchError, match="does not exist"):
        find_photos(tmp_path / "missing")
    with pytest.raises(FetchError, match="not a folder"):
        find_photos(tmp_path / "other.txt")


def test_kaggles_competition_zips_are_named_not_taken_for_classes(tmp_path: Path) -> None:
    """Kaggle's train.zip (cat.1.jpg, dog.1.jpg) beside test1.zip (1.jpg, ...): the two folders
    are not the classes "train" and "test1" (a model of which folder a photo came from was
    trained without a word); the error says which folder to point at."""
    _write(tmp_path / "train" / "cat.1.jpg", jpeg_bytes(1))
    _write(tmp_path / "train" / "dog.1.jpg", jpeg_bytes(2))
    _write(tmp_path / "test1" / "1.jpg", jpeg_bytes(3))
    with pytest.raises(FetchError, match=r"train holds files named like cat.1.jpg \(cat, dog\)"):
        find_photos(tmp_path)
    assert [lbl for _, lbl in find_photos(tmp_path / "train")] == ["cat", "dog"]


def test_files_no_class_takes_are_named_in_the_log(tmp_path: Path, caplog) -> None:
    """Every file the layout leaves out is logged with why: beside the class folders, a
    linked folder, a flat folder's file without a class name; a broken link is indexed (without
    a hash: prepare reports it unreadable); macOS's __MACOSX folder is no class; a name that is
    not UTF-8 is skipped, named, instead of failing the index; a wrapping folder is said."""
    caplog.set_level("WARNING", logger="training.fetch")
    a = tmp_path / "a"
    _write(a / "cat" / "x.jpg", jpeg_bytes(1))
    _write(a / "dog" / "y.jpg", jpeg_bytes(2))
    _write(a / "loose.jpg", jpeg_bytes(3))
    _write(a / "__MACOSX" / "cat" / "._x.jpg", b"resource fork")
    (tmp_path / "elsewhere").mkdir()
    _write(tmp_path / "elsewhere" / "z.jpg", jpeg_bytes(4))
    (a / "dog" / "linked").symlink_to(tmp_path / "elsewhere")
    (a / "dog" / "gone.jpg").symlink_to(tmp_path / "nothing-here.jpg")
    odd = os.fsdecode(b"caf\xe9.jpg")  # a Latin-1 name from an old camera or zip
    _write(a / "cat" / odd, jpeg_bytes(5))
    photos = find_photos(a)
    assert sorted((p.name, lbl) for p, lbl in photos) == sorted(
        [("x.jpg", "cat"), (odd, "cat"), ("y.jpg", "dog"), ("gone.jpg", "dog")]
    )
    log = caplog.text
    assert f"{a / 'loose.jpg'}: beside the class folders, in no class" in log
    assert f"{a / 'dog' / 'linked'}: a linked folder, not followed" in log
    rows = build_index(photos)
    assert [(Path(r.path).name, r.sha256 == "") for r in rows] == [
        ("x.jpg", False), ("gone.jpg", True), ("y.jpg", False)
    ]  # fmt: skip
    assert "its name is not valid UTF-8" in caplog.text
    fetch.write_index(rows, tmp_path / "index.csv")  # every row it holds is UTF-8 text
    b = tmp_path / "b"
    _write(b / "cat.1.jpg", jpeg_bytes(6))
    _write(b / "dog.2.jpg", jpeg_bytes(7))
    _write(b / "cat_3.jpg", jpeg_bytes(8))
    assert [lbl for _, lbl in find_photos(b)] == ["cat", "dog"]
    assert f"{b / 'cat_3.jpg'}: not named like cat.1.jpg, so in no class" in caplog.text
    c = tmp_path / "c"
    _write(c / "photos" / "cat" / "1.jpg", jpeg_bytes(9))
    _write(c / "photos" / "dog" / "1.jpg", jpeg_bytes(10))
    _write(c / "__MACOSX" / "photos" / "._1.jpg", b"resource fork")
    assert [lbl for _, lbl in find_photos(c)] == ["cat", "dog"]
    assert "holds one folder, photos: reading it as the data source" in caplog.text


def _local_source(photos: Path) -> None:
    """In the current folder: params.yaml (an unreachable download) and data/source.yaml
    naming ``photos``, as ``make pipeline DATA=photos`` writes it."""
    Path("params.yaml").write_text(
        "fetch:\n  url: http://127.0.0.1:1/x.zip\n  sha256: abc\n  size: 1\n"
        "  download_dir: data/download\n"
    )
    Path("data").mkdir()
    Path("data/source.yaml").write_text(f'source: "{photos}"\nsource_dir: "{photos}"\n')


def test_an_empty_class_folder_is_named_and_main_says_it_in_one_line(
    tmp_path: Path, monkeypatch
) -> None:
    photos = tmp_path / "photos"
    _write(photos / "cat" / "a.jpg", jpeg_bytes(1))
    (photos / "dog").mkdir()
    with pytest.raises(
        FetchError, match=r"found classes \['cat'\] \(.*dog: an empty class folder\)"
    ):
        find_photos(photos)
    monkeypatch.chdir(tmp_path)
    _local_source(photos)
    with pytest.raises(SystemExit, match=r"^fetch: .*dog: an empty class folder"):
        fetch.main([])


def test_main_indexes_a_local_folder_and_sees_content_changes(tmp_path, monkeypatch) -> None:
    photos = tmp_path / "photos"
    _write(photos / "cat" / "a.jpg", jpeg_bytes(1))
    _write(photos / "dog" / "b.jpg", jpeg_bytes(2))
    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.chdir(repo)
    _local_source(photos)
    fetch.main([])
    first = Path("data/raw/index.csv").read_text()
    rows = read_index(Path("data/raw/index.csv"))
    assert [(r.label, r.sha256) for r in rows] == [
        ("cat", hashlib.sha256(jpeg_bytes(1)).hexdigest()),
        ("dog", hashlib.sha256(jpeg_bytes(2)).hexdigest()),
    ]
    assert rows[0].path == os.path.relpath(photos / "cat" / "a.jpg", repo)
    fetch.main([])
    assert Path("data/raw/index.csv").read_text() == first  # same photos, same bytes
    (photos / "cat" / "a.jpg").write_bytes(jpeg_bytes(9))
    fetch.main([])
    assert Path("data/raw/index.csv").read_text() != first


def test_clones_reading_photos_through_a_link_write_the_same_index(tmp_path, monkeypatch) -> None:
    # two clones at different depths, each with ../shared linking to one photo folder elsewhere
    real = tmp_path / "store" / "photos"
    _write(real / "cat" / "a.jpg", jpeg_bytes(1))
    _write(real / "dog" / "b.jpg", jpeg_bytes(2))
    indexes = []
    for clone in (tmp_path / "ci" / "x", tmp_path / "home" / "me" / "work" / "catsdogs"):
        clone.mkdir(parents=True)
        (clone.parent / "shared").symlink_to(tmp_path / "store")
        monkeypatch.chdir(clone)
        rows = build_index(find_photos(Path("../shared/photos")))
        indexes.append([(r.path, r.sha256) for r in rows])
    assert indexes[0] == indexes[1]
    assert indexes[0][0][0] == os.path.join("..", "shared", "photos", "cat", "a.jpg")
    # a link followed by .. is read where the link points, as the system reads it
    (tmp_path / "ci" / "x" / "lnk").symlink_to(real / "cat")
    monkeypatch.chdir(tmp_path / "ci" / "x")
    (row,) = build_index([(Path("lnk/../dog/b.jpg"), "dog")])
    assert Path(row.path).resolve() == (real / "dog" / "b.jpg").resolve()


def test_index_cache_is_only_a_shortcut(tmp_path: Path) -> None:
    _write(tmp_path / "cat" / "a.jpg", jpeg_bytes(1))
    _write(tmp_path / "dog" / "b.jpg", jpeg_bytes(2))
    photos = find_photos(tmp_path)
    cache = tmp_path / "cache.json"
    assert build_index(photos, cache) == build_index(photos, cache) == build_index(photos, None)


def test_a_photo_that_cannot_be_read_is_indexed_and_prepare_reports_it(
    tmp_path: Path, monkeypatch
) -> None:
    """One unreadable file (permissions, an I/O error) stopped the fetch stage: it is indexed
    without a hash, and prepare drops it as ``unreadable`` with the error's name."""
    from catsdogs.preprocessing import PreprocessSpec
    from training.prepare import check_file

    _write(tmp_path / "cat" / "a.jpg", jpeg_bytes(1))
    _write(tmp_path / "dog" / "b.jpg", jpeg_bytes(2))
    locked = (tmp_path / "dog" / "b.jpg").resolve()
    real_hash, real_read = fetch.file_sha256, Path.read_bytes

    def refused(path: Path) -> bool:
        return Path(path).resolve() == locked

    def hash_it(path: Path) -> str:
        if refused(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_hash(path)

    def read_it(path: Path) -> bytes:
        if refused(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_read(path)

    monkeypatch.setattr(fetch, "file_sha256", hash_it)
    rows = build_index(find_photos(tmp_path))
    assert [(r.label, r.sha256 != "") for r in rows] == [("cat", True), ("dog", False)]
    monkeypatch.setattr(Path, "read_bytes", read_it)
    checked = check_file(rows[1], PreprocessSpec(input_size=32, resize=36), 8, 10**6)
    assert (checked.reason, checked.detail) == ("unreadable", "PermissionError")
    assert check_file(rows[0], PreprocessSpec(input_size=32, resize=36), 8, 10**6).reason is None


def test_missing_source_file_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="make pipeline"):
        fetch.read_source(tmp_path / "source.yaml")


def test_main_downloads_extracts_and_indexes(served_zip, tmp_path, monkeypatch) -> None:
    url, log = served_zip()
    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.chdir(repo)
    Path("params.yaml").write_text(
        f"fetch:\n  url: {url}\n  sha256: {served_zip.sha256}\n  size: {len(served_zip.data)}\n"
        "  download_dir: data/download\n  timeout_s: 10.0\n"
    )
    Path("data").mkdir()
    Path("data/source.yaml").write_text('source: "download"\nsource_dir: "data/download"\n')
    fetch.main(["--download"])  # the download stage
    assert Path("data/download/kagglecatsanddogs.zip").read_bytes() == served_zip.data
    assert "sha256: " + served_zip.sha256 in Path("data/download/state.txt").read_text()
    assert not Path("data/raw").exists()
    fetch.main([])  # the fetch stage: indexes the extracted photos without fetching again
    rows = read_index(Path("data/raw/index.csv"))
    assert len(rows) == 8
    assert {r.label for r in rows} == {"cat", "dog"}
    assert all(r.path.startswith("data/download/extracted/PetImages/") for r in rows)
    fetch.main(["--download"])  # verified zip and extraction are reused
    fetch.main([])
    assert read_index(Path("data/raw/index.csv")) == rows
    assert log.read_text().splitlines() == ["-"]  # one GET in all


def test_download_step_for_a_local_folder_never_touches_the_network(
    served_zip, tmp_path, monkeypatch
) -> None:
    url, log = served_zip()
    photos = tmp_path / "photos"
    _write(photos / "cat" / "a.jpg", jpeg_bytes(1))
    _write(photos / "dog" / "b.jpg", jpeg_bytes(2))
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(
        f"fetch:\n  url: {url}\n  sha256: {served_zip.sha256}\n  size: 1\n"
        "  download_dir: data/download\n"
    )
    Path("data").mkdir()
    Path("data/source.yaml").write_text(f'source: "{photos}"\nsource_dir: "{photos}"\n')
    fetch.main(["--download"])
    assert [p.name for p in Path("data/download").iterdir()] == ["state.txt"]
    fetch.main([])
    assert len(read_index(Path("data/raw/index.csv"))) == 2
    assert not log.exists() or log.read_text() == ""


def test_source_dir_must_be_the_folder_the_stage_reads(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(
        "fetch:\n  url: http://127.0.0.1:1/x.zip\n  sha256: abc\n  size: 1\n"
        "  download_dir: data/download\n"
    )
    Path("data").mkdir()
    Path("data/source.yaml").write_text('source: "photos"\nsource_dir: "other"\n')
    with pytest.raises(SystemExit, match=r"^fetch: .*make pipeline DATA="):
        fetch.main([])
    Path("data/source.yaml").write_text('source: "download"\nsource_dir: "photos"\n')
    with pytest.raises(SystemExit, match=r"^fetch: .*reads 'data/download'"):
        fetch.main(["--download"])
    Path("data/source.yaml").write_text('source: "download"\nsource_dir: 3\n')
    with pytest.raises(SystemExit, match=r"^fetch: .*source_dir"):
        fetch.main([])
    # a download that cannot reach its server: one line saying so, not a traceback
    Path("data/source.yaml").write_text('source: "download"\nsource_dir: "data/download"\n')
    with pytest.raises(SystemExit, match=r"^fetch: .*rerun to resume"):
        fetch.main(["--download"])


def dvc_copy(repo: Path) -> dict[str, str]:
    """dvc.yaml, params.yaml, the Makefile and the fetch code in a fresh git repo; returns env."""
    root = Path(__file__).resolve().parents[2]
    for rel in ("dvc.yaml", "params.yaml", "Makefile", ".dvc/config", ".dvcignore"):
        _write(repo / rel, (root / rel).read_bytes())
    for rel in ("training/__init__.py", "training/fetch.py", "training/params.py"):
        _write(repo / rel, (root / rel).read_bytes())
    for rel in ("catsdogs/__init__.py", "catsdogs/hashing.py", "catsdogs/telemetry.py"):
        _write(repo / rel, (root / rel).read_bytes())
    (repo / ".gitignore").write_text("/data/\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "PYTHONPATH"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", DVC_NO_ANALYTICS="1")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], [*git, "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
    return env


def sh(cmd: list[str], repo: Path, env: dict[str, str]) -> str:
    out = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def ran(stdout: str) -> list[str]:
    return sorted(ln.split("'")[1] for ln in stdout.splitlines() if ln.startswith("Running stage"))


@pytest.mark.slow
def test_dvc_reruns_fetch_only_when_the_photos_change(served_zip, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    env = dvc_copy(repo)
    url, log = served_zip()
    params = (repo / "params.yaml").read_text()
    params = re.sub(r"(?m)^  url: .*$", f"  url: {url}", params)
    params = re.sub(r"(?m)^  sha256: .*$", f"  sha256: {served_zip.sha256}", params)
    params = re.sub(r"(?m)^  size: \d+", f"  size: {len(served_zip.data)}", params)
    # not the default folder: `make data-source` must take it from params.yaml too
    params = re.sub(r"(?m)^  download_dir: \S+", "  download_dir: data/elsewhere", params)
    (repo / "params.yaml").write_text(params)
    photos, other = tmp_path / "photos", tmp_path / "other"
    for folder in (photos, other):
        _write(folder / "cat" / "a.jpg", jpeg_bytes(1))
        _write(folder / "dog" / "b.jpg", jpeg_bytes(2))
    # local mode: fetch does not depend on download (a state file only), so name both
    repro = ["dvc", "repro", "download", "fetch"]
    status = ["dvc", "status", "--with-deps", "download", "fetch"]
    index = repo / "data" / "raw" / "index.csv"

    sh(["make", "-s", "data-source", f"DATA={photos}"], repo, env)
    assert ran(sh(repro, repo, env)) == ["download", "fetch"]
    assert len(read_index(index)) == 2
    again = sh(repro, repo, env)  # nothing changed: no stage runs, fetch included
    assert ran(again) == [], again
    assert "Stage 'fetch' didn't change, skipping" in again
    assert "Data and pipelines are up to date." in sh(status, repo, env)

    _write(photos / "dog" / "c.jpg", jpeg_bytes(3))  # a new photo
    assert "fetch:" in sh(status, repo, env)
    assert ran(sh(repro, repo, env)) == ["fetch"]
    assert len(read_index(index)) == 3
    (photos / "dog" / "b.jpg").unlink()  # a removed photo (DVC may restore from its run cache)
    assert "fetch" in sh(repro, repo, env)
    assert [r.path.split("/")[-1] for r in read_index(index)] == ["a.jpg", "c.jpg"]
    sh(["make", "-s", "data-source", f"DATA={other}"], repo, env)  # DATA points elsewhere
    assert ran(sh(repro, repo, env)) == ["download", "fetch"]
    assert all("/other/" in f"/{r.path}" for r in read_index(index))
    assert ran(sh(repro, repo, env)) == []
    assert not log.exists() or log.read_text() == ""  # local folders never touch the network

    sh(["make", "-s", "data-source"], repo, env)  # the download
    assert ran(sh(repro, repo, env)) == ["download", "fetch"]
    rows = read_index(index)
    assert len(rows) == 8
    assert all(r.path.startswith("data/elsewhere/extracted/") for r in rows)
    assert ran(sh(repro, repo, env)) == []
    assert "Data and pipelines are up to date." in sh(status, repo, env)
    assert log.read_text().splitlines() == ["-"]  # downloaded once, never again


def test_a_class_of_a_stray_name_is_warned_of(tmp_path: Path, caplog) -> None:
    """A camera's IMG.0001.jpg in a flat Kaggle folder is a class "img" of one photo: indexed
    (the layout's rule), but said, since every class becomes an answer of the model."""
    caplog.set_level("WARNING", logger="training.fetch")
    for i in range(60):
        _write(tmp_path / f"cat.{i}.jpg", jpeg_bytes(i))
        _write(tmp_path / f"dog.{i}.jpg", jpeg_bytes(100 + i))
    _write(tmp_path / "IMG.0001.jpg", jpeg_bytes(999))
    labels = [lbl for _, lbl in find_photos(tmp_path)]
    assert labels.count("img") == 1
    assert "class 'img' has 1 photo(s) against 60 for the largest" in caplog.text
    assert "the part of a file's name before its first dot" in caplog.text
    assert "class 'cat'" not in caplog.text
