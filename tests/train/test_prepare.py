"""prepare: every kind of bad file is dropped with its reason or converted; hash-stable splits."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from catsdogs.manifest import MANIFEST_COLUMNS
from catsdogs.preprocessing import PreprocessSpec, preprocess_bytes
from training import prepare
from training.fetch import IndexRow
from training.params import PrepareParams
from training.prepare import check_all, select, split_of

pytestmark = pytest.mark.train

RNG = np.random.default_rng(7)
SPEC = PreprocessSpec(input_size=64, resize=72)


def photo(size=(80, 60), mode="RGB", fmt="JPEG", seed=0, **save) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def corrupt_jpeg() -> bytes:
    """A JPEG whose header parses but whose Huffman table is garbage: decoding fails."""
    good = photo(seed=1)
    i = good.index(b"\xff\xc4")  # DHT marker
    return good[: i + 4] + b"\x00" * 30 + good[i + 34 :]


def png16() -> bytes:
    arr = (np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20).astype(np.uint16)
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    img.save(buf, "PNG")
    return buf.getvalue()


def rgba_png() -> bytes:
    arr = RNG.integers(0, 255, (50, 70, 4), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")  # (H, W, 4) uint8 is RGBA
    return buf.getvalue()


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (60, 40), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def oversized_png() -> bytes:
    buf = io.BytesIO()  # 1-bit and all black: tiny on disk, 49 megapixels when decoded
    Image.new("1", (7000, 7000)).save(buf, "PNG")
    return buf.getvalue()


# name -> (bytes, expected reason or None for kept, expected source mode when kept)
CASES = {
    "corrupt.jpg": (corrupt_jpeg(), "corrupt", None),
    "truncated.jpg": (photo(seed=2)[:400], "corrupt", None),
    "empty.jpg": (b"", "empty", None),
    "text.jpg": (b"this is a text file, not a photo\n", "not_an_image", None),
    "tiny.png": (photo((16, 16), fmt="PNG", seed=3), "too_small", None),
    "huge.png": (oversized_png(), "too_many_pixels", None),
    "cmyk.jpg": (photo(mode="CMYK", seed=4), None, "CMYK"),
    "gray.jpg": (photo(mode="L", seed=5), None, "L"),
    "palette.png": (photo(mode="P", fmt="PNG", seed=6), None, "P"),
    "sixteen.png": (png16(), None, "I;16"),
    "alpha.png": (rgba_png(), None, "RGBA"),
    "animated.gif": (animated_gif(), None, "P"),
    "fine.jpg": (photo(seed=8), None, "RGB"),
}


def make_index(tmp_path: Path, files: dict[str, bytes], label: str = "cat") -> list[IndexRow]:
    rows = []
    for name, data in files.items():
        path = tmp_path / label / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        rows.append(IndexRow(str(path), label, hashlib.sha256(data).hexdigest(), len(data)))
    return rows


@pytest.mark.parametrize("workers", [1, 2])
def test_each_bad_file_is_dropped_with_its_reason_or_converted(tmp_path, workers) -> None:
    rows = make_index(tmp_path, {k: v[0] for k, v in CASES.items()})
    params = PrepareParams(min_side=32, max_pixels=40_000_000, workers=workers)
    checked = {Path(c.path).name: c for c in check_all(rows, SPEC, params)}
    for name, (data, reason, mode) in CASES.items():
        c = checked[name]
        assert c.reason == reason, name
        if reason is None:
            assert c.mode == mode, name
            assert c.sha256 == hashlib.sha256(data).hexdigest()
            # brightness is the mean of exactly what the server feeds the model
            assert c.brightness == round(float(preprocess_bytes(data, SPEC).mean()), 4)
            assert (c.width, c.height) == Image.open(io.BytesIO(data)).size
        else:
            assert c.detail, name


def test_converted_images_are_rgb_model_input() -> None:
    for name in ("cmyk.jpg", "sixteen.png", "alpha.png", "animated.gif", "palette.png"):
        arr = preprocess_bytes(CASES[name][0], SPEC)
        assert arr.shape == (64, 64, 3)
        assert arr.dtype == np.uint8
    # 16-bit data is scaled, not clipped to white; alpha is composited on white, not black
    assert 0 < preprocess_bytes(png16(), SPEC).mean() < 255
    transparent = io.BytesIO()
    Image.new("RGBA", (50, 50), (0, 0, 0, 0)).save(transparent, "PNG")
    assert preprocess_bytes(transparent.getvalue(), SPEC).min() == 255


def test_duplicates_and_label_conflicts(tmp_path: Path) -> None:
    a, b = photo(seed=10), photo(seed=11)
    rows = make_index(tmp_path, {"a.jpg": a, "a_copy.jpg": a, "b.jpg": b}, "cat")
    rows += make_index(tmp_path, {"b_as_dog.jpg": b, "c.jpg": photo(seed=12)}, "dog")
    params = PrepareParams(workers=1)
    kept, dropped = select(check_all(rows, SPEC, params), params)
    kept_names = sorted(Path(c.path).name for c, _ in kept)
    assert kept_names == ["a.jpg", "c.jpg"]
    reasons = {Path(d["path"]).name: d["reason"] for d in dropped}
    assert reasons == {
        "a_copy.jpg": "duplicate",
        "b.jpg": "label_conflict",
        "b_as_dog.jpg": "label_conflict",
    }


def fake_hashes(n: int, seed: int) -> list[str]:
    return [hashlib.sha256(f"{seed}-{i}".encode()).hexdigest() for i in range(n)]


def test_split_is_deterministic_and_roughly_the_asked_fractions() -> None:
    hashes = fake_hashes(4000, 0)
    first = [split_of(h, 0.15, 0.15, "salt") for h in hashes]
    assert first == [split_of(h, 0.15, 0.15, "salt") for h in hashes]
    counts = Counter(first)
    assert abs(counts["test"] / 4000 - 0.15) < 0.03
    assert abs(counts["val"] / 4000 - 0.15) < 0.03
    assert first != [split_of(h, 0.15, 0.15, "other salt") for h in hashes]


def _checked(hashes: list[str], label: str):
    return [prepare.Checked(f"{label}/{h[:12]}.jpg", label, h, width=50, height=50) for h in hashes]


def test_adding_photos_never_moves_existing_ones() -> None:
    params = PrepareParams(val_fraction=0.2, test_fraction=0.2)
    before = _checked(fake_hashes(300, 1), "cat") + _checked(fake_hashes(300, 2), "dog")
    added = _checked(fake_hashes(200, 3), "cat") + _checked(fake_hashes(50, 4), "dog")
    split_before = {c.path: s for c, s in select(before, params)[0]}
    split_after = {c.path: s for c, s in select(before + added, params)[0]}
    assert len(split_after) == 850
    assert all(split_after[p] == s for p, s in split_before.items())
    # stratified: each class gets about the asked share of each split
    for label in ("cat", "dog"):
        labels = [s for p, s in split_after.items() if p.startswith(label)]
        assert abs(labels.count("test") / len(labels) - 0.2) < 0.07


def test_max_per_class_caps_each_class(tmp_path: Path) -> None:
    params = PrepareParams(max_per_class=25)
    rows = _checked(fake_hashes(100, 5), "cat") + _checked(fake_hashes(40, 6), "dog")
    kept, _ = select(rows, params)
    assert Counter(c.label for c, _ in kept) == {"cat": 25, "dog": 25}
    assert kept == select(rows, params)[0]  # the same subset every time


def test_max_pixels_may_not_exceed_what_train_decodes(tmp_path, monkeypatch, capsys) -> None:
    """train, export and evaluate decode under the default pixel limit: a photo prepare kept
    past it stopped the train stage."""
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text("prepare:\n  max_pixels: 50000000\ntrain: {}\n")
    with pytest.raises(SystemExit) as stopped:
        prepare.main(["--index", "index.csv"])
    assert stopped.value.code == 2  # a bad parameter, as in every stage
    assert capsys.readouterr().err == "prepare: prepare.max_pixels: must be at most 40000000\n"


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_brightness_is_measured_with_the_models_resampling(
    tmp_path, monkeypatch, interpolation
) -> None:
    """The drift reference's brightness is the model input's: prepare resized with the default
    filter whatever train.interpolation said, and with bicubic the export stage found the
    training figures off by more than its tolerance and built the reference from fewer photos."""
    monkeypatch.chdir(tmp_path)
    files = {f"c{i}.jpg": photo(size=(300, 200), seed=60 + i) for i in range(4)}
    rows = make_index(tmp_path / "photos", files)
    rows += make_index(tmp_path / "photos", {"d.jpg": photo(size=(300, 200), seed=70)}, "dog")
    with open("index.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["path", "label", "sha256", "size"], *rows])
    Path("params.yaml").write_text(
        "prepare:\n  workers: 1\n  val_fraction: 0.2\n  test_fraction: 0.2\n"
        f"train:\n  input_size: 64\n  resize: 72\n  interpolation: {interpolation}\n"
    )
    prepare.main(["--index", "index.csv", "--manifest", "manifest.csv", "--report", "r.json"])
    spec = PreprocessSpec(input_size=64, resize=72, interpolation=interpolation)
    with open("manifest.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            want = preprocess_bytes(Path(row["path"]).read_bytes(), spec).mean()
            assert float(row["brightness"]) == pytest.approx(want, abs=1e-4), row["path"]


def test_main_writes_manifest_and_report_naming_dropped_files(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cats = make_index(tmp_path / "photos", {f"c{i}.jpg": photo(seed=20 + i) for i in range(6)})
    dogs = make_index(
        tmp_path / "photos", {f"d{i}.jpg": photo(seed=40 + i) for i in range(6)}, "dog"
    )
    bad = make_index(tmp_path / "photos", {"text.jpg": b"text", "trunc.jpg": photo()[:300]}, "dog")
    index = tmp_path / "index.csv"
    with open(index, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "sha256", "size"])
        writer.writerows(cats + dogs + bad)
    Path("params.yaml").write_text(
        "prepare:\n  workers: 1\n  val_fraction: 0.25\n  test_fraction: 0.25\n"
        "train:\n  input_size: 64\n  resize: 72\n"
    )
    prepare.main(["--index", str(index), "--manifest", "m/manifest.csv", "--report", "r/data.json"])
    with open("m/manifest.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == MANIFEST_COLUMNS
        rows = list(reader)
    assert len(rows) == 12
    assert {r["split"] for r in rows} <= {"train", "val", "test"}
    report = json.loads(Path("r/data.json").read_text())
    assert report["files"] == 14
    assert report["kept"] == 12
    assert report["per_class"] == {"cat": 6, "dog": 6}
    assert sum(report["per_split"].values()) == 12
    assert report["dropped_by_reason"] == {"corrupt": 1, "not_an_image": 1}
    assert {Path(d["path"]).name: d["reason"] for d in report["dropped"]} == {
        "text.jpg": "not_an_image",
        "trunc.jpg": "corrupt",
    }
    assert (report["capped_count"], report["capped_by_class"]) == (0, {"cat": 0, "dog": 0})
    # prepare.max_per_class: the photos it leaves out are counted apart from the dropped ones
    # (the report said 10 kept of 14 files, 2 dropped, and nothing of the other 2)
    text = Path("params.yaml").read_text().replace("prepare:\n", "prepare:\n  max_per_class: 5\n")
    Path("params.yaml").write_text(text)
    prepare.main(["--index", str(index), "--manifest", "m/manifest.csv", "--report", "r/data.json"])
    report = json.loads(Path("r/data.json").read_text())
    assert (report["files"], report["kept"], report["dropped_count"]) == (14, 10, 2)
    assert report["capped_count"] == 2
    assert report["capped_by_class"] == {"cat": 1, "dog": 1}


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stopped_prepare_is_one_line_and_writes_nothing(tmp_path, sig, code) -> None:
    """Ctrl-C (SIGINT to the process group) or SIGTERM while the photos are checked: one line
    for Ctrl-C and the shell's codes, no traceback, no manifest. Ctrl-C printed a traceback from
    each pool worker besides the stage's own, and a stop could hang for good when a worker died
    holding the process pool's task-queue lock (the stage now checks on threads)."""
    import select

    from tests.train.export_helpers import shared_photos
    from tests.train.process_helpers import process_group, stop_group

    index = tmp_path / "index.csv"
    with open(index, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "sha256", "size"])
        for _ in range(3):  # long enough to be stopped midway
            for path, label in shared_photos(1900):
                writer.writerow([str(path), label, "0" * 64, path.stat().st_size])
    (tmp_path / "params.yaml").write_text(
        "prepare:\n  workers: 2\ntrain:\n  input_size: 64\n  resize: 72\n"
    )
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "training.prepare", "--index", str(index)]
    with process_group(cmd, tmp_path, {**os.environ, "PYTHONPATH": str(root)}) as proc:
        # the progress bar says the photos are being checked (it has no newline to wait for)
        fd, seen = proc.stdout.fileno(), b""
        deadline = time.monotonic() + 60
        while b"prepare:" not in seen and proc.poll() is None and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.1)[0]:
                seen += os.read(fd, 65536)
        time.sleep(0.5)  # checking photos
        assert proc.poll() is None, "prepare ended before it could be stopped"
        output = seen.decode(errors="replace") + stop_group(proc, sig)
    assert proc.returncode == code, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert not (tmp_path / "data" / "prepared" / "manifest.csv").exists()
    if sig == signal.SIGINT:
        assert "prepare: stopped (Ctrl-C)" in output
