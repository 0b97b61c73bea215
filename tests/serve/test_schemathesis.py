"""Schemathesis against a real server process's own ``/openapi.json``.

Every operation of the document is called with generated requests, valid and invalid (examples,
coverage, fuzzing and stateful phases), and each answer is checked: never a 5xx, a documented
status, content type, headers and body schema, invalid data refused with a 4xx, a 405 with an
``Allow`` header for undocumented methods. ``FUZZ_EXAMPLES`` sets the examples per operation
(default 8; ``make fuzz`` runs 2000). The JSON report of a failed run is kept under pytest's
temporary folder and its failures are printed with a command to reproduce each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ServerProcess

pytestmark = [pytest.mark.serve, pytest.mark.slow]

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "8"))
SEED = os.environ.get("FUZZ_SEED", "20261202")  # fixed by default: the same run every time
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "missing_required_header",
    "unsupported_method",
    "allow_header_conformance",
]
# Refusing invalid data with 413 is right too (a form of 40 unknown fields is "too many parts");
# the rest is schemathesis's default list.
CONFIG = """
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428",
                     "429", "5xx"]
"""
# positive_data_acceptance is left out: an upload is "binary" in the document, and most binary
# strings are not images, so a schema-valid upload is often rightly refused with 422.


def _run_schemathesis(server: ServerProcess, report: Path) -> subprocess.CompletedProcess[str]:
    # Bounded by the examples per operation (--max-time would keep fuzzing until it is spent);
    # the subprocess timeout is the backstop.
    timeout = 240 + EXAMPLES // 2
    config = report.parent / "schemathesis.toml"
    config.write_text(CONFIG)
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(config),
        "run",
        f"{server.url}/openapi.json",
        "--url",
        server.url,
        "--checks",
        ",".join(CHECKS),
        "--max-examples",
        str(EXAMPLES),
        "--seed",
        SEED,
        "--workers",
        "1",
        "--request-timeout",
        "30",
        "--report",
        "json",
        "--report-json-path",
        str(report),
        "--output-truncate",
        "true",
    ]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "", "NO_COLOR": "1", "COLUMNS": "120"}
    return subprocess.run(
        command,
        cwd=report.parent,  # anything it writes stays out of the working tree
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_schemathesis_finds_no_failures(server_process, tmp_path: Path) -> None:
    server: ServerProcess = server_process()
    server.wait_ready()
    report = tmp_path / "schemathesis.json"
    result = _run_schemathesis(server, report)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"schemathesis failures (report: {report}):\n{output[-20000:]}"
    assert "Tested:" in output, output[-4000:]
    assert json.loads(report.read_text()), "empty schemathesis report"
    log = server.log.read_text(errors="replace")
    assert "Traceback" not in log, log[log.find("Traceback") - 300 :][:4000]
