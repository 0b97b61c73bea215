"""Post-deployment evaluation: send labelled photos to a running server and judge it.

    python -m monitoring.evaluate_deployment --url http://127.0.0.1:8000 \
        --data ../shared/data/catsdogs/images --out reports/deployment --min-accuracy 0.95
    python -m monitoring.evaluate_deployment --url http://127.0.0.1:8000 \
        --data data/prepared/manifest.csv --split test

``--data`` is a folder with one subfolder per class, or the prepare stage's manifest (a
``.csv``): then the photos of one split (``--split``, ``test`` by default), the ones training
never saw, and only when the served model was trained on exactly that manifest (its contract's
``data_version`` is the manifest's sha256; anything else could be scoring training photos, so
the evaluation refuses). A folder says nothing of what the model was trained on: the summary
records ``held_out: null`` for it.

Each photo is posted to ``/predict``; the true label then goes to
``/feedback`` so the server's live accuracy counts it too. With ``--no-feedback`` (CD) the
predictions are sent as evaluation traffic (``X-Traffic-Class: evaluation``, with the bearer token
in ``API_TOKEN`` if set): the server answers them as usual and keeps them out of its prediction
log, drift window and prediction counts, so a deployment's own check does not show up in
production's monitoring. Writes ``results.json`` (one row per
image) and ``summary.json`` (accuracy, latency percentiles) and exits non-zero when accuracy is
below ``--min-accuracy`` or any request failed, so CD can roll back. Needs numpy (percentiles)
and the project's ``catsdogs`` package besides the standard library: it runs in any of the
project's environments.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import mimetypes
import os
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from catsdogs.hashing import file_sha256
from catsdogs.photos import IMAGE_SUFFIXES

log = logging.getLogger("evaluate_deployment")

EXIT_OK, EXIT_FAILED, EXIT_UNUSABLE = 0, 1, 2


@dataclass
class Result:
    image: str
    true_label: str
    predicted_label: str | None = None
    confidence: float | None = None
    latency_ms: float | None = None  # client-side: request sent -> response read
    server_latency_ms: float | None = None  # what the server reports for the same request
    evaluation: bool | None = None  # whether the server kept it out of its monitoring
    request_id: str | None = None
    prediction_id: str | None = None
    predict_status: int | None = None  # the status of a refused prediction (4xx, 5xx)
    feedback_status: int | None = None
    error: str | None = None


class HttpError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:200]}")
        self.status = status


def http(
    method: str,
    url: str,
    body: bytes | None,
    headers: dict[str, str],
    timeout: float,
    answer_headers: dict[str, str] | None = None,
):
    """One request -> (status, parsed JSON body); ``answer_headers``, if given, receives the
    answer's headers (names in lower case). Non-2xx raises :class:`HttpError`."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            if answer_headers is not None:
                answer_headers.update({k.lower(): v for k, v in resp.headers.items()})
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        raise HttpError(exc.code, exc.read().decode("utf-8", "replace")) from None


def list_images(data: Path, limit: int | None) -> list[tuple[Path, str]]:
    """(path, class) for every image of ``data/<class>/``; with ``limit``, classes interleaved
    so a small run still covers every class."""
    classes = sorted(p.name for p in data.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{data}: no class subfolders (expected e.g. cat/ and dog/)")
    items = interleaved(
        {
            c: sorted(f for f in (data / c).rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
            for c in classes
        },
        limit,
    )
    if not items:
        raise ValueError(f"{data}: no image files under {classes}")
    return items


def manifest_images(manifest: Path, split: str, limit: int | None) -> list[tuple[Path, str]]:
    """(path, class) of the manifest's ``split`` (paths as written: relative to the repository
    root, where the stages run), classes interleaved as :func:`list_images` does."""
    from catsdogs.manifest import read_manifest

    by_class: dict[str, list[Path]] = {}
    for row in read_manifest(manifest, split):
        by_class.setdefault(row.label, []).append(Path(row.path))
    items = interleaved(by_class, limit)
    missing = [path for path, _ in items if not path.is_file()]
    if missing:  # photos elsewhere (another clone, a moved folder): no check of the model
        raise ValueError(
            f"{len(missing)} of the {len(items)} photos {manifest} names are not here (e.g. "
            f"{missing[0]}): run from the repository root where the pipeline ran, or pass a "
            "labelled folder"
        )
    return items


def interleaved(by_class: dict[str, list[Path]], limit: int | None) -> list[tuple[Path, str]]:
    """One photo of each class (in name order) in turn, then the next of each: a run cut at
    ``limit`` still covers every class."""
    items: list[tuple[Path, str]] = []
    for i in range(max((len(paths) for paths in by_class.values()), default=0)):
        for label in sorted(by_class):
            if i < len(by_class[label]):
                items.append((by_class[label][i], label))
    return items[:limit] if limit else items


def evaluate_one(
    url: str,
    path: Path,
    true_label: str,
    root: Path | None,
    timeout: float,
    feedback: bool,
    token: str = "",
    evaluation: bool = False,
) -> Result:
    image = str(path.relative_to(root)) if root is not None else str(path)
    result = Result(image=image, true_label=true_label)
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    request_id = f"eval-{uuid.uuid4().hex}"
    headers = {"Content-Type": content_type, "X-Request-ID": request_id}
    if evaluation:
        headers["X-Traffic-Class"] = "evaluation"
        if token:
            headers["Authorization"] = f"Bearer {token}"
    try:
        data = path.read_bytes()
        started = time.perf_counter()
        answer: dict[str, str] = {}
        _, body = http("POST", f"{url}/predict", data, headers, timeout, answer)
        # a server that does not know the header (an older image) logs the prediction anyway
        result.evaluation = answer.get("x-traffic-class", "").lower() == "evaluation"
        result.latency_ms = (time.perf_counter() - started) * 1000.0
        result.predicted_label = str(body["label"])
        result.confidence = float(body["confidence"])
        result.server_latency_ms = body.get("latency_ms")
        result.request_id = str(body.get("request_id") or request_id)
        result.prediction_id = body.get("prediction_id")
    except (OSError, HttpError, ValueError, KeyError, TypeError) as exc:
        result.error = f"predict: {exc}"
        if isinstance(exc, HttpError):
            result.predict_status = exc.status
        return result
    if feedback:
        # by the image's own id where the server gives one (servers before it: the request's)
        key = (
            {"prediction_id": result.prediction_id}
            if result.prediction_id
            else {"request_id": result.request_id}
        )
        payload = json.dumps({**key, "label": true_label}).encode()
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            status, _ = http("POST", f"{url}/feedback", payload, headers, timeout)
            result.feedback_status = status
        except HttpError as exc:
            result.feedback_status = exc.status
            result.error = f"feedback: {exc}"
        except OSError as exc:
            result.error = f"feedback: {exc}"
    return result


def summarise(results: list[Result], *, wall_s: float, min_accuracy: float) -> dict[str, Any]:
    ok = [r for r in results if r.predicted_label is not None]
    correct = sum(1 for r in ok if r.predicted_label == r.true_label)
    errors = [r for r in results if r.error is not None]
    latencies = [r.latency_ms for r in ok if r.latency_ms is not None]
    confusion: dict[str, dict[str, int]] = {}
    for (true, pred), n in sorted(Counter((r.true_label, r.predicted_label) for r in ok).items()):
        confusion.setdefault(true, {})[str(pred)] = n
    per_class = {}
    for label in sorted({r.true_label for r in results}):
        rows = [r for r in ok if r.true_label == label]
        hits = sum(1 for r in rows if r.predicted_label == label)
        per_class[label] = {"n": len(rows), "accuracy": hits / len(rows) if rows else None}
    accuracy = correct / len(ok) if ok else 0.0
    return {
        "n": len(results),
        "predicted": len(ok),
        "correct": correct,
        "accuracy": accuracy,
        "per_class": per_class,
        "confusion": confusion,  # true label -> predicted label -> count
        "errors": len(errors),
        "error_examples": [{"image": r.image, "error": r.error} for r in errors[:10]],
        "feedback_stored": sum(1 for r in results if r.feedback_status == 201),
        "latency_ms": {
            **{
                f"p{q}": float(np.percentile(latencies, q)) if latencies else None
                for q in (50, 90, 95, 99)
            },
            "mean": sum(latencies) / len(latencies) if latencies else None,
            "max": max(latencies) if latencies else None,
        },
        "wall_s": wall_s,
        "images_per_s": len(ok) / wall_s if wall_s > 0 else None,
        "min_accuracy": min_accuracy,
        "passed": bool(ok) and not errors and accuracy >= min_accuracy,
    }


def traffic(results: list[Result]) -> str:
    """How the server took the run's predictions: ``evaluation`` when it confirmed every one as
    evaluation traffic (kept out of its monitoring), ``production`` when none, else ``mixed``."""
    kept = {r.evaluation for r in results if r.predicted_label is not None}
    if kept == {True}:
        return "evaluation"
    return "production" if kept <= {False} else "mixed"


def run(args: argparse.Namespace) -> int:
    url = args.url.rstrip("/")
    data = Path(args.data)
    is_manifest = data.suffix.lower() == ".csv"
    try:
        if is_manifest:
            items = manifest_images(data, args.split, args.limit)
        else:
            items = list_images(data, args.limit)
    except (OSError, ValueError) as exc:
        log.error("%s", exc)
        return EXIT_UNUSABLE
    try:
        _, meta = http("GET", f"{url}/metadata", None, {}, args.timeout)
    except (OSError, HttpError, ValueError) as exc:
        log.error("cannot reach the server at %s: %s", url, exc)
        return EXIT_UNUSABLE
    held_out: bool | None = None
    if is_manifest:
        lineage = meta.get("lineage") or {}
        # what the export stage records as the model's data_version: the manifest's sha256
        version, trained_on = file_sha256(data), str(lineage.get("data_version") or "")
        if version != trained_on:
            log.error(
                "%s is data %s, but the served model %s was trained on data %s: its %r split "
                "may hold that model's training photos. Evaluate with the manifest it was "
                "trained on, or a labelled folder it never saw",
                data,
                version[:12],
                meta.get("model_version"),
                trained_on[:12] or "unknown",
                args.split,
            )
            return EXIT_UNUSABLE
        # only the test split: training fitted on train, and chose its epoch (and a cascade's
        # threshold) on val
        held_out = args.split == "test"
    classes = set(meta.get("class_names", []))
    unknown = sorted({label for _, label in items} - classes)
    if unknown:
        log.error("folders %s are not among the model's classes %s", unknown, sorted(classes))
        return EXIT_UNUSABLE
    log.info(
        "evaluating %s (model %s) on %d photos from %s, concurrency %d",
        url,
        meta.get("model_version"),
        len(items),
        data,
        args.concurrency,
    )

    token = os.environ.get("API_TOKEN", "")
    root = None if is_manifest else data
    feedback = not args.no_feedback
    # labels need a logged prediction; without them, stay out of the server's monitoring
    evaluation = not feedback
    started = time.perf_counter()
    first = evaluate_one(url, *items[0], root, args.timeout, feedback, token, evaluation)
    if evaluation and not token and first.predict_status == 401:
        log.warning(
            "the server needs a bearer token for evaluation traffic (set API_TOKEN): these "
            "predictions go into its prediction log and drift window"
        )
        evaluation = False
        first = evaluate_one(url, *items[0], root, args.timeout, feedback, token, evaluation)
    if feedback and first.feedback_status in (401, 403):
        # every label would be refused the same way: one line now, not a failed run of all
        log.error(
            "the server refused the feedback (%d): set API_TOKEN to its token, or FEEDBACK=0",
            first.feedback_status,
        )
        return EXIT_UNUSABLE
    with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        futures = [
            pool.submit(
                evaluate_one, url, path, label, root, args.timeout, feedback, token, evaluation
            )
            for path, label in items[1:]
        ]
        results = [first, *(f.result() for f in futures)]
    wall_s = time.perf_counter() - started

    summary = summarise(results, wall_s=wall_s, min_accuracy=args.min_accuracy)
    summary.update(
        url=url,
        data=str(data),
        split=args.split if is_manifest else None,
        held_out=held_out,
        model_version=meta.get("model_version"),
        model_name=meta.get("model_name"),
        concurrency=args.concurrency,
        traffic=traffic(results),
    )
    if evaluation and summary["traffic"] != "evaluation":
        log.warning(
            "the server did not confirm these predictions as evaluation traffic (an image from "
            "before X-Traffic-Class?): they went into its prediction log and drift window"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps([asdict(r) for r in results], indent=1) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lat = summary["latency_ms"]
    log.info(
        "accuracy %.4f (%d/%d), errors %d, feedback stored %d; latency ms p50 %.1f "
        "p90 %.1f p99 %.1f; %.1f images/s; wrote %s",
        summary["accuracy"],
        summary["correct"],
        summary["predicted"],
        summary["errors"],
        summary["feedback_stored"],
        lat["p50"] or math.nan,
        lat["p90"] or math.nan,
        lat["p99"] or math.nan,
        summary["images_per_s"] or 0.0,
        out,
    )
    if summary["errors"]:
        log.error("%d requests failed, e.g. %s", summary["errors"], summary["error_examples"][:3])
    if not summary["passed"]:
        log.error(
            "deployment check FAILED (accuracy %.4f, minimum %.4f, errors %d)",
            summary["accuracy"],
            args.min_accuracy,
            summary["errors"],
        )
        return EXIT_FAILED
    return EXIT_OK


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", required=True, help="base URL of the running server")
    p.add_argument(
        "--data",
        required=True,
        help="folder with one subfolder per class, or the prepare stage's manifest (.csv)",
    )
    p.add_argument(
        "--split",
        default="test",
        choices=("train", "val", "test"),
        help="the manifest's split to send (a manifest only; default: test, never trained on)",
    )
    p.add_argument("--out", default="reports/deployment", help="folder for results/summary JSON")
    p.add_argument("--min-accuracy", type=float, default=0.95)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    p.add_argument("--limit", type=int, default=None, help="at most this many photos")
    p.add_argument(
        "--no-feedback",
        action="store_true",
        help="do not post true labels, and send the photos as evaluation traffic, kept out of "
        "the server's monitoring (either uses the bearer token in API_TOKEN, if set)",
    )
    args = p.parse_args(argv)
    if args.concurrency < 1 or (args.limit is not None and args.limit < 1):
        p.error("--concurrency and --limit must be >= 1")
    if not 0.0 <= args.min_accuracy <= 1.0:
        p.error("--min-accuracy must be within 0..1")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
