"""Write components/alerts/prometheusrule.yaml from monitoring/alerts.yml: one source for the
alerts, which the app's base and KServe's both include.

Prometheus reads monitoring/alerts.yml directly (compose); Prometheus Operator needs the same
groups inside a PrometheusRule. kustomize cannot embed a file into a custom resource's spec
(configMapGenerator makes ConfigMaps only), so this script copies the groups and tests/deploy
checks that the copy is current.

    python3 deploy/k8s/build_prometheusrule.py           # rewrite the file
    python3 deploy/k8s/build_prometheusrule.py --check   # exit 1 when it is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "monitoring" / "alerts.yml"
OUTPUT = Path(__file__).resolve().parent / "components" / "alerts" / "prometheusrule.yaml"
HEADER = (
    "# Generated from monitoring/alerts.yml by deploy/k8s/build_prometheusrule.py; do not edit.\n"
    "# Prometheus Operator selects rules by label: match your Prometheus's ruleSelector.\n"
)


def prometheus_rule(alerts: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "catsdogs-serve",
            "labels": {"app.kubernetes.io/name": "catsdogs-serve"},
        },
        "spec": {"groups": alerts["groups"]},
    }


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (folded PromQL expressions) as literal blocks, as people write them."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render(alerts_text: str) -> str:
    rule = prometheus_rule(yaml.safe_load(alerts_text))
    return HEADER + yaml.dump(rule, Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if the file is not current")
    args = parser.parse_args(argv)
    text = render(ALERTS.read_text())
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.exists() else ""
        if current != text:
            print(
                f"{OUTPUT} is stale: run python3 {Path(__file__).relative_to(ROOT)}",
                file=sys.stderr,
            )
            return 1
        return 0
    OUTPUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
