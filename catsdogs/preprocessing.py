"""Evaluation-time image preprocessing: the ONE implementation.

The server uses it for every request and training imports it for validation, test and
evaluation, so what a model sees in production is byte-for-byte what it saw in validation.
Only numpy and Pillow: this module must import in the torch-free serving environment.

Pipeline: bytes -> header checks (format, size, decode cost) -> decode (JPEG ``draft`` when the
target is smaller) -> EXIF orientation -> RGB (alpha composited on white, 16-bit scaled,
CMYK/palette/grayscale converted) -> resize the shorter side to ``resize`` -> centre crop
``input_size`` -> uint8 HWC array.
Normalisation (mean/std) lives inside the exported ONNX graph, so the model input is the uint8
NHWC batch itself; :class:`PreprocessSpec` still records mean and std so the contract is complete.

Memory is bounded by the header, never by the upload: the only full-size buffer is the decoded
image (at most ``max_pixels`` pixels' worth, 4 bytes each; see :func:`decode_cost`), and one side
may be at most ``MAX_ASPECT_RATIO`` times the other. Orientation, mode conversion and the resize
then run band by band over the rows the centre crop reads (:func:`_model_input`), with Pillow's
own arithmetic, so the answer is the same bytes as converting and resizing the whole image and
a 16-bit or RGBA 6300x6300 picture costs a few MB on top of its decode.

Client bytes can only ever raise :class:`ImageDecodeError`, whose ``code`` is one of
``empty``, ``not_an_image``, ``unsupported_format``, ``corrupt``, ``too_small``,
``bad_aspect_ratio``, ``too_many_pixels``.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import struct
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import numpy as np
from PIL import ExifTags, Image, ImageFile, UnidentifiedImageError

# A truncated file is an error, never a half-grey picture.
ImageFile.LOAD_TRUNCATED_IMAGES = False

DEFAULT_MAX_PIXELS = 40_000_000  # decompression-bomb guard (about 6300 x 6300)
MIN_SIDE = 8  # smaller than this is not a photo

# The documented upload formats, as Pillow names them. MPO is the multi-picture JPEG that phone
# cameras write: Pillow has no opener of its own for it (its JPEG opener returns an MPO image, and
# ``Image.open(formats=[..., "MPO"])`` fails with KeyError), so only the others are opened by name.
ALLOWED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF")
_OPENERS = tuple(f for f in ALLOWED_FORMATS if f != "MPO")

# Memory per decoded WebP pixel, in pixels' worth (4 bytes): libwebp's decoder keeps two canvases
# and hands Pillow a copy, which Pillow copies again into the image (measured: 16 bytes a pixel).
_WEBP_COST = 4
_JPEG_BLOCK_BYTES = 128  # one 8x8 block of 16-bit DCT coefficients, as libjpeg buffers it

# Longer than 50 times its width (or height) is no photo. Past this, the resized long side (up to
# 50 x ``resize``) and so every intermediate of the resize would grow without bound.
MAX_ASPECT_RATIO = 50
_BAND_PIXELS = 1 << 20  # source pixels converted and resampled at a time

_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}
# Half-width of each filter in source pixels at scale 1 (Pillow's Resample.c)
_SUPPORT = {"bilinear": 1.0, "bicubic": 2.0, "nearest": 0.5, "lanczos": 3.0}

# EXIF orientation -> the transpose that shows the picture upright (as ImageOps.exif_transpose)
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = {
    Image.Transpose.TRANSPOSE,
    Image.Transpose.ROTATE_270,
    Image.Transpose.TRANSVERSE,
    Image.Transpose.ROTATE_90,
}
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")

# ``reserve(pixels)``: the caller's memory budget (see :func:`preprocess_bytes_info`)
Reserve = Callable[[int], contextlib.AbstractContextManager[Any]]


class ImageDecodeError(ValueError):
    """The bytes are not a usable image. ``code`` is a stable, machine-readable reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


_IMPLEMENTED: dict[str, Any] = {
    "normalization": "in_graph",
    "resize_rule": "shorter_side_then_center_crop",
    "color": "RGB",
    "exif_transpose": True,
}


@dataclass(frozen=True)
class PreprocessSpec:
    """How raw pixels become model input. Serialised into the ONNX file's metadata."""

    input_size: int = 224  # side of the square crop the model takes
    resize: int = 256  # the shorter side is resized to this before the centre crop
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # on 0..1 pixel values
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    layout: str = "NHWC"  # model input layout
    dtype: str = "uint8"  # model input dtype; normalisation happens in the graph
    normalization: str = "in_graph"
    resize_rule: str = "shorter_side_then_center_crop"
    color: str = "RGB"
    exif_transpose: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"preprocessing.interpolation: unknown {self.interpolation!r}")
        if not 0 < self.input_size <= self.resize:
            raise ValueError("preprocessing: need 0 < input_size <= resize")
        if self.layout != "NHWC" or self.dtype != "uint8":
            raise ValueError("preprocessing: only uint8 NHWC model input is supported")
        # the one value of each that this code implements: a file asking for another would be
        # fed what it did not ask for, and answer wrongly without an error
        for key, supported in _IMPLEMENTED.items():
            if getattr(self, key) != supported:
                raise ValueError(
                    f"preprocessing.{key}: {getattr(self, key)!r} is not implemented"
                    f" (only {supported!r})"
                )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PreprocessSpec:
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("preprocessing metadata must be a JSON object")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"preprocessing metadata: unknown keys {unknown}")
        for key in ("mean", "std"):
            if key in raw:
                raw[key] = tuple(float(v) for v in raw[key])
        return cls(**raw)


class Preprocessed(NamedTuple):
    array: np.ndarray  # uint8 (H, W, 3) model input
    width: int  # source image size in pixels, as stored in the file (before draft/EXIF)
    height: int
    decode_s: float = 0.0  # header + pixel decode
    preprocess_s: float = 0.0  # orientation, colour conversion, resize and crop


# ---------------------------------------------------------------------------- errors


@contextlib.contextmanager
def _client_bytes() -> Iterator[None]:
    """Whatever Pillow raises on hostile bytes is the client's problem: an ImageDecodeError.

    Pillow's plugins raise far more than OSError on crafted files (NotImplementedError,
    struct.error, ZeroDivisionError, TypeError, KeyError, ...), so everything is caught here.
    Only code that runs on the client's bytes goes inside; the caller's ``reserve`` never does.
    """
    try:
        yield
    except ImageDecodeError:
        raise
    except (MemoryError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError("too_many_pixels", "the image is too large to decode") from exc
    except Exception as exc:
        raise ImageDecodeError(
            "corrupt", "the image is corrupt or truncated and cannot be decoded"
        ) from exc


def _quiet_pillow_warnings() -> None:
    """Ignore the warnings Pillow raises on malformed files; the caller gets an ImageDecodeError.

    Pillow warns about corrupt EXIF, bad APNG chunks, decompression bombs and more. Scoping a
    filter with ``warnings.catch_warnings`` is not thread-safe before Python 3.14 and decoding runs
    on worker threads, so a filter limited to Pillow's modules is appended instead (once: an
    identical filter is not added twice). Appended, it yields to any filter a user sets (``-W``).
    """
    for category in (UserWarning, RuntimeWarning):  # DecompressionBombWarning is a RuntimeWarning
        warnings.filterwarnings("ignore", category=category, module=r"PIL\.", append=True)


def _formats_text() -> str:
    return ", ".join(ALLOWED_FORMATS)


def _unidentified(data: bytes) -> ImageDecodeError:
    """Why no allowed opener took ``data``: a broken allowed file, another format, or noise."""
    prefix = data[:16]
    if any(_signature_matches(fmt, prefix) for fmt in _OPENERS):
        return ImageDecodeError("corrupt", "the image header is corrupt and cannot be decoded")
    other = _other_format(data) or _unreadable_format(data)
    if other:
        return ImageDecodeError(
            "unsupported_format",
            f"{other} images are not accepted; send one of {_formats_text()}",
        )
    return ImageDecodeError("not_an_image", "the bytes are not a recognised image")


# HEIF brands (ISO/IEC 23008-12) of the ftyp box: iPhone photos (heic), and still images
_HEIF_BRANDS = frozenset(
    (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1")
)
_JXL_CONTAINER = b"\x00\x00\x00\x0cJXL \r\n\x87\n"


def _unreadable_format(data: bytes) -> str | None:
    """Formats phones and browsers send that no opener here reads: named (415), so a client is
    told to convert its HEIC photo rather than that it sent no image (422)."""
    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        return "HEIF"
    if data.startswith((b"\xff\x0a", _JXL_CONTAINER)):
        return "JPEG XL"
    head = data[:1024].removeprefix(b"\xef\xbb\xbf").lstrip().lower()
    # an XML prolog, a doctype or an editor's comment may come first
    if head.startswith((b"<svg", b"<?xml", b"<!doctype svg", b"<!--")) and b"<svg" in head:
        return "SVG"
    return None


def _signature_matches(fmt: str, prefix: bytes) -> bool:
    try:
        accept = Image.OPEN[fmt][1]
        return bool(accept and accept(prefix))
    except Exception:
        return False


def _other_format(data: bytes) -> str | None:
    """The format Pillow would take ``data`` for, among those this API refuses; headers only.

    As ``Image.open`` decides: the format's signature check accepts the bytes (or it has none)
    and its header parser does not reject them with SyntaxError and the like ("not this
    format"); a parser that fails any other way has recognised a broken or unsupported file of
    its format. No pixels are decoded.
    """
    Image.init()
    prefix = data[:16]
    for fmt, (factory, accept) in list(Image.OPEN.items()):
        if fmt in _OPENERS:
            continue
        try:
            verdict = accept(prefix) if accept else True
            if isinstance(verdict, str):  # Pillow's "this format, a variant it cannot read"
                return fmt
            if verdict:
                factory(io.BytesIO(data), "").close()
                return fmt
        except (SyntaxError, IndexError, TypeError, struct.error):
            continue
        except Exception:
            return fmt
    return None


# ---------------------------------------------------------------------------- decode


class _Opened(NamedTuple):
    image: ImageFile.ImageFile  # header read, pixels not decoded yet
    width: int  # as stored in the file
    height: int
    cost: int  # pixels' worth of memory the decode will hold (see decode_cost)


def _open(data: bytes, *, max_pixels: int, draft_size: int | None) -> _Opened:
    """Read and check the header; nothing is decoded yet."""
    if not data:
        raise ImageDecodeError("empty", "the image is empty (0 bytes)")
    _quiet_pillow_warnings()
    with _client_bytes():
        try:
            img = Image.open(io.BytesIO(data), formats=_OPENERS)
        except UnidentifiedImageError:
            raise _unidentified(data) from None
    try:
        with _client_bytes():
            return _checked(img, data, max_pixels=max_pixels, draft_size=draft_size)
    except BaseException:
        img.close()
        raise


def _checked(
    img: ImageFile.ImageFile, data: bytes, *, max_pixels: int, draft_size: int | None
) -> _Opened:
    if img.format not in ALLOWED_FORMATS:  # an opener handing back another format
        raise ImageDecodeError(
            "unsupported_format",
            f"{img.format} images are not accepted; send one of {_formats_text()}",
        )
    width, height = img.size
    if width * height > max_pixels:
        raise ImageDecodeError(
            "too_many_pixels",
            f"the image has {width}x{height} pixels, more than the limit of {max_pixels}",
        )
    if min(width, height) < MIN_SIDE:
        raise ImageDecodeError(
            "too_small", f"the image is {width}x{height}, smaller than {MIN_SIDE} px a side"
        )
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageDecodeError(
            "bad_aspect_ratio",
            f"the image is {width}x{height}; one side may be at most {MAX_ASPECT_RATIO} times "
            "the other",
        )
    if getattr(img, "is_animated", False):
        img.seek(0)  # the first frame of an animation is the picture
    if draft_size and img.format == "JPEG":
        img.draft("RGB", (draft_size, draft_size))  # libjpeg scales by 1/2, 1/4 or 1/8
    cost = decode_cost(img, data, width, height)
    if cost > max_pixels:
        raise ImageDecodeError(
            "too_many_pixels",
            f"decoding this {width}x{height} {img.format} image needs as much memory as "
            f"{cost} pixels, more than the limit of {max_pixels}",
        )
    return _Opened(img, width, height, cost)


def decode_cost(img: ImageFile.ImageFile, data: bytes, width: int, height: int) -> int:
    """Peak memory of decoding ``img`` (header read, ``draft`` applied), in pixels of 4 bytes.

    Mostly the decoded size; WebP costs four times that (see ``_WEBP_COST``). libjpeg decodes a
    progressive or multi-scan JPEG into whole-image coefficient buffers at the stored size (2
    bytes per sample, up to 8 bytes a pixel for CMYK), however far ``draft`` scales the output.
    ``width``, ``height``: the size stored in the file.
    """
    pixels = img.size[0] * img.size[1]
    if img.format == "WEBP":
        return pixels * _WEBP_COST
    if img.format in ("JPEG", "MPO") and _jpeg_multiscan(img, data):
        return pixels + _jpeg_coefficient_bytes(img, width, height) // 4
    return pixels


def _jpeg_multiscan(img: ImageFile.ImageFile, data: bytes) -> bool:
    """libjpeg buffers the whole image when the first scan does not carry every component."""
    if img.info.get("progressive"):
        return True
    return _first_scan_components(data) != len(getattr(img, "layer", ()))


def _first_scan_components(data: bytes) -> int | None:
    """Number of components in the first SOS segment, or None if there is none."""
    at = 2  # after SOI
    while at + 4 < len(data):
        if data[at] != 0xFF:  # stray bytes between segments: libjpeg skips them too
            at += 1
            continue
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
        elif marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # no length field
            at += 2
        elif marker == 0xDA:
            return data[at + 4]
        else:
            at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")
    return None


def _jpeg_coefficient_bytes(img: ImageFile.ImageFile, width: int, height: int) -> int:
    """Size of libjpeg's full-image coefficient buffers (jdcoefct.c) for the stored size."""
    layers = getattr(img, "layer", None) or [(0, 1, 1, 0)] * 4
    h_max = max(max(1, h) for _, h, _, _ in layers)
    v_max = max(max(1, v) for _, _, v, _ in layers)
    total = 0
    for _, h, v, _ in layers:
        h, v = max(1, h), max(1, v)
        blocks_w = math.ceil(math.ceil(width * h / h_max) / 8)
        blocks_h = math.ceil(math.ceil(height * v / v_max) / 8)
        total += math.ceil(blocks_w / h) * h * math.ceil(blocks_h / v) * v
    return total * _JPEG_BLOCK_BYTES


def _orientation(img: Image.Image) -> Image.Transpose | None:
    """The transpose EXIF (or XMP) orientation asks for, as ImageOps.exif_transpose reads it."""
    value = img.getexif().get(ExifTags.Base.Orientation, 1)
    return _ORIENTATION.get(value) if isinstance(value, int) else None


@contextlib.contextmanager
def _nothing_reserved() -> Iterator[None]:
    yield


def _budget(reserve: Reserve | None, cost: int) -> contextlib.AbstractContextManager[Any]:
    return _nothing_reserved() if reserve is None else reserve(cost)


def decode_image(
    data: bytes,
    *,
    draft_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    reserve: Reserve | None = None,
) -> Image.Image:
    """Decode ``data`` fully into an RGB image with EXIF orientation applied.

    ``draft_size``: when given and the file is a JPEG, let libjpeg decode at a reduced scale
    (1/2, 1/4, 1/8) that still keeps both sides >= ``draft_size``; far cheaper for big photos.
    ``reserve``: as for :func:`preprocess_bytes_info`; held while decoding and converting. The
    returned full-size image is the caller's; the model's path is :func:`preprocess_bytes_info`.
    Raises :class:`ImageDecodeError` for anything that is not a complete, sane image.
    """
    img, width, height, cost = _open(data, max_pixels=max_pixels, draft_size=draft_size)
    try:
        with _budget(reserve, cost), _client_bytes():
            img.load()
            method = _orientation(img)
            upright = img.transpose(method) if method is not None else img
            rgb = _rgb_converter(img)(upright)
            if rgb is img:
                rgb = img.copy()  # never hand out the file-backed image
            rgb.info["source_size"] = (width, height)
            return rgb
    finally:
        img.close()


def preprocess_bytes_info(
    data: bytes,
    spec: PreprocessSpec,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    reserve: Reserve | None = None,
) -> Preprocessed:
    """Encoded image bytes -> model input plus the source size (for monitoring and drift).

    ``reserve``: called once the header has passed its checks, with the memory the decode will
    hold (:func:`decode_cost`, in pixels of 4 bytes); the context manager it returns stays
    entered until the decoded image is freed. Whatever it raises (a server-wide budget that is
    spent) propagates unchanged; every other failure is an :class:`ImageDecodeError`.
    """
    started = time.perf_counter()
    img, width, height, cost = _open(data, max_pixels=max_pixels, draft_size=spec.resize)
    try:
        with _budget(reserve, cost):
            with _client_bytes():
                img.load()
                decoded = time.perf_counter()
                array = _model_input(img, _orientation(img), spec)
            img.close()  # free the decoded pixels while the budget still counts them
    finally:
        img.close()
    done = time.perf_counter()
    return Preprocessed(array, width, height, decoded - started, done - decoded)


def preprocess_bytes(
    data: bytes,
    spec: PreprocessSpec,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    reserve: Reserve | None = None,
) -> np.ndarray:
    """Encoded image bytes -> uint8 (H, W, 3) model input. The server's and evaluation's path."""
    return preprocess_bytes_info(data, spec, max_pixels=max_pixels, reserve=reserve).array


def preprocess_image(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """A decoded image (any mode, already upright) -> the model's input, uint8 (H, W, 3)."""
    return _model_input(img, None, spec)


def stack_batch(arrays: list[np.ndarray]) -> np.ndarray:
    """Per-image uint8 (H, W, 3) arrays -> one (N, H, W, 3) batch."""
    return np.stack(arrays, axis=0)


# ---------------------------------------------------------------------------- colour


def _rgb_converter(img: Image.Image) -> Callable[[Image.Image], Image.Image]:
    """Per-pixel conversion of ``img``'s mode to 8-bit RGB, for the image or any crop of it.

    No clipping of 16-bit data, alpha composited on white (never dropped to black). The one
    whole-image statistic (the value range of 32-bit "I" and "F" images) is read here, so
    converting crop by crop gives exactly what converting the whole image gives.
    """
    mode = img.mode
    if mode == "RGB":
        return _same
    if mode.startswith("I;16"):
        return functools.partial(_scaled_gray, top=65535)
    if mode == "I":
        _, high = img.getextrema()
        return functools.partial(_scaled_gray, top=65535 if high > 255 else 255)
    if mode == "F":
        low, high = img.getextrema()
        return functools.partial(_stretched_gray, low=float(low), high=float(high))
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in img.info):
        return _over_white
    return _plain_rgb


def _same(img: Image.Image) -> Image.Image:
    return img


def _plain_rgb(img: Image.Image) -> Image.Image:
    return img.convert("RGB")


def _over_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _scaled_gray(img: Image.Image, *, top: int) -> Image.Image:
    """Integer values 0..top -> 0..255, to nearest: round(v * 255 / 65535) == (v + 128) // 257."""
    values = np.asarray(img).astype(np.int64)
    if top == 65535:
        values = (values + 128) // 257
    gray = np.clip(values, 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


def _stretched_gray(img: Image.Image, *, low: float, high: float) -> Image.Image:
    """Float pixels: the image's own range stretched to 0..255."""
    scale = 255.0 / (high - low) if high > low else 0.0
    with np.errstate(all="ignore"):  # NaN and inf pixels become 0 or 255, silently
        values = (np.asarray(img, dtype=np.float64) - low) * scale + 0.5
        gray = np.nan_to_num(np.clip(values, 0, 255), nan=0.0).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


# ---------------------------------------------------------------------------- geometry


def _rows_read(size: int, resized: int, first: int, count: int, support: float) -> range:
    """Source rows that output rows [first, first + count) of a ``size`` -> ``resized`` resample
    read: the filter's reach (Pillow's Resample.c) plus 2 rows of slack."""
    scale = size / resized
    reach = support * max(scale, 1.0) + 2
    return range(
        max(0, math.floor(first * scale - reach)),
        min(size, math.ceil((first + count) * scale + reach)),
    )


def _upright_size(size: tuple[int, int], method: Image.Transpose | None) -> tuple[int, int]:
    return (size[1], size[0]) if method in _SWAPS_AXES else size


def _stored_box(
    box: tuple[int, int, int, int], size: tuple[int, int], method: Image.Transpose | None
) -> tuple[int, int, int, int]:
    """The rectangle of the stored image that ``method`` turns into ``box`` of the upright one."""
    x0, y0, x1, y1 = box
    w, h = size
    t = Image.Transpose
    return {
        None: (x0, y0, x1, y1),
        t.FLIP_LEFT_RIGHT: (w - x1, y0, w - x0, y1),
        t.FLIP_TOP_BOTTOM: (x0, h - y1, x1, h - y0),
        t.ROTATE_180: (w - x1, h - y1, w - x0, h - y0),
        t.ROTATE_90: (w - y1, x0, w - y0, x1),
        t.ROTATE_270: (y0, h - x1, y1, h - x0),
        t.TRANSPOSE: (y0, x0, y1, x1),
        t.TRANSVERSE: (w - y1, h - x1, w - y0, h - x0),
    }[method]


def _upright_crop(
    img: Image.Image, method: Image.Transpose | None, box: tuple[int, int, int, int]
) -> Image.Image:
    """``box`` of the upright picture, copying only that region of the stored one."""
    if method is None:
        return img if box == (0, 0, *img.size) else img.crop(box)
    return img.crop(_stored_box(box, img.size, method)).transpose(method)


def _model_input(
    img: Image.Image, method: Image.Transpose | None, spec: PreprocessSpec
) -> np.ndarray:
    """Upright, RGB, shorter side to ``resize``, centre crop: uint8 (S, S, 3), S = input_size.

    The same two passes, in the same order, as Pillow's ``resize`` of the whole upright RGB
    image followed by the crop, but each pass only over what the crop reads (see
    :func:`_two_passes`). Orientation and conversion are per pixel, so doing them band by band
    gives what doing them to the whole image first gives, with at most ``_BAND_PIXELS`` of the
    source copied at a time.
    """
    width, height = _upright_size(img.size, method)
    crop = spec.input_size
    scale = spec.resize / min(width, height)
    new_w, new_h = max(crop, round(width * scale)), max(crop, round(height * scale))
    resample, support = _RESAMPLE[spec.interpolation], _SUPPORT[spec.interpolation]
    to_rgb = _rgb_converter(img)

    # Pillow 13 resamples vertically first when the height loses more than twice as many pixels
    # as the width (Resample.c, ImagingResampleInner); the order decides the rounding.
    if 0 < height - new_h > 2 * (width - new_w):
        # the vertical pass first = the horizontal pass first on the transposed picture
        def band(box: tuple[int, int, int, int]) -> Image.Image:
            x0, y0, x1, y1 = box
            upright = to_rgb(_upright_crop(img, method, (y0, x0, y1, x1)))
            return upright.transpose(Image.Transpose.TRANSPOSE)

        out = _two_passes(band, (height, width), (new_h, new_w), crop, resample, support)
        out = out.transpose(Image.Transpose.TRANSPOSE)
    else:
        out = _two_passes(
            lambda box: to_rgb(_upright_crop(img, method, box)),
            (width, height),
            (new_w, new_h),
            crop,
            resample,
            support,
        )
    # (H, W, 3) uint8, C-contiguous so batches stack without copies of views
    return np.ascontiguousarray(np.asarray(out, dtype=np.uint8))


def _two_passes(
    band: Callable[[tuple[int, int, int, int]], Image.Image],
    size: tuple[int, int],
    resized: tuple[int, int],
    crop: int,
    resample: Image.Resampling,
    support: float,
) -> Image.Image:
    """``resize(resized)`` horizontally then vertically, then the centre crop, touching only
    what the crop reads.

    ``band(box)`` gives that box of the ``size`` (RGB) picture. Bands of the rows that the kept
    output rows read are resampled horizontally, each a one-axis Pillow ``resize`` with the
    whole image's coefficients, and only their kept columns go into a ``strip`` ``crop`` pixels
    wide; the strip is then resampled vertically. Both passes round to 8 bits, as Pillow's do.
    Rows of the strip the vertical pass does not read for the kept rows stay black.
    """
    (width, height), (new_w, new_h) = size, resized
    left, top = (new_w - crop) // 2, (new_h - crop) // 2
    rows = _rows_read(height, new_h, top, crop, support)
    strip = Image.new("RGB", (crop, height))
    rows_per_band = max(1, _BAND_PIXELS // width)
    for start in range(rows.start, rows.stop, rows_per_band):
        part = band((0, start, width, min(rows.stop, start + rows_per_band)))
        part = part.resize((new_w, part.height), resample)
        strip.paste(part.crop((left, 0, left + crop, part.height)), (0, start))
    out = strip.resize((crop, new_h), resample)
    return out.crop((0, top, crop, top + crop))
