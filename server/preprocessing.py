"""Evaluation-time image preprocessing: the ONE implementation.

The server uses it for every request and training imports it for validation, test and
evaluation, so what a model sees in production is byte-for-byte what it saw in validation.
Only numpy and Pillow: this module must import in the torch-free serving environment.

Pipeline: bytes -> decode (JPEG ``draft`` when the target is smaller) -> EXIF orientation ->
RGB (alpha composited on white, 16-bit scaled, CMYK/palette/grayscale converted) -> resize the
shorter side to ``resize`` -> centre crop ``input_size`` -> uint8 HWC array.
Normalisation (mean/std) lives inside the exported ONNX graph, so the model input is the uint8
NHWC batch itself; :class:`PreprocessSpec` still records mean and std so the contract is complete.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# A truncated file is an error, never a half-grey picture.
ImageFile.LOAD_TRUNCATED_IMAGES = False

DEFAULT_MAX_PIXELS = 40_000_000  # decompression-bomb guard (about 6300 x 6300)
MIN_SIDE = 8  # smaller than this is not a photo

_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


class ImageDecodeError(ValueError):
    """The bytes are not a usable image. ``code`` is a stable, machine-readable reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


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


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB, without clipping 16-bit data or dropping alpha to black."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr8 = np.clip(arr * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        arr8 = np.clip((arr - lo) * scale + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(
    data: bytes,
    *,
    draft_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Decode ``data`` fully into an RGB image with EXIF orientation applied.

    ``draft_size``: when given and the file is a JPEG, let libjpeg decode at a reduced scale
    (1/2, 1/4, 1/8) that still keeps both sides >= ``draft_size``; far cheaper for big photos.
    Raises :class:`ImageDecodeError` for anything that is not a complete, sane image.
    """
    if not data:
        raise ImageDecodeError("empty", "the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
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
            if getattr(img, "is_animated", False):
                img.seek(0)  # the first frame of an animation is the picture
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            img.load()
            img = ImageOps.exif_transpose(img) or img
            rgb = _to_rgb(img)
            rgb.info["source_size"] = (width, height)
            return rgb
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError("too_many_pixels", "the image is too large to decode") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError("not_an_image", "the bytes are not a recognised image") from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as exc:
        raise ImageDecodeError(
            "corrupt", "the image is corrupt or truncated and cannot be decoded"
        ) from exc


def resize_and_crop(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """RGB image -> uint8 (input_size, input_size, 3): shorter side to ``resize``, centre crop."""
    width, height = img.size
    scale = spec.resize / min(width, height)
    new_w = max(spec.input_size, round(width * scale))
    new_h = max(spec.input_size, round(height * scale))
    img = img.resize((new_w, new_h), _RESAMPLE[spec.interpolation])
    left = (new_w - spec.input_size) // 2
    top = (new_h - spec.input_size) // 2
    img = img.crop((left, top, left + spec.input_size, top + spec.input_size))
    arr = np.asarray(img, dtype=np.uint8)
    # (H, W, 3) uint8, C-contiguous so batches stack without copies of views
    return np.ascontiguousarray(arr)


def preprocess_image(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """A decoded RGB image -> the model's per-image input, uint8 (H, W, 3)."""
    return resize_and_crop(_to_rgb(img), spec)


class Preprocessed(NamedTuple):
    array: np.ndarray  # uint8 (H, W, 3) model input
    width: int  # source image size in pixels, as stored in the file (before draft/EXIF)
    height: int


def preprocess_bytes_info(
    data: bytes, spec: PreprocessSpec, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Preprocessed:
    """Encoded image bytes -> model input plus the source size (for monitoring and drift)."""
    img = decode_image(data, draft_size=spec.resize, max_pixels=max_pixels)
    width, height = img.info.get("source_size", img.size)
    return Preprocessed(resize_and_crop(img, spec), int(width), int(height))


def preprocess_bytes(
    data: bytes, spec: PreprocessSpec, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Encoded image bytes -> uint8 (H, W, 3) model input. The server's and evaluation's path."""
    return preprocess_bytes_info(data, spec, max_pixels=max_pixels).array


def stack_batch(arrays: list[np.ndarray]) -> np.ndarray:
    """Per-image uint8 (H, W, 3) arrays -> one (N, H, W, 3) batch."""
    return np.stack(arrays, axis=0)
