"""Every rendered object validates: built-in kinds against Kubernetes 1.32's OpenAPI schemas
(kubernetes-validate, strict: unknown fields fail), custom resources against the upstream CRD
schemas vendored in schemas/ (jsonschema, with unknown fields failing as the API server's
strict field validation would).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from kubernetes_validate import utils as kv

from tests.deploy.manifests import K8S, KUSTOMIZATIONS, SCHEMAS, Manifest, one

# The cluster version the manifests are written for (kubectl here is 1.32 too).
KUBERNETES_VERSION = "1.32"
# API groups whose kinds come from CRDs; everything else must be a built-in kind.
CRD_GROUPS = ("serving.kserve.io", "monitoring.coreos.com")


def crd_schema_file(manifest: Manifest) -> Path:
    group, version = manifest["apiVersion"].split("/")
    return SCHEMAS / f"{group}_{version}_{manifest['kind'].lower()}.json"


def _strict(node: Any) -> Any:
    """CRD schemas leave unknown fields to pruning; make them an error, as `kubectl apply`
    (server-side strict field validation) does, so a misspelt field cannot pass."""
    if isinstance(node, list):
        return [_strict(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@cache
def crd_validator(path: Path) -> jsonschema.Draft7Validator:
    # OpenAPI v3 schemas of CRDs use draft-4-era keywords only; x-kubernetes-* are ignored.
    return jsonschema.Draft7Validator(_strict(json.loads(path.read_text())))


def validate(manifest: Manifest) -> None:
    """Raise on the first schema violation of one rendered object."""
    group = manifest["apiVersion"].rpartition("/")[0]
    if group in CRD_GROUPS:
        path = crd_schema_file(manifest)
        assert path.exists(), f"no vendored schema for {manifest['apiVersion']} {manifest['kind']}"
        crd_validator(path).validate(manifest)
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", manifest["metadata"]["name"])
    else:
        kv.validate(manifest, KUBERNETES_VERSION, strict=True)


def describe(manifest: Manifest) -> str:
    return f"{manifest['kind']}/{manifest['metadata']['name']}"


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_rendered_objects_validate(rendered: dict[str, list[Manifest]], name: str) -> None:
    docs = rendered[name]
    assert docs, f"{name} renders nothing"
    for manifest in docs:
        try:
            validate(manifest)
        except (jsonschema.ValidationError, kv.SchemaNotFoundError) as exc:
            message = getattr(exc, "message", str(exc))
            pytest.fail(f"{name}: {describe(manifest)}: {message}")


def test_every_kustomization_is_rendered() -> None:
    found = set()
    for path in K8S.rglob("kustomization.yaml"):
        if "kind: Component" not in path.read_text():
            found.add(path.parent.relative_to(K8S).as_posix())
    assert found == set(KUSTOMIZATIONS.values())


def test_every_custom_resource_kind_has_a_vendored_schema(
    rendered: dict[str, list[Manifest]],
) -> None:
    kinds = {
        (d["apiVersion"], d["kind"])
        for docs in rendered.values()
        for d in docs
        if d["apiVersion"].rpartition("/")[0] in CRD_GROUPS
    }
    assert kinds == {
        ("serving.kserve.io/v1beta1", "InferenceService"),
        ("serving.kserve.io/v1alpha1", "ServingRuntime"),
        ("monitoring.coreos.com/v1", "ServiceMonitor"),
        ("monitoring.coreos.com/v1", "PodMonitor"),
        ("monitoring.coreos.com/v1", "PrometheusRule"),
    }
    for api_version, kind in kinds:
        assert crd_schema_file({"apiVersion": api_version, "kind": kind}).exists()


# ---------------------------------------------------------------- the validators bite
def _broken(manifest: Manifest, path: list[str | int], key: str, value: Any) -> Manifest:
    broken = copy.deepcopy(manifest)
    node = broken
    for step in path:
        node = node[step]
    node[key] = value
    return broken


@pytest.mark.parametrize(
    ("kind", "name", "path", "key", "value"),
    [
        # a misspelt field of a built-in kind
        ("Deployment", "catsdogs-serve", ["spec", "template", "spec"], "terminationGrace", 20),
        # a wrong type in a built-in kind
        ("HorizontalPodAutoscaler", "catsdogs-serve", ["spec"], "minReplicas", "three"),
        # a misspelt field of a custom resource
        ("ServiceMonitor", "catsdogs-serve", ["spec"], "endpoint", []),
        # a value a CRD's pattern refuses (durations are like 5m)
        ("PrometheusRule", "catsdogs-serve", ["spec", "groups", 0, "rules", 0], "for", "5 min"),
    ],
)
def test_schema_violations_are_caught(
    rendered: dict[str, list[Manifest]],
    kind: str,
    name: str,
    path: list[str | int],
    key: str,
    value: Any,
) -> None:
    broken = _broken(one(rendered["prod"], kind, name), path, key, value)
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)


def test_inference_service_violations_are_caught(rendered: dict[str, list[Manifest]]) -> None:
    isvc = one(rendered["kserve"], "InferenceService")
    with pytest.raises(jsonschema.ValidationError):
        validate(_broken(isvc, ["spec", "predictor"], "canaryTrafficPrecent", 10))
    with pytest.raises(jsonschema.ValidationError):
        validate(_broken(isvc, ["spec", "predictor", "model"], "env", [{"value": "no name"}]))
    monitor = one(rendered["kserve"], "PodMonitor")
    with pytest.raises(jsonschema.ValidationError):
        validate(_broken(monitor, ["spec", "podMetricsEndpoints", 0], "portNum", 8080))


# ---------------------------------------------------------------- vendored schema provenance
def test_vendored_schemas_match_their_readme() -> None:
    """schemas/README.md records each file's source and sha256; a hand edit shows up here."""
    table = (SCHEMAS / "README.md").read_text()
    listed = dict(re.findall(r"\| `([^`]+\.json)` \|.*\| `([0-9a-f]{64})` \|", table))
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in SCHEMAS.glob("*.json")}
    assert files == listed
