"""Every line the server process writes to stderr is one JSON object.

Python's own reports (an exception in a thread, one raised in ``__del__``, a warning, an uncaught
exception) go through hooks; C libraries writing to fd 2 (libtiff's errors on a corrupt TIFF)
go through the capture pipe of ``python -m server``.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import time

import httpx
import pytest
from conftest import ROOT
from PIL import Image

pytestmark = pytest.mark.serve


def corrupt_tiff() -> bytes:
    """A deflate TIFF whose compressed strip is broken: libtiff reports it on fd 2 itself."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(
        buf, format="TIFF", compression="tiff_adobe_deflate"
    )
    data = bytearray(buf.getvalue())
    ifd = struct.unpack_from("<I", data, 4)[0]
    for k in range(struct.unpack_from("<H", data, ifd)[0]):
        tag, _type, _count, value = struct.unpack_from("<HHII", data, ifd + 2 + 12 * k)
        if tag == 273:  # StripOffsets: the zlib header of the only strip
            data[value : value + 2] = b"\xff\xff"
    return bytes(data)


def json_lines(text: str) -> list[dict]:
    """Each line parsed; the assertion names the first line that is not a JSON object."""
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        assert isinstance(record, dict), f"not a JSON object: {line!r}\n---\n{text[-3000:]}"
        records.append(record)
    return records


SCRIPT = r"""
import gc, io, os, sys, threading, warnings
from PIL import Image
from server.logs import capture_native_stderr, configure_logging

if sys.argv[1] == "capture":
    capture_native_stderr()
configure_logging("info")

def work():
    raise ZeroDivisionError("in a thread")
thread = threading.Thread(target=work, name="worker-7")
thread.start()
thread.join()

class Finalizer:
    def __del__(self):
        raise ValueError("in __del__")
Finalizer()
gc.collect()

warnings.warn("careful: a plain warning", UserWarning)
Image.MAX_IMAGE_PIXELS = 1000  # 40x40 is over it but under twice it: a warning
Image.open(io.BytesIO(sys.stdin.buffer.read(2000))).size
Image.MAX_IMAGE_PIXELS = None

if sys.argv[1] == "capture":
    try:
        Image.open(io.BytesIO(sys.stdin.buffer.read())).load()
    except OSError:
        pass
    os.write(2, b"a native line without newline at first")
    os.write(2, b", then the rest\n{not json}\n")
    print("print to sys.stderr", file=sys.stderr)
raise RuntimeError("uncaught in main")
"""


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue().ljust(2000, b"\0")  # the script reads exactly 2000 bytes first


@pytest.mark.parametrize("mode", ["hooks", "capture"])
def test_hooks_and_capture_make_every_line_json(mode: str):
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode],
        input=_png() + corrupt_tiff(),
        capture_output=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1  # the uncaught exception still ends the process as an error
    assert proc.stdout == b""
    records = json_lines(proc.stderr.decode())
    by_logger: dict[str, list[dict]] = {}
    for record in records:
        by_logger.setdefault(record["logger"], []).append(record)

    errors = by_logger["server.exceptions"]
    thread = next(r for r in errors if r.get("thread") == "worker-7")
    assert thread["level"] == "error"
    assert thread["exc_type"] == "ZeroDivisionError"
    assert "in a thread" in thread["exc_info"]
    unraisable = next(r for r in errors if r.get("exc_type") == "ValueError")
    assert "Finalizer" in unraisable["message"]
    assert "in __del__" in unraisable["exc_info"]
    uncaught = next(r for r in errors if r["level"] == "critical")
    assert uncaught["exc_type"] == "RuntimeError"
    assert "uncaught in main" in uncaught["exc_info"]

    warned = " ".join(r["message"] for r in by_logger["py.warnings"])
    assert "careful: a plain warning" in warned
    assert "DecompressionBombWarning" in warned

    if mode == "capture":
        native = [r["message"] for r in by_logger["stderr"]]
        assert all(r["level"] == "warning" for r in by_logger["stderr"])
        assert any("ZIPDecode" in m for m in native), native  # libtiff, straight to fd 2
        assert "a native line without newline at first, then the rest" in native
        assert "{not json}" in native
        assert "print to sys.stderr" in native
    else:
        assert "stderr" not in by_logger


def test_server_process_logs_only_json(server_process):
    server = server_process()
    server.wait_ready()
    tiff = corrupt_tiff()
    refused = httpx.post(
        f"{server.url}/predict", content=tiff, headers={"content-type": "image/tiff"}, timeout=10
    )
    assert 400 <= refused.status_code < 500
    assert "error" in refused.json()
    as_file = httpx.post(
        f"{server.url}/predict", files={"file": ("x.tif", tiff, "image/tiff")}, timeout=10
    )
    assert 400 <= as_file.status_code < 500
    assert server.terminate() == 0
    records = json_lines(server.log.read_text(errors="replace"))
    assert any(r.get("message") == "stopped" for r in records)


def test_access_lines_leave_the_event_loop_through_a_bounded_queue():
    """Access records are queued for the writer thread; a full queue drops and counts them,
    and stopping writes what is queued, in order."""
    import logging

    from server.logs import AccessWriter, JsonFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    writer = AccessWriter(handler, max_lines=2, linger_s=0.05)  # not started: nothing drains
    for i in range(5):
        writer.put(logging.LogRecord("server.access", logging.INFO, "", 0, f"r{i}", None, None))
    assert writer.dropped == 3
    writer.stop()
    assert [json.loads(line)["message"] for line in stream.getvalue().splitlines()] == ["r0", "r1"]


def test_the_access_writer_writes_a_burst_in_one_go():
    """A burst of records wakes the writer thread once: it lets them gather and writes them
    together, in order, rather than one wake-up and one write per request."""
    import logging

    from server.logs import AccessWriter, JsonFormatter

    class Recording:
        def __init__(self) -> None:
            self.writes: list[str] = []

        def write(self, text: str) -> int:
            self.writes.append(text)
            return len(text)

        def flush(self) -> None:
            pass

    stream = Recording()
    handler = logging.StreamHandler(stream)  # type: ignore[arg-type]
    handler.setFormatter(JsonFormatter())
    writer = AccessWriter(handler, max_lines=100, linger_s=0.3)
    writer.start()
    try:
        for i in range(40):
            writer.put(logging.LogRecord("server.access", logging.INFO, "", 0, f"r{i}", None, None))
        deadline = time.monotonic() + 5
        while sum(w.count("\n") for w in stream.writes) < 40 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        writer.stop()
    lines = [json.loads(line)["message"] for w in stream.writes for line in w.splitlines()]
    assert lines == [f"r{i}" for i in range(40)]
    assert len(stream.writes) <= 2, [w.count("\n") for w in stream.writes]  # not one per line
    assert writer.dropped == 0


def test_client_driven_uvicorn_warnings_are_written_once_per_interval():
    """uvicorn's warning for a refused request goes through once per interval, and the next one
    through says how many were held back; other messages pass untouched."""
    import logging

    from server.logs import OncePerInterval

    flt = OncePerInterval(("Invalid HTTP request received.",), interval_s=0.2)

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("uvicorn.error", logging.WARNING, __file__, 1, msg, None, None)

    passed = [flt.filter(record("Invalid HTTP request received.")) for _ in range(5)]
    assert passed == [True, False, False, False, False]
    assert all(flt.filter(record("something else")) for _ in range(3))
    time.sleep(0.25)
    again = record("Invalid HTTP request received.")
    assert flt.filter(again)
    assert again.fields == {"repeats_held_back": 4}
    fresh = record("Invalid HTTP request received.")
    time.sleep(0.25)
    assert flt.filter(fresh)
    assert not hasattr(fresh, "fields")  # nothing was held back since
