"""The prediction log: every prediction and every piece of feedback, stored durably.

:class:`PredictionStore` is the interface the server talks to; :class:`SqliteStore` is the
default implementation (a server database can replace it behind the same methods).

Writes never touch the event loop: ``record`` appends to a bounded in-memory queue and returns
at once (when the queue is full the prediction is dropped and counted, so memory stays bounded
when the disk is slow); ONE writer thread drains the queue in batches, one transaction per batch.
Feedback goes through the same queue, behind every prediction recorded before it, so feedback
for a request still waiting to be written finds it; its future resolves only after the commit.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("server.store")

SCHEMA = """
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
PREDICTION_COLUMNS = (
    "request_id",
    "ts",
    "model_version",
    "label",
    "confidence",
    "probabilities",
    "input_sha256",
    "width",
    "height",
    "brightness",
    "latency_ms",
    "route",
)


class StoreUnavailableError(RuntimeError):
    """The store cannot be written (it failed to open, or the disk refused the write)."""


@dataclass(frozen=True)
class PredictionEvent:
    """One successfully predicted image, as the server saw it (re-exported by monitoring)."""

    request_id: str
    timestamp: float
    model_version: str
    label: str
    confidence: float
    probabilities: dict[str, float]
    input_sha256: str
    width: int
    height: int
    brightness: float
    latency_ms: float
    route: str

    def as_tuple(self) -> tuple[Any, ...]:
        return (
            self.request_id,
            self.timestamp,
            self.model_version,
            self.label,
            float(self.confidence),
            json.dumps(self.probabilities, separators=(",", ":")),
            self.input_sha256,
            int(self.width),
            int(self.height),
            float(self.brightness),
            float(self.latency_ms),
            self.route,
        )


@dataclass(frozen=True)
class FeedbackResult:
    """What the store knew about a request id when feedback for it was committed."""

    request_id: str
    true_label: str
    model_version: str
    predicted_label: str
    previous_label: str | None  # the true label this feedback replaced, if any


@dataclass
class _Feedback:
    request_id: str
    true_label: str
    ts: float
    future: Future[FeedbackResult | None]


# Hooks the writer calls after each commit, so the owner can update cached figures without
# ever querying the database on the event loop.
OnPredictions = Callable[[list[PredictionEvent]], None]
OnFeedback = Callable[[list[FeedbackResult]], None]


class PredictionStore(Protocol):
    """What the server needs from a prediction log."""

    def start(self) -> None:
        """Open the store and start writing; never raises (a failed open is logged, counted)."""

    def record(self, row: PredictionEvent) -> bool:
        """Queue a prediction without blocking. False when it was dropped or cannot be stored."""

    def submit_feedback(
        self, request_id: str, true_label: str, ts: float
    ) -> Future[FeedbackResult | None]:
        """Queue feedback; the future gives None for an unknown request id, or raises
        :class:`StoreUnavailableError`."""

    def stop(self, timeout: float = 10.0) -> None:
        """Write everything queued, then close."""

    @property
    def healthy(self) -> bool: ...


class _WriteQueue:
    """FIFO of predictions and feedback, bounded in predictions only.

    Feedback is never refused (each feedback request waits for its own future, so their
    number is bounded by the requests in flight), and it keeps its place behind every
    prediction recorded before it.
    """

    def __init__(self, max_predictions: int) -> None:
        self.max_predictions = max_predictions
        self._items: collections.deque[PredictionEvent | _Feedback] = collections.deque()
        self._predictions = 0
        self._cond = threading.Condition()

    def put_prediction(self, row: PredictionEvent) -> bool:
        with self._cond:
            if self._predictions >= self.max_predictions:
                return False
            self._items.append(row)
            self._predictions += 1
            self._cond.notify()
            return True

    def put_feedback(self, item: _Feedback) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify()

    def get_batch(self, max_items: int, timeout: float) -> list[PredictionEvent | _Feedback]:
        with self._cond:
            if not self._items:
                self._cond.wait(timeout)
            batch = []
            while self._items and len(batch) < max_items:
                item = self._items.popleft()
                if isinstance(item, PredictionEvent):
                    self._predictions -= 1
                batch.append(item)
            return batch

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """A connection with the pragmas the log relies on (WAL: readers never block the writer)."""
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)
    else:
        conn = sqlite3.connect(path, timeout=10.0, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a process crash; only power loss can cost the last commits
        conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


class SqliteStore:
    """:class:`PredictionStore` on one SQLite file in WAL mode, written by one thread."""

    def __init__(
        self,
        path: str | Path,
        *,
        max_queue: int = 10_000,
        batch_size: int = 500,
        on_predictions: OnPredictions | None = None,
        on_feedback: OnFeedback | None = None,
        on_write_failure: Callable[[int], None] | None = None,
        on_drop: Callable[[int], None] | None = None,
        on_open: Callable[[sqlite3.Connection], None] | None = None,
        max_page_count: int | None = None,  # caps the file size (tests use it as a full disk)
    ) -> None:
        self.path = Path(path)
        self.batch_size = batch_size
        self.max_page_count = max_page_count
        self._queue = _WriteQueue(max_queue)
        self._on_predictions = on_predictions
        self._on_feedback = on_feedback
        self._on_write_failure = on_write_failure or (lambda n: None)
        self._on_drop = on_drop or (lambda n: None)
        self._on_open = on_open
        self._conn: sqlite3.Connection | None = None
        self._open_error: str | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._opened = threading.Event()
        self._failing = False  # True between a failed write and the next good one
        self.rows_written = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="prediction-log-writer", daemon=True)
        self._thread.start()
        self._opened.wait(30.0)

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._queue.wake()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("prediction log: writer did not finish within %.1f s", timeout)

    @property
    def healthy(self) -> bool:
        return self._conn is not None and not self._failing

    @property
    def open_error(self) -> str | None:
        return self._open_error

    def queued(self) -> int:
        return len(self._queue)

    # ------------------------------------------------------------------ producers
    def record(self, row: PredictionEvent) -> bool:
        if self._open_error is not None:
            self._on_write_failure(1)  # the store never opened: this row is lost
            return False
        if not self._queue.put_prediction(row):
            self._on_drop(1)
            return False
        return True

    def submit_feedback(
        self, request_id: str, true_label: str, ts: float
    ) -> Future[FeedbackResult | None]:
        fut: Future[FeedbackResult | None] = Future()
        if self._open_error is not None or self._stopping.is_set():
            fut.set_exception(StoreUnavailableError("the prediction log is not available"))
            return fut
        self._queue.put_feedback(_Feedback(request_id, true_label, ts, fut))
        return fut

    # ------------------------------------------------------------------ writer thread
    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = connect(self.path)
            if self.max_page_count is not None:
                conn.execute(f"PRAGMA max_page_count={int(self.max_page_count)}")
            conn.executescript(SCHEMA)
            if self._on_open is not None:
                # before the first write, so cached figures never count a row twice
                self._on_open(conn)
            self._conn = conn
            log.info("prediction log: %s (SQLite, WAL)", self.path)
        except (OSError, sqlite3.Error) as exc:
            self._open_error = f"{type(exc).__name__}: {exc}"
            # logged once; every prediction after this is counted as a failed write
            log.error(
                "prediction log: cannot open %s (%s); predictions will not be stored",
                self.path,
                self._open_error,
            )

    def _run(self) -> None:
        self._open()
        self._opened.set()
        if self._conn is None:
            return
        try:
            while True:
                batch = self._queue.get_batch(self.batch_size, timeout=0.5)
                if batch:
                    self._write(batch)
                elif self._stopping.is_set():
                    break
        finally:
            self._close()

    def _close(self) -> None:
        if self._conn is None:
            return
        # a checkpoint is an optimisation; the WAL is replayed on the next open anyway
        with contextlib.suppress(sqlite3.Error):
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._conn.close()

    def _write(self, batch: list[PredictionEvent | _Feedback]) -> None:
        assert self._conn is not None
        conn = self._conn
        rows: list[PredictionEvent] = []
        pending: list[PredictionEvent] = []  # rows not yet sent to executemany
        answers: list[tuple[_Feedback, FeedbackResult | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for item in batch:
                if isinstance(item, PredictionEvent):
                    pending.append(item)
                    continue
                # predictions queued before this feedback must be visible to its lookup
                self._insert(conn, pending)
                rows.extend(pending)
                pending = []
                answers.append((item, self._apply_feedback(conn, item)))
            self._insert(conn, pending)
            rows.extend(pending)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            # the failed statement may already have rolled the transaction back
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            n_rows = sum(1 for item in batch if isinstance(item, PredictionEvent))
            self._on_write_failure(n_rows)
            if not self._failing:
                log.error(
                    "prediction log: write failed (%s: %s); %d predictions lost, "
                    "the server keeps serving",
                    type(exc).__name__,
                    exc,
                    n_rows,
                )
            self._failing = True
            for item in batch:
                if isinstance(item, _Feedback):
                    item.future.set_exception(StoreUnavailableError("the feedback was not stored"))
            return
        if self._failing:
            log.info("prediction log: writes succeed again")
            self._failing = False
        self.rows_written += len(rows)
        results = [r for _, r in answers if r is not None]
        try:
            if rows and self._on_predictions is not None:
                self._on_predictions(rows)
            if results and self._on_feedback is not None:
                self._on_feedback(results)
        except Exception:  # a bug in a hook must not stop the writer
            log.exception("prediction log: after-commit hook failed")
        for item, result in answers:
            item.future.set_result(result)

    @staticmethod
    def _insert(conn: sqlite3.Connection, rows: list[PredictionEvent]) -> None:
        if not rows:
            return
        marks = ",".join("?" * len(PREDICTION_COLUMNS))
        # OR IGNORE: a client-chosen X-Request-ID reused twice keeps its first prediction
        conn.executemany(
            f"INSERT OR IGNORE INTO predictions ({','.join(PREDICTION_COLUMNS)}) VALUES ({marks})",
            [r.as_tuple() for r in rows],
        )

    @staticmethod
    def _apply_feedback(conn: sqlite3.Connection, item: _Feedback) -> FeedbackResult | None:
        found = conn.execute(
            "SELECT p.model_version, p.label, f.true_label FROM predictions p "
            "LEFT JOIN feedback f ON f.request_id = p.request_id WHERE p.request_id = ?",
            (item.request_id,),
        ).fetchone()
        if found is None:
            return None
        conn.execute(
            "INSERT INTO feedback (request_id, true_label, ts) VALUES (?, ?, ?) "
            "ON CONFLICT(request_id) DO UPDATE SET true_label = excluded.true_label, "
            "ts = excluded.ts",
            (item.request_id, item.true_label, item.ts),
        )
        return FeedbackResult(item.request_id, item.true_label, found[0], found[1], found[2])


# ---------------------------------------------------------------------- reading
def iter_aggregates(
    conn: sqlite3.Connection, confidence_edges: Iterable[float]
) -> tuple[list[tuple[str, str, int, int, float]], list[tuple[str, str, str, int]]]:
    """Grouped figures straight from SQL (C speed, no row loop in Python).

    Returns (predictions, feedback): rows of (model_version, label, confidence_bin, count,
    confidence_sum) and of (model_version, true_label, predicted_label, count).
    """
    inner = list(confidence_edges)[1:-1]
    # the same binning as server.drift.bin_counts: a value equal to an edge goes up
    case = " ".join(f"WHEN confidence < {float(e)!r} THEN {i}" for i, e in enumerate(inner))
    bin_expr = f"CASE {case} ELSE {len(inner)} END"
    predictions = conn.execute(
        f"SELECT model_version, label, {bin_expr} AS b, COUNT(*), SUM(confidence) "
        "FROM predictions GROUP BY model_version, label, b"
    ).fetchall()
    feedback = conn.execute(
        "SELECT p.model_version, f.true_label, p.label, COUNT(*) FROM feedback f "
        "JOIN predictions p ON p.request_id = f.request_id "
        "GROUP BY p.model_version, f.true_label, p.label"
    ).fetchall()
    return predictions, feedback
