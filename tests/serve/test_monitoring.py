"""Monitoring against real server processes: the prediction log, feedback, summary and drift.

Each test starts ``python -m server`` on a free port with the tiny colour model of conftest
(red -> cat, blue -> dog) and a prediction log in its own temporary folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from conftest import BLUE, RED, build_tiny_model, image_bytes, prom, tiny_contract

from catsdogs import drift
from catsdogs.preprocessing import preprocess_bytes_info

pytestmark = [pytest.mark.serve, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def predict(url: str, data: bytes) -> dict:
    r = httpx.post(f"{url}/predict", content=data, headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200, r.text
    return r.json()


async def _post_all(url: str, requests: list[tuple[str, dict | bytes]], limit: int = 50):
    """POST many requests concurrently; returns the responses in order."""
    sem = asyncio.Semaphore(limit)
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:

        async def one(path: str, body: dict | bytes) -> httpx.Response:
            async with sem:
                if isinstance(body, bytes):
                    return await client.post(
                        path, content=body, headers={"Content-Type": "image/jpeg"}
                    )
                return await client.post(path, json=body)

        return await asyncio.gather(*(one(p, b) for p, b in requests))


def metric_value(text: str, line_prefix: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_prefix + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{line_prefix} not in /metrics")


def test_feedback_survives_a_restart(server_process, tmp_path: Path):
    server = server_process()
    server.wait_ready()
    answer = predict(server.url, image_bytes(RED))
    assert answer["label"] == "cat"
    assert server.terminate() == 0  # SIGTERM flushes the write queue

    server = server_process()
    server.wait_ready()
    r = httpx.post(
        f"{server.url}/feedback", json={"request_id": answer["request_id"], "label": "dog"}
    )
    assert r.status_code == 201, r.text
    assert r.json() == {
        "prediction_id": answer["prediction_id"],
        "request_id": answer["request_id"],
        "label": "dog",
        "predicted_label": "cat",
        "correct": False,
        "model_version": answer["model_version"],
    }
    summary = httpx.get(f"{server.url}/monitoring/summary").json()
    fig = summary["model_versions"][answer["model_version"]]
    assert fig["predictions"] == 1  # rebuilt from the log on disk
    assert fig["confusion"] == {"dog": {"cat": 1}}
    assert fig["accuracy"] == 0.0


def test_feedback_errors(server_process):
    server = server_process()
    server.wait_ready()
    answer = predict(server.url, image_bytes(BLUE))
    url = f"{server.url}/feedback"
    cases = [
        (
            httpx.post(url, json={"request_id": "never-seen", "label": "cat"}),
            404,
            "unknown_request_id",
        ),
        (
            httpx.post(url, json={"request_id": answer["request_id"], "label": "cow"}),
            422,
            "invalid_label",
        ),
        (httpx.post(url, json={"request_id": answer["request_id"]}), 422, "invalid_label"),
        (httpx.post(url, json={"label": "cat"}), 422, "missing_id"),
        (httpx.post(url, json={"request_id": "a b", "label": "cat"}), 422, "invalid_request_id"),
        (
            httpx.post(url, json={"prediction_id": "never-seen", "label": "cat"}),
            404,
            "unknown_prediction_id",
        ),
        (
            httpx.post(url, content=b"{not json", headers={"Content-Type": "application/json"}),
            400,
            "invalid_json",
        ),
        (httpx.post(url, json=["a", "list"]), 400, "invalid_json"),
        (
            httpx.post(url, content=b"x" * 100_000, headers={"Content-Type": "application/json"}),
            413,
            "payload_too_large",
        ),
        (httpx.post(url, content=b"x" * 100_000), 415, "unsupported_media_type"),
    ]
    for response, status, code in cases:
        assert response.status_code == status, response.text
        assert response.json()["error"]["code"] == code
        assert response.headers["x-request-id"]
    # feedback names one image of a batch by its prediction_id
    files = [
        ("files", ("a.jpg", image_bytes(BLUE), "image/jpeg")),
        ("files", ("b.jpg", image_bytes(RED), "image/jpeg")),
    ]
    batch = httpx.post(f"{server.url}/predict/batch", files=files).json()["predictions"]
    image_id = batch[1]["prediction_id"]
    # by the batch's request id the image is ambiguous: 409, and no prediction gets the label
    r = httpx.post(url, json={"request_id": batch[1]["request_id"], "label": "cat"})
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "ambiguous_request_id"
    r = httpx.post(url, json={"prediction_id": image_id, "label": "cat"})
    assert r.status_code == 201, r.text
    assert r.json()["correct"] is True
    assert r.json()["prediction_id"] == image_id
    assert httpx.get(f"{server.url}/health/ready").status_code == 200


def test_feedback_by_request_id_after_a_retry_labels_the_photo_once(server_process):
    """A client retried a prediction under its own X-Request-ID: the photo is logged twice, and
    feedback by that id answered 409 for ever (a reused id for another photo still does)."""
    server = server_process()
    server.wait_ready()
    photo = image_bytes(BLUE)
    headers = {"X-Request-ID": "client-retry-1", "Content-Type": "image/jpeg"}
    answers = [
        httpx.post(f"{server.url}/predict", content=photo, headers=headers).json() for _ in range(2)
    ]
    assert {a["request_id"] for a in answers} == {"client-retry-1"}
    r = httpx.post(f"{server.url}/feedback", json={"request_id": "client-retry-1", "label": "dog"})
    assert r.status_code == 201, r.text
    assert r.json()["prediction_id"] == answers[1]["prediction_id"]  # the last answer
    assert r.json()["correct"] is True
    summary = httpx.get(f"{server.url}/monitoring/summary").json()["model_versions"]
    assert summary["tiny-1"]["confusion"] == {"dog": {"dog": 1}}  # counted once
    text = httpx.get(f"{server.url}/metrics").text
    assert prom(text, "feedback_labels_total", model_version="tiny-1", result="correct") == 1
    # the same id reused for another photo: which one is meant cannot be known
    headers["X-Request-ID"] = "client-reused-1"
    for color in (BLUE, RED):
        httpx.post(f"{server.url}/predict", content=image_bytes(color), headers=headers)
    r = httpx.post(f"{server.url}/feedback", json={"request_id": "client-reused-1", "label": "dog"})
    assert (r.status_code, r.json()["error"]["code"]) == (409, "ambiguous_request_id")


def test_a_second_server_on_the_same_log_is_told_of_the_first(server_process, tmp_path: Path):
    """Two servers on one SQLite log (two `make serve` in one checkout) each kept their own live
    figures, which disagreed without a word."""

    def warnings(server) -> list[str]:
        records = [json.loads(x) for x in server.output(10**9).splitlines() if x.startswith("{")]
        return [r["message"] for r in records if "written by another server" in r["message"]]

    first = server_process()
    first.wait_ready()
    second = server_process()  # the same PREDICTION_LOG_PATH
    second.wait_ready()
    assert warnings(first) == []
    [said] = warnings(second)
    assert f"(pid {first.pid})" in said
    assert "PREDICTION_LOG_PATH" in said
    first.terminate()
    second.terminate()
    third = server_process()  # both gone: their locks went with them
    third.wait_ready()
    assert warnings(third) == []


def test_many_parallel_feedback_posts_all_land(server_process, tmp_path: Path):
    server = server_process()
    server.wait_ready()
    n = 200
    colours = [RED if i % 2 == 0 else BLUE for i in range(n)]
    answers = asyncio.run(_post_all(server.url, [("/predict", image_bytes(c)) for c in colours]))
    assert all(r.status_code == 200 for r in answers)
    ids = [r.json()["request_id"] for r in answers]
    assert len(set(ids)) == n
    # all true labels "cat": the red half is right, the blue half wrong
    posts = [("/feedback", {"request_id": rid, "label": "cat"}) for rid in ids]
    responses = asyncio.run(_post_all(server.url, posts, limit=n))
    assert [r.status_code for r in responses] == [201] * n

    summary = httpx.get(f"{server.url}/monitoring/summary").json()
    fig = summary["model_versions"][answers[0].json()["model_version"]]
    assert fig["feedback"] == n
    assert fig["confusion"] == {"cat": {"cat": n // 2, "dog": n // 2}}
    assert server.terminate() == 0
    conn = sqlite3.connect(tmp_path / "predictions.db")
    assert conn.execute("SELECT COUNT(*) FROM feedback").fetchone()[0] == n
    assert conn.execute("SELECT COUNT(*) FROM predictions").fetchone()[0] == n
    joined = conn.execute(
        "SELECT COUNT(*) FROM feedback f JOIN predictions p USING (prediction_id)"
    ).fetchone()[0]
    assert joined == n


def test_summary_and_metrics_for_known_feedback(server_process):
    server = server_process()
    server.wait_ready()
    reds = [predict(server.url, image_bytes(RED)) for _ in range(6)]
    blues = [predict(server.url, image_bytes(BLUE)) for _ in range(4)]
    # truth: 5 of the reds are cats, 1 a dog; 3 blues are dogs, 1 a cat -> 8 of 10 right
    truth = ["cat"] * 5 + ["dog"] + ["dog"] * 3 + ["cat"]
    for answer, label in zip(reds + blues, truth, strict=True):
        r = httpx.post(
            f"{server.url}/feedback", json={"request_id": answer["request_id"], "label": label}
        )
        assert r.status_code == 201, r.text
    version = reds[0]["model_version"]
    fig = httpx.get(f"{server.url}/monitoring/summary").json()["model_versions"][version]
    assert fig["predictions"] == 10
    assert fig["labels"] == {"cat": 6, "dog": 4}
    assert fig["feedback"] == 10
    assert fig["correct"] == 8
    assert fig["accuracy"] == pytest.approx(0.8)
    assert fig["confusion"] == {"cat": {"cat": 5, "dog": 1}, "dog": {"cat": 1, "dog": 3}}
    confidences = [a["confidence"] for a in reds + blues]
    expected = drift.bin_counts(confidences, drift.CONFIDENCE_EDGES).tolist()
    assert fig["confidence"]["counts"] == expected

    text = httpx.get(f"{server.url}/metrics").text
    v = f'model_version="{version}"'
    assert metric_value(text, f"monitor_live_accuracy{{{v}}}") == pytest.approx(0.8)
    assert metric_value(text, f"monitor_feedback{{{v}}}") == 10
    assert metric_value(text, f'monitor_logged_predictions{{label="dog",{v}}}') == 4
    assert (
        metric_value(text, f'monitor_confusion{{{v},predicted_label="cat",true_label="dog"}}') == 1
    )
    assert metric_value(text, f"monitor_confidence_count{{{v}}}") == 10
    assert metric_value(text, "prediction_log_write_failures_total") == 0
    # the counters a recent window of accuracy is read from (LiveAccuracyDropped)
    assert metric_value(text, f'feedback_labels_total{{{v},result="correct"}}') == 8
    assert metric_value(text, f'feedback_labels_total{{{v},result="wrong"}}') == 2
    # a label that replaces an earlier one is not counted again
    r = httpx.post(
        f"{server.url}/feedback", json={"request_id": reds[5]["request_id"], "label": "cat"}
    )
    assert r.status_code == 201, r.text
    text = httpx.get(f"{server.url}/metrics").text
    assert metric_value(text, f'feedback_labels_total{{{v},result="correct"}}') == 8
    assert metric_value(text, f'feedback_labels_total{{{v},result="wrong"}}') == 2
    assert metric_value(text, f"monitor_live_accuracy{{{v}}}") == pytest.approx(0.9)
    # the process's own figures: a restart shows as a new start time (ServeRestarting)
    assert metric_value(text, "process_start_time_seconds") > 0
    assert metric_value(text, "process_resident_memory_bytes") > 10e6


def test_unwritable_log_keeps_predictions_working(server_process, tmp_path: Path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the log's folder should be")
    server = server_process(PREDICTION_LOG_PATH=str(blocker / "predictions.db"))
    server.wait_ready()
    answers = [predict(server.url, image_bytes(RED if i % 2 else BLUE)) for i in range(5)]
    assert [a["label"] for a in answers] == ["dog", "cat", "dog", "cat", "dog"]
    text = httpx.get(f"{server.url}/metrics").text
    assert metric_value(text, "prediction_log_write_failures_total") == 5
    assert metric_value(text, "prediction_log_healthy") == 0
    r = httpx.post(
        f"{server.url}/feedback", json={"request_id": answers[0]["request_id"], "label": "dog"}
    )
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "store_unavailable"
    assert int(r.headers["retry-after"]) >= 1
    store = httpx.get(f"{server.url}/monitoring/summary").json()["store"]
    assert store["healthy"] is False
    assert store["status"] == "unavailable"
    assert store["write_failures"] == 5
    ready = httpx.get(f"{server.url}/health/ready")
    assert ready.status_code == 200  # predictions work: a broken log does not stop serving
    assert ready.json()["prediction_log"] == "unavailable"
    assert server.terminate() == 0
    assert (
        server.output(tail=1_000_000).count("prediction log: cannot open") == 1
    )  # logged once, not per row


# ---------------------------------------------------------------------- drift
def _traffic(rng: np.random.Generator, n: int, *, shifted: bool) -> list[bytes]:
    images = []
    for _ in range(n):
        if shifted:  # big, dark photos the model is unsure about
            size = (int(rng.integers(1200, 1600)), int(rng.integers(900, 1200)))
            colour = tuple(int(c) for c in rng.integers(0, 30, size=3))
        else:  # web-sized photos in clear colours, like the reference
            size = (int(rng.integers(200, 320)), int(rng.integers(150, 320)))
            colour = tuple(int(c) for c in rng.integers(40, 230, size=3))
        images.append(image_bytes(colour, size))
    return images


@pytest.fixture(scope="module")
def drift_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model carrying reference_stats computed from its own 'validation' traffic."""
    import onnxruntime as ort

    folder = tmp_path_factory.mktemp("drift-model")
    plain = build_tiny_model(folder / "plain.onnx")
    contract = tiny_contract()
    session = ort.InferenceSession(str(plain), providers=["CPUExecutionProvider"])
    infos = [
        preprocess_bytes_info(b, contract.preprocessing)
        for b in _traffic(np.random.default_rng(0), 600, shifted=False)
    ]
    batch = np.stack([i.array for i in infos])
    probs = session.run(["probabilities"], {"image": batch})[0]
    reference = drift.build_reference_stats(
        class_names=list(contract.class_names),
        train_labels=["cat", "dog"] * 300,
        val_probabilities=probs,
        widths=[i.width for i in infos],
        heights=[i.height for i in infos],
        brightness=[float(i.array.mean()) for i in infos],
    )
    with_ref = replace(contract, extra={**contract.extra, "reference_stats": reference})
    return build_tiny_model(folder / "with-reference.onnx", with_ref)


def test_drift_low_for_matched_traffic_and_high_for_shifted(server_process, drift_model: Path):
    server = server_process(MODEL_PATH=str(drift_model), DRIFT_WINDOW="200")
    server.wait_ready()
    rng = np.random.default_rng(1)
    before = httpx.get(f"{server.url}/monitoring/drift").json()
    assert before["status"] == "insufficient_data"
    assert before["reference"] is True

    matched = [("/predict", b) for b in _traffic(rng, 200, shifted=False)]
    assert all(r.status_code == 200 for r in asyncio.run(_post_all(server.url, matched, 8)))
    low = httpx.get(f"{server.url}/monitoring/drift").json()
    assert low["window"] == {"size": 200, "capacity": 200}
    features = {"confidence", "width", "height", "brightness", "predicted_label"}
    assert set(low["features"]) == features
    for name, score in low["features"].items():
        assert score["psi"] < drift.PSI_SIGNIFICANT, (name, score)
    assert low["status"] in {"none", "moderate"}

    shifted = [("/predict", b) for b in _traffic(rng, 200, shifted=True)]
    assert all(r.status_code == 200 for r in asyncio.run(_post_all(server.url, shifted, 8)))
    high = httpx.get(f"{server.url}/monitoring/drift").json()
    for name in ("confidence", "width", "height", "brightness"):
        assert high["features"][name]["psi"] > drift.PSI_SIGNIFICANT, (name, high["features"])
        assert high["features"][name]["ks"] > low["features"][name]["ks"]
    assert high["status"] == "significant"

    text = httpx.get(f"{server.url}/metrics").text
    psi_brightness = metric_value(
        text, 'drift_score{feature="brightness",method="psi",model_version="tiny-1"}'
    )
    assert psi_brightness == pytest.approx(high["features"]["brightness"]["psi"], rel=1e-3)
    assert metric_value(text, "drift_window_size") == 200


def test_a_drift_window_the_alert_ignores_is_said_at_start(server_process, drift_model: Path):
    """DRIFT_WINDOW under the InputDrift alert's 200 left the alert silent without a word."""
    from server.monitor import DRIFT_ALERT_MIN_WINDOW

    def warnings(server) -> list[str]:
        lines = server.output(tail=10**9).splitlines()
        records = [json.loads(line) for line in lines if line.startswith("{")]
        return [r["message"] for r in records if "InputDrift" in r.get("message", "")]

    small = server_process(MODEL_PATH=str(drift_model), DRIFT_WINDOW="100")
    enough = server_process(MODEL_PATH=str(drift_model), DRIFT_WINDOW=str(DRIFT_ALERT_MIN_WINDOW))
    small.wait_ready()
    enough.wait_ready()
    assert warnings(small) == [
        "DRIFT_WINDOW=100 is under the 200 predictions the InputDrift alert waits for: drift "
        "is scored and exported, but never alerts"
    ]
    assert warnings(enough) == []
    # the alert's own threshold is the server's number
    rules = yaml.safe_load((ROOT / "monitoring" / "alerts.yml").read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert f"drift_window_size >= {DRIFT_ALERT_MIN_WINDOW})" in alerts["InputDrift"]["expr"]


def test_drift_without_reference_says_so(server_process):
    server = server_process()
    server.wait_ready()
    for _ in range(40):
        predict(server.url, image_bytes(RED))
    report = httpx.get(f"{server.url}/monitoring/drift").json()
    assert report["status"] == "no_reference"
    assert report["reference"] is False
    assert report["features"] == {}
    assert "reference_stats" in report["message"]
    assert "drift_score{" not in httpx.get(f"{server.url}/metrics").text


def test_a_log_locked_past_the_busy_timeout_loses_no_prediction(server_process, tmp_path: Path):
    """Another connection holding the SQLite write lock longer than the busy timeout (10 s: a
    VACUUM, a backup, a script's transaction) is waited out like an outage: the writer keeps
    its batch and retries, so every prediction made meanwhile reaches the log."""
    db = tmp_path / "predictions.db"
    server = server_process(
        PREDICTION_LOG_RECONNECT_MIN_S="0.2", PREDICTION_LOG_RECONNECT_MAX_S="1"
    )
    server.wait_ready()
    ids = [predict(server.url, image_bytes(RED))["prediction_id"]]
    blocker = sqlite3.connect(db, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # the write lock, until the ROLLBACK below
        locked = time.monotonic()
        ids += [predict(server.url, image_bytes(BLUE))["prediction_id"] for _ in range(5)]
        while time.monotonic() - locked < 12.0:  # past the writer's 10 s busy timeout
            time.sleep(0.5)
        assert "cannot be reached (OperationalError: database is locked)" in server.output()
        assert httpx.get(f"{server.url}/health/live").status_code == 200
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    deadline = time.monotonic() + 20.0
    stored: set[str] = set()
    while time.monotonic() < deadline and not set(ids) <= stored:
        with contextlib.closing(sqlite3.connect(db)) as conn:
            stored = {r[0] for r in conn.execute("SELECT prediction_id FROM predictions")}
        time.sleep(0.2)
    assert set(ids) <= stored, f"lost: {sorted(set(ids) - stored)}"
    r = httpx.post(f"{server.url}/feedback", json={"prediction_id": ids[-1], "label": "dog"})
    assert r.status_code == 201, r.text
    metrics = httpx.get(f"{server.url}/metrics").text
    assert prom(metrics, "prediction_log_write_failures_total") == 0
    assert "writes resumed" in server.output()
