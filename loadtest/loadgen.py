"""A small asyncio HTTP/1.1 load generator for benchmarks (keep-alive, prebuilt requests).

Every request is built once up front (multipart body and headers as bytes), so a request costs
the client one socket write and one parse of the status line and headers: a single core drives
thousands of requests a second, far more than the model server can answer, so the server, not
the client, is what is measured. The client reports its own CPU time so that can be checked.

Two modes:
- closed loop: ``concurrency`` connections, each sending its next request when the last returns;
- open loop: requests at a fixed ``rate`` per second whatever the server does (overload tests).

    python -m loadtest.loadgen --url http://127.0.0.1:8000 --concurrency 8 --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import time
import urllib.parse
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from catsdogs.multipart import multipart_body
from catsdogs.photos import load_photos
from loadtest.stats import summarize_ms

REQUEST_TIMEOUT_S = 60.0
STATUS_TIMEOUT = -1  # no answer within REQUEST_TIMEOUT_S
STATUS_CONN_ERROR = 0  # connection refused, reset or closed mid-answer
STATUS_CLIENT_LIMIT = -2  # open loop only: no free connection (client cap reached)


@dataclass(frozen=True)
class Request:
    data: bytes  # the whole HTTP request
    images: int  # images it carries (throughput is counted in images)


@dataclass(frozen=True)
class Sample:
    start: float  # perf_counter at send
    latency: float  # seconds to the last byte of the answer
    status: int  # HTTP status, or one of the STATUS_* codes above
    ok: bool  # status 200 and a body that parses as a prediction
    images: int
    detail: str = ""  # for STATUS_CONN_ERROR: the exception's class name


@dataclass
class RunResult:
    samples: list[Sample] = field(default_factory=list)
    window_s: float = 0.0  # length of the measured window
    client_cpu_s: float = 0.0  # this process's CPU time during the run

    def summary(self) -> dict[str, Any]:
        """Figures of the measured window: latency of accepted (ok) requests, throughput, errors."""
        ok = [s for s in self.samples if s.ok]
        statuses = Counter(str(s.status) for s in self.samples)
        rejected = [s.latency for s in self.samples if s.status == 503]
        window = self.window_s or math.nan
        return {
            "requests": len(self.samples),
            "ok": len(ok),
            "errors": len(self.samples) - len(ok),
            "statuses": dict(sorted(statuses.items())),
            "connection_errors": dict(Counter(s.detail for s in self.samples if s.detail)),
            "latency_ms": summarize_ms([s.latency for s in ok]),
            "rejected_latency_ms": summarize_ms(rejected),
            "requests_per_s": len(ok) / window,
            "images_per_s": sum(s.images for s in ok) / window,
            "window_s": self.window_s,
            "client_cpu_s": self.client_cpu_s,
            "client_cpu_share": self.client_cpu_s / window,
        }


def _head(method: str, host: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def predict_request(host: str, name: str, data: bytes, *, raw: bool = False) -> Request:
    if raw:
        return Request(_head("POST", host, "/predict", {"Content-Type": "image/jpeg"}, data), 1)
    body, ctype = multipart_body("file", [(name, data)], content_type="image/jpeg")
    return Request(_head("POST", host, "/predict", {"Content-Type": ctype}, body), 1)


def batch_request(host: str, files: Sequence[tuple[str, bytes]]) -> Request:
    body, ctype = multipart_body("files", files, content_type="image/jpeg")
    return Request(_head("POST", host, "/predict/batch", {"Content-Type": ctype}, body), len(files))


def get_request(host: str, path: str) -> Request:
    return Request(_head("GET", host, path, {}, b""), 0)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """(status, body, keep_alive) of one HTTP/1.1 response."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        key, _, value = line.partition(b":")
        headers[key.strip().lower()] = value.strip()
    if b"content-length" in headers:
        body = await reader.readexactly(int(headers[b"content-length"]))
    elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # end of the (empty) trailer
                break
            chunks.append((await reader.readexactly(size + 2))[:-2])
        body = b"".join(chunks)
    else:
        body = await reader.read()
        return status, body, False
    return status, body, headers.get(b"connection", b"").lower() != b"close"


def body_is_prediction(body: bytes, images: int) -> bool:
    """A cheap validity check: a prediction (or one per image for a batch) with a label."""
    try:
        doc = json.loads(body)
    except ValueError:
        return False
    if images == 0:
        return isinstance(doc, dict)
    if "predictions" in doc:
        preds = doc["predictions"]
        return len(preds) == images and all("label" in p for p in preds)
    return "label" in doc and "request_id" in doc


class Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def send(self, req: Request) -> Sample:
        if self.reader is not None and self.reader.at_eof():
            # the server closed this idle keep-alive connection (uvicorn: after 5 s idle); like
            # urllib3, check before reuse instead of counting the server's normal close as an error
            await self.close()
        start = time.perf_counter()
        try:
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            assert self.reader is not None
            self.writer.write(req.data)
            status, body, keep = await asyncio.wait_for(
                read_response(self.reader), REQUEST_TIMEOUT_S
            )
        except TimeoutError:
            await self.close()
            return Sample(start, time.perf_counter() - start, STATUS_TIMEOUT, False, req.images)
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
            await self.close()
            latency = time.perf_counter() - start
            detail = type(exc).__name__
            return Sample(start, latency, STATUS_CONN_ERROR, False, req.images, detail)
        latency = time.perf_counter() - start
        if not keep:
            await self.close()
        ok = status == 200 and body_is_prediction(body, req.images)
        return Sample(start, latency, status, ok, req.images)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


def _window(samples: list[Sample], t_from: float, t_to: float) -> list[Sample]:
    """Requests sent inside the window (what started during warm-up or after the end is cut)."""
    return [s for s in samples if t_from <= s.start < t_to]


async def closed_loop(
    url: str,
    requests: Sequence[Request],
    concurrency: int,
    duration_s: float,
    warmup_s: float = 1.0,
) -> RunResult:
    """``concurrency`` connections, each sending back to back for warm-up + ``duration_s``."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    cycle = itertools.cycle(requests)
    samples: list[Sample] = []
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    t_from, t_to = t0 + warmup_s, t0 + warmup_s + duration_s

    async def worker() -> None:
        conn = Connection(host, port)
        try:
            while time.perf_counter() < t_to:
                samples.append(await conn.send(next(cycle)))
        finally:
            await conn.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    window = _window(samples, t_from, t_to)
    return RunResult(window, duration_s, time.process_time() - cpu0)


async def open_loop(
    url: str,
    requests: Sequence[Request],
    rate: float,
    duration_s: float,
    warmup_s: float = 1.0,
    max_connections: int = 256,
) -> RunResult:
    """Send ``rate`` requests a second on schedule, whether or not earlier ones have returned."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    idle: list[Connection] = []
    n_open = 0
    samples: list[Sample] = []
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    t_from, t_to = t0 + warmup_s, t0 + warmup_s + duration_s

    async def one(req: Request) -> None:
        nonlocal n_open
        if idle:
            conn = idle.pop()
        elif n_open < max_connections:
            n_open += 1
            conn = Connection(host, port)
        else:
            samples.append(Sample(time.perf_counter(), 0.0, STATUS_CLIENT_LIMIT, False, req.images))
            return
        samples.append(await conn.send(req))
        idle.append(conn)

    tasks = []
    for i, req in enumerate(itertools.cycle(requests)):
        due = t0 + i / rate
        if due >= t_to:
            break
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(req)))
    await asyncio.gather(*tasks)
    for conn in idle:
        await conn.close()
    window = _window(samples, t_from, t_to)
    return RunResult(window, duration_s, time.process_time() - cpu0)


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument(
        "--photos", type=Path, default=root.parent / "shared/data/catsdogs/originals"
    )
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--rate", type=float, help="open loop at this many requests/s")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    args = parser.parse_args()
    host = urllib.parse.urlsplit(args.url).netloc
    reqs = [predict_request(host, n, d) for n, d in load_photos(args.photos)]
    if args.rate:
        run = open_loop(args.url, reqs, args.rate, args.duration, args.warmup)
    else:
        run = closed_loop(args.url, reqs, args.concurrency, args.duration, args.warmup)
    print(json.dumps(asyncio.run(run).summary(), indent=2))


if __name__ == "__main__":
    main()
