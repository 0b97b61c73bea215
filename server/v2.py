"""Open Inference Protocol (KServe V2) REST endpoints, so standard V2 clients work unchanged.

The model takes one BYTES input of encoded images (base64 strings in plain JSON, raw file bytes
with the binary tensor extension) and answers ``probabilities`` FP32 [n, C] and ``label`` BYTES
[n]. Errors use the protocol's shape, ``{"error": "message"}``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import struct
import time
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from server.contract import INPUT_NAME, OUTPUT_PROBABILITIES
from server.errors import ApiError
from server.preprocessing import ImageDecodeError
from server.service import Predictor
from server.settings import Settings
from server.uploads import read_body

OUTPUT_LABEL = "label"
BINARY_HEADER = "inference-header-content-length"
EXTENSIONS = ["binary_tensor_data"]


def _bad(message: str, status: int = 400) -> ApiError:
    return ApiError(status, "invalid_request", message)


def _check_model(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    name = request.path_params["name"]
    if name != settings.served_model_name:
        raise ApiError(404, "unknown_model", f"unknown model {name!r}")
    return settings


async def server_metadata(request: Request) -> JSONResponse:
    from server import __version__

    return JSONResponse(
        {"name": "catsdogs-server", "version": __version__, "extensions": EXTENSIONS}
    )


async def server_live(request: Request) -> JSONResponse:
    return JSONResponse({"live": True})


async def server_ready(request: Request) -> JSONResponse:
    if not request.app.state.ready:
        return JSONResponse({"error": "the model is not ready"}, status_code=503)
    return JSONResponse({"ready": True})


async def model_metadata(request: Request) -> JSONResponse:
    settings = _check_model(request)
    contract = request.app.state.contract
    return JSONResponse(
        {
            "name": settings.served_model_name,
            "versions": [contract.model_version],
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}],
            "outputs": [
                {
                    "name": OUTPUT_PROBABILITIES,
                    "datatype": "FP32",
                    "shape": [-1, len(contract.class_names)],
                },
                {"name": OUTPUT_LABEL, "datatype": "BYTES", "shape": [-1]},
            ],
            "parameters": {"class_names": list(contract.class_names)},
        }
    )


async def model_ready(request: Request) -> JSONResponse:
    settings = _check_model(request)
    if not request.app.state.ready:
        return JSONResponse({"error": "the model is not ready"}, status_code=503)
    return JSONResponse({"name": settings.served_model_name, "ready": True})


# ---------------------------------------------------------------------- request parsing
def _split(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """Binary tensor extension: a JSON header of the given length, then the tensor bytes."""
    if header_length is None:
        return body, memoryview(b"")
    if not header_length.isdigit() or int(header_length) > len(body):
        raise _bad(f"Inference-Header-Content-Length {header_length!r} does not fit the body")
    n = int(header_length)
    return body[:n], memoryview(body)[n:]


def _parse_header(raw: bytes) -> dict[str, Any]:
    try:
        request = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _bad("the inference request is not valid JSON") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise _bad("the inference request needs an 'inputs' list")
    return request


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    for item in data:
        out.extend(_flatten(item))
    return out


def _deserialize_bytes(buffer: memoryview) -> list[bytes]:
    """V2 binary BYTES tensor: each element is a 4-byte little-endian length, then the bytes."""
    elements: list[bytes] = []
    offset = 0
    while offset < len(buffer):
        if offset + 4 > len(buffer):
            raise _bad("binary BYTES data ends inside an element's length")
        (length,) = struct.unpack_from("<I", buffer, offset)
        offset += 4
        if offset + length > len(buffer):
            raise _bad("binary BYTES data ends inside an element")
        elements.append(bytes(buffer[offset : offset + length]))
        offset += length
    return elements


def _images(request: dict[str, Any], binary: memoryview, max_files: int) -> list[bytes]:
    inputs = request["inputs"]
    if len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise _bad(f"expected exactly one input, {INPUT_NAME!r}")
    tensor = inputs[0]
    if tensor.get("name") != INPUT_NAME:
        raise _bad(f"unknown input {tensor.get('name')!r}; the model's input is {INPUT_NAME!r}")
    if tensor.get("datatype") != "BYTES":
        raise _bad(f"input {INPUT_NAME!r} must be BYTES (encoded image files)")
    shape = tensor.get("shape")
    if not (
        isinstance(shape, list) and shape and all(isinstance(d, int) and d >= 0 for d in shape)
    ):
        raise _bad(f"input {INPUT_NAME!r} needs a shape, a list of non-negative integers")
    count = math.prod(shape)
    if count > max_files:
        raise _bad(f"{count} images in one request; the limit is {max_files}", status=413)
    if count == 0:
        raise _bad(f"input {INPUT_NAME!r} holds no image")
    parameters = tensor.get("parameters") or {}
    size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
    if size is not None:
        if not isinstance(size, int) or size < 0 or size > len(binary):
            raise _bad("binary_data_size does not fit the binary data sent")
        images = _deserialize_bytes(binary[:size])
    else:
        if "data" not in tensor:
            raise _bad(f"input {INPUT_NAME!r} has neither 'data' nor binary_data_size")
        images = []
        for element in _flatten(tensor["data"]):
            if not isinstance(element, str):
                raise _bad("in JSON, each BYTES element is a base64 string of an image file")
            try:
                images.append(base64.b64decode(element, validate=True))
            except (binascii.Error, ValueError):
                raise _bad("an element of 'data' is not valid base64") from None
    if len(images) != count:
        raise _bad(f"shape {shape} says {count} elements, the data holds {len(images)}")
    return images


def _requested_outputs(request: dict[str, Any]) -> list[tuple[str, bool]]:
    """(output name, binary?) in the order the client asked for them."""
    defaults = request.get("parameters") or {}
    binary_default = bool(isinstance(defaults, dict) and defaults.get("binary_data_output"))
    outputs = request.get("outputs")
    if outputs is None:
        return [(OUTPUT_PROBABILITIES, binary_default), (OUTPUT_LABEL, binary_default)]
    if not isinstance(outputs, list):
        raise _bad("'outputs' must be a list")
    chosen = []
    for item in outputs:
        name = item.get("name") if isinstance(item, dict) else None
        if name not in (OUTPUT_PROBABILITIES, OUTPUT_LABEL):
            raise _bad(f"unknown output {name!r}")
        params = item.get("parameters") or {}
        binary = params.get("binary_data", binary_default) if isinstance(params, dict) else False
        chosen.append((name, bool(binary)))
    return chosen


# ---------------------------------------------------------------------- inference
async def infer(request: Request) -> Response:
    settings = _check_model(request)
    predictor: Predictor = request.app.state.predictor
    try:
        async with asyncio.timeout(settings.request_timeout_s):
            body = await read_body(request, settings.max_request_bytes)
            raw_header, binary = _split(body, request.headers.get(BINARY_HEADER))
            payload = _parse_header(raw_header)
            images = _images(payload, binary, settings.max_batch_files)
            outputs = _requested_outputs(payload)
            ticket = predictor.admit(len(images))
            try:
                outcomes = await predictor.infer(images, ticket)
            finally:
                predictor.release(ticket)
    except TimeoutError:
        raise ApiError(504, "timeout", "the request did not finish in time") from None

    for i, outcome in enumerate(outcomes):
        if isinstance(outcome, ImageDecodeError):  # the protocol has no per-element errors
            error = ApiError.from_decode(outcome)
            raise ApiError(error.status, error.code, f"image {i}: {error.message}")
    state = request.scope["state"]
    request_id = state["request_id"]
    latency_ms = (time.perf_counter() - state["started"]) * 1000
    labels = []
    for i, (prepared, row) in enumerate(outcomes):
        prediction = predictor.describe(row)
        labels.append(prediction.label)
        item_id = request_id if len(outcomes) == 1 else f"{request_id}.{i}"
        predictor.record(
            prediction,
            prepared,
            request_id=item_id,
            route="/v2/models/{name}/infer",
            latency_ms=latency_ms,
        )
    state["images"] = len(outcomes)
    probs = np.stack([row for _, row in outcomes])
    return _response(payload, settings, predictor, probs, labels, outputs, request_id)


def _serialize_bytes(values: list[str]) -> bytes:
    parts = []
    for value in values:
        raw = value.encode("utf-8")
        parts.append(struct.pack("<I", len(raw)))
        parts.append(raw)
    return b"".join(parts)


def _response(
    payload: dict[str, Any],
    settings: Settings,
    predictor: Predictor,
    probs: np.ndarray,
    labels: list[str],
    outputs: list[tuple[str, bool]],
    request_id: str,
) -> Response:
    n, classes = probs.shape
    tensors: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, binary in outputs:
        if name == OUTPUT_PROBABILITIES:
            tensor = {"name": name, "datatype": "FP32", "shape": [n, classes]}
            data: Any = probs.astype("<f4", copy=False)
            raw = data.tobytes() if binary else None
            values = None if binary else data.ravel().tolist()
        else:
            tensor = {"name": name, "datatype": "BYTES", "shape": [n]}
            raw = _serialize_bytes(labels) if binary else None
            values = None if binary else labels
        if raw is not None:
            tensor["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            tensor["data"] = values
        tensors.append(tensor)
    body = {
        "model_name": settings.served_model_name,
        "model_version": predictor.model_version,
        "id": str(payload.get("id", request_id)),
        "outputs": tensors,
    }
    if not blobs:
        return JSONResponse(body)
    header = json.dumps(body, separators=(",", ":")).encode()
    return Response(
        b"".join([header, *blobs]),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(header))},
    )


routes = [
    Route("/v2", server_metadata, methods=["GET"]),
    Route("/v2/health/live", server_live, methods=["GET"]),
    Route("/v2/health/ready", server_ready, methods=["GET"]),
    Route("/v2/models/{name}", model_metadata, methods=["GET"]),
    Route("/v2/models/{name}/ready", model_ready, methods=["GET"]),
    Route("/v2/models/{name}/infer", infer, methods=["POST"]),
]
