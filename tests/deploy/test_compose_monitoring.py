"""Compose's Prometheus configurations scrape every serving container of their profile.

prometheus.yml (the default) scrapes `serve`; prometheus-scale.yml, which the README's `scale`
command mounts through PROMETHEUS_CONFIG, also scrapes the replicas HAProxy sends the traffic
to. A replica added to compose.yaml and left out of the scrape would serve unwatched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "monitoring"
SERVICES: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]


def _targets(config: Path) -> list[str]:
    jobs = yaml.safe_load(config.read_text())["scrape_configs"]
    (job,) = [j for j in jobs if j["job_name"] == "catsdogs-serve"]
    return sorted(t for static in job["static_configs"] for t in static["targets"])


def _serving(profiles: set[str]) -> list[str]:
    """``host:port`` of the services that run the serving image when ``profiles`` are up."""
    return sorted(
        f"{name}:8000"
        for name, service in SERVICES.items()
        if "SERVE_IMAGE" in str(service.get("image", ""))
        and set(service.get("profiles", [])) <= profiles
    )


def test_each_profile_scrapes_every_serving_container() -> None:
    assert _targets(MONITORING / "prometheus.yml") == _serving(set()) == ["serve:8000"]
    assert _targets(MONITORING / "prometheus-scale.yml") == _serving({"scale"})
    assert len(_serving({"scale"})) == 4  # serve, and serve-1..3 behind HAProxy


def test_the_scale_config_differs_only_in_its_targets() -> None:
    default = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    scale = yaml.safe_load((MONITORING / "prometheus-scale.yml").read_text())
    for config in (default, scale):
        for job in config["scrape_configs"]:
            job.pop("static_configs")
    assert scale == default


def test_compose_mounts_the_config_that_prometheus_config_names() -> None:
    volumes = SERVICES["prometheus"]["volumes"]
    mounted = [v.rsplit(":", 2)[0] for v in volumes if ":/etc/prometheus/prometheus.yml" in v]
    assert mounted == ["${PROMETHEUS_CONFIG:-./monitoring/prometheus.yml}"]
    assert "PROMETHEUS_CONFIG=./monitoring/prometheus-scale.yml" in (ROOT / "README.md").read_text()
