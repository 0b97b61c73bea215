"""The serving image's recipe and the smoke test that CI, CD and `make image-smoke` run.

The image itself is built and run by `make image-smoke` (a container engine is not a test
dependency); here the smoke script is run against a real server process, and the Dockerfile and
compose file are held to the properties the image relies on.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.serve.conftest import BLUE, RED, ROOT, image_bytes, prom

pytestmark = pytest.mark.serve

SMOKE = ROOT / "scripts" / "smoke_test.py"


def photo_folder(root: Path, colours: dict[str, tuple[int, int, int]], n: int = 3) -> Path:
    """cat/ and dog/ of plain-colour JPEGs; the tiny model calls red "cat" and blue "dog"."""
    for label, colour in colours.items():
        (root / label).mkdir(parents=True)
        for i in range(n):
            shade = tuple(max(0, c - 10 * i) for c in colour)
            (root / label / f"{label}.{i}.jpg").write_bytes(image_bytes(shade))
    return root


def run_smoke(url: str, data: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, str(SMOKE), "--url", url, "--data", str(data), "--per-class", "3"]
    return subprocess.run([*args, *extra], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_smoke_script_passes_on_a_correct_server_and_fails_on_wrong_labels(
    server_process, tmp_path
):
    server = server_process()
    server.wait_ready()
    right = photo_folder(tmp_path / "right", {"cat": RED, "dog": BLUE})
    ok = run_smoke(server.url, right, "--min-accuracy", "1.0")
    assert ok.returncode == 0, ok.stderr
    summary = json.loads(ok.stderr.rsplit("passed ", 1)[1])
    assert summary["predictions"] == 6
    assert summary["accuracy"] == 1.0
    # every bad input got a 4xx with an error code, as logged by the script; the AVIF photo is
    # named as a refused format
    assert len(re.findall(r"-> 4\d\d \w+", ok.stderr)) == 5
    assert "AVIF photo -> 415 unsupported_format" in ok.stderr

    swapped = photo_folder(tmp_path / "swapped", {"cat": BLUE, "dog": RED})
    bad = run_smoke(server.url, swapped, "--min-accuracy", "0.9")
    assert bad.returncode == 1
    assert "accuracy 0.000 < 0.9" in bad.stderr


@pytest.mark.slow
def test_smoke_script_checks_the_feedback_route_and_stores_no_label(server_process, tmp_path):
    """CD smoke-tests production: feedback for an unknown id (404 unknown_prediction_id) proves
    the route, the token and the log's lookup without adding a label to live accuracy."""
    server = server_process(API_TOKEN="s3cret-token-for-tests")
    server.wait_ready()
    right = photo_folder(tmp_path / "right", {"cat": RED, "dog": BLUE})
    args = [sys.executable, str(SMOKE), "--url", server.url, "--data", str(right)]
    args += ["--per-class", "3"]
    env = {"PATH": "/usr/bin:/bin", "API_TOKEN": "s3cret-token-for-tests"}
    ok = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
    assert ok.returncode == 0, ok.stderr
    wrong = subprocess.run(
        args, capture_output=True, text=True, timeout=120, env={**env, "API_TOKEN": "wrong"}
    )
    assert wrong.returncode == 1
    # its first prediction, sent as evaluation traffic with the wrong token, is refused
    assert "/predict cat.0.jpg: 403" in wrong.stderr
    untokened = subprocess.run(
        args, capture_output=True, text=True, timeout=120, env=env | {"API_TOKEN": ""}
    )
    assert untokened.returncode == 0, untokened.stderr
    assert "needs a bearer token for evaluation traffic" in untokened.stderr
    assert "/feedback needs a token" in untokened.stderr
    metrics = httpx.get(f"{server.url}/metrics").text
    assert prom(metrics, "feedback_requests_total", outcome="unknown_id") == 1  # the tokened run
    assert prom(metrics, "feedback_requests_total", outcome="stored") == 0
    # the tokened run's 6 photos and batch of 2 were evaluation traffic, kept out of the log;
    # the untokened run's went in as production traffic
    assert prom(metrics, "evaluation_predictions_total") == 8
    assert prom(metrics, "predictions_total") == 8


def test_smoke_script_fails_when_nothing_answers(tmp_path):
    data = photo_folder(tmp_path / "photos", {"cat": RED, "dog": BLUE})
    result = run_smoke("http://127.0.0.1:9", data, "--wait", "0.5")
    assert result.returncode == 1
    assert "/health/ready not 200" in result.stderr


def stages(dockerfile: str) -> list[str]:
    return re.split(r"^FROM ", dockerfile, flags=re.MULTILINE)[1:]


def test_serving_image_recipe():
    text = (ROOT / "Dockerfile.serve").read_text()
    builder, model, runtime = stages(text)
    # the venv comes from requirements-serve.txt alone, and nothing copies the whole tree
    assert re.findall(r"^COPY (?!--from).*$", builder, re.MULTILINE) == [
        "COPY requirements-serve.txt /tmp/requirements-serve.txt"
    ]
    # the model stage holds MODEL (default: the exported file) or, with MODEL empty, nothing
    assert re.findall(r"^COPY .*$", model, re.MULTILINE) == [
        "COPY requirements-serve.txt ${MODEL} /staging/"
    ]
    assert "ARG MODEL=models/model.onnx" in model
    copies = re.findall(r"^COPY .*$", runtime, re.MULTILINE)
    assert copies == [
        "COPY --from=builder /opt/venv /opt/venv",
        "COPY catsdogs/ /app/catsdogs/",
        "COPY server/ /app/server/",
        "COPY --from=model /model/ /app/models/",
    ]
    user = re.findall(r"^USER (\S+)$", runtime, re.MULTILINE)
    assert len(user) == 1
    assert user[0].split(":")[0] not in ("0", "root")
    assert re.search(r"^HEALTHCHECK .*\n?.*/health/ready", runtime, re.MULTILINE)
    entry = re.search(r"^ENTRYPOINT (.*)$", runtime, re.MULTILINE)
    assert entry
    assert json.loads(entry.group(1)) == ["python", "-m", "server"]
    # thread count must follow the container's CPU quota, so the image never pins it
    assert not re.search(r"^\s*INTRA_OP_THREADS=", runtime, re.MULTILINE)


def test_build_context_leaves_out_heavy_and_private_paths():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv*", "data", "mlruns", "reports", ".dvc/cache"} <= ignored
    assert "!models/*.onnx" in ignored


def test_requirements_serve_has_no_training_stack():
    names = {
        re.split(r"[=<>\[ ]", line, maxsplit=1)[0].lower()
        for line in (ROOT / "requirements-serve.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert not names & {"torch", "torchvision", "mlflow", "dvc", "pytest", "onnx"}


def test_ci_photos_lays_out_images_and_originals_and_skips_broken_files(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import ci_photos
    finally:
        sys.path.pop(0)
    from PIL import Image

    big = tmp_path / "big.jpg"
    Image.new("RGB", (640, 480), RED).save(big, quality=90)
    archive = tmp_path / "pets.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(big, "PetImages/Cat/1.jpg")
        zf.write(big, "PetImages/Dog/7.jpg")
        zf.writestr("PetImages/Dog/8.jpg", b"")  # the public set has empty files
        zf.writestr("PetImages/Dog/9.jpg", big.read_bytes()[:-400])  # and truncated ones
    counts = ci_photos.extract(archive, tmp_path / "out", per_class=5, originals=1)
    assert counts == {"cat": 1, "dog": 1}
    assert sorted(
        p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.jpg")
    ) == [
        "images/cat/cat.1.jpg",
        "images/dog/dog.7.jpg",
        "originals/cat/cat.1.jpg",
        "originals/dog/dog.7.jpg",
    ]
    assert (tmp_path / "out/originals/cat/cat.1.jpg").read_bytes() == big.read_bytes()
    with Image.open(tmp_path / "out/images/cat/cat.1.jpg") as small:
        assert max(small.size) == 320
