"""What only the PostgreSQL prediction log does, on a real PostgreSQL (tests/serve/pg_server.py):
ride out an outage, wait for a database that is not up yet, count a refused write, migrate once
when replicas start together, and let several replicas share feedback, figures and drift.

Everything both backends promise is tested on both in test_store_contract.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest
from conftest import ROOT, TINY_VERSION, image_bytes, prom, serve
from pg_server import PostgresServer
from prometheus_client import CollectorRegistry, generate_latest
from store_helpers import Counts, event, wait_for

from catsdogs.contract import ModelContract
from catsdogs.preprocessing import PreprocessSpec
from server.app import create_app
from server.monitor import Monitor, PredictionEvent
from server.settings import Settings, SettingsError
from server.store import redact_url
from server.store_postgres import PostgresStore

pytestmark = pytest.mark.serve


def _event(i: int, label: str = "cat", confidence: float = 0.9) -> PredictionEvent:
    return event(i, label, confidence, height=240 + i % 7)


def _wait(predicate, timeout: float = 15.0) -> bool:
    return wait_for(predicate, timeout, interval=0.02)


def _store(url: str, **changes) -> PostgresStore:
    options = {"max_queue": 10_000, "timeout_s": 5.0, "reconnect_max_s": 0.5, **changes}
    return PostgresStore(url, **options)


def _count(url: str, table: str = "predictions") -> int:
    import psycopg

    with psycopg.connect(url) as conn:
        return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


@pytest.fixture
def own_server() -> Iterator[PostgresServer]:
    """A server of this test's own, as the test stops and restarts it."""
    with PostgresServer() as server:
        yield server


@pytest.fixture
def db_url(postgres: PostgresServer, request: pytest.FixtureRequest) -> str:
    return postgres.create_database(f"pg_{request.node.name.lower()[:40]}")


# ---------------------------------------------------------------------- outages
def test_an_outage_loses_nothing_and_writes_resume(own_server: PostgresServer, caplog):
    url = own_server.create_database("outage")
    counts = Counts()
    s = _store(url, on_write_failure=counts.fail, on_drop=counts.drop)
    with caplog.at_level(logging.INFO, logger="server.store"):
        s.start()
        for i in range(20):
            s.record(_event(i))
        assert _wait(lambda: s.rows_written == 20)

        own_server.stop()
        started = time.monotonic()
        accepted = [s.record(_event(i)) for i in range(20, 50)]
        assert time.monotonic() - started < 0.5  # predictions never wait for the database
        assert accepted == [True] * 30
        future = s.submit_feedback("dog", time.time(), prediction_id="req-3")
        assert _wait(lambda: s.status() == "failing", timeout=10)
        assert s.writer_alive()
        assert not s.writer_stuck()  # waiting to retry is not being stuck
        assert not future.done()

        own_server.start()
        assert future.result(30) is not None  # the feedback waited for the database
        assert _wait(lambda: s.rows_written == 50, timeout=30)
        assert _wait(lambda: s.status() == "ok")
        s.stop()
    assert (counts.failures, counts.drops) == (0, 0)
    assert _count(url) == 50
    assert _count(url, "feedback") == 1
    assert s.outages == 1
    messages = [r.getMessage() for r in caplog.records]
    assert sum("cannot be reached (" in m for m in messages) == 1  # once per outage
    assert sum("reachable again" in m for m in messages) == 1
    assert not any(own_server.password in m for m in messages)


def test_a_database_not_up_yet_is_waited_for(own_server: PostgresServer):
    url = own_server.create_database("late")
    own_server.stop()
    s = _store(url)
    started = time.monotonic()
    s.start()
    assert time.monotonic() - started < 5.0  # the server starts without its database
    assert s.status() == "unavailable"
    assert s.open_error is None  # not given up: retried with backoff
    assert s.record(_event(1))  # queued meanwhile
    own_server.start()
    assert _wait(lambda: s.status() == "ok", timeout=30)
    assert _wait(lambda: s.rows_written == 1)
    s.stop()
    assert _count(url) == 1


def test_stopping_before_the_database_ever_answered_counts_what_was_queued(
    own_server: PostgresServer, caplog
):
    url = own_server.create_database("never")
    own_server.stop()
    counts = Counts()
    s = _store(url, on_write_failure=counts.fail)
    with caplog.at_level(logging.INFO, logger="server.store"):
        s.start()
        for i in range(3):
            assert s.record(_event(i))
        started = time.monotonic()
        s.stop()
    assert time.monotonic() - started < 8.0
    assert counts.failures == 3  # lost, and counted
    messages = [r.getMessage() for r in caplog.records]
    reached = [m for m in messages if "cannot be reached yet" in m]
    assert len(reached) == 1
    assert "OperationalError: connection failed" in reached[0]  # libpq's reason, once
    assert not any("cannot open" in m for m in messages)  # not a broken store: just stopped
    assert not any(own_server.password in m for m in messages)


def test_a_refused_write_is_counted_and_writes_resume_after_it(db_url: str):
    import psycopg

    counts = Counts()
    s = _store(db_url, on_write_failure=counts.fail)
    s.start()
    s.record(_event(0))
    assert _wait(lambda: s.rows_written == 1)
    # the database refuses every insert as a full disk would (SQLSTATE 53100, disk_full)
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'no space left' USING ERRCODE = 'disk_full'; END $$"
        )
        conn.execute(
            "CREATE TRIGGER disk_full BEFORE INSERT ON predictions "
            "FOR EACH ROW EXECUTE FUNCTION refuse()"
        )
        for i in range(1, 11):
            s.record(_event(i))
        assert _wait(lambda: s.status() == "failing")
        assert _wait(lambda: counts.failures == 10)  # lost and counted, not retried forever
        conn.execute("DROP TRIGGER disk_full ON predictions")
    s.record(_event(11))
    assert _wait(lambda: s.rows_written == 2)
    assert s.status() == "ok"
    s.stop()
    assert _count(db_url) == 2
    assert s.outages == 0


# ---------------------------------------------------------------------- replicas
def test_replicas_starting_together_migrate_once(db_url: str):
    import psycopg

    stores = [_store(db_url) for _ in range(4)]
    threads = [threading.Thread(target=s.start) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [s.status() for s in stores] == ["ok"] * 4
    for i, s in enumerate(stores):
        s.record(_event(i))
    for s in stores:
        s.stop()
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT version FROM prediction_log_schema").fetchall() == [(1,)]
        tables = {
            r[0]
            for r in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            ).fetchall()
        }
    assert tables == {"predictions", "feedback", "prediction_log_schema"}
    assert _count(db_url) == 4


def _contract(reference: dict | None = None) -> ModelContract:
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
        extra={"reference_stats": reference} if reference is not None else {},
    )


def test_replicas_share_feedback_figures_and_drift(db_url: str):
    settings = Settings(
        prediction_log_url=db_url, prediction_log_refresh_s=0.2, store_timeout_s=1.0
    )

    async def run() -> dict:
        registries = [CollectorRegistry(), CollectorRegistry()]
        a, b = (Monitor(settings, _contract(), r) for r in registries)
        await a.start()
        await b.start()
        for i in range(40):
            a.observe(_event(i, "cat" if i % 4 else "dog", 0.8))
        # at once, to the other replica: the rows may still be in a's queue
        results = [await b.add_feedback("cat", prediction_id=f"req-{i}") for i in range(40)]
        started = time.monotonic()
        unknown = await b.add_feedback("cat", prediction_id="never-served")
        waited_unknown = time.monotonic() - started
        await asyncio.sleep(0.6)  # past two refresh intervals
        summaries = [a.summary(), b.summary()]
        drifts = [a.drift(), b.drift()]
        texts = [generate_latest(r).decode() for r in registries]
        await a.stop()
        await b.stop()
        return {
            "results": results,
            "unknown": unknown,
            "waited_unknown": waited_unknown,
            "summaries": summaries,
            "drifts": drifts,
            "texts": texts,
        }

    out = asyncio.run(run())
    assert all(r is not None for r in out["results"])  # every feedback found its prediction
    assert out["unknown"] is None
    assert 0.45 < out["waited_unknown"] < 1.0  # looked up again for half of STORE_TIMEOUT_S
    figures = [s["model_versions"] for s in out["summaries"]]
    assert figures[0] == figures[1]  # the same answer from every replica
    fig = figures[0]["v1"]
    assert (fig["predictions"], fig["feedback"], fig["correct"]) == (40, 40, 30)
    assert fig["accuracy"] == pytest.approx(0.75)
    for summary in out["summaries"]:
        store = summary["store"]
        assert (store["backend"], store["shared"]) == ("postgresql", True)
        assert store["figures"]["refresh_interval_s"] == 0.2
        assert store["figures"]["refreshed_s_ago"] < 1.0
    # b served none of them, yet its drift window holds them all
    assert [d["window"]["size"] for d in out["drifts"]] == [40, 40]
    for text in out["texts"]:
        assert prom(text, "monitor_live_accuracy", model_version="v1") == pytest.approx(0.75)
        assert prom(text, "monitor_logged_predictions", model_version="v1") == 40
        assert 0 <= prom(text, "monitor_figures_age_seconds") < 1.0


def test_the_app_on_postgresql_predicts_takes_feedback_and_reports(settings: Settings, db_url: str):
    app = create_app(replace(settings, prediction_log_url=db_url, prediction_log_refresh_s=0.1))

    async def run() -> tuple[dict, dict, dict]:
        async with serve(app) as client:
            predicted = (
                await client.post(
                    "/predict",
                    content=image_bytes((220, 30, 30)),
                    headers={"content-type": "image/jpeg"},
                )
            ).json()
            answer = await client.post(
                "/feedback", json={"prediction_id": predicted["prediction_id"], "label": "dog"}
            )
            assert answer.status_code == 201, answer.text
            await asyncio.sleep(0.4)
            summary = (await client.get("/monitoring/summary")).json()
            ready = (await client.get("/health/ready")).json()
        return predicted, summary, ready

    predicted, summary, ready = asyncio.run(run())
    assert predicted["label"] == "cat"
    assert ready["prediction_log"] == "ok"
    fig = summary["model_versions"][TINY_VERSION]
    assert (fig["predictions"], fig["feedback"], fig["correct"]) == (1, 1, 0)
    assert summary["store"]["url"] == redact_url(db_url)
    assert "@" not in summary["store"]["url"]  # neither user nor password


# ---------------------------------------------------------------------- the URL
def test_the_password_in_the_url_is_never_logged_or_shown(
    postgres: PostgresServer, db_url: str, caplog
):
    settings = Settings(prediction_log_url=db_url)
    assert postgres.password not in repr(settings)
    with pytest.raises(SettingsError) as refused:
        Settings(prediction_log_url=db_url + " trailing space")
    assert postgres.password not in str(refused.value)

    async def run() -> tuple[str, str]:
        registry = CollectorRegistry()
        monitor = Monitor(settings, _contract(), registry)
        await monitor.start()
        monitor.observe(_event(1))
        summary = json.dumps(monitor.summary())
        text = generate_latest(registry).decode()
        await monitor.stop()
        return summary, text

    with caplog.at_level(logging.DEBUG):
        summary, text = asyncio.run(run())
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "postgresql://127.0.0.1:" in logged  # the store says where it is...
    for shown in (logged, summary, text):
        assert postgres.password not in shown  # ...but never with the password


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, ("sqlite", "var/predictions.db")),
        ({"PREDICTION_LOG_PATH": "/data/p.db"}, ("sqlite", "/data/p.db")),
        ({"PREDICTION_LOG_URL": "sqlite:///var/other.db"}, ("sqlite", "var/other.db")),
        ({"PREDICTION_LOG_URL": "sqlite:////abs/p.db"}, ("sqlite", "/abs/p.db")),
        # the URL is the one source once set: the path is ignored
        (
            {"PREDICTION_LOG_URL": "postgresql://u@db:5432/p", "PREDICTION_LOG_PATH": "/x.db"},
            ("postgresql", "postgresql://u@db:5432/p"),
        ),
    ],
)
def test_the_store_is_the_url_when_set_else_the_sqlite_path(env: dict, expected: tuple):
    assert Settings.from_env(env).prediction_log == expected


@pytest.mark.parametrize(
    "url", ["mysql://db/p", "sqlite:///", "sqlite:/p.db", "postgresql://u:pw@db/p\nx", "p.db"]
)
def test_a_bad_store_url_is_refused_without_echoing_it(url: str):
    with pytest.raises(SettingsError, match="PREDICTION_LOG_URL") as refused:
        Settings.from_env({"PREDICTION_LOG_URL": url})
    assert url not in str(refused.value)


def test_redact_url_keeps_host_port_and_database_only():
    url = "postgresql://app:s3cret@db.internal:5433/logs?sslmode=require&password=x"
    assert redact_url(url) == "postgresql://db.internal:5433/logs"
    assert redact_url("postgresql://[::1]:5432/p") == "postgresql://[::1]:5432/p"
    assert "s3cret" not in redact_url("postgresql://app:s3cret@db:notaport/p")


def test_a_server_on_sqlite_never_imports_psycopg(tmp_path):
    code = (
        "import asyncio, sys\n"
        "from prometheus_client import CollectorRegistry\n"
        "import server.app, server.__main__, server.monitor as m\n"
        "from server.settings import Settings\n"
        "from conftest import tiny_contract\n"
        f"s = Settings(prediction_log_path={str(tmp_path / 'p.db')!r})\n"
        "mon = m.Monitor(s, tiny_contract(), CollectorRegistry())\n"
        "asyncio.run(mon.start()); asyncio.run(mon.stop())\n"
        "print(sorted(n for n in sys.modules if n.startswith('psycopg')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT / "tests" / "serve",
        env={"PYTHONPATH": f"{ROOT}:{ROOT / 'tests' / 'serve'}:{':'.join(sys.path[1:])}"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_replica_pruning_between_anothers_chunks_keeps_the_row_limit(db_url: str):
    """Two replicas prune to MAX_ROWS, the second while the first is between two chunks: the
    newest MAX_ROWS stay. Each counted the excess once, before its chunks, so the first went
    on deleting an excess the second had already removed (150 of 300 rows left, not 200)."""
    a, b = (_store(db_url, max_rows=0, prune_chunk=50) for _ in range(2))
    a.start()
    b.start()
    for i in range(300):
        a.record(_event(i))
    assert _wait(lambda: _count(db_url) == 300)
    for s in (a, b):
        s._last_prune = time.monotonic()  # their writers' own pruning stays out of the way
        s.max_rows = 200
    pruned = []

    def between_chunks() -> None:
        if not pruned:
            pruned.append(b._prune())

    a._write_waiting = between_chunks
    total = a._prune()
    a.stop()
    b.stop()
    assert _count(db_url) == 200
    assert total + pruned[0] == 100
    assert pruned[0] > 0
