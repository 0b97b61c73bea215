"""Rendering and reading the manifests under deploy/k8s, for the deployment suite.

``kubectl kustomize`` renders each directory exactly as a user would before ``kubectl apply``;
the tests read the rendered objects, never the source files, so patches and generators are
checked as they take effect.
"""

from __future__ import annotations

import base64
import json
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
SCHEMAS = Path(__file__).resolve().parent / "schemas"

# Every kustomization under deploy/k8s (components are rendered through dev-pvc);
# test_every_kustomization_is_rendered keeps this list complete.
KUSTOMIZATIONS = {
    "base": "base",
    "dev": "overlays/dev",
    "dev-pvc": "overlays/dev-pvc",
    "prod": "overlays/prod",
    "prometheus-adapter": "prometheus-adapter",
    "kserve": "kserve/base",
    "kserve-canary": "kserve/canary",
}
# Where the app runs as a plain Deployment (the others are KServe's or the adapter's).
APP_OVERLAYS = ("dev", "dev-pvc", "prod")

Manifest = dict[str, Any]


def render(directory: Path) -> list[Manifest]:
    result = subprocess.run(
        ["kubectl", "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(docs: list[Manifest], kind: str, name: str | None = None) -> list[Manifest]:
    return [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def one(docs: list[Manifest], kind: str, name: str | None = None) -> Manifest:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


# ---------------------------------------------------------------- the image
@dataclass(frozen=True)
class Image:
    """What Dockerfile.serve's final stage sets: the defaults every manifest builds on."""

    env: dict[str, str]
    user: str
    workdir: str
    entrypoint: list[str]


def serving_image(dockerfile: Path = ROOT / "Dockerfile.serve") -> Image:
    # Join continuation lines, drop comments, keep the last stage's ENV, USER, WORKDIR, ENTRYPOINT.
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    env: dict[str, str] = {}
    user = workdir = ""
    entrypoint: list[str] = []
    for line in text.splitlines():
        instruction, _, rest = line.strip().partition(" ")
        match instruction.upper():
            case "FROM":
                env, user, workdir, entrypoint = {}, "", "", []
            case "ENV":
                pairs = [token.split("=", 1) for token in shlex.split(rest)]
                assert all(len(p) == 2 for p in pairs), f"ENV without KEY=VALUE: {line}"
                env.update(dict(pairs))
            case "USER":
                user = rest.strip()
            case "WORKDIR":
                workdir = rest.strip()
            case "ENTRYPOINT":
                entrypoint = json.loads(rest)
    return Image(env=env, user=user, workdir=workdir, entrypoint=entrypoint)


# ---------------------------------------------------------------- workloads
@dataclass(frozen=True)
class Workload:
    """The server's container as the cluster will run it: its pod and its environment."""

    source: str  # where it comes from, for messages: "prod Deployment/catsdogs-serve"
    pod: Manifest  # the pod spec: volumes, securityContext, terminationGracePeriodSeconds
    container: Manifest
    env: dict[str, str | None]  # every variable the manifests set; None = from a Secret not here


def _object_data(obj: Manifest) -> dict[str, str]:
    if obj["kind"] == "Secret":
        data = {k: base64.b64decode(v).decode() for k, v in obj.get("data", {}).items()}
        return data | obj.get("stringData", {})
    return dict(obj.get("data", {}))


def _env_value(item: Manifest, docs: list[Manifest]) -> str | None:
    if "value" in item:
        return str(item["value"])
    source = item.get("valueFrom", {})
    for ref_key, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
        if ref_key in source:
            ref = source[ref_key]
            found = find(docs, kind, ref["name"])
            if not found:
                return None  # created outside these manifests (KServe's Secret)
            data = _object_data(found[0])
            if ref["key"] not in data and ref.get("optional"):
                return None  # an optional key left out: the variable is not set
            assert ref["key"] in data, f"{kind} {ref['name']} has no key {ref['key']}"
            return data[ref["key"]]
    return None


def container_env(container: Manifest, docs: list[Manifest]) -> dict[str, str | None]:
    """Variables from envFrom (all keys of the referenced objects) and env, env winning."""
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        kind = "ConfigMap" if "configMapRef" in source else "Secret"
        ref = source.get("configMapRef") or source["secretRef"]
        env.update(_object_data(one(docs, kind, ref["name"])))
    for item in container.get("env", []):
        env[item["name"]] = _env_value(item, docs)
    return env


def deployment_workload(name: str, docs: list[Manifest]) -> Workload:
    deployment = one(docs, "Deployment", "catsdogs-serve")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    return Workload(f"{name} Deployment", pod, container, container_env(container, docs))


def kserve_workload(name: str, docs: list[Manifest]) -> Workload:
    """KServe's pod: the ServingRuntime's container with the InferenceService's model fields
    (env, volume mounts, resources) merged in, and the predictor's pod-level fields."""
    predictor = one(docs, "InferenceService")["spec"]["predictor"]
    runtime = one(docs, "ServingRuntime", predictor["model"]["runtime"])
    [container] = [c for c in runtime["spec"]["containers"] if c["name"] == "kserve-container"]
    model = predictor["model"]
    merged = dict(container)
    merged["env"] = container.get("env", []) + model.get("env", [])
    merged["volumeMounts"] = container.get("volumeMounts", []) + model.get("volumeMounts", [])
    merged["resources"] = model.get("resources", container.get("resources", {}))
    scaling = ("minReplicas", "maxReplicas", "scaleMetric", "scaleTarget", "containerConcurrency")
    pod = {k: v for k, v in predictor.items() if k != "model" and k not in scaling}
    return Workload(f"{name} InferenceService", pod, merged, container_env(merged, docs))
