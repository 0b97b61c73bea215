"""A real, short locust run against a real server subprocess serving a tiny model."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.serverproc import ROOT, SERVE_PYTHON
from loadtest.tiny_model import write_tiny_model

pytestmark = [pytest.mark.load, pytest.mark.slow]

GROUPS = ("/predict [multipart]", "/predict [raw]", "/predict/batch", "/metadata", "/health/ready")


def write_budgets(path: Path, p95_ms: float, min_requests: int) -> Path:
    lines = ["max_fail_ratio = 0.0", f"min_requests = {min_requests}"]
    for name in GROUPS:
        lines += [f'[groups."{name}"]', f"p95_ms = {p95_ms}", "min_requests = 1"]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_load(
    tmp_path: Path, budgets: Path, run_time: str, users: int = 4
) -> subprocess.CompletedProcess[str]:
    model = write_tiny_model(tmp_path / "tiny.onnx")
    cmd = [sys.executable, "-m", "loadtest.run_load", "--model", str(model)]
    cmd += ["--users", str(users), "--spawn-rate", str(users), "--run-time", run_time]
    cmd += ["--out", str(tmp_path / "out"), "--thresholds", str(budgets)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def server_pid(output: str) -> int:
    match = re.search(r"server pid (\d+) on", output)
    assert match, output
    return int(match.group(1))


@pytest.fixture(autouse=True)
def _serving_env() -> None:
    assert SERVE_PYTHON.exists(), "the serving environment is missing: run `make venv-serve`"


def test_clean_run_has_zero_failures_and_exits_0(tmp_path: Path) -> None:
    # Every group must see a request, and tasks are drawn at random: /health/ready has weight 1
    # of 13, so 4 users for 10 s (about 40 requests) missed it about once in 30 runs (CI saw
    # it); 8 users for 12 s make about 100 requests, and a miss (12/13)^100, about 1 in 3,000.
    proc = run_load(tmp_path, write_budgets(tmp_path / "ok.toml", 5000, 10), "12s", users=8)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    with (tmp_path / "out" / "locust_stats.csv").open() as fh:
        rows = {row["Name"]: row for row in csv.DictReader(fh)}
    for name in GROUPS:
        assert int(rows[name]["Request Count"]) >= 1, name
    assert int(rows["Aggregated"]["Failure Count"]) == 0
    assert int(rows["Aggregated"]["Request Count"]) >= 10
    assert (tmp_path / "out" / "locust.html").stat().st_size > 0
    assert not Path(f"/proc/{server_pid(output)}").exists()  # the server was stopped


def test_breached_budget_exits_non_zero_naming_it(tmp_path: Path) -> None:
    # no real server answers within 0.001 ms: every group that ran breaches its p95 budget
    proc = run_load(tmp_path, write_budgets(tmp_path / "strict.toml", 0.001, 1), "3s")
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert re.search(r"load threshold breached \[groups\./[^]]*\.p95_ms\]", output), output[-3000:]
    assert not Path(f"/proc/{server_pid(output)}").exists()
