"""A real Prometheus (Debian's package) scrapes a real server with the shipped configuration.

``make prometheus`` (a prerequisite of ``make test-serve``) installs the binary; this test runs
it itself on a free 127.0.0.1 port with a temporary data dir, never the packaged service.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from conftest import RED, ROOT, free_port, image_bytes

pytestmark = [pytest.mark.serve, pytest.mark.slow]

MONITORING = ROOT / "monitoring"


def prometheus_binary() -> str:
    found = os.environ.get("PROMETHEUS_BIN") or shutil.which("prometheus")
    if not found:
        pytest.fail("the prometheus binary is missing: run `make prometheus` (Debian's package)")
    return found


def query(base: str, expr: str) -> list[dict]:
    r = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert r.status_code == 200, (expr, body)
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def prometheus(tmp_path: Path):
    procs: list[subprocess.Popen] = []

    def start(target: str) -> str:
        config = tmp_path / "prometheus"
        config.mkdir()
        shipped = (MONITORING / "prometheus.yml").read_text()
        assert '"serve:8000"' in shipped
        (config / "prometheus.yml").write_text(shipped.replace('"serve:8000"', f'"{target}"'))
        shutil.copy(MONITORING / "alerts.yml", config / "alerts.yml")
        port = free_port()
        log = (tmp_path / "prometheus.log").open("wb")
        proc = subprocess.Popen(
            [
                prometheus_binary(),
                f"--config.file={config / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        procs.append(proc)
        base = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            try:
                return httpx.get(f"{base}/-/ready", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, 30, "prometheus to be ready")
        return base

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_prometheus_scrapes_the_server(server_process, prometheus):
    server = server_process()
    server.wait_ready()
    for _ in range(3):
        r = httpx.post(
            f"{server.url}/predict",
            content=image_bytes(RED),
            headers={"Content-Type": "image/jpeg"},
        )
        assert r.status_code == 200
    base = prometheus(server.url.removeprefix("http://"))

    up = wait_for(lambda: query(base, 'up{job="catsdogs-serve"}'), 30, "a first scrape")
    assert up[0]["value"][1] == "1"
    logged = wait_for(
        lambda: query(base, 'monitor_logged_predictions{label="cat"}'), 30, "server metrics"
    )
    assert float(logged[0]["value"][1]) == 3
    requests = query(base, 'sum(http_requests_total{route="/predict",status="200"})')
    assert float(requests[0]["value"][1]) == 3

    rules = httpx.get(f"{base}/api/v1/rules", timeout=10).json()["data"]["groups"]
    names = {rule["name"] for group in rules for rule in group["rules"]}
    assert {"ServeDown", "LiveAccuracyLow", "InputDrift", "PredictionLogFailing"} <= names

    # every query of the shipped Grafana dashboard is valid PromQL for this Prometheus
    dashboard = json.loads((MONITORING / "grafana/dashboards/catsdogs.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    for expr in exprs:
        query(base, expr.replace("$__rate_interval", "1m"))


def _alert_expr(name: str) -> str:
    import yaml

    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    (expr,) = [r["expr"] for g in rules["groups"] for r in g["rules"] if r.get("alert") == name]
    return expr


def test_a_total_outage_at_low_traffic_trips_the_error_alert(server_process, prometheus):
    """Every prediction fails (504: a deadline no run can meet) while probes and scrapes keep
    answering 200, at six predictions in all: the shipped ServeErrors expression, evaluated by
    a real Prometheus on the real server's series, sees 100% and not 6 in 40-odd requests; and
    the first failures after the start count (the series exist from the start). (Five failures
    are the least it pages on: two 500s among a few predictions a minute are no outage.)"""
    server = server_process(REQUEST_TIMEOUT_S="0.0001")
    server.wait_ready()
    base = prometheus(server.url.removeprefix("http://"))
    wait_for(lambda: query(base, 'up{job="catsdogs-serve"} == 1'), 30, "a first scrape")
    for _ in range(40):  # a readiness probe's traffic
        assert httpx.get(f"{server.url}/health/ready").status_code == 200
    for _ in range(6):
        r = httpx.post(
            f"{server.url}/predict",
            content=image_bytes(RED),
            headers={"Content-Type": "image/jpeg"},
        )
        assert r.status_code == 504, r.text
    wait_for(
        lambda: query(base, 'sum(http_requests_total{route="/predict",status="504"}) == 6'),
        30,
        "a scrape after the failures",
    )
    firing = query(base, _alert_expr("ServeErrors"))
    assert [float(v["value"][1]) for v in firing] == [1.0]


def test_a_crash_loop_trips_the_restart_alert(server_process, prometheus):
    """A server killed (SIGKILL, as the OOM killer does) and started again on its address, twice,
    is `up` at nearly every scrape and counts no 5xx for the requests it cut: the shipped
    ServeRestarting expression, on a real Prometheus, sees its two new start times."""
    port = str(free_port())
    server = server_process(PORT=port)
    server.wait_ready()
    base = prometheus(f"127.0.0.1:{port}")
    starts = 'process_start_time_seconds{job="catsdogs-serve"}'
    wait_for(lambda: query(base, starts), 30, "a first scrape")
    assert not query(base, _alert_expr("ServeRestarting"))
    for n in (1, 2):
        server.proc.kill()
        server.proc.wait(10)
        server = server_process(PORT=port)
        server.wait_ready()
        wait_for(lambda n=n: query(base, f"changes({starts}[15m]) >= {n}"), 30, f"restart {n}")
    (firing,) = query(base, _alert_expr("ServeRestarting"))
    assert float(firing["value"][1]) == 2
