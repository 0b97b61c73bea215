"""Evaluation traffic (``X-Traffic-Class: evaluation``) on a real server process: answered like
any prediction, and kept out of everything production's monitoring reads (the prediction log, the
drift window, live accuracy, ``predictions_total``); refused when the header is malformed, and
without the bearer token when ``API_TOKEN`` is set.

The tiny colour model of conftest: red -> cat, blue -> dog.
"""

from __future__ import annotations

import base64
import sqlite3
import time
from pathlib import Path

import httpx
import pytest
from conftest import BLUE, RED, access_records, image_bytes, prom

pytestmark = [pytest.mark.serve, pytest.mark.slow]

TOKEN = "eval-Token_for.tests~"
EVALUATION = {"X-Traffic-Class": "evaluation"}


def _predict(url: str, colour, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(
        f"{url}/predict",
        content=image_bytes(colour),
        headers={"Content-Type": "image/jpeg", **(headers or {})},
    )


def _batch(url: str, colours, headers: dict[str, str] | None = None) -> httpx.Response:
    files = [("files", (f"{i}.jpg", image_bytes(c))) for i, c in enumerate(colours)]
    return httpx.post(f"{url}/predict/batch", files=files, headers=headers or {})


def _v2(url: str, colour, headers: dict[str, str] | None = None) -> httpx.Response:
    tensor = {
        "name": "image",
        "datatype": "BYTES",
        "shape": [1],
        "data": [base64.b64encode(image_bytes(colour)).decode()],
    }
    return httpx.post(
        f"{url}/v2/models/catsdogs/infer", json={"inputs": [tensor]}, headers=headers or {}
    )


def _logged(db: Path) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {row[0] for row in conn.execute("SELECT prediction_id FROM predictions")}


def _wait_logged(url: str, n: int) -> str:
    """The metrics once the writer has logged ``n`` predictions (it writes in the background)."""
    deadline = time.monotonic() + 5
    while True:
        text = httpx.get(f"{url}/metrics").text
        if prom(text, "monitor_logged_predictions") >= n or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


def test_evaluation_traffic_is_answered_and_stays_out_of_monitoring(server_process, tmp_path: Path):
    server = server_process()
    server.wait_ready()
    url = server.url

    production = [_predict(url, RED) for _ in range(3)]
    evaluation = [_predict(url, BLUE, EVALUATION) for _ in range(2)]
    # case does not matter; the explicit default is production traffic
    evaluation.append(_predict(url, BLUE, {"X-Traffic-Class": "Evaluation"}))
    production.append(_predict(url, RED, {"X-Traffic-Class": "production"}))
    for r in production + evaluation:
        assert r.status_code == 200, r.text
    # the server confirms what it kept out of monitoring, and only that
    assert {r.headers.get("x-traffic-class") for r in evaluation} == {"evaluation"}
    assert {r.headers.get("x-traffic-class") for r in production} == {None}
    assert {r.json()["label"] for r in production} == {"cat"}
    assert {r.json()["label"] for r in evaluation} == {"dog"}
    batch = _batch(url, [BLUE, RED], EVALUATION)
    assert batch.status_code == 200, batch.text
    assert batch.headers["x-traffic-class"] == "evaluation"
    assert [p["label"] for p in batch.json()["predictions"]] == ["dog", "cat"]
    v2 = _v2(url, BLUE, EVALUATION)
    assert v2.status_code == 200, v2.text
    assert v2.json()["outputs"][1]["data"] == ["dog"]

    text = _wait_logged(url, 4)
    assert prom(text, "predictions_total", label="cat") == 4
    assert prom(text, "predictions_total", label="dog") == 0
    assert prom(text, "evaluation_predictions_total", label="dog") == 5
    assert prom(text, "evaluation_predictions_total", label="cat") == 1
    assert prom(text, "monitor_logged_predictions") == 4
    assert prom(text, "drift_window_size") == 4
    summary = httpx.get(f"{url}/monitoring/summary").json()["model_versions"]
    (figures,) = summary.values()
    assert figures["predictions"] == 4
    assert figures["labels"] == {"cat": 4}

    # nothing was logged, so there is nothing to give feedback on
    evaluated_id = evaluation[0].json()["prediction_id"]
    fb = httpx.post(f"{url}/feedback", json={"prediction_id": evaluated_id, "label": "dog"})
    assert fb.status_code == 404, fb.text
    assert fb.json()["error"]["code"] == "unknown_prediction_id"
    fb = httpx.post(
        f"{url}/feedback",
        json={"prediction_id": production[0].json()["prediction_id"], "label": "cat"},
    )
    assert fb.status_code == 201, fb.text

    # an evaluation request that fails is marked too (its answer and its access log line)
    bad = httpx.post(
        f"{url}/predict",
        content=b"not an image",
        headers={"Content-Type": "image/jpeg", **EVALUATION},
    )
    assert bad.status_code == 422, bad.text
    assert bad.headers["x-traffic-class"] == "evaluation"

    # the access log tells the two apart
    ids = {r.json()["request_id"] for r in evaluation} | {
        batch.json()["predictions"][0]["request_id"]
    }
    ids.add(bad.headers["x-request-id"])
    records = access_records(server, lambda a: ids <= {r.get("request_id") for r in a})
    marked = {r["request_id"] for r in records if r.get("traffic") == "evaluation"}
    assert ids <= marked
    assert not marked & {r.json()["request_id"] for r in production}

    assert server.terminate() == 0
    logged = _logged(tmp_path / "predictions.db")
    assert logged == {r.json()["prediction_id"] for r in production}


def test_a_malformed_traffic_class_is_a_400_naming_it(server_process, tmp_path: Path):
    server = server_process()
    server.wait_ready()
    url = server.url
    # HTTP's optional whitespace is space and tab: a no-break space or NEL is not it, so a
    # proxy rule that matches the header exactly cannot be passed around with one
    values = ["shadow", "", "evaluation, production", "evaluation\xa0", "\x85evaluation"]
    for value in values:
        r = _predict(url, RED, {"X-Traffic-Class": value.encode("latin-1")})
        assert r.status_code == 400, (value, r.text)
        assert r.json()["error"]["code"] == "invalid_traffic_class"
        assert "X-Traffic-Class" in r.json()["error"]["message"]
        assert "x-traffic-class" not in r.headers
    twice = httpx.post(
        f"{url}/predict",
        content=image_bytes(RED),
        headers=[
            ("Content-Type", "image/jpeg"),
            ("X-Traffic-Class", "evaluation"),
            ("X-Traffic-Class", "production"),
        ],
    )
    assert twice.status_code == 400, twice.text
    assert twice.json()["error"]["code"] == "invalid_traffic_class"
    batch = _batch(url, [RED], {"X-Traffic-Class": "test"})
    assert batch.status_code == 400
    assert batch.json()["error"]["code"] == "invalid_traffic_class"
    v2 = _v2(url, RED, {"X-Traffic-Class": "test"})
    assert v2.status_code == 400
    assert "X-Traffic-Class" in v2.json()["error"]  # the V2 protocol's error shape

    text = httpx.get(f"{url}/metrics").text
    assert prom(text, "predictions_total") == 0
    assert prom(text, "evaluation_predictions_total") == 0
    assert server.terminate() == 0
    assert _logged(tmp_path / "predictions.db") == set()


def test_with_an_api_token_evaluation_traffic_needs_it(server_process, tmp_path: Path):
    server = server_process(API_TOKEN=TOKEN)
    server.wait_ready()
    url = server.url

    missing = _predict(url, BLUE, EVALUATION)
    assert missing.status_code == 401, missing.text
    assert missing.json()["error"]["code"] == "unauthorized"
    assert missing.headers["www-authenticate"].startswith("Bearer")
    wrong = _predict(url, BLUE, {**EVALUATION, "Authorization": "Bearer nope"})
    assert wrong.status_code == 403
    assert wrong.json()["error"]["code"] == "forbidden"
    v2 = _v2(url, BLUE, EVALUATION)
    assert v2.status_code == 401
    assert v2.headers["www-authenticate"].startswith("Bearer")

    right = _predict(url, BLUE, {**EVALUATION, "Authorization": f"Bearer {TOKEN}"})
    assert right.status_code == 200, right.text
    plain = _predict(url, RED)  # production traffic needs no token, as before
    assert plain.status_code == 200, plain.text

    text = _wait_logged(url, 1)
    assert prom(text, "evaluation_predictions_total") == 1
    assert prom(text, "predictions_total") == 1
    assert server.terminate() == 0
    assert _logged(tmp_path / "predictions.db") == {plain.json()["prediction_id"]}
    assert TOKEN not in server.output(tail=10**9)


def test_a_batch_larger_than_the_queue_is_a_413_not_a_503_to_retry(server_process):
    """MAX_QUEUE_SIZE below MAX_BATCH_FILES: a batch that can never be admitted was a 503 with
    Retry-After, which a client retries for ever; it is a 413 naming the limit."""
    server = server_process(MAX_QUEUE_SIZE="2")
    server.wait_ready()
    too_many = _batch(server.url, [RED, BLUE, RED])
    assert too_many.status_code == 413, too_many.text
    assert too_many.json()["error"]["code"] == "too_many_files"
    assert "MAX_QUEUE_SIZE" in too_many.json()["error"]["message"]
    assert "retry-after" not in too_many.headers
    fits = _batch(server.url, [RED, BLUE])
    assert fits.status_code == 200, fits.text
    text = httpx.get(f"{server.url}/metrics").text
    assert prom(text, "inference_rejected_total") == 0
