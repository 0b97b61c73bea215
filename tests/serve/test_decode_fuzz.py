"""Property-based fuzzing of image decoding: ``preprocess_bytes_info`` and ``decode_image``.

Whatever the bytes, decoding either gives a uint8 (S, S, 3) model input (an RGB image for
``decode_image``) or raises :class:`ImageDecodeError` with a documented code: never another
exception, never a warning that escapes, never a budget left held, never slow. The inputs are
arbitrary bytes and small valid images of every allowed format, and of formats the API refuses,
mutated: bit flips, truncations, splices, inserted bytes, header fields (width, height, depth,
counts) set to edge values. Examples per property: ``FUZZ_EXAMPLES`` (default 200; ``make fuzz``
runs 2000). Every input that ever broke the property is kept, base64, in ``decode_crashers.json``
(name -> bytes: the inputs stay out of the repository as image files).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import struct
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from catsdogs.preprocessing import (
    MIN_SIDE,
    ImageDecodeError,
    PreprocessSpec,
    decode_image,
    preprocess_bytes_info,
)

pytestmark = pytest.mark.serve

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "200"))
DECODE_LIMIT_S = 2.0  # one small input, both decode paths, on a busy two-core machine
MAX_PIXELS = 1_000_000  # headers may claim anything; this keeps a claimed size cheap to refuse
SPEC = PreprocessSpec(input_size=32, resize=36)
CODES = {
    "empty",
    "not_an_image",
    "unsupported_format",
    "corrupt",
    "too_small",
    "bad_aspect_ratio",
    "too_many_pixels",
}
CRASHERS = json.loads((Path(__file__).resolve().parent / "decode_crashers.json").read_text())
T = TypeVar("T")

fuzz = settings(
    max_examples=EXAMPLES,
    deadline=None,  # timed by hand below, around the decode alone
    database=None,  # nothing written into the working tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ---------------------------------------------------------------------- seeds
def _saved(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def _seeds() -> dict[str, bytes]:
    """Small valid files: every allowed format in its main variants, and refused formats."""
    rgb = Image.linear_gradient("L").resize((24, 16)).convert("RGB")
    rgba = rgb.copy()
    rgba.putalpha(Image.linear_gradient("L").resize((24, 16)))
    pal = rgb.quantize(16)
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = [rgb, rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    return {
        "jpeg": _saved(rgb, "JPEG"),
        "jpeg-progressive": _saved(rgb, "JPEG", progressive=True),
        "jpeg-cmyk": _saved(rgb.convert("CMYK"), "JPEG"),
        "jpeg-gray-exif": _saved(rgb.convert("L"), "JPEG", exif=exif.tobytes()),
        "mpo": _saved(rgb, "MPO", save_all=True, append_images=frames[1:]),
        "png": _saved(rgb, "PNG"),
        "png-rgba-interlaced": _saved(rgba, "PNG", interlace=1),
        "png-palette-trns": _saved(pal, "PNG", transparency=0),
        "png-16bit": _saved(Image.linear_gradient("L").resize((24, 16)).convert("I;16"), "PNG"),
        "png-1bit": _saved(rgb.convert("1"), "PNG"),
        "apng": _saved(rgb, "PNG", save_all=True, append_images=frames[1:]),
        "gif": _saved(pal, "GIF", transparency=0),
        "gif-animated": _saved(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "webp": _saved(rgb, "WEBP"),
        "webp-lossless-rgba": _saved(rgba, "WEBP", lossless=True),
        "webp-animated": _saved(frames[0], "WEBP", save_all=True, append_images=frames[1:]),
        "bmp": _saved(rgb, "BMP"),
        "bmp-1bit": _saved(rgb.convert("1"), "BMP"),
        "bmp-palette": _saved(pal, "BMP"),
        # refused: Pillow reads them, the API does not
        "tga": _saved(rgb, "TGA"),
        "pcx": _saved(rgb, "PCX"),
        "dds": _saved(rgba, "DDS"),
        "tiff": _saved(rgb, "TIFF"),
        "ico": _saved(rgb, "ICO"),
        "qoi": _saved(rgb, "QOI"),
    }


SEEDS = _seeds()
EDGE_VALUES = [0, 1, 2, 7, 8, 255, 256, 4095, 65535, 65536, 2**24, 2**31 - 1, 2**31, 2**32 - 1]


def _size_fields(data: bytes) -> list[tuple[int, str]]:
    """(offset, struct format) of the width and height fields of the file's header."""
    if data.startswith(b"\x89PNG"):
        return [(16, ">I"), (20, ">I")]
    if data.startswith(b"GIF8"):
        return [(6, "<H"), (8, "<H")]
    if data.startswith(b"BM"):
        return [(18, "<i"), (22, "<i")]
    if data.startswith(b"RIFF") and data[12:16] == b"VP8X":
        return [(24, "<H"), (27, "<H")]  # canvas size - 1, 24 bits: the low two bytes
    sof = max(data.find(b"\xff\xc0"), data.find(b"\xff\xc2"))
    if data.startswith(b"\xff\xd8") and sof > 0:
        return [(sof + 5, ">H"), (sof + 7, ">H")]
    return [(4, "<I"), (8, "<I"), (12, "<I"), (16, "<I")]  # somewhere in the header


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A seed file after one to four random edits."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        edit = draw(st.sampled_from(["flip", "truncate", "splice", "insert", "field", "size"]))
        at = draw(st.integers(0, len(data) - 1))
        if edit == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif edit == "truncate":
            del data[at:]
        elif edit == "splice":
            other = SEEDS[draw(st.sampled_from(sorted(SEEDS)))]
            data[at:] = other[draw(st.integers(0, len(other) - 1)) :]
        elif edit == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif edit == "field":  # any 1-, 2- or 4-byte integer near the start
            fmt = draw(st.sampled_from(["B", "<H", ">H", "<I", ">I"]))
            _put(
                data,
                draw(st.integers(0, min(64, len(data)))),
                fmt,
                draw(st.sampled_from(EDGE_VALUES)),
            )
        else:  # the width or height field itself
            offset, fmt = draw(st.sampled_from(_size_fields(bytes(data))))
            _put(data, offset, fmt, draw(st.sampled_from(EDGE_VALUES)))
    return bytes(data)


def _put(data: bytearray, offset: int, fmt: str, value: int) -> None:
    size = struct.calcsize(fmt)
    limit = 1 << (8 * size)
    value %= limit
    if fmt.endswith("i") and value >= limit // 2:
        value -= limit
    if offset + size <= len(data):
        data[offset : offset + size] = struct.pack(fmt, value)


# ---------------------------------------------------------------------- the property
class Budget:
    """A ``reserve`` hook that counts what is held."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.held = 0

    @contextlib.contextmanager
    def __call__(self, pixels: int) -> Iterator[None]:
        self.calls.append(pixels)
        self.held += 1
        try:
            yield
        finally:
            self.held -= 1


def _outcome(call: Callable[[], T]) -> T | ImageDecodeError:
    try:
        return call()
    except ImageDecodeError as exc:  # anything else propagates and fails the test
        return exc


def check_decodes(data: bytes) -> None:
    """Both decode paths: an answer or an ImageDecodeError, quickly, quietly, budget released."""
    budget = Budget()
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        got = _outcome(
            lambda: preprocess_bytes_info(data, SPEC, max_pixels=MAX_PIXELS, reserve=budget)
        )
        img = _outcome(lambda: decode_image(data, max_pixels=MAX_PIXELS))
    elapsed = time.perf_counter() - start
    assert elapsed < DECODE_LIMIT_S, f"decoding {len(data)} bytes took {elapsed:.2f} s"
    if isinstance(got, ImageDecodeError):
        assert got.code in CODES, got.code
        assert got.message
    else:
        assert got.array.shape == (SPEC.input_size, SPEC.input_size, 3)
        assert got.array.dtype.name == "uint8"
        assert got.array.flags.c_contiguous
        assert min(got.width, got.height) >= MIN_SIDE
    if isinstance(img, ImageDecodeError):
        assert img.code in CODES, img.code
    else:
        assert img.mode == "RGB"
    assert budget.held == 0
    assert len(budget.calls) <= 1
    assert all(0 < n <= MAX_PIXELS for n in budget.calls), budget.calls
    # DeprecationWarnings are for developers and hidden by default; all else must not escape
    escaped = [w for w in caught if not issubclass(w.category, DeprecationWarning)]
    assert not escaped, [str(w.message) for w in escaped]


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_seeds_are_valid(name: str) -> None:
    """Each seed decodes, or is refused as a format the API does not take."""
    allowed = not name.startswith(("tga", "pcx", "dds", "tiff", "ico", "qoi"))
    if allowed:
        assert preprocess_bytes_info(SEEDS[name], SPEC).array.shape == (32, 32, 3)
        return
    with pytest.raises(ImageDecodeError) as caught:
        preprocess_bytes_info(SEEDS[name], SPEC)
    assert caught.value.code == "unsupported_format"


@fuzz
@given(st.binary(max_size=4096))
def test_arbitrary_bytes(data: bytes) -> None:
    check_decodes(data)


@fuzz
@given(st.sampled_from(sorted(SEEDS)).flatmap(lambda name: st.just(SEEDS[name][:16])), st.binary())
def test_a_known_signature_then_anything(signature: bytes, rest: bytes) -> None:
    check_decodes(signature + rest)


@fuzz
@given(mutated())
def test_mutated_images(data: bytes) -> None:
    check_decodes(data)


@pytest.mark.parametrize("name", sorted(CRASHERS))
def test_crashers_found_so_far(name: str) -> None:
    data = base64.b64decode(CRASHERS[name], validate=True)
    assert len(data) <= 8192
    check_decodes(data)
