"""The server runs on a read-only root filesystem with only the manifests' writable volumes.

The Deployment sets ``readOnlyRootFilesystem: true`` and mounts emptyDirs for the model cache,
the prediction log's folder and /tmp (SQLite's temporary files); the image sets
PYTHONDONTWRITEBYTECODE=1. Here the real ``python -m server`` runs in a mount namespace
(``unshare``, no root needed) where every filesystem is remounted read-only except tmpfs folders
standing in for those volumes, and must predict, store feedback and drain on SIGTERM as usual.
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

from server import store_sqlite
from server.store import PREDICTION_COLUMNS
from tests.deploy.manifests import ROOT, serving_image
from tests.serve.conftest import RED, ServerProcess, build_tiny_model, free_port, image_bytes

# Remount every mount read-only (this namespace only), except the kernel's own and /dev/shm,
# where the stand-ins for the emptyDir volumes live; then become the server.
READ_ONLY = r"""
awk '{print $2}' /proc/self/mounts | grep -Ev '^/(proc|sys|dev)(/|$)' | while read -r m; do
    mount -o remount,bind,ro "$m"
done
if touch /read-only-check 2>/dev/null; then echo "root is writable" >&2; exit 3; fi
if touch /tmp/read-only-check 2>/dev/null; then echo "/tmp is writable" >&2; exit 3; fi
exec "$@"
"""
# Rows in a prediction log whose grouped read at start (server.store_sqlite.iter_aggregates)
# sorts more than SQLite holds in memory, so it spills to its temporary folder (measured: 20,000
# rows do not, 60,000 do)
SPILLING_ROWS = 150_000


@pytest.fixture
def volumes() -> Iterator[Path]:
    # tmpfs under /dev/shm is left writable; the test's tmp_path is not (it is on the root).
    folder = Path(tempfile.mkdtemp(prefix="catsdogs-volumes-", dir="/dev/shm"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def start_read_only(
    model: Path, volumes: Path, log: Path, *, tmp_volume: bool = True
) -> ServerProcess:
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
    if tmp_volume:
        # the manifests' /tmp emptyDir: the checkout and its venvs may live under this host's
        # /tmp (CI's clone does), so a tmpfs cannot go over it here; SQLite's own variable
        # gives it the same writable folder for its temporary files
        env["SQLITE_TMPDIR"] = str(volumes / "tmp")
    for folder in ("cache", "var", "tmp"):
        (volumes / folder).mkdir(exist_ok=True)
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


def write_past_log(path: Path, rows: int) -> None:
    """A prediction log holding ``rows`` predictions of an earlier model version, made in the
    last minutes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    now = time.time()  # recent: the retention of PREDICTION_LOG_RETENTION_DAYS keeps them
    conn = store_sqlite.connect(path)
    store_sqlite.migrate(conn)
    values = (
        (f"p{i:08d}", f"r{i:08d}", now - i / 1000, "past", "cat" if i % 3 else "dog",
         0.5 + (i % 50) / 100, "{}", "0" * 64, 640, 480, 0.5, 5.0, "/predict")
        for i in range(rows)
    )  # fmt: skip
    conn.execute("BEGIN")
    conn.executemany(
        f"INSERT INTO predictions ({','.join(PREDICTION_COLUMNS)}) VALUES "
        f"({','.join('?' * len(PREDICTION_COLUMNS))})",
        values,
    )
    conn.execute("COMMIT")
    conn.close()


@pytest.mark.slow
def test_a_large_log_is_read_back_at_start_on_a_read_only_root(
    tmp_path: Path, volumes: Path
) -> None:
    """The live figures are rebuilt at start from the log with one grouped read, whose sort
    SQLite spills to a temporary file once the log is large: on a read-only root without a
    writable /tmp that read failed ("disk I/O error") and every replica restarted onto such a
    log counted from zero. The manifests mount /tmp (tests/deploy/test_agreement.py), and the
    store now gives SQLite the log's own folder where it finds no temporary folder, so a
    deployment without the /tmp volume reads it back too."""
    model = build_tiny_model(tmp_path / "tiny.onnx")
    write_past_log(volumes / "var" / "predictions.db", SPILLING_ROWS)
    for tmp_volume, log_name in ((False, "no-tmp.log"), (True, "tmp.log")):
        server = start_read_only(model, volumes, tmp_path / log_name, tmp_volume=tmp_volume)
        try:
            server.wait_ready(timeout=60)
            summary = httpx.get(f"{server.url}/monitoring/summary", timeout=10).json()
        finally:
            code = server.terminate()
        assert code == 0, server.output()
        counted = summary["model_versions"].get("past", {}).get("predictions")
        assert counted == SPILLING_ROWS, (summary["model_versions"], server.output()[-3000:])
        assert "could not read past figures" not in server.output()
        beside = f"SQLite's temporary files go in {volumes / 'var'}"
        # only where there is no temporary folder: never over the operator's own
        assert (beside in server.output()) is not tmp_volume, server.output()[-3000:]
