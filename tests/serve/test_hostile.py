"""Hostile input against a real ``python -m server`` process, attack class by attack class.

Each attack runs while another process polls ``GET /health/live`` every 20 ms; afterwards the
test asserts the status the attack must get, that no liveness answer took over 100 ms, the
server's peak RSS (VmHWM, reset before each attack) and that a valid prediction is answered and
still reaches the prediction log (feedback on its request id is stored: 201).

The servers run the tiny colour model at the production input size (224, resize 256), so
decoding and resizing cost what they cost in production, with DEFAULT settings except the short
deadlines a test names. Each server's address space is capped at its idle size + 1.5 GiB, so a
runaway allocation fails inside the server instead of taking the machine down. The payloads are
built by hostile.py (``CRASHERS_BUILT``) when a test first needs them.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import (
    RED,
    ServerProcess,
    build_tiny_model,
    image_bytes,
    prom,
    start_server,
    tiny_contract,
)
from hostile import (
    GIB,
    MIB,
    V2_INFER,
    ProbeResult,
    chunked_body,
    connect,
    error_code,
    gradient_png,
    is_v2_error,
    liveness_probe,
    load_crasher,
    machine_stress,
    open_fds,
    parse_replies,
    post_request,
    proc_status,
    raise_open_files,
    read_reply,
    read_until_closed,
    reset_peak_rss,
    send_raw,
    set_memory_ceiling,
    v2_body,
)
from PIL import Image

from catsdogs.multipart import multipart_body
from catsdogs.preprocessing import PreprocessSpec
from server.loop_lag import BUCKETS as LOOP_LAG_BUCKETS
from server.metrics import REFUSALS
from server.middleware import FRAGMENTED_MESSAGE
from server.settings import Settings

pytestmark = [pytest.mark.serve, pytest.mark.slow]

LIVE_LIMIT_MS = 100.0  # no request of any kind may delay /health/live more than this
RSS_LIMIT = GIB  # peak RSS under any mix of hostile uploads at the default settings
CEILING_HEADROOM = GIB + GIB // 2  # address space allowed above the idle server's
VALID_LIMIT_S = 1.0  # a valid client is answered within this, attack or not
TOKEN = "hostile-token-for-tests-1"
# An idle server holding this much more RSS than when it started is restarted between tests.
RESTART_ABOVE = 256 * MIB

log = logging.getLogger("hostile")


# ---------------------------------------------------------------------- servers
@pytest.fixture(scope="module")
def model224(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny colour model with the real model's input size and resize rule."""
    contract = replace(
        tiny_contract(),
        input_size=224,
        preprocessing=PreprocessSpec(input_size=224, resize=256),
    )
    return build_tiny_model(tmp_path_factory.mktemp("model224") / "tiny224.onnx", contract)


@dataclass
class Target:
    server: ServerProcess
    token: str = ""

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def pid(self) -> int:
        return self.server.proc.pid

    def auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"} if self.token else {}

    def assert_serves(self) -> str:
        """A valid /predict is answered 200 in time and its prediction reaches the log."""
        assert self.server.proc.poll() is None, f"server died: {self.server.output()}"
        request_id = f"valid-{uuid.uuid4().hex}"
        start = time.perf_counter()
        response = httpx.post(
            f"{self.url}/predict",
            content=image_bytes(RED, (320, 240)),
            headers={"content-type": "image/jpeg", "x-request-id": request_id},
            timeout=10,
        )
        elapsed = time.perf_counter() - start
        assert response.status_code == 200, response.text
        assert response.json()["label"] == "cat"
        assert elapsed < VALID_LIMIT_S, f"a valid /predict took {elapsed:.2f} s"
        feedback = httpx.post(
            f"{self.url}/feedback",
            json={"request_id": request_id, "label": "cat"},
            headers=self.auth(),
            timeout=10,
        )
        assert feedback.status_code == 201, f"prediction log lost {request_id}: {feedback.text}"
        return request_id


@dataclass
class Servers:
    model: Path
    root: Path
    ceiling: int = 0
    idle_rss: int = 0
    started: list[ServerProcess] = field(default_factory=list)

    def start(self, name: str, **env: str) -> ServerProcess:
        base = {
            "MODEL_PATH": str(self.model),
            "PREDICTION_LOG_PATH": str(self.root / f"{name}.db"),
            "LOG_LEVEL": "info",
        }
        log_file = self.root / f"{name}-{len(self.started)}.log"
        server = start_server({**base, **env}, log_file, memory_limit=self.ceiling or None)
        self.started.append(server)
        server.wait_ready(60)
        return server


@pytest.fixture(scope="module")
def servers(model224: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    pool = Servers(model224, tmp_path_factory.mktemp("hostile"))
    yield pool
    for server in pool.started:
        server.terminate()


@pytest.fixture(scope="module")
def default_target(servers: Servers) -> Target:
    """DEFAULT settings. Its idle address space, measured once, sets every server's ceiling."""
    main = Target(servers.start("default"))
    main.assert_serves()
    status = proc_status(main.pid)
    servers.idle_rss = status["VmRSS"]
    servers.ceiling = status["VmSize"] + CEILING_HEADROOM
    set_memory_ceiling(main.pid, servers.ceiling)
    return main


@pytest.fixture
def target(servers: Servers, default_target: Target) -> Target:
    """The default server, restarted when an earlier test left it dead or holding memory, so
    each test's figures are its own (the earlier test has already failed for it)."""
    proc = default_target.server.proc
    held = proc_status(proc.pid)["VmRSS"] if proc.poll() is None else None
    if held is None or held > servers.idle_rss + RESTART_ABOVE:
        shown = "dead" if held is None else f"holding {held / MIB:.0f} MiB"
        log.warning("default server %s after the previous test: restarting it", shown)
        default_target.server.terminate()
        default_target.server = servers.start("default")
    return default_target


@pytest.fixture(scope="module")
def slow_target(servers: Servers, default_target: Target) -> Target:
    """Short request-head deadline, everything else default (body deadline 30 s)."""
    return Target(servers.start("slow", HEADER_TIMEOUT_S="2"))


@pytest.fixture(scope="module")
def deadline_target(servers: Servers, default_target: Target) -> Target:
    """Short head and body deadlines, and a bearer token on the write endpoints."""
    server = servers.start("deadline", HEADER_TIMEOUT_S="2", BODY_TIMEOUT_S="2", API_TOKEN=TOKEN)
    return Target(server, token=TOKEN)


# ---------------------------------------------------------------------- the watch
@dataclass
class Watch:
    probe: ProbeResult
    peak_rss: int = 0
    late_wakeups: float = 0  # the server's event loop woken over LIVE_LIMIT_MS late
    worst_lag_s: str = ""  # the smallest lag bucket holding every wake-up of the attack
    stalls: list[str] = field(default_factory=list)  # the server's "ran late" log lines
    machine: dict[str, float] = field(default_factory=dict)  # machine_stress() over the attack

    def lag_report(self) -> str:
        stalls = "; ".join(self.stalls) or "none logged"
        return (
            f"the server's event loop woke {self.late_wakeups:.0f} times over "
            f"{LIVE_LIMIT_MS:.0f} ms late, at most {self.worst_lag_s} s late (its log: {stalls}); "
            f"over the attack the machine lost {self.machine.get('steal', 0):.0f} ms of CPU to "
            f"the hypervisor and some task waited for a CPU for "
            f"{self.machine.get('cpu_some', 0):.0f} ms"
        )


LAG_BUCKETS = (*map(str, LOOP_LAG_BUCKETS), "+Inf")  # as prometheus_client writes ``le``


def loop_lag(target: Target) -> dict[str, float]:
    """The server's own ``event_loop_lag_seconds`` buckets (cumulative counts, "+Inf" too)."""
    text = httpx.get(f"{target.url}/metrics", timeout=10).text
    return {le: prom(text, "event_loop_lag_seconds_bucket", le=le) for le in LAG_BUCKETS}


@contextlib.contextmanager
def attack(target: Target, *, rss_limit: int = RSS_LIMIT) -> Iterator[Watch]:
    """Run the block as an attack: liveness polled throughout, then RSS and service checked."""
    reset_peak_rss(target.pid)
    before = proc_status(target.pid)["VmRSS"]
    lag_before = loop_lag(target)
    log_offset = target.server.log.stat().st_size
    stress_before = machine_stress()
    with liveness_probe(target.url) as probe:
        watch = Watch(probe)
        yield watch
    watch.machine = {k: v - stress_before[k] for k, v in machine_stress().items()}
    watch.peak_rss = proc_status(target.pid)["VmHWM"]
    # The server's own view, to tell a stalled server from a probe that waited for a CPU.
    lag = {le: n - lag_before[le] for le, n in loop_lag(target).items()}
    watch.late_wakeups = lag["+Inf"] - lag[str(LIVE_LIMIT_MS / 1000)]
    watch.worst_lag_s = next(le for le, n in lag.items() if n == lag["+Inf"])
    with target.server.log.open("rb") as server_log:
        server_log.seek(log_offset)
        watch.stalls = [
            line.decode(errors="replace").strip()
            for line in server_log
            if b'"the event loop ran late"' in line
        ]
    log.info(
        "liveness max %.1f ms (the probe waited %.1f ms of it for a CPU; the server's share at "
        "most %.1f ms) over %d polls; event loop late by at most %s s over %d wake-ups; "
        "RSS %.0f -> peak %.0f MiB",
        probe.max_ms,
        probe.waited_at_max_ms,
        probe.max_served_ms,
        probe.n,
        watch.worst_lag_s,
        lag["+Inf"],
        before / MIB,
        watch.peak_rss / MIB,
    )
    assert probe.n > 0, "the liveness probe made no request"
    assert probe.failures == 0, f"/health/live failed during the attack: {probe}"
    # The limit holds for the server's share of each poll: the probe's own wait for a CPU on this
    # shared machine is left out (hostile.py, "liveness probe"), a stalled server is not.
    assert probe.max_served_ms < LIVE_LIMIT_MS, (
        f"/health/live took {probe.max_served_ms:.0f} ms of the server's time during the attack "
        f"(limit {LIVE_LIMIT_MS:.0f}; slowest poll {probe.max_ms:.0f} ms, of which the probe "
        f"waited {probe.waited_at_max_ms:.0f} ms for a CPU); {watch.lag_report()}"
    )
    assert watch.late_wakeups == 0, f"during the attack, {watch.lag_report()}"
    assert watch.peak_rss < rss_limit, (
        f"peak RSS {watch.peak_rss / MIB:.0f} MiB (RSS before the attack {before / MIB:.0f} MiB)"
    )
    target.assert_serves()


def post(
    target: Target, path: str, body: bytes, content_type: str, **headers: str
) -> httpx.Response:
    return httpx.post(
        f"{target.url}{path}",
        content=body,
        headers={"content-type": content_type, **headers},
        timeout=60,
    )


def assert_rest_error(
    response: httpx.Response, statuses: set[int], code: str | None = None
) -> None:
    status = response.status_code
    assert status in statuses, (
        f"status {status}, expected {sorted(statuses)}: {response.text[:300]}"
    )
    got = error_code(response.json())
    assert got is not None, f"not the API's error shape: {response.text[:300]}"
    if code is not None:
        assert got == code, response.text[:300]


def assert_v2_error(response: httpx.Response, statuses: set[int]) -> None:
    assert response.status_code in statuses, (
        f"status {response.status_code}, expected {sorted(statuses)}: {response.text[:300]}"
    )
    assert is_v2_error(response.json()), f"not the V2 error shape: {response.text[:300]}"


def jpeg() -> bytes:
    return image_bytes(RED, (320, 240))


def test_the_probe_counts_a_frozen_server_in_full(target: Target) -> None:
    """Leaving out the probe's own wait for a CPU must not hide a server that does not answer."""
    with liveness_probe(target.url) as probe:
        time.sleep(0.1)
        os.kill(target.pid, signal.SIGSTOP)
        try:
            time.sleep(0.4)
        finally:
            os.kill(target.pid, signal.SIGCONT)
        time.sleep(0.1)
    log.info("frozen 0.4 s: %s", probe)
    assert probe.failures == 0, probe
    # A poll sent while the server was frozen waited for all but at most one interval (20 ms) of
    # it, asleep in recv: all of that is the server's share.
    assert probe.max_served_ms > 350, probe
    target.assert_serves()


# ---------------------------------------------------------------------- 1. the log writer
def test_surrogate_feedback_id_is_refused_and_the_log_keeps_writing(target: Target) -> None:
    with attack(target):
        response = post(
            target, "/feedback", load_crasher("http-feedback-surrogate-id.json"), "application/json"
        )
    assert_rest_error(response, {422})
    # attack() proved a prediction made afterwards still reaches the log; once more for luck
    target.assert_serves()


@pytest.mark.parametrize("request_id", ["a b", "x" * 129, "ü", "", "a\nb", "\u202e"])
def test_feedback_ids_outside_the_id_rule_are_422(target: Target, request_id: str) -> None:
    response = httpx.post(
        f"{target.url}/feedback", json={"request_id": request_id, "label": "cat"}, timeout=10
    )
    assert_rest_error(response, {422})


# ---------------------------------------------------------------------- 2. memory
def _label_or_aspect(response: httpx.Response | dict) -> None:
    """A thin image is either classified or refused as ``bad_aspect_ratio``; both are fine."""
    body = response if isinstance(response, dict) else response.json()
    if isinstance(response, httpx.Response) and response.status_code != 200:
        assert response.status_code == 422, response.text[:300]
    if "label" in body:
        assert body["label"] in ("cat", "dog")
    else:
        assert error_code(body) == "bad_aspect_ratio", str(body)[:300]


def test_thin_png_one_and_a_batch_of_two(target: Target) -> None:
    png = load_crasher("http-png-20000x8.png")
    with attack(target):
        single = post(target, "/predict", png, "image/png")
        body, ctype = multipart_body("files", [("a.png", png), ("b.png", png)])
        batch = post(target, "/predict/batch", body, ctype)
    _label_or_aspect(single)
    assert batch.status_code in (200, 422), batch.text[:300]
    for entry in batch.json()["predictions"]:
        _label_or_aspect(entry)


def test_png_two_million_pixels_wide_is_4xx(target: Target) -> None:
    png = load_crasher("http-png-2000000x8.png")
    with attack(target):
        response = post(target, "/predict", png, "image/png")
    assert_rest_error(response, set(range(400, 500)))


@pytest.mark.parametrize("name", ["http-png16-6300x6300.png", "http-png-rgba-6300x6300.png"])
def test_largest_allowed_png_is_classified_within_the_memory_budget(
    target: Target, name: str
) -> None:
    with attack(target) as watch:
        response = post(target, "/predict", load_crasher(name), "image/png")
    assert response.status_code == 200, response.text[:300]
    assert response.json()["label"] in ("cat", "dog")
    assert watch.peak_rss < RSS_LIMIT


def _noise_png(side: int = 1800) -> bytes:
    """About 9.7 MB of incompressible pixels: under the 10 MiB file limit, 3.2 MP to decode."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(
        buf, format="PNG", compress_level=0
    )
    return buf.getvalue()


def test_six_concurrent_60mb_batches(target: Target) -> None:
    png = _noise_png()
    body, ctype = multipart_body("files", [(f"{i}.png", png) for i in range(6)])
    assert 55 * MIB < len(body) < 64 * MIB
    request = post_request("/predict/batch", body, ctype)
    replies: list[object] = [None] * 6

    def send(i: int) -> None:
        replies[i] = send_raw(target.url, request, timeout=120)

    with attack(target) as watch:
        threads = [threading.Thread(target=send, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(150)
        statuses = [getattr(r, "status", None) for r in replies]
        log.info("six 60 MB batches: %s", statuses)
    for reply in replies:
        assert reply is not None, f"a connection was closed without an answer: {statuses}"
        assert reply.status in (200, 413, 503), statuses
        if reply.status == 503:
            assert "retry-after" in reply.headers, reply.headers
        if reply.status == 200:
            assert len(reply.json()["predictions"]) == 6
    assert watch.peak_rss < RSS_LIMIT


def test_a_v2_body_is_counted_twice_while_it_is_joined(servers: Servers) -> None:
    """A V2 body arrives in pieces and is joined whole before it is parsed, so for a moment the
    server holds it twice; the byte budget counted it once, and two 60 MB V2 requests grew the
    peak RSS by 230 MiB against the 120 MiB counted. The join's copy is reserved too: under a
    30 MiB budget a 20 MiB V2 request needs 40, which no retry could ever get, so it is 413
    (it was a 503 with Retry-After, retried for ever), where the same images as a multipart
    batch (split into their parts, never joined whole) are served."""
    server = servers.start(
        "v2budget", MAX_INFLIGHT_BYTES=str(30 * MIB), MAX_REQUEST_BYTES=str(24 * MIB)
    )
    padded = jpeg() + b"\0" * (10 * MIB - 64 - len(jpeg()))  # a JPEG decodes past its end
    blob = b"".join(len(padded).to_bytes(4, "little") + padded for _ in range(2))
    request = v2_body(shape=[2], parameters={"binary_data_size": len(blob)})
    del request["inputs"][0]["data"]  # the images are the binary data
    header = json.dumps(request).encode()
    v2 = httpx.post(
        f"{server.url}{V2_INFER}",
        content=header + blob,
        headers={"inference-header-content-length": str(len(header))},
        timeout=60,
    )
    assert v2.status_code == 413, v2.text[:300]
    assert is_v2_error(v2.json())
    assert "MAX_INFLIGHT_BYTES" in v2.json()["error"]
    assert "retry-after" not in v2.headers
    # not a refusal for load: the overload alert has nothing to say about it
    metrics = httpx.get(f"{server.url}/metrics").text
    assert prom(metrics, "inference_rejected_total") == 0
    body, ctype = multipart_body("files", [("a.jpg", padded), ("b.jpg", padded)])
    batch = post(Target(server), "/predict/batch", body, ctype)
    assert batch.status_code == 200, batch.text[:300]
    assert len(batch.json()["predictions"]) == 2


# ---------------------------------------------------------------------- 3. parsing cost
@pytest.mark.parametrize(
    ("name", "statuses"),
    [
        ("v2-shape-250x4300-digits.json", {400}),
        ("v2-empty-strings-8mb.json", set(range(400, 500))),
    ],
)
def test_v2_parse_bombs_are_refused_fast(target: Target, name: str, statuses: set[int]) -> None:
    body = load_crasher(name)
    with attack(target):
        start = time.perf_counter()
        response = post(target, V2_INFER, body, "application/json")
        elapsed = time.perf_counter() - start
    assert_v2_error(response, statuses)
    assert elapsed < 1.0, f"{name} took {elapsed:.2f} s to refuse"


def test_v2_outputs_repeated_20000_times(target: Target) -> None:
    with attack(target):
        response = post(target, V2_INFER, load_crasher("v2-outputs-20000.json"), "application/json")
    if response.status_code == 200:  # deduplicated: one tensor, a small answer
        assert len(response.content) < 64 * 1024, len(response.content)
        assert len(response.json()["outputs"]) <= 2
    else:
        assert_v2_error(response, {400})


# ---------------------------------------------------------------------- 4. client mistakes
@pytest.mark.parametrize(
    ("name", "statuses"),
    [
        ("v2-shape-4301-digits.json", {400}),
        ("v2-nested-100000.json", {400}),
    ],
)
def test_v2_malformed_json_is_400(target: Target, name: str, statuses: set[int]) -> None:
    with attack(target):
        response = post(target, V2_INFER, load_crasher(name), "application/json")
    assert_v2_error(response, statuses)


@pytest.mark.parametrize(
    ("name", "statuses"),
    [
        ("http-feedback-nested-8000.json", {400}),
        # 200 KB is over the feedback body limit: refusing it for its size is right too
        ("http-feedback-nested-100000.json", {400, 413}),
    ],
)
def test_feedback_deeply_nested_json(target: Target, name: str, statuses: set[int]) -> None:
    with attack(target):
        response = post(target, "/feedback", load_crasher(name), "application/json")
    assert_rest_error(response, statuses)


def test_v2_header_length_that_is_a_digit_but_not_a_number(target: Target) -> None:
    with attack(target):
        reply = send_raw(target.url, load_crasher("v2-header-length-superscript.http"))
    assert reply is not None
    assert reply.status == 400, reply
    assert is_v2_error(reply.json())


@pytest.mark.parametrize("declared", ["Content-Length", "Inference-Header-Content-Length"])
def test_v2_json_over_its_limit_is_413_before_its_body(target: Target, declared: str) -> None:
    """The JSON part's limit (MAX_JSON_BYTES, 8 MiB) was checked once the whole body had been
    read: a client declaring a 60 MiB JSON body got its 413 only after sending (and the server
    holding) all of it. The sizes a request declares are checked before its body is read."""
    sizes = {
        "Content-Length": b"Content-Type: application/json\r\nContent-Length: %d\r\n" % (60 * MIB),
        "Inference-Header-Content-Length": (
            b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n"
            b"Inference-Header-Content-Length: %d\r\n" % (20 * MIB, 9 * MIB)
        ),
    }
    head = f"POST {V2_INFER} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode() + sizes[declared]
    with attack(target), connect(target.url, timeout=5) as sock:
        sock.sendall(head + b'\r\n{"inputs":[')
        reply = read_reply(sock)
    assert reply is not None, "no answer before the body"
    assert reply.status == 413, reply
    assert is_v2_error(reply.json())


def test_v2_id_with_a_lone_surrogate_is_400_and_not_logged(target: Target) -> None:
    request_id = f"surrogate-{uuid.uuid4().hex}"
    with attack(target):
        response = post(
            target,
            V2_INFER,
            load_crasher("v2-id-surrogate.json"),
            "application/json",
            **{"x-request-id": request_id},
        )
    assert_v2_error(response, {400})
    feedback = httpx.post(
        f"{target.url}/feedback", json={"request_id": request_id, "label": "cat"}, timeout=10
    )
    assert feedback.status_code == 404, f"the refused request was logged: {feedback.text}"


def test_multipart_boundary_of_5000_characters_is_400(target: Target) -> None:
    with attack(target):
        reply = send_raw(target.url, load_crasher("http-multipart-boundary-5000.http"))
    assert reply is not None
    assert reply.status == 400, reply
    assert error_code(reply.json()) is not None


UNSUPPORTED = [
    "http-dds-unknown-fourcc.dds",
    "http-dds-dxt1.dds",
    "http-tga.tga",
    "http-tiff.tif",
]


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_undocumented_format_alone_is_415(target: Target, name: str) -> None:
    body, ctype = multipart_body("file", [(name, load_crasher(name))])
    with attack(target):
        response = post(target, "/predict", body, ctype)
    assert_rest_error(response, {415}, "unsupported_format")


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_undocumented_format_in_a_batch_fails_only_its_slot(target: Target, name: str) -> None:
    body, ctype = multipart_body("files", [("good.jpg", jpeg()), (name, load_crasher(name))])
    with attack(target):
        response = post(target, "/predict/batch", body, ctype)
    assert response.status_code == 200, response.text[:300]
    good, bad = response.json()["predictions"]
    assert good["label"] == "cat"
    assert error_code(bad) == "unsupported_format", bad


# ---------------------------------------------------------------------- 5. slow clients
def _slow_bodies(url: str, n: int) -> list[socket.socket]:
    """``n`` /predict requests that promise 100000 bytes of body and send 2."""
    head = (
        b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
        b"Content-Length: 100000\r\n\r\n\xff\xd8"
    )
    socks = []
    for _ in range(n):
        sock = connect(url)
        sock.sendall(head)
        socks.append(sock)
    return socks


def _idle(url: str, n: int) -> list[socket.socket]:
    """``n`` connections: half send nothing, half half a request line."""
    socks = []
    for i in range(n):
        sock = connect(url)
        if i % 2:
            sock.sendall(b"POST /pre")
        socks.append(sock)
    return socks


def _close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


def _timed_valid_requests(target: Target) -> list[tuple[str, int, float]]:
    results = []
    with httpx.Client(base_url=target.url, timeout=10) as client:
        for _ in range(5):
            start = time.perf_counter()
            r = client.post("/predict", content=jpeg(), headers={"content-type": "image/jpeg"})
            results.append(("/predict", r.status_code, time.perf_counter() - start))
        body, ctype = multipart_body("files", [("a.jpg", jpeg()), ("b.jpg", jpeg())])
        for _ in range(2):
            start = time.perf_counter()
            r = client.post("/predict/batch", content=body, headers={"content-type": ctype})
            results.append(("/predict/batch", r.status_code, time.perf_counter() - start))
    return results


def test_slow_bodies_and_idle_connections_do_not_starve_valid_clients(slow_target: Target) -> None:
    raise_open_files(4096)
    target = slow_target
    baseline = open_fds(target.pid)
    slow: list[socket.socket] = []
    idle: list[socket.socket] = []
    try:
        with attack(target):
            slow = _slow_bodies(target.url, 64)
            opened = time.perf_counter()
            idle = _idle(target.url, 1000)
            time.sleep(0.3)  # let the server accept them all
            held = open_fds(target.pid)
            results = _timed_valid_requests(target)
            # HEADER_TIMEOUT_S=2: the idle connections are closed by the server
            while open_fds(target.pid) > baseline + 64 + 16 and time.perf_counter() - opened < 6:
                time.sleep(0.1)
            closed_after = time.perf_counter() - opened
            after = open_fds(target.pid)
    finally:
        _close_all(slow)
        _close_all(idle)
    log.info(
        "fds: baseline %d, holding %d, %d after %.1f s; valid requests: %s",
        baseline,
        held,
        after,
        closed_after,
        [(route, status, round(elapsed, 3)) for route, status, elapsed in results],
    )
    assert held >= baseline + 1000, f"the server did not hold the connections: {held} fds"
    for _route, status, elapsed in results:
        assert status == 200, results
        assert elapsed < VALID_LIMIT_S, results
    assert after <= baseline + 64 + 16, (
        f"{after} fds open {closed_after:.1f} s after 1000 idle connections (baseline {baseline})"
    )
    assert closed_after < 3.5, f"idle connections closed only after {closed_after:.1f} s"


def test_32mb_header_is_refused_without_buffering_it(deadline_target: Target) -> None:
    target = deadline_target
    request = load_crasher("http-header-32mb.http")
    before = proc_status(target.pid)["VmRSS"]
    with attack(target) as watch:
        reply = send_raw(target.url, request)
    log.info("32 MB header: %s", "connection closed" if reply is None else reply.status)
    assert reply is None or reply.status == 431, reply
    grown = watch.peak_rss - before
    assert grown < 50 * MIB, f"RSS grew by {grown / MIB:.0f} MiB for one header"


def test_stalled_feedback_body_gets_408(deadline_target: Target) -> None:
    target = deadline_target
    head = (
        "POST /feedback HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {TOKEN}\r\nContent-Length: 100\r\n\r\n"
    ).encode()
    with attack(target), connect(target.url, timeout=15) as sock:
        start = time.perf_counter()
        sock.sendall(head + b'{"request_')
        reply = read_reply(sock)
        elapsed = time.perf_counter() - start
    assert reply is not None, f"closed without an answer after {elapsed:.1f} s"
    assert reply.status == 408, reply
    assert error_code(reply.json()) is not None, reply.body[:300]
    assert 1.5 < elapsed < 5.0, f"408 after {elapsed:.1f} s with BODY_TIMEOUT_S=2"


# ---------------------------------------------------------------------- 6. forged feedback
def test_feedback_must_be_json(target: Target) -> None:
    with attack(target):
        reply = send_raw(target.url, load_crasher("http-feedback-text-plain.http"))
    assert reply is not None
    assert reply.status == 415, reply
    assert error_code(reply.json()) is not None


def test_feedback_needs_the_bearer_token_when_one_is_set(deadline_target: Target) -> None:
    target = deadline_target
    request_id = target.assert_serves()  # with the token: 201
    refusals = [
        ({}, {401}),  # no token: authenticate first
        ({"authorization": TOKEN}, {401}),  # not a bearer credential
        ({"authorization": "Bearer wrong"}, {401, 403}),  # a token, not the server's
    ]
    for headers, statuses in refusals:
        response = httpx.post(
            f"{target.url}/feedback",
            json={"request_id": request_id, "label": "dog"},
            headers=headers,
            timeout=10,
        )
        assert_rest_error(response, statuses)


# ---------------------------------------------------------------- 7. heads, pipelining, hang-ups
def test_a_head_over_the_limit_is_431_even_when_it_arrives_in_one_read(target: Target) -> None:
    """MAX_HEADER_BYTES (32 KiB) holds for a head sent at once, not only for one that trickles
    in: before, a 60 KB head read in one go was parsed and served."""
    limit = Settings().max_header_bytes
    line = b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    fixed = len(line) + len(b"X-Pad: \r\n") + 2
    for pad, status in ((limit - fixed, 200), (limit - fixed + 1, 431), (60_000, 431)):
        with connect(target.url) as sock:
            sock.sendall(line + b"X-Pad: " + b"a" * pad + b"\r\n\r\n")
            reply = read_reply(sock)
        assert reply is not None, pad
        assert reply.status == status, (pad, reply.status)


def test_pipelined_requests_with_bodies_are_all_answered(target: Target) -> None:
    """Requests pipelined on one connection, each read ending inside the next request's head.

    The head limit counts a head from its own first byte: before, a read holding the end of one
    request's 100 KB body and the start of the next head counted whole against that head, and
    the connection was closed with a 431 though every head was small."""
    photo = gradient_png((400, 300)) + b"\0" * 100_000  # PNG ignores what follows IEND
    head = (
        "POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
        f"Content-Length: {len(photo)}\r\n"
    ).encode()
    requests = [head + b"\r\n" + photo for _ in range(3)]
    requests.append(head + b"Connection: close\r\n\r\n" + photo)
    stream = b"".join(requests)
    # cut 20 bytes into every head after the first: each send ends inside a head
    cuts = [sum(len(r) for r in requests[:i]) + 20 for i in range(1, len(requests))]
    with attack(target):
        for _ in range(3):
            with connect(target.url) as sock:
                start = 0
                for cut in [*cuts, len(stream)]:
                    sock.sendall(stream[start:cut])
                    start = cut
                    time.sleep(0.05)  # the server reads what has arrived
                replies = parse_replies(read_until_closed(sock))
            assert [status for status, _ in replies] == [200] * len(requests), replies
            assert all(json.loads(body)["label"] in ("cat", "dog") for _, body in replies)


def test_a_flood_of_pipelined_requests_is_cut_off_at_a_bounded_cost(target: Target) -> None:
    """Thousands of tiny pipelined GETs, none of their answers read. uvicorn parses and queues
    every request of a read at once and reads again whenever an answer goes out: 10 MB of them
    took 300 MB of RSS. Past MAX_PIPELINED queued requests the connection is closed."""
    request = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    before = proc_status(target.pid)["VmRSS"]
    log_offset = target.server.log.stat().st_size
    sent = 0
    with attack(target) as watch, connect(target.url) as sock:
        sock.settimeout(0.5)
        with contextlib.suppress(OSError):  # the server closes it: a reset or a full buffer
            while sent < 20 * MIB:
                sent += sock.send(request * 1000)
    grown = watch.peak_rss - before
    log.info("pipelined flood: %.1f MB sent, RSS +%.1f MiB", sent / 1e6, grown / MIB)
    with target.server.log.open("rb") as server_log:
        server_log.seek(log_offset)
        assert b"more than 64 pipelined requests" in server_log.read()
    assert sent < 20 * MIB, "the server kept reading pipelined requests"
    assert grown < 32 * MIB, f"RSS grew by {grown / MIB:.0f} MiB for one pipelining client"
    target.assert_serves()


# the header names are HTTP's own (RFC 9110 section 7.8)
@pytest.mark.parametrize(
    "switch",
    [
        b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
        b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABk\r\n",
    ],
    ids=["websocket", "h2c"],
)
def test_a_protocol_switch_is_ignored_quietly(target: Target, switch: bytes) -> None:
    """HTTP/1.1 only: the request is answered as if it had not asked, and the log gets no
    warning telling the operator to install a WebSocket library (uvicorn wrote two a request)."""
    log_offset = target.server.log.stat().st_size
    head = b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    reply = send_raw(target.url, head.replace(b"Connection: close\r\n", switch) + b"\r\n")
    assert reply is not None
    assert reply.status == 200, reply
    assert reply.json() == {"status": "alive"}
    time.sleep(0.1)  # the log line of the request, if any, is written
    with target.server.log.open("rb") as server_log:
        server_log.seek(log_offset)
        new_lines = server_log.read().decode(errors="replace")
    assert '"level": "warning"' not in new_lines, new_lines


def test_refusals_before_the_app_are_counted_by_reason(servers: Servers) -> None:
    """What the connection layer refuses never reaches the app's metrics, so it has its own
    counter: before, a server at MAX_CONNECTIONS answered 503 to its clients and no series (and
    no alert on 5xx) showed it."""
    target = Target(servers.start("refusals", MAX_CONNECTIONS="8", HEADER_TIMEOUT_S="1"))

    def refused() -> dict[str, float]:
        text = httpx.get(f"{target.url}/metrics", timeout=10).text
        return {r: prom(text, "http_refused_total", reason=r) for r in REFUSALS}

    before = refused()
    assert before == dict.fromkeys(REFUSALS, 0.0)  # every reason exported from the start
    head = b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    answers = [send_raw(target.url, b"NOT HTTP AT ALL\r\n\r\n")]
    answers.append(send_raw(target.url, head + b"X-Pad: " + b"a" * 40_000 + b"\r\n\r\n"))
    with connect(target.url) as sock:  # part of a head, then nothing: 408 after 1 s
        sock.sendall(head)
        answers.append(read_reply(sock))
    # answered in the API's shape though no request reached the app: plain text and empty
    # bodies without an X-Request-ID broke clients that parse every error
    expected = [(400, "malformed_request"), (431, "header_too_large"), (408, "request_timeout")]
    assert [(a.status, error_code(a.json())) if a else None for a in answers] == expected
    for answer in answers:
        assert answer is not None
        assert answer.headers["content-type"] == "application/json"
        assert answer.headers["connection"] == "close"
        assert len(answer.headers["x-request-id"]) == 32
    with connect(target.url) as sock, contextlib.suppress(OSError):
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 100)
        read_until_closed(sock)
    fragmented = send_raw(
        target.url,
        b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + chunked_body(jpeg() * 2, 1),
    )
    assert fragmented is not None
    assert fragmented.status == 400
    held = [connect(target.url) for _ in range(8)]  # idle: MAX_CONNECTIONS reached
    try:
        time.sleep(0.2)
        over = send_raw(target.url, head.replace(b"/health/live", b"/metadata") + b"\r\n", 5)
        # the orchestrator's probes are still answered: past the limit they failed, so a client
        # holding idle connections took the replica out of its Service and had it restarted
        probes = [
            send_raw(target.url, f"{method} {path}".encode() + head[16:] + b"\r\n", 5)
            for method, path in [
                ("GET", "/health/live"),
                ("GET", "/health/ready"),
                ("GET", "/health"),
                ("GET", "/v2/health/live"),
                ("GET", "/v2/health/ready?x=1"),
            ]
        ]
        # ... and nothing else: a POST to a probe's path is not a probe
        posted = send_raw(target.url, b"POST /health/live" + head[16:] + b"\r\n", 5)
    finally:
        _close_all(held)
    assert over is not None
    assert (over.status, error_code(over.json())) == (503, "too_many_connections")
    assert (over.headers["retry-after"], over.headers["connection"]) == ("1", "close")
    assert len(over.headers["x-request-id"]) == 32
    assert [p.status if p else None for p in probes] == [200] * 5
    assert posted is not None
    assert posted.status == 503
    time.sleep(0.2)  # the held connections are gone
    after = refused()
    limited = {"connection_limit": 2.0}  # the two refused above; the probes are not counted
    assert {r: after[r] - before[r] for r in REFUSALS} == {r: limited.get(r, 1.0) for r in REFUSALS}
    target.assert_serves()
    target.server.terminate()


def test_a_flood_of_malformed_requests_is_counted_not_logged_line_by_line(target: Target) -> None:
    """uvicorn logs a warning, on the event loop, for every request its parser refuses; they are
    counted (http_refused_total) and the warning is written at most once per 10 s."""
    log_offset = target.server.log.stat().st_size

    def malformed() -> float:
        text = httpx.get(f"{target.url}/metrics", timeout=10).text
        return prom(text, "http_refused_total", reason="malformed")

    before = malformed()
    for _ in range(30):
        reply = send_raw(target.url, b"NOT HTTP AT ALL\r\n\r\n", timeout=5)
        assert reply is not None
        assert reply.status == 400
    assert malformed() - before == 30
    time.sleep(0.1)
    with target.server.log.open("rb") as server_log:
        server_log.seek(log_offset)
        lines = server_log.read().count(b"Invalid HTTP request received.")
    assert lines <= 1, f"{lines} warnings for 30 malformed requests"


@pytest.mark.parametrize("path", ["/predict", V2_INFER])
def test_a_body_chunked_byte_by_byte_is_400_and_the_connection_closed(
    target: Target, path: str
) -> None:
    """Each piece of a body is a Python call on the event loop: 100 KB chunked a byte at a time
    (600 KB on the wire) kept the loop busy for one client. Past 1,024 pieces averaging under
    256 bytes the request is a 400 and its connection is closed; kilobyte chunks are served."""
    photo = gradient_png((400, 300))
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    fine = send_raw(
        target.url,
        head.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n") + chunked_body(photo, 1024),
    )
    if path == "/predict":
        assert fine is not None
        assert fine.status == 200, fine
    attack_body = chunked_body(photo + b"\0" * (100_000 - len(photo)), 1)
    with attack(target), connect(target.url) as sock:
        with contextlib.suppress(OSError):  # the server closes while the rest is being sent
            sock.sendall(head + attack_body)
        reply = read_reply(sock)
        sock.settimeout(5)
        try:
            closed = read_until_closed(sock) == b""
        except TimeoutError:
            closed = False
        except OSError:  # reset: closed with the rest of the body unread
            closed = True
    assert reply is not None
    assert reply.status == 400, reply
    if path == "/predict":
        assert error_code(reply.json()) == "fragmented_body", reply.body
    else:
        assert is_v2_error(reply.json()), reply.body
        assert reply.json()["error"] == FRAGMENTED_MESSAGE
    assert closed, "the connection stayed open after the refusal"
    target.assert_serves()


def test_a_client_that_pipelines_and_hangs_up_is_499_not_a_500(target: Target) -> None:
    """Requests pipelined on one connection, then the connection closed before any answer.

    uvicorn flags only the connection's newest request as disconnected: the one still running
    wrote its answer into the closed socket, and the server logged a traceback and counted a
    500 (an alert's worth of them for a few bytes a client). Each running request is a 499."""
    body = gradient_png()
    request = (
        "POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    metrics_before = httpx.get(f"{target.url}/metrics", timeout=10).text
    log_offset = target.server.log.stat().st_size
    hangups = 5
    with attack(target):
        for _ in range(hangups):
            with connect(target.url) as sock:
                sock.sendall(request * 3)  # closed at once, with no answer read
        deadline = time.perf_counter() + 10
        while time.perf_counter() < deadline:  # until the running requests have ended
            text = httpx.get(f"{target.url}/metrics", timeout=10).text
            if prom(text, "http_requests_in_flight") <= 1:  # this /metrics request
                break
            time.sleep(0.05)

    def count(text: str, status: str) -> float:
        return prom(text, "http_requests_total", route="/predict", status=status)

    with target.server.log.open("rb") as server_log:
        server_log.seek(log_offset)
        new_lines = server_log.read().decode(errors="replace")
    for sign in ("Traceback", "unhandled error", "without completing response"):
        assert sign not in new_lines, new_lines[:3000]
    assert count(text, "500") == count(metrics_before, "500")
    # the first request of each connection was running when it closed; the others never start
    answered = count(text, "499") - count(metrics_before, "499")
    answered += count(text, "200") - count(metrics_before, "200")
    log.info("hang-ups: %d 499s", count(text, "499") - count(metrics_before, "499"))
    assert answered == hangups, new_lines[:3000]
    assert count(text, "499") - count(metrics_before, "499") >= 1, new_lines[:3000]
    target.assert_serves()


# ---------------------------------------------------------------------- 6. bodies not read
@contextlib.contextmanager
def _sent(url: str, n: int, head: bytes) -> Iterator[list[socket.socket]]:
    """``n`` connections, each sent ``head``; all closed when the block ends."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            socks.append(connect(url))
            socks[-1].sendall(head)
        yield socks
    finally:
        _close_all(socks)


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``sock`` within ``seconds`` (what it sends meanwhile is read)."""
    sock.settimeout(seconds)
    try:
        read_until_closed(sock)
    except TimeoutError:
        return False
    except OSError:  # reset: closed with bytes the server had not read
        pass
    return True


LIVE = b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n"
CHUNKED = b"Transfer-Encoding: chunked\r\n\r\n"
UNREAD = {  # head, its answer's status, what the client sends once it has the answer
    "pieces after a GET's answer": (LIVE + CHUNKED, 200, b"1\r\nx\r\n" * 1100),
    "a byte of a declared body": (LIVE + b"Content-Length: 100000000\r\n\r\n", 200, b"x"),
    "pieces after an early 415": (
        b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n" + CHUNKED,
        415,
        b"1\r\nx\r\n" * 1100,
    ),
}


@pytest.mark.parametrize("case", list(UNREAD))
def test_a_body_left_unread_by_its_answer_ends_the_connection(target: Target, case: str) -> None:
    """uvicorn read on and dropped a body its request was answered without, and every read
    cancelled the keep-alive timer: a byte now and then, or tiny chunks (which the fragmented
    body guard then refused on a request already answered, and stopped reading the client's
    hang-up), held the connection and its fd for good; seven such clients took every slot of
    MAX_CONNECTIONS=8, and the server answered 503 to everyone after they had gone. Now the
    server ends its side after the answer and drops what still comes until the keep-alive
    timeout, however the client keeps sending, then closes (RFC 9112, 9.6)."""
    head, status, rest = UNREAD[case]
    keep_alive = Settings().keep_alive_timeout_s
    baseline = open_fds(target.pid)
    with attack(target), _sent(target.url, 8, head) as socks:
        for sock in socks:
            reply = read_reply(sock)
            assert reply is not None
            assert reply.status == status, reply
            # said in the answer: a client must not send its next request on this connection
            assert reply.headers.get("connection") == "close", reply.headers
            with contextlib.suppress(OSError):  # the server may have closed already
                sock.sendall(rest)
        ended = [_closed_within(sock, 5) for sock in socks]  # the server's side, at once
        answered = time.monotonic()
        while open_fds(target.pid) > baseline + 2 and time.monotonic() - answered < keep_alive + 5:
            for sock in socks:  # a byte now and then must not keep the connection open
                with contextlib.suppress(OSError):
                    sock.send(b"x")
            time.sleep(0.25)
        held = time.monotonic() - answered
    assert all(ended), f"{ended.count(False)} of {len(ended)} connections not ended"
    assert open_fds(target.pid) <= baseline + 2, f"the server kept the connections {held:.1f} s"
    assert held < keep_alive + 2, f"closed only after {held:.1f} s"


@pytest.mark.parametrize(
    ("content_type", "size", "status"),
    [("image/jpeg", 20 * MIB, 413), ("text/plain", 3 * MIB, 415)],
)
def test_an_early_answer_reaches_a_client_still_sending_its_body(
    target: Target, content_type: str, size: int, status: int
) -> None:
    """Most clients send the whole body before they read: closing the connection with its bytes
    unread made the kernel reset it, and a client uploading too large a file got a reset
    instead of its 413. The server reads the rest and drops it (the test above bounds that)."""
    head = (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {size}\r\n\r\n"
    ).encode()
    with attack(target):
        for _ in range(3):
            with connect(target.url) as sock:
                sock.sendall(head)
                sock.sendall(b"\xff" * size)
                reply = read_reply(sock)
            assert reply is not None, "the connection was reset before the answer was read"
            assert reply.status == status, reply
            assert reply.headers.get("connection") == "close", reply.headers


def test_a_body_read_whole_keeps_the_connection_for_the_next_request(target: Target) -> None:
    """The other side of the rule above: an answer to a request whose body had arrived, even
    one the route did not read, leaves the connection open for the next request."""
    request = LIVE + b"Content-Length: 5\r\n\r\nhello"
    with connect(target.url) as sock:
        for _ in range(3):
            sock.sendall(request)
            reply = read_reply(sock)
            assert reply is not None
            assert reply.status == 200, reply
            assert "connection" not in reply.headers, reply.headers


def test_a_long_keep_alive_does_not_lengthen_the_linger(server_process) -> None:
    """KEEP_ALIVE_TIMEOUT_S raised above a proxy's idle timeout (the Kubernetes settings: 75 s,
    past ingress-nginx's 60 s) keeps idle connections that long, but a connection whose upload
    was refused early closes within LINGER_S, however the client keeps sending."""
    from server.protocol import LINGER_S

    server = server_process(KEEP_ALIVE_TIMEOUT_S="30")
    server.wait_ready()
    head = (
        b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n"
        b"Content-Length: 100000000\r\n\r\n"
    )
    with connect(server.url) as refused, connect(server.url) as idle:
        idle.sendall(LIVE + b"\r\n")
        reply = read_reply(idle)
        assert reply is not None
        assert reply.status == 200
        refused.sendall(head)
        reply = read_reply(refused)
        assert reply is not None
        assert reply.status == 415
        answered = time.monotonic()
        with_both = open_fds(server.pid)
        while open_fds(server.pid) >= with_both and time.monotonic() - answered < LINGER_S + 5:
            with contextlib.suppress(OSError):  # a client still sending its upload
                refused.send(b"x" * 1000)
            time.sleep(0.1)
        held = time.monotonic() - answered
        assert open_fds(server.pid) < with_both, f"still open {held:.1f} s after the answer"
        assert LINGER_S - 1 < held < LINGER_S + 2, held
        # the idle keep-alive connection is still there, past the linger
        idle.sendall(LIVE + b"\r\n")
        reply = read_reply(idle)
        assert reply is not None
        assert reply.status == 200


def test_an_answer_before_the_body_says_the_connection_closes(target: Target) -> None:
    """A client that sends a head, waits (Expect: 100-continue, or a slow upload) and gets an
    early answer (here 400 for a bad X-Traffic-Class) must learn from it that the connection
    takes no other request: uvicorn said nothing, so the body the client then sent and its next
    request on the same connection were silently dropped. A request whose body arrived whole
    before its answer keeps the connection (the test above)."""
    cases = {
        b"X-Traffic-Class: bogus\r\n": 400,
        b"Content-Type: text/plain\r\n": 415,
        b"Expect: 100-continue\r\nX-Traffic-Class: twice\r\n": 400,
    }
    for extra, status in cases.items():
        head = (
            b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5000\r\n"
            + (b"" if b"Content-Type" in extra else b"Content-Type: image/jpeg\r\n")
            + extra
            + b"\r\n"
        )
        with connect(target.url) as sock:
            sock.sendall(head)
            reply = read_reply(sock)
            assert reply is not None
            assert reply.status == status, reply
            assert reply.headers.get("connection") == "close", (extra, reply.headers)
            assert _closed_within(sock, 10)
    # the same request sent whole is answered alike and keeps its connection
    with connect(target.url) as sock:
        for _ in range(2):
            sock.sendall(
                b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n"
                b"Content-Type: image/jpeg\r\nX-Traffic-Class: bogus\r\n\r\nhello"
            )
            reply = read_reply(sock)
            assert reply is not None
            assert reply.status == 400, reply
            assert "connection" not in reply.headers, reply.headers
    target.assert_serves()


TRAILERS = {  # what follows a chunked body's last chunk, repeated
    "one endless value": (b"X-Trailer: ", b"a" * 65536),
    "many fields": (b"", (b"X-Trailer: " + b"a" * 8192 + b"\r\n") * 8),
}


@pytest.mark.parametrize("shape", list(TRAILERS))
def test_chunked_trailers_are_held_to_the_head_limit(target: Target, shape: str) -> None:
    """A chunked body's trailers are header fields, which the parser buffers whole, after the
    head's own guard: an endless trailer value grew RSS by 190 MiB for 120 MiB sent and stalled
    the event loop for seconds (the value is rebuilt at every read), and a stream of 8 KiB
    fields grew it without bound. Past MAX_HEADER_BYTES (32 KiB) of them the connection is
    closed, while the route still waits for the body's end."""
    first, piece = TRAILERS[shape]
    head = (
        b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
        + CHUNKED
        + chunked_body(jpeg(), 4096)[:-2]  # the photo and the last chunk: trailers come next
    )
    sent = 0
    before = proc_status(target.pid)["VmRSS"]
    with attack(target) as watch, connect(target.url) as sock:
        try:
            sock.sendall(head + first)
            while sent < 24 * MIB:
                sock.sendall(piece)
                sent += len(piece)
        except OSError:  # the server closed the connection
            pass
        closed = _closed_within(sock, 5)
    log.info("trailers (%s): %.1f MiB sent before the server closed", shape, sent / MIB)
    assert closed, "the connection stayed open"
    assert sent < 16 * MIB, f"the server read {sent / MIB:.0f} MiB of trailers"
    grown = watch.peak_rss - before
    assert grown < 50 * MIB, f"RSS grew by {grown / MIB:.0f} MiB for the trailers"


def test_declared_sizes_alone_do_not_hold_the_byte_budget(target: Target) -> None:
    """A Content-Length was reserved from MAX_INFLIGHT_BYTES (128 MiB) before any of its body
    arrived: two connections declaring 64 MiB batches and sending 3 bytes each made every other
    upload 503 until their body deadline (30 s). Bytes are reserved as they arrive."""
    declared = Settings().max_request_bytes
    head = (
        b"POST /predict/batch HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: multipart/form-data; boundary=B\r\n"
        b"Content-Length: %d\r\n\r\n--B" % declared
    )
    with attack(target), _sent(target.url, 4, head):
        time.sleep(0.3)  # the server has read their heads and the 3 bytes
        target.assert_serves()  # a valid upload is answered 200, not 503


@pytest.mark.parametrize("path", ["/predict", "/predict/batch"])
@pytest.mark.parametrize("tail", [b"", b"\r\n--BOUNDAR"], ids=["no end", "a cut end"])
def test_a_multipart_body_without_its_closing_boundary_is_400(
    target: Target, path: str, tail: bytes
) -> None:
    """python-multipart's finalize() does not check that the body ended: a form cut before its
    closing boundary was answered 200 as if whole."""
    name = b"file" if path == "/predict" else b"files"
    body = (
        (
            b'--BOUNDARY\r\nContent-Disposition: form-data; name="%s"; filename="a.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n" % name
        )
        + jpeg()
        + tail
    )
    whole = body + b"\r\n--BOUNDARY--\r\n"
    assert post(target, path, whole, "multipart/form-data; boundary=BOUNDARY").status_code == 200
    response = post(target, path, body, "multipart/form-data; boundary=BOUNDARY")
    assert_rest_error(response, {400}, "bad_multipart")


# ---------------------------------------------------------------------- afterwards
def test_no_tracebacks_in_the_server_logs(servers: Servers, default_target: Target) -> None:
    """Client mistakes are 4xx answers, never logged exceptions (checked in every server's log,
    restarted ones included)."""
    for server in servers.started:
        log_text = server.log.read_text(errors="replace")
        at = log_text.find("Traceback")
        assert at < 0, f"{server.log.name}: {log_text[max(0, at - 300) : at + 3000]}"
