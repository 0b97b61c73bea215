"""Tools of the hostile-input suite: crasher payloads, raw HTTP, a liveness probe, /proc figures.

The payloads are built by the functions below when a test first needs them; only the decoder
fuzzer's findings (found by mutation, not built) are kept in ``decode_crashers.json``.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import os
import resource
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

MIB = 1 << 20
GIB = 1 << 30
V2_INFER = "/v2/models/catsdogs/infer"


# ---------------------------------------------------------------------- crasher files
@functools.cache
def load_crasher(name: str) -> bytes:
    """A payload of the suite by name (see ``CRASHERS_BUILT``), built once per session."""
    return CRASHERS_BUILT[name]()


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=9)
    return buf.getvalue()


def tiny_png(color: tuple[int, int, int] = (220, 30, 30)) -> bytes:
    return _png_bytes(Image.new("RGB", (16, 16), color))


def gradient_png(size: tuple[int, int] = (1200, 900)) -> bytes:
    """A PNG that costs the server milliseconds to decode but is small to send."""
    ramp = np.linspace(0, 255, size[0], dtype=np.uint8)
    pixels = np.stack([np.tile(ramp, (size[1], 1))] * 3, axis=-1)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def thin_png(width: int, height: int) -> bytes:
    """A black 8-bit grey PNG of any size, written by hand: a 2,000,000 x 8 one is a few KB."""
    row = b"\x00" + b"\x00" * width  # filter byte, then one byte per pixel
    raw = zlib.compress(row * height, 9)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", raw)
        + _png_chunk(b"IEND", b"")
    )


def _dds_header(fourcc: bytes, width: int = 8, height: int = 8) -> bytes:
    """A DDS header (magic, 124-byte header) whose pixel format is the FourCC given."""
    flags = 0x1 | 0x2 | 0x4 | 0x1000  # caps, height, width, pixel format
    header = struct.pack("<3I", flags, height, width) + struct.pack("<3I", 0, 0, 0)
    header += b"\x00" * 44  # reserved
    header += struct.pack("<2I4s5I", 32, 0x4, fourcc, 0, 0, 0, 0, 0)  # pixel format: FourCC
    header += struct.pack("<5I", 0x1000, 0, 0, 0, 0)  # caps: texture
    return b"DDS " + struct.pack("<I", 124) + header


def _saved(fmt: str, **options: Any) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (220, 30, 30)).save(buf, format=fmt, **options)
    return buf.getvalue()


def _raw_request(method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: 127.0.0.1"]
    lines += [name + b": " + value for name, value in headers]
    lines += [b"Content-Length: " + str(len(body)).encode(), b"Connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def v2_body(**tensor: Any) -> dict[str, Any]:
    """A V2 request with one ``image`` BYTES input; ``tensor`` overrides its fields."""
    base = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [_b64(tiny_png())]}
    return {"inputs": [{**base, **tensor}]}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _nested(depth: int, inner: bytes = b"") -> bytes:
    return b"[" * depth + inner + b"]" * depth


def _huge_shape(dims: int, digits: int) -> bytes:
    number = b"9" * digits
    shape = b'"shape":[' + b",".join([number] * dims) + b"]"
    return _json(v2_body(shape=[0])).replace(b'"shape":[0]', shape)


def _multipart_long_boundary() -> bytes:
    boundary = b"b" * 5000
    body = b"--" + boundary + b"\r\n"
    body += b'Content-Disposition: form-data; name="file"; filename="a.png"\r\n'
    body += b"Content-Type: image/png\r\n\r\n" + tiny_png() + b"\r\n--" + boundary + b"--\r\n"
    return _raw_request(
        "POST", "/predict", [(b"Content-Type", b"multipart/form-data; boundary=" + boundary)], body
    )


def _png16() -> bytes:
    arr16 = np.zeros((6300, 6300), dtype=np.uint16)
    arr16[::97, :] = 40000  # a little structure, still a few KB compressed
    return _png_bytes(Image.fromarray(arr16))


# Every payload of the suite, by name, built when a test first asks for it (load_crasher): the
# builders are the record, so no copy of their output is kept in the repository.
CRASHERS_BUILT: dict[str, Callable[[], bytes]] = {
    # class 1: the id that killed the log writer
    "http-feedback-surrogate-id.json": lambda: b'{"request_id": "\\ud800", "label": "cat"}',
    # class 2: memory amplification in decoding
    "http-png-20000x8.png": lambda: thin_png(20000, 8),
    "http-png-2000000x8.png": lambda: thin_png(2_000_000, 8),
    "http-png16-6300x6300.png": _png16,
    "http-png-rgba-6300x6300.png": lambda: _png_bytes(
        Image.new("RGBA", (6300, 6300), (200, 40, 40, 128))
    ),
    # class 3: parsing work before any bound
    "v2-shape-250x4300-digits.json": lambda: _huge_shape(250, 4300),
    "v2-empty-strings-8mb.json": lambda: _json(v2_body(shape=[1])).replace(
        b'"data":[', b'"data":[' + b'"",' * (8 * MIB // 3)
    ),
    "v2-outputs-20000.json": lambda: _json(
        {**v2_body(), "outputs": [{"name": "probabilities"}] * 20000}
    ),
    # class 4: client mistakes that gave 500s
    "v2-shape-4301-digits.json": lambda: _huge_shape(1, 4301),
    "v2-nested-100000.json": lambda: b'{"inputs":' + _nested(100_000) + b"}",
    "http-feedback-nested-100000.json": lambda: _nested(100_000),
    "http-feedback-nested-8000.json": lambda: _nested(8000),
    "v2-id-surrogate.json": lambda: _json(v2_body()).replace(b"{", b'{"id":"\\ud800",', 1),
    "v2-header-length-superscript.http": lambda: _raw_request(
        "POST",
        V2_INFER,
        [
            (b"Content-Type", b"application/octet-stream"),
            (b"Inference-Header-Content-Length", b"\xb2"),
        ],
        _json(v2_body()),
    ),
    "http-multipart-boundary-5000.http": _multipart_long_boundary,
    "http-dds-unknown-fourcc.dds": lambda: _dds_header(b"ABCD") + b"\x00" * 256,
    "http-dds-dxt1.dds": lambda: _saved("DDS", pixel_format="DXT1"),
    "http-tga.tga": lambda: _saved("TGA"),
    "http-tiff.tif": lambda: _saved("TIFF"),
    # class 5: a 32 MB header value
    "http-header-32mb.http": lambda: _raw_request(
        "GET", "/health/live", [(b"X-Big", b"a" * (32 * MIB))], b""
    ),
    # class 6: feedback that is not JSON
    "http-feedback-text-plain.http": lambda: _raw_request(
        "POST",
        "/feedback",
        [(b"Content-Type", b"text/plain")],
        b'{"request_id": "abc", "label": "cat"}',
    ),
}


# ---------------------------------------------------------------------- raw HTTP
@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    elapsed_s: float = 0.0

    def json(self) -> Any:
        return json.loads(self.body)


def _host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def connect(url: str, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(_host_port(url), timeout=timeout)


def read_reply(sock: socket.socket) -> Reply | None:
    """One HTTP/1.1 response from ``sock``; None when the server closed without answering."""
    data = b""
    while b"\r\n\r\n" not in data:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        if not chunk:
            return None
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "-1"))
    while length < 0 or len(rest) < length:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        if not chunk:
            break
        rest += chunk
    if headers.get("transfer-encoding", "").lower() == "chunked":
        rest = _dechunk(rest)
    return Reply(int(status_line.split(" ", 2)[1]), headers, rest)


def _dechunk(data: bytes) -> bytes:
    out, pos = b"", 0
    while True:
        end = data.find(b"\r\n", pos)
        size = int(data[pos:end].split(b";")[0], 16)
        if size == 0:
            return out
        out += data[end + 2 : end + 2 + size]
        pos = end + 4 + size


def send_raw(url: str, request: bytes, timeout: float = 30.0) -> Reply | None:
    """Send bytes as they are; the reply, or None when the server closed the connection.

    A server may answer and close before reading everything (a refused header): a broken pipe
    while sending is then normal, and what it answered is still read.
    """
    start = time.perf_counter()
    with connect(url, timeout) as sock:
        with suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)
        reply = read_reply(sock)
    if reply is not None:
        reply.elapsed_s = time.perf_counter() - start
    return reply


def post_request(path: str, body: bytes, content_type: str) -> bytes:
    """A complete POST request as bytes (for sockets that send it slowly or in parallel)."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def chunked_body(body: bytes, piece: int) -> bytes:
    """``body`` in Transfer-Encoding: chunked framing, ``piece`` bytes a chunk."""
    pieces = (body[i : i + piece] for i in range(0, len(body), piece))
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def parse_replies(raw: bytes) -> list[tuple[int, bytes]]:
    """Every (status, body) in ``raw``, the bytes a connection received until it closed."""
    out = []
    while raw:
        head, _, raw = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        length = next(
            int(v) for n, _, v in (x.partition(":") for x in lines) if n.lower() == "content-length"
        )
        out.append((int(lines[0].split(" ", 2)[1]), raw[:length]))
        raw = raw[length:]
    return out


def read_until_closed(sock: socket.socket) -> bytes:
    """What the socket receives until the peer closes it."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


# ---------------------------------------------------------------------- the server process
def proc_status(pid: int) -> dict[str, int]:
    """The ``Vm*`` figures of /proc/PID/status, in bytes, and ``Threads``."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name.startswith("Vm"):
            values[name] = int(value.split()[0]) * 1024
        elif name == "Threads":
            values[name] = int(value)
    return values


def reset_peak_rss(pid: int) -> None:
    """Start VmHWM afresh (Linux >= 4.0), so each attack's peak is its own."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def set_memory_ceiling(pid: int, limit: int) -> None:
    """Cap a running process's address space (what start_server's memory_limit does at exec)."""
    resource.prlimit(pid, resource.RLIMIT_AS, (limit, limit))


def raise_open_files(wanted: int) -> None:
    """Let this test process hold ``wanted`` sockets (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


def machine_stress() -> dict[str, float]:
    """Counters of the whole machine's CPU trouble, in ms: ``steal`` (time the hypervisor gave this
    VM's CPUs to others, /proc/stat) and ``cpu_some`` (time some runnable task waited for a CPU,
    /proc/pressure/cpu). Subtract two readings for a span; a counter that cannot be read is 0."""
    figures = {"steal": 0.0, "cpu_some": 0.0}
    try:
        with open("/proc/stat") as fh:
            fields = fh.readline().split()
        figures["steal"] = int(fields[8]) * 1000 / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/proc/pressure/cpu") as fh:
            some = fh.readline().split()
        figures["cpu_some"] = int(some[-1].removeprefix("total=")) / 1000
    except (OSError, ValueError, IndexError):
        pass
    return figures


# ---------------------------------------------------------------------- liveness probe
# Runs in its own process, so the test's own work (building payloads, the GIL) cannot delay it:
# what it measures is the server's event loop. On a small machine the attack's clients, which in
# production sit on other machines, share the CPUs with the server and with this probe, and the
# probe itself can be left waiting for a CPU. Each poll therefore also reads the probe's own
# run-queue wait over the poll from /proc/thread-self/schedstat (time spent runnable but not
# running) and gives the server's share: the poll's time less that wait. A server that stalls
# leaves the probe blocked in recv, asleep, and that wait does not count: the whole stall stays in
# the server's share. Where schedstat cannot be read the wait is 0 and the two figures are equal.
_PROBE = r"""
import http.client, json, select, sys, time
host, port, interval = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])

def waited_ns():
    try:
        with open("/proc/thread-self/schedstat") as fh:
            return int(fh.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0

times, served, waits, failures, conn = [], [], [], 0, None
while not select.select([sys.stdin], [], [], 0)[0]:
    start, wait_before = time.perf_counter(), waited_ns()
    ok = False
    try:
        if conn is None:
            conn = http.client.HTTPConnection(host, port, timeout=5)
        conn.request("GET", "/health/live")
        response = conn.getresponse()
        response.read()
        ok = response.status == 200
        if response.getheader("connection", "").lower() == "close":
            conn.close()
            conn = None
    except (OSError, http.client.HTTPException):
        if conn is not None:
            conn.close()
        conn = None
    elapsed = (time.perf_counter() - start) * 1000
    waited = min(elapsed, (waited_ns() - wait_before) / 1e6)
    times.append(elapsed)
    waits.append(waited)
    served.append(elapsed - waited)
    failures += not ok
    if len(times) == 1:
        print("started", flush=True)
    time.sleep(max(0.0, interval - elapsed / 1000))
slowest = max(range(len(times)), key=times.__getitem__)
print(json.dumps({"n": len(times), "max_ms": times[slowest], "failures": failures,
                  "max_served_ms": max(served), "waited_at_max_ms": waits[slowest],
                  "max_waited_ms": max(waits), "p50_ms": sorted(times)[len(times) // 2]}),
      flush=True)
"""


@dataclass
class ProbeResult:
    n: int = 0
    max_ms: float = 0.0  # the slowest poll, as the probe timed it
    max_served_ms: float = 0.0  # the slowest poll less the probe's own wait for a CPU
    waited_at_max_ms: float = 0.0  # the probe's wait for a CPU during the slowest poll
    max_waited_ms: float = 0.0  # its longest wait for a CPU during any poll
    p50_ms: float = 0.0
    failures: int = 0


@contextmanager
def liveness_probe(url: str, interval_s: float = 0.02) -> Iterator[ProbeResult]:
    """Poll ``GET /health/live`` every ``interval_s`` on one keep-alive connection, from another
    process, while the block runs; the result holds the slowest answer (as timed, and less the
    probe's own wait for a CPU) and the failures."""
    host, port = _host_port(url)
    proc = subprocess.Popen(
        [sys.executable, "-c", _PROBE, host, str(port), str(interval_s)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    result = ProbeResult()
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "started":
            raise RuntimeError("the liveness probe did not start")
        yield result
    finally:
        out, _ = proc.communicate("stop\n", timeout=30)
    figures = json.loads(out.strip().splitlines()[-1])
    for name in ("n", "max_ms", "max_served_ms", "waited_at_max_ms", "max_waited_ms", "p50_ms"):
        setattr(result, name, figures[name])
    result.failures = figures["failures"]


# ---------------------------------------------------------------------- small checks
def error_code(reply_json: Any) -> str | None:
    """The ``code`` of a REST error body, or None when the body does not have that shape."""
    if isinstance(reply_json, dict) and isinstance(reply_json.get("error"), dict):
        error = reply_json["error"]
        if isinstance(error.get("code"), str) and isinstance(error.get("message"), str):
            return error["code"]
    return None


def is_v2_error(reply_json: Any) -> bool:
    return isinstance(reply_json, dict) and isinstance(reply_json.get("error"), str)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start
