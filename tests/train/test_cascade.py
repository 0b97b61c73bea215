"""Cascades: one ONNX file (export.cascade) answering as the eager cascade on real photos; the
train stage fitting one (train.cascade), its checkpoint, and the export stage serving it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from catsdogs.cascade import first_step, second_step, threshold, two_step, views_entry
from catsdogs.contract import (
    CASCADE_BELOW,
    INPUT_NAME,
    OUTPUT_ESCALATED,
    OUTPUT_LOGITS,
    OUTPUT_PROBABILITIES,
    ModelContract,
)
from catsdogs.preprocessing import PreprocessSpec, preprocess_bytes
from export.cascade import (
    Member,
    export_cascade,
    export_member,
    export_trained_cascade,
    reference,
    view_input,
    with_threshold,
)
from export.onnx_tools import embed_metadata
from tests.train.export_helpers import (
    color_contract,
    run_export_stage,
    shared_photos,
    write_manifest,
)
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
SIZE = 16  # the largest member's input
VIEWS = {"small": (8, 9), "mid": (12, 14), "large": (SIZE, SIZE + 2)}  # (input size, resize)


def member(name: str, seed: int) -> Member:
    torch.manual_seed(seed)  # a different random head per member: different answers
    size, resize = VIEWS[name]
    spec = default_spec("logreg", size, resize)
    return Member(name, build_model("logreg", 2, pretrained=False, spec=spec).eval(), size, resize)


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    """12 real photos through the server's preprocessing, at each member's own view."""
    out = {}
    for name, (size, resize) in VIEWS.items():
        spec = default_spec("logreg", size, resize)
        out[name] = np.stack([preprocess_bytes(p.read_bytes(), spec) for p, _ in shared_photos(6)])
    return out


@pytest.fixture(scope="module")
def large_view(photos: dict[str, np.ndarray]) -> np.ndarray:
    """The photos as one model of a trained cascade takes them: every model on one input."""
    return photos["large"]


@pytest.fixture(scope="module")
def members() -> tuple[Member, Member, Member]:
    return member("small", 0), member("mid", 1), member("large", 2)


def feed_views(photos: dict[str, np.ndarray], rows: slice | np.ndarray = slice(None)) -> dict:
    """The view inputs of a cascade whose first model is ``small``, for ``rows``."""
    return {view_input(member(n, 0)): photos[n][rows] for n in ("mid", "large")}


def run(path: Path | bytes, batch: np.ndarray, views: dict | None = None) -> tuple[np.ndarray, ...]:
    model = path if isinstance(path, bytes) else str(path)
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [OUTPUT_LOGITS, OUTPUT_PROBABILITIES, OUTPUT_ESCALATED]
    return tuple(session.run(names, {INPUT_NAME: batch, **(views or {})}))


def first_confidence(first: Member, batch: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return first.probabilities(torch.from_numpy(batch.copy())).max(dim=1).values.numpy()


def test_the_file_answers_as_the_eager_cascade_with_a_mixed_batch(
    tmp_path: Path, photos: dict[str, np.ndarray], members: tuple[Member, ...]
) -> None:
    first, mid, large = members
    images, views = photos["small"], feed_views(photos)
    # the median confidence of the first model: half of the photos escalate
    below = float(np.median(first_confidence(first, images)))
    then = [first, mid, large]
    path = export_cascade(first, then, below, tmp_path / "cascade.onnx", opset=18)
    onnx.checker.check_model(str(path), full_check=True)

    logits, probs, escalated = run(path, images, views)
    want_probs, want_escalated = reference(first, then, below, images, views)
    assert 0 < escalated.sum() < len(images)  # really mixed
    assert escalated.tolist() == want_escalated.tolist()
    np.testing.assert_allclose(probs, want_probs, atol=1e-6)
    np.testing.assert_allclose(torch.softmax(torch.from_numpy(logits), 1).numpy(), probs, atol=1e-6)
    # sure rows are the first model's own answer; escalated ones the average of all three, each
    # on its own view of the photos
    with torch.inference_mode():
        own = [m.probabilities(torch.from_numpy(photos[m.name].copy())).numpy() for m in then]
    np.testing.assert_allclose(probs[~escalated], own[0][~escalated], atol=1e-6)
    np.testing.assert_allclose(probs[escalated], np.mean(own, axis=0)[escalated], atol=1e-6)
    # each row's answer does not depend on the rest of the batch
    for i in (0, int(np.argmax(escalated))):
        _, alone, esc = run(path, images[i : i + 1], feed_views(photos, slice(i, i + 1)))
        np.testing.assert_allclose(alone[0], probs[i], atol=1e-6)
        assert esc[0] == escalated[i]


def test_other_views_are_read_only_for_the_photos_that_escalate(
    tmp_path: Path, photos: dict[str, np.ndarray], members: tuple[Member, ...]
) -> None:
    """Fed its first view alone, the file gives the first model's answers and flags the rows
    that want the second step; those rows fed again with their views get the cascade's answer
    (``two_step``). Views whose rows do not match the image's count as not fed."""
    first, mid, large = members
    images, views = photos["small"], feed_views(photos)
    below = float(np.median(first_confidence(first, images)))
    path = export_cascade(first, [first, mid, large], below, tmp_path / "c.onnx", opset=18)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # one required input; the views and the threshold have defaults
    assert [i.name for i in session.get_inputs()] == [INPUT_NAME]
    overridable = {i.name: i.shape[1:] for i in session.get_overridable_initializers()}
    assert overridable == {
        "image@12/14": [12, 12, 3],
        "image@16/18": [16, 16, 3],
        CASCADE_BELOW: [],
    }
    names = [OUTPUT_PROBABILITIES, OUTPUT_ESCALATED]
    whole, escalated = session.run(names, {INPUT_NAME: images, **views})

    with torch.inference_mode():
        first_only = first.probabilities(torch.from_numpy(images.copy())).numpy()
    alone, flagged = session.run(names, {INPUT_NAME: images})
    np.testing.assert_allclose(alone, first_only, atol=1e-6)
    assert flagged.tolist() == escalated.tolist()
    short = {k: v[:3] for k, v in views.items()}  # three rows of twelve: not this batch's views
    np.testing.assert_allclose(session.run(names, {INPUT_NAME: images, **short})[0], alone)

    calls: list[set[str]] = []

    def file(feed: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        calls.append({k: len(v) for k, v in feed.items()})
        probs, esc = session.run(names, feed)
        return probs, esc

    asked: list[list[int]] = []

    def make_views(rows: np.ndarray) -> dict[str, np.ndarray]:
        asked.append(rows.tolist())
        return feed_views(photos, rows)

    probs, esc = two_step(file, images, make_views)
    np.testing.assert_allclose(probs, whole, atol=1e-6)
    assert esc.tolist() == escalated.tolist()
    k = int(escalated.sum())
    assert asked == [np.flatnonzero(escalated).tolist()]  # only the escalated rows' views
    assert calls == [{INPUT_NAME: 12}, {INPUT_NAME: k, "image@12/14": k, "image@16/18": k}]
    # nothing unsure: one call, no view prepared
    asked.clear()
    sure = np.flatnonzero(~escalated)
    probs, esc = two_step(file, images[sure], make_views)
    assert asked == []
    assert not esc.any()
    np.testing.assert_allclose(probs, whole[sure], atol=1e-6)


def test_the_other_models_live_only_in_the_branch(
    tmp_path: Path, members: tuple[Member, ...]
) -> None:
    first, mid, large = members
    path = export_cascade(first, [first, mid, large], 0.9, tmp_path / "c.onnx", opset=18)
    graph = onnx.load(str(path)).graph
    assert [o.name for o in graph.output] == [OUTPUT_LOGITS, OUTPUT_PROBABILITIES, OUTPUT_ESCALATED]
    assert graph.output[0].type.tensor_type.shape.dim[0].dim_param  # a free batch dimension
    assert [i.name for i in graph.input] == [
        INPUT_NAME,
        "image@12/14",
        "image@16/18",
        CASCADE_BELOW,
    ]
    assert [n.op_type for n in graph.node].count("If") == 1
    prefixes = {i.name.split("/")[0] for i in graph.initializer}
    assert prefixes == {"m0", "cascade", "image@12", "image@16"}  # the views' empty defaults
    branch = next(n for n in graph.node if n.op_type == "If").attribute
    then_graph = next(a.g for a in branch if a.name == "then_branch")
    assert {i.name.split("/")[0] for i in then_graph.initializer} == {"m1", "m2", "cascade"}
    # each model takes its own view: nothing is resized inside the graph
    assert not any(n.op_type == "Resize" for g in (graph, then_graph) for n in g.node)
    # members on the first's view share its input: no view input at all
    twin = Member("twin", member("small", 7).model, 8, 9)
    same = onnx.load(str(export_cascade(first, [twin], 0.9, tmp_path / "s.onnx", opset=18)))
    assert [i.name for i in same.graph.input] == [INPUT_NAME, CASCADE_BELOW]


def stamped_cascade(tmp_path: Path, members: tuple[Member, ...]) -> tuple[Path, bytes]:
    """The three members' cascade file with names in its metadata, and its bytes."""
    first, mid, large = members
    path = export_cascade(first, [first, mid, large], 0.9, tmp_path / "c.onnx", opset=18)
    embed_metadata(path, {"model_name": "cascade-x", "class_names": '["cat", "dog"]'})
    return path, path.read_bytes()


def test_mlflow_pyfunc_runs_a_cascade_fed_its_image_alone(
    tmp_path: Path, members: tuple[Member, ...], photos: dict[str, np.ndarray]
) -> None:
    """The registered version's signature listed the threshold and the other views, which
    MLflow requires: the README's ``mlflow.pyfunc.load_model(...).predict(uint8_batch)`` failed
    with "Model is missing inputs" on the default (cascade) model."""
    import mlflow.pyfunc

    from export.tracking import save_mlflow_model

    path, _ = stamped_cascade(tmp_path, members)
    saved = save_mlflow_model(path, tmp_path / "mlflow-model", {"model_version": "x"})
    batch = photos["small"]
    got = mlflow.pyfunc.load_model(str(saved)).predict(batch)
    _, probabilities, escalated = run(path, batch)  # the file fed ``image`` alone
    np.testing.assert_array_equal(got[OUTPUT_PROBABILITIES], probabilities)
    np.testing.assert_array_equal(got[OUTPUT_ESCALATED], escalated)


def test_the_first_step_is_the_file_without_its_later_models(
    tmp_path: Path, photos: dict[str, np.ndarray], members: tuple[Member, ...]
) -> None:
    """``first_step`` (what the server's every session but one opens): the same file, contract
    included, whose If passes the first model's answers on even when fed every view and a
    threshold that escalates every row; none of the later models' weights are left in it."""
    first = members[0]
    path, data = stamped_cascade(tmp_path, members)
    step = first_step(data)
    assert step is not None
    model, whole = onnx.load_from_string(step), onnx.load_from_string(data)
    onnx.checker.check_model(model)
    assert model.metadata_props == whole.metadata_props
    assert [i.name for i in model.graph.input] == [i.name for i in whole.graph.input]
    branches = {a.name: a.g for n in model.graph.node if n.op_type == "If" for a in n.attribute}
    assert set(branches) == {"then_branch", "else_branch"}
    assert all([n.op_type for n in g.node] == ["Identity"] for g in branches.values())
    assert not any(g.initializer for g in branches.values())
    assert {i.name.split("/")[0] for i in model.graph.initializer} == {
        i.name.split("/")[0] for i in whole.graph.initializer
    }  # the main graph byte for byte: m0 and the cascade's own
    assert len(step) < len(data)
    images = photos["small"]
    everything = {**feed_views(photos), CASCADE_BELOW: np.array(2.0, np.float32)}
    _, probs, escalated = run(step, images, everything)
    assert escalated.all()  # every row wants the second step, and the file has none
    with torch.inference_mode():
        alone = first.probabilities(torch.from_numpy(images.copy())).numpy()
    np.testing.assert_allclose(probs, alone, atol=1e-6)
    _, whole_probs, _ = run(path, images, everything)
    assert not np.allclose(whole_probs, probs, atol=1e-4)


def test_the_second_step_is_the_file_without_its_first_model(
    tmp_path: Path, photos: dict[str, np.ndarray], members: tuple[Member, ...]
) -> None:
    """``second_step`` (what the server's escalating session opens): the file without its first
    model, whose answers it takes as an input; fed them, it answers as the whole file, and the
    first model's nodes and weights are gone. Also with every member on the first's view."""
    first = members[0]
    path, data = stamped_cascade(tmp_path, members)
    made = second_step(data)
    assert made is not None
    step, answers = made
    assert answers == "m0/probabilities"
    model, whole = onnx.load_from_string(step), onnx.load_from_string(data)
    onnx.checker.check_model(model)
    assert model.metadata_props == whole.metadata_props
    assert [i.name for i in model.graph.input] == [i.name for i in whole.graph.input] + [answers]
    assert not any(i.name.startswith("m0/") for i in model.graph.initializer)
    assert not any(o.startswith("m0/") for n in model.graph.node for o in n.output)
    assert [n.op_type for n in model.graph.node if n.op_type == "If"] == ["If"]
    assert len(step) < len(data)
    images = photos["small"]
    with torch.inference_mode():
        alone = first.probabilities(torch.from_numpy(images.copy())).numpy()
    for below in (0.9, 2.0):  # the file's own threshold (some rows escalate), and every row
        fed = {**feed_views(photos), CASCADE_BELOW: np.array(below, np.float32)}
        got = run(step, images, {answers: alone, **fed})
        for a, b in zip(got, run(path, images, fed), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6)
    # every member on the first's view: the branch reads ``image`` itself, which stays an input
    twin = Member("twin", member("small", 7).model, first.input_size, first.resize)
    shared = export_cascade(first, [first, twin], 0.9, tmp_path / "s.onnx", opset=18)
    made = second_step(shared.read_bytes())
    assert made is not None
    fed = {CASCADE_BELOW: np.array(2.0, np.float32)}
    got = run(made[0], images, {made[1]: alone, **fed})
    np.testing.assert_allclose(got[1], run(shared, images, fed)[1], atol=1e-6)


@pytest.mark.parametrize("split", [first_step, second_step], ids=["first", "second"])
def test_a_step_leaves_a_plain_file_alone_and_names_what_is_not_onnx(
    tmp_path: Path, members: tuple[Member, ...], split: Callable[[bytes], object]
) -> None:
    plain = export_member(members[0], tmp_path / "plain.onnx", opset=18)
    assert split(plain.SerializeToString()) is None
    with pytest.raises(ValueError, match="not an ONNX model"):
        split(b"\xff" * 64)


def test_a_loaded_cascade_runs_its_later_models_in_one_session(
    tmp_path: Path, photos: dict[str, np.ndarray], members: tuple[Member, ...]
) -> None:
    """The server's ``load_model`` on a cascade file: every session but ``second`` answers with
    the first model alone whatever it is fed; ``second``, fed the first model's answers, answers
    as the whole file; the files in memory and the child process that optimised the second step
    are gone once it has loaded."""
    from server.inference import ModelLoadError, load_model

    first, mid, large = members
    spec = default_spec("logreg", *VIEWS["small"])
    path = export_cascade(first, [first, mid, large], 0.9, tmp_path / "c.onnx", opset=18)
    views = {view_input(m): default_spec("logreg", m.input_size, m.resize) for m in (mid, large)}
    entry = {"models": ["mid", "large"], "below": 0.9, "views": views_entry(views)}
    stamp(path, spec, "cascade-load-1", entry)
    model = load_model(path, intra_op_threads=2, parallel_runs=2)
    assert model.cascade
    assert model.below == pytest.approx(0.9)
    assert set(model.views) == set(views)
    images = photos["small"]
    everything = {INPUT_NAME: images, **feed_views(photos)}
    everything[CASCADE_BELOW] = np.array(2.0, np.float32)
    with torch.inference_mode():
        alone = first.probabilities(torch.from_numpy(images.copy())).numpy()
    for session in [*model.sessions.values(), model.parallel]:
        (probs,) = session.run([OUTPUT_PROBABILITIES], everything)
        np.testing.assert_allclose(probs, alone, atol=1e-6)
    assert model.first_answers == "m0/probabilities"
    (probs,) = model.second.run([OUTPUT_PROBABILITIES], {**everything, model.first_answers: alone})
    np.testing.assert_allclose(probs, run(path, images, everything)[1], atol=1e-6)
    fds = Path("/proc/self/fd")
    targets = []
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):
            targets.append(os.readlink(fd))
    assert not [t for t in targets if "catsdogs-model" in t]
    # and the server's escalate step gives the file's own answers, batch 1 to all
    (first_probs,) = model.sessions[model.batch_policy].run(
        [OUTPUT_PROBABILITIES], {INPUT_NAME: images}
    )
    blobs = [p.read_bytes() for p, _ in shared_photos(6)]

    def view(blob: bytes, spec: PreprocessSpec) -> np.ndarray:
        return preprocess_bytes(blob, spec)

    got, rows, skipped = model.escalate(first_probs, images, blobs, view)
    want, escalated = reference(first, [first, mid, large], 0.9, images, feed_views(photos))
    assert rows == escalated.sum() > 0
    assert skipped == {}
    np.testing.assert_allclose(got, want, atol=1e-6)
    # views that find the decoded-pixels budget full (as the server's do, never waiting:
    # tests/serve/test_pixel_budget.py): every unsure row keeps the first model's answer, and
    # the rows are counted for inference_escalation_skipped_images_total
    from server.limits import Budget

    pixels = Budget(80_000_000, "decoded pixels")
    pixels.reserve_or_raise(pixels.limit)  # other batches' decodes hold all of it

    def full(blob: bytes, spec: PreprocessSpec) -> np.ndarray:
        return preprocess_bytes(blob, spec, reserve=pixels.hold)

    kept, rows, skipped = model.escalate(first_probs, images, blobs, full)
    assert (rows, skipped) == (0, {"pixels": escalated.sum()})
    np.testing.assert_array_equal(kept, first_probs)
    # a file with the cascade's threshold input but no If of export's: refused, saying why
    odd = export_member(first, tmp_path / "odd.onnx", opset=18)
    odd.graph.initializer.append(numpy_helper.from_array(np.array(0.5, np.float32), CASCADE_BELOW))
    odd.graph.input.append(helper.make_tensor_value_info(CASCADE_BELOW, TensorProto.FLOAT, []))
    onnx.save(odd, str(tmp_path / "odd.onnx"))
    stamp(tmp_path / "odd.onnx", spec, "cascade-odd-1", entry)
    with pytest.raises(ModelLoadError, match=r"steps cannot be split: .* this one 0"):
        load_model(tmp_path / "odd.onnx", intra_op_threads=1)
    # a contract whose threshold is not the file's: refused, naming both (the server picks the
    # rows to escalate with the threshold, the file's own answers use its initializer)
    stamp(path, spec, "cascade-load-2", {**entry, "below": 0.8})
    with pytest.raises(ModelLoadError, match=r"cascade.below \(0.8\) is not the file's own .*0.9"):
        load_model(path, intra_op_threads=1)


def servable_cascade(tmp_path: Path, members: tuple[Member, ...], version: str) -> Path:
    """The three members' cascade file, each later model on a view of its own, stamped with the
    full contract the server reads."""
    first, mid, large = members
    spec = default_spec("logreg", *VIEWS["small"])
    path = export_cascade(first, [first, mid, large], 0.9, tmp_path / "c.onnx", opset=18)
    views = {view_input(m): default_spec("logreg", m.input_size, m.resize) for m in (mid, large)}
    stamp(path, spec, version, {"models": ["mid", "large"], "below": 0.9,
                                "views": views_entry(views)})  # fmt: skip
    return path


def test_sigterm_while_a_cascade_loads_stops_its_optimising_child_too(
    tmp_path: Path, members: tuple[Member, ...]
) -> None:
    """``python -m server`` optimises a cascade's second step in a child process while it opens
    the first. A SIGTERM then (a rollout, a scale-down) ends the start-up and the child with
    it: under the default action the server died at once and the child ran on, orphaned."""
    import signal

    from loadtest.serverproc import SERVE_PYTHON, spawn_server, stop_server

    path = servable_cascade(tmp_path, members, "cascade-sigterm-1")
    server = spawn_server(
        tmp_path / "server.log",
        ["--model", str(path)],
        env={"PREDICTION_LOG_PATH": str(tmp_path / "p.db")},
        python=SERVE_PYTHON,
    )
    try:
        tasks = Path(f"/proc/{server.pid}/task")  # the load runs on a thread of its own
        child = None
        deadline = time.monotonic() + 30
        while child is None and server.proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                pids = [c for t in tasks.iterdir() for c in (t / "children").read_text().split()]
                child = next(iter(pids), None)
            time.sleep(0.002)
        assert child is not None, "no optimising child seen"
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(30)
    finally:
        stop_server(server)  # whatever failed above, no server is left running
    # reaped by the server before it exited: nothing of it is left, not even a zombie
    assert not Path(f"/proc/{child}").exists(), "the optimising child outlived the server"
    assert code == 128 + signal.SIGTERM, server.output()


def test_version_reads_a_cascade_without_onnxruntime_warnings(
    tmp_path: Path, members: tuple[Member, ...]
) -> None:
    """A cascade's threshold and view sizes are graph inputs with defaults on purpose, and
    onnxruntime warns about each when a session opens it with default options: ``python -m
    server --version`` printed three such warnings (its other output is one line)."""
    import subprocess

    from loadtest.serverproc import SERVE_PYTHON

    path = servable_cascade(tmp_path, members, "cascade-version-1")
    out = subprocess.run(
        [SERVE_PYTHON, "-m", "server", "--version", "--model", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "cascade-version-1" in out.stdout
    assert out.stderr == ""


def test_a_cascade_loads_where_files_in_memory_are_not_offered(
    tmp_path: Path, photos: dict[str, np.ndarray], members: tuple[Member, ...], monkeypatch
) -> None:
    """Without ``os.memfd_create`` (macOS, Windows) the steps go through temporary files, which
    are gone once the model has loaded, and the model answers as where they are in memory."""
    from server.inference import load_model

    first, mid, large = members
    spec = default_spec("logreg", *VIEWS["small"])
    path = export_cascade(first, [first, mid, large], 0.9, tmp_path / "c.onnx", opset=18)
    views = {view_input(m): default_spec("logreg", m.input_size, m.resize) for m in (mid, large)}
    stamp(path, spec, "cascade-tmp-1", {"models": [], "below": 0.9, "views": views_entry(views)})
    in_memory = load_model(path, intra_op_threads=1)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.delattr(os, "memfd_create")
    on_disk = load_model(path, intra_op_threads=1)
    assert not list(scratch.iterdir())
    images = photos["small"]
    every = {**feed_views(photos), CASCADE_BELOW: np.array(2.0, np.float32)}
    want = run(path, images, every)[1]
    (answers,) = on_disk.sessions["sleep"].run([OUTPUT_PROBABILITIES], {INPUT_NAME: images})
    feed = {INPUT_NAME: images, on_disk.first_answers: answers, **every}
    for model in (in_memory, on_disk):
        (probs,) = model.second.run([OUTPUT_PROBABILITIES], feed)
        np.testing.assert_allclose(probs, want, atol=1e-6)


def test_threshold_reads_the_files_own_value(tmp_path: Path, members: tuple[Member, ...]) -> None:
    first, mid, _ = members
    path = export_cascade(first, [first, mid], 0.83, tmp_path / "c.onnx", opset=18)
    assert threshold(path.read_bytes()) == pytest.approx(0.83)
    plain = export_member(first, tmp_path / "plain.onnx", opset=18)
    assert threshold(plain.SerializeToString()) is None


def test_the_bench_floor_runs_a_cascade_in_two_steps(
    tmp_path: Path, photos: dict[str, np.ndarray], members: tuple[Member, ...]
) -> None:
    """``make bench``'s floor (loadtest.inprocess) on a cascade with views of its own: each
    photo's answer is the eager cascade's with every view, alone and in a batch, so the
    server's answers are compared with the cascade's and not with its first model's. It does
    the server's work: the first model runs once on a photo, its answers fed to the second step."""
    from loadtest.inprocess import CascadeRun, open_runs

    first, mid, large = members
    spec = default_spec("logreg", *VIEWS["small"])
    images = photos["small"]
    below = float(np.median(first_confidence(first, images)))
    path = export_cascade(first, [first, mid, large], below, tmp_path / "c.onnx", opset=18)
    views = {view_input(m): default_spec("logreg", m.input_size, m.resize) for m in (mid, large)}
    entry = {"models": [], "below": below, "views": views_entry(views)}
    stamp(path, spec, "cascade-floor-1", entry)
    runs, contract = open_runs(path, 1, ("sleep",))
    assert contract.preprocessing == spec
    run = runs["sleep"]
    assert isinstance(run, CascadeRun)
    second = {i.name for i in run.second.get_inputs()}
    assert run.answers == "m0/probabilities"
    assert run.answers in second
    blobs = [p.read_bytes() for p, _ in shared_photos(6)]
    want, escalated = reference(first, [first, mid, large], below, images, feed_views(photos))
    assert 0 < escalated.sum() < len(images)
    np.testing.assert_allclose(runs["sleep"](images, blobs), want, atol=1e-6)
    for i in range(len(blobs)):
        np.testing.assert_allclose(
            runs["sleep"](images[i : i + 1], blobs[i : i + 1])[0], want[i], atol=1e-6
        )


def test_thresholds_at_the_ends_never_or_always_escalate(
    tmp_path: Path, photos: dict[str, np.ndarray], members: tuple[Member, ...]
) -> None:
    first, mid, large = members
    images, views = photos["small"], feed_views(photos)
    then = [mid, large]  # the first model not among them: their average replaces its answer
    model = onnx.load(str(export_cascade(first, then, 0.9, tmp_path / "c.onnx", opset=18)))
    _, never, escalated = run(with_threshold(model, 0.0), images, views)
    assert not escalated.any()
    np.testing.assert_allclose(never, reference(first, then, 0.0, images, views)[0], atol=1e-6)
    _, every, escalated = run(with_threshold(model, 2.0), images, views)
    assert escalated.all()
    want, _ = reference(first, then, 2.0, images, views)
    np.testing.assert_allclose(every, want, atol=1e-6)
    with torch.inference_mode():
        pair = (
            mid.probabilities(torch.from_numpy(photos["mid"].copy()))
            + large.probabilities(torch.from_numpy(photos["large"].copy()))
        ).numpy() / 2
    np.testing.assert_allclose(every, pair, atol=1e-6)
    # the threshold is an overridable initializer: fed at run time, it replaces the file's
    session = ort.InferenceSession(str(tmp_path / "c.onnx"), providers=["CPUExecutionProvider"])
    names = [OUTPUT_PROBABILITIES, OUTPUT_ESCALATED]
    for fed, want_probs, want_all in ((0.0, never, False), (2.0, every, True)):
        feed = {INPUT_NAME: images, CASCADE_BELOW: np.array(fed, np.float32), **views}
        probs, escalated = session.run(names, feed)
        assert escalated.all() if want_all else not escalated.any()
        np.testing.assert_allclose(probs, want_probs, atol=1e-6)
    own, escalated = session.run(names, {INPUT_NAME: images, **views})  # not fed: the file's 0.9
    np.testing.assert_allclose(own, reference(first, then, 0.9, images, views)[0], atol=1e-6)
    with pytest.raises(ValueError, match="needs the views"):
        reference(first, then, 0.9, images)


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
    """``trained_cascade`` (or ``own_view_cascade``) as a checkpoint (its meta overridden by
    ``meta``): its other models at 12 and 8 px."""
    spec = default_spec("logreg", SIZE, SIZE + 2)
    own = {"views": "own"} if model.views else {}
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
        "cascade": {"models": ["logreg@12", "logreg@8"], "below": model.below, **own},
        **meta,
    }
    entries = [
        (
            {"model_name": "logreg", "preprocessing": v.to_json()}
            if model.views
            else {"model_name": "logreg", "model_options": {"network_size": v}},
            m,
        )
        for v, m in zip(model.views or (12, 8), model.others, strict=True)
    ]
    save_checkpoint(path, model.first, full, entries)
    return path


def test_the_eager_cascade_is_what_its_file_answers(tmp_path: Path, large_view: np.ndarray) -> None:
    cascade = trained_cascade()
    with torch.inference_mode():
        p0 = torch.softmax(cascade.first(torch.from_numpy(large_view.copy())), 1).max(1).values
    middle = p0.sort().values[len(p0) // 2 - 1 : len(p0) // 2 + 1]
    cascade.below = float(middle.mean())  # half of the large_view escalate, none at the threshold
    path = export_trained_cascade(
        cascade, tmp_path / "c.onnx", spec=default_spec("logreg", SIZE, SIZE + 2), opset=18
    )
    logits, probs, escalated = run(path, large_view)
    with torch.inference_mode():
        want, want_escalated = cascade.probabilities(torch.from_numpy(large_view.copy()))
        want_logits = cascade(torch.from_numpy(large_view.copy()))
    assert 0 < escalated.sum() < len(large_view)
    assert escalated.tolist() == want_escalated.tolist()
    np.testing.assert_allclose(probs, want.numpy(), atol=1e-6)
    np.testing.assert_allclose(logits, want_logits.numpy(), atol=1e-5)
    # every model takes the one input and resizes inside itself: no resize outside the models
    graph = onnx.load(str(path)).graph
    assert sum(n.op_type == "Resize" for n in graph.node) == 0  # the first runs at 16 px


def test_a_cascade_checkpoint_round_trips(tmp_path: Path, large_view: np.ndarray) -> None:
    cascade = trained_cascade(seed=3)
    loaded = load_cascade(save_cascade(tmp_path / "c.pt", cascade))
    assert loaded is not None
    assert loaded.below == 0.5
    x = torch.from_numpy(large_view.copy())
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
        (
            {"cascade": "logreg", "cascade_views": "mine"},
            r"train.cascade_views: 'mine' is not one of \('shared', 'own'\)",
        ),
        (
            {"cascade": "logreg", "cascade_views": "own", "network_size": 112},
            r"train.cascade_views: 'own' gives each model its own view",
        ),
        (
            {"cascade": "efficientnet_lite2@2000", "cascade_views": "own"},
            r"'efficientnet_lite2@2000': its own view must be 1..1024 px",
        ),
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
    # own views: any side (no upsampling limit), resized in train.resize's ratio
    from training.params import own_view_resize

    own = check_train(TrainParams(cascade="efficientnet_lite2@500", cascade_views="own"))
    assert cascade_members(own) == [("efficientnet_lite2", 500)]
    assert [own_view_resize(own, s) for s in (224, 240, 260)] == [256, 274, 297]


def stage_inputs(tmp: Path, cascade: CascadeClassifier) -> tuple[dict, Path, str]:
    """A manifest of shared photos and ``cascade``'s checkpoint for the export stage: (photos by
    split, checkpoint, data version). Its threshold is set to 0.55: random heads are unsure of
    everything, so some photos escalate, not all."""
    spec = default_spec("logreg", SIZE, SIZE + 2)
    photos = {"train": shared_photos(2), "val": shared_photos(2, 10), "test": shared_photos(8, 20)}
    data_version = write_manifest(tmp / "manifest.csv", photos, spec)
    cascade.below = 0.55
    return (
        photos,
        save_cascade(tmp / "checkpoint.pt", cascade, data_version=data_version),
        data_version,
    )


def test_the_export_stage_serves_a_cascade_checkpoint(tmp_path: Path) -> None:
    """export.export on a cascade checkpoint: one file with the If, parity with the eager cascade
    on real test photos, the contract, the escalation share and both paths' latency reported,
    and no int8 model (its quantizer does not reach into the branch)."""

    from catsdogs.modelfile import load_model_file

    spec = default_spec("logreg", SIZE, SIZE + 2)
    cascade = trained_cascade(seed=5)
    photos_, checkpoint, data_version = stage_inputs(tmp_path, cascade)
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


def own_view_cascade(seed: int = 0) -> CascadeClassifier:
    """Three logreg models, each on its own view: 16 px (the first), 12 px and 8 px."""
    models = []
    for i, (size, resize) in enumerate(((SIZE, SIZE + 2), VIEWS["mid"], VIEWS["small"])):
        torch.manual_seed(seed + i)
        spec = default_spec("logreg", size, resize)
        models.append(build_model("logreg", 2, pretrained=False, spec=spec).eval())
    first, *others = models
    views = [default_spec("logreg", *VIEWS["mid"]), default_spec("logreg", *VIEWS["small"])]
    return CascadeClassifier(first, others, 0.5, views=views).eval()


def test_the_export_stage_serves_a_cascade_on_views_of_its_own(tmp_path: Path) -> None:
    """train.cascade_views: own, through the checkpoint and the export stage: the file's other
    models read inputs of their own, its contract names them and how to make them, and every
    figure of the stage (parity, test metrics, escalation) comes from running it as the server
    does: the first view for every photo, the others for the escalated ones only."""
    from catsdogs.cascade import contract_views
    from catsdogs.modelfile import load_model_file
    from export.evaluate import evaluate_file
    from export.params import EvaluateParams

    spec = default_spec("logreg", SIZE, SIZE + 2)
    cascade = own_view_cascade(seed=5)
    photos_, checkpoint, _ = stage_inputs(tmp_path, cascade)
    loaded_cascade = load_cascade(checkpoint)
    assert loaded_cascade is not None
    assert [(v.input_size, v.resize) for v in loaded_cascade.views or []] == [(12, 14), (8, 9)]
    report = run_export_stage(
        tmp_path, checkpoint, tmp_path / "manifest.csv", parity_images=16, bench_runs=2
    )
    assert report["parity"]["ok"]
    assert report["parity"]["n"] == 16
    out = tmp_path / "model.onnx"
    loaded = load_model_file(out)
    entry = loaded.contract.extra["cascade"]
    assert entry["views"] == [
        {"input": "image@12/14", "preprocessing": default_spec("logreg", 12, 14).to_json()},
        {"input": "image@8/9", "preprocessing": default_spec("logreg", 8, 9).to_json()},
    ]
    views = contract_views(entry)
    assert list(views) == ["image@12/14", "image@8/9"]
    # the eager cascade with every view, on the test photos, is what the stage measured
    test = [p for p, _ in photos_["test"]]
    images = np.stack([preprocess_bytes(p.read_bytes(), spec) for p in test])
    own = [
        torch.from_numpy(np.stack([preprocess_bytes(p.read_bytes(), v) for p in test]))
        for v in views.values()
    ]
    with torch.inference_mode():
        want, unsure = cascade.probabilities(torch.from_numpy(images.copy()), own)
    escalated = unsure.numpy()
    assert 0 < escalated.mean() < 1
    labels = np.array([0 if label == "cat" else 1 for _, label in photos_["test"]])
    accuracy = float((want.numpy().argmax(1) == labels).mean())
    assert loaded.contract.extra["metrics"]["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert report["cascade"]["test_escalated"] == pytest.approx(escalated.mean(), abs=1e-6)
    # the evaluate stage reads the views from the contract and gets the same figures
    evaluated = evaluate_file(out, tmp_path / "manifest.csv", EvaluateParams("test", 5))
    np.testing.assert_allclose(evaluated.probs, want.numpy(), atol=1e-6)
    # without the views the file can only give its first model's answers
    first_only, flagged = loaded.session.run(
        [OUTPUT_PROBABILITIES, OUTPUT_ESCALATED], {INPUT_NAME: images}
    )
    assert flagged.tolist() == escalated.tolist()
    with torch.inference_mode():
        p0 = torch.softmax(cascade.first(torch.from_numpy(images.copy())), 1).numpy()
    np.testing.assert_allclose(first_only, p0, atol=1e-6)
    ms = report["cascade"]["batch_1_ms"]
    assert ms["sure"] > 0
    assert ms["escalated"] > 0


def train_tiny_cascade(tmp: Path, **train: object) -> tuple[str, Path, Path]:
    """The train stage on the shared photos' tiny pipeline params with a Lite1 (48 px) and a
    logreg (32 px) cascade below 0.95 (``train`` overrides more); returns the MLflow URI, the
    params file and the checkpoint."""
    import sys

    from tests.train.test_pipeline_smoke import base_env, prepared, tiny_params
    from tests.train.test_pipeline_smoke import run as run_stage

    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    env = base_env(MLFLOW_TRACKING_URI=uri)
    cascade = {"cascade": "efficientnet_lite1@48+logreg@32", "cascade_below": 0.95}
    params = tiny_params(tmp, **cascade, **train)
    prepared(tmp, env, params)
    out = run_stage([sys.executable, "-m", "training.train", "--params", str(params)], tmp, env)
    assert out.returncode == 0, out.stderr[-3000:]
    return uri, params, tmp / "models" / "checkpoint.pt"


@pytest.mark.slow
def test_the_train_stage_fits_a_cascade_that_the_export_stage_serves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    uri, params, checkpoint = train_tiny_cascade(tmp_path, network_size=56)
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


@pytest.mark.slow
def test_the_train_stage_fits_a_cascade_on_views_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """train.cascade_views: own: each other model's probe is fitted on the photos prepared at
    its own side (a resize in train.resize's ratio), the checkpoint keeps those views, and the
    export stage serves them as inputs of the file's own."""
    from catsdogs.cascade import contract_views
    from catsdogs.modelfile import load_model_file

    uri, params, checkpoint = train_tiny_cascade(tmp_path, cascade_views="own")
    cascade = load_cascade(checkpoint)
    assert cascade is not None
    _, meta = load_checkpoint(checkpoint)
    assert meta["cascade"] == {
        "models": ["efficientnet_lite1@48", "logreg@32"],
        "below": 0.95,
        "views": "own",
    }
    # 64 px of a 72 px resize: 48 of 54 and 32 of 36, each network at its view's side
    assert [(v.input_size, v.resize) for v in cascade.views or []] == [(48, 54), (32, 36)]
    assert [m.normalize.resize_to for m in (cascade.first, *cascade.others)] == [None] * 3
    assert 0.0 <= meta["val_metrics"]["accuracy"] <= 1.0

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    manifest = tmp_path / "data" / "prepared" / "manifest.csv"
    report = run_export_stage(tmp_path, checkpoint, manifest, params, parity_images=4, bench_runs=2)
    assert report["parity"]["ok"]
    views = contract_views(load_model_file(tmp_path / "model.onnx").contract.extra["cascade"])
    assert {k: (v.input_size, v.resize) for k, v in views.items()} == {
        "image@48/54": (48, 54),
        "image@32/36": (32, 36),
    }


def stamp(path: Path, spec: PreprocessSpec, version: str, cascade: dict) -> ModelContract:
    """Embed a contract with this ``cascade`` entry in a cascade file, as the export stage does."""
    contract = color_contract(
        input_size=spec.input_size,
        preprocessing=spec,
        model_version=version,
        extra={"metrics": {"accuracy": 0.5, "n": 8}, "quantization": "none", "cascade": cascade},
    )
    embed_metadata(path, contract.to_metadata())
    return contract


def warmup_per_image(metrics: str) -> dict[int, float]:
    """``inference_warmup_seconds_per_image`` by batch size, from a /metrics page."""
    pattern = r'^inference_warmup_seconds_per_image\{batch_size="(\d+)"\} (\S+)$'
    return {int(n): float(v) for n, v in re.findall(pattern, metrics, flags=re.M)}


def test_a_served_cascade_warms_up_on_its_sure_path_and_answers_as_its_file(
    tmp_path: Path,
) -> None:
    """The real server on a cascade file: its warm-up times the path most images take, its
    first step alone (blank warm-up images would all escalate through the whole file, and the
    adaptive batch limits would be set by the rare, several times slower path), it is ready,
    and each photo's answer, escalated or not, is the file's own. The threshold, an overridable
    initializer, is never set by traffic."""
    import urllib.request

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
    below = float(np.median(first_confidence(first, images)))
    path = export_cascade(first, then, below, tmp_path / "cascade.onnx", opset=18)
    stamp(path, heavy_spec, "cascade-1", {"models": ["efficientnet_lite0"], "below": below})

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


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    """A ``files`` multipart body and its content type."""
    boundary = "cascade-views-boundary"
    parts = [
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + data
        + b"\r\n"
        for name, data in files
    ]
    return b"".join(
        parts
    ) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_the_server_makes_a_cascades_other_views_for_the_photos_it_escalates(
    tmp_path: Path,
) -> None:
    """The real server on a cascade whose other models take views of their own: it answers each
    photo as the file does when given every view (the first model's answer where it is sure,
    the three models' average where not), alone and in a batch with a broken upload among the
    photos, and its /metadata names the views."""
    import urllib.request

    from catsdogs.cascade import contract_views, views_entry
    from loadtest.serverproc import SERVE_PYTHON, running_server

    def logreg(size: int, resize: int, seed: int) -> Member:
        torch.manual_seed(seed)
        spec = default_spec("logreg", size, resize)
        return Member(
            f"logreg{size}",
            build_model("logreg", 2, pretrained=False, spec=spec).eval(),
            size,
            resize,
        )

    first, mid, small = logreg(32, 36, 0), logreg(48, 54, 1), logreg(24, 28, 2)
    spec = default_spec("logreg", 32, 36)
    files = [p.read_bytes() for p, _ in shared_photos(4)]
    images = np.stack([preprocess_bytes(b, spec) for b in files])
    below = float(np.median(first_confidence(first, images)))
    path = export_cascade(first, [first, mid, small], below, tmp_path / "cascade.onnx", opset=18)
    views = {view_input(m): default_spec("logreg", m.input_size, m.resize) for m in (mid, small)}
    entry = {"models": ["logreg@48", "logreg@24"], "below": below, "views": views_entry(views)}
    contract = stamp(path, spec, "cascade-views-1", entry)
    assert contract_views(contract.extra["cascade"]) == views
    own = {name: np.stack([preprocess_bytes(b, v) for b in files]) for name, v in views.items()}
    want, escalated = reference(first, [first, mid, small], below, images, own)
    assert 0 < escalated.sum() < len(files)  # some photos take the second step, some do not
    with torch.inference_mode():
        sure = first.probabilities(torch.from_numpy(images.copy())).numpy()
    assert not np.allclose(want[escalated], sure[escalated], atol=1e-4)  # the views change them

    def answers(body: dict) -> list[float]:
        return [body["probabilities"][c] for c in ("cat", "dog")]

    with running_server(path, tmp_path / "server.log", python=SERVE_PYTHON) as server:
        meta = json.loads(urllib.request.urlopen(f"{server.url}/metadata", timeout=10).read())
        assert meta["cascade"]["views"] == views_entry(views)
        for i, data in enumerate(files):
            request = urllib.request.Request(
                f"{server.url}/predict", data=data, headers={"Content-Type": "image/jpeg"}
            )
            body = json.loads(urllib.request.urlopen(request, timeout=30).read())
            np.testing.assert_allclose(answers(body), want[i], rtol=1e-5, atol=1e-6)
        # one batch: a broken upload second, so the rows that ran are not the uploads' order
        uploads = [
            ("a.jpg", files[0]),
            ("junk.jpg", b"not an image"),
            *[(f"{i}.jpg", b) for i, b in enumerate(files[1:], 1)],
        ]
        data, content_type = multipart(uploads)
        request = urllib.request.Request(
            f"{server.url}/predict/batch", data=data, headers={"Content-Type": content_type}
        )
        entries = json.loads(urllib.request.urlopen(request, timeout=30).read())["predictions"]
        assert entries[1]["error"]["code"] == "not_an_image"
        got = [answers(e) for i, e in enumerate(entries) if i != 1]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        # each escalated photo counted once per request that sent it
        metrics = urllib.request.urlopen(f"{server.url}/metrics", timeout=10).read().decode()
        counted = re.search(r"^inference_escalated_images_total (\S+)$", metrics, flags=re.M)
        assert counted is not None
        assert float(counted.group(1)) == 2 * escalated.sum()
