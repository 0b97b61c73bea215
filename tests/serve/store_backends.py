"""The two prediction-log backends, seen alike by the shared store suite (test_store_contract).

Each :class:`Backend` names one empty store location and knows the few backend-specific moves
a test needs: open a store or the settings of a monitor on it, read what was stored, hold the
database's write lock from another session (so the writer waits, as behind a slow disk), and
write a log from a newer server.
"""

from __future__ import annotations

import contextlib
import itertools
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pg_server import PostgresServer

from server.settings import Settings
from server.store import WriterStore
from server.store_sqlite import SqliteStore, connect

_names = itertools.count()


class Backend:
    name = ""
    shared = False

    def store(self, **options: Any) -> WriterStore:
        raise NotImplementedError

    def settings(self, **changes: Any) -> Settings:
        raise NotImplementedError

    def rows(self, query: str) -> list[tuple[Any, ...]]:
        """A query without parameters, on a connection of its own."""
        raise NotImplementedError

    @contextlib.contextmanager
    def connection(self) -> Iterator[Any]:
        raise NotImplementedError
        yield

    @contextlib.contextmanager
    def hold_writes(self) -> Iterator[None]:
        """Another session holds the write lock until the block ends."""
        raise NotImplementedError
        yield

    def write_newer_schema(self) -> None:
        raise NotImplementedError

    def count(self, table: str = "predictions") -> int:
        return int(self.rows(f"SELECT COUNT(*) FROM {table}")[0][0])

    def ids(self) -> set[str]:
        return {r[0] for r in self.rows("SELECT prediction_id FROM predictions")}


def store_options(**changes: Any) -> dict[str, Any]:
    return {"max_queue": 10_000, "timeout_s": 5.0, **changes}


class SqliteBackend(Backend):
    name = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path  # parents are created by the store

    def store(self, **options: Any) -> WriterStore:
        return SqliteStore(self.path, **store_options(**options))

    def settings(self, **changes: Any) -> Settings:
        return Settings(prediction_log_path=str(self.path), **changes)

    def rows(self, query: str) -> list[tuple[Any, ...]]:
        with contextlib.closing(sqlite3.connect(self.path)) as conn:
            return conn.execute(query).fetchall()

    @contextlib.contextmanager
    def connection(self) -> Iterator[Any]:
        with contextlib.closing(sqlite3.connect(self.path)) as conn:
            yield conn

    @contextlib.contextmanager
    def hold_writes(self) -> Iterator[None]:
        blocker = connect(self.path)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()

    def write_newer_schema(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.closing(sqlite3.connect(self.path)) as conn:
            conn.execute("CREATE TABLE predictions (x)")
            conn.execute("PRAGMA user_version = 99")
            conn.commit()


class PostgresBackend(Backend):
    name = "postgresql"
    shared = True

    def __init__(self, server: PostgresServer) -> None:
        self.server = server
        self.url = server.create_database(f"store_{next(_names)}")

    def store(self, **options: Any) -> WriterStore:
        from server.store_postgres import PostgresStore

        return PostgresStore(self.url, **store_options(**options))

    def settings(self, **changes: Any) -> Settings:
        return Settings(prediction_log_url=self.url, **changes)

    def rows(self, query: str) -> list[tuple[Any, ...]]:
        with self.connection() as conn:
            return conn.execute(query).fetchall()

    @contextlib.contextmanager
    def connection(self) -> Iterator[Any]:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            yield conn

    @contextlib.contextmanager
    def hold_writes(self) -> Iterator[None]:
        import psycopg

        with psycopg.connect(self.url) as conn:
            conn.execute("LOCK TABLE predictions, feedback IN EXCLUSIVE MODE")
            try:
                yield
            finally:
                conn.rollback()

    def write_newer_schema(self) -> None:
        with self.connection() as conn:
            conn.execute("CREATE TABLE prediction_log_schema (version INTEGER NOT NULL)")
            conn.execute("INSERT INTO prediction_log_schema VALUES (99)")
            conn.execute("CREATE TABLE predictions (x INTEGER)")


BACKENDS = ("sqlite", "postgresql")


def make_backend(name: str, tmp_path: Path, postgres: Any) -> Backend:
    """``postgres`` is a callable giving the session's server (started only when needed)."""
    if name == "sqlite":
        return SqliteBackend(tmp_path / "nested" / "dir" / f"predictions{next(_names)}.db")
    return PostgresBackend(postgres())
