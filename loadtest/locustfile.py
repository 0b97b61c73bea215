"""Locust users for the cat-or-dog server: real photos, every response body checked.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --headless -u 20 -r 5 -t 60s

Each user reads ``/metadata`` once to learn the model's classes, then mixes single predictions
(multipart and raw body), small batches, metadata and readiness reads. A response counts as a
failure unless its status *and* its body are right, within ``LOAD_REQUEST_TIMEOUT_S`` (5 s: a
server that stops answering fails the run instead of leaving requests that never end, which
locust drops uncounted at the stop). A photo under a class folder (``LOAD_PHOTOS/cat/...``) is
also checked against that class: ``min_accuracy`` in the thresholds. When the run ends, the
budgets of ``loadtest/thresholds.toml`` (or ``--thresholds PATH``) are applied, a breach sets a
non-zero exit code, and what was judged goes to ``<csv prefix>_final.json``. Photos:
``LOAD_PHOTOS`` (default: the shared original-size photos, ``cat/`` and ``dog/``).
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

from locust import HttpUser, between, events, task
from locust.env import Environment

from catsdogs.photos import image_files
from loadtest.serverproc import DEFAULT_PHOTOS
from loadtest.thresholds import (
    DEFAULT_PATH,
    Labels,
    check,
    load_thresholds,
    report,
    stats_from_locust,
    write_final,
)

log = logging.getLogger(__name__)

PROB_TOLERANCE = 1e-3
BATCH_SIZES = (2, 3, 4)


REQUEST_TIMEOUT_S = float(os.environ.get("LOAD_REQUEST_TIMEOUT_S", "5"))
# X-Traffic-Class of every prediction (loadtest.run_load sets it: `evaluation` against a running
# server, whose monitoring must not count the load; `production` on its own throwaway server,
# whose prediction log the load then exercises); API_TOKEN when that server needs one
TRAFFIC_HEADERS = {
    k: v
    for k, v in (
        ("X-Traffic-Class", os.environ.get("LOAD_TRAFFIC_CLASS", "")),
        (
            "Authorization",
            f"Bearer {os.environ['API_TOKEN']}" if os.environ.get("API_TOKEN") else "",
        ),
    )
    if v
}


def labelled_photos(folder: Path) -> list[tuple[str, bytes, str | None]]:
    """(name, bytes, class) of every image below ``folder``: the class is the first folder
    under it (``cat/x.jpg``), None for a photo directly in it."""
    files = image_files(folder)
    if not files:
        raise RuntimeError(f"no photos under {folder}")
    out = []
    for path in files:
        parts = path.relative_to(folder).parts
        out.append((path.name, path.read_bytes(), parts[0] if len(parts) > 1 else None))
    return out


PHOTOS = labelled_photos(Path(os.environ.get("LOAD_PHOTOS", DEFAULT_PHOTOS)))
# predictions of labelled photos, right and wrong (one locust process: the users' greenlets)
LABELS = {"right": 0, "wrong": 0}


def count_label(pred: dict[str, Any], truth: str | None, classes: list[str]) -> None:
    if truth in classes:
        LABELS["right" if pred.get("label") == truth else "wrong"] += 1


def prediction_problem(pred: Any, classes: list[str]) -> str | None:
    """Why ``pred`` is not a valid prediction for a model with ``classes``, or None if it is."""
    if not isinstance(pred, dict):
        return "prediction is not an object"
    label = pred.get("label")
    if label not in classes:
        return f"label {label!r} not among the model's classes {classes}"
    probs = pred.get("probabilities")
    if not isinstance(probs, dict) or sorted(probs) != sorted(classes):
        return f"probabilities keys {sorted(probs) if isinstance(probs, dict) else probs!r}"
    total = sum(float(v) for v in probs.values())
    if abs(total - 1.0) > PROB_TOLERANCE:
        return f"probabilities sum to {total:.6f}, not 1"
    if float(probs[label]) < max(float(v) for v in probs.values()) - PROB_TOLERANCE:
        return f"label {label!r} is not the most probable class"
    if not pred.get("request_id"):
        return "request_id missing"
    return None


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    parser.add_argument(
        "--thresholds", type=str, default=str(DEFAULT_PATH), help="budgets TOML for the run's end"
    )


@events.quitting.add_listener
def _apply_thresholds(environment: Environment, **_: Any) -> None:
    path = (
        Path(environment.parsed_options.thresholds) if environment.parsed_options else DEFAULT_PATH
    )
    stats, labels = stats_from_locust(environment.stats), Labels(**LABELS)
    breaches = check(stats, load_thresholds(path), labels)
    prefix = getattr(environment.parsed_options, "csv_prefix", None)
    if prefix:  # the CSV lags the run's last second; this is exactly what was judged
        write_final(Path(f"{prefix}_final.json"), stats, labels, breaches)
    if labels.right + labels.wrong:
        log.info(
            "labels: %d of %d predictions of labelled photos right",
            labels.right,
            labels.right + labels.wrong,
        )
    if report(breaches):
        environment.process_exit_code = 1


class ClassifierUser(HttpUser):
    wait_time = between(0.5, 1.5)
    classes: list[str]

    def on_start(self) -> None:
        self.client.headers.update(TRAFFIC_HEADERS)
        self.classes = []
        with self.client.get(
            "/metadata", name="/metadata", catch_response=True, timeout=REQUEST_TIMEOUT_S
        ) as resp:
            names = self._json(resp).get("class_names") if resp.status_code == 200 else None
            if isinstance(names, list) and len(names) >= 2:
                self.classes = [str(n) for n in names]
                resp.success()
            else:
                resp.failure(f"/metadata: status {resp.status_code}, class_names {names!r}")

    @staticmethod
    def _json(resp: Any) -> dict[str, Any]:
        try:
            body = resp.json()
        except ValueError:
            return {}
        return body if isinstance(body, dict) else {}

    @staticmethod
    def _status_failure(resp: Any) -> str:
        # a request that got no answer (refused, timed out) has status 0 and the reason in .error
        error = getattr(resp, "error", None)
        return f"status {resp.status_code}: {error if error else resp.text[:200]}"

    @staticmethod
    def _unconfirmed(resp: Any) -> bool:
        """Sent as evaluation traffic and not confirmed so: a server that does not know the
        header logged the load as production traffic."""
        asked = TRAFFIC_HEADERS.get("X-Traffic-Class") == "evaluation"
        return asked and resp.headers.get("X-Traffic-Class") != "evaluation"

    def _check_prediction(self, resp: Any, truth: str | None) -> None:
        if resp.status_code != 200:
            resp.failure(self._status_failure(resp))
            return
        body = self._json(resp)
        problem = prediction_problem(body, self.classes)
        if problem:
            resp.failure(problem)
        elif not resp.headers.get("X-Request-ID"):
            resp.failure("X-Request-ID header missing")
        elif self._unconfirmed(resp):
            resp.failure("sent as evaluation traffic, not confirmed (X-Traffic-Class)")
        else:
            count_label(body, truth, self.classes)
            resp.success()

    @task(6)
    def predict_multipart(self) -> None:
        name, data, truth = random.choice(PHOTOS)
        files = {"file": (name, data, "image/jpeg")}
        with self.client.post(
            "/predict",
            files=files,
            name="/predict [multipart]",
            catch_response=True,
            timeout=REQUEST_TIMEOUT_S,
        ) as resp:
            self._check_prediction(resp, truth)

    @task(3)
    def predict_raw(self) -> None:
        _, data, truth = random.choice(PHOTOS)
        headers = {"Content-Type": "image/jpeg"}
        with self.client.post(
            "/predict",
            data=data,
            headers=headers,
            name="/predict [raw]",
            catch_response=True,
            timeout=REQUEST_TIMEOUT_S,
        ) as resp:
            self._check_prediction(resp, truth)

    @task(2)
    def predict_batch(self) -> None:
        chosen = random.sample(PHOTOS, random.choice(BATCH_SIZES))
        files = [("files", (name, data, "image/jpeg")) for name, data, _ in chosen]
        with self.client.post(
            "/predict/batch",
            files=files,
            name="/predict/batch",
            catch_response=True,
            timeout=REQUEST_TIMEOUT_S,
        ) as resp:
            if resp.status_code != 200:
                resp.failure(self._status_failure(resp))
                return
            preds = self._json(resp).get("predictions")
            if not isinstance(preds, list) or len(preds) != len(chosen):
                got = len(preds) if isinstance(preds, list) else preds
                resp.failure(f"{len(chosen)} files sent, {got} predictions back")
                return
            for i, pred in enumerate(preds):
                problem = prediction_problem(pred, self.classes)
                if problem:
                    resp.failure(f"predictions[{i}]: {problem}")
                    return
            if self._unconfirmed(resp):
                resp.failure("sent as evaluation traffic, not confirmed (X-Traffic-Class)")
                return
            for pred, (_, _, truth) in zip(preds, chosen, strict=True):
                count_label(pred, truth, self.classes)
            resp.success()

    @task(1)
    def metadata(self) -> None:
        with self.client.get(
            "/metadata", name="/metadata", catch_response=True, timeout=REQUEST_TIMEOUT_S
        ) as resp:
            names = self._json(resp).get("class_names")
            if resp.status_code == 200 and names == self.classes:
                resp.success()
            else:
                resp.failure(f"/metadata: status {resp.status_code}, class_names {names!r}")

    @task(1)
    def ready(self) -> None:
        with self.client.get(
            "/health/ready", name="/health/ready", catch_response=True, timeout=REQUEST_TIMEOUT_S
        ) as resp:
            if resp.status_code == 200:
                resp.success()
            else:
                resp.failure(f"/health/ready: status {resp.status_code}")
