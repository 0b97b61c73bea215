"""Decoding limits of ``catsdogs.preprocessing``: formats, shapes, modes, memory, budget hook.

The model input must be what it always was: the whole-image path below (:func:`reference`:
orientation, every pixel converted to RGB, Pillow's ``resize`` of the whole picture, the centre
crop) is the definition, and the banded implementation must give the same bytes for every mode,
orientation, shape and filter. Memory is measured in a fresh process per file (peak RSS).
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image, ImageOps

from catsdogs import preprocessing
from catsdogs.preprocessing import (
    ALLOWED_FORMATS,
    DEFAULT_MAX_PIXELS,
    MAX_ASPECT_RATIO,
    MIN_SIDE,
    ImageDecodeError,
    PreprocessSpec,
    decode_image,
    preprocess_bytes_info,
    preprocess_image,
)

pytestmark = pytest.mark.serve

TINY = PreprocessSpec(input_size=32, resize=36)
FULL = PreprocessSpec()
RED = (200, 30, 30)
MB = 1 << 20
ORIENTATIONS = range(1, 9)  # EXIF values; 1 is upright


def encode(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def noise(mode: str, size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A picture of ``mode`` with every pixel different, so any misplaced sample shows."""
    rng = np.random.default_rng(seed)
    w, h = size
    if mode.startswith("I;16"):
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16)).convert(mode)
    if mode == "I":
        return Image.fromarray(rng.integers(-50, 70000, (h, w), dtype=np.int32))
    if mode == "F":
        return Image.fromarray(rng.normal(0.0, 10.0, (h, w)).astype(np.float32))
    rgba = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    if mode in ("P", "P+transparency", "PA"):
        pal = rgba.convert("RGB").quantize(64)
        if mode == "P+transparency":
            pal.info["transparency"] = 3
        return pal.convert("PA") if mode == "PA" else pal
    return rgba.convert(mode)


# ---------------------------------------------------------------------- the definition
def whole_rgb(img: Image.Image) -> Image.Image:
    """Every pixel to 8-bit RGB at once: 16-bit scaled, alpha composited on white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr8 = np.clip(arr * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8).convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        arr8 = np.clip((arr - lo) * scale + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8).convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def reference(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """The model input by definition: whole picture to RGB, whole ``resize``, centre crop."""
    rgb = whole_rgb(img)
    w, h = rgb.size
    s = spec.input_size
    scale = spec.resize / min(w, h)
    new_w, new_h = max(s, round(w * scale)), max(s, round(h * scale))
    big = rgb.resize((new_w, new_h), preprocessing._RESAMPLE[spec.interpolation])
    left, top = (new_w - s) // 2, (new_h - s) // 2
    return np.asarray(big.crop((left, top, left + s, top + s)), dtype=np.uint8)


def decoded_reference(data: bytes, spec: PreprocessSpec) -> np.ndarray:
    """:func:`reference` after Pillow's own decode (JPEG draft) and ImageOps.exif_transpose."""
    img = Image.open(io.BytesIO(data))
    if img.format == "JPEG":
        img.draft("RGB", (spec.resize, spec.resize))
    img.load()
    return reference(ImageOps.exif_transpose(img), spec)


def with_orientation(img: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "PNG", exif=exif.tobytes())


PNG_MODES = ["RGB", "L", "1", "P", "P+transparency", "RGBA", "LA", "I;16"]


@pytest.mark.parametrize("orientation", ORIENTATIONS)
@pytest.mark.parametrize("mode", PNG_MODES)
def test_png_of_every_mode_and_orientation_is_the_reference(mode: str, orientation: int) -> None:
    """PNG keeps each of these modes as stored; the EXIF orientation comes from its eXIf chunk."""
    data = with_orientation(noise(mode, (53, 37)), orientation)
    got = preprocess_bytes_info(data, TINY)
    np.testing.assert_array_equal(got.array, decoded_reference(data, TINY))
    assert (got.width, got.height) == (53, 37)  # as stored, before orientation


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
@pytest.mark.parametrize("progressive", [False, True])
def test_jpeg_is_the_reference(mode: str, progressive: bool) -> None:
    data = encode(noise(mode, (700, 530)), "JPEG", quality=90, progressive=progressive)
    np.testing.assert_array_equal(
        preprocess_bytes_info(data, FULL).array, decoded_reference(data, FULL)
    )


@pytest.mark.parametrize("mode", ["I", "F", "PA", "RGBa", "I;16B", "YCbCr", "LAB", "HSV"])
def test_other_modes_are_the_reference(mode: str) -> None:
    """Modes an upload does not decode to, for callers of preprocess_image."""
    converted = mode in ("YCbCr", "LAB", "HSV")
    img = noise("RGB", (61, 45)).convert(mode) if converted else noise(mode, (61, 45))
    np.testing.assert_array_equal(preprocess_image(img, TINY), reference(img, TINY))


# (width, height): ordinary, Pillow's vertical-pass-first case, up- and downscaling, 50:1 both ways
SHAPES = [(64, 48), (48, 64), (38, 100), (100, 38), (300, 300), (20, 20), (12, 600), (600, 12)]


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "lanczos", "nearest"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{w}x{h}" for w, h in SHAPES])
@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_every_shape_and_filter_is_the_reference(
    mode: str, shape: tuple[int, int], interpolation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = PreprocessSpec(input_size=24, resize=30, interpolation=interpolation)
    img = noise(mode, shape, seed=sum(shape))
    want = reference(img, spec)
    np.testing.assert_array_equal(preprocess_image(img, spec), want)
    monkeypatch.setattr(preprocessing, "_BAND_PIXELS", 257)  # many bands, odd boundaries
    np.testing.assert_array_equal(preprocess_image(img, spec), want)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_large_rotated_photo_shape_is_the_reference(
    orientation: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The production spec on a portrait that takes Pillow's other pass order, in bands."""
    monkeypatch.setattr(preprocessing, "_BAND_PIXELS", 20_000)
    data = with_orientation(noise("RGBA", (300, 1000)), orientation)
    np.testing.assert_array_equal(
        preprocess_bytes_info(data, FULL).array, decoded_reference(data, FULL)
    )


def test_decode_image_is_upright_rgb_with_the_stored_size() -> None:
    data = with_orientation(noise("RGBA", (40, 20)), 6)  # 90 degrees: 20 x 40 upright
    img = decode_image(data)
    assert (img.mode, img.size, img.info["source_size"]) == ("RGB", (20, 40), (40, 20))
    want = whole_rgb(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))
    np.testing.assert_array_equal(np.asarray(img), np.asarray(want))


def test_worker_threads_get_the_same_bytes() -> None:
    """The server decodes on several threads at once; nothing in the path is shared state."""
    from concurrent.futures import ThreadPoolExecutor

    inputs = [
        with_orientation(noise(m, (90, 50), seed=i), 1 + i % 8) for i, m in enumerate(PNG_MODES)
    ]
    inputs += [b"not an image", encode(Image.new("RGB", (48, 40)), "TGA")]

    def outcome(data: bytes) -> bytes | str:
        try:
            return preprocess_bytes_info(data, TINY).array.tobytes()
        except ImageDecodeError as exc:
            return exc.code

    alone = [outcome(data) for data in inputs]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(outcome, inputs * 8))
    assert together == alone * 8


# ---------------------------------------------------------------------- formats
def allowed_samples() -> dict[str, bytes]:
    img = Image.new("RGB", (48, 40), RED)
    second = Image.new("RGB", (48, 40), (30, 30, 200))
    return {
        "JPEG": encode(img, "JPEG", quality=95),
        "MPO": encode(img, "MPO", save_all=True, append_images=[second], quality=95),
        "PNG": encode(img, "PNG"),
        "WEBP": encode(img, "WEBP", lossless=True),
        "BMP": encode(img, "BMP"),
        "GIF": encode(img, "GIF"),
    }


@pytest.mark.parametrize("fmt", ALLOWED_FORMATS)
def test_documented_formats_decode(fmt: str) -> None:
    data = allowed_samples()[fmt]
    assert Image.open(io.BytesIO(data)).format == fmt
    got = preprocess_bytes_info(data, TINY)
    assert got.array.shape == (32, 32, 3)
    assert got.array.dtype == np.uint8
    assert (got.width, got.height) == (48, 40)
    assert np.abs(got.array.astype(int) - RED).max() <= 3  # the first picture, in colour


def other_format_samples() -> dict[str, bytes]:
    """Formats Pillow reads but the API refuses, as Pillow writes them."""
    img = Image.new("RGB", (48, 40), RED)
    samples = {
        fmt: encode(img, fmt)
        for fmt in ("TGA", "PCX", "DDS", "TIFF", "ICO", "QOI", "SGI", "PPM", "ICNS", "JPEG2000")
    }
    samples["MSP"] = encode(img.convert("1"), "MSP")
    return samples


@pytest.mark.parametrize("fmt", sorted(other_format_samples()))
def test_other_formats_are_unsupported_not_decoded(fmt: str) -> None:
    with pytest.raises(ImageDecodeError) as caught:
        preprocess_bytes_info(other_format_samples()[fmt], TINY)
    assert caught.value.code == "unsupported_format"
    assert fmt in caught.value.message
    assert all(name in caught.value.message for name in ALLOWED_FORMATS)


def test_a_file_pillow_recognises_but_cannot_read_is_unsupported() -> None:
    """A DDS with an unknown FourCC made Pillow raise NotImplementedError (a 500)."""
    header = bytearray(encode(Image.new("RGB", (8, 8)), "DDS"))
    header[84:88] = b"ZZZZ"  # the pixel format's FourCC
    header[80:84] = (0x4).to_bytes(4, "little")  # pixel format flags: FourCC
    with pytest.raises(ImageDecodeError) as caught:
        preprocess_bytes_info(bytes(header), TINY)
    assert caught.value.code == "unsupported_format"
    assert "DDS" in caught.value.message


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "empty"),
        (b"hello, world", "not_an_image"),
        (bytes(range(256)) * 4, "not_an_image"),
        (b"Python, not a PPM file", "not_an_image"),  # "Py" passes PPM's signature check
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "corrupt"),  # an allowed signature, broken header
        (b"BM" + b"\x00" * 60, "corrupt"),
        (b"GIF89a" + b"\xff" * 20, "corrupt"),
    ],
    ids=["empty", "text", "noise", "ppm-like", "png-signature", "bmp-signature", "gif-signature"],
)
def test_what_is_not_an_allowed_image(data: bytes, code: str) -> None:
    with pytest.raises(ImageDecodeError) as caught:
        preprocess_bytes_info(data, TINY)
    assert caught.value.code == code


# ---------------------------------------------------------------------- shapes
@pytest.mark.parametrize(
    ("size", "code"),
    [
        ((MIN_SIDE, MIN_SIDE), None),
        ((MIN_SIDE - 1, 20), "too_small"),
        ((MAX_ASPECT_RATIO * 8, 8), None),
        ((8, MAX_ASPECT_RATIO * 8), None),
        ((MAX_ASPECT_RATIO * 8 + 1, 8), "bad_aspect_ratio"),
        ((20000, 8), "bad_aspect_ratio"),
        ((8, 20000), "bad_aspect_ratio"),
    ],
)
def test_side_and_aspect_limits(size: tuple[int, int], code: str | None) -> None:
    data = encode(Image.new("L", size, 90), "PNG")
    if code is None:
        got = preprocess_bytes_info(data, TINY)
        assert (got.array == 90).all()
        return
    with pytest.raises(ImageDecodeError) as caught:
        preprocess_bytes_info(data, TINY)
    assert caught.value.code == code


def test_no_real_photo_reaches_the_aspect_limit() -> None:
    photos = sorted((ROOT.parent / "shared" / "data" / "catsdogs").glob("*/*/*.jpg"))
    assert len(photos) > 1000
    ratios = []
    for path in photos:
        with Image.open(path) as img:
            ratios.append(max(img.size) / min(img.size))
    assert max(ratios) < MAX_ASPECT_RATIO / 10


# ---------------------------------------------------------------------- the budget hook
class BudgetSpentError(Exception):
    """What a server-wide budget raises when it is exhausted (not an ImageDecodeError)."""


class Recorder:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.calls: list[int] = []
        self.active = 0

    @contextlib.contextmanager
    def __call__(self, pixels: int) -> Iterator[None]:
        self.calls.append(pixels)
        if self.fail:
            raise BudgetSpentError
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1


def test_reserve_gets_the_drafted_jpeg_size_and_is_released() -> None:
    data = encode(Image.new("RGB", (2048, 1536), RED), "JPEG")  # baseline: draft 1/4 for 256
    budget = Recorder()
    got = preprocess_bytes_info(data, FULL, reserve=budget)
    assert budget.calls == [512 * 384]
    assert budget.active == 0
    assert (got.width, got.height) == (2048, 1536)


def test_reserve_of_a_progressive_jpeg_counts_libjpeg_coefficients() -> None:
    data = encode(Image.new("RGB", (2048, 1536), RED), "JPEG", progressive=True)
    budget = Recorder()
    preprocess_bytes_info(data, FULL, reserve=budget)
    # 4:2:0 at the stored size: 1.5 samples a pixel, 2 bytes each; in pixels of 4 bytes
    assert budget.calls == [512 * 384 + 2048 * 1536 * 3 // 4]


def test_reserve_of_a_multi_scan_jpeg_counts_libjpeg_coefficients() -> None:
    """A baseline JPEG whose first scan carries fewer components than the frame is buffered
    whole by libjpeg too, though Pillow does not call it progressive."""
    data = bytearray(encode(Image.new("RGB", (2048, 1536), RED), "JPEG"))
    sos = data.index(b"\xff\xda")
    data[sos + 4] = 1  # components in the first scan: 1 of 3
    budget = Recorder()
    with contextlib.suppress(ImageDecodeError):  # the scan itself no longer parses
        preprocess_bytes_info(bytes(data), FULL, reserve=budget)
    assert budget.calls == [512 * 384 + 2048 * 1536 * 3 // 4]
    assert budget.active == 0


def test_reserve_of_webp_counts_its_copies() -> None:
    budget = Recorder()
    preprocess_bytes_info(encode(Image.new("RGB", (100, 80), RED), "WEBP"), TINY, reserve=budget)
    assert budget.calls == [100 * 80 * 4]


@pytest.mark.parametrize(
    "data",
    [
        b"not an image",
        encode(Image.new("RGB", (400, 300)), "PNG"),  # 120000 pixels, over the limit below
        encode(Image.new("RGB", (800, 8)), "PNG"),  # 100:1
    ],
    ids=["not-an-image", "too-many-pixels", "bad-aspect-ratio"],
)
def test_refused_headers_reserve_nothing(data: bytes) -> None:
    budget = Recorder()
    with pytest.raises(ImageDecodeError):
        preprocess_bytes_info(data, TINY, max_pixels=100_000, reserve=budget)
    assert budget.calls == []


def test_the_budgets_own_error_passes_unchanged() -> None:
    budget = Recorder(fail=True)
    with pytest.raises(BudgetSpentError):
        preprocess_bytes_info(encode(Image.new("RGB", (64, 48)), "PNG"), TINY, reserve=budget)
    with pytest.raises(BudgetSpentError):
        decode_image(encode(Image.new("RGB", (64, 48)), "PNG"), reserve=budget)
    assert budget.calls == [64 * 48, 64 * 48]


def test_a_decode_error_inside_the_reservation_releases_it() -> None:
    data = encode(Image.new("RGB", (640, 480), RED), "PNG")
    budget = Recorder()
    with pytest.raises(ImageDecodeError) as caught:
        preprocess_bytes_info(data[: len(data) // 2], TINY, reserve=budget)
    assert caught.value.code == "corrupt"
    assert budget.calls == [640 * 480]
    assert budget.active == 0


def test_a_jpeg_whose_coefficients_are_too_large_is_refused_before_decoding() -> None:
    cmyk = encode(Image.new("CMYK", (2000, 1500)), "JPEG", progressive=True)
    budget = Recorder()
    # 3,000,000 pixels, but 8 bytes of coefficients each: 6,000,000 pixels' worth of memory
    with pytest.raises(ImageDecodeError) as caught:
        preprocess_bytes_info(cmyk, FULL, max_pixels=5_000_000, reserve=budget)
    assert caught.value.code == "too_many_pixels"
    assert budget.calls == []


# ---------------------------------------------------------------------- warnings
def _apng_with_bad_frame_count() -> bytes:
    """A PNG whose acTL chunk says 0 frames: Pillow warns "Invalid APNG"."""
    import struct
    import zlib

    png = encode(Image.new("RGB", (40, 30), RED), "PNG")
    body = struct.pack(">II", 0, 0)
    actl = struct.pack(">I", 8) + b"acTL" + body + struct.pack(">I", zlib.crc32(b"acTL" + body))
    return png[:33] + actl + png[33:]  # after the signature and IHDR


def _jpeg_with_corrupt_exif() -> bytes:
    jpeg = encode(Image.new("RGB", (40, 30), RED), "JPEG")
    exif = b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\x00\x01\x01\x0f\x00\x02\xff\xff\xff\xf0"
    segment = b"\xff\xe1" + (len(exif) + 2).to_bytes(2, "big") + exif
    return jpeg[:2] + segment + jpeg[2:]


@pytest.mark.parametrize(
    "data", [_apng_with_bad_frame_count(), _jpeg_with_corrupt_exif()], ids=["apng", "exif"]
)
def test_pillow_warnings_do_not_escape(data: bytes) -> None:
    with warnings.catch_warnings(record=True) as raw:
        warnings.simplefilter("always")  # ahead of every other filter
        preprocess_bytes_info(data, TINY)
    assert any("PIL" in w.filename for w in raw)  # Pillow does warn about this file
    with warnings.catch_warnings(record=True) as caught:
        got = preprocess_bytes_info(data, TINY)
    assert np.abs(got.array.astype(int) - RED).max() <= 3
    assert [str(w.message) for w in caught] == []


# ---------------------------------------------------------------------- memory
_CHILD = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # a regression fails here, not the box
sys.path.insert(0, sys.argv[1])
from catsdogs.preprocessing import ImageDecodeError, PreprocessSpec, preprocess_bytes_info
data = open(sys.argv[2], "rb").read()
spec = PreprocessSpec()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    outcome = str(preprocess_bytes_info(data, spec).array.shape)
except ImageDecodeError as exc:
    outcome = exc.code
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"outcome": outcome, "mb": (peak - base) / 1024}))
"""

SIDE = 6300  # the largest square under DEFAULT_MAX_PIXELS (40,000,000)


def _palette(size: tuple[int, int]) -> Image.Image:
    img = Image.new("P", size, 1)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    return img


def _rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return exif.tobytes()


# name -> (picture, format, save options); built only by the fixture (some are 160 MB in memory)
HOSTILE = {
    "rgba-6300.png": (lambda: Image.new("RGBA", (SIDE, SIDE), (*RED, 128)), "PNG", {}),
    "rgba-6300-rotated.png": (
        lambda: Image.new("RGBA", (SIDE, SIDE), (*RED, 128)),
        "PNG",
        {"exif": _rotated()},
    ),
    "gray16-6300.png": (lambda: Image.new("I;16", (SIDE, SIDE), 40000), "PNG", {}),
    "palette-transparent-6300.gif": (lambda: _palette((SIDE, SIDE)), "GIF", {"transparency": 0}),
    "bilevel-6300.png": (lambda: Image.new("1", (SIDE, SIDE), 1), "PNG", {}),
    "cmyk-6300.jpg": (lambda: Image.new("CMYK", (SIDE, SIDE), (10, 200, 30, 0)), "JPEG", {}),
    "rgb-6300.jpg": (lambda: Image.new("RGB", (SIDE, SIDE), RED), "JPEG", {}),
    "rgba-44700x894.png": (lambda: Image.new("RGBA", (44700, 894), (*RED, 128)), "PNG", {}),
    "webp-3100.webp": (lambda: Image.new("RGB", (3100, 3100), RED), "WEBP", {"lossless": True}),
    "cmyk-progressive-5000.jpg": (
        lambda: Image.new("CMYK", (5000, 5000), (10, 200, 30, 0)),
        "JPEG",
        {"progressive": True},
    ),
    "thin-20000x8.png": (lambda: Image.new("RGB", (20000, 8), RED), "PNG", {}),
    "thin-2000000x8.png": (lambda: Image.new("L", (2_000_000, 8), 90), "PNG", {}),
}


OUTCOMES = {
    "cmyk-progressive-5000.jpg": "too_many_pixels",  # 8 bytes of coefficients a pixel
    "thin-20000x8.png": "bad_aspect_ratio",
    "thin-2000000x8.png": "bad_aspect_ratio",
}


@pytest.fixture(scope="module")
def hostile_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hostile")
    for name, (picture, fmt, options) in HOSTILE.items():
        picture().save(folder / name, format=fmt, **options)
    return folder


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_peak_memory_of_one_hostile_image(hostile_dir: Path, name: str) -> None:
    """One decoded image (4 bytes a pixel at most) plus a little: never a second full copy."""
    path = hostile_dir / name
    assert path.stat().st_size < 2 * MB  # all of them are small uploads
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, str(ROOT), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    measured = json.loads(result.stdout)
    assert measured["outcome"] == OUTCOMES.get(name, "(224, 224, 3)"), measured
    assert measured["mb"] < DEFAULT_MAX_PIXELS * 4 / MB + 80, measured
