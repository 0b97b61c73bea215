"""The HTTP reference of ``make bench`` (loadtest.rawasgi) and the CPU accounting per thread."""

from __future__ import annotations

import io
import json
import math
import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from loadtest import bench, loadgen
from loadtest.rawasgi import image_of
from loadtest.serverproc import running_server, thread_cpu_s
from loadtest.tiny_model import write_tiny_model

pytestmark = pytest.mark.load


def jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (80, 60)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def post(url: str, request: loadgen.Request) -> dict:
    """Send one of the load generator's prebuilt requests as it is and read the answer."""
    head, body = request.data.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    headers.pop("Host", None)
    req = urllib.request.Request(url + "/predict", data=body, headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200
        return json.loads(resp.read())


def test_the_image_is_taken_out_of_the_load_generators_multipart_body() -> None:
    data = jpeg((200, 20, 20)) + b"\r\n--not-the-boundary\r\n"  # bytes that look like a boundary
    request = loadgen.predict_request("h:1", "cat.1.jpg", data)
    head, body = request.data.split(b"\r\n\r\n", 1)
    ctype = next(v for k, v in (h.split(b": ", 1) for h in head.split(b"\r\n")[1:])
                 if k.lower() == b"content-type")  # fmt: skip
    assert image_of(body, ctype) == data
    assert image_of(data, b"image/jpeg") == data  # a raw body is the image itself


def test_reference_answers_what_the_server_answers(tmp_path: Path) -> None:
    """The same photos through the real server and through the reference, both on one model:
    the same labels and the same probabilities (the reference does the server's work)."""
    model = write_tiny_model(tmp_path / "tiny.onnx")
    env = {"INTRA_OP_THREADS": "1", "PREDICTION_LOG_PATH": str(tmp_path / "p.db")}
    photos = [("red.jpg", jpeg((220, 30, 30))), ("blue.jpg", jpeg((30, 30, 220), (50, 90)))]
    with (
        running_server(model, tmp_path / "server.log", env=env) as server,
        running_server(
            model, tmp_path / "ref.log", env=env, module="loadtest.rawasgi"
        ) as reference,
    ):
        answers = {}
        for name, target in (("server", server), ("reference", reference)):
            host = target.url.removeprefix("http://")
            requests = [loadgen.predict_request(host, n, d) for n, d in photos]
            answers[name] = [post(target.url, r) for r in requests]
            for answer in answers[name]:
                assert loadgen.body_is_prediction(json.dumps(answer).encode(), 1)
        # what it cannot read is a 400, and it goes on answering
        bad = urllib.request.Request(
            reference.url + "/predict", data=b"not an image", headers={"Content-Type": "image/jpeg"}
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(bad, timeout=30)
        assert refused.value.code == 400
        host = reference.url.removeprefix("http://")
        assert post(reference.url, loadgen.predict_request(host, *photos[0]))["label"] == "cat"
    assert [a["label"] for a in answers["reference"]] == ["cat", "dog"]
    assert [a["label"] for a in answers["server"]] == ["cat", "dog"]
    for ref, srv in zip(answers["reference"], answers["server"], strict=True):
        for cls, p in srv["probabilities"].items():
            assert ref["probabilities"][cls] == pytest.approx(p, abs=1e-6)


def test_thread_cpu_is_read_per_thread_with_the_main_thread_under_the_process_id() -> None:
    started, done = threading.Event(), threading.Event()
    ids: list[int] = []

    def burn() -> None:
        ids.append(threading.get_native_id())
        end = time.thread_time() + 0.2  # 0.2 s of this thread's own CPU
        while time.thread_time() < end:
            pass
        started.set()
        done.wait(10)  # stay alive while /proc is read

    worker = threading.Thread(target=burn)
    worker.start()
    try:
        assert started.wait(30)
        got = thread_cpu_s(os.getpid())
    finally:
        done.set()
        worker.join()
    assert threading.get_native_id() == os.getpid()  # pytest runs here in the main thread
    assert os.getpid() in got
    assert 0.19 <= got[ids[0]] < 5.0  # what the thread burnt, as /proc counts it


def test_cpu_per_request_splits_the_event_loop_from_the_other_threads() -> None:
    before = {100: 1.0, 101: 5.0}
    after = {100: 1.5, 101: 7.0, 102: 0.5}  # thread 102 started during the level
    got = bench.cpu_per_request(100, before, after, 10.0, {"requests_per_s": 50.0})
    # 0.5 s of the main thread over 10 s at 50 requests/s: 1 ms per request; others 2.5 s
    assert got["loop_cpu_ms_per_request"] == pytest.approx(1.0)
    assert got["other_cpu_ms_per_request"] == pytest.approx(5.0)
    nothing = bench.cpu_per_request(100, before, after, 10.0, {"requests_per_s": 0.0})
    assert all(math.isnan(v) for v in nothing.values())
