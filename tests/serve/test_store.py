"""The SQLite prediction log (server.store) and the Monitor's figures, in-process."""

import asyncio
import json
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from server import drift
from server.contract import ModelContract
from server.monitoring import Monitor, PredictionEvent
from server.preprocessing import PreprocessSpec
from server.store import SqliteStore, StoreUnavailableError, connect, iter_aggregates

pytestmark = pytest.mark.serve


def _event(i: int, label: str = "cat", confidence: float = 0.9, version: str = "v1"):
    other = 1.0 - confidence
    probs = (
        {"cat": confidence, "dog": other} if label == "cat" else {"cat": other, "dog": confidence}
    )
    return PredictionEvent(
        request_id=f"req-{i}",
        timestamp=time.time(),
        model_version=version,
        label=label,
        confidence=confidence,
        probabilities=probs,
        input_sha256="0" * 64,
        width=320,
        height=240,
        brightness=120.0,
        latency_ms=3.5,
        route="/predict",
    )


def _wait(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


class Counts:
    def __init__(self) -> None:
        self.failures = 0
        self.drops = 0

    def fail(self, n: int) -> None:
        self.failures += n

    def drop(self, n: int) -> None:
        self.drops += n


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "nested" / "dir" / "predictions.db"  # parents are created by the store


def test_predictions_and_feedback_are_written_in_wal_mode(db_path: Path):
    store = SqliteStore(db_path)
    store.start()
    assert store.healthy
    for i in range(50):
        assert store.record(_event(i))
    result = store.submit_feedback("req-7", "dog", time.time()).result(10)
    assert result is not None
    assert (result.predicted_label, result.true_label, result.model_version) == ("cat", "dog", "v1")
    assert store.submit_feedback("no-such-id", "dog", time.time()).result(10) is None
    store.stop()
    conn = sqlite3.connect(db_path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT COUNT(*) FROM predictions").fetchone()[0] == 50
    row = conn.execute(
        "SELECT label, confidence, probabilities, width, height, route FROM predictions "
        "WHERE request_id = 'req-3'"
    ).fetchone()
    assert row[0] == "cat"
    assert row[1] == pytest.approx(0.9)
    assert json.loads(row[2]) == pytest.approx({"cat": 0.9, "dog": 0.1})
    assert row[3:] == (320, 240, "/predict")
    assert conn.execute("SELECT request_id, true_label FROM feedback").fetchall() == [
        ("req-7", "dog")
    ]


def test_feedback_finds_a_prediction_still_waiting_in_the_queue(db_path: Path):
    store = SqliteStore(db_path)
    store.start()
    # another writer holds the database, so the writer thread cannot commit anything yet
    blocker = connect(db_path)
    blocker.execute("BEGIN IMMEDIATE")
    store.record(_event(1))
    future = store.submit_feedback("req-1", "cat", time.time())
    time.sleep(0.3)
    assert not future.done()  # the prediction has not been written
    blocker.execute("ROLLBACK")
    result = future.result(15)
    assert result is not None
    assert result.predicted_label == "cat"
    store.stop()


def test_full_queue_drops_and_counts_instead_of_blocking(db_path: Path):
    counts = Counts()
    store = SqliteStore(db_path, max_queue=5, on_drop=counts.drop)
    store.start()
    blocker = connect(db_path)
    blocker.execute("BEGIN IMMEDIATE")
    store.record(_event(0))
    assert _wait(lambda: store.queued() == 0)  # the writer holds it, waiting for the lock
    started = time.monotonic()
    accepted = [store.record(_event(i)) for i in range(1, 11)]
    assert time.monotonic() - started < 1.0  # never waits for the disk
    assert accepted == [True] * 5 + [False] * 5
    assert counts.drops == 5
    blocker.execute("ROLLBACK")
    store.stop()
    conn = sqlite3.connect(db_path)
    assert conn.execute("SELECT COUNT(*) FROM predictions").fetchone()[0] == 6


def test_unopenable_location_counts_every_prediction_as_failed(tmp_path: Path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("a file where a directory should be")
    counts = Counts()
    store = SqliteStore(not_a_dir / "predictions.db", on_write_failure=counts.fail)
    store.start()  # does not raise
    assert not store.healthy
    assert store.open_error is not None
    assert not store.record(_event(1))
    assert not store.record(_event(2))
    assert counts.failures == 2
    with pytest.raises(StoreUnavailableError):
        store.submit_feedback("req-1", "cat", time.time()).result(5)
    store.stop()


def test_full_disk_counts_every_lost_prediction(db_path: Path):
    counts = Counts()
    # a database capped at a few pages behaves like a full disk (SQLITE_FULL)
    store = SqliteStore(db_path, max_page_count=8, batch_size=50, on_write_failure=counts.fail)
    store.start()
    for i in range(5):
        store.record(_event(i))
    assert _wait(lambda: store.rows_written == 5)
    for i in range(5, 2000):
        store.record(_event(i))
    store.stop()
    written = sqlite3.connect(db_path).execute("SELECT COUNT(*) FROM predictions").fetchone()[0]
    assert counts.failures > 0
    assert written >= 5  # what was stored before the disk filled up is kept
    assert written + counts.failures == 2000  # every prediction is either stored or counted


def test_sql_aggregates_bin_confidence_exactly_like_drift(db_path: Path):
    store = SqliteStore(db_path)
    store.start()
    values = [0.5, 0.6, 0.8999, 0.9, 0.95, 0.999, 1.0, 0.73]
    for i, c in enumerate(values):
        store.record(_event(i, confidence=c))
    store.stop()
    predictions, _ = iter_aggregates(sqlite3.connect(db_path), drift.CONFIDENCE_EDGES)
    counts = [0] * (len(drift.CONFIDENCE_EDGES) - 1)
    for _version, _label, b, n, _sum in predictions:
        counts[b] += n
    assert counts == drift.bin_counts(values, drift.CONFIDENCE_EDGES).tolist()


def _contract(reference: dict | None = None) -> ModelContract:
    extra = {"reference_stats": reference} if reference is not None else {}
    return ModelContract(
        class_names=("cat", "dog"),
        input_size=32,
        preprocessing=PreprocessSpec(32, 36),
        model_name="tiny",
        model_version="v1",
        mlflow_run_id="",
        git_commit="",
        data_version="",
        exported_at="",
        extra=extra,
    )


class _Settings:
    def __init__(self, path: Path, window: int = 500) -> None:
        self.prediction_log_path = str(path)
        self.drift_window = window


def test_monitor_summary_metrics_and_restart(db_path: Path):
    async def first_run() -> dict:
        registry = CollectorRegistry()
        monitor = Monitor(_Settings(db_path), _contract(), registry)
        await monitor.start()
        for i in range(6):
            monitor.observe(_event(i, "cat", 0.97))
        for i in range(6, 10):
            monitor.observe(_event(i, "dog", 0.62))
        # truth: 0-4 cat, 5 dog (wrong), 6-8 dog, 9 cat (wrong)
        truth = {
            0: "cat",
            1: "cat",
            2: "cat",
            3: "cat",
            4: "cat",
            5: "dog",
            6: "dog",
            7: "dog",
            8: "dog",
            9: "cat",
        }
        for i, label in truth.items():
            assert await monitor.add_feedback(f"req-{i}", label) is not None
        # a correction replaces the earlier label instead of counting twice
        assert await monitor.add_feedback("req-9", "dog") is not None
        assert await monitor.add_feedback("req-9", "cat") is not None
        summary = monitor.summary()
        text = generate_latest(registry).decode()
        await monitor.stop()
        return {"summary": summary, "metrics": text}

    out = asyncio.run(first_run())
    fig = out["summary"]["model_versions"]["v1"]
    assert fig["predictions"] == 10
    assert fig["labels"] == {"cat": 6, "dog": 4}
    assert fig["feedback"] == 10
    assert fig["correct"] == 8
    assert fig["accuracy"] == pytest.approx(0.8)
    assert fig["confusion"] == {"cat": {"cat": 5, "dog": 1}, "dog": {"cat": 1, "dog": 3}}
    expected_bins = drift.bin_counts([0.97] * 6 + [0.62] * 4, drift.CONFIDENCE_EDGES).tolist()
    assert fig["confidence"]["counts"] == expected_bins
    text = out["metrics"]
    assert 'monitor_live_accuracy{model_version="v1"} 0.8' in text
    assert 'monitor_logged_predictions{label="cat",model_version="v1"} 6.0' in text
    assert (
        'monitor_confusion{model_version="v1",predicted_label="dog",true_label="cat"} 1.0' in text
    )
    assert 'monitor_confidence_count{model_version="v1"} 10.0' in text
    assert "prediction_log_write_failures_total 0.0" in text

    async def second_run() -> dict:
        monitor = Monitor(_Settings(db_path), _contract(), CollectorRegistry())
        await monitor.start()
        known = await monitor.add_feedback("req-3", "cat")
        summary = monitor.summary()
        await monitor.stop()
        return {"known": known, "summary": summary}

    again = asyncio.run(second_run())
    assert again["known"] is not None  # a request id answered before the restart
    assert again["summary"]["model_versions"]["v1"] == fig  # figures are rebuilt from disk


def test_monitor_drift_reports_missing_reference_and_scores_with_one(db_path: Path):
    async def scores(reference: dict | None, n: int) -> dict:
        monitor = Monitor(_Settings(db_path, window=100), _contract(reference), CollectorRegistry())
        await monitor.start()
        for i in range(n):
            monitor.observe(_event(i, "cat", 0.55))
        report = monitor.drift()
        await monitor.stop()
        return report

    no_ref = asyncio.run(scores(None, 50))
    assert no_ref["status"] == "no_reference"
    assert no_ref["reference"] is False
    assert no_ref["features"] == {}
    ref = drift.build_reference_stats(
        class_names=["cat", "dog"],
        train_labels=["cat", "dog"],
        val_probabilities=np.array([[0.99, 0.01], [0.02, 0.98]] * 50),
        widths=[320] * 100,
        heights=[240] * 100,
        brightness=[120.0] * 100,
    )
    few = asyncio.run(scores(ref, 5))
    assert few["status"] == "insufficient_data"
    report = asyncio.run(scores(ref, 300))
    assert report["window"] == {"size": 100, "capacity": 100}
    assert report["features"]["confidence"]["level"] == "significant"
    assert report["features"]["width"]["psi"] == pytest.approx(0.0)  # same sizes as reference
    assert report["status"] == "significant"


def test_observe_never_raises_and_keeps_working_after_bad_input(db_path: Path):
    async def run() -> dict:
        monitor = Monitor(_Settings(db_path), _contract(), CollectorRegistry())
        await monitor.start()
        monitor.observe(object())  # type: ignore[arg-type]  # garbage in: logged once, no raise
        monitor.observe(_event(1))
        await monitor.stop()
        return monitor.summary()

    summary = asyncio.run(run())
    assert summary["model_versions"]["v1"]["predictions"] == 1


def test_malformed_reference_is_reported_and_metrics_still_render(db_path: Path):
    reference = {"confidence": {"edges": "not a list", "counts": [1, 2]}, "width": 3}

    async def run() -> tuple[dict, str]:
        registry = CollectorRegistry()
        monitor = Monitor(_Settings(db_path), _contract(reference), registry)
        await monitor.start()
        for i in range(40):
            monitor.observe(_event(i))
        report = monitor.drift()
        text = generate_latest(registry).decode()
        await monitor.stop()
        return report, text

    report, text = asyncio.run(run())
    assert report["status"] == "invalid_reference"
    assert report["features"] == {}
    assert "drift_window_size 40.0" in text
