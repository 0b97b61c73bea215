"""DRAIN_DELAY_S on a real ``python -m server`` process: after SIGTERM the replica reports not
ready at once but keeps answering requests until the delay is over, then exits 0."""

from __future__ import annotations

import signal
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
