"""The shared store suite: every test runs on SQLite and on a real PostgreSQL (a throwaway
cluster, tests/serve/pg_server.py), so both backends keep the same promises: bounded queue,
drops counted, feedback behind its prediction, row-by-row retry, restarts of a dead writer,
stuck detection, versioned schema, retention, and the Monitor's figures on top.

SQLite-only behaviour (WAL, a full disk, the v0 -> v1 migration) is in test_store.py;
PostgreSQL-only behaviour (outages, replicas sharing one database) in test_store_postgres.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import prom
from prometheus_client import CollectorRegistry, generate_latest
from store_backends import BACKENDS, Backend, make_backend
from store_helpers import Counts
from store_helpers import event as _event
from store_helpers import wait_for as _wait

from catsdogs import drift
from catsdogs.contract import ModelContract
from catsdogs.preprocessing import PreprocessSpec
from server import store
from server.live_figures import LiveFigures
from server.monitor import Monitor, PredictionEvent
from server.store import (
    AmbiguousRequestIdError,
    StoreTimeoutError,
    StoreUnavailableError,
    WriterStore,
)
from server.store_sqlite import iter_aggregates

pytestmark = pytest.mark.serve

DAY = 86_400.0


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return make_backend(request.param, tmp_path, lambda: request.getfixturevalue("postgres"))


class Gate:
    """A fault hook that holds the writer thread until opened (a stuck disk, a deadlock)."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.entered = threading.Event()

    def __call__(self) -> None:
        self.entered.set()
        self.open.wait(30)


def _kill_once(s: WriterStore):
    def hook() -> None:
        s.fault_hook = None
        raise RuntimeError("writer killed by the test")

    return hook


# ---------------------------------------------------------------------- writing and feedback
def test_predictions_and_feedback_are_stored(backend: Backend):
    s = backend.store()
    s.start()
    assert s.status() == "ok"
    assert s.backend == backend.name
    assert s.shared is backend.shared
    for i in range(50):
        assert s.record(_event(i))
    result = s.submit_feedback("dog", time.time(), prediction_id="req-7").result(10)
    assert result is not None
    assert (result.predicted_label, result.true_label, result.model_version) == ("cat", "dog", "v1")
    assert (result.prediction_id, result.request_id) == ("req-7", "req-7")
    assert s.submit_feedback("dog", time.time(), prediction_id="no-such-id").result(10) is None
    assert s.submit_feedback("dog", time.time(), request_id="no-such-id").result(10) is None
    with pytest.raises(ValueError, match="exactly one"):
        s.submit_feedback("dog", time.time())  # neither id
    s.stop()
    assert backend.count() == 50
    row = backend.rows(
        "SELECT request_id, label, confidence, probabilities, width, height, route "
        "FROM predictions WHERE prediction_id = 'req-3'"
    )[0]
    assert tuple(row[:2]) == ("req-3", "cat")
    assert row[2] == pytest.approx(0.9)
    assert json.loads(row[3]) == pytest.approx({"cat": 0.9, "dog": 0.1})
    assert tuple(row[4:]) == (320, 240, "/predict")
    assert backend.rows("SELECT prediction_id, true_label FROM feedback") == [("req-7", "dog")]


def test_feedback_finds_a_prediction_still_waiting_in_the_queue(backend: Backend):
    s = backend.store()
    s.start()
    with backend.hold_writes():  # the writer thread cannot commit anything yet
        s.record(_event(1))
        future = s.submit_feedback("cat", time.time(), request_id="req-1")
        time.sleep(0.3)
        assert not future.done()  # the prediction has not been written
    result = future.result(15)
    assert result is not None
    assert result.predicted_label == "cat"
    s.stop()


def test_full_queue_drops_and_counts_instead_of_blocking(backend: Backend):
    counts = Counts()
    s = backend.store(max_queue=5, on_drop=counts.drop)
    s.start()
    with backend.hold_writes():
        s.record(_event(0))
        assert _wait(lambda: s.queued() == 0)  # the writer holds it, waiting for the lock
        started = time.monotonic()
        accepted = [s.record(_event(i)) for i in range(1, 11)]
        assert time.monotonic() - started < 1.0  # never waits for the database
        assert accepted == [True] * 5 + [False] * 5
        assert counts.drops == 5
        assert s.status() == "behind"  # the queue is full: drops are happening
    s.stop()
    assert backend.count() == 6


def test_sql_aggregates_bin_confidence_exactly_like_drift(backend: Backend):
    s = backend.store()
    s.start()
    values = [0.5, 0.6, 0.8999, 0.9, 0.95, 0.999, 1.0, 0.73]
    for i, c in enumerate(values):
        s.record(_event(i, confidence=c))
    s.stop()
    with backend.connection() as conn:
        predictions, _ = iter_aggregates(conn, drift.CONFIDENCE_EDGES)
    counts = [0] * (len(drift.CONFIDENCE_EDGES) - 1)
    for _version, _label, b, n, _sum in predictions:
        counts[b] += n
    assert counts == drift.bin_counts(values, drift.CONFIDENCE_EDGES).tolist()


# ---------------------------------------------------------------------- a writer that survives
# what each backend calls the error of a value it cannot store
BAD_ROW_ERRORS = {
    "sqlite": ["OverflowError", "TypeError", "UnicodeEncodeError"],
    "postgresql": ["NumericValueOutOfRange", "TypeError", "UnicodeEncodeError"],
}


def test_a_bad_row_costs_only_itself_and_each_kind_is_logged_once(backend: Backend, caplog):
    counts = Counts()
    committed: list[str] = []
    s = backend.store(
        on_write_failure=counts.fail,
        on_predictions=lambda rows: committed.extend(r.prediction_id for r in rows),
    )
    s.start()
    bad = {
        2: {"label": "\ud800"},  # a lone surrogate: not encodable (UnicodeEncodeError)
        4: {"probabilities": {"\ud800": object()}},  # not JSON (TypeError)
        6: {"width": 2**70},  # too large for an INTEGER
        8: {"label": "\udfff"},  # a second UnicodeEncodeError: not logged again
    }
    with caplog.at_level(logging.ERROR, logger="server.store"):
        with backend.hold_writes():  # so every row below lands in ONE batch
            s.record(_event(0))
            assert _wait(lambda: s.queued() == 0)
            for i in range(1, 10):
                s.record(_event(i, **bad.get(i, {})))
            future = s.submit_feedback("dog", time.time(), prediction_id="req-3")
        assert future.result(15).predicted_label == "cat"
        s.record(_event(10))
        assert _wait(lambda: s.rows_written == 7)
    assert s.writer_alive()
    assert s.status() == "ok"  # bad data is not a failing database
    assert counts.failures == 4
    s.stop()
    stored = backend.ids()
    assert sorted(int(r.split("-")[1]) for r in stored) == [0, 1, 3, 5, 7, 9, 10]
    assert sorted(committed) == sorted(stored)  # figures saw only stored rows
    messages = [r.getMessage() for r in caplog.records if "cannot be stored" in r.getMessage()]
    kinds = sorted(m.split("(")[1].split(":")[0] for m in messages)
    assert kinds == BAD_ROW_ERRORS[backend.name]


def test_a_duplicate_prediction_id_is_a_failed_write_not_a_second_count(backend: Backend):
    counts = Counts()
    figures = LiveFigures()
    s = backend.store(on_write_failure=counts.fail, on_predictions=figures.add_predictions)
    s.start()
    s.record(_event(1))
    s.record(_event(1, "dog"))  # same prediction_id: cannot normally happen
    s.record(_event(2))
    s.stop()
    assert counts.failures == 1
    assert figures.snapshot()["v1"]["predictions"] == 2
    assert backend.count() == 2


def test_a_request_id_shared_by_two_images_is_ambiguous(backend: Backend):
    s = backend.store()
    s.start()
    s.record(_event(1, "cat", request_id="reused"))
    s.record(_event(2, "dog", request_id="reused"))
    with pytest.raises(AmbiguousRequestIdError):
        s.submit_feedback("dog", time.time(), request_id="reused").result(10)
    second = s.submit_feedback("dog", time.time(), prediction_id="req-2").result(10)
    assert (second.prediction_id, second.request_id, second.predicted_label) == (
        "req-2",
        "reused",
        "dog",
    )
    s.stop()
    assert backend.count() == 2
    assert backend.rows("SELECT prediction_id FROM feedback") == [("req-2",)]


def test_feedback_by_the_request_id_of_a_retried_photo_labels_its_last_answer(backend: Backend):
    """A client that retries keeps its X-Request-ID: the same photo is logged twice under it.
    Feedback by that id was 409 for ever; it labels the last answer, once."""
    s = backend.store()
    s.start()
    s.record(_event(1, "cat", request_id="retried", ts=time.time() - 5))
    s.record(_event(2, "dog", request_id="retried", input_sha256=_event(1).input_sha256))
    done = s.submit_feedback("dog", time.time(), request_id="retried").result(10)
    assert (done.prediction_id, done.predicted_label, done.previous_label) == ("req-2", "dog", None)
    again = s.submit_feedback("cat", time.time(), request_id="retried").result(10)
    assert (again.prediction_id, again.previous_label) == ("req-2", "dog")  # replaced, not added
    s.stop()
    assert backend.rows("SELECT prediction_id, true_label FROM feedback") == [("req-2", "cat")]


def test_a_killed_writer_is_restarted_counted_and_keeps_what_was_queued(backend: Backend, caplog):
    restarts: list[int] = []
    s = backend.store(on_restart=lambda: restarts.append(1))
    s.start()
    s.record(_event(0))
    assert _wait(lambda: s.rows_written == 1)
    time.sleep(store.RESTART_MIN_INTERVAL_S)  # a writer that dies at once is not respun

    with caplog.at_level(logging.ERROR, logger="server.store"):
        s.fault_hook = _kill_once(s)
        assert _wait(lambda: not s.writer_alive())
        assert s.record(_event(1))  # noticed here: the writer is restarted
        assert s.writer_alive()
        assert _wait(lambda: s.rows_written == 2)
    assert s.restarts == 1
    assert restarts == [1]
    assert s.status() == "ok"
    result = s.submit_feedback("cat", time.time(), prediction_id="req-1").result(10)
    assert result is not None
    s.stop()
    assert backend.count() == 2
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "writer thread died" in logged
    assert "restarted it" in logged


def test_a_writer_that_dies_at_once_is_dead_until_it_may_restart(backend: Backend):
    s = backend.store()
    s.fault_hook = lambda: (_ for _ in ()).throw(RuntimeError("dies at start"))
    s.start()
    assert _wait(lambda: not s.writer_alive())
    assert s.status() == "dead"  # not respun in a busy loop
    with pytest.raises(StoreUnavailableError):
        s.submit_feedback("cat", time.time(), request_id="req-1").result(1)
    s.fault_hook = None
    assert _wait(lambda: s.status() == "ok", timeout=5)  # the next check restarts it
    assert s.restarts == 1
    s.stop()


def test_a_stuck_writer_is_reported_and_recovers(backend: Backend):
    gate = Gate()
    s = backend.store(timeout_s=0.2)
    s.start()
    s.fault_hook = gate
    assert gate.entered.wait(5)
    s.record(_event(1))
    future = s.submit_feedback("cat", time.time(), prediction_id="req-1")
    assert s.status() in {"ok", "behind"}  # not yet: stuck means no progress for 2 x 0.2 s
    assert _wait(lambda: s.status() == "stuck", timeout=3)
    assert s.writer_alive()
    assert s.writer_stuck()
    assert _wait(lambda: s.oldest_queued_s() > 0.4)
    assert not future.done()
    s.fault_hook = None
    gate.open.set()
    assert future.result(5) is not None
    assert _wait(lambda: s.status() == "ok")
    assert s.oldest_queued_s() == 0.0
    s.stop()


def test_feedback_withdrawn_after_a_timeout_is_not_applied(backend: Backend):
    gate = Gate()
    s = backend.store()
    s.start()
    s.record(_event(1))
    assert _wait(lambda: s.rows_written == 1)
    s.fault_hook = gate
    assert gate.entered.wait(5)
    future = s.submit_feedback("dog", time.time(), prediction_id="req-1")
    assert future.cancel()  # what Monitor.add_feedback does when store_timeout_s passes
    s.fault_hook = None
    gate.open.set()
    s.record(_event(2))
    assert _wait(lambda: s.rows_written == 2)
    s.stop()
    assert backend.count("feedback") == 0


def test_stop_answers_every_waiting_feedback_even_when_the_writer_is_stuck(backend: Backend):
    gate = Gate()
    s = backend.store()
    s.start()
    s.fault_hook = gate
    assert gate.entered.wait(5)
    future = s.submit_feedback("dog", time.time(), prediction_id="req-1")
    s.stop(timeout=0.3)
    with pytest.raises(StoreUnavailableError):
        future.result(1)
    gate.open.set()


# ---------------------------------------------------------------------- schema versions
def test_a_log_from_a_newer_server_is_not_touched(backend: Backend):
    backend.write_newer_schema()
    counts = Counts()
    s = backend.store(on_write_failure=counts.fail)
    s.start()
    assert s.status() == "unavailable"
    assert "schema version 99" in (s.open_error or "")
    assert not s.record(_event(1))
    assert counts.failures == 1
    with pytest.raises(StoreUnavailableError):
        s.submit_feedback("cat", time.time(), request_id="req-1").result(5)
    s.stop()


def test_reopening_a_current_log_keeps_every_row(backend: Backend):
    s = backend.store()
    s.start()
    s.record(_event(1))
    s.stop()
    figures = LiveFigures()
    again = backend.store(on_open=figures.load)  # the schema is current: nothing to migrate
    again.start()
    again.record(_event(2))
    again.stop()
    assert backend.ids() == {"req-1", "req-2"}
    assert figures.snapshot()["v1"]["predictions"] == 1  # loaded at open, before the new row


# ---------------------------------------------------------------------- retention
def _seed(backend: Backend, events: list[PredictionEvent], feedback: dict[str, str]) -> None:
    s = backend.store()
    s.start()
    for e in events:
        s.record(e)
    for pid, label in feedback.items():
        assert s.submit_feedback(label, time.time(), prediction_id=pid).result(10) is not None
    s.stop()


def _figures_equal(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for version in a:
        x, y = dict(a[version]), dict(b[version])
        mx, my = x["confidence"].pop("mean"), y["confidence"].pop("mean")
        if x != y or (mx is None) != (my is None) or (mx is not None and abs(mx - my) > 1e-9):
            return False
    return True


def test_retention_by_age_prunes_old_rows_and_their_feedback_at_start(backend: Backend):
    now = time.time()
    old = [_event(i, "dog", 0.7, ts=now - 10 * DAY - i) for i in range(30)]
    new = [_event(100 + i, "cat", 0.95, ts=now - 60 * i) for i in range(5)]
    _seed(backend, old + new, {"req-3": "dog", "req-101": "dog"})

    figures = LiveFigures()
    pruned: list = []
    s = backend.store(
        retention_days=7,
        prune_chunk=8,  # several small transactions, not one long one
        on_open=figures.load,
        on_predictions=figures.add_predictions,
        on_pruned=lambda rows: (figures.remove(rows), pruned.extend(rows)),
    )
    s.start()
    assert _wait(lambda: s.rows_pruned == 30)
    s.record(_event(200, "dog", 0.8))
    assert _wait(lambda: s.rows_written == 1)
    s.stop()

    assert backend.ids() == {f"req-{100 + i}" for i in range(5)} | {"req-200"}
    assert backend.rows("SELECT prediction_id FROM feedback") == [("req-101",)]
    assert len(pruned) == 30
    assert sum(1 for p in pruned if p.true_label == "dog") == 1
    # the cached figures describe the retained log exactly, as a fresh load would
    fresh = LiveFigures()
    with backend.connection() as conn:
        fresh.load(conn)
    assert _figures_equal(figures.snapshot(), fresh.snapshot())
    assert figures.snapshot()["v1"]["labels"] == {"cat": 5, "dog": 1}


def test_retention_by_rows_keeps_the_newest_and_runs_after_inserts(backend: Backend):
    now = time.time()
    _seed(backend, [_event(i, ts=now - 1000 + i) for i in range(40)], {"req-0": "cat"})
    s = backend.store(max_rows=10, prune_every_rows=20, prune_chunk=7)
    s.start()
    assert _wait(lambda: s.rows_pruned == 30)
    assert backend.ids() == {f"req-{i}" for i in range(30, 40)}
    gate = Gate()
    s.fault_hook = gate  # the 25 rows below go in as one batch
    assert gate.entered.wait(5)
    for i in range(100, 125):  # past prune_every_rows, long before the minute is up
        s.record(_event(i))
    s.fault_hook = None
    gate.open.set()
    assert _wait(lambda: s.rows_pruned == 55)
    s.stop()
    assert backend.ids() == {f"req-{i}" for i in range(115, 125)}
    assert backend.count("feedback") == 0


def test_zero_retention_keeps_everything(backend: Backend):
    now = time.time()
    _seed(backend, [_event(i, ts=now - 1000 * DAY) for i in range(5)], {})
    s = backend.store(retention_days=0, max_rows=0)
    s.start()
    time.sleep(0.2)
    s.stop()
    assert s.rows_pruned == 0
    assert backend.count() == 5


# ---------------------------------------------------------------------- the Monitor
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


async def _settled(monitor: Monitor, rows: int | None = None) -> None:
    """Wait until ``rows`` predictions are written; a shared store then re-reads its figures
    at once (the periodic refresher is the same call, on its own thread)."""
    if rows is not None:
        await asyncio.to_thread(_wait, lambda: monitor.store.rows_written >= rows)
    if monitor.shared:
        assert await asyncio.to_thread(monitor.store.refresh)


def test_monitor_summary_metrics_and_restart(backend: Backend):
    async def first_run() -> dict:
        registry = CollectorRegistry()
        monitor = Monitor(backend.settings(), _contract(), registry)
        await monitor.start()
        for i in range(6):
            monitor.observe(_event(i, "cat", 0.97))
        for i in range(6, 10):
            monitor.observe(_event(i, "dog", 0.62))
        # truth: 0-4 cat, 5 dog (wrong), 6-8 dog, 9 cat (wrong)
        truth = ["cat"] * 5 + ["dog"] * 4 + ["cat"]
        for i, label in enumerate(truth):
            assert await monitor.add_feedback(label, prediction_id=f"req-{i}") is not None
        # a correction replaces the earlier label instead of counting twice
        assert await monitor.add_feedback("dog", request_id="req-9") is not None
        assert await monitor.add_feedback("cat", prediction_id="req-9") is not None
        await _settled(monitor)
        summary = monitor.summary()
        text = generate_latest(registry).decode()
        assert monitor.log_status() == "ok"
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
    state = out["summary"]["store"]
    assert (state["status"], state["healthy"], state["writer_up"]) == ("ok", True, True)
    assert (state["backend"], state["shared"]) == (backend.name, backend.shared)
    assert state["retention"] == {"days": 90.0, "max_rows": 0}
    text = out["metrics"]
    assert prom(text, "monitor_live_accuracy", model_version="v1") == pytest.approx(0.8)
    assert prom(text, "monitor_logged_predictions", label="cat", model_version="v1") == 6
    assert prom(text, "monitor_confusion", predicted_label="dog", true_label="cat") == 1
    assert prom(text, "monitor_confidence_count", model_version="v1") == 10
    assert prom(text, "prediction_log_write_failures_total") == 0
    assert prom(text, "prediction_log_healthy") == 1
    assert prom(text, "prediction_log_writer_up") == 1
    assert prom(text, "prediction_log_writer_restarts_total") == 0
    assert prom(text, "prediction_log_pruned_total") == 0
    assert "prediction_log_oldest_queued_seconds 0.0" in text
    assert ("monitor_figures_age_seconds" in text) is backend.shared

    async def second_run() -> dict:
        monitor = Monitor(backend.settings(), _contract(), CollectorRegistry())
        await monitor.start()
        known = await monitor.add_feedback("cat", request_id="req-3")
        summary = monitor.summary()
        await monitor.stop()
        return {"known": known, "summary": summary}

    again = asyncio.run(second_run())
    assert again["known"] is not None  # a prediction answered before the restart
    assert again["summary"]["model_versions"]["v1"] == fig  # figures are rebuilt from the log


def test_monitor_waits_on_a_stuck_writer_only_until_the_store_timeout(backend: Backend):
    async def run() -> tuple[float, str, str, str]:
        registry = CollectorRegistry()
        monitor = Monitor(backend.settings(store_timeout_s=0.3), _contract(), registry)
        await monitor.start()
        monitor.observe(_event(1))
        await _settled(monitor, rows=1)
        gate = Gate()
        monitor.store.fault_hook = gate
        await asyncio.to_thread(gate.entered.wait, 5)
        started = time.monotonic()
        with pytest.raises(StoreTimeoutError):
            await monitor.add_feedback("dog", prediction_id="req-1")
        waited = time.monotonic() - started
        await asyncio.sleep(0.4)  # past 2 x store_timeout_s with the feedback... withdrawn
        monitor.observe(_event(2))  # queued work, no progress
        await asyncio.sleep(0.7)
        stuck = monitor.log_status()
        text = generate_latest(registry).decode()
        monitor.store.fault_hook = None
        gate.open.set()
        assert (await monitor.add_feedback("cat", prediction_id="req-2")) is not None
        after = monitor.log_status()
        await monitor.stop()
        return waited, stuck, text, after

    waited, stuck, text, after = asyncio.run(run())
    assert 0.25 < waited < 1.0
    assert stuck == "stuck"
    assert prom(text, "prediction_log_writer_up") == 0
    assert prom(text, "prediction_log_healthy") == 0
    assert prom(text, "prediction_log_oldest_queued_seconds") > 0.6
    assert after == "ok"
    assert backend.count("feedback") == 1  # the withdrawn feedback was never applied


def test_monitor_counts_pruned_rows_and_restarts(backend: Backend):
    now = time.time()
    _seed(backend, [_event(i, ts=now - 5 * DAY) for i in range(4)], {"req-0": "cat"})

    async def run() -> tuple[dict, str]:
        registry = CollectorRegistry()
        settings = backend.settings(prediction_log_retention_days=1)
        monitor = Monitor(settings, _contract(), registry)
        await monitor.start()
        await asyncio.to_thread(_wait, lambda: monitor.store.rows_pruned == 4)
        monitor.observe(_event(10))
        await _settled(monitor, rows=1)
        await asyncio.sleep(store.RESTART_MIN_INTERVAL_S)
        monitor.store.fault_hook = _kill_once(monitor.store)
        await asyncio.to_thread(_wait, lambda: not monitor.store.writer_alive())
        assert monitor.log_status() == "ok"  # the check restarts it
        summary = monitor.summary()
        text = generate_latest(registry).decode()
        await monitor.stop()
        return summary, text

    summary, text = asyncio.run(run())
    assert prom(text, "prediction_log_pruned_total") == 4
    assert prom(text, "prediction_log_writer_restarts_total") == 1
    assert summary["store"]["pruned"] == 4
    assert summary["store"]["writer_restarts"] == 1
    assert summary["model_versions"]["v1"]["predictions"] == 1  # the retained log only
    assert summary["model_versions"]["v1"]["feedback"] == 0


def test_monitor_drift_reports_missing_reference_and_scores_with_one(
    request: pytest.FixtureRequest, backend: Backend, tmp_path: Path
):
    def scores(reference: dict | None, n: int) -> dict:
        # a fresh log each time: a shared store's window is the database's recent rows
        where = make_backend(backend.name, tmp_path, lambda: request.getfixturevalue("postgres"))

        async def run() -> dict:
            settings = where.settings(drift_window=100)
            monitor = Monitor(settings, _contract(reference), CollectorRegistry())
            await monitor.start()
            for i in range(n):
                monitor.observe(_event(i, "cat", 0.55))
            await _settled(monitor, rows=n)
            report = monitor.drift()
            await monitor.stop()
            return report

        return asyncio.run(run())

    no_ref = scores(None, 50)
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
    few = scores(ref, 5)
    assert few["status"] == "insufficient_data"
    report = scores(ref, 300)
    assert report["window"] == {"size": 100, "capacity": 100}
    assert report["features"]["confidence"]["level"] == "significant"
    assert report["features"]["width"]["psi"] == pytest.approx(0.0)  # same sizes as reference
    assert report["status"] == "significant"


def test_observe_never_raises_and_keeps_working_after_bad_input(backend: Backend):
    async def run() -> dict:
        monitor = Monitor(backend.settings(), _contract(), CollectorRegistry())
        await monitor.start()
        monitor.observe(object())  # type: ignore[arg-type]  # garbage in: logged once, no raise
        monitor.observe(_event(1))
        await _settled(monitor, rows=1)
        summary = monitor.summary()
        await monitor.stop()
        return summary

    summary = asyncio.run(run())
    assert summary["model_versions"]["v1"]["predictions"] == 1


def test_malformed_reference_is_reported_and_metrics_still_render(backend: Backend):
    reference = {"confidence": {"edges": "not a list", "counts": [1, 2]}, "width": 3}

    async def run() -> tuple[dict, str]:
        registry = CollectorRegistry()
        monitor = Monitor(backend.settings(), _contract(reference), registry)
        await monitor.start()
        for i in range(40):
            monitor.observe(_event(i))
        await _settled(monitor, rows=40)
        report = monitor.drift()
        text = generate_latest(registry).decode()
        await monitor.stop()
        return report, text

    report, text = asyncio.run(run())
    assert report["status"] == "invalid_reference"
    assert report["features"] == {}
    assert "drift_window_size 40.0" in text


def test_every_prediction_that_cannot_be_observed_is_a_counted_loss(backend: Backend, caplog):
    """Something that is not a prediction reaching the monitor (a bug upstream) never gets to
    the writer: each one is a lost row in prediction_log_write_failures_total, not only the
    first (after which they were dropped without a trace), and the log says so once."""

    async def run() -> str:
        registry = CollectorRegistry()
        monitor = Monitor(backend.settings(), _contract(), registry)
        await monitor.start()
        for _ in range(3):
            monitor.observe("not a prediction")  # type: ignore[arg-type]
        text = generate_latest(registry).decode()
        await monitor.stop()
        return text

    with caplog.at_level(logging.ERROR, logger="server.monitor"):
        text = asyncio.run(run())
    assert prom(text, "prediction_log_write_failures_total") == 3
    assert caplog.text.count("could not observe a prediction") == 1
