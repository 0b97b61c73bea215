"""DRAIN_DELAY_S on a real ``python -m server`` process: after SIGTERM the replica reports not
ready at once but keeps answering requests until the delay is over, then exits 0."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import time

import httpx
import pytest
from conftest import RED, image_bytes

pytestmark = [pytest.mark.serve, pytest.mark.slow]


def test_sigterm_turns_ready_off_first_and_keeps_serving_for_the_drain_delay(server_process):
    server = server_process(DRAIN_DELAY_S="1.5", GRACEFUL_TIMEOUT_S="5")
    server.wait_ready()
    with httpx.Client(base_url=server.url, timeout=5) as client:
        server.proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        deadline = sent + 1.0
        while client.get("/health/ready").status_code == 200:  # flips at once
            assert time.monotonic() < deadline
            time.sleep(0.02)
        not_ready_after = time.monotonic() - sent
        answered = 0
        while time.monotonic() - sent < 1.2:  # still inside the drain: requests are served
            reply = client.post(
                "/predict", content=image_bytes(RED), headers={"content-type": "image/jpeg"}
            )
            assert reply.status_code == 200
            assert client.get("/health/ready").status_code == 503
            answered += 1
    code = server.proc.wait(10)
    exited_after = time.monotonic() - sent
    assert code == 0
    assert not_ready_after < 0.5
    assert answered > 0
    assert 1.4 < exited_after < 8.0  # the drain, then the graceful shutdown
    assert "draining" in server.log.read_text()


def test_without_a_drain_delay_sigterm_stops_at_once(server_process):
    server = server_process()
    server.wait_ready()
    sent = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(10) == 0
    assert time.monotonic() - sent < 1.4
    assert "draining" not in server.log.read_text()


def test_a_drain_begun_during_start_up_keeps_ready_at_503(server_process):
    """SIGTERM while the lifespan is still starting (here: the prediction log's PostgreSQL
    accepts the connection and never answers, which holds start-up for its connect timeout):
    once start-up ends, /health/ready must answer 503 for the rest of the drain, never 200
    (it used to turn ready, and a balancer put the replica into rotation just before it
    stopped accepting)."""
    silent = socket.create_server(("127.0.0.1", 0))
    silent.settimeout(60)
    port = silent.getsockname()[1]
    held = []
    try:
        server = server_process(
            PREDICTION_LOG_URL=f"postgresql://catsdogs@127.0.0.1:{port}/predictions",
            STORE_TIMEOUT_S="2",
            DRAIN_DELAY_S="8",
            GRACEFUL_TIMEOUT_S="2",
        )
        held.append(silent.accept()[0])  # start-up is now waiting on the log's connection
        server.proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        statuses = []
        with httpx.Client(base_url=server.url, timeout=2) as client:
            while server.proc.poll() is None and time.monotonic() - sent < 30:
                with contextlib.suppress(httpx.TransportError):  # not listening yet, or no longer
                    statuses.append(client.get("/health/ready").status_code)
                time.sleep(0.05)
        assert server.proc.wait(10) == 0
    finally:
        for conn in held:
            conn.close()
        silent.close()
    assert statuses, "the server never listened during its drain"
    assert set(statuses) == {503}, statuses
    assert "started while stopping" in server.log.read_text()


def test_a_request_cut_off_by_the_graceful_timeout_gets_a_json_503(server_process):
    """A request still running GRACEFUL_TIMEOUT_S into a shutdown (a body still arriving) is
    cancelled by uvicorn: the client gets the documented 503 shutting_down as JSON, not
    uvicorn's plain-text 500, and the log has no traceback."""
    server = server_process(GRACEFUL_TIMEOUT_S="1", BODY_TIMEOUT_S="30")
    server.wait_ready()
    host, port = server.url.removeprefix("http://").split(":")
    answers = {}
    for path, content_type in [
        ("/predict", "image/jpeg"),
        ("/v2/models/catsdogs/infer", "application/json"),
    ]:
        sock = socket.create_connection((host, int(port)), timeout=20)
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            "Content-Length: 100000\r\n\r\n".encode()
            + b"\0" * 1000
        )
        answers[path] = sock
    time.sleep(0.3)  # both requests are reading their bodies
    server.proc.send_signal(signal.SIGTERM)
    replies = {}
    for path, sock in answers.items():
        with sock:
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        replies[path] = (head.split(b" ", 2)[1], head.lower(), body)
    assert server.proc.wait(10) == 0
    status, head, body = replies["/predict"]
    assert status == b"503", replies
    assert b"content-type: application/json" in head
    assert b"retry-after: 1" in head
    assert json.loads(body)["error"]["code"] == "shutting_down"
    status, head, body = replies["/v2/models/catsdogs/infer"]
    assert status == b"503", replies
    assert json.loads(body) == {"error": "the server is shutting down"}
    log = server.log.read_text()
    assert "graceful shutdown's timeout" in log
    assert "Traceback" not in log
    assert "Exception in ASGI application" not in log


def test_predictions_the_log_never_got_are_named_at_shutdown(server_process):
    """With the prediction log's PostgreSQL refusing connections, predictions are answered and
    queued; at shutdown the ones never written are lost, and the last log says how many (the
    lost-rows counter goes with the process)."""
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]  # bound, not listening: connections are refused
        server = server_process(
            PREDICTION_LOG_URL=f"postgresql://catsdogs@127.0.0.1:{port}/predictions",
            STORE_TIMEOUT_S="2",
        )
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=10) as client:
            for _ in range(3):
                reply = client.post(
                    "/predict", content=image_bytes(RED), headers={"content-type": "image/jpeg"}
                )
                assert reply.status_code == 200
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(20) == 0
    log = server.log.read_text()
    assert "3 predictions not written at shutdown" in log, log[-3000:]
    assert f"postgresql://127.0.0.1:{port}/predictions" in log  # where, without the user


def test_a_second_ctrl_c_forces_the_stop_and_says_so(server_process):
    """The first SIGINT starts the graceful shutdown, which waits for a body still arriving; a
    second one forces it: requests cut, the prediction log not flushed. That is exit 1 and an
    error line, not the exit 0 of a clean stop."""
    server = server_process(GRACEFUL_TIMEOUT_S="30", BODY_TIMEOUT_S="30")
    server.wait_ready()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
            b"Content-Length: 100000\r\n\r\n" + b"\0" * 1000
        )
        time.sleep(0.3)
        server.proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert server.proc.poll() is None  # waiting for the request in flight
        server.proc.send_signal(signal.SIGINT)
        code = server.proc.wait(10)
    assert code == 1
    assert "forced to stop" in server.log.read_text()
