"""The prediction log on PostgreSQL: one database shared by every replica (psycopg 3 + a pool).

The writer is :class:`server.store.WriterStore`, as for SQLite: bounded queue, one writer
thread, feedback futures, row-by-row retry of a bad batch, restarts, retention. What differs:

- Connections come from a ``psycopg_pool.ConnectionPool``; each batch borrows one, checked
  before use, so a connection PostgreSQL cut (a restart) is replaced rather than reused.
- A database that cannot be reached is an outage, not a lost batch: the writer keeps the batch
  and retries it with backoff (``reconnect_min_s`` doubling up to ``reconnect_max_s``), while
  the bounded queue keeps predictions flowing and counts what it has to drop. Transient
  conflicts between replicas (deadlock, serialization failure) are retried the same way.
- Schema versions live in the table ``prediction_log_schema``; migrations run in one
  transaction under an advisory lock, so replicas starting together migrate once.
- Retention runs under an advisory lock too, so two replicas never prune at the same time (the
  row limit would be applied twice).
- Every replica writes, so none can count the figures from its own writes: a refresher thread
  reads them from the database every ``refresh_s``, in one read-only snapshot, and hands the
  connection to ``on_refresh`` (the monitor reads aggregates and its drift window there).

psycopg is imported by this module only; ``server.store`` never imports it, so a server on
SQLite runs without it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

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
    redact_url,
    write_in_order,
)
from server.threads import name_os_thread

log = logging.getLogger("server.store")

# advisory lock keys (any two 64-bit numbers no other client of the database uses)
MIGRATION_LOCK = 0x6361_7473_646F_6701  # "catsdog" + 1
PRUNE_LOCK = 0x6361_7473_646F_6702

_SCHEMA_V1 = (
    """CREATE TABLE predictions (
    prediction_id TEXT PRIMARY KEY,
    request_id    TEXT NOT NULL,
    ts            DOUBLE PRECISION NOT NULL,
    model_version TEXT NOT NULL,
    label         TEXT NOT NULL,
    confidence    DOUBLE PRECISION NOT NULL,
    probabilities TEXT NOT NULL,
    input_sha256  TEXT NOT NULL,
    width         INTEGER NOT NULL,
    height        INTEGER NOT NULL,
    brightness    DOUBLE PRECISION NOT NULL,
    latency_ms    DOUBLE PRECISION NOT NULL,
    route         TEXT NOT NULL
)""",
    "CREATE INDEX predictions_request_id ON predictions (request_id)",
    "CREATE INDEX predictions_version_ts ON predictions (model_version, ts)",
    "CREATE INDEX predictions_ts ON predictions (ts)",  # retention deletes the oldest first
    """CREATE TABLE feedback (
    prediction_id TEXT PRIMARY KEY REFERENCES predictions ON DELETE CASCADE,
    true_label    TEXT NOT NULL,
    ts            DOUBLE PRECISION NOT NULL
)""",
)
POOL_CLOSE_S = 1.0  # at shutdown, after the writer and the refresher (STORE_TIMEOUT_S)
_INSERT = (
    f"INSERT INTO predictions ({','.join(PREDICTION_COLUMNS)}) "
    f"VALUES ({','.join(['%s'] * len(PREDICTION_COLUMNS))})"
)
# SQLSTATEs that pass: the server is restarting or refusing connections for a while (57P0x,
# 53300), or two replicas' transactions collided (40001, 40P01); class 08 is a lost connection
_TRANSIENT = frozenset({"57P01", "57P02", "57P03", "53300", "40001", "40P01"})


def _create_v1(conn: psycopg.Connection[Any]) -> None:
    for statement in _SCHEMA_V1:
        conn.execute(statement)


# target version -> the step that brings the version before it there (0: an empty database)
MIGRATIONS: dict[int, Callable[[psycopg.Connection[Any]], None]] = {1: _create_v1}


def migrate(conn: psycopg.Connection[Any]) -> int:
    """Bring the database to :data:`SCHEMA_VERSION` in one transaction; returns the version
    found. Replicas that start together wait for one another on an advisory lock."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS prediction_log_schema (version INTEGER NOT NULL)")
        row = conn.execute("SELECT max(version) FROM prediction_log_schema").fetchone()
        found = int(row[0]) if row and row[0] is not None else 0
        if found > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"schema version {found} is newer than this server's {SCHEMA_VERSION}"
            )
        version = found
        for target in sorted(MIGRATIONS):
            if version < target:
                MIGRATIONS[target](conn)
                log.info("prediction log: schema migrated from version %d to %d", version, target)
                version = target
        conn.execute("DELETE FROM prediction_log_schema")
        conn.execute("INSERT INTO prediction_log_schema (version) VALUES (%s)", (version,))
    return found


def error_kind(exc: BaseException) -> str:
    """``outage`` (retry later), ``storage`` (the database refused: the rows are lost) or
    ``row`` (this row is bad), as :class:`server.store.WriterStore` needs it."""
    if isinstance(exc, PoolTimeout | psycopg.InterfaceError):
        return "outage"  # no connection could be had, or the one in hand is closed
    if isinstance(exc, psycopg.OperationalError):
        state = exc.sqlstate
        # no SQLSTATE: the client lost the connection (server gone, network down)
        if state is None or state.startswith("08") or state in _TRANSIENT:
            return "outage"
        return "storage"  # disk full, out of memory, a statement cancelled, ...
    if isinstance(exc, psycopg.InternalError):
        return "storage"
    return "row"  # bad data (DataError, IntegrityError), a value psycopg cannot send, a bug


def recent_window(
    conn: psycopg.Connection[Any], model_version: str, size: int
) -> list[tuple[float, int, int, float, str]]:
    """The model version's last ``size`` predictions (oldest first), as the drift window."""
    rows = conn.execute(
        "SELECT confidence, width, height, brightness, label FROM predictions "
        "WHERE model_version = %s ORDER BY ts DESC LIMIT %s",
        (model_version, size),
    ).fetchall()
    return [(float(c), int(w), int(h), float(b), str(lab)) for c, w, h, b, lab in reversed(rows)]


class PostgresStore(WriterStore):
    """:class:`server.store.PredictionStore` on a PostgreSQL database shared by every replica.

    ``url`` is a libpq URL (``postgresql://user:password@host:port/db``; the password may
    also come from ``PGPASSWORD`` or a passfile, which keeps it out of the URL). It is never
    logged or shown: :meth:`describe` gives the host, port and database only.
    """

    backend = "postgresql"
    shared = True

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 2,
        refresh_s: float = 1.0,
        on_refresh: Callable[[psycopg.Connection[Any]], None] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self._url = url
        self.pool_size = pool_size
        self.refresh_s = refresh_s
        self._on_refresh = on_refresh
        self._pool: ConnectionPool[psycopg.Connection[Any]] | None = None
        self._pool_lock = threading.Lock()
        self._refresher: threading.Thread | None = None
        self.refreshed_at: float | None = None  # monotonic time of the last good refresh
        # The pool logs a warning for every failed connection attempt; during an outage that
        # is one a second. The store logs the outage once (begin and end) instead.
        logging.getLogger("psycopg.pool").setLevel(logging.ERROR)

    def describe(self) -> str:
        return redact_url(self._url)

    def _connect_timeout(self) -> int:
        # libpq counts whole seconds and treats anything under 2 as 2
        return int(max(2, min(10, round(self.timeout_s))))

    def _wait_s(self) -> float:
        """How long one attempt waits for a pooled connection (a backoff step at most)."""
        if self._stopping.is_set() and self._outage:
            return 0.5  # shutting down while the database is away: do not hold the exit
        return min(self.timeout_s, max(self.reconnect_max_s, 0.5))

    # ------------------------------------------------------------------ open and close
    def _open_backend(self) -> None:
        # A direct connection first: its error says why (refused, password, no database),
        # where the pool would only time out.
        with psycopg.connect(
            self._url, autocommit=True, connect_timeout=self._connect_timeout()
        ) as conn:
            migrate(conn)
            if self._on_open is not None:
                try:  # before the first write, so cached figures never count a row twice
                    self._on_open(conn)
                except Exception:
                    log.exception("prediction log: could not read past figures; counting from 0")
        with self._pool_lock:
            if self._pool is None:
                self._pool = ConnectionPool(
                    self._url,
                    min_size=min(2, self.pool_size),
                    max_size=self.pool_size,
                    open=False,
                    name="prediction-log",
                    timeout=self.timeout_s,
                    # give up a reconnect series after the backoff ceiling: the writer's own
                    # retries then start a fresh attempt at once instead of the pool's
                    # 1, 2, 4 ... s schedule, so writes resume right after a restart
                    reconnect_timeout=self.reconnect_max_s,
                    check=ConnectionPool.check_connection,
                    kwargs={
                        "autocommit": True,
                        "connect_timeout": self._connect_timeout(),
                        "application_name": "catsdogs-server",
                    },
                )
                self._pool.open(wait=False)
        log.info(
            "prediction log: %s (PostgreSQL, pool of %d, schema version %d)",
            self.describe(),
            self.pool_size,
            SCHEMA_VERSION,
        )
        if self._on_refresh is not None and self._refresher is None:
            self.refresh()  # figures from the database before the first write is counted
            self._refresher = threading.Thread(
                target=self._refresh_loop, name="prediction-log-refresh", daemon=True
            )
            self._refresher.start()

    def stop(self, timeout: float = 10.0) -> None:
        super().stop(timeout)
        self._shutdown()  # also when the database was never reached (no writer to close it)

    def _close(self) -> None:
        self._shutdown()

    def _shutdown(self) -> None:
        refresher = self._refresher
        if refresher is not None and refresher is not threading.current_thread():
            refresher.join(self.timeout_s)
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close(timeout=POOL_CLOSE_S)

    # ------------------------------------------------------------------ writing
    def _connection(self) -> Any:
        pool = self._pool
        if pool is None:
            raise PoolTimeout("the connection pool is not open")
        return pool.connection(timeout=self._wait_s())

    def _error_kind(self, exc: BaseException) -> str:
        return error_kind(exc)

    def _commit(self, items: list[_Item]) -> list[tuple[_Item, _Outcome]]:
        with self._connection() as conn, conn.transaction():
            return write_in_order(
                items,
                lambda rows: self._insert(conn, rows),
                lambda item: apply_feedback(conn.execute, item, "%s"),
            )

    @staticmethod
    def _insert(conn: psycopg.Connection[Any], rows: list[PredictionEvent]) -> None:
        if rows:
            # plain INSERT: a duplicate prediction_id fails (and is counted), never hides
            with conn.cursor() as cur:
                cur.executemany(_INSERT, [r.as_tuple() for r in rows])

    # ------------------------------------------------------------------ retention
    def _prune_chunk(
        self, cutoff: float | None, limit: int, keep: int = 0
    ) -> list[PrunedPrediction]:
        where, params = ("WHERE ts < %s", (cutoff,)) if cutoff is not None else ("", ())
        with self._connection() as conn, conn.transaction():
            row = conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (PRUNE_LOCK,)).fetchone()
            if not row or not row[0]:
                return []  # another replica is pruning
            if cutoff is None:  # counted under the lock: what earlier chunks left, wherever
                (count,) = conn.execute("SELECT COUNT(*) FROM predictions").fetchone()
                limit = max(0, min(limit, int(count) - keep))
                if not limit:
                    return []
            rows = conn.execute(
                "WITH doomed AS (SELECT prediction_id FROM predictions "
                f"{where} ORDER BY ts, prediction_id LIMIT %s) "
                "DELETE FROM predictions p USING doomed d WHERE p.prediction_id = d.prediction_id "
                "RETURNING p.model_version, p.label, p.confidence, "
                "(SELECT f.true_label FROM feedback f WHERE f.prediction_id = p.prediction_id)",
                (*params, limit),
            ).fetchall()  # their feedback goes with them (ON DELETE CASCADE)
        return [PrunedPrediction(v, lab, float(c), t) for v, lab, c, t in rows]

    # ------------------------------------------------------------------ shared figures
    def refresh(self) -> bool:
        """Hand ``on_refresh`` a connection inside one read-only snapshot; False on failure."""
        if self._on_refresh is None or self._pool is None:
            return False
        try:
            with self._connection() as conn, conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                self._on_refresh(conn)
        except Exception as exc:
            if not self._stopping.is_set():
                self._log_once(
                    f"refresh:{type(exc).__name__}",
                    "prediction log: figures could not be read from %s (%s)",
                    self.describe(),
                    type(exc).__name__,
                )
            return False
        self.refreshed_at = time.monotonic()
        return True

    def refreshed_s_ago(self) -> float | None:
        at = self.refreshed_at
        return None if at is None else time.monotonic() - at

    def _refresh_loop(self) -> None:
        name_os_thread("predlog-refresh")
        while not self._stopping.wait(self.refresh_s):
            self.refresh()
