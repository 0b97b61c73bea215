"""The manifests agree with the code they run: settings, flags, ports, probe paths, writable
paths, drain time, the image's user, metric and model names.

Each check reads the rendered manifests and asks the code itself (``Settings.from_env``, the
server's argument parser, the real app's routes, Dockerfile.serve), so renaming a setting, a
flag, a route or a port on either side fails here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from pathlib import PurePosixPath

import httpx
import pytest
import yaml

from server.__main__ import build_settings, parse_args
from server.app import create_app
from server.settings import Settings
from server.store import STOP_TIMEOUT_S
from server.store_postgres import POOL_CLOSE_S
from tests.deploy.manifests import (
    APP_OVERLAYS,
    ROOT,
    Manifest,
    Workload,
    deployment_workload,
    find,
    kserve_workload,
    one,
    serving_image,
)

SETTINGS = frozenset(f.name.upper() for f in dataclasses.fields(Settings))
IMAGE = serving_image()
WORKLOADS = [*APP_OVERLAYS, "kserve", "kserve-canary"]


def workload(rendered: dict[str, list[Manifest]], name: str) -> Workload:
    docs = rendered[name]
    if name.startswith("kserve"):
        return kserve_workload(name, docs)
    return deployment_workload(name, docs)


def effective_settings(w: Workload) -> Settings:
    """What the server will run with: the image's ENV, the manifests' env, then the flags.
    A value from a Secret that is not in the render (KServe's) keeps its default here."""
    env = IMAGE.env | {k: v for k, v in w.env.items() if v is not None}
    try:
        args = parse_args(w.container.get("args", []))
    except SystemExit:
        pytest.fail(f"{w.source}: container args {w.container.get('args')} are not server flags")
    return build_settings(args, env)


def get(settings: Settings, path: str) -> httpx.Response:
    """One GET against the real app (no model loaded, no lifespan): the route table as shipped."""

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(settings))
        async with httpx.AsyncClient(transport=transport, base_url="http://pod") as client:
            return await client.get(path)

    return asyncio.run(call())


def container_port(w: Workload, port: int | str) -> int:
    """A probe's or Service's port, resolved by name against the container's ports."""
    if isinstance(port, int):
        return port
    [number] = [p["containerPort"] for p in w.container["ports"] if p.get("name") == port]
    return number


def probes(w: Workload) -> dict[str, Manifest]:
    kinds = ("startupProbe", "readinessProbe", "livenessProbe")
    return {k: w.container[k]["httpGet"] for k in kinds if k in w.container}


def test_startup_allows_the_servers_own_start_up_deadlines(
    rendered: dict[str, list[Manifest]],
) -> None:
    """The kubelet must not kill a start the server still allows itself: a registry download
    (server.model_uri) and optimising a cascade (server.inference), each with its deadline."""
    from server.inference import OPTIMIZE_TIMEOUT_S
    from server.model_uri import _DOWNLOAD_DEADLINE_S

    for name in WORKLOADS:
        probe = workload(rendered, name).container["startupProbe"]
        window = probe["periodSeconds"] * probe["failureThreshold"]
        assert window >= _DOWNLOAD_DEADLINE_S + OPTIMIZE_TIMEOUT_S, (name, window)


@pytest.mark.parametrize("name", ["kserve", "kserve-canary"])
def test_knative_waits_longer_than_the_startup_probe(
    rendered: dict[str, list[Manifest]], name: str
) -> None:
    """Knative fails a revision whose pod is not ready by its progress deadline (600 s unless
    told otherwise), whatever the startup probe still allows: the runtime's annotation, which
    KServe copies to the revision's pod template, must outlast the probe's window."""
    predictor = one(rendered[name], "InferenceService")["spec"]["predictor"]
    runtime = one(rendered[name], "ServingRuntime", predictor["model"]["runtime"])
    deadline = runtime["spec"]["annotations"]["serving.knative.dev/progress-deadline"]
    assert re.fullmatch(r"\d+s", deadline), deadline
    probe = workload(rendered, name).container["startupProbe"]
    window = probe["periodSeconds"] * probe["failureThreshold"]
    assert int(deadline[:-1]) > window, (deadline, window)


@pytest.mark.parametrize("name", APP_OVERLAYS)
def test_a_rollout_waits_longer_than_the_startup_probe(
    rendered: dict[str, list[Manifest]], name: str
) -> None:
    """A Deployment whose new pods are not ready by its progress deadline (600 s unless told)
    is reported failed (`kubectl rollout status` exits non-zero), whatever the probe allows."""
    deployment = one(rendered[name], "Deployment")
    probe = workload(rendered, name).container["startupProbe"]
    window = probe["periodSeconds"] * probe["failureThreshold"]
    assert deployment["spec"].get("progressDeadlineSeconds", 600) > window


# ---------------------------------------------------------------- replicas
MULTI_REPLICA = ["prod", "kserve", "kserve-canary"]


@pytest.mark.parametrize("name", MULTI_REPLICA)
def test_replicas_share_one_prediction_log(rendered: dict[str, list[Manifest]], name: str) -> None:
    """Several pods (an HPA, KServe's autoscaler, a canary's two revisions) on a log each would
    answer 404 to feedback for what another pod served and report figures of their own: they
    share the PostgreSQL store (from a Secret), re-read at an interval the scan can afford."""
    w = workload(rendered, name)
    assert "PREDICTION_LOG_URL" in w.env, w.source
    value = w.env["PREDICTION_LOG_URL"]
    assert value is None or value.startswith("postgresql://"), w.source
    assert effective_settings(w).prediction_log_refresh_s >= 10, w.source


@pytest.mark.parametrize("name", ["kserve", "kserve-canary"])
def test_kserve_scales_out_before_a_pod_refuses(
    rendered: dict[str, list[Manifest]], name: str
) -> None:
    """Knative's default target (100 requests in flight x 70%) lies past the 64 images a pod
    admits (MAX_QUEUE_SIZE), whose 503s come back fast: it never scaled out. The target and the
    queue-proxy's hard limit stay below what a pod admits."""
    predictor = one(rendered[name], "InferenceService")["spec"]["predictor"]
    admitted = effective_settings(workload(rendered, name)).max_queue_size
    assert predictor["scaleMetric"] == "concurrency"
    assert 0 < predictor["scaleTarget"] < predictor["containerConcurrency"] <= admitted


# ---------------------------------------------------------------- settings and flags
@pytest.mark.parametrize("name", WORKLOADS)
def test_every_env_var_is_a_setting(rendered: dict[str, list[Manifest]], name: str) -> None:
    w = workload(rendered, name)
    unknown = sorted(set(w.env) - SETTINGS)
    assert not unknown, f"{w.source} sets {unknown}: not fields of server.settings.Settings"
    effective_settings(w)  # and the values pass Settings' own validation


@pytest.mark.parametrize("name", WORKLOADS)
def test_the_image_entry_point_runs_the_server(
    rendered: dict[str, list[Manifest]], name: str
) -> None:
    w = workload(rendered, name)
    assert "command" not in w.container, "the image's ENTRYPOINT (python -m server) must run"
    assert IMAGE.entrypoint == ["python", "-m", "server"]


def test_a_renamed_setting_or_flag_would_fail(rendered: dict[str, list[Manifest]]) -> None:
    """The checks above are not vacuous: an unknown variable or flag is caught."""
    w = workload(rendered, "prod")
    renamed = dataclasses.replace(w, env=w.env | {"GRACEFUL_TIMEOUT_SECONDS": "10"})
    assert set(renamed.env) - SETTINGS == {"GRACEFUL_TIMEOUT_SECONDS"}
    bad_flag = dataclasses.replace(w, container=w.container | {"args": ["--listen=8000"]})
    with pytest.raises(pytest.fail.Exception):
        effective_settings(bad_flag)


# ---------------------------------------------------------------- ports and probes
@pytest.mark.parametrize("name", WORKLOADS)
def test_ports_agree(rendered: dict[str, list[Manifest]], name: str) -> None:
    w = workload(rendered, name)
    settings = effective_settings(w)
    assert settings.host == "0.0.0.0", "the server must listen beyond loopback in a pod"
    assert [p["containerPort"] for p in w.container["ports"]] == [settings.port]
    for kind, probe in probes(w).items():
        assert container_port(w, probe["port"]) == settings.port, f"{w.source} {kind}"


@pytest.mark.parametrize("name", APP_OVERLAYS)
def test_service_monitor_and_policy_reach_the_pods(
    rendered: dict[str, list[Manifest]], name: str
) -> None:
    docs = rendered[name]
    w = workload(rendered, name)
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    service = one(docs, "Service", "catsdogs-serve")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    for port in service["spec"]["ports"]:
        assert container_port(w, port["targetPort"]) == effective_settings(w).port
    monitor = one(docs, "ServiceMonitor")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= service_ports
    for selector in (one(docs, "PodDisruptionBudget"), one(docs, "NetworkPolicy")):
        labels = selector["spec"].get("selector") or selector["spec"]["podSelector"]
        assert labels["matchLabels"].items() <= pod_labels.items()
    for rule in one(docs, "NetworkPolicy")["spec"]["ingress"]:
        for port in rule["ports"]:
            assert container_port(w, port["port"]) == effective_settings(w).port


@pytest.mark.parametrize("name", WORKLOADS)
def test_probe_paths_are_routes_of_the_app(rendered: dict[str, list[Manifest]], name: str) -> None:
    w = workload(rendered, name)
    settings = effective_settings(w)
    found = probes(w)
    assert "readinessProbe" in found
    assert "livenessProbe" in found
    for kind, probe in found.items():
        status = get(settings, probe["path"]).status_code
        if kind == "readinessProbe":
            # ready only once the model is loaded: without one the app must say 503
            assert status == 503, f"{w.source} {kind} {probe['path']} -> {status}"
        else:
            # liveness and startup must not depend on the model
            assert status == 200, f"{w.source} {kind} {probe['path']} -> {status}"


def test_a_renamed_probe_path_would_fail() -> None:
    assert get(Settings(), "/health/alive").status_code == 404


@pytest.mark.parametrize("name", APP_OVERLAYS)
def test_scrape_path_serves_prometheus_metrics(
    rendered: dict[str, list[Manifest]], name: str
) -> None:
    settings = effective_settings(workload(rendered, name))
    for endpoint in one(rendered[name], "ServiceMonitor")["spec"]["endpoints"]:
        response = get(settings, endpoint["path"])
        assert response.status_code == 200
        assert "# TYPE inference_queue_images gauge" in response.text


# ---------------------------------------------------------------- shutdown
@pytest.mark.parametrize("name", APP_OVERLAYS)
def test_grace_period_covers_the_drain(rendered: dict[str, list[Manifest]], name: str) -> None:
    w = workload(rendered, name)
    pre_stop = (
        w.container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    )
    settings = effective_settings(w)
    drain = settings.graceful_timeout_s
    # after the drain the server writes what its prediction log still holds, and on PostgreSQL
    # waits for the figures' refresher and closes the pool (server.store, server.store_postgres)
    log_close = STOP_TIMEOUT_S + settings.store_timeout_s + POOL_CLOSE_S
    assert w.pod["terminationGracePeriodSeconds"] > pre_stop + drain + log_close


# ---------------------------------------------------------------- read-only root, user
@pytest.mark.parametrize("name", WORKLOADS)
def test_written_paths_are_on_writable_volumes(
    rendered: dict[str, list[Manifest]], name: str
) -> None:
    w = workload(rendered, name)
    settings = effective_settings(w)
    assert w.container["securityContext"]["readOnlyRootFilesystem"] is True
    # Python would otherwise try to write .pyc files next to server/ on the read-only root.
    assert IMAGE.env.get("PYTHONDONTWRITEBYTECODE") == "1"
    volumes = {v["name"]: v for v in w.pod["volumes"]}
    writable = []
    for mount in w.container["volumeMounts"]:
        volume = volumes[mount["name"]]
        assert "emptyDir" in volume or "persistentVolumeClaim" in volume, mount["name"]
        if not mount.get("readOnly"):
            writable.append(PurePosixPath(mount["mountPath"]))
    workdir = PurePosixPath(IMAGE.workdir)
    written = {
        "MODEL_CACHE_DIR": workdir / settings.model_cache_dir,
        "PREDICTION_LOG_PATH folder": (workdir / settings.prediction_log_path).parent,
        # SQLite's temporary files (tests/deploy/test_read_only_root.py)
        "/tmp": PurePosixPath("/tmp"),
    }
    for what, path in written.items():
        assert any(path.is_relative_to(m) for m in writable), f"{w.source}: {what} {path}"


@pytest.mark.parametrize("name", WORKLOADS)
def test_pod_security(rendered: dict[str, list[Manifest]], name: str) -> None:
    w = workload(rendered, name)
    pod_sc, sc = w.pod.get("securityContext", {}), w.container["securityContext"]
    merged = pod_sc | sc
    assert merged["runAsNonRoot"] is True
    assert f"{merged['runAsUser']}:{merged['runAsGroup']}" == IMAGE.user
    assert merged["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert "add" not in sc["capabilities"]
    assert w.container["resources"]["requests"]
    assert w.container["resources"]["limits"]


# ---------------------------------------------------------------- overlays
def test_dev_runs_one_replica_and_prod_autoscales(rendered: dict[str, list[Manifest]]) -> None:
    assert one(rendered["dev"], "Deployment")["spec"]["replicas"] == 1
    assert not find(rendered["dev"], "HorizontalPodAutoscaler")
    prod = rendered["prod"]
    # no count in the Deployment: it would reset what the HPA scaled to on every apply
    assert "replicas" not in one(prod, "Deployment")["spec"]
    hpa = one(prod, "HorizontalPodAutoscaler")
    assert hpa["spec"]["minReplicas"] == 3
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": one(prod, "Deployment")["metadata"]["name"],
    }


def test_dev_pvc_keeps_the_prediction_log_on_a_claim(rendered: dict[str, list[Manifest]]) -> None:
    docs = rendered["dev-pvc"]
    deployment = one(docs, "Deployment")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    claim = volumes["var"]["persistentVolumeClaim"]["claimName"]
    assert one(docs, "PersistentVolumeClaim", claim)["metadata"]["namespace"] == "catsdogs-dev"
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}  # one SQLite writer at a time


def test_hpa_queue_metric_is_served_by_the_adapter(rendered: dict[str, list[Manifest]]) -> None:
    hpa = one(rendered["prod"], "HorizontalPodAutoscaler")
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    pods = metrics["Pods"]["pods"]
    adapter = yaml.safe_load(
        one(rendered["prometheus-adapter"], "ConfigMap")["data"]["config.yaml"]
    )
    [rule] = [r for r in adapter["rules"] if r["name"]["as"] == pods["metric"]["name"]]
    series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"]).group(0)
    assert re.fullmatch(rule["name"]["matches"], series)
    # the series is one the server really exports
    settings = effective_settings(workload(rendered, "prod"))
    assert f"# TYPE {series} gauge" in get(settings, "/metrics").text
    # the target is reached well before the queue is full and requests get 503
    assert 0 < float(pods["target"]["averageValue"]) < settings.max_queue_size


def test_alerts_select_the_scraped_job(rendered: dict[str, list[Manifest]]) -> None:
    """The ServiceMonitor's job label is the Service's name (no jobLabel set); every
    job="..." in the alert expressions must be that name."""
    docs = rendered["prod"]
    monitor = one(docs, "ServiceMonitor")
    assert "jobLabel" not in monitor["spec"]
    service = one(docs, "Service")
    exprs = [
        rule["expr"]
        for group in one(docs, "PrometheusRule")["spec"]["groups"]
        for rule in group["rules"]
    ]
    jobs = {job for expr in exprs for job in re.findall(r'job="([^"]+)"', expr)}
    assert jobs == {service["metadata"]["name"]}


# ---------------------------------------------------------------- KServe
REGISTRY_URI = re.compile(r"models:/(?P<name>[^/@]+)@(?P<alias>[^/]+)")


@pytest.mark.parametrize("name", ["kserve", "kserve-canary"])
def test_inference_service_speaks_v2_with_the_registry_model(
    rendered: dict[str, list[Manifest]], name: str
) -> None:
    docs = rendered[name]
    isvc = one(docs, "InferenceService")
    model = isvc["spec"]["predictor"]["model"]
    runtime = one(docs, "ServingRuntime", model["runtime"])["spec"]
    assert model["protocolVersion"] == "v2"
    assert model["protocolVersion"] in runtime["protocolVersions"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["supportedModelFormats"]}
    settings = effective_settings(workload(rendered, name))
    # V2 URLs carry the InferenceService's name: /v2/models/<name>/infer
    assert settings.served_model_name == isvc["metadata"]["name"]
    ready = get(settings, f"/v2/models/{isvc['metadata']['name']}/ready")
    assert ready.status_code != 404
    match = REGISTRY_URI.fullmatch(settings.model_uri)
    assert match, settings.model_uri
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert match["name"] == params["export"]["registered_model"]
    assert settings.mlflow_tracking_uri.startswith(("http://", "https://"))


# The labels KServe puts on every predictor pod (kserve/kserve v0.20.0, pkg/constants:
# InferenceServicePodLabelKey, KServiceComponentLabel; components/predictor.go sets them)
KSERVE_PREDICTOR_POD_LABELS = ("serving.kserve.io/inferenceservice", "component")


@pytest.mark.parametrize("name", ["kserve", "kserve-canary"])
def test_kserve_pods_are_scraped_and_watched_by_the_alerts(
    rendered: dict[str, list[Manifest]], name: str
) -> None:
    """KServe's pods carry none of the Deployment's labels: without a monitor of their own no
    series reaches Prometheus and every alert is blind. The PodMonitor selects the
    InferenceService's predictor pods, scrapes the server's port and metrics path, and gives
    the series the job the alerts select; the alerts come along."""
    docs = rendered[name]
    isvc = one(docs, "InferenceService")
    monitor = one(docs, "PodMonitor", "catsdogs-serve")["spec"]
    selector, component = KSERVE_PREDICTOR_POD_LABELS
    assert monitor["selector"]["matchLabels"] == {
        selector: isvc["metadata"]["name"],
        component: "predictor",
    }
    w = workload(rendered, name)
    settings = effective_settings(w)
    (endpoint,) = monitor["podMetricsEndpoints"]
    assert endpoint["portNumber"] == settings.port
    assert [p["containerPort"] for p in w.container["ports"]] == [settings.port]
    response = get(settings, endpoint["path"])
    assert "# TYPE inference_queue_images gauge" in response.text
    (job,) = [r["replacement"] for r in endpoint["relabelings"] if r["targetLabel"] == "job"]
    rules = one(docs, "PrometheusRule", "catsdogs-serve")["spec"]["groups"]
    assert rules == yaml.safe_load((ROOT / "monitoring" / "alerts.yml").read_text())["groups"]
    exprs = [rule["expr"] for group in rules for rule in group["rules"]]
    assert {j for e in exprs for j in re.findall(r'job="([^"]+)"', e)} == {job}


@pytest.mark.parametrize("name", ["kserve", "kserve-canary"])
def test_the_predictor_sets_no_pod_security_context(
    rendered: dict[str, list[Manifest]], name: str
) -> None:
    """Knative's webhook refuses every pod-level securityContext field unless the cluster enables
    kubernetes.podspec-securitycontext: the generated Service would never be ready. The
    container's own securityContext (test_pod_security) carries the user and the rest."""
    predictor = one(rendered[name], "InferenceService")["spec"]["predictor"]
    assert "securityContext" not in predictor


def test_canary_changes_only_the_model_and_the_split(rendered: dict[str, list[Manifest]]) -> None:
    stable = one(rendered["kserve"], "InferenceService")
    canary = one(rendered["kserve-canary"], "InferenceService")
    assert 0 < canary["spec"]["predictor"].pop("canaryTrafficPercent") < 100
    assert "canaryTrafficPercent" not in stable["spec"]["predictor"]
    uri = {
        which: effective_settings(workload(rendered, which)).model_uri
        for which in ("kserve", "kserve-canary")
    }
    assert uri["kserve"] != uri["kserve-canary"]
    assert REGISTRY_URI.fullmatch(uri["kserve-canary"])
    for isvc in (stable, canary):
        isvc["spec"]["predictor"]["model"]["env"][0].pop("value")
    assert canary == stable
    assert find(rendered["kserve"], "ServingRuntime") == find(
        rendered["kserve-canary"], "ServingRuntime"
    )
