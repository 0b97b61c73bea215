"""POST /feedback under attack and under failure: hostile ids, cross-site bodies, tokens,
reused request ids, slow bodies and a stuck prediction log writer.

The first tests run ``python -m server`` for real (the tiny colour model of conftest: red -> cat,
blue -> dog); the others drive the app in-process, where a test can hold the writer thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import BLUE, RED, TINY_VERSION, image_bytes, prom, serve

from server.ids import is_valid_id
from server.monitor import Monitor, PredictionEvent

pytestmark = pytest.mark.serve

TOKEN = "s3cret-Token_for.tests~"  # printable ASCII, as API_TOKEN requires


def _predict(url: str, colour: tuple[int, int, int], **headers: str) -> dict:
    r = httpx.post(
        f"{url}/predict",
        content=image_bytes(colour),
        headers={"Content-Type": "image/jpeg", **headers},
    )
    assert r.status_code == 200, r.text
    return r.json()


def _post_raw(url: str, body: bytes, content_type: str, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{url}/feedback", content=body, headers={"Content-Type": content_type, **headers}
    )


def _code(r: httpx.Response) -> str:
    return r.json()["error"]["code"]


# ---------------------------------------------------------------------- real server processes
@pytest.mark.slow
def test_a_lone_surrogate_id_is_refused_and_the_log_keeps_working(server_process, tmp_path: Path):
    server = server_process()
    server.wait_ready()
    url = server.url
    # the JSON escape arrives as text; json.loads turns it into an unencodable lone surrogate
    for field in ("request_id", "prediction_id"):
        body = b'{"' + field.encode() + b'": "\\ud800", "label": "cat"}'
        r = _post_raw(url, body, "application/json")
        assert r.status_code == 422, r.text
        assert _code(r) == f"invalid_{field}"
    for bad in ("x" * 129, "has space", "caf\u00e9", ""):
        r = httpx.post(f"{url}/feedback", json={"request_id": bad, "label": "cat"})
        assert r.status_code == 422, (bad, r.text)

    # afterwards: predictions are logged, feedback works, the log is healthy
    answers = [_predict(url, RED), _predict(url, BLUE)]
    for answer in answers:
        r = httpx.post(f"{url}/feedback", json={"request_id": answer["request_id"], "label": "cat"})
        assert r.status_code == 201, r.text  # no Authorization header: no token is set
        assert is_valid_id(r.json()["prediction_id"])
        assert r.json()["request_id"] == answer["request_id"]
    text = httpx.get(f"{url}/metrics").text
    assert prom(text, "prediction_log_healthy") == 1
    assert prom(text, "prediction_log_writer_up") == 1
    assert prom(text, "prediction_log_write_failures_total") == 0
    assert prom(text, "feedback_requests_total", outcome="invalid") == 6
    ready = httpx.get(f"{url}/health/ready")
    assert ready.status_code == 200
    assert ready.json()["prediction_log"] == "ok"
    fig = httpx.get(f"{url}/monitoring/summary").json()["model_versions"][TINY_VERSION]
    assert (fig["predictions"], fig["feedback"], fig["correct"]) == (2, 2, 1)
    assert server.terminate() == 0
    with sqlite3.connect(tmp_path / "predictions.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM predictions").fetchone()[0] == 2
        assert conn.execute("SELECT COUNT(*) FROM feedback").fetchone()[0] == 2


@pytest.mark.slow
def test_feedback_is_json_only(server_process):
    server = server_process()
    server.wait_ready()
    answer = _predict(server.url, RED)
    json_body = json.dumps({"request_id": answer["request_id"], "label": "dog"}).encode()
    # what a web page can send cross-site without a CORS preflight
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        r = _post_raw(server.url, json_body, content_type)
        assert r.status_code == 415, (content_type, r.text)
        assert _code(r) == "unsupported_media_type"
    r = _post_raw(server.url, json_body, "application/json; charset=utf-8")
    assert r.status_code == 201, r.text
    r = _post_raw(server.url, b"{" + b" " * 20_000 + b"}", "application/json")
    assert r.status_code == 413
    assert _code(r) == "payload_too_large"


@pytest.mark.slow
def test_the_api_token_guards_feedback_and_nothing_else(server_process):
    server = server_process(API_TOKEN=TOKEN)
    server.wait_ready()
    url = server.url
    answer = _predict(url, BLUE)  # predictions need no token
    body = {"request_id": answer["request_id"], "label": "dog"}

    missing = httpx.post(f"{url}/feedback", json=body)
    assert missing.status_code == 401
    assert _code(missing) == "unauthorized"
    assert missing.headers["www-authenticate"].startswith("Bearer")
    for header in ("Basic dXNlcjpwYXNz", "Bearer", f"Token {TOKEN}"):
        r = httpx.post(f"{url}/feedback", json=body, headers={"Authorization": header})
        assert r.status_code == 401, header
    for wrong in ("nope", TOKEN[:-1], TOKEN + "x", "\u00ff" * 5):
        r = httpx.post(
            f"{url}/feedback",
            json=body,
            headers={"Authorization": f"Bearer {wrong}".encode("latin-1")},
        )
        assert r.status_code == 403, wrong
        assert _code(r) == "forbidden"
    # the token is checked before the body is read: no token, no hint about the body
    assert _post_raw(url, b"not json", "text/plain").status_code == 401

    right = httpx.post(f"{url}/feedback", json=body, headers={"Authorization": f"bearer {TOKEN}"})
    assert right.status_code == 201, right.text
    assert right.json()["correct"] is True
    for path in ("/monitoring/summary", "/monitoring/drift", "/metrics", "/health/ready"):
        assert httpx.get(f"{url}{path}").status_code == 200, path
    text = httpx.get(f"{url}/metrics").text
    assert prom(text, "feedback_requests_total", outcome="unauthorized") == 5
    assert prom(text, "feedback_requests_total", outcome="forbidden") == 4
    assert server.terminate() == 0
    assert TOKEN not in server.output()  # never logged


@pytest.mark.slow
def test_with_a_token_only_its_holders_see_where_the_model_and_the_log_live(
    server_process, tiny_model: Path, tmp_path: Path
):
    """The open GET endpoints name the model's file and the prediction log's: reconnaissance
    for an anonymous caller on a server that has a token. Without a token (a private network)
    everyone sees them, as every other test here does."""
    server = server_process(API_TOKEN=TOKEN)
    server.wait_ready()
    url = server.url
    log_path = str(tmp_path / "predictions.db")
    holder = {"Authorization": f"Bearer {TOKEN}"}
    anonymous: list[dict[str, str]] = [{}, {"Authorization": "Bearer wrong-token-of-16+"}]
    for headers, shown in [(h, False) for h in anonymous] + [(holder, True)]:
        meta = httpx.get(f"{url}/metadata", headers=headers)
        summary = httpx.get(f"{url}/monitoring/summary", headers=headers)
        for r in (meta, summary):
            assert r.status_code == 200, (headers, r.text)  # still open: shown less, not refused
            assert r.headers["vary"] == "Authorization"
            assert (log_path in r.text or str(tiny_model) in r.text) is shown, (headers, r.text)
        lineage, store = meta.json()["lineage"], summary.json()["store"]
        assert lineage["source"] == (str(tiny_model) if shown else None), headers
        assert store["path"] == (log_path if shown else None), headers
        assert lineage["mlflow_run_id"] == "run-0"  # the rest of the contract is everyone's
        assert (store["backend"], store["healthy"]) == ("sqlite", True)


@pytest.mark.slow
def test_a_token_rotation_accepts_the_old_and_the_new_token(server_process):
    """API_TOKEN_PREVIOUS beside API_TOKEN: clients holding either are served while they move
    (feedback and evaluation traffic alike); any other token is still a 403."""
    old = "old-Token_for.tests~"
    server = server_process(API_TOKEN=TOKEN, API_TOKEN_PREVIOUS=old)
    server.wait_ready()
    url = server.url
    for token in (TOKEN, old):
        auth = {"Authorization": f"Bearer {token}"}
        answer = _predict(url, BLUE)
        body = {"request_id": answer["request_id"], "label": "dog"}
        r = httpx.post(f"{url}/feedback", json=body, headers=auth)
        assert r.status_code == 201, (token, r.text)
        evaluated = _predict(url, RED, **{"X-Traffic-Class": "evaluation", **auth})
        assert evaluated["label"] == "cat"
    for wrong in (TOKEN + old, old[:-1], "nope"):
        r = httpx.post(
            f"{url}/feedback",
            json={"request_id": answer["request_id"], "label": "dog"},
            headers={"Authorization": f"Bearer {wrong}"},
        )
        assert r.status_code == 403, wrong
    text = httpx.get(f"{url}/metrics").text
    assert prom(text, "feedback_requests_total", outcome="stored") == 2
    assert prom(text, "evaluation_predictions_total") == 2
    assert server.terminate() == 0
    assert old not in server.output(tail=10**9)


@pytest.mark.slow
def test_a_locked_database_gives_a_fast_503_is_reported_and_recovers(
    server_process, tmp_path: Path
):
    """A real stuck writer: another process holds the log's write lock."""
    server = server_process(STORE_TIMEOUT_S="0.5")
    server.wait_ready()
    url = server.url
    first = _predict(url, RED)
    assert httpx.post(
        f"{url}/feedback", json={"request_id": first["request_id"], "label": "cat"}
    ).is_success

    blocker = sqlite3.connect(tmp_path / "predictions.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        answer = _predict(url, BLUE)  # predictions are still answered
        started = time.monotonic()
        r = httpx.post(f"{url}/feedback", json={"request_id": answer["request_id"], "label": "dog"})
        waited = time.monotonic() - started
        assert r.status_code == 503, r.text
        assert _code(r) == "store_timeout"
        assert r.headers["retry-after"] == "1"
        assert waited < 2.0  # store_timeout_s plus overhead, not the client's own timeout
        time.sleep(1.2)  # past 2 x STORE_TIMEOUT_S without progress
        text = httpx.get(f"{url}/metrics").text
        assert prom(text, "prediction_log_writer_up") == 0
        assert prom(text, "prediction_log_healthy") == 0
        assert prom(text, "prediction_log_oldest_queued_seconds") >= 0  # present
        ready = httpx.get(f"{url}/health/ready")
        assert ready.status_code == 200  # predictions work: stay in rotation
        assert ready.json()["prediction_log"] == "stuck"
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()

    deadline = time.monotonic() + 10
    while httpx.get(f"{url}/health/ready").json()["prediction_log"] != "ok":
        assert time.monotonic() < deadline, "the log did not recover"
        time.sleep(0.05)
    r = httpx.post(f"{url}/feedback", json={"request_id": answer["request_id"], "label": "dog"})
    assert r.status_code == 201, r.text  # the retry lands once the lock is gone
    text = httpx.get(f"{url}/metrics").text
    assert prom(text, "prediction_log_healthy") == 1
    assert prom(text, "prediction_log_writer_up") == 1
    assert prom(text, "prediction_log_write_failures_total") == 0  # nothing was lost


# ---------------------------------------------------------------------- in-process
def _event(prediction_id: str, request_id: str, label: str) -> PredictionEvent:
    confidence = 0.9
    other = round(1 - confidence, 6)
    return PredictionEvent(
        prediction_id=prediction_id,
        request_id=request_id,
        timestamp=time.time(),
        model_version=TINY_VERSION,
        label=label,
        confidence=confidence,
        probabilities={"cat": confidence, "dog": other}
        if label == "cat"
        else {"cat": other, "dog": confidence},
        input_sha256=hashlib.sha256(prediction_id.encode()).hexdigest(),  # a photo each
        width=64,
        height=48,
        brightness=100.0,
        latency_ms=1.0,
        route="/predict",
    )


def test_a_reused_request_id_is_stored_twice_and_feedback_must_name_the_photo(make_app):
    async def run() -> None:
        app = make_app()
        async with serve(app) as client:
            monitor: Monitor = app.state.monitor
            # two photos answered under one client-chosen X-Request-ID
            monitor.observe(_event("p-cat", "reused", "cat"))
            monitor.observe(_event("p-dog", "reused", "dog"))
            r = await client.post("/feedback", json={"request_id": "reused", "label": "dog"})
            assert r.status_code == 409, r.text
            assert _code(r) == "ambiguous_request_id"
            assert "prediction_id" in r.json()["error"]["message"]
            r = await client.post("/feedback", json={"prediction_id": "p-dog", "label": "dog"})
            assert r.status_code == 201, r.text
            assert r.json() == {
                "prediction_id": "p-dog",
                "request_id": "reused",
                "label": "dog",
                "predicted_label": "dog",  # the dog photo, not the cat one
                "correct": True,
                "model_version": TINY_VERSION,
            }
            for body, status, code in [
                ({"prediction_id": "nope", "label": "dog"}, 404, "unknown_prediction_id"),
                ({"request_id": "nope", "label": "dog"}, 404, "unknown_request_id"),
                ({"label": "dog"}, 422, "missing_id"),
                (
                    {"request_id": "reused", "prediction_id": "p-dog", "label": "dog"},
                    422,
                    "missing_id",
                ),
                ({"prediction_id": 7, "label": "dog"}, 422, "invalid_prediction_id"),
            ]:
                r = await client.post("/feedback", json=body)
                assert (r.status_code, _code(r)) == (status, code), body
            fig = (await client.get("/monitoring/summary")).json()["model_versions"][TINY_VERSION]
            assert fig["predictions"] == 2  # each stored and counted once
            assert fig["confusion"] == {"dog": {"dog": 1}}
            text = (await client.get("/metrics")).text
            assert prom(text, "prediction_log_write_failures_total") == 0
            assert prom(text, "feedback_requests_total", outcome="ambiguous") == 1

    asyncio.run(run())


def test_a_stuck_writer_answers_503_in_time_shows_on_metrics_and_ready_then_recovers(make_app):
    async def run() -> None:
        app = make_app(store_timeout_s=0.3)
        async with serve(app) as client:
            monitor: Monitor = app.state.monitor
            monitor.observe(_event("p-1", "r-1", "cat"))
            release = threading.Event()
            entered = threading.Event()

            def hold() -> None:  # the writer thread blocks here: a stuck disk
                entered.set()
                release.wait(30)

            monitor.store.fault_hook = hold
            assert await asyncio.to_thread(entered.wait, 5)
            monitor.observe(_event("p-2", "r-2", "dog"))
            started = time.monotonic()
            r = await client.post("/feedback", json={"prediction_id": "p-2", "label": "dog"})
            waited = time.monotonic() - started
            assert r.status_code == 503, r.text
            assert _code(r) == "store_timeout"
            assert r.headers["retry-after"] == "1"
            assert 0.25 < waited < 1.0
            await asyncio.sleep(0.5)  # no progress for 2 x store_timeout_s: stuck
            text = (await client.get("/metrics")).text
            assert prom(text, "prediction_log_writer_up") == 0
            assert prom(text, "prediction_log_healthy") == 0
            assert prom(text, "prediction_log_oldest_queued_seconds") > 0.6
            ready = await client.get("/health/ready")
            assert ready.status_code == 200
            assert ready.json()["prediction_log"] == "stuck"
            summary = (await client.get("/monitoring/summary")).json()["store"]
            assert (summary["status"], summary["writer_up"]) == ("stuck", False)

            monitor.store.fault_hook = None
            release.set()
            r = await client.post("/feedback", json={"prediction_id": "p-2", "label": "dog"})
            assert r.status_code == 201, r.text
            text = (await client.get("/metrics")).text
            assert prom(text, "prediction_log_writer_up") == 1
            assert prom(text, "prediction_log_healthy") == 1
            assert (await client.get("/health/ready")).json()["prediction_log"] == "ok"

    asyncio.run(run())


def test_a_body_that_never_finishes_gets_408(make_app):
    async def run() -> tuple[list[dict], float]:
        app = make_app(body_timeout_s=0.3)
        async with serve(app):
            scope = {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "method": "POST",
                "scheme": "http",
                "path": "/feedback",
                "raw_path": b"/feedback",
                "query_string": b"",
                "root_path": "",
                "headers": [(b"host", b"test"), (b"content-type", b"application/json")],
                "client": ("127.0.0.1", 40000),
                "server": ("test", 80),
            }
            chunks = [{"type": "http.request", "body": b'{"request_id": ', "more_body": True}]

            async def receive() -> dict:
                if chunks:
                    return chunks.pop()
                await asyncio.sleep(60)  # the rest of the body never comes
                return {"type": "http.disconnect"}

            sent: list[dict] = []

            async def send(message: dict) -> None:
                sent.append(message)

            started = time.monotonic()
            await asyncio.wait_for(app(scope, receive, send), 10)
            return sent, time.monotonic() - started

    sent, waited = asyncio.run(run())
    assert sent[0]["status"] == 408
    assert b'"request_timeout"' in sent[1]["body"]
    assert 0.25 < waited < 3.0
