"""Real server processes: the CLI, uvicorn's factory mode, V2 clients, graceful shutdown.

Each server binds a free port on 127.0.0.1 and is stopped by its PID.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import (
    BLUE,
    RED,
    ROOT,
    TINY_VERSION,
    ServerProcess,
    access_records,
    free_port,
    image_bytes,
    photos,
    predict_jpegs,
    prom,
    start_server,
    tiny_contract,
)
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.serve, pytest.mark.slow]


def _raw_request(url: str, head: bytes, body_parts: list[bytes], pause: float = 0.0):
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=20)
    sock.sendall(head)
    return sock


def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
        if b"\r\n\r\n" in data:
            head, _, rest = data.partition(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                None,
            )
            if length is not None and len(rest) >= length:
                break
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2]


def test_cli_serves_and_official_v2_client_works(server_process):
    import tritonclient.http as httpclient

    server: ServerProcess = server_process()
    server.wait_ready()
    response = httpx.post(
        f"{server.url}/predict", content=image_bytes(RED), headers={"content-type": "image/jpeg"}
    )
    assert response.status_code == 200
    assert response.json()["label"] == "cat"

    client = httpclient.InferenceServerClient(url=server.url.removeprefix("http://"))
    try:
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready("catsdogs")
        meta = client.get_model_metadata("catsdogs")
        assert meta["inputs"][0]["name"] == "image"

        files = [image_bytes(BLUE), image_bytes(RED), photos("dog", 1, "originals")[0].read_bytes()]
        # Binary tensor extension: the elements are the raw file bytes.
        binary_in = httpclient.InferInput("image", [len(files)], "BYTES")
        binary_in.set_data_from_numpy(np.array(files, dtype=np.object_), binary_data=True)
        outputs = [
            httpclient.InferRequestedOutput("probabilities", binary_data=True),
            httpclient.InferRequestedOutput("label", binary_data=True),
        ]
        result = client.infer("catsdogs", [binary_in], outputs=outputs)
        probs = result.as_numpy("probabilities")
        assert probs.shape == (3, 2)
        assert probs.dtype == np.float32
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
        labels = [x.decode() for x in result.as_numpy("label")]
        assert labels[:2] == ["dog", "cat"]

        # Plain JSON: the elements are base64 strings.
        encoded = np.array([base64.b64encode(f) for f in files[:2]], dtype=np.object_)
        json_in = httpclient.InferInput("image", [2], "BYTES")
        json_in.set_data_from_numpy(encoded, binary_data=False)
        json_out = [
            httpclient.InferRequestedOutput(n, binary_data=False)
            for n in ("probabilities", "label")
        ]
        result = client.infer("catsdogs", [json_in], outputs=json_out)
        np.testing.assert_allclose(result.as_numpy("probabilities"), probs[:2], rtol=1e-6)
        assert [x.decode() if isinstance(x, bytes) else x for x in result.as_numpy("label")] == [
            "dog",
            "cat",
        ]

        # No outputs named: the client asks for all of them in binary.
        result = client.infer("catsdogs", [binary_in])
        assert result.as_numpy("probabilities").shape == (3, 2)

        from tritonclient.utils import InferenceServerException

        with pytest.raises(InferenceServerException, match="unknown model"):
            client.infer("other", [binary_in])
    finally:
        client.close()

    def predicted_cat(access: list[dict]) -> bool:
        return any(a["route"] == "/predict" and a.get("label") == "cat" for a in access)

    access = access_records(server, predicted_cat)
    assert predicted_cat(access), access
    assert all({"request_id", "method", "route", "status", "latency_ms"} <= set(a) for a in access)
    assert "uvicorn.access" not in server.output(tail=10**9)


def test_v2_versioned_urls_compression_and_empty_choices_on_a_real_server(server_process):
    """What a stock V2 client meets past the basics: the version the metadata lists is served
    under the protocol's versioned URLs (any other version is a 404, and not ready); a body
    compressed by the client is a 415 naming Content-Encoding on every route that reads a body
    (it used to fail as bad JSON, a bad form or a bad image); ``"outputs": []`` chooses none,
    so every output comes back; a null ``parameters`` is no parameters."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    server: ServerProcess = server_process()
    server.wait_ready()
    url = server.url
    client = httpclient.InferenceServerClient(url=url.removeprefix("http://"))
    try:
        [version] = client.get_model_metadata("catsdogs")["versions"]
        assert client.get_model_metadata("catsdogs", version)["versions"] == [version]
        assert client.is_model_ready("catsdogs", version)
        assert not client.is_model_ready("catsdogs", version + "x")
        image = httpclient.InferInput("image", [1], "BYTES")
        image.set_data_from_numpy(np.array([image_bytes(RED)], dtype=np.object_))
        result = client.infer("catsdogs", [image], model_version=version)
        assert [x.decode() for x in result.as_numpy("label")] == ["cat"]
        assert result.get_response()["model_version"] == version
        with pytest.raises(InferenceServerException, match="has no version"):
            client.infer("catsdogs", [image], model_version="1")
        with pytest.raises(InferenceServerException, match="Content-Encoding 'gzip'"):
            client.infer("catsdogs", [image], request_compression_algorithm="gzip")
        # Triton's classification extension, which /v2 does not list: it was ignored, and the
        # client read FP32 probabilities where it expected "score:index:label" strings
        top = httpclient.InferRequestedOutput("probabilities", class_count=2)
        with pytest.raises(InferenceServerException, match="classification extension"):
            client.infer("catsdogs", [image], outputs=[top])
    finally:
        client.close()

    versioned = f"{url}/v2/models/catsdogs/versions/{version}"
    assert httpx.get(versioned).json()["versions"] == [version]
    assert httpx.get(f"{url}/v2/models/catsdogs/versions/other/ready").status_code == 404
    tensor = {
        "name": "image",
        "datatype": "BYTES",
        "shape": [1],
        "data": [base64.b64encode(image_bytes(BLUE)).decode()],
        "parameters": None,
    }
    answer = httpx.post(
        f"{versioned}/infer", json={"inputs": [tensor], "outputs": [], "parameters": None}
    )
    assert answer.status_code == 200, answer.text
    outputs = {o["name"]: o for o in answer.json()["outputs"]}
    assert set(outputs) == {"probabilities", "label"}
    assert outputs["label"]["data"] == ["dog"]

    gzip = {"content-encoding": "gzip"}
    for path, content_type in [
        ("/predict", "image/jpeg"),
        ("/predict/batch", "multipart/form-data; boundary=x"),
        ("/v2/models/catsdogs/infer", "application/json"),
        ("/feedback", "application/json"),
    ]:
        refused = httpx.post(
            f"{url}{path}",
            content=b"\x1f\x8b" + bytes(30),
            headers={**gzip, "content-type": content_type},
        )
        assert refused.status_code == 415, (path, refused.text)
        assert refused.headers["accept-encoding"] == "identity", path
        assert "Content-Encoding 'gzip'" in refused.text, path
    raw = httpx.post(
        f"{url}/predict",
        content=image_bytes(RED),
        headers={"content-type": "image/jpeg", "content-encoding": "identity"},
    )
    assert raw.json()["label"] == "cat"
    # a transfer coding besides chunked: the parser undoes the chunks only, and the gzipped
    # photo was read as it came (422 not_an_image, the wrong cause)
    import gzip as gzip_module

    photo = image_bytes(RED)
    for coding, body, status in [
        ("gzip, chunked", gzip_module.compress(photo), 415),
        ("chunked", photo, 200),
    ]:
        head = (
            f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
            f"Transfer-Encoding: {coding}\r\nConnection: close\r\n\r\n"
        ).encode()
        chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(head + chunked)
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        assert reply.startswith(f"HTTP/1.1 {status} ".encode()), (coding, reply[:300])
        if status == 415:
            assert b"Transfer-Encoding 'gzip, chunked'" in reply, reply[:600]
            assert b"accept-encoding: identity" in reply.lower()
    # the versioned route is its own label, as bounded as the others
    metrics = httpx.get(f"{url}/metrics").text
    assert '"/v2/models/{name}/versions/{version}/infer"' in metrics


def test_oversized_chunked_body_refused_early(server_process):
    server = server_process(MAX_UPLOAD_BYTES="100000")
    server.wait_ready()
    head = (
        b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(head)
        chunk = b"\0" * 65536
        sent = 0
        try:
            for _ in range(200):  # 12.8 MB if the server read it all
                sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed: it did not read the rest
        status, body = _read_response(sock)
    assert status == 413
    assert json.loads(body)["error"]["code"] == "payload_too_large"
    assert httpx.get(f"{server.url}/health/ready").status_code == 200


def test_sigterm_finishes_in_flight_request_and_exits_zero(server_process):
    server = server_process(GRACEFUL_TIMEOUT_S="10")
    server.wait_ready()
    image = image_bytes(BLUE)
    head = (
        b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
        b"Content-Length: %d\r\n\r\n" % len(image)
    )
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(head + image[:100])  # the request is in flight: half its body is sent
        time.sleep(0.3)
        server.proc.send_signal(15)
        time.sleep(0.5)
        assert server.proc.poll() is None  # still waiting for the in-flight request
        sock.sendall(image[100:])
        status, body = _read_response(sock)
    assert status == 200
    assert json.loads(body)["label"] == "dog"
    assert server.proc.wait(20) == 0
    assert '"message": "stopped"' in server.output()


def _failed_start(
    tmp_path: Path, model: Path, *, port: int | None = 0, **env: str
) -> tuple[int, str]:
    """``python -m server --model MODEL`` expected not to start: its exit code and output.
    ``port``: 0 a free one, None no --port flag (the environment's PORT, or the default)."""
    args = ["--model", str(model)]
    if port is not None:
        args += ["--port", str(port or free_port())]
    proc = subprocess.run(
        [sys.executable, "-m", "server", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "PREDICTION_LOG_PATH": str(tmp_path / "p.db"), **env},
    )
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "not_onnx"])
def test_bad_model_file_fails_with_its_name(tmp_path, tiny_model, kind):
    model = tmp_path / f"{kind}.onnx"
    if kind == "empty":
        model.write_bytes(b"")
    elif kind == "truncated":
        data = tiny_model.read_bytes()
        model.write_bytes(data[: len(data) // 2])
    elif kind == "not_onnx":
        model.write_text("this is not a model\n")
    code, output = _failed_start(tmp_path, model)
    assert code != 0
    assert str(model) in output
    assert "Traceback" not in output


@pytest.mark.parametrize(
    ("kind", "named"),
    [
        ("three_classes", "the contract names 3 classes"),
        ("cascade", "cascade is not an object"),
        ("control_class", "class_names: 'dog"),
        ("escape_version", "model_version: 'v1"),
        ("override_class", "class_names: 'cat"),
    ],
)
def test_a_contract_the_model_does_not_keep_fails_at_start(tmp_path, kind, named):
    """A contract naming more classes than the model answers (two) used to start, turn ready
    and answer every prediction with a 500; a ``cascade`` entry that is not an object ended in
    a traceback. A class name or version with a CR, an ESC or a right-to-left override (a file
    from a registry someone else writes) reached /metrics raw, a terminal through
    ``--version``, and chart titles. Each stops the start with one line naming the file,
    exit 1."""
    import onnx
    from onnx import helper

    from loadtest.tiny_model import build_tiny_model as tiny_graph

    graph = tiny_graph(tiny_contract())  # answers two classes
    contract = tiny_contract()
    if kind == "three_classes":
        contract = dataclasses.replace(contract, class_names=("cat", "dog", "bird"))
    elif kind == "cascade":
        contract = dataclasses.replace(contract, extra={**contract.extra, "cascade": "oops"})
    elif kind == "control_class":
        contract = dataclasses.replace(contract, class_names=("cat", "dog\r\nX-Evil: 1"))
    elif kind == "escape_version":
        contract = dataclasses.replace(contract, model_version="v1\x1b[31mRED")
    else:
        contract = dataclasses.replace(contract, class_names=("cat\u202e", "dog"))
    del graph.metadata_props[:]
    helper.set_model_props(graph, contract.to_metadata())
    model = tmp_path / f"{kind}.onnx"
    onnx.save(graph, str(model))
    code, output = _failed_start(tmp_path, model)
    assert code == 1, output
    assert "cannot serve" in output
    assert str(model) in output
    assert named in output
    if kind.endswith(("_class", "_version")):
        assert "is not a printable name" in output
        for raw in ("\r", "\x1b", "\u202e"):  # the log line escapes what it quotes
            assert raw not in output
    assert "Traceback" not in output
    assert '"ready"' not in output


def test_a_bad_setting_is_an_error_record_naming_it(tmp_path, tiny_model):
    """A bad setting stops the start with exit 2 and one record at level error naming the
    variable (it was captured stderr, at level warning: a filter on errors missed it)."""
    code, output = _failed_start(tmp_path, tiny_model, port=None, PORT="abc")
    assert code == 2, output
    records = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    errors = [r for r in records if r["level"] == "error"]
    assert len(errors) == 1, records
    assert "PORT" in errors[0]["message"]
    assert errors[0]["message"].startswith("cannot serve")


def test_a_port_in_use_fails_before_the_model_loads(tmp_path, tiny_model):
    """The address is taken before the model is loaded: one line naming it, exit 1, and no
    "ready" (uvicorn bound last, so a taken port failed after download, load and warm-up, and
    the server logged "ready" first)."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        code, output = _failed_start(tmp_path, tiny_model, port=port)
    assert code == 1, output
    assert f"cannot listen on 127.0.0.1:{port}" in output
    assert "in use" in output
    assert '"ready"' not in output
    assert "Traceback" not in output


def test_uvicorn_factory_mode(tiny_model, tmp_path):
    port = free_port()
    env = {
        "PATH": "/usr/bin:/bin",
        "MODEL_PATH": str(tiny_model),
        "PREDICTION_LOG_PATH": str(tmp_path / "p.db"),
    }
    log = tmp_path / "uvicorn.log"
    command = [
        sys.executable, "-m", "uvicorn", "--factory", "server.app:create_app",
        "--host", "127.0.0.1", "--port", str(port), "--no-access-log",
        "--http", "server.protocol:GuardedHttpToolsProtocol",
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", log)
    try:
        server.wait_ready()
        response = httpx.post(
            f"{server.url}/predict",
            files={"file": ("b.jpg", image_bytes(BLUE), "image/jpeg")},
        )
        assert response.status_code == 200
        assert response.json()["label"] == "dog"
        # the guarded protocol read its limits from the environment: an oversized head -> 431
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 40_000)
            assert sock.recv(200).startswith(b"HTTP/1.1 431")
    finally:
        server.terminate()


def test_stage_breakdown_of_real_requests_is_exported(server_process):
    """Every stage of a prediction is timed from real requests and exported per stage."""
    server = server_process()
    server.wait_ready()
    stages = ("head", "body", "queue", "decode", "preprocess", "inference", "respond", "log")
    # every stage is exported from the start (a dashboard's rate() sees 0, not a missing series)
    text = httpx.get(f"{server.url}/metrics").text
    for stage in stages:
        assert f'request_stage_seconds_count{{stage="{stage}"}} 0.0' in text, stage
    predict_jpegs(server.url, 3)
    text = httpx.get(f"{server.url}/metrics").text
    for stage in stages:
        assert prom(text, "request_stage_seconds_count", stage=stage) == 3, stage
        total = prom(text, "request_stage_seconds_sum", stage=stage)
        assert 0 <= total < 30, (stage, total)
    # the head is parsed by the guarded protocol: its first-byte timestamp reached the app
    assert prom(text, "request_stage_seconds_sum", stage="head") > 0
    assert prom(text, "request_stage_seconds_sum", stage="inference") > 0


def test_start_up_phases_cover_the_time_to_ready(server_process):
    """``server_startup_seconds{phase}`` and the ready line say where the start-up went; the
    first phase is counted from the process's own start, so imports are in it."""
    started = time.perf_counter()
    server: ServerProcess = server_process()
    ready_s = server.wait_ready(started=started)
    text = httpx.get(f"{server.url}/metrics").text
    names = ("boot", "model_load", "uvicorn", "warmup", "services")
    phases = {name: prom(text, "server_startup_seconds", phase=name) for name in names}
    assert set(phases) == {
        s.labels["phase"]
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "server_startup_seconds"
    }
    assert all(seconds >= 0 for seconds in phases.values()), phases
    for name in ("boot", "model_load", "warmup"):  # each does real work: imports, sessions, runs
        assert phases[name] > 0, phases
    # from the process's start to the ready log line: within the wall time seen from before the
    # spawn (/proc counts in 10 ms ticks), and most of it (the rest: polling, one request)
    total = sum(phases.values())
    assert total <= ready_s + 0.03, (phases, ready_s)
    assert total >= 0.5 * ready_s, (phases, ready_s)
    ready = [
        json.loads(line)
        for line in server.log_path.read_text().splitlines()
        if line.startswith("{") and '"message": "ready"' in line
    ]
    assert len(ready) == 1
    assert ready[0]["startup_seconds"] == pytest.approx(phases, abs=1e-3)
    assert ready[0]["url"] == server.url  # where to call it: no line said so


def test_unusual_methods_share_one_metric_label(server_process):
    """Any verb the HTTP parser knows (WebDAV's, SSDP's) is answered 405 or 404 and counted as
    method OTHER: a client cannot add series by inventing requests."""
    server = server_process()
    server.wait_ready()
    for verb in ("PROPFIND", "MKCOL", "M-SEARCH", "LOCK", "REPORT"):
        assert httpx.request(verb, f"{server.url}/predict").status_code == 405
    metrics = httpx.get(f"{server.url}/metrics").text
    assert prom(metrics, "http_requests_total", route="/predict", method="OTHER", status="405") == 5
    methods = {
        m.group(1) for m in re.finditer(r'^http_requests_total\{.*method="([^"]+)"', metrics, re.M)
    }
    assert methods <= {"GET", "POST", "OTHER"}, methods
    # the API's routes are exported from the start, so a first failure is a rise from 0
    assert prom(metrics, "http_requests_total", route="/predict", method="POST", status="503") == 0
    infer = "/v2/models/{name}/infer"
    assert prom(metrics, "http_requests_total", route=infer, method="POST", status="504") == 0
    exported = {
        (m.group(1), m.group(2))
        for m in re.finditer(
            r'^http_requests_total\{method="POST",route="([^"]+)",status="(\d+)"\} 0\.0$',
            metrics,
            re.M,
        )
    }
    assert {("/predict", "200"), ("/predict", "503"), ("/feedback", "201")} <= exported
    assert ("/feedback", "200") not in exported  # its success is a 201


def _overflowing_model(path: Path, at: float) -> Path:
    """The tiny model with its logits divided by (mean pixel - ``at``): finite for every image
    but one whose pixels average exactly ``at``, where they become NaN (0 / 0 and inf)."""
    import onnx
    from onnx import helper, numpy_helper

    from catsdogs.contract import OUTPUT_LOGITS
    from loadtest.tiny_model import build_tiny_model as tiny_graph

    model = tiny_graph(tiny_contract())
    graph = model.graph
    (matmul,) = [n for n in graph.node if n.op_type == "MatMul"]
    matmul.output[0] = "raw_logits"
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(at, np.float32), "at"),
            numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("ReduceMean", ["pixels"], ["level"], axes=[1, 2, 3], keepdims=0),
            helper.make_node("Sub", ["level", "at"], ["offset"]),
            helper.make_node("Unsqueeze", ["offset", "axis1"], ["offset_column"]),
            helper.make_node("Div", ["raw_logits", "offset_column"], [OUTPUT_LOGITS]),
        ]
    )
    graph.node.sort(key=lambda n: n.op_type == "Softmax")  # the softmax last
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_a_model_answering_nan_for_a_blank_image_fails_at_start(tmp_path):
    model = _overflowing_model(tmp_path / "nan.onnx", at=0.0)
    code, output = _failed_start(tmp_path, model)
    assert code == 1, output
    assert "not probabilities (NaN, infinite, negative or not summing to 1)" in output
    assert str(model) in output
    assert "Traceback" not in output


def test_non_finite_model_output_is_a_500_never_an_answer(server_process, tmp_path):
    """A model that overflows on one image (every pixel 128) passes the start's check; that
    image answers 500 invalid_model_output, alone in a batch, and is not logged. It used to be
    an internal_error after JSON refused the NaN and the log refused the row."""
    model = _overflowing_model(tmp_path / "overflow.onnx", at=128.0)
    server = server_process(MODEL_PATH=str(model))
    server.wait_ready()
    gray = image_bytes((128, 128, 128), fmt="PNG")
    r = httpx.post(f"{server.url}/predict", content=gray, headers={"Content-Type": "image/png"})
    assert r.status_code == 500, r.text
    assert r.json()["error"]["code"] == "invalid_model_output"
    files = [
        ("files", ("gray.png", gray, "image/png")),
        ("files", ("red.jpg", image_bytes(RED), "image/jpeg")),
    ]
    r = httpx.post(f"{server.url}/predict/batch", files=files)
    assert r.status_code == 200, r.text
    gray_result, red_result = r.json()["predictions"]
    assert gray_result["error"]["code"] == "invalid_model_output"
    assert red_result["label"] in ("cat", "dog")  # the division flips the signs: any label
    assert "non-finite probabilities" in server.output()
    assert server.terminate() == 0  # flushes the log
    with sqlite3.connect(tmp_path / "predictions.db") as conn:
        (rows,) = conn.execute("SELECT COUNT(*) FROM predictions").fetchone()
    assert rows == 1  # the red photo only


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("color", "BGR"),
        ("normalization", "none"),
        ("exif_transpose", False),
        ("resize_rule", "stretch_to_square"),
    ],
)
def test_preprocessing_the_server_does_not_implement_fails_at_start(tmp_path, key, value):
    """A file whose contract asks for preprocessing this server does not do (BGR, no EXIF
    turn, a stretch) used to start and be fed RGB, upright, cropped pixels: wrong answers, no
    error. Now the start stops with one line naming the key."""
    import onnx
    from onnx import helper

    from loadtest.tiny_model import build_tiny_model as tiny_graph

    graph = tiny_graph(tiny_contract())
    meta = tiny_contract().to_metadata()
    meta["preprocessing"] = json.dumps({**json.loads(meta["preprocessing"]), key: value})
    del graph.metadata_props[:]
    helper.set_model_props(graph, meta)
    model = tmp_path / f"{key}.onnx"
    onnx.save(graph, str(model))
    code, output = _failed_start(tmp_path, model)
    assert code == 1, output
    assert f"preprocessing.{key}: {value!r} is not implemented" in output
    assert str(model) in output
    assert "Traceback" not in output


def test_an_explicit_model_file_says_it_overrides_model_uri(tiny_model: Path, tmp_path: Path):
    """`MODEL_URI=models:/catsdogs@champion make serve` passed --model too, so the local file was
    served and nothing said the registry's model was not: the flag still wins, and says so; and
    `make serve` leaves --model out when MODEL_URI is set."""
    env = {
        "MODEL_URI": "models:/catsdogs@champion",
        "PREDICTION_LOG_PATH": str(tmp_path / "p.db"),
        "INTRA_OP_THREADS": "1",
    }
    server = start_server(env, tmp_path / "server.log", ["--model", str(tiny_model)])
    try:
        server.wait_ready()
        assert httpx.get(f"{server.url}/metadata").json()["model_version"] == TINY_VERSION
        assert server.terminate() == 0
    finally:
        server.terminate()
    lines = [json.loads(line) for line in server.output(tail=10**9).splitlines() if line[:1] == "{"]
    warned = [r["message"] for r in lines if r.get("level") == "warning"]
    assert any("MODEL_URI=models:/catsdogs@champion" in m and "ignored" in m for m in warned)

    assert "--model" not in _make_serve("MODEL_URI=models:/catsdogs@champion")
    assert "--model" in _make_serve("MODEL_URI=")


def _make_serve(*variables: str) -> list[str]:
    """The words of the server command `make serve VAR=value ...` would run (make -n: printed,
    not run)."""
    dry = subprocess.run(
        ["make", "-n", "--no-print-directory", "serve", *variables],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    (command,) = [line for line in dry.stdout.splitlines() if "-m server" in line]
    return command.split()
