"""The SQLite backend of the prediction log (the default): one file in WAL mode, one process.

:class:`SqliteStore` is a :class:`server.store.WriterStore`: the queue, the writer thread, the
retries and retention are that class's; this module holds what is SQLite's own: the schema and
its in-place migrations (``PRAGMA user_version``; version 0 keyed predictions and feedback by the
HTTP request id, version 1 keys both by a server-made ``prediction_id``), connections with the
pragmas the log relies on, which errors are a lock, the disk or one row, and the grouped reads
the live figures start from (:func:`iter_aggregates`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from server.store import (
    PREDICTION_COLUMNS,
    SCHEMA_VERSION,
    PredictionEvent,
    PrunedPrediction,
    SchemaVersionError,
    WriterStore,
    _Item,
    _Outcome,
    apply_feedback,
    write_in_order,
)

log = logging.getLogger("server.store")

_SCHEMA_V1 = (
    """CREATE TABLE predictions (
    prediction_id TEXT PRIMARY KEY,
    request_id    TEXT NOT NULL,
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
)""",
    "CREATE INDEX predictions_request_id ON predictions (request_id)",
    "CREATE INDEX predictions_version_ts ON predictions (model_version, ts)",
    "CREATE INDEX predictions_ts ON predictions (ts)",  # retention deletes the oldest first
    """CREATE TABLE feedback (
    prediction_id TEXT PRIMARY KEY,
    true_label    TEXT NOT NULL,
    ts            REAL NOT NULL
)""",
)

_INSERT_HEAD = f"INSERT INTO predictions ({','.join(PREDICTION_COLUMNS)}) VALUES "
_ROW = f"({','.join('?' * len(PREDICTION_COLUMNS))})"
INSERT_ROWS = 64  # rows per INSERT statement (64 x 13 parameters, far below SQLite's limit)


# Where SQLite's unix VFS puts its temporary files (os_unix.c, unixTempFileDir): the first of
# these that is a folder it may write, after PRAGMA temp_store_directory; the variables are read
# once, when the sqlite3 module loads.
_SQLITE_TEMP_VARIABLES = ("SQLITE_TMPDIR", "TMPDIR")
_SQLITE_TEMP_FOLDERS = ("/var/tmp", "/usr/tmp", "/tmp", ".")


def sqlite_has_temp_folder() -> bool:
    """Whether SQLite finds a folder for its temporary files, as it looks for one."""
    folders = [os.environ.get(name) for name in _SQLITE_TEMP_VARIABLES]
    folders += _SQLITE_TEMP_FOLDERS
    return any(f and os.path.isdir(f) and os.access(f, os.W_OK | os.X_OK) for f in folders)


_temp_folder_lock = threading.Lock()
_temp_folder: str | None = None  # what temp_files_beside gave SQLite, once per process


def temp_files_beside(conn: sqlite3.Connection, path: Path) -> None:
    """Give SQLite the log's own folder for its temporary files where it finds none.

    SQLite spills a large sort (the grouped read that rebuilds the live figures at start, once
    the log passes some 50,000 rows) to a temporary file; on a read-only root with no writable
    temporary folder that read failed with "disk I/O error" and the figures counted from zero.
    The log's folder is writable wherever the log is. ``temp_store_directory`` is process-wide
    and not safe to change while other threads use SQLite, so it is set once, on the writer's
    first open (before any reader), and never where SQLite already has a folder.
    """
    global _temp_folder
    with _temp_folder_lock:
        if _temp_folder is not None or sqlite_has_temp_folder():
            return
        _temp_folder = str(path.resolve().parent)
        conn.execute("PRAGMA temp_store_directory = '{}'".format(_temp_folder.replace("'", "''")))
    log.info("prediction log: no writable temporary folder (SQLITE_TMPDIR, TMPDIR, /tmp, ...); "
             "SQLite's temporary files go in %s", _temp_folder)  # fmt: skip


def connect(
    path: Path, *, readonly: bool = False, check_same_thread: bool = True
) -> sqlite3.Connection:
    """A connection with the pragmas the log relies on (WAL: readers never block the writer)."""
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)
    else:
        conn = sqlite3.connect(
            path, timeout=10.0, isolation_level=None, check_same_thread=check_same_thread
        )
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a process crash; only power loss can cost the last commits
        conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


# ---------------------------------------------------------------------- schema
def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    row = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,))
    return row.fetchone() is not None


def _create_v1(conn: sqlite3.Connection) -> None:
    for statement in _SCHEMA_V1:
        conn.execute(statement)


def _migrate_0_to_1(conn: sqlite3.Connection) -> None:
    """Key predictions and feedback by prediction_id; old rows keep their request id as it."""
    conn.execute("ALTER TABLE predictions RENAME TO predictions_v0")
    conn.execute("DROP INDEX IF EXISTS predictions_version_ts")  # moved with the old table
    if _has_table(conn, "feedback"):
        conn.execute("ALTER TABLE feedback RENAME TO feedback_v0")
    else:
        conn.execute("CREATE TABLE feedback_v0 (request_id TEXT, true_label TEXT, ts REAL)")
    _create_v1(conn)
    kept = ",".join(PREDICTION_COLUMNS[2:])
    conn.execute(
        f"INSERT INTO predictions (prediction_id, request_id, {kept}) "
        f"SELECT request_id, request_id, {kept} FROM predictions_v0"
    )
    conn.execute(
        "INSERT INTO feedback (prediction_id, true_label, ts) "
        "SELECT request_id, true_label, ts FROM feedback_v0"
    )
    conn.execute("DROP TABLE predictions_v0")
    conn.execute("DROP TABLE feedback_v0")


# target version -> the step that brings the version before it there
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {1: _migrate_0_to_1}


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the log to :data:`SCHEMA_VERSION` in one transaction; returns the version found."""
    conn.execute("BEGIN IMMEDIATE")  # two processes opening one file migrate it once
    try:
        found = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if found > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"schema version {found} is newer than this server's {SCHEMA_VERSION}"
            )
        version = found
        if version == 0 and not _has_table(conn, "predictions"):
            _create_v1(conn)  # a new log starts at the current version
            version = SCHEMA_VERSION
        for target in sorted(MIGRATIONS):
            if version < target:
                MIGRATIONS[target](conn)
                log.info("prediction log: schema migrated from version %d to %d", version, target)
                version = target
        conn.execute(f"PRAGMA user_version = {int(version)}")
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    return found


def _is_busy(exc: BaseException) -> bool:
    """SQLite's ``database is locked``: another connection held the write lock past the busy
    timeout (a ``VACUUM``, a backup, a script's long transaction). It passes; nothing is wrong
    with the rows or the file, so the batch waits and retries as through an outage."""
    code = getattr(exc, "sqlite_errorcode", None)
    return (
        isinstance(exc, sqlite3.OperationalError)
        and code is not None
        and ((code & 0xFF) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED))
    )


def _is_storage_error(exc: BaseException) -> bool:
    """The database itself failed (full disk, I/O): retrying row by row cannot help (a lock is
    :func:`_is_busy`'s, waited out instead).

    Anything else (a value SQLite cannot bind, a duplicate key, a bug) is about one row.
    """
    return isinstance(exc, sqlite3.OperationalError) or type(exc) is sqlite3.DatabaseError


class SqliteStore(WriterStore):
    """:class:`PredictionStore` on one SQLite file in WAL mode, written by one thread.

    One process per file: the figures the owner caches from the after-commit hooks are the
    whole truth (see :class:`WriterStore` for the writer's behaviour).
    """

    backend = "sqlite"

    def __init__(
        self,
        path: str | Path,
        *,
        max_page_count: int | None = None,  # caps the file size (tests use it as a full disk)
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.path = Path(path)
        self.max_page_count = max_page_count
        self._conn: sqlite3.Connection | None = None
        self._owner: int | None = None  # the lock file's descriptor while this store holds it
        self._owner_checked = False

    def describe(self) -> str:
        return str(self.path)

    def _own_file(self) -> None:
        """Say when another server writes this file too: each keeps its own live figures, so
        /monitoring/summary and the monitor_* metrics then disagree between the two. A lock on
        ``<file>.owner`` (never on the database, whose locks are SQLite's), held while open."""
        try:  # the database's own mode applies (umask): a log several users write stays so
            fd = os.open(f"{self.path}.owner", os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:  # a read-only folder, another user's file: the log still works
            log.warning("prediction log %s: cannot tell whether another server writes it: %s",
                        self.path, exc)  # fmt: skip
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held: another process has this log open
            holder = os.pread(fd, 16, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            log.warning(
                "prediction log %s is written by another server too (pid %s): each keeps its "
                "own live figures, which then disagree; give each its own PREDICTION_LOG_PATH, "
                "or share PostgreSQL (PREDICTION_LOG_URL)",
                self.path,
                holder,
            )
            return
        except OSError as exc:  # no locks on this file system (some network mounts)
            os.close(fd)
            log.warning("prediction log %s: cannot tell whether another server writes it: %s",
                        self.path, exc)  # fmt: skip
            return
        with contextlib.suppress(OSError):  # the pid only names the holder in that warning
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._owner = fd

    def _open_backend(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self._owner_checked:  # once: a retried open says nothing again
            self._owner_checked = True
            self._own_file()
        conn = connect(self.path, check_same_thread=False)  # a restarted writer reuses it
        try:
            temp_files_beside(conn, self.path)
            if self.max_page_count is not None:
                conn.execute(f"PRAGMA max_page_count={int(self.max_page_count)}")
            migrate(conn)
        except BaseException:
            conn.close()
            raise
        if self._on_open is not None:
            try:  # before the first write, so cached figures never count a row twice
                self._on_open(conn)
            except Exception:
                log.exception("prediction log: could not read past figures; counting from zero")
        self._conn = conn
        log.info("prediction log: %s (SQLite, WAL, schema version %d)", self.path, SCHEMA_VERSION)

    def _error_kind(self, exc: BaseException) -> str:
        if _is_busy(exc):
            return "outage"
        return "storage" if _is_storage_error(exc) else "row"

    def _recover(self) -> None:
        assert self._conn is not None
        if self._conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")

    def _close(self) -> None:
        assert self._conn is not None
        # a checkpoint is an optimisation; the WAL is replayed on the next open anyway
        with contextlib.suppress(sqlite3.Error):
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        with contextlib.suppress(sqlite3.Error):
            self._conn.close()
        if self._owner is not None:
            os.close(self._owner)  # the lock goes with it
            self._owner = None

    def _commit(self, items: list[_Item]) -> list[tuple[_Item, _Outcome]]:
        conn = self._conn
        assert conn is not None
        conn.execute("BEGIN IMMEDIATE")
        done = write_in_order(
            items,
            lambda rows: self._insert(conn, rows),
            lambda item: apply_feedback(conn.execute, item, "?"),
        )
        conn.execute("COMMIT")
        return done

    def _rollback(self) -> None:
        # the failed statement may already have rolled the transaction back
        if self._conn is not None and self._conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")

    @staticmethod
    def _insert(conn: sqlite3.Connection, rows: list[PredictionEvent]) -> None:
        # plain INSERT: a duplicate prediction_id fails (and is counted), never hides. Up to
        # INSERT_ROWS rows a statement: sqlite3 releases the GIL around every step, so
        # executemany's row-by-row steps hand the GIL to the event loop and wait to get it back
        # once per row, while one statement of many rows steps once
        for start in range(0, len(rows), INSERT_ROWS):
            part = rows[start : start + INSERT_ROWS]
            values = ",".join([_ROW] * len(part))
            conn.execute(_INSERT_HEAD + values, [v for r in part for v in r.as_tuple()])

    def _prune_chunk(
        self, cutoff: float | None, limit: int, keep: int = 0
    ) -> list[PrunedPrediction]:
        conn = self._conn
        assert conn is not None
        where, params = ("WHERE p.ts < ?", (cutoff,)) if cutoff is not None else ("", ())
        conn.execute("BEGIN IMMEDIATE")
        if cutoff is None:
            (count,) = conn.execute("SELECT COUNT(*) FROM predictions").fetchone()
            limit = max(0, min(limit, int(count) - keep))
        rows = conn.execute(
            "SELECT p.rowid, p.prediction_id, p.model_version, p.label, p.confidence, "
            "f.true_label FROM predictions p "
            f"LEFT JOIN feedback f ON f.prediction_id = p.prediction_id {where} "
            "ORDER BY p.ts, p.rowid LIMIT ?",
            (*params, limit),
        ).fetchall()
        if rows:
            placeholders = ",".join("?" * len(rows))
            ids = [r[1] for r in rows]
            rowids = [r[0] for r in rows]
            conn.execute(f"DELETE FROM feedback WHERE prediction_id IN ({placeholders})", ids)
            conn.execute(f"DELETE FROM predictions WHERE rowid IN ({placeholders})", rowids)
        conn.execute("COMMIT")
        return [PrunedPrediction(r[2], r[3], r[4], r[5]) for r in rows]


# ---------------------------------------------------------------------- reading
def iter_aggregates(
    conn: sqlite3.Connection, confidence_edges: Iterable[float]
) -> tuple[list[tuple[str, str, int, int, float]], list[tuple[str, str, str, int]]]:
    """Grouped figures straight from SQL (C speed, no row loop in Python).

    Returns (predictions, feedback): rows of (model_version, label, confidence_bin, count,
    confidence_sum) and of (model_version, true_label, predicted_label, count).
    """
    inner = list(confidence_edges)[1:-1]
    # the same binning as catsdogs.drift.bin_counts: a value equal to an edge goes up
    case = " ".join(f"WHEN confidence < {float(e)!r} THEN {i}" for i, e in enumerate(inner))
    bin_expr = f"CASE {case} ELSE {len(inner)} END"
    predictions = conn.execute(
        f"SELECT model_version, label, {bin_expr} AS b, COUNT(*), SUM(confidence) "
        "FROM predictions GROUP BY model_version, label, b"
    ).fetchall()
    feedback = conn.execute(
        "SELECT p.model_version, f.true_label, p.label, COUNT(*) FROM feedback f "
        "JOIN predictions p ON p.prediction_id = f.prediction_id "
        "GROUP BY p.model_version, f.true_label, p.label"
    ).fetchall()
    return predictions, feedback
