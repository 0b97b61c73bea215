"""The HTTP reference: the bare floor's work behind the leanest HTTP server on the same stack.

A raw ASGI app (no framework, no middleware, no queue, no logs, no metrics) on the server's own
uvicorn, uvloop and httptools. ``POST /predict`` reads the body, takes the image out of a
one-part multipart form (or the raw body), and on one executor thread runs exactly what the floor
runs: ``catsdogs.preprocessing.preprocess_bytes`` and a batch-1 run on a plain onnxruntime
session (``loadtest.inprocess.open_runs``, the floor's session options). ``make bench`` drives it
like the server, so the server's latency splits into what HTTP itself costs (this against the
floor) and what the server's own request path adds (the server against this). It is a measuring
instrument, not a server: it checks no limits, and answers 400 to anything it cannot read.

    .venv-serve/bin/python -m loadtest.rawasgi --model models/model.onnx --port 8001
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from catsdogs.cpus import available_cpus
from catsdogs.preprocessing import preprocess_bytes
from loadtest.inprocess import open_runs

JSON = [(b"content-type", b"application/json")]


def image_of(body: bytes, content_type: bytes) -> bytes:
    """The image in a one-part multipart form (the load generator's), or the body itself."""
    if not content_type.startswith(b"multipart/form-data"):
        return body
    boundary = b"--" + content_type.split(b"boundary=", 1)[1].strip(b'"')
    start = body.index(b"\r\n\r\n", body.index(boundary)) + 4
    return body[start : body.index(b"\r\n" + boundary, start)]


def make_app(model: Path, threads: int, policy: str) -> Any:
    runs, contract = open_runs(model, threads, (policy,))
    run, spec, classes = runs[policy], contract.preprocessing, contract.class_names
    pool = ThreadPoolExecutor(1)

    def predict(image: bytes) -> list[float]:
        return [float(p) for p in run(preprocess_bytes(image, spec)[None], [image])[0]]

    async def reply(send: Any, status: int, body: bytes) -> None:
        await send({"type": "http.response.start", "status": status, "headers": JSON})
        await send({"type": "http.response.body", "body": body})

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] in ("/health/live", "/health/ready"):
            await reply(send, 200, b'{"status":"ok"}')
            return
        if scope["path"] != "/predict" or scope["method"] != "POST":
            await reply(send, 404, b'{"error":"not found"}')
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        headers = dict(scope["headers"])
        try:
            image = image_of(b"".join(chunks), headers.get(b"content-type", b""))
            probs = await asyncio.get_running_loop().run_in_executor(pool, predict, image)
        except Exception as exc:  # not what the load generator sends: say so, stay up
            await reply(send, 400, json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode())
            return
        best = max(range(len(probs)), key=probs.__getitem__)
        answer = {
            "label": classes[best],
            "probabilities": dict(zip(classes, probs, strict=True)),
            "request_id": os.urandom(16).hex(),
        }
        await reply(send, 200, json.dumps(answer).encode())

    return app


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8001")))
    parser.add_argument(
        "--threads", type=int, default=int(os.environ.get("INTRA_OP_THREADS", "0")),
        help="onnxruntime threads (default: INTRA_OP_THREADS, as the server); 0 = the CPUs",
    )  # fmt: skip
    parser.add_argument("--policy", choices=("spin", "sleep"), default="spin")
    args = parser.parse_args()
    app = make_app(args.model, args.threads or available_cpus(), args.policy)
    uvicorn.run(
        app, host=args.host, port=args.port, loop="uvloop", http="httptools",
        access_log=False, log_level="warning", lifespan="off",
    )  # fmt: skip


if __name__ == "__main__":
    main()
