"""Bad input -> a clear 4xx with its own error code, and the server stays ready."""

from __future__ import annotations

import base64
import io
import json

import pytest
from conftest import RED, image_bytes, photos, run, serve
from PIL import Image

pytestmark = pytest.mark.serve

LIMIT = 200_000  # bytes of one upload in these tests
JPEG = {"content-type": "image/jpeg"}


def _truncated_jpeg() -> bytes:
    data = photos("cat", 1)[0].read_bytes()
    return data[: len(data) // 2]


def _big_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (400, 400), RED).save(buf, format="PNG")  # 160,000 pixels, a few KB
    return buf.getvalue()


def _noise(n: int) -> bytes:
    return bytes(range(256)) * (n // 256 + 1)


def _saved(fmt: str, size: tuple[int, int] = (64, 48), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, RED if mode == "RGB" else 90).save(buf, format=fmt)
    return buf.getvalue()


def _dds_unknown_fourcc() -> bytes:
    """Pillow recognises the DDS header, then cannot decode it (it raised NotImplementedError)."""
    data = bytearray(_saved("DDS", (8, 8)))
    data[80:84] = (0x4).to_bytes(4, "little")  # pixel format flags: a FourCC follows
    data[84:88] = b"ZZZZ"
    return bytes(data)


def _v2(tensor: dict, name: str = "catsdogs") -> tuple[str, dict]:
    return f"/v2/models/{name}/infer", {"json": {"inputs": [tensor]}}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _binary_short() -> dict:
    """Says 10 bytes of tensor data follow the header; only 3 do."""
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "BYTES",
                    "shape": [1],
                    "parameters": {"binary_data_size": 10},
                }
            ]
        }
    ).encode()
    return {
        "content": header + b"abc",
        "headers": {"inference-header-content-length": str(len(header))},
    }


# (id, method path, request kwargs, status, error code or None for V2's string errors)
CASES = [
    ("empty body", "/predict", {"content": b"", "headers": JPEG}, 422, "empty"),
    (
        "text as jpeg",
        "/predict",
        {"content": b"hello, world", "headers": JPEG},
        422,
        "not_an_image",
    ),
    ("truncated jpeg", "/predict", {"content": _truncated_jpeg(), "headers": JPEG}, 422, "corrupt"),
    (
        "tiny image",
        "/predict",
        {"content": image_bytes(RED, (4, 4)), "headers": JPEG},
        422,
        "too_small",
    ),
    (
        "too many pixels",
        "/predict",
        {"content": _big_png(), "headers": {"content-type": "image/png"}},
        413,
        "too_many_pixels",
    ),
    (
        "tga, a format pillow reads",
        "/predict",
        {"content": _saved("TGA"), "headers": {"content-type": "image/x-tga"}},
        415,
        "unsupported_format",
    ),
    (
        "tiff in multipart",
        "/predict",
        {"files": {"file": ("x.tif", _saved("TIFF"), "image/tiff")}},
        415,
        "unsupported_format",
    ),
    (
        "dds pillow cannot decode",
        "/predict",
        {"content": _dds_unknown_fourcc(), "headers": {"content-type": "image/vnd-ms.dds"}},
        415,
        "unsupported_format",
    ),
    (
        "heic, an iPhone photo",
        "/predict",
        {
            "content": b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64),
            "headers": {"content-type": "image/heic"},
        },
        415,
        "unsupported_format",
    ),
    (
        "svg",
        "/predict",
        {
            "content": b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>',
            "headers": {"content-type": "image/svg+xml"},
        },
        415,
        "unsupported_format",
    ),
    (
        "svg as an editor writes it",
        "/predict",
        {
            "content": b"<!-- Generator: an editor -->\n"
            b'<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" "x.dtd">\n'
            b'<svg xmlns="http://www.w3.org/2000/svg"/>',
            "headers": {"content-type": "image/svg+xml"},
        },
        415,
        "unsupported_format",
    ),
    (
        "jpeg xl codestream",
        "/predict",
        {"content": b"\xff\x0a" + bytes(64), "headers": {"content-type": "image/jxl"}},
        415,
        "unsupported_format",
    ),
    (
        "png 100 times wider than high",
        "/predict",
        {"content": _saved("PNG", (800, 8), "L"), "headers": {"content-type": "image/png"}},
        422,
        "bad_aspect_ratio",
    ),
    (
        "text/plain",
        "/predict",
        {"content": image_bytes(RED), "headers": {"content-type": "text/plain"}},
        415,
        "unsupported_media_type",
    ),
    ("json body", "/predict", {"json": {"image": "x"}}, 415, "unsupported_media_type"),
    ("no content type", "/predict", {"content": image_bytes(RED)}, 415, "unsupported_media_type"),
    (
        "oversized with length",
        "/predict",
        {"content": _noise(LIMIT + 1), "headers": JPEG},
        413,
        "payload_too_large",
    ),
    (
        "oversized file part",
        "/predict",
        {"files": {"file": ("x.jpg", _noise(LIMIT + 1))}},
        413,
        "file_too_large",
    ),
    (
        "missing file field",
        "/predict",
        {"files": {"photo": ("x.jpg", image_bytes(RED))}},
        422,
        "missing_file",
    ),
    (
        "two file fields",
        "/predict",
        {"files": [("file", ("a", image_bytes(RED))), ("file", ("b", image_bytes(RED)))]},
        413,
        "too_many_files",
    ),
    (
        "multipart without boundary",
        "/predict",
        {"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}},
        400,
        "bad_multipart",
    ),
    (
        "batch too many files",
        "/predict/batch",
        {"files": [("files", (f"{i}.jpg", image_bytes(RED))) for i in range(4)]},
        413,
        "too_many_files",
    ),
    (
        "batch missing field",
        "/predict/batch",
        {"files": {"file": ("a", image_bytes(RED))}},
        422,
        "missing_files",
    ),
    (
        "batch all bad",
        "/predict/batch",
        {"files": [("files", ("a", b"nope"))]},
        422,
        "no_valid_image",
    ),
    (
        "batch not multipart",
        "/predict/batch",
        {"content": image_bytes(RED), "headers": JPEG},
        415,
        "unsupported_media_type",
    ),
    ("v2 bad json", "/v2/models/catsdogs/infer", {"content": b"{not json"}, 400, None),
    (
        "v2 unknown model",
        *_v2(
            {"name": "image", "datatype": "BYTES", "shape": [1], "data": [_b64(image_bytes(RED))]},
            name="nope",
        ),
        404,
        None,
    ),
    (
        "v2 wrong datatype",
        *_v2({"name": "image", "datatype": "FP32", "shape": [1], "data": [1.0]}),
        400,
        None,
    ),
    (
        "v2 wrong input name",
        *_v2(
            {"name": "pixels", "datatype": "BYTES", "shape": [1], "data": [_b64(image_bytes(RED))]}
        ),
        400,
        None,
    ),
    (
        "v2 shape mismatch",
        *_v2(
            {"name": "image", "datatype": "BYTES", "shape": [2], "data": [_b64(image_bytes(RED))]}
        ),
        400,
        None,
    ),
    (
        "v2 bad base64",
        *_v2({"name": "image", "datatype": "BYTES", "shape": [1], "data": ["***"]}),
        400,
        None,
    ),
    (
        "v2 not an image",
        *_v2({"name": "image", "datatype": "BYTES", "shape": [1], "data": [_b64(b"plain text")]}),
        422,
        None,
    ),
    (
        "v2 unsupported format",
        *_v2({"name": "image", "datatype": "BYTES", "shape": [1], "data": [_b64(_saved("PCX"))]}),
        415,
        None,
    ),
    (
        "v2 too many images",
        *_v2(
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [4],
                "data": [_b64(image_bytes(RED))] * 4,
            }
        ),
        413,
        None,
    ),
    (
        "v2 binary header past body",
        "/v2/models/catsdogs/infer",
        {"content": b"{}", "headers": {"inference-header-content-length": "99"}},
        400,
        None,
    ),
    ("v2 binary data short", "/v2/models/catsdogs/infer", _binary_short(), 400, None),
]


@pytest.fixture
def strict_app(make_app):
    return make_app(max_upload_bytes=LIMIT, max_pixels=100_000, max_batch_files=3)


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "code"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_bad_input(strict_app, path, kwargs, status, code):
    async def scenario():
        async with serve(strict_app) as client:
            response = await client.post(path, **kwargs)
            ready = await client.get("/health/ready")
            good = await client.post("/predict", content=image_bytes(RED), headers=JPEG)
            return response, ready, good

    response, ready, good = run(scenario())
    assert response.status_code == status, response.text
    assert response.headers["x-request-id"]
    body = response.json()
    if code is None:  # the V2 protocol's own error shape
        assert isinstance(body["error"], str)
        assert body["error"]
    else:
        assert body["error"]["code"] == code
        assert body["error"]["message"]
    assert "Traceback" not in response.text
    assert ready.status_code == 200
    assert good.status_code == 200
    assert good.json()["label"] == "cat"


@pytest.mark.parametrize("bad", [_saved("TIFF"), _dds_unknown_fourcc()], ids=["tiff", "dds"])
def test_an_undecodable_image_fails_only_its_batch_slot(strict_app, bad):
    async def scenario():
        async with serve(strict_app) as client:
            files = [
                ("files", ("red.jpg", image_bytes(RED), "image/jpeg")),
                ("files", ("bad", bad, "application/octet-stream")),
            ]
            return await client.post("/predict/batch", files=files)

    response = run(scenario())
    assert response.status_code == 200, response.text
    good, failed = response.json()["predictions"]
    assert good["label"] == "cat"
    assert failed["error"]["code"] == "unsupported_format"
    assert "label" not in failed


def test_oversized_stream_without_length_is_cut_short(strict_app):
    """A body with no Content-Length is refused at the chunk that crosses the limit."""
    sent = []

    async def body():
        for _ in range(100):  # 100 x 64 KiB, far over the limit
            sent.append(1)
            yield b"\0" * 65536

    async def scenario():
        async with serve(strict_app) as client:
            response = await client.post("/predict", content=body(), headers=JPEG)
            return response, (await client.get("/health/ready")).status_code

    response, ready = run(scenario())
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert len(sent) <= LIMIT // 65536 + 2  # stopped reading right after the limit
    assert ready == 200


def test_content_length_over_limit_is_refused_before_reading(strict_app):
    read = []

    async def body():
        read.append(1)
        yield b"\0" * 10

    async def scenario():
        async with serve(strict_app) as client:
            headers = {**JPEG, "content-length": str(LIMIT * 10)}
            return await client.post("/predict", content=body(), headers=headers)

    response = run(scenario())
    assert response.status_code == 413
    assert read == []  # not a byte of the body was read
