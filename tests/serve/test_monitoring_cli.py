"""The monitoring CLIs on a real server: post-deployment evaluation and the log report."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import BLUE, RED, ROOT, image_bytes, prom

from catsdogs import drift

pytestmark = [pytest.mark.serve, pytest.mark.slow]

# the drift report draws with matplotlib, which only the load environment has (make venv-load)
LOAD_PYTHON = ROOT / ".venv-load" / "bin" / "python"


def labelled_folder(root: Path, *, swap: bool = False, n: int = 6) -> Path:
    """cat/ holds red pictures and dog/ blue ones (the tiny model's rule); swapped if asked."""
    for label, colour in (("cat", BLUE if swap else RED), ("dog", RED if swap else BLUE)):
        (root / label).mkdir(parents=True)
        for i in range(n):
            (root / label / f"{i}.jpg").write_bytes(image_bytes(colour, (80 + i, 60)))
    (root / "cat" / "notes.txt").write_text("not an image: ignored")
    return root


def evaluate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "monitoring.evaluate_deployment", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_evaluate_deployment_passes_posts_feedback_and_reports(server_process, tmp_path: Path):
    server = server_process()
    server.wait_ready()
    data = labelled_folder(tmp_path / "photos")
    out = tmp_path / "eval"
    done = evaluate(
        "--url",
        server.url,
        "--data",
        str(data),
        "--out",
        str(out),
        "--min-accuracy",
        "0.99",
        "--concurrency",
        "3",
    )
    assert done.returncode == 0, done.stderr
    results = json.loads((out / "results.json").read_text())
    assert len(results) == 12
    assert {r["image"] for r in results} == {
        f"{c}/{i}.jpg" for c in ("cat", "dog") for i in range(6)
    }
    for row in results:
        assert row["predicted_label"] == row["true_label"]
        assert 0.5 < row["confidence"] <= 1.0
        assert row["latency_ms"] > 0
        assert row["feedback_status"] == 201
        assert row["error"] is None
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy"] == 1.0
    assert summary["correct"] == summary["predicted"] == 12
    assert summary["errors"] == 0
    assert summary["feedback_stored"] == 12
    assert summary["passed"] is True
    assert summary["confusion"] == {"cat": {"cat": 6}, "dog": {"dog": 6}}
    lat = summary["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]

    # the server counted the same feedback: live accuracy 1.0 on 12
    fig = httpx.get(f"{server.url}/monitoring/summary").json()["model_versions"]
    assert fig[summary["model_version"]]["feedback"] == 12
    assert fig[summary["model_version"]]["accuracy"] == 1.0

    limited = evaluate(
        "--url",
        server.url,
        "--data",
        str(data),
        "--out",
        str(tmp_path / "lim"),
        "--limit",
        "3",
        "--no-feedback",
    )
    assert limited.returncode == 0, limited.stderr
    rows = json.loads((tmp_path / "lim" / "results.json").read_text())
    assert [r["true_label"] for r in rows] == ["cat", "dog", "cat"]  # classes interleaved
    assert all(r["feedback_status"] is None for r in rows)
    # without labels the photos went as evaluation traffic: answered, and not logged
    assert json.loads((tmp_path / "lim" / "summary.json").read_text())["traffic"] == "evaluation"
    assert summary["traffic"] == "production"
    metrics = httpx.get(f"{server.url}/metrics").text
    assert prom(metrics, "evaluation_predictions_total", label="cat") == 2
    assert prom(metrics, "evaluation_predictions_total", label="dog") == 1
    assert prom(metrics, "predictions_total", label="cat") == 6  # the first run's alone
    server.terminate()
    with sqlite3.connect(tmp_path / "predictions.db") as db:
        logged = {row[0] for row in db.execute("SELECT prediction_id FROM predictions")}
    assert logged == {r["prediction_id"] for r in results}
    assert not logged & {r["prediction_id"] for r in rows}


def test_evaluate_deployment_fails_below_threshold_and_when_unreachable(
    server_process, tmp_path: Path
):
    server = server_process()
    server.wait_ready()
    data = labelled_folder(tmp_path / "swapped", swap=True)
    done = evaluate("--url", server.url, "--data", str(data), "--out", str(tmp_path / "o"))
    assert done.returncode == 1
    assert "FAILED" in done.stderr
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["accuracy"] == 0.0
    assert summary["passed"] is False

    server.terminate()
    gone = evaluate("--url", server.url, "--data", str(data), "--out", str(tmp_path / "g"))
    assert gone.returncode == 2
    assert "cannot reach the server" in gone.stderr
    missing = evaluate("--url", server.url, "--data", str(tmp_path / "nope"))
    assert missing.returncode == 2


def test_report_from_the_prediction_log(server_process, tmp_path: Path):
    server = server_process()
    server.wait_ready()
    data = labelled_folder(tmp_path / "photos", n=20)
    done = evaluate(
        "--url",
        server.url,
        "--data",
        str(data),
        "--out",
        str(tmp_path / "e"),
        "--min-accuracy",
        "0",
    )
    assert done.returncode == 0, done.stderr
    assert server.terminate() == 0

    reference = drift.build_reference_stats(
        class_names=["cat", "dog"],
        train_labels=["cat", "dog"],
        val_probabilities=np.array([[0.99, 0.01], [0.01, 0.99]] * 20),
        widths=[3000] * 40,
        heights=[2000] * 40,
        brightness=[200.0] * 40,
    )
    (tmp_path / "ref.json").write_text(json.dumps(reference))
    out = tmp_path / "report"
    report = drift_report(
        "--db", str(tmp_path / "predictions.db"), "--reference", str(tmp_path / "ref.json"),
        "--out", str(out),
    )  # fmt: skip
    assert report.returncode == 0, report.stderr
    figures = json.loads((out / "report.json").read_text())["versions"]["tiny-1"]
    perf = figures["performance"]
    assert perf["predictions"] == 40
    assert perf["feedback"] == 40
    assert perf["accuracy"] == 1.0
    assert perf["confusion"] == {"cat": {"cat": 20, "dog": 0}, "dog": {"cat": 0, "dog": 20}}
    # the traffic (80 x 60 px pictures) is nothing like the reference (3000 x 2000)
    assert figures["drift"]["latest"]["width"]["level"] == "significant"
    markdown = (out / "report.md").read_text()
    assert "## Model version `tiny-1`" in markdown
    assert "live accuracy: 1.0000" in markdown
    charts = sorted(p.name for p in out.glob("*.svg"))
    assert charts == ["tiny-1-accuracy.svg", "tiny-1-confidence.svg", "tiny-1-drift.svg"]
    for chart in charts:
        assert f"]({chart})" in markdown
        assert ET.parse(out / chart).getroot().tag.endswith("svg")  # well-formed SVG
    # the latest 5 predictions (a version just deployed): too few to score, as the server says
    few = drift_report(
        "--window", "5", "--db", str(tmp_path / "predictions.db"),
        "--reference", str(tmp_path / "ref.json"), "--out", str(tmp_path / "few"),
    )  # fmt: skip
    assert few.returncode == 0, few.stderr
    figures = json.loads((tmp_path / "few" / "report.json").read_text())["versions"]["tiny-1"]
    assert figures["drift"]["latest"] == {}  # it called 3 predictions "significant" drift
    assert "latest 5 predictions: not scored" in (tmp_path / "few" / "report.md").read_text()


def drift_report(*args: str) -> subprocess.CompletedProcess:
    """The report CLI in the load environment, where matplotlib draws its charts."""
    return in_load_env("-m", "monitoring.drift_report", *args)


def in_load_env(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LOAD_PYTHON), *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_report_reads_the_log_before_and_after_its_schema_migration(tmp_path: Path):
    from test_store import write_v0_log

    from server.store_sqlite import SqliteStore

    db = tmp_path / "old.db"
    write_v0_log(db, 6)  # feedback: old-0 cat (predicted cat), old-1 cat (predicted dog)

    def performance(out: Path) -> dict:
        done = drift_report("--db", str(db), "--out", str(out))
        assert done.returncode == 0, done.stderr
        return json.loads((out / "report.json").read_text())["versions"]["v0"]["performance"]

    before = performance(tmp_path / "before")
    assert (before["predictions"], before["feedback"], before["accuracy"]) == (6, 2, 0.5)
    store = SqliteStore(db, max_queue=10, timeout_s=5.0)
    store.start()  # migrates to the current schema
    store.stop()
    assert performance(tmp_path / "after") == before


def test_evaluate_deployment_on_a_manifest_sends_its_held_out_split_only(
    server_process, tmp_path: Path
):
    """The prepare stage's manifest: only its test split is sent, and only to a model whose
    data_version is that manifest (the export stage's sha256 of it); a model trained on other
    data is refused, since the split could hold its training photos."""
    import dataclasses
    import hashlib

    from conftest import build_tiny_model, tiny_contract

    photos = labelled_folder(tmp_path / "photos")
    rows = ["path,label,sha256,width,height,brightness,split"]
    for label in ("cat", "dog"):
        for i in range(6):
            split = "test" if i < 2 else "train"  # trained on the red dogs: would be 100% wrong
            path = photos / label / f"{i}.jpg"
            rows.append(f"{path},{label},x,80,60,,{split}")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    version = hashlib.sha256(manifest.read_bytes()).hexdigest()
    contract = dataclasses.replace(tiny_contract(), data_version=version)
    model = build_tiny_model(tmp_path / "trained-on-it.onnx", contract)

    server = server_process(MODEL_PATH=str(model))
    server.wait_ready()
    out = tmp_path / "eval"
    done = evaluate("--url", server.url, "--data", str(manifest), "--out", str(out))
    assert done.returncode == 0, done.stderr
    results = json.loads((out / "results.json").read_text())
    assert [r["true_label"] for r in results] == ["cat", "dog", "cat", "dog"]
    assert {r["image"] for r in results} == {
        str(photos / c / f"{i}.jpg") for c in ("cat", "dog") for i in range(2)
    }
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["split"], summary["held_out"], summary["n"]) == ("test", True, 4)
    server.terminate()

    other = server_process()  # the suite's tiny model: data_version "ddd..."
    other.wait_ready()
    refused = evaluate("--url", other.url, "--data", str(manifest), "--out", str(tmp_path / "r"))
    assert refused.returncode == 2
    assert "was trained on data dddddddddddd" in refused.stderr
    assert not (tmp_path / "r" / "summary.json").exists()
    folder = evaluate("--url", other.url, "--data", str(photos), "--out", str(tmp_path / "f"))
    assert folder.returncode == 0, folder.stderr
    # a manifest whose photos are elsewhere was "accuracy 0.0000 (0/0), errors 4, FAILED": a
    # verdict on the model (and, through make promote, its tag) for a missing folder
    moved = tmp_path / "moved.csv"
    moved.write_text(manifest.read_text().replace(str(photos), str(tmp_path / "gone")))
    lost = evaluate("--url", other.url, "--data", str(moved), "--out", str(tmp_path / "m"))
    assert lost.returncode == 2, lost.stderr
    assert "4 of the 4 photos" in lost.stderr
    assert "are not here" in lost.stderr
    assert not (tmp_path / "m" / "summary.json").exists()
    assert json.loads((tmp_path / "f" / "summary.json").read_text())["held_out"] is None


def test_evaluate_deployment_without_feedback_uses_the_token_or_says_it_is_logged(
    server_process, tmp_path: Path
):
    """A server with API_TOKEN lets only token holders send evaluation traffic: with the token
    the photos stay out of its log; without it the run says so and is logged, never failed."""
    server = server_process(API_TOKEN="eval-token-for-tests")
    server.wait_ready()
    data = labelled_folder(tmp_path / "photos", n=2)
    args = ["--url", server.url, "--data", str(data), "--no-feedback"]
    base = [sys.executable, "-m", "monitoring.evaluate_deployment", *args]

    def evaluate_with(token: str, out: str) -> subprocess.CompletedProcess:
        env = {"PATH": "/usr/bin:/bin", "API_TOKEN": token}
        return subprocess.run(
            [*base, "--out", str(tmp_path / out)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )

    tokened = evaluate_with("eval-token-for-tests", "tokened")
    assert tokened.returncode == 0, tokened.stderr
    assert (
        json.loads((tmp_path / "tokened" / "summary.json").read_text())["traffic"] == "evaluation"
    )
    untokened = evaluate_with("", "untokened")
    assert untokened.returncode == 0, untokened.stderr
    assert "needs a bearer token for evaluation traffic" in untokened.stderr
    summary = json.loads((tmp_path / "untokened" / "summary.json").read_text())
    assert summary["traffic"] == "production"
    assert summary["errors"] == 0
    assert summary["correct"] == 4
    metrics = httpx.get(f"{server.url}/metrics").text
    assert prom(metrics, "evaluation_predictions_total") == 4
    assert prom(metrics, "predictions_total") == 4
    # labels without the token: each would be refused, and the run failed after sending them
    # all; it stops at the first refusal and says what to set
    base.remove("--no-feedback")
    refused = evaluate_with("", "refused")
    assert refused.returncode == 2, refused.stderr
    assert "set API_TOKEN to its token, or FEEDBACK=0" in refused.stderr
    metrics = httpx.get(f"{server.url}/metrics").text
    assert prom(metrics, "predictions_total") == 5  # the first photo alone


def test_charts_draw_names_as_text_not_tex(tmp_path: Path):
    """A model version or class name with a '$' was parsed as TeX in chart titles and legends:
    garbled, and an unbalanced one stopped the whole report."""
    code = (
        "import sys; from pathlib import Path; from monitoring import charts\n"
        "out = Path(sys.argv[1])\n"
        "charts.bar_chart(out / 'a.svg', r'Confidence, v$\\frac{a}{$', ['$cat', 'dog'],"
        " {'v$1': [0.5, 0.5], r'$\\frac{a}{$': [0.1, 0.9]}, 'share')\n"
        "charts.line_chart(out / 'b.svg', 'Drift, v$1$2', [0.0, 1.0], {'$x$': [0.1, 0.2]}, 'PSI')\n"
    )
    done = in_load_env("-c", code, str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    drawn = (tmp_path / "a.svg").read_text()
    assert ET.parse(tmp_path / "b.svg").getroot().tag.endswith("svg")
    assert "Confidence, v$\\frac{a}{$" in drawn  # the title as written


def test_report_scores_drift_only_for_the_version_its_model_describes(
    server_process, tmp_path: Path
):
    """`make monitoring-report` scored every logged version against MODEL's reference: after a
    rollout, the old version's traffic was judged against the new one's statistics."""
    from dataclasses import replace

    from conftest import build_tiny_model, tiny_contract

    reference = drift.build_reference_stats(
        class_names=["cat", "dog"],
        train_labels=["cat", "dog"],
        val_probabilities=np.array([[0.99, 0.01], [0.01, 0.99]] * 20),
        widths=[80] * 40,
        heights=[60] * 40,
        brightness=[100.0] * 40,
    )
    contract = tiny_contract()
    models = {}
    for version in ("old-1", "new-2"):
        extra = {**contract.extra, "reference_stats": reference}
        models[version] = build_tiny_model(
            tmp_path / f"{version}.onnx", replace(contract, model_version=version, extra=extra)
        )
        server = server_process(MODEL_PATH=str(models[version]))  # one log for both
        server.wait_ready()
        for i in range(40):
            photo = image_bytes(RED if i % 2 else BLUE, (80, 60))
            httpx.post(
                f"{server.url}/predict", content=photo, headers={"content-type": "image/jpeg"}
            )
        assert server.terminate() == 0
    out = tmp_path / "report"
    done = drift_report(
        "--db", str(tmp_path / "predictions.db"), "--model", str(models["new-2"]), "--out", str(out)
    )
    assert done.returncode == 0, done.stderr
    versions = json.loads((out / "report.json").read_text())["versions"]
    assert set(versions["new-2"]["drift"]["latest"]) >= {"confidence", "width"}
    assert "drift" not in versions["old-1"]
    assert "model version new-2's" in versions["old-1"]["drift_not_scored"]
    markdown = (out / "report.md").read_text()
    assert "Drift: not scored (the reference statistics are model version new-2's" in markdown
    assert sorted(p.name for p in out.glob("old-1-*.svg")) == [
        "old-1-accuracy.svg",
        "old-1-confidence.svg",
    ]
