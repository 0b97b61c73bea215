"""Percentile math and the load generator's HTTP parsing and accounting."""

from __future__ import annotations

import asyncio
import json
import math
import random

import numpy as np
import pytest

from loadtest import loadgen
from loadtest.stats import percentile, summarize_ms

pytestmark = pytest.mark.load


@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 95, 99, 99.9, 100])
@pytest.mark.parametrize("n", [1, 2, 3, 10, 101, 1000])
def test_percentile_agrees_with_numpy_linear(q: float, n: int) -> None:
    rng = random.Random(n * 1000 + int(q * 10))
    values = [rng.expovariate(1 / 30.0) for _ in range(n)]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)


def test_percentile_small_cases_by_hand() -> None:
    assert percentile([10.0, 20.0], 50) == 15.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 90) == pytest.approx(4.6)
    assert percentile([3.0, 1.0, 2.0], 0) == 1.0  # order of input does not matter
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError, match="q must be"):
        percentile([1.0], 101)


def test_summarize_converts_seconds_to_ms() -> None:
    s = summarize_ms([0.010, 0.020, 0.030])
    assert s["n"] == 3
    assert s["p50"] == pytest.approx(20.0)
    assert s["max"] == pytest.approx(30.0)
    assert math.isnan(summarize_ms([])["p50"])


def _parse(raw: bytes) -> tuple[int, bytes, bool]:
    async def go() -> tuple[int, bytes, bool]:
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()
        return await loadgen.read_response(reader)

    return asyncio.run(go())


def test_read_response_content_length_and_chunked() -> None:
    body = b'{"label": "cat"}'
    head = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body)
    assert _parse(head + body + b"HTTP/1.1 ...") == (200, body, True)
    chunked = (
        b"HTTP/1.1 503 Busy\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n2\r\nef\r\n0\r\n\r\n"
    )
    assert _parse(chunked) == (503, b"abcdef", True)
    closing = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"
    assert _parse(closing) == (200, b"hi", False)


def test_multipart_request_is_well_formed() -> None:
    req = loadgen.predict_request("127.0.0.1:9", "a.jpg", b"\xff\xd8jpegbytes")
    head, body = req.data.split(b"\r\n\r\n", 1)
    headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
    assert int(headers["Content-Length"]) == len(body)
    boundary = headers["Content-Type"].split("boundary=")[1]
    assert body.startswith(f"--{boundary}\r\n".encode())
    assert body.endswith(f"--{boundary}--\r\n".encode())
    assert b'name="file"; filename="a.jpg"' in body
    assert b"\xff\xd8jpegbytes\r\n" in body
    batch = loadgen.batch_request("h", [("a.jpg", b"1"), ("b.jpg", b"2")])
    assert batch.images == 2
    assert batch.data.count(b'name="files"') == 2


def test_body_check() -> None:
    pred = {"label": "cat", "request_id": "x"}
    assert loadgen.body_is_prediction(json.dumps(pred).encode(), 1)
    assert not loadgen.body_is_prediction(b'{"error": {"code": "x"}}', 1)
    assert loadgen.body_is_prediction(json.dumps({"predictions": [pred, pred]}).encode(), 2)
    assert not loadgen.body_is_prediction(json.dumps({"predictions": [pred]}).encode(), 2)
    assert not loadgen.body_is_prediction(b"<html>", 1)


def test_run_summary_counts_only_good_answers() -> None:
    samples = [loadgen.Sample(0.0, 0.010 * (i + 1), 200, True, 1) for i in range(8)]
    samples += [loadgen.Sample(0.0, 0.002, 503, False, 1), loadgen.Sample(0.0, 1.0, 0, False, 1)]
    s = loadgen.RunResult(samples, window_s=2.0, client_cpu_s=0.5).summary()
    assert (s["requests"], s["ok"], s["errors"]) == (10, 8, 2)
    assert s["statuses"] == {"0": 1, "200": 8, "503": 1}
    assert s["images_per_s"] == pytest.approx(4.0)
    assert s["latency_ms"]["p50"] == pytest.approx(45.0)
    assert s["rejected_latency_ms"]["n"] == 1
    assert s["client_cpu_share"] == pytest.approx(0.25)
