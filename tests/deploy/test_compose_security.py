"""Compose runs the serving image as the Kubernetes manifests do: read-only root, no
capabilities, no privilege escalation, the image's own user, and every path the server writes on
a named volume or a size-limited tmpfs.

The compose counterparts of test_agreement's ``test_pod_security`` and
``test_written_paths_are_on_writable_volumes``, for ``serve`` and the ``scale`` profile's
replicas: the paths come from what the server will run with (the image's ENV and WORKDIR, then
the service's environment, through the server's own settings code). ``make image-smoke`` runs
the image with the same restrictions under a container engine (scripts/containers.sh).
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any

import pytest
import yaml

from server.__main__ import build_settings, parse_args
from server.settings import Settings
from tests.deploy.manifests import ROOT, serving_image

IMAGE = serving_image()
SERVICES: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
SERVING = sorted(n for n, s in SERVICES.items() if "SERVE_IMAGE" in str(s.get("image", "")))
CONTAINERS_SH = (ROOT / "scripts" / "containers.sh").read_text()
# SQLite's temporary files (a large sort spills there: the prediction log's grouped read at
# start) and the tempfile module's: the base image's /tmp, mode 1777, which a tmpfs keeps.
TMP = PurePosixPath("/tmp")


def interpolate(value: str) -> str:
    """Compose's ``${NAME:-default}`` and ``${NAME-default}`` as they read with NAME unset."""
    return re.sub(r"\$\{[A-Z0-9_]+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


def effective_settings(service: dict[str, Any]) -> Settings:
    """What the server will run with: the image's ENV, then the service's environment."""
    environment = service.get("environment", {})
    assert isinstance(environment, dict), "environment as a mapping, not a list"
    env = IMAGE.env | {k: interpolate(str(v)) for k, v in environment.items() if v is not None}
    return build_settings(parse_args([]), env)


def writable_mounts(service: dict[str, Any]) -> dict[PurePosixPath, str]:
    """Where the container can write: named volumes (not read-only) and tmpfs mounts, each with
    its kind (``volume``, or the tmpfs's options)."""
    named = set(yaml.safe_load((ROOT / "compose.yaml").read_text()).get("volumes", {}))
    mounts: dict[PurePosixPath, str] = {}
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        if source in named and "ro" not in mode:
            mounts[PurePosixPath(target)] = "volume"
    for tmpfs in service.get("tmpfs", []):
        target, _, options = tmpfs.partition(":")
        mounts[PurePosixPath(target)] = options
    return mounts


def mount_of(path: PurePosixPath, mounts: dict[PurePosixPath, str]) -> PurePosixPath | None:
    """The innermost writable mount that holds ``path``."""
    holding = [m for m in mounts if path.is_relative_to(m)]
    return max(holding, key=lambda m: len(m.parts)) if holding else None


def test_the_serving_services_are_found() -> None:
    assert SERVING == ["serve", "serve-1", "serve-2", "serve-3"]


@pytest.mark.parametrize("name", SERVING)
def test_container_security(name: str) -> None:
    service = SERVICES[name]
    assert service.get("read_only") is True, name
    assert service.get("cap_drop") == ["ALL"], name
    assert "cap_add" not in service, name
    assert "no-new-privileges:true" in service.get("security_opt", []), name
    assert not service.get("privileged"), name
    # the image's non-root user (a `user:` here would replace it)
    assert "user" not in service, name
    assert IMAGE.user.partition(":")[0] not in ("", "0", "root"), IMAGE.user


@pytest.mark.parametrize("name", SERVING)
def test_written_paths_are_on_volumes_or_tmpfs(name: str) -> None:
    service = SERVICES[name]
    settings = effective_settings(service)
    # Python would otherwise try to write .pyc files next to server/ on the read-only root.
    assert IMAGE.env.get("PYTHONDONTWRITEBYTECODE") == "1"
    assert "PYTHONDONTWRITEBYTECODE" not in service.get("environment", {})
    workdir = PurePosixPath(IMAGE.workdir)
    written = {"MODEL_CACHE_DIR": workdir / settings.model_cache_dir, "temporary files": TMP}
    kind, target = settings.prediction_log
    if kind == "sqlite":  # with PREDICTION_LOG_URL a database, no file
        written["PREDICTION_LOG_PATH folder"] = (workdir / target).parent
    mounts = writable_mounts(service)
    uid, _, gid = IMAGE.user.partition(":")
    for what, path in written.items():
        mount = mount_of(path, mounts)
        assert mount is not None, f"{name}: {what} {path} is on the read-only root"
        options = mounts[mount]
        if options == "volume":
            continue
        # a tmpfs is memory: bounded, and counted against the container's limit
        assert re.search(r"(^|,)size=\d+[kmg]?(,|$)", options), f"{name}: tmpfs {mount} {options}"
        if mount != TMP:
            # over a folder of the image the runtime keeps its mode (0755) and makes root the
            # owner: the server's user must own the tmpfs to write there
            owner = {o.partition("=")[0]: o.partition("=")[2] for o in options.split(",")}
            assert (owner.get("uid"), owner.get("gid")) == (uid, gid or uid), (name, mount)


def function_body(name: str) -> str:
    match = re.search(rf"^{name}\(\) \{{\n(.*?)^\}}", CONTAINERS_SH, re.S | re.M)
    assert match, f"scripts/containers.sh has no function {name}"
    return match.group(1)


def test_the_smoke_and_load_containers_run_restricted_too() -> None:
    """`make image-smoke` and `make image-load` run the image as compose does, so the CI run
    proves that it serves (and logs its predictions) on a read-only root."""
    flags = function_body("serve_run_flags")
    for flag in ("--read-only", "--cap-drop ALL", "--security-opt no-new-privileges", "--tmpfs"):
        assert flag in flags, flag
    assert "--tmpfs /tmp:size=" in flags
    assert "${log_path%/*}:size=" in flags  # the folder of the image's PREDICTION_LOG_PATH
    for command in ("cmd_smoke", "cmd_load"):
        assert "$(serve_run_flags)" in function_body(command), command
    assert "check_read_only" in function_body("cmd_smoke")
