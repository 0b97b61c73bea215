"""The server runs on a read-only root filesystem with only the manifests' writable volumes.

The Deployment sets ``readOnlyRootFilesystem: true`` and mounts emptyDirs for the model cache
and the prediction log's folder; the image sets PYTHONDONTWRITEBYTECODE=1. Here the real
``python -m server`` runs in a mount namespace (``unshare``, no root needed) where every
filesystem is remounted read-only except two tmpfs folders standing in for those volumes, and
must predict, store feedback and drain on SIGTERM as usual.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.deploy.manifests import ROOT, serving_image
from tests.serve.conftest import RED, ServerProcess, build_tiny_model, free_port, image_bytes

# Remount every mount read-only (this namespace only), except the kernel's own and /dev/shm,
# where the stand-ins for the emptyDir volumes live; then become the server.
READ_ONLY = r"""
awk '{print $2}' /proc/self/mounts | grep -Ev '^/(proc|sys|dev)(/|$)' | while read -r m; do
    mount -o remount,bind,ro "$m"
done
if touch /read-only-check 2>/dev/null; then echo "root is writable" >&2; exit 3; fi
exec "$@"
"""


@pytest.fixture
def volumes() -> Iterator[Path]:
    # tmpfs under /dev/shm is left writable; the test's tmp_path is not (it is on the root).
    folder = Path(tempfile.mkdtemp(prefix="catsdogs-volumes-", dir="/dev/shm"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def start_read_only(model: Path, volumes: Path, log: Path) -> ServerProcess:
    port = free_port()
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONDONTWRITEBYTECODE": serving_image().env["PYTHONDONTWRITEBYTECODE"],
        "MODEL_PATH": str(model),
        "MODEL_CACHE_DIR": str(volumes / "cache" / "models"),
        "PREDICTION_LOG_PATH": str(volumes / "var" / "predictions.db"),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "INTRA_OP_THREADS": "1",
        "API_TOKEN": "read-only-test-token",
    }
    for folder in ("cache", "var"):
        (volumes / folder).mkdir()
    command = ["unshare", "--map-root-user", "--mount", "sh", "-c", READ_ONLY, "sh"]
    proc = subprocess.Popen(
        [*command, sys.executable, "-m", "server"],
        cwd=ROOT,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    return ServerProcess(proc, f"http://127.0.0.1:{port}", log)


def feedback(url: str, request_id: str) -> int:
    """POST /feedback until the logged prediction is written (the writer is asynchronous)."""
    headers = {"Authorization": "Bearer read-only-test-token"}
    body = {"request_id": request_id, "label": "cat"}
    deadline = time.monotonic() + 10
    while True:
        status = httpx.post(f"{url}/feedback", json=body, headers=headers, timeout=5).status_code
        if status != 404 or time.monotonic() > deadline:
            return status
        time.sleep(0.1)


@pytest.mark.slow
def test_server_works_on_a_read_only_root(tmp_path: Path, volumes: Path) -> None:
    model = build_tiny_model(tmp_path / "tiny.onnx")
    server = start_read_only(model, volumes, tmp_path / "server.log")
    try:
        server.wait_ready(timeout=30)
        response = httpx.post(
            f"{server.url}/predict",
            content=image_bytes(RED),
            headers={"Content-Type": "image/jpeg"},
            timeout=10,
        )
        assert response.status_code == 200, response.text
        assert response.json()["label"] == "cat"
        assert feedback(server.url, response.json()["request_id"]) == 201
    finally:
        code = server.terminate()
    assert code == 0, server.output()
    assert "Read-only file system" not in server.output()
    assert (volumes / "var" / "predictions.db").exists()
