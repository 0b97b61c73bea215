"""Vendor the openAPIV3Schema of the custom resources the manifests use, from upstream CRDs.

Run on a machine that has the upstream repositories as git directories (a clone or a bare
mirror), at the pinned tags below; it rewrites the JSON files beside it and prints the lines of
README.md's table. The tests never run this: they read the vendored files, so nothing is
downloaded at test time.

    python tests/deploy/schemas/vendor_crds.py --kserve PATH/kserve.git \
        --prometheus-operator PATH/prometheus-operator.git

Descriptions are dropped (they are most of the bytes and play no part in validation);
everything else is kept as upstream wrote it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent

# (repository option, upstream repository, tag, CRD file in that repository)
SOURCES = (
    (
        "kserve",
        "kserve/kserve",
        "v0.20.0",
        "config/crd/full/serving.kserve.io_inferenceservices.yaml",
    ),
    (
        "kserve",
        "kserve/kserve",
        "v0.20.0",
        "config/crd/full/serving.kserve.io_servingruntimes.yaml",
    ),
    (
        "prometheus_operator",
        "prometheus-operator/prometheus-operator",
        "v0.93.0",
        "example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml",
    ),
    (
        "prometheus_operator",
        "prometheus-operator/prometheus-operator",
        "v0.93.0",
        "example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml",
    ),
    (
        "prometheus_operator",
        "prometheus-operator/prometheus-operator",
        "v0.93.0",
        "example/prometheus-operator-crd/monitoring.coreos.com_podmonitors.yaml",
    ),
)


def schema_file_name(group: str, version: str, kind: str) -> str:
    """The vendored file for one apiVersion and kind; the tests look schemas up by this name."""
    return f"{group}_{version}_{kind.lower()}.json"


def strip_descriptions(node: Any) -> Any:
    # Only string-valued "description" keys are documentation; a property that happens to be
    # called "description" has a schema (a dict) as its value and is kept.
    if isinstance(node, dict):
        return {
            k: strip_descriptions(v)
            for k, v in node.items()
            if not (k == "description" and isinstance(v, str))
        }
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def git_show(git_dir: Path, tag: str, path: str) -> tuple[str, str]:
    """The file's text at the tag and the tag's commit id."""
    commit = subprocess.run(
        ["git", "--git-dir", str(git_dir), "rev-parse", f"{tag}^{{commit}}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    text = subprocess.run(
        ["git", "--git-dir", str(git_dir), "show", f"{commit}:{path}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return text, commit


def vendor(crd_text: str) -> dict[str, dict[str, Any]]:
    """File name -> schema for every served version of the CRD."""
    crd = yaml.safe_load(crd_text)
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    return {
        schema_file_name(group, v["name"], kind): strip_descriptions(v["schema"]["openAPIV3Schema"])
        for v in crd["spec"]["versions"]
        if v.get("served", True)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kserve", type=Path, required=True, help="kserve/kserve git dir")
    parser.add_argument("--prometheus-operator", type=Path, required=True, help="git dir")
    args = parser.parse_args()
    for option, repo, tag, path in SOURCES:
        text, commit = git_show(getattr(args, option), tag, path)
        for name, schema in vendor(text).items():
            body = json.dumps(schema, sort_keys=True, separators=(",", ":")) + "\n"
            (HERE / name).write_text(body)
            digest = hashlib.sha256(body.encode()).hexdigest()
            print(f"| `{name}` | {repo} | {tag} | `{commit}` | `{path}` | `{digest}` |")


if __name__ == "__main__":
    main()
