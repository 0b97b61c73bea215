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


def test_c1_blocks_take_turns_on_the_floor_the_server_and_the_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The c=1 target ratio's measurement on real processes: the floor worker (both thread
    policies), the server and the HTTP reference each run every round's block of the same
    photos, whole blocks in turn, the order rotating round by round; the warm-up round is
    dropped and the ratios are the p50s' ratios."""
    import asyncio
    import itertools

    model = write_tiny_model(tmp_path / "tiny.onnx")
    folder = tmp_path / "photos"
    folder.mkdir()
    colours = [(220, 30, 30), (30, 30, 220), (30, 200, 30), (200, 200, 30), (90, 90, 90)]
    for i, colour in enumerate(colours):
        (folder / f"p{i}.jpg").write_bytes(jpeg(colour))
    photos = [(p.name, p.read_bytes()) for p in sorted(folder.iterdir())]
    env = {"INTRA_OP_THREADS": "1", "PREDICTION_LOG_PATH": str(tmp_path / "p.db")}
    turns: list[str] = []
    ports: dict[int, str] = {}
    send = loadgen.Connection.send

    async def recorded(self: loadgen.Connection, req: loadgen.Request) -> loadgen.Sample:
        turns.append(ports[self.port])
        return await send(self, req)

    monkeypatch.setattr(loadgen.Connection, "send", recorded)
    worker = bench.InprocessWorker(model, folder, 1)
    call = worker.call

    def recorded_call(op: str, **params: object) -> dict:
        turns.append(f"floor {params['policy']}")
        return call(op, **params)

    worker.call = recorded_call  # type: ignore[method-assign]
    try:
        with (
            running_server(model, tmp_path / "server.log", env=env) as server,
            running_server(
                model, tmp_path / "ref.log", env=env, module="loadtest.rawasgi"
            ) as reference,
        ):
            ports[int(server.url.rsplit(":", 1)[1])] = "server"
            ports[int(reference.url.rsplit(":", 1)[1])] = "reference"
            got = asyncio.run(bench.interleaved_c1(worker, server, reference, photos, 4, 3))
    finally:
        worker.close()
    blocks = [name for name, _ in itertools.groupby(turns)]
    targets = ["floor spin", "floor sleep", "server", "reference"]
    assert len(blocks) == 5 * 4  # the warm-up round and four measured ones, one block each
    rounds = [blocks[i : i + 4] for i in range(0, 20, 4)]
    assert all(sorted(r) == sorted(targets) for r in rounds)
    assert [r[0] for r in rounds] == [targets[i % 4] for i in range(5)]  # the order rotates
    assert turns.count("server") == turns.count("reference") == 5 * 3  # HTTP: one per photo
    assert got["images"] == dict.fromkeys(targets, 4 * 3)  # warm-up dropped
    assert got["errors"] == {"server": 0, "reference": 0}
    assert got["floor_policy"] in ("spin", "sleep")
    p50 = got["p50_ms"]
    assert got["floor_p50_ms"] == min(p50["floor spin"], p50["floor sleep"])
    assert got["server_over_floor"] == pytest.approx(p50["server"] / got["floor_p50_ms"])
    assert got["reference_over_floor"] == pytest.approx(p50["reference"] / got["floor_p50_ms"])
    assert got["server_over_reference"] == pytest.approx(p50["server"] / p50["reference"])
    assert len(got["server_over_floor_halves"]) == 2
    assert all(x > 0 for x in got["server_over_floor_halves"])


def test_halves_follow_rounds_when_requests_fail() -> None:
    """Each half of the interleaved rounds is a half of the rounds, not of the times: a failed
    request shortens its own round and moves no time into the other half."""
    ms = 1e-3
    fast = [10 * ms] * 3
    by_round = {
        "floor spin": [fast, fast, fast, fast],
        "floor sleep": [fast, fast, fast, fast],
        # the server's first two rounds each lost two of their three requests: slow in the
        # first half of the rounds, fast in the second
        "server": [[20 * ms], [20 * ms], fast, fast],
        "reference": [fast, fast, fast, fast],
    }
    assert bench.halves_over_floor(by_round) == pytest.approx([2.0, 1.0])
    by_round["server"][0] = []  # a round with no answer at all still counts as a round
    assert bench.halves_over_floor(by_round) == pytest.approx([2.0, 1.0])
    by_round["server"][:2] = [[], []]  # a half with no answer has no ratio
    assert math.isnan(bench.halves_over_floor(by_round)[0])
