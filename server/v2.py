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
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from catsdogs.contract import INPUT_NAME, OUTPUT_PROBABILITIES
from server.errors import ApiError
from server.limits import Reservation
from server.service import Predictor, Upload
from server.settings import Settings
from server.uploads import Body, content_length, read_body, reserve

OUTPUT_LABEL = "label"
BINARY_HEADER = "inference-header-content-length"
EXTENSIONS = ["binary_tensor_data"]


def _bad(message: str, status: int = 400) -> ApiError:
    return ApiError(status, "invalid_request", message)


def _check_model(request: Request) -> Settings:
    """The served model's settings, or a 404 for another model's name, or for a version other
    than the one served (the versioned URLs: ``/v2/models/{name}/versions/{version}/...``)."""
    settings: Settings = request.app.state.settings
    name = request.path_params["name"]
    if name != settings.served_model_name:
        raise ApiError(404, "unknown_model", f"unknown model {name!r}")
    version = request.path_params.get("version")
    if version is not None and version != request.app.state.contract.model_version:
        raise ApiError(
            404,
            "unknown_version",
            f"model {name!r} has no version {version[:80]!r}; it serves"
            f" {request.app.state.contract.model_version!r}",
        )
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
        raise ApiError(503, "not_ready", "the model is not ready")
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
        raise ApiError(503, "not_ready", "the model is not ready")
    return JSONResponse({"name": settings.served_model_name, "ready": True})


# ---------------------------------------------------------------------- request parsing
# Every count and size is bounded before the work that depends on it, so no request can make
# the parser (which holds the GIL) stall the event loop or grow memory past its body.
MAX_DIMS = 8  # dimensions of the input's shape ([n] or [n, 1] in practice)
MAX_JSON_TOKENS = 20_000  # '[', '{' and ',' in the JSON part: bounds elements and nesting
MAX_INT_DIGITS = 18  # any integer in the request (shapes, sizes) fits in an int64
MAX_OUTPUTS = 16  # entries in "outputs" before de-duplication
MAX_ID_CHARS = 256
OUTPUT_NAMES = (OUTPUT_PROBABILITIES, OUTPUT_LABEL)
_PARSE_IN_THREAD_BYTES = 256 * 1024  # larger bodies are parsed off the event loop


@dataclass(frozen=True)
class InferRequest:
    """A parsed inference request: the encoded images, the outputs asked for, the client's id."""

    # base64 images decoded, or views of the binary tensor data (not copied: the body is held
    # once, as the byte budget counts it)
    images: list[bytes | memoryview]
    outputs: list[tuple[str, bool]]  # (output name, binary?) in the order asked for
    id: str | None


def parse_infer_request(
    body: bytes,
    header_length: str | None,
    *,
    max_images: int,
    max_image_bytes: int = 2**62,
    max_json_bytes: int = 2**62,
) -> InferRequest:
    """Parse a V2 inference request; any bad input raises :class:`ApiError` with a 4xx."""
    raw_header, binary = _split(body, header_length)
    if len(raw_header) > max_json_bytes:
        raise _json_too_large(max_json_bytes)
    payload = _parse_json(raw_header)
    if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), list):
        raise _bad("the inference request needs an 'inputs' list")
    return InferRequest(
        images=_images(payload, binary, max_images, max_image_bytes),
        outputs=_requested_outputs(payload),
        id=_request_id(payload),
    )


def _json_too_large(max_json_bytes: int) -> ApiError:
    return _bad(
        f"the JSON part is larger than {max_json_bytes} bytes; send large images with the "
        "binary tensor extension",
        status=413,
    )


def check_declared_json(
    content_length: int | None, header_length: str | None, max_json_bytes: int
) -> None:
    """413 before any of the body is read when the sizes the request declares put its JSON part
    over ``max_json_bytes``: the whole body without the binary extension, else its header."""
    declared = content_length
    if header_length is not None:
        try:
            declared = _header_length(header_length)
        except ApiError:  # the parse names it (400) once the body is in
            declared = None
    if declared is not None and declared > max_json_bytes:
        raise _json_too_large(max_json_bytes)


def _header_length(header_length: str) -> int:
    value = header_length.strip()
    # ASCII digits only: str.isdigit() accepts '²', which int() refuses.
    if not (value.isascii() and value.isdigit()) or len(value) > MAX_INT_DIGITS:
        raise _bad("Inference-Header-Content-Length must be a number of bytes")
    return int(value)


def _split(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """Binary tensor extension: a JSON header of the given length, then the tensor bytes."""
    if header_length is None:
        return body, memoryview(b"")
    n = _header_length(header_length)
    if n > len(body):
        raise _bad(f"Inference-Header-Content-Length {n} is larger than the body")
    return body[:n], memoryview(body)[n:]


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError("integer too large")
    return int(text)


def _no_constant(text: str) -> Any:
    raise ValueError(f"{text} is not valid JSON")


def _parse_json(raw: bytes) -> Any:
    tokens = raw.count(b"[") + raw.count(b"{") + raw.count(b",")
    if tokens > MAX_JSON_TOKENS:
        raise _bad(f"the inference request has more than {MAX_JSON_TOKENS} JSON elements")
    try:
        return json.loads(raw, parse_int=_bounded_int, parse_constant=_no_constant)
    except RecursionError:
        raise _bad("the inference request is nested too deeply") from None
    except (ValueError, UnicodeDecodeError):  # JSONDecodeError is a ValueError
        raise _bad(
            f"the inference request is not valid JSON (integers of at most {MAX_INT_DIGITS}"
            " digits; binary tensor data after the JSON needs the Inference-Header-Content-Length"
            " header)"
        ) from None


def _flatten(data: Any, limit: int) -> list[Any]:
    """The leaves of nested lists, in order; stops past ``limit`` (the caller then refuses)."""
    out: list[Any] = []
    stack = [iter([data])]
    while stack and len(out) <= limit:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, list):
            stack.append(iter(item))
        else:
            out.append(item)
    return out


_END = object()


def _deserialize_bytes(buffer: memoryview, count: int, max_bytes: int) -> list[bytes | memoryview]:
    """V2 binary BYTES tensor: each element is a 4-byte little-endian length, then the bytes
    (a view of ``buffer``, not a copy)."""
    elements: list[bytes | memoryview] = []
    offset = 0
    while offset < len(buffer):
        if len(elements) == count:
            raise _bad(f"binary BYTES data holds more than the {count} elements of the shape")
        if offset + 4 > len(buffer):
            raise _bad("binary BYTES data ends inside an element's length")
        (length,) = struct.unpack_from("<I", buffer, offset)
        offset += 4
        if length > max_bytes:
            raise _bad(f"image {len(elements)} is larger than {max_bytes} bytes", status=413)
        if offset + length > len(buffer):
            raise _bad("binary BYTES data ends inside an element")
        elements.append(buffer[offset : offset + length])
        offset += length
    return elements


def _shape_count(shape: Any, max_images: int) -> int:
    if not isinstance(shape, list) or not 1 <= len(shape) <= MAX_DIMS:
        raise _bad(f"input {INPUT_NAME!r} needs a shape: a list of 1 to {MAX_DIMS} integers")
    count = 1
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
            raise _bad(f"input {INPUT_NAME!r}: shape dimensions are non-negative integers")
        if dim > max_images:  # checked one by one: the product never grows past the limit
            raise _bad(f"{dim} images in one request; the limit is {max_images}", status=413)
        count *= dim
        if count > max_images:
            raise _bad(f"{count} images in one request; the limit is {max_images}", status=413)
    if count == 0:
        raise _bad(f"input {INPUT_NAME!r} holds no image")
    return count


def _images(
    request: dict[str, Any], binary: memoryview, max_images: int, max_bytes: int
) -> list[bytes | memoryview]:
    inputs = request["inputs"]
    if len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise _bad(f"expected exactly one input, {INPUT_NAME!r}")
    tensor = inputs[0]
    if tensor.get("name") != INPUT_NAME:
        raise _bad(f"unknown input; the model's input is {INPUT_NAME!r}")
    if tensor.get("datatype") != "BYTES":
        raise _bad(f"input {INPUT_NAME!r} must be BYTES (encoded image files)")
    count = _shape_count(tensor.get("shape"), max_images)
    parameters = _parameters(tensor, "an input's")
    size = parameters.get("binary_data_size")
    images: list[bytes | memoryview]
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= len(binary):
            raise _bad("binary_data_size does not fit the binary data sent")
        images = _deserialize_bytes(binary[:size], count, max_bytes)
    else:
        if "data" not in tensor:
            raise _bad(f"input {INPUT_NAME!r} has neither 'data' nor binary_data_size")
        images = [
            _b64_image(e, i, max_bytes) for i, e in enumerate(_flatten(tensor["data"], count))
        ]
    if len(images) != count:
        raise _bad(f"the shape says {count} elements, the data holds a different number")
    return images


def _b64_image(element: Any, index: int, max_bytes: int) -> bytes:
    if not isinstance(element, str):
        raise _bad("in JSON, each BYTES element is a base64 string of an image file")
    if len(element) // 4 * 3 > max_bytes + 3:
        raise _bad(f"image {index} is larger than {max_bytes} bytes", status=413)
    try:
        return base64.b64decode(element, validate=True)
    except (binascii.Error, ValueError):  # ValueError: non-ASCII characters
        raise _bad(f"element {index} of 'data' is not valid base64") from None


def _parameters(holder: dict[str, Any], whose: str = "the request's") -> dict[str, Any]:
    """A request's, input's or output's optional ``parameters``; absent or null: none."""
    parameters = holder.get("parameters")
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise _bad(f"{whose} 'parameters' must be an object")
    return parameters


def _requested_outputs(request: dict[str, Any]) -> list[tuple[str, bool]]:
    """(output name, binary?) in the order the client asked for them, each name once."""
    defaults = _parameters(request)
    binary_default = defaults.get("binary_data_output", False) is True
    outputs = request.get("outputs")
    if not isinstance(outputs, list | None) or len(outputs or ()) > MAX_OUTPUTS:
        raise _bad(f"'outputs' must be a list of at most {MAX_OUTPUTS} entries")
    if not outputs:  # absent, null or empty: none chosen, so every output, as the protocol says
        return [(name, binary_default) for name in OUTPUT_NAMES]
    chosen: dict[str, bool] = {}
    for item in outputs:
        name = item.get("name") if isinstance(item, dict) else None
        if name not in OUTPUT_NAMES:
            raise _bad(f"unknown output; the model's outputs are {', '.join(OUTPUT_NAMES)}")
        params = _parameters(item, "an output's")
        if "classification" in params:
            # Triton's classification extension (top-k "score:index:label" strings), which /v2
            # does not list: answered as if asked for nothing, a client read probabilities as
            # its classes
            raise _bad(
                "the classification extension is not supported: ask for 'label' (the class) "
                "and 'probabilities'"
            )
        chosen.setdefault(name, params.get("binary_data", binary_default) is True)
    return list(chosen.items())


def _request_id(request: dict[str, Any]) -> str | None:
    """The client's id, echoed in the answer: a short string of valid text, or absent."""
    value = request.get("id")
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_ID_CHARS:
        raise _bad(f"'id' must be a string of at most {MAX_ID_CHARS} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape
        raise _bad("'id' is not valid Unicode text") from None
    return value


# ---------------------------------------------------------------------- inference
async def infer(request: Request) -> Response:
    settings = _check_model(request)
    predictor: Predictor = request.app.state.predictor
    parsed: list[InferRequest] = []

    async def read(reservation: Reservation) -> list[Upload]:
        header_length = request.headers.get(BINARY_HEADER)
        check_declared_json(content_length(request), header_length, settings.max_json_bytes)
        body = await read_body(request, settings.max_request_bytes, reservation)
        if not body.joined:  # the join below holds the body twice: the budget counts both
            reserve(reservation, len(body))

        def parse() -> InferRequest:
            return parse_infer_request(
                body.join(),
                header_length,
                max_images=settings.max_batch_files,
                max_image_bytes=settings.max_upload_bytes,
                max_json_bytes=settings.max_json_bytes,
            )

        # joining, json and base64 hold the GIL; a large body is parsed on a thread so the
        # loop gets its turn between the steps instead of waiting for the whole parse
        big = len(body) > _PARSE_IN_THREAD_BYTES
        request_ = await asyncio.to_thread(parse) if big else parse()
        parsed.append(request_)
        # a view stays a view until its decode thread joins it (server.uploads.Body)
        return [Upload(Body([image])) for image in request_.images]

    results = await predictor.run(request, read, atomic=True)
    (request_,) = parsed
    labels = [r.prediction.label for r in results if r.prediction is not None]
    probs = np.array(
        [
            [r.prediction.probabilities[c] for c in predictor.class_names]
            for r in results
            if r.prediction is not None
        ],
        dtype=np.float32,
    )
    request_id = request.scope["state"]["request_id"]
    ids = [r.prediction_id for r in results if r.prediction is not None and r.prediction_id]
    return _response(request_, settings, predictor, probs, labels, request_id, ids)


def _serialize_bytes(values: list[str]) -> bytes:
    parts = []
    for value in values:
        raw = value.encode("utf-8")
        parts.append(struct.pack("<I", len(raw)))
        parts.append(raw)
    return b"".join(parts)


def _response(
    request_: InferRequest,
    settings: Settings,
    predictor: Predictor,
    probs: np.ndarray,
    labels: list[str],
    request_id: str,
    prediction_ids: list[str],
) -> Response:
    n, classes = probs.shape
    tensors: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, binary in request_.outputs:
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
        "id": request_.id if request_.id is not None else request_id,
        # each image's id in the prediction log, in input order, for POST /feedback (a
        # parameter's value is a string in the protocol: the ids joined by commas, which no id
        # holds)
        "parameters": {"prediction_ids": ",".join(prediction_ids)},
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


MODEL = "/v2/models/{name}"
VERSIONED = MODEL + "/versions/{version}"  # the protocol's optional version segment

routes = [
    Route("/v2", server_metadata, methods=["GET"]),
    Route("/v2/health/live", server_live, methods=["GET"]),
    Route("/v2/health/ready", server_ready, methods=["GET"]),
    *(
        route
        for base in (MODEL, VERSIONED)
        for route in (
            Route(base, model_metadata, methods=["GET"]),
            Route(base + "/ready", model_ready, methods=["GET"]),
            Route(base + "/infer", infer, methods=["POST"]),
        )
    ),
]
