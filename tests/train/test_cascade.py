"""Cascades: one ONNX file (export.cascade) answering as the eager cascade on real photos; the
train stage fitting one (train.cascade), its checkpoint, and the export stage serving it."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from catsdogs.contract import (
    CASCADE_BELOW,
    INPUT_NAME,
    OUTPUT_ESCALATED,
    OUTPUT_LOGITS,
    OUTPUT_PROBABILITIES,
)
from catsdogs.preprocessing import preprocess_bytes
from export.cascade import (
    Member,
    MemberView,
    export_cascade,
    export_trained_cascade,
    reference,
    with_threshold,
)
from tests.train.export_helpers import run_export_stage, shared_photos, write_manifest
from training.models import (
    CascadeClassifier,
    ImageClassifier,
    build_model,
    default_spec,
    load_cascade,
    load_checkpoint,
    load_served,
    save_checkpoint,
)

pytestmark = pytest.mark.train

ROOT = Path(__file__).resolve().parents[2]
SIZE = 16  # the cascade's input: the largest member's


def member(name: str, size: int, seed: int) -> Member:
    torch.manual_seed(seed)  # a different random head per member: different answers
    spec = default_spec("logreg", size, size)
    return Member(name, build_model("logreg", 2, pretrained=False, spec=spec).eval(), size)


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    """12 real photos through the server's preprocessing, at the cascade's input size."""
    spec = default_spec("logreg", SIZE, SIZE + 2)
    rows = [preprocess_bytes(p.read_bytes(), spec) for p, _ in shared_photos(6)]
    return np.stack(rows)


@pytest.fixture(scope="module")
def members() -> tuple[Member, Member, Member]:
    return member("small", 8, 0), member("mid", 12, 1), member("large", SIZE, 2)


def run(path: Path | bytes, batch: np.ndarray) -> tuple[np.ndarray, ...]:
    model = path if isinstance(path, bytes) else str(path)
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [OUTPUT_LOGITS, OUTPUT_PROBABILITIES, OUTPUT_ESCALATED]
    return tuple(session.run(names, {INPUT_NAME: batch}))


def first_confidence(first: Member, batch: np.ndarray, side: int = SIZE) -> np.ndarray:
    with torch.inference_mode():
        x = torch.from_numpy(batch.copy())
        return MemberView(first, side).probabilities(x).max(dim=1).values.numpy()


def test_the_file_answers_as_the_eager_cascade_with_a_mixed_batch(
    tmp_path: Path, photos: np.ndarray, members: tuple[Member, ...]
) -> None:
    first, mid, large = members
    # the median confidence of the first model: half of the photos escalate
    below = float(np.median(first_confidence(first, photos)))
    then = [first, mid, large]
    path = export_cascade(first, then, below, tmp_path / "cascade.onnx", opset=18)
    onnx.checker.check_model(str(path), full_check=True)

    logits, probs, escalated = run(path, photos)
    want_probs, want_escalated = reference(first, then, below, photos)
    assert 0 < escalated.sum() < len(photos)  # really mixed
    assert escalated.tolist() == want_escalated.tolist()
    np.testing.assert_allclose(probs, want_probs, atol=1e-6)
    np.testing.assert_allclose(torch.softmax(torch.from_numpy(logits), 1).numpy(), probs, atol=1e-6)
    # sure rows are the first model's own answer; escalated ones the average of all three
    with torch.inference_mode():
        x = torch.from_numpy(photos.copy())
        own = [MemberView(m, SIZE).probabilities(x).numpy() for m in then]
    np.testing.assert_allclose(probs[~escalated], own[0][~escalated], atol=1e-6)
    np.testing.assert_allclose(probs[escalated], np.mean(own, axis=0)[escalated], atol=1e-6)
    # each row's answer does not depend on the rest of the batch
    for i in (0, int(np.argmax(escalated))):
        _, alone, esc = run(path, photos[i : i + 1])
        np.testing.assert_allclose(alone[0], probs[i], atol=1e-6)
        assert esc[0] == escalated[i]


def test_the_other_models_live_only_in_the_branch(
    tmp_path: Path, members: tuple[Member, ...]
) -> None:
    first, mid, large = members
    path = export_cascade(first, [first, mid, large], 0.9, tmp_path / "c.onnx", opset=18)
    graph = onnx.load(str(path)).graph
    assert [o.name for o in graph.output] == [OUTPUT_LOGITS, OUTPUT_PROBABILITIES, OUTPUT_ESCALATED]
    assert graph.output[0].type.tensor_type.shape.dim[0].dim_param  # a free batch dimension
    assert [n.op_type for n in graph.node].count("If") == 1
    assert {i.name.split("/")[0] for i in graph.initializer} == {"m0", "cascade"}
    branch = next(n for n in graph.node if n.op_type == "If").attribute
    then_graph = next(a.g for a in branch if a.name == "then_branch")
    assert {i.name.split("/")[0] for i in then_graph.initializer} == {"m1", "m2", "cascade"}
    # the mid model (12 px) sees its view resized inside the graph; the large one does not
    assert sum(n.op_type == "Resize" for n in then_graph.node) == 1
    assert sum(n.op_type == "Resize" for n in graph.node) == 1  # the first model's (8 px)


def test_thresholds_at_the_ends_never_or_always_escalate(
    tmp_path: Path, photos: np.ndarray, members: tuple[Member, ...]
) -> None:
    first, mid, large = members
    then = [mid, large]  # the first model not among them: their average replaces its answer
    model = onnx.load(str(export_cascade(first, then, 0.9, tmp_path / "c.onnx", opset=18)))
    _, never, escalated = run(with_threshold(model, 0.0), photos)
    assert not escalated.any()
    np.testing.assert_allclose(never, reference(first, then, 0.0, photos)[0], atol=1e-6)
    _, every, escalated = run(with_threshold(model, 2.0), photos)
    assert escalated.all()
    want, _ = reference(first, then, 2.0, photos)
    np.testing.assert_allclose(every, want, atol=1e-6)
    with torch.inference_mode():
        x = torch.from_numpy(photos.copy())
        pair = (
            MemberView(mid, SIZE).probabilities(x) + MemberView(large, SIZE).probabilities(x)
        ).numpy() / 2
    np.testing.assert_allclose(every, pair, atol=1e-6)
    # the threshold is an overridable initializer: fed at run time, it replaces the file's
    session = ort.InferenceSession(str(tmp_path / "c.onnx"), providers=["CPUExecutionProvider"])
    names = [OUTPUT_PROBABILITIES, OUTPUT_ESCALATED]
    for fed, want_probs, want_all in ((0.0, never, False), (2.0, every, True)):
        feed = {INPUT_NAME: photos, CASCADE_BELOW: np.array(fed, np.float32)}
        probs, escalated = session.run(names, feed)
        assert escalated.all() if want_all else not escalated.any()
        np.testing.assert_allclose(probs, want_probs, atol=1e-6)
    own, escalated = session.run(names, {INPUT_NAME: photos})  # not fed: the file's 0.9
    np.testing.assert_allclose(own, reference(first, then, 0.9, photos)[0], atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"opset": 17}, "opset >= 18"), ({"opset": 18, "below": 1.5}, "below must be")],
)
def test_bad_cascade_settings_are_named(
    tmp_path: Path, members: tuple[Member, ...], kwargs: dict, message: str
) -> None:
    first, mid, _ = members
    below = kwargs.pop("below", 0.9)
    with pytest.raises(ValueError, match=message):
        export_cascade(first, [mid], below, tmp_path / "c.onnx", **kwargs)


# ---------------------------------------------------------------------- trained cascades
def trained_cascade(seed: int = 0) -> CascadeClassifier:
    """Three logreg models on one 16 px input: 16, 12 and 8 px networks, random heads."""
    spec = default_spec("logreg", SIZE, SIZE + 2)
    models = []
    for i, size in enumerate((SIZE, 12, 8)):
        torch.manual_seed(seed + i)
        models.append(build_model("logreg", 2, pretrained=False, spec=spec, network_size=size))
    first, *others = (m.eval() for m in models)
    return CascadeClassifier(first, others, 0.5).eval()


def save_cascade(path: Path, model: CascadeClassifier, **meta: object) -> Path:
    """``trained_cascade`` as a checkpoint (its meta overridden by ``meta``)."""
    spec = default_spec("logreg", SIZE, SIZE + 2)
    full = {
        "model_name": "logreg",
        "class_names": ["cat", "dog"],
        "preprocessing": spec.to_json(),
        "mlflow_run_id": "",
        "data_version": "0" * 64,
        "git_commit": "0123456789abcdef",
        "params": {"model": "logreg", "cascade": "logreg@12+logreg@8"},
        "val_metrics": {"accuracy": 0.5},
        "model_options": {},
        "cascade": {"models": ["logreg@12", "logreg@8"], "below": model.below},
        **meta,
    }
    entries = [
        ({"model_name": "logreg", "model_options": {"network_size": s}}, m)
        for s, m in zip((12, 8), model.others, strict=True)
    ]
    save_checkpoint(path, model.first, full, entries)
    return path


def test_the_eager_cascade_is_what_its_file_answers(tmp_path: Path, photos: np.ndarray) -> None:
    cascade = trained_cascade()
    with torch.inference_mode():
        p0 = torch.softmax(cascade.first(torch.from_numpy(photos.copy())), 1).max(1).values
    middle = p0.sort().values[len(p0) // 2 - 1 : len(p0) // 2 + 1]
    cascade.below = float(middle.mean())  # half of the photos escalate, none at the threshold
    path = export_trained_cascade(cascade, tmp_path / "c.onnx", input_size=SIZE, opset=18)
    logits, probs, escalated = run(path, photos)
    with torch.inference_mode():
        want, want_escalated = cascade.probabilities(torch.from_numpy(photos.copy()))
        want_logits = cascade(torch.from_numpy(photos.copy()))
    assert 0 < escalated.sum() < len(photos)
    assert escalated.tolist() == want_escalated.tolist()
    np.testing.assert_allclose(probs, want.numpy(), atol=1e-6)
    np.testing.assert_allclose(logits, want_logits.numpy(), atol=1e-5)
    # every model takes the one input and resizes inside itself: no resize outside the models
    graph = onnx.load(str(path)).graph
    assert sum(n.op_type == "Resize" for n in graph.node) == 0  # the first runs at 16 px


def test_a_cascade_checkpoint_round_trips(tmp_path: Path, photos: np.ndarray) -> None:
    cascade = trained_cascade(seed=3)
    loaded = load_cascade(save_cascade(tmp_path / "c.pt", cascade))
    assert loaded is not None
    assert loaded.below == 0.5
    x = torch.from_numpy(photos.copy())
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), cascade(x))
    model, meta = load_checkpoint(tmp_path / "c.pt")  # the first model alone still loads
    assert meta["cascade"]["below"] == 0.5
    # a checkpoint whose meta names more models than it holds is refused
    three = {"models": ["logreg@12", "logreg@8", "logreg@4"], "below": 0.5}
    save_cascade(tmp_path / "bad.pt", cascade, cascade=three)
    with pytest.raises(ValueError, match="names 3 models, the file holds 2"):
        load_cascade(tmp_path / "bad.pt")
    # a plain checkpoint has no cascade
    plain = {k: v for k, v in meta.items() if k != "cascade"}
    save_checkpoint(tmp_path / "plain.pt", model, plain)
    assert load_cascade(tmp_path / "plain.pt") is None
    # what the export stage serves, from one read: the cascade, or the plain model
    served, served_meta = load_served(tmp_path / "c.pt")
    assert isinstance(served, CascadeClassifier)
    assert served_meta["cascade"]["below"] == 0.5
    with torch.inference_mode():
        torch.testing.assert_close(served(x), cascade(x))
    served, served_meta = load_served(tmp_path / "plain.pt")
    assert isinstance(served, ImageClassifier)
    assert "cascade" not in served_meta


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"cascade": "resnet50"}, r"train.cascade: 'resnet50' is not one of"),
        (
            {"cascade": "efficientnet_lite2@500"},
            r"'efficientnet_lite2@500' runs at 500 px, over 2x train.input_size \(224\)",
        ),
        ({"cascade": "logreg@x"}, r"the side after '@' must be a number"),
        ({"cascade": "logreg", "pretrained": False}, r"first model must be a frozen backbone"),
        (
            {"cascade": "logreg", "fine_tune_blocks": 1, "fine_tune_epochs": 1},
            r"turn fine-tuning off",
        ),
        ({"cascade_below": 0.0}, r"train.cascade_below: must be within \(0, 1\]"),
    ],
)
def test_bad_cascade_params_are_named(train: dict, message: str) -> None:
    from training.params import ParamsError, TrainParams, cascade_members, check_train

    with pytest.raises(ParamsError, match=message):
        check_train(TrainParams(**train))
    ok = TrainParams(input_size=260, cascade="efficientnet_lite1+efficientnet_lite2@250")
    assert cascade_members(check_train(ok)) == [
        ("efficientnet_lite1", 240),
        ("efficientnet_lite2", 250),
    ]


def test_the_export_stage_serves_a_cascade_checkpoint(tmp_path: Path) -> None:
    """export.export on a cascade checkpoint: one file with the If, parity with the eager cascade
    on real test photos, the contract, the escalation share and both paths' latency reported,
    and no int8 model (its quantizer does not reach into the branch)."""

    from catsdogs.modelfile import load_model_file

    spec = default_spec("logreg", SIZE, SIZE + 2)
    photos_ = {"train": shared_photos(2), "val": shared_photos(2, 10), "test": shared_photos(8, 20)}
    data_version = write_manifest(tmp_path / "manifest.csv", photos_, spec)
    cascade = trained_cascade(seed=5)
    cascade.below = 0.55  # random heads are unsure of everything: some photos escalate, not all
    checkpoint = save_cascade(tmp_path / "checkpoint.pt", cascade, data_version=data_version)
    report = run_export_stage(
        tmp_path, checkpoint, tmp_path / "manifest.csv", parity_images=16, bench_runs=2
    )
    out = tmp_path / "model.onnx"
    assert report["parity"]["ok"]
    assert report["parity"]["n"] == 16
    assert report["int8"] == {"made": False, "kept": False, "reason": "a cascade is served fp32"}
    assert report["served"] == "fp32"
    info = report["cascade"]
    assert info["models"] == ["logreg@12", "logreg@8"]
    assert info["below"] == 0.55
    # the share the report gives is the file's own answer on the test photos
    loaded = load_model_file(out)
    batch = np.stack([preprocess_bytes(p.read_bytes(), spec) for p, _ in photos_["test"]])
    _, _, escalated = run(out, batch)
    assert info["test_escalated"] == pytest.approx(escalated.mean(), abs=1e-6)
    assert 0 < escalated.mean() < 1
    ms = info["batch_1_ms"]
    assert ms["mean"] == pytest.approx(
        ms["sure"] + info["test_escalated"] * (ms["escalated"] - ms["sure"]), abs=1e-3
    )
    assert loaded.contract.input_size == SIZE
    assert loaded.contract.data_version == data_version
    assert loaded.contract.extra["cascade"] == {"models": ["logreg@12", "logreg@8"], "below": 0.55}
    assert [o.name for o in loaded.session.get_outputs()][-1] == OUTPUT_ESCALATED


@pytest.mark.slow
def test_the_train_stage_fits_a_cascade_that_the_export_stage_serves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    from mlflow.tracking import MlflowClient

    from tests.train.test_pipeline_smoke import base_env, prepared, tiny_params
    from tests.train.test_pipeline_smoke import run as run_stage

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = base_env(MLFLOW_TRACKING_URI=uri)
    params = tiny_params(
        tmp_path, network_size=56, cascade="efficientnet_lite1@48+logreg@32", cascade_below=0.95
    )
    prepared(tmp_path, env, params)
    cmd = [sys.executable, "-m", "training.train", "--params", str(params)]
    out = run_stage(cmd, tmp_path, env)
    assert out.returncode == 0, out.stderr[-3000:]
    checkpoint = tmp_path / "models" / "checkpoint.pt"
    cascade = load_cascade(checkpoint)
    assert cascade is not None
    _, meta = load_checkpoint(checkpoint)
    assert meta["cascade"] == {"models": ["efficientnet_lite1@48", "logreg@32"], "below": 0.95}
    assert meta["model_options"]["network_size"] == 56
    assert [m.normalize.resize_to for m in (cascade.first, *cascade.others)] == [56, 48, 32]
    # the validation figures are the cascade's, the model the stage serves
    assert 0.0 <= meta["val_metrics"]["accuracy"] <= 1.0
    tags = MlflowClient(tracking_uri=uri).get_run(meta["mlflow_run_id"]).data.tags
    assert tags["cascade"] == "efficientnet_lite1@48+logreg@32 below 0.95"

    # the export stage where the train stage ran: the manifest's photo paths are relative to it
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    manifest = tmp_path / "data" / "prepared" / "manifest.csv"
    report = run_export_stage(tmp_path, checkpoint, manifest, params, parity_images=4, bench_runs=2)
    assert report["parity"]["ok"]
    assert report["cascade"]["models"] == ["efficientnet_lite1@48", "logreg@32"]


def warmup_per_image(metrics: str) -> dict[int, float]:
    """``inference_warmup_seconds_per_image`` by batch size, from a /metrics page."""
    pattern = r'^inference_warmup_seconds_per_image\{batch_size="(\d+)"\} (\S+)$'
    return {int(n): float(v) for n, v in re.findall(pattern, metrics, flags=re.M)}


def test_a_served_cascade_warms_up_on_its_sure_path_and_answers_as_its_file(
    tmp_path: Path,
) -> None:
    """The real server on a cascade file: its warm-up times the path most images take (blank
    warm-up images would all escalate, and the adaptive batch limits would be set by the rare,
    several times slower path), it is ready, and each photo's answer, escalated or not, is the
    file's own. The threshold, an overridable initializer, is never set by traffic."""
    import urllib.request

    from catsdogs.contract import ModelContract
    from export.onnx_tools import embed_metadata
    from loadtest.serverproc import SERVE_PYTHON, running_server

    side = 224
    torch.manual_seed(3)
    cheap = build_model("logreg", 2, pretrained=False, spec=default_spec("logreg", side, 256))
    with torch.no_grad():  # a blank image (what warm-up runs) gets 0.5 for both: it escalates
        cheap.head[1].bias -= cheap(torch.zeros(1, side, side, 3, dtype=torch.uint8))[0]
    heavy_spec = default_spec("efficientnet_lite0", side, 256)
    heavy = build_model("efficientnet_lite0", 2, pretrained=False, spec=heavy_spec)
    first = Member("logreg", cheap.eval(), side)
    then = [first, Member("efficientnet_lite0", heavy.eval(), side)]
    images = np.stack([preprocess_bytes(p.read_bytes(), heavy_spec) for p, _ in shared_photos(4)])
    below = float(np.median(first_confidence(first, images, side)))
    path = export_cascade(first, then, below, tmp_path / "cascade.onnx", opset=18)
    contract = ModelContract(
        class_names=("cat", "dog"),
        input_size=side,
        preprocessing=heavy_spec,
        model_name="logreg",
        model_version="cascade-1",
        mlflow_run_id="run-0",
        git_commit="0" * 40,
        data_version="d" * 64,
        exported_at="2026-01-01T00:00:00Z",
        extra={
            "metrics": {"accuracy": 0.5, "n": 8},
            "quantization": "none",
            "cascade": {"models": ["efficientnet_lite0"], "below": below},
        },
    )
    embed_metadata(path, contract.to_metadata())

    # in-process: the two paths, forced through the overridable threshold
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert CASCADE_BELOW in {i.name for i in session.get_overridable_initializers()}
    assert [i.name for i in session.get_inputs()] == [INPUT_NAME]
    want, escalated = session.run([OUTPUT_PROBABILITIES, OUTPUT_ESCALATED], {INPUT_NAME: images})
    assert 0 < escalated.sum() < len(images)
    blank = np.zeros((1, side, side, 3), np.uint8)
    assert session.run([OUTPUT_ESCALATED], {INPUT_NAME: blank})[0].all()
    lone = images[:1]

    def best_ms(below_fed: float) -> float:
        feed = {INPUT_NAME: lone, CASCADE_BELOW: np.array(below_fed, np.float32)}
        session.run(None, feed)
        times = []
        for _ in range(5):
            started = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - started)
        return min(times) * 1000

    sure_ms, escalated_ms = best_ms(0.0), best_ms(2.0)
    assert escalated_ms > 4 * sure_ms  # the heavy model runs only on the escalated path

    with running_server(path, tmp_path / "server.log", python=SERVE_PYTHON) as server:
        meta = json.loads(urllib.request.urlopen(f"{server.url}/metadata", timeout=10).read())
        assert meta["cascade"] == {"models": ["efficientnet_lite0"], "below": below}
        metrics = urllib.request.urlopen(f"{server.url}/metrics", timeout=10).read().decode()
        curve = warmup_per_image(metrics)
        assert set(curve) == {1, 2, 3, 4}  # ADAPTIVE_BATCH's curve, MAX_BATCH_SIZE 4
        # the warm-up timed the sure path: far under the escalated path's time per image
        assert curve[1] * 1000 < escalated_ms / 2, (curve, sure_ms, escalated_ms)
        for i, (photo, _) in enumerate(shared_photos(4)):
            request = urllib.request.Request(
                f"{server.url}/predict",
                data=photo.read_bytes(),
                headers={"Content-Type": "image/jpeg"},
            )
            body = json.loads(urllib.request.urlopen(request, timeout=30).read())
            got = [body["probabilities"][c] for c in ("cat", "dog")]
            np.testing.assert_allclose(got, want[i], rtol=1e-5, atol=1e-7)
