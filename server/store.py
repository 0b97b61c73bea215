"""The prediction log: every prediction and every piece of feedback, stored durably.

The server talks to a :class:`WriterStore` (:class:`PredictionStore` names its core calls);
``server.monitor.Monitor._open_store`` picks the backend from the settings:
``server.store_sqlite.SqliteStore`` (the default, one file, one process) or
``server.store_postgres.PostgresStore`` (a database shared by every replica; psycopg is
imported only then). Both are :class:`WriterStore`, so they behave alike:

Writes never touch the event loop: ``record`` appends to a bounded in-memory queue and returns
at once (when the queue is full the prediction is dropped and counted, so memory stays bounded
when the database is slow or away); ONE writer thread drains the queue in batches, one
transaction per batch. Feedback goes through the same queue, behind every prediction recorded
before it, so feedback for a prediction still waiting to be written finds it; its future
resolves only after the commit.

The writer survives anything a row can do: a batch that fails for a reason other than the
database is retried row by row, so one bad row costs only itself (counted as a failed write).
A database that cannot be reached (a PostgreSQL restart, a SQLite file locked by another
connection past the busy timeout) costs nothing but time: the writer keeps its batch and retries
with backoff while the queue absorbs new predictions. Should the
thread die all the same (a bug), the next ``record``/``submit_feedback``/``status`` call restarts
it. ``status()`` says whether the writer is keeping up, and the same thread prunes rows older
than the retention period (or beyond a row limit) in small chunks between writes.

Schema versions are migrated in place when the log opens (SQLite: ``PRAGMA user_version``):
version 0 keyed predictions and feedback by the HTTP request id; version 1 keys both by a
server-made ``prediction_id`` (one per image) and keeps ``request_id`` as an indexed column.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from server.threads import name_os_thread

log = logging.getLogger("server.store")

SCHEMA_VERSION = 1
PREDICTION_COLUMNS = (
    "prediction_id",
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

BEHIND_QUEUE_FRACTION = 0.8  # a queue fuller than this is "behind" (drops are near)
STUCK_FACTOR = 2.0  # no progress for this many store timeouts is "stuck"
RESTART_MIN_INTERVAL_S = 1.0  # a writer that dies at once is not restarted in a busy loop
STOP_TIMEOUT_S = 10.0  # at shutdown, the writer's time to write what is queued (within a grace)


class StoreUnavailableError(RuntimeError):
    """The store cannot be written (it failed to open, or the disk refused the write)."""


class StoreTimeoutError(StoreUnavailableError):
    """The writer did not answer within the store timeout (it is stuck or far behind)."""


class AmbiguousRequestIdError(LookupError):
    """Several logged images share the request id: feedback must name a prediction_id."""


class SchemaVersionError(RuntimeError):
    """The log was written by a newer server with a schema this one does not know."""


@dataclass(frozen=True)
class PredictionEvent:
    """One successfully predicted image, as the server saw it (re-exported by monitoring)."""

    prediction_id: str  # unique per image, made by the server: the key feedback refers to
    request_id: str  # the HTTP request's id (X-Request-ID, the client's or made): not unique
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
            self.prediction_id,
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
    """What the store knew about a prediction when feedback for it was committed."""

    prediction_id: str
    request_id: str
    true_label: str
    model_version: str
    predicted_label: str
    previous_label: str | None  # the true label this feedback replaced, if any


@dataclass(frozen=True)
class PrunedPrediction:
    """A prediction retention deleted, with what the cached figures counted for it."""

    model_version: str
    label: str
    confidence: float
    true_label: str | None


@dataclass
class _Feedback:
    prediction_id: str | None
    request_id: str | None
    true_label: str
    ts: float
    future: Future[FeedbackResult | None]


_Item = PredictionEvent | _Feedback
_Outcome = FeedbackResult | AmbiguousRequestIdError | None

# Hooks the writer calls after each commit, so the owner can update cached figures without
# ever querying the database on the event loop.
OnPredictions = Callable[[list[PredictionEvent]], None]
OnFeedback = Callable[[list[FeedbackResult]], None]
OnPruned = Callable[[list[PrunedPrediction]], None]


class PredictionStore(Protocol):
    """What the server needs from a prediction log."""

    def start(self) -> None:
        """Open the store and start writing; never raises (a failed open is logged, counted)."""

    def record(self, row: PredictionEvent) -> bool:
        """Queue a prediction without blocking. False when it was dropped or cannot be stored."""

    def submit_feedback(
        self,
        true_label: str,
        ts: float,
        *,
        prediction_id: str | None = None,
        request_id: str | None = None,
    ) -> Future[FeedbackResult | None]:
        """Queue feedback for one prediction, named by exactly one of the two ids. The future
        gives None for an unknown id, or raises :class:`AmbiguousRequestIdError` or
        :class:`StoreUnavailableError`; it always resolves."""

    def status(self) -> str:
        """ok, behind, stuck, failing, dead or unavailable (see :meth:`WriterStore.status`)."""

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Write everything queued, then close."""

    # what the monitor reports about the writer (see WriterStore)
    backend: str  # "sqlite" or "postgresql"
    shared: bool  # other processes write the same store: figures must be read from it
    restarts: int
    rows_pruned: int

    def describe(self) -> str:
        """Where the store is, safe to log and show (never a password)."""

    def writer_alive(self) -> bool: ...

    def writer_stuck(self) -> bool: ...

    def queued(self) -> int: ...

    def oldest_queued_s(self) -> float: ...

    @property
    def open_error(self) -> str | None: ...


def _settle(future: Future[Any], result: Any = None, error: BaseException | None = None) -> None:
    """Resolve a future that its waiter may have cancelled (a timed-out feedback request)."""
    with contextlib.suppress(InvalidStateError):
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


class _WriteQueue:
    """FIFO of predictions and feedback, bounded in predictions only.

    Feedback is never refused (each feedback request waits for its own future, so their
    number is bounded by the requests in flight), and it keeps its place behind every
    prediction recorded before it. Each item remembers when it was queued.
    """

    def __init__(self, max_predictions: int) -> None:
        self.max_predictions = max_predictions
        self._items: collections.deque[tuple[float, _Item]] = collections.deque()
        self._predictions = 0
        self._cond = threading.Condition()
        self._closing = False
        # How many queued items would end the writer's current wait: 0 while it is not waiting
        # (writing, or lingering is over), 1 while it waits for a first item, the batch size
        # while it lingers. A prediction wakes the writer only when it reaches that count: each
        # wake-up is a thread switch and a turn at the GIL, which a lingering writer would spend
        # only to go back to sleep (about three switches per request at concurrency 1).
        self._wake_at = 0

    def put_prediction(self, row: PredictionEvent) -> bool:
        with self._cond:
            if self._predictions >= self.max_predictions:
                return False
            self._items.append((time.monotonic(), row))
            self._predictions += 1
            if self._wake_at and len(self._items) >= self._wake_at:
                self._cond.notify()
            return True

    def put_feedback(self, item: _Feedback) -> None:
        with self._cond:
            self._items.append((time.monotonic(), item))
            self._cond.notify()

    def get_batch(self, max_items: int, timeout: float, linger: float = 0.0) -> list[_Item]:
        """Up to ``max_items``, waiting up to ``timeout`` for the first one.

        ``linger``: then let a batch of predictions gather until its oldest has waited that
        long (or the batch is full), so the writer commits a few times a second instead of
        once per request and keeps off the cores the model runs on. Queued feedback (a client
        waits for it) and ``wake`` (stopping) end the wait at once.
        """
        with self._cond:
            try:
                if not self._items and timeout > 0:
                    self._wake_at = 1
                    self._cond.wait(timeout)
                while self._items and len(self._items) < max_items and not self._closing:
                    remaining = self._items[0][0] + linger - time.monotonic()
                    if remaining <= 0 or self._predictions < len(self._items):  # feedback queued
                        break
                    self._wake_at = max_items
                    self._cond.wait(remaining)
            finally:
                self._wake_at = 0
            batch: list[_Item] = []
            while self._items and len(batch) < max_items:
                _, item = self._items.popleft()
                if isinstance(item, PredictionEvent):
                    self._predictions -= 1
                batch.append(item)
            return batch

    def wake(self) -> None:
        """Wake the writer and end every linger from now on (the store is stopping)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    def predictions(self) -> int:
        with self._cond:
            return self._predictions

    def oldest_age(self) -> float:
        """Seconds the oldest queued item has waited (0 when the queue is empty)."""
        with self._cond:
            return time.monotonic() - self._items[0][0] if self._items else 0.0

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)


def redact_url(url: str) -> str:
    """``scheme://host:port/database`` of a store URL, without user, password or query, so
    it can be logged and shown."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return f"{url.split(':', 1)[0]}://(unparsable)"
    if ":" in host:
        host = f"[{host}]"  # an IPv6 address
    return f"{parts.scheme}://{host}{port}{parts.path}"


def write_in_order(
    items: list[_Item],
    insert: Callable[[list[PredictionEvent]], None],
    feedback: Callable[[_Feedback], _Outcome],
) -> list[tuple[_Item, _Outcome]]:
    """A batch as both backends write it, in the caller's transaction: predictions inserted many
    at a time, each feedback only after the predictions queued before it (its lookup must find
    them). Returns each item with its outcome (None for a prediction)."""
    done: list[tuple[_Item, _Outcome]] = []
    pending: list[PredictionEvent] = []  # rows not yet inserted
    for item in items:
        if isinstance(item, PredictionEvent):
            pending.append(item)
            continue
        insert(pending)
        done += [(row, None) for row in pending]
        pending = []
        done.append((item, feedback(item)))
    insert(pending)
    done += [(row, None) for row in pending]
    return done


# feedback by request_id reads this many of its rows, newest first: a retried photo's answers
REQUEST_ID_ROWS = 64


def apply_feedback(execute: Callable[..., Any], item: _Feedback, mark: str) -> _Outcome:
    """Find the prediction ``item`` names and store its label, in the caller's transaction: the
    one lookup and upsert both backends run (``execute`` is the connection's, ``mark`` its
    parameter marker, ``?`` or ``%s``). None when no logged image matches."""
    select = (
        "SELECT p.prediction_id, p.request_id, p.model_version, p.label, f.true_label, "
        "p.input_sha256 FROM predictions p "
        "LEFT JOIN feedback f ON f.prediction_id = p.prediction_id "
    )
    if item.prediction_id is not None:
        found = execute(select + f"WHERE p.prediction_id = {mark}", (item.prediction_id,))
    else:
        # a client that retries a request keeps its X-Request-ID: the same photo logged again.
        # The label is the photo's, so it goes to the last answer; two photos (a batch, an id
        # reused for another photo) stay ambiguous
        found = execute(
            select + f"WHERE p.request_id = {mark} ORDER BY p.ts DESC, p.prediction_id "
            f"LIMIT {REQUEST_ID_ROWS}",
            (item.request_id,),
        )
    rows = found.fetchall()
    if not rows:
        return None
    if len({row[5] for row in rows}) > 1:
        return AmbiguousRequestIdError("several logged images share this request_id")
    prediction_id, request_id, version, predicted, previous, _ = rows[0]
    execute(
        f"INSERT INTO feedback (prediction_id, true_label, ts) VALUES ({mark}, {mark}, {mark}) "
        "ON CONFLICT (prediction_id) DO UPDATE SET true_label = excluded.true_label, "
        "ts = excluded.ts",
        (prediction_id, item.true_label, item.ts),
    )
    return FeedbackResult(prediction_id, request_id, item.true_label, version, predicted, previous)


def _reason(exc: BaseException) -> str:
    """``Type: first line of the message``: why a database could not be reached (libpq's
    messages name the host and user, never the password)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# ---------------------------------------------------------------------- the writer
class WriterStore:
    """The writer every backend shares: the bounded queue, ONE writer thread, feedback futures,
    status, restarts of a dead writer, row-by-row retry of a bad batch, retention.

    A backend supplies the database side (``_open_backend``, ``_commit``, ``_rollback``,
    ``_prune_chunk``, ...) and sorts its errors with ``_error_kind``: ``row`` (this row is
    bad: the others are written one by one), ``storage`` (the database refused the write:
    the batch is counted lost) or ``outage`` (the database cannot be reached: the writer keeps
    the batch and retries it with a backoff from ``reconnect_min_s`` to ``reconnect_max_s``,
    while the bounded queue keeps predictions flowing and counts what it drops).

    ``timeout_s`` is how long a waiter on the writer may wait; it also sets when the writer
    counts as behind (oldest queued item older than it) and stuck (no progress for twice it).
    ``retention_days`` (0 = forever) and ``max_rows`` (0 = no limit) bound the log; the
    writer prunes at start, then every ``prune_interval_s`` and after ``prune_every_rows``
    inserts, ``prune_chunk`` rows per short transaction.
    """

    backend = "none"
    shared = False  # True when other processes write the same store (figures come from it)
    refresh_s: float | None = None  # a shared store re-reads its figures this often

    def __init__(
        self,
        *,
        max_queue: int,
        timeout_s: float,
        retention_days: float = 0.0,
        max_rows: int = 0,
        batch_size: int = 500,
        linger_s: float = 0.05,
        prune_interval_s: float = 60.0,
        prune_every_rows: int = 10_000,
        prune_chunk: int = 500,
        reconnect_min_s: float = 0.1,
        reconnect_max_s: float = 2.0,  # PREDICTION_LOG_RECONNECT_MAX_S's default
        on_predictions: OnPredictions | None = None,
        on_feedback: OnFeedback | None = None,
        on_pruned: OnPruned | None = None,
        on_write_failure: Callable[[int], None] | None = None,
        on_drop: Callable[[int], None] | None = None,
        on_restart: Callable[[], None] | None = None,
        on_open: Callable[[Any], None] | None = None,
    ) -> None:
        self.timeout_s = timeout_s
        self.retention_s = retention_days * 86_400.0
        self.max_rows = max_rows
        self.batch_size = batch_size
        self.linger_s = linger_s  # a batch of predictions gathers this long (see get_batch)
        self.prune_interval_s = prune_interval_s
        self.prune_every_rows = prune_every_rows
        self.prune_chunk = prune_chunk
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = max(reconnect_max_s, reconnect_min_s)
        self._queue = _WriteQueue(max_queue)
        self._on_predictions = on_predictions
        self._on_feedback = on_feedback
        self._on_pruned = on_pruned
        self._on_write_failure = on_write_failure or (lambda n: None)
        self._on_drop = on_drop or (lambda n: None)
        self._on_restart = on_restart or (lambda: None)
        self._on_open = on_open
        self._is_open = False
        self._open_error: str | None = None
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()
        self._last_start = 0.0
        self._stopping = threading.Event()
        self._opened = threading.Event()
        self._failing = False  # True between a failed write and the next good one
        self._outage = False  # True while the database cannot be reached
        self._backoff = reconnect_min_s
        self._logged: set[str] = set()  # error kinds already logged (once each, not per row)
        # progress timestamps read by status(): monotonic seconds
        self._busy_since: float | None = None  # a write or prune in progress since
        self._last_progress = time.monotonic()
        self._inflight: list[_Item] = []  # the batch being written, lost if the thread dies
        self._last_prune = -math.inf
        self._inserts_since_prune = 0
        self.rows_written = 0
        self.rows_pruned = 0
        self.restarts = 0
        self.outages = 0  # times the database became unreachable (writes waited, then resumed)
        # Tests only: called by the writer before each batch, outside every guard, so raising
        # kills the thread and blocking stalls it.
        self.fault_hook: Callable[[], None] | None = None

    # ------------------------------------------------------------------ the backend's part
    def describe(self) -> str:
        """Where the store is, safe to log (never a password)."""
        raise NotImplementedError

    def _open_backend(self) -> None:
        """Connect, migrate, call ``on_open``; raises when the store cannot be opened."""
        raise NotImplementedError

    def _recover(self) -> None:
        """A restarted writer: undo what its predecessor left half done."""

    def _close(self) -> None:
        """Close the database (called by the writer thread once it has written everything)."""

    def _commit(self, items: list[_Item]) -> list[tuple[_Item, _Outcome]]:
        """One transaction; raises (rolled back by ``_rollback``) if any item fails."""
        raise NotImplementedError

    def _rollback(self) -> None:
        """Undo a failed transaction, if the failure left one open."""

    def _error_kind(self, exc: BaseException) -> str:
        """``row``, ``storage`` or ``outage`` (see the class docstring)."""
        raise NotImplementedError

    def _prune_chunk(
        self, cutoff: float | None, limit: int, keep: int = 0
    ) -> list[PrunedPrediction]:
        """Delete up to ``limit`` of the oldest predictions (older than ``cutoff`` when given;
        else only past the newest ``keep``) and their feedback, in one transaction; returns
        what was deleted. The count behind ``keep`` is taken inside that transaction: counted
        before it, two replicas pruning one after the other each deleted the whole excess."""
        raise NotImplementedError

    def refreshed_s_ago(self) -> float | None:
        """A shared store: seconds since its figures were last read (None: never, or local)."""
        return None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._start_thread()
        self._opened.wait(30.0)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        self._ensure_writer()  # a dead writer is brought back to flush what is queued
        self._stopping.set()
        self._queue.wake()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("prediction log: writer did not finish within %.1f s", timeout)
        # whatever is still queued (a stuck or dead writer) is lost, but every waiter hears so
        leftover = self._queue.get_batch(len(self._queue) + 1, timeout=0)
        lost = sum(1 for item in leftover if isinstance(item, PredictionEvent))
        if lost:  # the lost-rows counter goes with the process: the log is what remains
            log.error(
                "prediction log: %d predictions not written at shutdown (%s: %s)",
                lost,
                self.describe(),
                self._open_error or "the writer did not get them out",
            )
        self._abandon(leftover)

    @property
    def open_error(self) -> str | None:
        return self._open_error

    def queued(self) -> int:
        return len(self._queue)

    def oldest_queued_s(self) -> float:
        return self._queue.oldest_age()

    # ------------------------------------------------------------------ health
    def writer_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def writer_stuck(self) -> bool:
        """A batch in progress, or queued work untouched, for longer than twice the timeout."""
        limit = STUCK_FACTOR * self.timeout_s
        now = time.monotonic()
        busy = self._busy_since
        if busy is not None and now - busy > limit:
            return True
        return len(self._queue) > 0 and now - self._last_progress > limit

    def status(self) -> str:
        """The writer's state, worst first.

        ``unavailable``: the log has not opened (it failed to, or the database has not been
        reachable yet). ``dead``: the writer thread is not running and could not be restarted.
        ``stuck``: no progress for twice ``timeout_s``. ``failing``: the last write was refused
        by the database (full disk, I/O error) or the database cannot be reached (writes wait
        and retry). ``behind``: the queue is over 80% full or its oldest item has waited longer
        than ``timeout_s``.
        """
        if not self._is_open:
            return "unavailable"
        if not self._ensure_writer():
            return "dead"
        if self.writer_stuck():
            return "stuck"
        if self._failing:
            return "failing"
        full = self._queue.predictions() > BEHIND_QUEUE_FRACTION * self._queue.max_predictions
        if full or self._queue.oldest_age() > self.timeout_s:
            return "behind"
        return "ok"

    # ------------------------------------------------------------------ producers
    def record(self, row: PredictionEvent) -> bool:
        if self._open_error is not None:
            self._on_write_failure(1)  # the store never opened: this row is lost
            return False
        self._ensure_writer()
        if not self._queue.put_prediction(row):
            self._on_drop(1)
            return False
        return True

    def submit_feedback(
        self,
        true_label: str,
        ts: float,
        *,
        prediction_id: str | None = None,
        request_id: str | None = None,
    ) -> Future[FeedbackResult | None]:
        if (prediction_id is None) == (request_id is None):
            raise ValueError("name the prediction by exactly one of prediction_id, request_id")
        fut: Future[FeedbackResult | None] = Future()
        if self._open_error is not None or self._stopping.is_set() or not self._ensure_writer():
            fut.set_exception(StoreUnavailableError("the prediction log is not available"))
            return fut
        self._queue.put_feedback(_Feedback(prediction_id, request_id, true_label, ts, fut))
        return fut

    # ------------------------------------------------------------------ the writer thread
    def _start_thread(self) -> None:
        self._last_start = time.monotonic()
        thread = threading.Thread(target=self._run, name="prediction-log-writer", daemon=True)
        self._thread = thread
        thread.start()

    def _ensure_writer(self) -> bool:
        """True when the writer runs; restarts a writer that died (counted and logged)."""
        thread = self._thread
        if thread is None or thread.is_alive():
            return thread is not None
        if not self._is_open or self._stopping.is_set():
            return False
        with self._thread_lock:
            if self._thread is not None and self._thread.is_alive():
                return True
            if time.monotonic() - self._last_start < RESTART_MIN_INTERVAL_S:
                return False  # it died at once: wait a little rather than spin
            self._abandon(self._inflight)
            self._inflight = []
            self._busy_since = None
            try:
                self._start_thread()
            except RuntimeError:  # no thread can be started (resource limits)
                self._log_once("restart", "prediction log: the writer thread cannot be restarted")
                return False
            self.restarts += 1
            log.error("prediction log: the writer thread had stopped; restarted it")
            with contextlib.suppress(Exception):
                self._on_restart()
            return True

    def _run(self) -> None:
        name_os_thread("predlog-writer")
        try:
            if not self._is_open:
                self._open()
                self._opened.set()
                if not self._is_open:
                    return
            else:
                self._recover()
            self._loop()
        except BaseException:
            # only a bug (or a test's fault hook) gets here; the store restarts the thread
            log.exception("prediction log: the writer thread died")
        finally:
            self._opened.set()
            if self._stopping.is_set() and self._is_open:
                self._close()

    def _open(self) -> None:
        """Open the store; an unreachable database is retried with backoff until it answers
        (``start`` returns after the first try: predictions queue meanwhile)."""
        delay = self.reconnect_min_s
        while True:
            try:
                self._open_backend()
            except Exception as exc:
                if self._error_kind(exc) == "outage":
                    if self._stopping.is_set():
                        return  # stopped before the database ever answered: nothing to close
                    self._log_once(
                        "open-outage",
                        "prediction log: %s cannot be reached yet (%s); retrying",
                        self.describe(),
                        _reason(exc),
                    )
                    self._opened.set()  # the server starts; the writer keeps trying
                    self._stopping.wait(delay)
                    delay = min(delay * 2, self.reconnect_max_s)
                    continue
                self._open_error = f"{type(exc).__name__}: {exc}"
                # logged once; every prediction after this is counted as a failed write
                log.error(
                    "prediction log: cannot open %s (%s); predictions will not be stored",
                    self.describe(),
                    self._open_error,
                )
                return
            self._is_open = True
            return

    def _loop(self) -> None:
        while True:
            self._last_progress = time.monotonic()
            hook = self.fault_hook
            if hook is not None:
                hook()
            if not self._stopping.is_set() and self._prune_due():
                self._prune_guarded()  # at start, then every interval or N inserts
            batch = self._queue.get_batch(self.batch_size, timeout=0.5, linger=self.linger_s)
            if batch:
                self._write_guarded(batch)
            elif self._stopping.is_set():
                return

    def _log_once(self, kind: str, message: str, *args: object) -> None:
        if kind not in self._logged:
            self._logged.add(kind)
            log.error(message + " (logged once for this kind of error)", *args)

    # ------------------------------------------------------------------ writing
    def _write_guarded(self, batch: list[_Item]) -> None:
        """Write one batch; nothing it raises reaches the loop."""
        self._inflight = batch
        self._busy_since = time.monotonic()
        try:
            # a feedback whose waiter gave up (timeout) is not applied
            live = [i for i in batch if isinstance(i, PredictionEvent) or self._claim(i.future)]
            self._write(live)
        except Exception as exc:  # a bug past the per-row guards: the batch is lost, counted
            self._log_once(f"batch:{type(exc).__name__}", "prediction log: batch lost (%r)", exc)
            self._abandon(batch)
        finally:
            self._inflight = []
            self._busy_since = None

    @staticmethod
    def _claim(future: Future[Any]) -> bool:
        return future.set_running_or_notify_cancel()

    def _write(self, batch: list[_Item]) -> None:
        """Write every item, or count it lost; during an outage, wait and retry what is left."""
        pending = batch
        while pending:
            pending = self._write_pass(pending)
            if pending:
                self._wait_for_database()

    def _write_pass(self, items: list[_Item]) -> list[_Item]:
        """One attempt at ``items``; returns those to retry once the database is back."""
        try:
            done = self._commit(items)
        except Exception as exc:
            self._rollback()
            kind = self._error_kind(exc)
            if kind == "outage" and not self._stopping.is_set():
                self._outage_began(exc)
                return items
            if kind != "row":
                self._failed(items, exc)
                return []
            # one row is bad: keep every other row by writing them one by one
            done = []
            for i, item in enumerate(items):
                try:
                    done += self._commit([item])
                except Exception as row_exc:
                    self._rollback()
                    if self._error_kind(row_exc) == "outage" and not self._stopping.is_set():
                        self._outage_began(row_exc)
                        if done:
                            self._succeeded(done)
                        return items[i:]
                    self._failed([item], row_exc)
        if done:
            self._succeeded(done)
        return []

    def _outage_began(self, exc: BaseException) -> None:
        if not self._outage:
            self._outage = True
            self.outages += 1
            log.error(
                "prediction log: %s cannot be reached (%s); writes wait and retry, "
                "the server keeps serving",
                self.describe(),
                _reason(exc),
            )
        self._failing = True

    def _wait_for_database(self) -> None:
        """Back off before the next try; waiting is progress, not a stuck writer."""
        self._busy_since = None
        self._stopping.wait(self._backoff)
        self._backoff = min(self._backoff * 2, self.reconnect_max_s)
        self._last_progress = time.monotonic()
        self._busy_since = time.monotonic()

    def _failed(self, items: list[_Item], exc: BaseException) -> None:
        n_rows = sum(1 for item in items if isinstance(item, PredictionEvent))
        if n_rows:
            self._on_write_failure(n_rows)
        if self._error_kind(exc) == "row":
            self._log_once(
                f"row:{type(exc).__name__}",
                "prediction log: a row cannot be stored (%s: %s); it counts as a failed write",
                type(exc).__name__,
                exc,
            )
        else:
            if not self._failing:
                log.error(
                    "prediction log: write failed (%s: %s); %d predictions lost, "
                    "the server keeps serving",
                    type(exc).__name__,
                    exc,
                    n_rows,
                )
            self._failing = True
        for item in items:
            if isinstance(item, _Feedback):
                _settle(item.future, error=StoreUnavailableError("the feedback was not stored"))

    def _succeeded(self, done: list[tuple[_Item, _Outcome]]) -> None:
        # A commit that wrote nothing (feedback for unknown ids: on a full disk, every later
        # prediction is unknown) proves the database reachable, not that writes succeed again.
        wrote = any(
            isinstance(item, PredictionEvent) or isinstance(outcome, FeedbackResult)
            for item, outcome in done
        )
        if self._failing and (self._outage or wrote):
            if self._outage:
                log.info("prediction log: %s reachable again; writes resumed", self.describe())
            else:
                log.info("prediction log: writes succeed again")
            self._failing = False
        self._outage = False
        self._backoff = self.reconnect_min_s
        rows = [item for item, _ in done if isinstance(item, PredictionEvent)]
        results = [o for _, o in done if isinstance(o, FeedbackResult)]
        self.rows_written += len(rows)
        self._inserts_since_prune += len(rows)
        try:
            if rows and self._on_predictions is not None:
                self._on_predictions(rows)
            if results and self._on_feedback is not None:
                self._on_feedback(results)
        except Exception as exc:  # a bug in a hook must not stop the writer
            self._log_once(f"hook:{type(exc).__name__}", "prediction log: after-commit hook failed")
        for item, outcome in done:
            if isinstance(item, _Feedback):
                if isinstance(outcome, AmbiguousRequestIdError):
                    _settle(item.future, error=outcome)
                else:
                    _settle(item.future, outcome)

    def _abandon(self, items: list[_Item]) -> None:
        """Items that will never be written: predictions counted lost, waiters told."""
        with contextlib.suppress(Exception):
            n_rows = sum(1 for item in items if isinstance(item, PredictionEvent))
            if n_rows:
                self._on_write_failure(n_rows)
        for item in items:
            if isinstance(item, _Feedback):
                _settle(item.future, error=StoreUnavailableError("the feedback was not stored"))

    # ------------------------------------------------------------------ retention
    def _prune_due(self) -> bool:
        if self.retention_s <= 0 and self.max_rows <= 0:
            return False
        if self._inserts_since_prune >= self.prune_every_rows:
            return True
        return time.monotonic() - self._last_prune >= self.prune_interval_s

    def _prune_guarded(self) -> None:
        self._last_prune = time.monotonic()
        self._inserts_since_prune = 0
        try:
            pruned = self._prune()
        except Exception as exc:
            self._rollback()
            kind = f"prune:{type(exc).__name__}"
            self._log_once(kind, "prediction log: pruning failed (%r)", exc)
            return
        if pruned:
            log.info("prediction log: pruned %d predictions past retention", pruned)

    def _prune(self) -> int:
        """Delete expired rows, oldest first, one small transaction at a time; writes queued
        meanwhile go in between chunks, so pruning never holds the log for long."""
        total = 0
        if self.retention_s > 0:
            cutoff = time.time() - self.retention_s
            while not self._stopping.is_set():
                n = self._prune_step(cutoff, self.prune_chunk)
                total += n
                if n < self.prune_chunk:
                    break
                self._write_waiting()
        if self.max_rows > 0:
            while not self._stopping.is_set():
                n = self._prune_step(None, self.prune_chunk, keep=self.max_rows)
                total += n
                if n < self.prune_chunk:  # the excess is gone, or another replica prunes
                    break
                self._write_waiting()
        return total

    def _write_waiting(self) -> None:
        self._last_progress = time.monotonic()
        batch = self._queue.get_batch(self.batch_size, timeout=0)
        if batch:
            self._write_guarded(batch)

    def _prune_step(self, cutoff: float | None, limit: int, keep: int = 0) -> int:
        self._busy_since = time.monotonic()
        try:
            rows = self._prune_chunk(cutoff, limit, keep)
        finally:
            self._busy_since = None
        self.rows_pruned += len(rows)
        if rows and self._on_pruned is not None:
            try:
                self._on_pruned(rows)
            except Exception as exc:
                self._log_once(f"hook:{type(exc).__name__}", "prediction log: prune hook failed")
        return len(rows)
