"""Alerts that reach someone: the shipped rules, routes and receivers, checked by the real tools.

- ``promtool check rules`` and ``promtool test rules monitoring/alerts_test.yml``, which must hold a
  firing and a quiet case for every alert of ``monitoring/alerts.yml``;
- ``amtool check-config`` and ``amtool config routes test`` on ``monitoring/alertmanager.yml``;
- end to end: a real server whose prediction log cannot be opened, scraped by a real Prometheus
  with the shipped rules, whose alert a real Alertmanager delivers to a webhook started here.

``make prometheus alertmanager`` (prerequisites of ``make test-serve``) install Debian's binaries;
the tests start them in the foreground on free 127.0.0.1 ports with configs in a temp folder.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import yaml
from conftest import RED, ROOT, free_port, image_bytes, prom

pytestmark = [pytest.mark.serve]

MONITORING = ROOT / "monitoring"
ALERTS = MONITORING / "alerts.yml"
ALERTS_TEST = MONITORING / "alerts_test.yml"
ALERTMANAGER = MONITORING / "alertmanager.yml"
PROMETHEUS = MONITORING / "prometheus.yml"


def binary(name: str, env: str, make_target: str) -> str:
    found = os.environ.get(env) or shutil.which(name)
    if not found:
        pytest.fail(f"{name} is missing: run `make {make_target}` (Debian's package)")
    return found


def run_tool(args: list[str]) -> str:
    """Run a checker; a non-zero exit fails the test with the tool's own output."""
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=ROOT)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{output}"
    return output


def shipped_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


# ---------------------------------------------------------------------- the files, checked
def test_rules_pass_promtool_check_and_unit_tests():
    promtool = binary("promtool", "PROMTOOL_BIN", "prometheus")
    assert "SUCCESS" in run_tool([promtool, "check", "rules", str(ALERTS)])
    assert "SUCCESS" in run_tool([promtool, "test", "rules", str(ALERTS_TEST)])
    # the shipped prometheus.yml (scrape, rule files, alerting) is valid for this Prometheus
    run_tool([promtool, "check", "config", str(PROMETHEUS)])
    run_tool([promtool, "check", "config", str(MONITORING / "prometheus-scale.yml")])


def test_every_alert_is_unit_tested_firing_and_quiet():
    cases: dict[str, dict[str, int]] = {}
    for group in yaml.safe_load(ALERTS_TEST.read_text())["tests"]:
        for case in group.get("alert_rule_test", []):
            counts = cases.setdefault(case["alertname"], {"firing": 0, "quiet": 0})
            counts["firing" if case.get("exp_alerts") else "quiet"] += 1
    rules = shipped_rules()
    assert len(rules) >= 10
    for rule in rules:
        name = rule["alert"]
        assert cases.get(name, {}).get("firing"), f"{name}: no firing case in alerts_test.yml"
        assert cases[name]["quiet"], f"{name}: no case where it must stay quiet"
    assert set(cases) <= {rule["alert"] for rule in rules}, "a test names an unknown alert"


def test_every_alert_has_a_routed_severity_and_its_annotations():
    amtool = binary("amtool", "AMTOOL_BIN", "alertmanager")
    severities = set()
    for rule in shipped_rules():
        severity = rule["labels"]["severity"]
        assert severity in {"page", "ticket"}, (rule["alert"], severity)
        severities.add(severity)
        annotations = rule["annotations"]
        for key in ("summary", "description", "runbook"):
            assert annotations.get(key, "").strip(), f"{rule['alert']}: no {key}"
    assert severities == {"page", "ticket"}

    assert "SUCCESS" in run_tool([amtool, "check-config", str(ALERTMANAGER)])
    for severity in severities:  # each severity reaches the receiver named after it
        run_tool(
            [
                amtool,
                "config",
                "routes",
                "test",
                f"--config.file={ALERTMANAGER}",
                f"--verify.receivers={severity}",
                f"severity={severity}",
                "alertname=AnyAlert",
            ]
        )
    prometheus = yaml.safe_load(PROMETHEUS.read_text())
    targets = prometheus["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert targets == ["alertmanager:9093"]  # the compose service


# ---------------------------------------------------------------------- end to end
class Webhook:
    """An HTTP receiver on 127.0.0.1 that records every JSON body POSTed to it."""

    def __init__(self) -> None:
        self.received: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.put((self.path, json.loads(body)))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:  # keep the test output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait_for(self, match: Callable[[str, dict], bool], timeout: float) -> tuple[str, dict]:
        deadline = time.monotonic() + timeout
        seen = []
        while (left := deadline - time.monotonic()) > 0:
            try:
                path, body = self.received.get(timeout=left)
            except queue.Empty:
                break
            if match(path, body):
                return path, body
            seen.append(body)
        raise AssertionError(f"no matching notification within {timeout} s; got {seen}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


class Daemon:
    """A foreground binary with its output in a log file, stopped by its PID."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def wait_ready(self, url: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.log.stem} exited: {self.output()}")
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"{self.log.stem} not ready in {timeout} s: {self.output()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.close()


@pytest.fixture
def daemons() -> Iterator[Callable[[list[str], Path], Daemon]]:
    started: list[Daemon] = []

    def start(args: list[str], log: Path) -> Daemon:
        started.append(Daemon(args, log))
        return started[-1]

    yield start
    for daemon in reversed(started):
        daemon.stop()


def fast_rules(shipped: dict[str, Any]) -> dict[str, Any]:
    """The shipped rules with every `for:` set to 0s: the same expressions, firing at once."""
    for group in shipped["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                rule["for"] = "0s"
    return shipped


def fast_prometheus(shipped: dict[str, Any], target: str, alertmanager: str) -> dict[str, Any]:
    """The shipped prometheus.yml with test addresses and 1 s scrape and evaluation intervals."""
    shipped["global"].update(scrape_interval="1s", evaluation_interval="1s")
    (job,) = shipped["scrape_configs"]
    job.update(scrape_interval="1s", scrape_timeout="1s")
    job["static_configs"] = [{"targets": [target]}]
    shipped["alerting"]["alertmanagers"][0]["static_configs"] = [{"targets": [alertmanager]}]
    return shipped


def fast_alertmanager(shipped: dict[str, Any], webhook: str) -> dict[str, Any]:
    """The shipped routes and receivers, posting to `webhook` (same path) with 1 s grouping."""
    for receiver in shipped["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = urlunsplit(urlsplit(hook["url"])._replace(netloc=webhook))
    routes = [shipped["route"], *shipped["route"].get("routes", [])]
    for route in routes:
        for key in ("group_wait", "group_interval"):
            if key in route:
                route[key] = "1s"
    return shipped


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def start_alertmanager(
    daemons: Callable[[list[str], Path], Daemon], webhook: Webhook, tmp_path: Path
) -> tuple[Daemon, int]:
    """A real Alertmanager with the shipped routes (1 s grouping), delivering to ``webhook``,
    ready on a free 127.0.0.1 port: (the daemon, its port)."""
    alertmanager = binary("prometheus-alertmanager", "ALERTMANAGER_BIN", "alertmanager")
    port = free_port()
    config = write_yaml(
        tmp_path / "am" / "alertmanager.yml",
        fast_alertmanager(yaml.safe_load(ALERTMANAGER.read_text()), webhook.address),
    )
    am = daemons(
        [
            alertmanager,
            f"--config.file={config}",
            f"--storage.path={tmp_path / 'am' / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",  # no gossip cluster: one instance, no extra port
        ],
        tmp_path / "alertmanager.log",
    )
    am.wait_ready(f"http://127.0.0.1:{port}/-/ready")
    return am, port


@pytest.mark.slow
def test_failing_prediction_log_pages_the_webhook(server_process, webhook, daemons, tmp_path):
    prometheus = binary("prometheus", "PROMETHEUS_BIN", "prometheus")
    started = time.monotonic()

    # 1. the bad state: the log's folder is a regular file, so the log can never be opened
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    server = server_process(PREDICTION_LOG_PATH=str(blocker / "predictions.db"))
    server.wait_ready()
    for _ in range(3):
        r = httpx.post(
            f"{server.url}/predict",
            content=image_bytes(RED),
            headers={"Content-Type": "image/jpeg"},
        )
        assert r.status_code == 200, r.text  # serving goes on; only the log fails
    metrics = httpx.get(f"{server.url}/metrics").text
    assert prom(metrics, "prediction_log_write_failures_total") == 3
    assert prom(metrics, "prediction_log_healthy") == 0
    target = server.url.removeprefix("http://")

    # 2. Alertmanager with the shipped routes, delivering to the webhook
    am, am_port = start_alertmanager(daemons, webhook, tmp_path)

    # 3. Prometheus scraping the server with the shipped rules, sending to that Alertmanager
    config_dir = tmp_path / "prometheus"
    write_yaml(config_dir / "alerts.yml", fast_rules(yaml.safe_load(ALERTS.read_text())))
    prom_config = write_yaml(
        config_dir / "prometheus.yml",
        fast_prometheus(yaml.safe_load(PROMETHEUS.read_text()), target, f"127.0.0.1:{am_port}"),
    )
    prom_port = free_port()
    prom_proc = daemons(
        [
            prometheus,
            f"--config.file={prom_config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        tmp_path / "prometheus.log",
    )
    prom_proc.wait_ready(f"http://127.0.0.1:{prom_port}/-/ready")

    # 4. the alert arrives at the webhook through the `ticket` route, with its shipped labels
    def is_log_alert(path: str, body: dict) -> bool:
        return body.get("status") == "firing" and any(
            a["labels"].get("alertname") == "PredictionLogFailing" for a in body["alerts"]
        )

    try:
        path, body = webhook.wait_for(is_log_alert, timeout=60)
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}\n--- prometheus\n{prom_proc.output()}\n--- alertmanager\n{am.output()}"
        ) from None
    assert path == "/alerts"  # the shipped receiver's path
    assert body["receiver"] == "ticket"
    assert body["groupLabels"] == {"alertname": "PredictionLogFailing"}
    (alert,) = [a for a in body["alerts"] if a["labels"]["alertname"] == "PredictionLogFailing"]
    assert alert["status"] == "firing"
    assert alert["labels"] == {
        "alertname": "PredictionLogFailing",
        "severity": "ticket",
        "job": "catsdogs-serve",
        "instance": target,
    }
    (rule,) = [r for r in shipped_rules() if r["alert"] == "PredictionLogFailing"]
    assert alert["annotations"]["summary"] == rule["annotations"]["summary"]
    assert target in alert["annotations"]["description"]  # templated by the real Prometheus
    assert alert["annotations"]["runbook"] == rule["annotations"]["runbook"]
    assert time.monotonic() - started < 60


@pytest.mark.slow
def test_an_overload_hides_no_error_page(webhook, daemons, tmp_path):
    """On a real Alertmanager with the shipped config, ServeOverloaded suppresses nothing:
    ServeErrors leaves the 503s of load shedding out itself (monitoring/alerts_test.yml), so
    when it fires during an overload it is another failure. The inhibition that stood in for
    that hid a namespace's 500s and 504s for as long as it was at capacity."""
    _, port = start_alertmanager(daemons, webhook, tmp_path)
    base = f"http://127.0.0.1:{port}"
    alerts = [
        ("ServeOverloaded", "catsdogs-dev"),
        ("ServeErrors", "catsdogs-dev"),
        ("ServeErrors", "catsdogs"),
    ]
    r = httpx.post(
        f"{base}/api/v2/alerts",
        json=[
            {"labels": {"alertname": name, "severity": "page", "namespace": namespace}}
            for name, namespace in alerts
        ],
        timeout=5,
    )
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 15
    while True:
        states = {
            (a["labels"]["alertname"], a["labels"]["namespace"]): a["status"]["state"]
            for a in httpx.get(f"{base}/api/v2/alerts", timeout=5).json()
        }
        if len(states) == 3 and "unprocessed" not in states.values():
            break
        assert time.monotonic() < deadline, states
        time.sleep(0.2)
    assert states == {
        ("ServeOverloaded", "catsdogs-dev"): "active",
        ("ServeErrors", "catsdogs-dev"): "active",
        ("ServeErrors", "catsdogs"): "active",
    }
