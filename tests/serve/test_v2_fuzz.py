"""Property-based fuzzing of the V2 request parser, ``server.v2.parse_infer_request``.

Whatever the bytes, the parser either returns a request that keeps its promises (1 to
``max_images`` images, known outputs each named once, an id that is valid text) or raises
:class:`ApiError` with a 4xx status, never anything else, and never takes long. Examples per
test: ``FUZZ_EXAMPLES`` (default 60; ``make fuzz`` runs 2000).
"""

from __future__ import annotations

import base64
import json
import os
import struct
import time
from typing import Any

import pytest
from hostile import CRASHERS_BUILT, load_crasher
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from server.errors import ApiError
from server.v2 import OUTPUT_LABEL, InferRequest, parse_infer_request

pytestmark = pytest.mark.serve

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
PARSE_LIMIT_S = 1.0  # one parse, whatever the input (the inputs here are at most ~1 MB)
MAX_IMAGE_BYTES = 4096
MAX_JSON_BYTES = 2 * 1024 * 1024
OUTPUTS = ("probabilities", OUTPUT_LABEL)

fuzz = settings(
    max_examples=EXAMPLES,
    deadline=None,  # timed by hand below, around the parse alone
    database=None,  # nothing written into the working tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def parse(body: bytes, header_length: str | None, max_images: int) -> InferRequest | None:
    """Parse; check the outcome is a sound request or a 4xx ApiError, in time."""
    start = time.perf_counter()
    error: ApiError | None = None
    request: InferRequest | None = None
    try:
        request = parse_infer_request(
            body,
            header_length,
            max_images=max_images,
            max_image_bytes=MAX_IMAGE_BYTES,
            max_json_bytes=MAX_JSON_BYTES,
        )
    except ApiError as exc:  # anything else propagates and fails the test
        error = exc
    elapsed = time.perf_counter() - start
    assert elapsed < PARSE_LIMIT_S, f"parsing {len(body)} bytes took {elapsed:.2f} s"
    if error is not None:
        assert 400 <= error.status < 500, (error.status, error.message)
        assert error.message
    if request is not None:
        assert 1 <= len(request.images) <= max_images
        assert all(isinstance(i, bytes) and len(i) <= MAX_IMAGE_BYTES for i in request.images)
        names = [name for name, _ in request.outputs]
        # "outputs": [] parses to no outputs (an answer with none); each name at most once
        assert len(names) == len(set(names)) <= len(OUTPUTS)
        assert set(names) <= set(OUTPUTS)
        assert all(isinstance(binary, bool) for _, binary in request.outputs)
        if request.id is not None:
            assert isinstance(request.id, str)
            request.id.encode("utf-8")  # echoed in the answer: must be encodable
    return request


def dumps(value: Any) -> bytes:
    # allow_nan: NaN/Infinity literals are one of the things a client may send
    return json.dumps(value, allow_nan=True).encode()


PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 24


def valid_request(n: int = 1) -> dict[str, Any]:
    element = base64.b64encode(PNG).decode()
    return {
        "id": "abc",
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [n], "data": [element] * n}],
        "outputs": [{"name": "probabilities"}, {"name": OUTPUT_LABEL}],
    }


def test_the_valid_request_parses() -> None:
    request = parse(dumps(valid_request(3)), None, max_images=4)
    assert request is not None
    assert request.images == [PNG] * 3
    assert request.id == "abc"


# ---------------------------------------------------------------------- known crashers
def _crasher_request(name: str) -> tuple[bytes, str | None]:
    """A ``v2-*`` payload of the suite as (body, Inference-Header-Content-Length)."""
    data = load_crasher(name)
    if not name.endswith(".http"):
        return data, None
    head, _, body = data.partition(b"\r\n\r\n")
    header = None
    for line in head.split(b"\r\n")[1:]:
        field, _, value = line.partition(b":")
        if field.strip().lower() == b"inference-header-content-length":
            header = value.strip().decode("latin-1")  # as Starlette decodes header values
    return body, header


@pytest.mark.parametrize("name", sorted(n for n in CRASHERS_BUILT if n.startswith("v2-")))
def test_known_crashers(name: str) -> None:
    body, header = _crasher_request(name)
    parse(body, header, max_images=32)


# ---------------------------------------------------------------------- raw bytes
header_lengths = st.one_of(
    st.none(),
    st.integers(-5, 5000).map(str),
    st.text(max_size=12),
    st.sampled_from(["\xb2", "\xb9", " 12 ", "1_0", "0x10", "+3", "9" * 40, "٣"]),
)


@fuzz
@given(body=st.binary(max_size=4096), header_length=header_lengths, max_images=st.integers(1, 64))
@example(body=b"", header_length=None, max_images=1)
@example(body=b"{}", header_length="\xb2", max_images=1)
def test_arbitrary_bytes(body: bytes, header_length: str | None, max_images: int) -> None:
    parse(body, header_length, max_images)


# ---------------------------------------------------------------------- arbitrary JSON
SURROGATES = st.sampled_from(["\ud800", "\udfff", "a\udc00b", "\ud83d"])
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.text(max_size=20),
    SURROGATES,
)
json_values = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=6),
        st.dictionaries(
            st.sampled_from(["inputs", "outputs", "id", "parameters", "name", "shape", "data"])
            | st.text(max_size=8),
            children,
            max_size=6,
        ),
    ),
    max_leaves=40,
)


@fuzz
@given(value=json_values, max_images=st.integers(1, 64))
def test_arbitrary_json(value: Any, max_images: int) -> None:
    parse(dumps(value), None, max_images)
    parse(dumps({"inputs": value}), None, max_images)
    parse(dumps({"inputs": [value]}), None, max_images)


@fuzz
@given(
    depth=st.integers(1, 200_000),
    opener=st.sampled_from([b"[", b'{"a":', b'{"inputs":[']),
    wrapped=st.booleans(),
)
@example(depth=100_000, opener=b"[", wrapped=True)
def test_deep_nesting(depth: int, opener: bytes, wrapped: bool) -> None:
    closer = {b"[": b"]", b'{"a":': b"}", b'{"inputs":[': b"]}"}[opener]
    inner = opener * depth + b"0" + closer * depth
    body = b'{"inputs":' + inner + b"}" if wrapped else inner
    parse(body, None, 8)


@fuzz
@given(
    digits=st.integers(1, 20_000),
    dims=st.integers(1, 300),
    where=st.sampled_from(["shape", "binary_data_size", "id", "data"]),
)
@example(digits=4301, dims=1, where="shape")
@example(digits=4300, dims=250, where="shape")
def test_huge_integers(digits: int, dims: int, where: str) -> None:
    number = "9" * digits
    if where == "shape":
        text = '"shape":[' + ",".join([number] * dims) + "]"
        body = dumps(valid_request()).replace(b'"shape": [1]', text.encode())
    elif where == "binary_data_size":
        tensor = '{"name":"image","datatype":"BYTES","shape":[1],'
        tensor += '"parameters":{"binary_data_size":' + number + "}}"
        body = ('{"inputs":[' + tensor + "]}").encode()
    elif where == "id":
        body = dumps(valid_request()).replace(b'"id": "abc"', b'"id": ' + number.encode())
    else:
        body = dumps(valid_request()).replace(b'"data": [', b'"data": [' + number.encode() + b",")
    parse(body, None, 8)


# ---------------------------------------------------------------------- near-valid requests
odd_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.integers(min_value=2**31, max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    SURROGATES,
    st.lists(st.integers(-2, 70), max_size=12),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=3),
)
shapes = st.one_of(
    st.lists(st.integers(-1, 70), min_size=0, max_size=12),
    st.lists(st.integers(min_value=0, max_value=2**64), max_size=3),
    st.lists(odd_values, max_size=4),
    odd_values,
)
datatypes = st.sampled_from(["BYTES", "bytes", "FP32", "UINT8", ""]) | odd_values
names = st.sampled_from(["image", "Image", "images", ""]) | odd_values
b64_elements = st.one_of(
    st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()),
    st.just(base64.b64encode(b"\x00" * (MAX_IMAGE_BYTES + 1)).decode()),
    st.text(max_size=16),
    SURROGATES,
    st.just(""),
    odd_values,
)
datas = st.one_of(
    st.lists(b64_elements, max_size=80),
    st.lists(st.lists(b64_elements, max_size=4), max_size=20),
    odd_values,
)
output_entries = st.one_of(
    st.fixed_dictionaries(
        {"name": st.sampled_from([*OUTPUTS, "logits", ""])},
        optional={
            "parameters": st.one_of(st.fixed_dictionaries({"binary_data": odd_values}), odd_values)
        },
    ),
    odd_values,
)
outputs_lists = st.one_of(
    st.lists(output_entries, max_size=20),
    st.just([{"name": "probabilities"}] * 20000),
    odd_values,
)
ids = st.one_of(st.text(max_size=300), SURROGATES, odd_values)
parameters = st.one_of(
    st.fixed_dictionaries({}, optional={"binary_data_output": odd_values}),
    odd_values,
)


@st.composite
def near_valid(draw: st.DrawFn) -> dict[str, Any]:
    """The valid request with a few of its fields replaced by odd values."""
    n = draw(st.integers(1, 5))
    request = valid_request(n)
    tensor = request["inputs"][0]
    mutations = {
        "shape": lambda: tensor.__setitem__("shape", draw(shapes)),
        "datatype": lambda: tensor.__setitem__("datatype", draw(datatypes)),
        "name": lambda: tensor.__setitem__("name", draw(names)),
        "data": lambda: tensor.__setitem__("data", draw(datas)),
        "drop_data": lambda: tensor.pop("data"),
        "tensor_parameters": lambda: tensor.__setitem__("parameters", draw(parameters)),
        "outputs": lambda: request.__setitem__("outputs", draw(outputs_lists)),
        "drop_outputs": lambda: request.pop("outputs"),
        "id": lambda: request.__setitem__("id", draw(ids)),
        "parameters": lambda: request.__setitem__("parameters", draw(parameters)),
        "inputs": lambda: request.__setitem__(
            "inputs", draw(st.lists(st.just(tensor), max_size=3))
        ),
    }
    for key in draw(
        st.lists(st.sampled_from(sorted(mutations)), min_size=1, max_size=4, unique=True)
    ):
        mutations[key]()
    return request


@fuzz
@given(request=near_valid(), max_images=st.integers(1, 32))
def test_near_valid_json_requests(request: dict[str, Any], max_images: int) -> None:
    parse(dumps(request), None, max_images)


def _binary_elements(blobs: list[bytes], lengths: list[int] | None) -> bytes:
    out = b""
    for i, blob in enumerate(blobs):
        length = lengths[i] if lengths is not None and i < len(lengths) else len(blob)
        out += struct.pack("<I", length % 2**32) + blob
    return out


@fuzz
@given(
    blobs=st.lists(st.binary(max_size=64), min_size=0, max_size=6),
    lengths=st.none() | st.lists(st.integers(0, 2**32 - 1), max_size=6),
    shape=shapes,
    size_delta=st.integers(-8, 8) | st.none(),
    header_delta=st.integers(-4, 4),
    trailing=st.binary(max_size=8),
    max_images=st.integers(1, 32),
)
def test_near_valid_binary_requests(
    blobs: list[bytes],
    lengths: list[int] | None,
    shape: Any,
    size_delta: int | None,
    header_delta: int,
    trailing: bytes,
    max_images: int,
) -> None:
    tensor_bytes = _binary_elements(blobs, lengths) + trailing
    size: Any = len(tensor_bytes) + size_delta if size_delta is not None else None
    tensor: dict[str, Any] = {"name": "image", "datatype": "BYTES", "shape": shape}
    if size is not None:
        tensor["parameters"] = {"binary_data_size": size}
    header = dumps(
        {
            "inputs": [tensor],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        }
    )
    parse(header + tensor_bytes, str(len(header) + header_delta), max_images)
