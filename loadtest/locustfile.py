"""Locust users for the cat-or-dog server: real photos, every response body checked.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --headless -u 20 -r 5 -t 60s

Each user reads ``/metadata`` once to learn the model's classes, then mixes single predictions
(multipart and raw body), small batches, metadata and readiness reads. A response counts as a
failure unless its status *and* its body are right. When the run ends, the budgets of
``loadtest/thresholds.toml`` (or ``--thresholds PATH``) are applied and a breach sets a non-zero
exit code. Photos: ``LOAD_PHOTOS`` (default: the shared original-size photos).
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

from locust import HttpUser, between, events, task
from locust.env import Environment

from catsdogs.photos import load_photos
from loadtest.thresholds import DEFAULT_PATH, check, load_thresholds, report, stats_from_locust

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PHOTOS = ROOT.parent / "shared" / "data" / "catsdogs" / "originals"
PROB_TOLERANCE = 1e-3
BATCH_SIZES = (2, 3, 4)


PHOTOS = load_photos(Path(os.environ.get("LOAD_PHOTOS", DEFAULT_PHOTOS)))


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
    breaches = check(stats_from_locust(environment.stats), load_thresholds(path))
    if report(breaches):
        environment.process_exit_code = 1


class ClassifierUser(HttpUser):
    wait_time = between(0.5, 1.5)
    classes: list[str]

    def on_start(self) -> None:
        self.classes = []
        with self.client.get("/metadata", name="/metadata", catch_response=True) as resp:
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

    def _check_prediction(self, resp: Any) -> None:
        if resp.status_code != 200:
            resp.failure(f"status {resp.status_code}: {resp.text[:200]}")
            return
        problem = prediction_problem(self._json(resp), self.classes)
        if problem:
            resp.failure(problem)
        elif not resp.headers.get("X-Request-ID"):
            resp.failure("X-Request-ID header missing")
        else:
            resp.success()

    @task(6)
    def predict_multipart(self) -> None:
        name, data = random.choice(PHOTOS)
        files = {"file": (name, data, "image/jpeg")}
        with self.client.post(
            "/predict", files=files, name="/predict [multipart]", catch_response=True
        ) as resp:
            self._check_prediction(resp)

    @task(3)
    def predict_raw(self) -> None:
        _, data = random.choice(PHOTOS)
        headers = {"Content-Type": "image/jpeg"}
        with self.client.post(
            "/predict", data=data, headers=headers, name="/predict [raw]", catch_response=True
        ) as resp:
            self._check_prediction(resp)

    @task(2)
    def predict_batch(self) -> None:
        chosen = random.sample(PHOTOS, random.choice(BATCH_SIZES))
        files = [("files", (name, data, "image/jpeg")) for name, data in chosen]
        with self.client.post(
            "/predict/batch", files=files, name="/predict/batch", catch_response=True
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}: {resp.text[:200]}")
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
            resp.success()

    @task(1)
    def metadata(self) -> None:
        with self.client.get("/metadata", name="/metadata", catch_response=True) as resp:
            names = self._json(resp).get("class_names")
            if resp.status_code == 200 and names == self.classes:
                resp.success()
            else:
                resp.failure(f"/metadata: status {resp.status_code}, class_names {names!r}")

    @task(1)
    def ready(self) -> None:
        with self.client.get("/health/ready", name="/health/ready", catch_response=True) as resp:
            if resp.status_code == 200:
                resp.success()
            else:
                resp.failure(f"/health/ready: status {resp.status_code}")
