"""Export: one ONNX file, symbolic batch, the full contract inside, parity that fails loudly."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from catsdogs.contract import ModelContract
from catsdogs.manifest import read_manifest
from catsdogs.modelfile import ModelFileError, load_model_file
from catsdogs.preprocessing import preprocess_bytes
from export import onnx_tools as ox
from export.export import export_verified, manifest_version
from export.export import main as export_main
from export.scoring import load_batch
from tests.train.export_helpers import (
    CLASS_NAMES,
    SPEC,
    color_contract,
    color_model,
    run_export_stage,
    shared_photos,
    solid_png,
    write_checkpoint,
    write_manifest,
)
from tests.train.process_helpers import process_group, stop_group

pytestmark = pytest.mark.train
ROOT = Path(__file__).resolve().parents[2]
SERVE_PY = ROOT / ".venv-serve" / "bin" / "python"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return ox.export_onnx(color_model(), path, input_size=SPEC.input_size, opset=18)


def test_export_writes_one_file_with_symbolic_batch(exported: Path) -> None:
    assert exported.is_file()
    assert not exported.with_name(exported.name + ".data").exists()
    model = ox.check_onnx_file(exported)  # full checker + interface
    image = model.graph.input[0].type.tensor_type
    assert image.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_value for d in image.shape.dim[1:]] == [SPEC.input_size, SPEC.input_size, 3]
    assert image.shape.dim[0].dim_param  # symbolic, not a number


def test_batches_1_7_32_run_and_match_torch(exported: Path) -> None:
    session = ox.make_session(exported)
    assert ox.run_batch_checks(session, SPEC.input_size, 2) == [1, 7, 32]
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(7, SPEC.input_size, SPEC.input_size, 3), dtype=np.uint8)
    logits, probs = ox.onnx_outputs(session, x)
    np.testing.assert_allclose(logits, ox.torch_logits(color_model(), x), atol=1e-5)
    np.testing.assert_allclose(probs, torch.softmax(torch.from_numpy(logits), -1), atol=1e-6)


def test_fixed_batch_graph_is_rejected(tmp_path: Path) -> None:
    fixed = tmp_path / "fixed.onnx"
    wrapped = ox.ClassifierWithProbabilities(color_model()).eval()
    example = torch.zeros((2, SPEC.input_size, SPEC.input_size, 3), dtype=torch.uint8)
    torch.onnx.export(
        wrapped,
        (example,),
        str(fixed),
        input_names=["image"],
        output_names=["logits", "probabilities"],
        external_data=False,
        dynamo=True,
    )
    with pytest.raises(ox.ExportError, match="batch dimension is fixed at 2"):
        ox.check_onnx_file(fixed)


def test_parity_on_real_photos_passes(exported: Path) -> None:
    photos = shared_photos(4)
    batch = load_batch([p for p, _ in photos], SPEC).images
    parity = ox.check_parity(color_model(), ox.make_session(exported), batch, atol=1e-4)
    assert parity.ok
    assert parity.n == 8
    assert parity.max_abs_logit_diff <= 1e-4
    assert parity.label_mismatches == 0


class ExportsDifferently(nn.Module):
    """Eager and exported graphs disagree: what a broken exporter or a bad op would do."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = color_model()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.inner(x)
        if torch.compiler.is_exporting():
            return logits + 0.01  # still within float noise of nothing; far above 1e-4
        return logits


def test_parity_failure_fails_the_export_and_leaves_no_file(tmp_path: Path) -> None:
    photos = shared_photos(4)
    batch = load_batch([p for p, _ in photos], SPEC).images
    out = tmp_path / "model.onnx"
    bad = ExportsDifferently().eval()
    with pytest.raises(ox.ExportError, match=r"differs from PyTorch on 8 photos.*0\.01"):
        export_verified(
            bad,
            out,
            spec=SPEC,
            n_classes=2,
            opset=18,
            parity_images=batch,
            atol=1e-4,
        )
    assert not out.exists()


def test_parity_detects_other_weights(exported: Path) -> None:
    other = color_model()
    with torch.no_grad():
        other.head[1].weight.mul_(-1.0)  # swaps the classes
    batch = load_batch([p for p, _ in shared_photos(2)], SPEC).images
    with pytest.raises(ox.ExportError, match="different labels"):
        ox.check_parity(other, ox.make_session(exported), batch, atol=1e-4)


def test_parity_checks_the_served_probabilities_too(exported: Path, tmp_path: Path) -> None:
    """The server answers the ``probabilities`` output: a file whose logits match eager PyTorch
    but whose probabilities do not (here their columns swapped after the softmax, every label
    wrong) must fail parity, and so must NaN probabilities."""
    model = onnx.load(str(exported))
    graph = model.graph
    (softmax_out,) = [o for o in graph.output if o.name == ox.OUTPUT_PROBABILITIES]
    (producer,) = [n for n in graph.node if ox.OUTPUT_PROBABILITIES in n.output]
    producer.output[list(producer.output).index(ox.OUTPUT_PROBABILITIES)] = "probs_in_order"
    graph.initializer.append(onnx.numpy_helper.from_array(np.array([1, 0]), "swap"))
    graph.node.append(
        onnx.helper.make_node("Gather", ["probs_in_order", "swap"], [softmax_out.name], axis=1)
    )
    swapped = tmp_path / "swapped.onnx"
    onnx.save(model, str(swapped))
    batch = load_batch([p for p, _ in shared_photos(2)], SPEC).images
    session = ox.make_session(swapped)
    logits, probs = ox.onnx_outputs(session, batch)
    np.testing.assert_allclose(logits, ox.torch_logits(color_model(), batch), atol=1e-5)
    with pytest.raises(
        ox.ExportError, match=r"max \|probability diff\| 0\.\d+.*4 different labels"
    ):
        ox.check_parity(color_model(), session, batch, atol=1e-4)
    expected = ox.torch_logits(color_model(), batch)
    with pytest.raises(ox.ExportError, match="differs from PyTorch"):
        ox.parity_of(expected, expected, np.full_like(probs, np.nan), atol=1e-4)


def test_metadata_round_trip(exported: Path, tmp_path: Path) -> None:
    contract = color_contract(
        model_version="v1",
        mlflow_run_id="r1",
        git_commit="abc",
        exported_at="2026-01-01T00:00:00Z",
        extra={
            "metrics": {"accuracy": 1.0},
            "reference_stats": {"n": 3},
            "training": {},
            "quantization": "none",
        },
    )
    dest = ox.embed_metadata(exported, contract.to_metadata(), tmp_path / "with_meta.onnx")
    ox.check_onnx_file(dest)
    back = ModelContract.from_metadata(ox.read_metadata(dest))
    assert back == contract
    assert back.extra["quantization"] == "none"


def test_model_version_names_data_code_and_weights() -> None:
    v = ox.model_version("2026-11-26T19:00:00Z", "ab" * 32, "1234567890", "ff" * 32)
    assert v == "20261126-abababab-1234567-ffffff"


@pytest.mark.parametrize("content", [b"", b"not an onnx model at all", "truncated"])
def test_bad_model_file_error_names_the_file(
    exported: Path, tmp_path: Path, content: bytes | str
) -> None:
    bad = tmp_path / "bad.onnx"
    data = exported.read_bytes()
    bad.write_bytes(data[: len(data) // 2] if content == "truncated" else content)
    with pytest.raises(ModelFileError, match=re.escape(str(bad))):
        load_model_file(bad)


def test_missing_model_file_error_names_it(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match=r"nope\.onnx does not exist"):
        load_model_file(tmp_path / "nope.onnx")


@pytest.fixture(scope="module")
def stage(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The export CLI end to end on a tiny model and 20 real photos a class."""
    tmp = tmp_path_factory.mktemp("stage")
    photos = shared_photos(10)
    manifest = tmp / "manifest.csv"
    data_version = write_manifest(
        manifest,
        {"train": shared_photos(6, offset=20), "val": shared_photos(4, offset=30), "test": photos},
    )
    checkpoint = write_checkpoint(tmp / "checkpoint.pt", color_model(), data_version)
    params = tmp / "params.yaml"
    params.write_text(
        textwrap.dedent("""
        export:
          registered_model: catsdogs
          opset: 18
          parity_images: 16
          parity_atol: 1.0e-4
          quantize: true
          calibration_images: 8
          int8_max_accuracy_drop: 1.0
          serve: fp32
          bench_threads: 1
          bench_warmup: 1
          bench_runs: 2
          register: false
        """)
    )
    out = {
        "out": tmp / "models" / "model.onnx",
        "int8": tmp / "models" / "int8",
        "report": tmp / "reports" / "export.json",
    }
    export_main(
        [
            "--params",
            str(params),
            "--checkpoint",
            str(checkpoint),
            "--manifest",
            str(manifest),
            "--out",
            str(out["out"]),
            "--int8-dir",
            str(out["int8"]),
            "--report",
            str(out["report"]),
        ]
    )
    return {**out, "manifest": manifest, "params": params, "data_version": Path(data_version)}


def test_stage_embeds_a_complete_contract(stage: dict[str, Path]) -> None:
    loaded = load_model_file(stage["out"])
    c = loaded.contract
    assert c.class_names == CLASS_NAMES
    assert c.preprocessing == SPEC
    assert c.data_version == str(stage["data_version"])
    assert c.git_commit == "0123456789abcdef"
    assert c.model_version.split("-")[1] == c.data_version[:8]
    assert set(c.extra) >= {"metrics", "reference_stats", "training", "quantization"}
    assert set(c.extra["metrics"]) == {"accuracy", "precision", "recall", "f1", "roc_auc", "n"}
    assert c.extra["metrics"]["n"] == 20
    ref = c.extra["reference_stats"]
    assert ref["class_names"] == list(CLASS_NAMES)
    assert ref["class_balance"] == {"cat": 0.5, "dog": 0.5}
    assert sum(ref["confidence"]["counts"]) == 8  # predictions on the validation photos
    assert ref["n"] == 20  # sizes and brightness of training and validation photos
    assert sum(ref["brightness"]["counts"]) == 20
    assert c.extra["quantization"] == "none"


def test_stage_report_has_int8_latency_and_parity(stage: dict[str, Path]) -> None:
    report = json.loads(stage["report"].read_text())
    assert report["parity"]["ok"]
    assert report["parity"]["n"] == 16
    assert sum(report["parity"]["per_class"].values()) == 16  # which photos it compared
    assert set(report["parity"]["per_class"]) == set(CLASS_NAMES)
    assert report["int8"]["made"]
    assert report["int8"]["kept"]
    assert set(report["accuracy"]) == {"fp32", "int8"}
    for name in ("torch_eager", "onnxruntime_fp32", "onnxruntime_int8"):
        assert report["latency_ms"][name]["batch_1_ms"] > 0
        assert report["latency_ms"][name]["batch_32_ms"] > 0
    int8 = load_model_file(stage["int8"] / "model.int8.onnx")
    # the kept file's size, its contract included (it was measured before the contract went in)
    assert report["int8"]["bytes_int8"] == (stage["int8"] / "model.int8.onnx").stat().st_size
    assert int8.contract.extra["quantization"] == "int8_qdq"
    # its own version: predictions of the two files are logged and judged apart
    fp32 = load_model_file(stage["out"])
    assert int8.contract.model_version == f"{fp32.contract.model_version}-int8"
    assert report["int8"]["model_version"] == int8.contract.model_version
    for key in ("mlflow_run_id", "git_commit", "data_version", "exported_at"):
        assert getattr(int8.contract, key) == getattr(fp32.contract, key), key
    assert int8.contract.extra["metrics"]["accuracy"] == report["accuracy"]["int8"]
    assert report["files"]["served"]["bytes"] == stage["out"].stat().st_size
    for path in (stage["out"], stage["int8"] / "model.int8.onnx"):
        assert path.stat().st_mode & 0o044 == 0o044  # readable by a server running as another user


def test_metrics_in_file_equal_evaluate_stage(stage: dict[str, Path], tmp_path: Path) -> None:
    from export.evaluate import main as evaluate_main

    params = stage["params"]
    params.write_text(params.read_text() + "\nevaluate:\n  split: test\n  batch_size: 7\n")
    metrics = tmp_path / "metrics.json"
    evaluate_main(
        [
            "--params",
            str(params),
            "--model",
            str(stage["out"]),
            "--manifest",
            str(stage["manifest"]),
            "--metrics",
            str(metrics),
            "--plots",
            str(tmp_path / "plots"),
        ]
    )
    embedded = load_model_file(stage["out"]).contract.extra["metrics"]
    assert json.loads(metrics.read_text()) == embedded


def test_stage_fails_on_data_version_mismatch(stage: dict[str, Path], tmp_path: Path) -> None:
    checkpoint = write_checkpoint(tmp_path / "ck.pt", color_model(), "0" * 64)
    with pytest.raises(SystemExit) as exc:
        export_main(
            [
                "--params",
                str(stage["params"]),
                "--checkpoint",
                str(checkpoint),
                "--manifest",
                str(stage["manifest"]),
                "--out",
                str(tmp_path / "m.onnx"),
                "--int8-dir",
                str(tmp_path / "i8"),
                "--report",
                str(tmp_path / "r.json"),
            ]
        )
    assert exc.value.code == 1
    assert not (tmp_path / "m.onnx").exists()


def _stage_args(stage: dict[str, Path], **paths: Path) -> list[str]:
    args = {"--params": stage["params"], "--manifest": stage["manifest"], **paths}
    return [x for kv in args.items() for x in (kv[0], str(kv[1]))]


def test_a_shared_int8_folder_keeps_its_other_files(stage: dict[str, Path], tmp_path: Path):
    """--int8-dir may be the models folder itself: the stage replaces its own two files there,
    never the folder (it used to delete it, the checkpoint and the new model with it)."""
    models = tmp_path / "models"
    models.mkdir()
    checkpoint = write_checkpoint(
        models / "checkpoint.pt", color_model(), str(stage["data_version"])
    )
    (models / "notes.txt").write_text("kept\n")
    export_main(
        _stage_args(
            stage,
            **{
                "--checkpoint": checkpoint,
                "--out": models / "model.onnx",
                "--int8-dir": models,
                "--report": tmp_path / "export.json",
            },
        )
    )
    assert (models / "notes.txt").read_text() == "kept\n"
    assert checkpoint.is_file()
    assert load_model_file(models / "model.onnx").contract.class_names == CLASS_NAMES
    assert json.loads((models / "quantization.json").read_text())["made"]


def test_a_stage_failing_midway_leaves_no_file_and_no_report(
    stage: dict[str, Path], tmp_path: Path
) -> None:
    """A validation photo gone: the stage fails after the file was exported and checked, and
    takes away that file (no contract in it yet) and the previous run's report."""
    rows = stage["manifest"].read_text().splitlines()
    (i,) = [n for n, row in enumerate(rows) if row.endswith(",val")][:1]
    path = rows[i].split(",")[0]
    rows[i] = rows[i].replace(path, str(tmp_path / "gone.jpg"))
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    checkpoint = write_checkpoint(tmp_path / "ck.pt", color_model(), manifest_version(manifest))
    out, report = tmp_path / "model.onnx", tmp_path / "export.json"
    out.write_bytes(b"the previous run's model")
    report.write_text('{"the previous run": true}')
    with pytest.raises((OSError, ValueError, SystemExit)):
        export_main(
            _stage_args(
                stage,
                **{
                    "--manifest": manifest,
                    "--checkpoint": checkpoint,
                    "--out": out,
                    "--int8-dir": tmp_path / "int8",
                    "--report": report,
                },
            )
        )
    assert not out.exists()
    assert not report.exists()


def test_a_bad_export_parameter_is_one_line_naming_it(
    stage: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(stage["params"].read_text().replace("bench_threads: 1", "bench_threads: -3"))
    with pytest.raises(SystemExit) as exc:
        export_main(
            _stage_args(
                stage,
                **{
                    "--params": params,
                    "--checkpoint": tmp_path / "unused.pt",
                    "--out": tmp_path / "m.onnx",
                    "--int8-dir": tmp_path / "i8",
                    "--report": tmp_path / "r.json",
                },
            )
        )
    assert exc.value.code == 2
    # the stage, then the key as params.yaml spells it (it read "export: export: bench_threads")
    assert "export: export.bench_threads: must be >= 1, got -3" in caplog.text


def test_an_opset_the_exporter_cannot_write_fails_naming_the_parameter(tmp_path: Path) -> None:
    """torch's exporter writes opset 18 and converts down where ONNX's converter can; when it
    cannot it keeps 18 with a warning. The file must not claim the opset asked for."""
    with pytest.raises(
        ox.ExportError, match=r"export\.opset is 13 but the exporter wrote opset 18"
    ):
        ox.export_onnx(color_model(), tmp_path / "m.onnx", input_size=SPEC.input_size, opset=13)


SERVE_SCRIPT = """
import json, sys
from pathlib import Path
from catsdogs.preprocessing import preprocess_bytes
from catsdogs.modelfile import load_model_file
try:
    import torch  # noqa: F401
    sys.exit("torch is importable in the serving environment")
except ImportError:
    pass
loaded = load_model_file(sys.argv[1])
spec, names = loaded.contract.preprocessing, loaded.contract.class_names
out = {}
for path in sys.argv[2:]:
    x = preprocess_bytes(Path(path).read_bytes(), spec)[None]
    probs = loaded.session.run(["probabilities"], {"image": x})[0][0]
    out[Path(path).name] = [names[int(probs.argmax())], probs.tolist()]
print(json.dumps(out))
"""


def test_exported_file_alone_predicts_in_serving_env(
    stage: dict[str, Path], tmp_path: Path
) -> None:
    """Nothing but the file, in the torch-free environment: the right label for known inputs."""
    red, blue = tmp_path / "red.png", tmp_path / "blue.png"
    red.write_bytes(solid_png((230, 20, 20)))
    blue.write_bytes(solid_png((20, 20, 230)))
    photo = shared_photos(1)[0][0]
    proc = subprocess.run(
        [str(SERVE_PY), "-c", SERVE_SCRIPT, str(stage["out"]), str(red), str(blue), str(photo)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["red.png"][0] == "cat"
    assert got["blue.png"][0] == "dog"
    # the same numbers the PyTorch model gives for the same preprocessed photo
    x = preprocess_bytes(photo.read_bytes(), SPEC)[None]
    expected = torch.softmax(torch.from_numpy(ox.torch_logits(color_model(), x)), -1)[0]
    np.testing.assert_allclose(got[photo.name][1], expected.numpy(), atol=1e-5)
    assert sys.executable != str(SERVE_PY)


def test_a_served_int8_file_is_reported_and_tagged_under_its_own_version(
    stage: dict[str, Path], tmp_path: Path
) -> None:
    """export.serve: int8 puts the int8 file at models/model.onnx: the report's model_version
    (which becomes the registry's version tag, and which promotion checks the server against)
    is that file's, not the fp32 one's."""
    fp32 = load_model_file(stage["out"]).contract.model_version
    checkpoint = stage["out"].parents[1] / "checkpoint.pt"
    report = run_export_stage(
        tmp_path,
        checkpoint,
        stage["manifest"],
        stage["params"],
        serve="int8",
        parity_images=4,
        bench_runs=1,
        bench_warmup=0,
    )
    served = load_model_file(tmp_path / "model.onnx").contract
    assert report["served"] == "int8"
    assert served.extra["quantization"] == "int8_qdq"
    assert report["model_version"] == served.model_version == f"{fp32}-int8"
    # parity (against PyTorch) is the fp32 file's; the served int8 file's own distance from that
    # file is reported beside it, from the two files' answers on the test split
    close = report["int8"]["agreement_with_fp32"]
    fp32_session = ox.make_session(stage["out"])
    int8_session = ox.make_session(tmp_path / "model.onnx")
    rows = read_manifest(stage["manifest"])
    test = [r.path for r in rows if r.split == "test"]
    assert close["n"] == len(test) > 0
    x = np.stack([preprocess_bytes(p.read_bytes(), SPEC) for p in test])
    a = fp32_session.run(["probabilities"], {"image": x})[0]
    b = int8_session.run(["probabilities"], {"image": x})[0]
    assert close["labels_differ"] == int((a.argmax(1) != b.argmax(1)).sum())
    assert close["max_abs_prob_diff"] == pytest.approx(float(np.abs(a - b).max()), abs=1e-6)
    assert close["max_abs_prob_diff"] > 0  # quantized: not the fp32 numbers


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stopped_stage_leaves_no_model_file(
    stage: dict[str, Path], tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    """SIGTERM (docker stop, a cancelled job) or Ctrl-C once the file is written, during the
    latency runs: the stage removes the file it wrote, as it does on any failure. SIGTERM left
    it (complete, contract and all, beside no report: `make serve` served it); Ctrl-C was a
    traceback and exit 1. Now 143 and 130, one line for Ctrl-C."""
    params = tmp_path / "params.yaml"
    params.write_text(stage["params"].read_text().replace("bench_runs: 2", "bench_runs: 200000"))
    out, report = tmp_path / "model.onnx", tmp_path / "export.json"
    args = _stage_args(
        stage,
        **{
            "--params": params,
            "--checkpoint": write_checkpoint(
                tmp_path / "ck.pt", color_model(), str(stage["data_version"])
            ),
            "--out": out,
            "--int8-dir": tmp_path / "int8",
            "--report": report,
        },
    )
    with process_group([sys.executable, "-m", "export.export", *args], ROOT) as proc:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if out.exists() and (tmp_path / "int8" / "quantization.json").exists():
                break  # exported, checked and quantized: the latency runs have begun
            time.sleep(0.05)
        assert proc.poll() is None, "the stage ended before it could be stopped"
        time.sleep(0.5)
        output = stop_group(proc, sig)
    assert proc.returncode == code, output[-3000:]
    assert not out.exists()
    assert not report.exists()
    if sig == signal.SIGINT:
        assert "Traceback" not in output, output[-3000:]
        assert "export: stopped (Ctrl-C)" in output


def test_a_test_split_smaller_than_parity_images_checks_every_photo(
    stage: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A quick run on a few photos a class (prepare.max_per_class) leaves fewer test photos than
    export.parity_images: parity runs on all of them, with a warning; the stage used to fail."""
    n_test = sum(row.endswith(",test") for row in stage["manifest"].read_text().splitlines())
    params = tmp_path / "params.yaml"
    params.write_text(
        stage["params"].read_text().replace("parity_images: 16", f"parity_images: {n_test + 40}")
    )
    report = tmp_path / "export.json"
    checkpoint = write_checkpoint(tmp_path / "ck.pt", color_model(), str(stage["data_version"]))
    with caplog.at_level("WARNING", logger="export"):
        export_main(
            _stage_args(
                stage,
                **{
                    "--params": params,
                    "--checkpoint": checkpoint,
                    "--out": tmp_path / "model.onnx",
                    "--int8-dir": tmp_path / "int8",
                    "--report": report,
                },
            )
        )
    parity = json.loads(report.read_text())["parity"]
    assert parity["n"] == n_test
    assert parity["ok"]
    assert f"parity on all {n_test} test photos" in caplog.text
