"""The PrometheusRule carries exactly monitoring/alerts.yml's groups, and promtool accepts them.

deploy/k8s/build_prometheusrule.py copies the groups (kustomize cannot put a file into a custom
resource); these tests fail when the copy is stale. The alert unit tests of
monitoring/alerts_test.yml also run here, on the rendered PrometheusRule's groups.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.deploy.manifests import APP_OVERLAYS, K8S, ROOT, Manifest, one

ALERTS = ROOT / "monitoring" / "alerts.yml"
ALERTS_TESTS = ROOT / "monitoring" / "alerts_test.yml"
REGENERATE = "run: python3 deploy/k8s/build_prometheusrule.py"


@pytest.mark.parametrize("name", ["base", *APP_OVERLAYS])
def test_prometheus_rule_has_the_alerts_of_monitoring(
    rendered: dict[str, list[Manifest]], name: str
) -> None:
    rule = one(rendered[name], "PrometheusRule", "catsdogs-serve")
    expected = yaml.safe_load(ALERTS.read_text())["groups"]
    assert rule["spec"]["groups"] == expected, f"stale PrometheusRule; {REGENERATE}"


def test_generated_file_is_current() -> None:
    result = subprocess.run(
        [sys.executable, str(K8S / "build_prometheusrule.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_promtool_accepts_the_rendered_rules(
    rendered: dict[str, list[Manifest]], tmp_path: Path
) -> None:
    rule = one(rendered["prod"], "PrometheusRule", "catsdogs-serve")
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    result = subprocess.run(
        ["promtool", "check", "rules", str(rules_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    alerts = sum(len(g["rules"]) for g in rule["spec"]["groups"])
    assert f"SUCCESS: {alerts} rules found" in result.stdout


def test_rendered_rules_pass_the_alert_unit_tests(
    rendered: dict[str, list[Manifest]], tmp_path: Path
) -> None:
    """monitoring/alerts_test.yml's cases, run on the PrometheusRule's groups instead of the file:
    the alerts Prometheus Operator loads behave as tested."""
    rule = one(rendered["prod"], "PrometheusRule", "catsdogs-serve")
    (tmp_path / "alerts.yml").write_text(
        yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False)
    )
    tests = yaml.safe_load(ALERTS_TESTS.read_text())
    assert tests["rule_files"] == ["alerts.yml"]
    (tmp_path / "alerts_test.yml").write_text(ALERTS_TESTS.read_text())
    result = subprocess.run(
        ["promtool", "test", "rules", "alerts_test.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
