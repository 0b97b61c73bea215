"""What only the SQLite prediction log does: one WAL file, a full disk, the v0 -> v1 migration.

Everything both backends promise (queue, feedback, retry, restarts, retention, the Monitor)
is tested on both in test_store_contract.py.
"""

import sqlite3
import time
from pathlib import Path

import pytest
from store_helpers import Counts
from store_helpers import event as _event
from store_helpers import wait_for as _wait

from server import store
from server.live_figures import LiveFigures
from server.store import StoreUnavailableError
from server.store_sqlite import SqliteStore

pytestmark = pytest.mark.serve

DAY = 86_400.0


def _store(path: Path, **changes) -> SqliteStore:
    options = {"max_queue": 10_000, "timeout_s": 5.0, **changes}
    return SqliteStore(path, **options)


def _count(path: Path, table: str = "predictions") -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "nested" / "dir" / "predictions.db"  # parents are created by the store


def test_the_log_is_one_sqlite_file_in_wal_mode_at_the_current_schema(db_path: Path):
    s = _store(db_path)
    s.start()
    assert (s.backend, s.shared, s.describe()) == ("sqlite", False, str(db_path))
    s.record(_event(1))
    s.stop()
    conn = sqlite3.connect(db_path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == store.SCHEMA_VERSION
    assert conn.execute("SELECT COUNT(*) FROM predictions").fetchone()[0] == 1


def test_an_owner_file_that_cannot_be_opened_costs_only_the_check(db_path: Path, caplog):
    """The lock beside the log (a second server on it is said) is a check, not a condition: an
    owner file another user made, or a read-only folder, stopped every write to the log."""
    db_path.parent.mkdir(parents=True)
    Path(f"{db_path}.owner").mkdir()  # cannot be opened for writing, as another user's 0600 file
    s = _store(db_path)
    with caplog.at_level("WARNING", logger="server.store"):
        s.start()
        s.record(_event(1))
        s.stop()
    assert _count(db_path) == 1
    said = [r.getMessage() for r in caplog.records if "cannot tell whether" in r.getMessage()]
    assert len(said) == 1, caplog.text


def test_unopenable_location_counts_every_prediction_as_failed(tmp_path: Path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("a file where a directory should be")
    counts = Counts()
    s = _store(not_a_dir / "predictions.db", on_write_failure=counts.fail)
    s.start()  # does not raise
    assert s.status() == "unavailable"
    assert s.open_error is not None
    assert not s.record(_event(1))
    assert not s.record(_event(2))
    assert counts.failures == 2
    with pytest.raises(StoreUnavailableError):
        s.submit_feedback("cat", time.time(), request_id="req-1").result(5)
    s.stop()


def test_full_disk_counts_every_lost_prediction(db_path: Path):
    counts = Counts()
    # a database capped at a few pages behaves like a full disk (SQLITE_FULL)
    s = _store(db_path, max_page_count=12, batch_size=50, on_write_failure=counts.fail)
    s.start()
    for i in range(5):
        s.record(_event(i))
    assert _wait(lambda: s.rows_written == 5)
    for i in range(5, 2000):
        s.record(_event(i))
    assert _wait(lambda: s.status() == "failing")
    s.stop()
    written = _count(db_path)
    assert counts.failures > 0
    assert written >= 5  # what was stored before the disk filled up is kept
    assert written + counts.failures == 2000  # every prediction is either stored or counted


# ---------------------------------------------------------------------- schema migration
# The schema of version 0, as servers before prediction ids wrote it (kept verbatim).
SCHEMA_V0 = """
CREATE TABLE IF NOT EXISTS predictions (
    request_id    TEXT PRIMARY KEY,
    ts            REAL NOT NULL,
    model_version TEXT NOT NULL,
    label         TEXT NOT NULL,
    confidence    REAL NOT NULL,
    probabilities TEXT NOT NULL,
    input_sha256  TEXT NOT NULL,
    width         INTEGER NOT NULL,
    height        INTEGER NOT NULL,
    brightness    REAL NOT NULL,
    latency_ms    REAL NOT NULL,
    route         TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS predictions_version_ts ON predictions (model_version, ts);
CREATE TABLE IF NOT EXISTS feedback (
    request_id TEXT PRIMARY KEY,
    true_label TEXT NOT NULL,
    ts         REAL NOT NULL
);
"""


def write_v0_log(path: Path, n: int) -> None:
    """A log as the previous server left it: request_id keys, user_version 0."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA_V0)
    now = time.time()
    for i in range(n):
        label = "cat" if i % 2 == 0 else "dog"
        conn.execute(
            "INSERT INTO predictions VALUES (?, ?, 'v0', ?, 0.8, '{}', ?, 100, 80, 90.0, 2.0, "
            "'/predict')",
            (f"old-{i}", now - 60 + i, label, "a" * 64),
        )
    conn.execute("INSERT INTO feedback VALUES ('old-0', 'cat', ?)", (now,))
    conn.execute("INSERT INTO feedback VALUES ('old-1', 'cat', ?)", (now,))
    conn.commit()
    conn.close()


def test_a_log_with_the_previous_schema_is_migrated_in_place(db_path: Path):
    write_v0_log(db_path, 6)
    figures = LiveFigures()
    s = _store(db_path, on_open=figures.load)
    s.start()
    assert s.status() == "ok"
    # feedback by the old request id finds its row, and new rows sit beside the old ones
    again = s.submit_feedback("dog", time.time(), request_id="old-0").result(10)
    assert (again.prediction_id, again.previous_label, again.predicted_label) == (
        "old-0",
        "cat",
        "cat",
    )
    s.record(_event(1))
    s.stop()
    fig = figures.snapshot()["v0"]
    assert fig["predictions"] == 6
    assert fig["confusion"] == {"cat": {"cat": 1, "dog": 1}}  # loaded from the migrated rows

    conn = sqlite3.connect(db_path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    columns = [r[1] for r in conn.execute("PRAGMA table_info(predictions)")]
    assert columns[:2] == ["prediction_id", "request_id"]
    key = [r[1] for r in conn.execute("PRAGMA table_info(predictions)") if r[5]]
    assert key == ["prediction_id"]
    indexes = {r[1] for r in conn.execute("PRAGMA index_list(predictions)")}
    assert {"predictions_request_id", "predictions_version_ts", "predictions_ts"} <= indexes
    old = conn.execute(
        "SELECT prediction_id, request_id, label, width FROM predictions "
        "WHERE model_version = 'v0' ORDER BY ts"
    ).fetchall()
    assert old == [(f"old-{i}", f"old-{i}", "cat" if i % 2 == 0 else "dog", 100) for i in range(6)]
    assert conn.execute("SELECT prediction_id, true_label FROM feedback ORDER BY 1").fetchall() == [
        ("old-0", "dog"),
        ("old-1", "cat"),
    ]
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"predictions", "feedback"}
    conn.close()
    # a second open finds version 1 and changes nothing
    s = _store(db_path)
    s.start()
    s.stop()
    assert _count(db_path) == 7


def test_a_lingering_writer_is_woken_by_a_full_batch_or_feedback_not_per_prediction():
    """Each prediction used to wake the writer while it let a batch gather (a thread switch and
    a turn at the GIL per request, for nothing). Now only what ends the wait wakes it: the first
    item of an empty queue, the item that fills the batch, feedback."""
    import threading

    class Counting(threading.Condition):
        notified = 0

        def notify(self, n: int = 1) -> None:
            type(self).notified += 1
            super().notify(n)

    queue = store._WriteQueue(100)
    queue._cond = Counting()
    batches: list[list] = []

    def writer(max_items: int, linger: float) -> threading.Thread:
        def take() -> None:
            batches.append(queue.get_batch(max_items, timeout=10.0, linger=linger))

        thread = threading.Thread(target=take)
        thread.start()
        return thread

    def waiting_for(n: int) -> None:
        assert _wait(lambda: queue._wake_at == n, timeout=5.0), queue._wake_at

    thread = writer(max_items=10, linger=30.0)
    waiting_for(1)  # an empty queue: the first item wakes it
    assert queue.put_prediction(_event(0))
    waiting_for(10)  # lingering until the batch is full
    assert Counting.notified == 1
    for i in range(1, 9):
        assert queue.put_prediction(_event(i))
    assert Counting.notified == 1  # nine queued, none woke it
    assert queue.put_prediction(_event(9))  # the tenth fills the batch
    thread.join(timeout=5.0)
    assert not thread.is_alive()
    assert Counting.notified == 2
    assert [row.prediction_id for row in batches[0]] == [_event(i).prediction_id for i in range(10)]

    thread = writer(max_items=10, linger=30.0)
    waiting_for(1)
    assert queue.put_prediction(_event(10))
    waiting_for(10)
    feedback = store._Feedback(_event(10).prediction_id, None, "cat", time.time(), None)
    queue.put_feedback(feedback)  # a client waits for it: it ends the linger at once
    thread.join(timeout=5.0)
    assert not thread.is_alive()
    assert batches[1][1] is feedback
    assert queue._wake_at == 0


def test_predictions_are_committed_in_groups_and_feedback_ends_the_wait(db_path: Path):
    """The writer lets predictions gather for ``linger_s`` (a few commits a second, not one per
    request), but queued feedback, which a client is waiting for, is written at once."""
    batches: list[int] = []
    s = _store(db_path, linger_s=0.5, on_predictions=lambda rows: batches.append(len(rows)))
    s.start()
    try:
        for i in range(5):
            assert s.record(_event(i))
        assert _wait(lambda: sum(batches) == 5, timeout=5.0)
        assert batches == [5]  # one commit for the five
        assert s.record(_event(5))
        started = time.monotonic()
        result = s.submit_feedback("cat", time.time(), prediction_id=_event(5).prediction_id)
        assert result.result(timeout=5.0) is not None  # the prediction queued before it is there
        assert time.monotonic() - started < 0.4  # feedback did not wait out the linger
    finally:
        s.stop()
    assert _count(db_path) == 6


def test_a_full_disk_stays_failing_until_a_row_is_written(db_path: Path, caplog):
    """SQLite out of room (its own "database or disk is full"): predictions are lost and the
    log is failing. A feedback batch that writes nothing (an unknown id: on a full disk every
    later prediction is unknown too) must not report the log as ok again, nor make the next
    failure log its error a second time; a row that is written does end it."""
    caplog.set_level("ERROR", logger="server.store")
    lost = [0]
    s = _store(db_path, on_write_failure=lambda n: lost.__setitem__(0, lost[0] + n))
    s.start()
    s.record(_event(0))
    assert _wait(lambda: _count(db_path) == 1)
    full = {"pages": 0}

    def cap(conn: sqlite3.Connection) -> None:
        if full["pages"] == 0:
            (pages,) = conn.execute("PRAGMA page_count").fetchone()
            full["pages"] = conn.execute(f"PRAGMA max_page_count = {pages}").fetchone()[0]
        else:
            conn.execute(f"PRAGMA max_page_count = {full['pages']}")

    s.fault_hook = lambda: cap(s._conn)
    assert _wait(lambda: full["pages"] > 0)  # the writer has capped its own file
    for i in range(1, 400):
        s.record(_event(i, request_id=f"long-request-id-{i:04d}-" + "x" * 60))
    assert _wait(lambda: s.status() == "failing")
    assert s.submit_feedback("cat", time.time(), prediction_id="req-399").result(10) is None
    assert s.status() == "failing"  # nothing was written: the disk is still full
    for i in range(400, 800):
        s.record(_event(i, request_id=f"long-request-id-{i:04d}-" + "x" * 60))
    assert _wait(lambda: lost[0] >= 700)
    assert s.status() == "failing"
    failed = [r for r in caplog.records if "write failed" in r.getMessage()]
    assert len(failed) == 1, [r.getMessage() for r in failed]
    s.fault_hook = lambda: s._conn.execute("PRAGMA max_page_count = 1000000")
    s.record(_event(900))
    assert _wait(lambda: s.status() == "ok")
    s.stop()
