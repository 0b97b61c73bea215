"""Smoke test of a running server, over HTTP, with the standard library only.

Used by CI, CD and `make image-smoke` against a container, and by hand against any URL:

    python3 scripts/smoke_test.py --url http://127.0.0.1:8000 --data ../shared/data/catsdogs/images

It waits for /health/ready, checks /health, /metadata and /metrics, predicts known cat and dog
photos (labels must be right, not just a 200), sends a batch, sends bad input that must be
rejected with a 4xx in the API's error shape (an AVIF photo named as a refused format), loads
the /docs page's two files, and checks /feedback with an unknown id (404: the route works,
nothing is stored). Its predictions are evaluation traffic (``X-Traffic-Class:
evaluation``, with API_TOKEN's bearer token if set), so the server keeps them out of its
prediction log and monitoring. Exit status 0 only when every check passes.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import math
import os
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("smoke")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}
# a 64x64 AVIF photo (321 bytes), made with Pillow: a format the API refuses
AVIF_64X64 = (
    "AAAAIGZ0eXBhdmlmAAAAAGF2aWZtaWYxbWlhZk1BMUIAAADrbWV0YQAAAAAAAAAhaGRscgAAAAAAAAAAcGljdAAA"
    "AAAAAAAAAAAAAAAAAAAOcGl0bQAAAAAAAQAAAB5pbG9jAAAAAEQAAAEAAQAAAAEAAAETAAAALgAAAChpaW5mAAAA"
    "AAABAAAAGmluZmUCAAAAAAEAAGF2MDFDb2xvcgAAAABqaXBycAAAAEtpcGNvAAAAFGlzcGUAAAAAAAAAQAAAAEAA"
    "AAAQcGl4aQAAAAADCAgIAAAADGF2MUOBAAwAAAAAE2NvbHJuY2x4AAEADQAGgAAAABdpcG1hAAAAAAAAAAEAAQQB"
    "AoMEAAAANm1kYXQSAAoJGBV//aICGg0IMh8Ux4eGZQIIIJ5QAAAAwhFo1pT90RREF5wMMgQg2zuA"
)


class SmokeError(AssertionError):
    """A check failed; the message says which and what came back."""


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> object:
        try:
            return json.loads(self.body)
        except json.JSONDecodeError as exc:
            raise SmokeError(f"not JSON (status {self.status}): {self.body[:200]!r}") from exc


def request(
    url: str,
    method: str = "GET",
    body: bytes | None = None,
    content_type: str | None = None,
    timeout: float = 30.0,
    extra: dict[str, str] | None = None,
) -> Reply:
    headers = {"X-Request-ID": f"smoke-{uuid.uuid4().hex[:12]}", **(extra or {})}
    if content_type:
        headers["Content-Type"] = content_type
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return Reply(resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read())
    except urllib.error.HTTPError as exc:  # 4xx/5xx still carry a body worth checking
        return Reply(exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read())


class Traffic:
    """The headers that mark the smoke test's predictions as evaluation traffic. A server that
    needs a token for that (API_TOKEN set there, not here) answers 401: the test then says so and
    goes on as production traffic, its predictions logged as any other. A server that does not
    confirm the header in its answer (an image from before it) logged them too: said once."""

    def __init__(self) -> None:
        token = os.environ.get("API_TOKEN", "")
        self.headers = {"X-Traffic-Class": "evaluation"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self.token = bool(token)
        self.unconfirmed = False

    def post(self, url: str, body: bytes, content_type: str) -> Reply:
        reply = request(url, "POST", body, content_type, extra=self.headers)
        if reply.status == 401 and not self.token and self.headers:
            log.warning(
                "the server needs a bearer token for evaluation traffic (set API_TOKEN): the "
                "smoke test's predictions go into its prediction log"
            )
            self.headers = {}
            reply = request(url, "POST", body, content_type)
        confirmed = reply.headers.get("x-traffic-class", "").lower() == "evaluation"
        if self.headers and reply.status == 200 and not confirmed and not self.unconfirmed:
            self.unconfirmed = True
            log.warning(
                "the server did not confirm evaluation traffic (an image from before "
                "X-Traffic-Class?): the smoke test's predictions go into its prediction log"
            )
        return reply


def multipart(fields: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    """Encode (field name, file name, bytes) triples as multipart/form-data."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, filename, data in fields:
        head = (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        )
        parts.append(head.encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def expect(cond: bool, what: str) -> None:
    if not cond:
        raise SmokeError(what)


def wait_ready(url: str, timeout_s: float) -> float:
    """Poll /health/ready until 200; returns the seconds it took."""
    start = time.monotonic()
    last = "no answer"
    while time.monotonic() - start < timeout_s:
        try:
            reply = request(f"{url}/health/ready", timeout=2.0)
            if reply.status == 200:
                return time.monotonic() - start
            last = f"status {reply.status}"
        except OSError as exc:  # connection refused while the process starts
            last = type(exc).__name__
        time.sleep(0.1)
    raise SmokeError(f"/health/ready not 200 after {timeout_s:.0f} s ({last})")


def pick_photos(data: Path, label: str, n: int) -> list[Path]:
    """n photos of one class, spread evenly over the sorted folder (same picks every run)."""
    folders = [p for p in data.iterdir() if p.is_dir() and p.name.lower() == label.lower()]
    expect(bool(folders), f"no folder for class {label!r} in {data}")
    files = sorted(p for p in folders[0].iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    expect(len(files) >= n, f"{folders[0]} holds {len(files)} photos, need {n}")
    step = len(files) / n
    return [files[int(i * step)] for i in range(n)]


def check_prediction(pred: object, class_names: list[str], where: str) -> dict:
    expect(isinstance(pred, dict), f"{where}: prediction is not an object: {pred!r}")
    assert isinstance(pred, dict)
    for key in ("label", "confidence", "probabilities", "model_version", "request_id"):
        expect(key in pred, f"{where}: prediction lacks {key!r}: {pred}")
    probs = pred["probabilities"]
    expect(sorted(probs) == sorted(class_names), f"{where}: probabilities keys {sorted(probs)}")
    expect(math.isclose(sum(probs.values()), 1.0, abs_tol=1e-3), f"{where}: probs sum {probs}")
    expect(pred["label"] == max(probs, key=probs.get), f"{where}: label is not the argmax")
    expect(math.isclose(pred["confidence"], probs[pred["label"]], abs_tol=1e-6), f"{where}: conf")
    return pred


def check_error(reply: Reply, what: str) -> None:
    expect(400 <= reply.status < 500, f"{what}: expected a 4xx, got {reply.status}")
    body = reply.json()
    ok = isinstance(body, dict) and isinstance(body.get("error"), dict)
    expect(ok and {"code", "message"} <= set(body["error"]), f"{what}: error shape {body}")
    expect("x-request-id" in reply.headers, f"{what}: no X-Request-ID header")
    log.info("%s -> %d %s", what, reply.status, body["error"]["code"])


def run(url: str, data: Path, per_class: int, min_accuracy: float) -> dict:
    health = request(f"{url}/health")
    expect(health.status == 200 and health.json() == {"status": "ok"}, f"/health: {health}")
    expect("x-request-id" in health.headers, "/health: no X-Request-ID header")
    live = request(f"{url}/health/live")
    expect(live.status == 200, f"/health/live: {live.status}")

    meta = request(f"{url}/metadata")
    expect(meta.status == 200, f"/metadata: {meta.status}")
    metadata = meta.json()
    assert isinstance(metadata, dict)
    for key in ("model_name", "model_version", "class_names"):
        expect(key in metadata, f"/metadata lacks {key!r}")
    class_names = list(metadata["class_names"])
    name, version = metadata["model_name"], metadata["model_version"]
    log.info("model %s %s, classes %s", name, version, class_names)

    # Known photos: multipart for most, raw body for one per class (both forms are the API).
    results = []
    traffic = Traffic()
    for label in class_names:
        for i, photo in enumerate(pick_photos(data, label, per_class)):
            raw = photo.read_bytes()
            if i == 0:
                reply = traffic.post(f"{url}/predict", raw, "image/jpeg")
            else:
                body, ctype = multipart([("file", photo.name, raw)])
                reply = traffic.post(f"{url}/predict", body, ctype)
            what = f"/predict {photo.name}: {reply.status} {reply.body[:200]!r}"
            expect(reply.status == 200, what)
            pred = check_prediction(reply.json(), class_names, photo.name)
            results.append((photo.name, label, pred["label"], pred["confidence"]))
    right = sum(truth == got for _, truth, got, _ in results)
    for name, truth, got, conf in results:
        log.info(
            "%-14s true %-4s predicted %-4s %.3f%s",
            name,
            truth,
            got,
            conf,
            "" if truth == got else "  WRONG",
        )
    accuracy = right / len(results)
    expect(accuracy >= min_accuracy, f"accuracy {accuracy:.3f} < {min_accuracy} on known photos")

    # A batch keeps the order of its files.
    batch_photos = [pick_photos(data, label, 1)[0] for label in class_names]
    body, ctype = multipart([("files", p.name, p.read_bytes()) for p in batch_photos])
    reply = traffic.post(f"{url}/predict/batch", body, ctype)
    expect(reply.status == 200, f"/predict/batch: {reply.status} {reply.body[:200]!r}")
    batch = reply.json()
    assert isinstance(batch, dict)
    preds = batch.get("predictions")
    expect(isinstance(preds, list) and len(preds) == len(batch_photos), f"batch: {batch}")
    for photo, pred in zip(batch_photos, preds, strict=True):
        check_prediction(pred, class_names, f"batch {photo.name}")

    # Bad input is a 4xx with the error shape, never a 200 or a 500.
    not_image, ctype = multipart([("file", "notes.jpg", b"this is not an image at all")])
    check_error(request(f"{url}/predict", "POST", not_image, ctype), "text named .jpg")
    check_error(
        request(f"{url}/predict", "POST", b"\xff\xd8\xff\xe0broken", "image/jpeg"),
        "truncated JPEG body",
    )
    empty, ctype = multipart([("other", "x.bin", b"")])
    check_error(request(f"{url}/predict", "POST", empty, ctype), "multipart without file")
    check_error(request(f"{url}/predict", "POST", b"{}", "application/json"), "JSON body")
    # a format the API refuses is named, even where the image carries no decoder for it
    avif = request(f"{url}/predict", "POST", base64.b64decode(AVIF_64X64), "image/avif")
    check_error(avif, "AVIF photo")
    code = avif.json()["error"]["code"]
    expect(code == "unsupported_format", f"AVIF photo: expected unsupported_format, got {code}")
    # the two files the /docs page loads (the image keeps only those of Swagger UI's)
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        reply = request(f"{url}/docs/static/{asset}")
        expect(reply.status == 200 and reply.body, f"/docs/static/{asset}: {reply.status}")

    check_feedback_route(url, class_names[0])

    metrics = request(f"{url}/metrics")
    expect(metrics.status == 200 and b"# TYPE" in metrics.body, f"/metrics: {metrics.status}")
    return {"predictions": len(results), "accuracy": round(accuracy, 4)}


def check_feedback_route(url: str, label: str) -> None:
    """Feedback for a prediction that does not exist: 404 ``unknown_prediction_id`` proves the
    route, the token check and the log's lookup work, and stores nothing (a deployment's checks
    must not add labels to production's live accuracy). The bearer token is API_TOKEN's, if set;
    without one, a server that needs it answers 401, which is all that can be checked."""
    token = os.environ.get("API_TOKEN", "")
    body = json.dumps({"prediction_id": f"smoke-{uuid.uuid4().hex}", "label": label}).encode()
    reply = request(
        f"{url}/feedback",
        "POST",
        body,
        "application/json",
        extra={"Authorization": f"Bearer {token}"} if token else None,
    )
    if reply.status == 401 and not token:
        log.info("/feedback needs a token (set API_TOKEN to check it further)")
        return
    expect(reply.status == 404, f"/feedback for an unknown id: {reply.status} {reply.body[:200]!r}")
    error = reply.json()
    assert isinstance(error, dict)
    code = error.get("error", {}).get("code") if isinstance(error.get("error"), dict) else None
    expect(code == "unknown_prediction_id", f"/feedback for an unknown id: {error}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument(
        "--data",
        type=Path,
        default=Path("../shared/data/catsdogs/images"),
        help="folder with one subfolder of photos per class",
    )
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument(
        "--min-accuracy",
        type=float,
        default=0.9,
        help="share of the known photos that must get the right label",
    )
    parser.add_argument("--wait", type=float, default=60.0, help="seconds to wait for ready")
    parser.add_argument("--ready-only", action="store_true", help="only wait for /health/ready")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[smoke] %(message)s")
    url = args.url.rstrip("/")
    try:
        ready_s = wait_ready(url, args.wait)
        log.info("ready after %.2f s", ready_s)
        if args.ready_only:
            return
        summary = run(url, args.data, args.per_class, args.min_accuracy)
    except SmokeError as exc:
        log.error("FAILED: %s", exc)
        sys.exit(1)
    summary["ready_wait_s"] = round(ready_s, 2)
    log.info("passed %s", json.dumps(summary))


if __name__ == "__main__":
    main()
