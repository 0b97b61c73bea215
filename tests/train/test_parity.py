"""What the model sees in validation and test is byte for byte what the server computes."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from catsdogs.manifest import read_manifest
from catsdogs.preprocessing import preprocess_bytes, stack_batch
from training.models import build_model, default_spec
from training.train import AugmentedImages, EvalImages, extract_features, load_splits

pytestmark = pytest.mark.train

ROOT = Path(__file__).resolve().parents[2]
PHOTOS = ROOT.parent / "shared" / "data" / "catsdogs" / "images"


def small_manifest(tmp_path: Path, per_class: int = 4) -> Path:
    rows = []
    for label in ("cat", "dog"):
        files = sorted((PHOTOS / label).iterdir())[:per_class]
        for i, f in enumerate(files):
            split = ("train", "val", "test", "val")[i % 4]
            rows.append([str(f), label, "x", 1, 1, 0.0, split])
    path = tmp_path / "manifest.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "sha256", "width", "height", "brightness", "split"])
        writer.writerows(rows)
    return path


@pytest.mark.parametrize("name", ["efficientnet_lite0", "logreg"])
def test_eval_tensors_equal_server_preprocessing(tmp_path: Path, name: str) -> None:
    spec = default_spec(name)
    class_names, splits = load_splits(read_manifest(small_manifest(tmp_path)))
    assert class_names == ["cat", "dog"]
    for split in ("val", "test"):
        dataset = EvalImages(*splits[split], spec)
        assert len(dataset) > 0
        for i, path in enumerate(splits[split][0]):
            x, y = dataset[i]
            want = preprocess_bytes(Path(path).read_bytes(), spec)
            assert x.dtype == torch.uint8
            assert x.shape == (spec.input_size, spec.input_size, 3)
            assert np.array_equal(x.numpy(), want)
            assert class_names[y] == Path(path).parent.name
        # and the batches that reach the model are the server's stacked batch
        batch, _ = next(iter(DataLoader(dataset, batch_size=len(dataset))))
        server_batch = stack_batch(
            [preprocess_bytes(Path(p).read_bytes(), spec) for p in splits[split][0]]
        )
        assert np.array_equal(batch.numpy(), server_batch)


def test_cached_features_are_the_models_own_on_server_input(tmp_path: Path) -> None:
    spec = default_spec("efficientnet_lite0", input_size=96, resize=110)
    _, splits = load_splits(read_manifest(small_manifest(tmp_path, per_class=2)))
    model = build_model("efficientnet_lite0", 2, pretrained=True, spec=spec).eval()
    feats, labels = extract_features(
        model, EvalImages(*splits["val"], spec), 8, torch.device("cpu"), "t"
    )
    server = torch.from_numpy(
        stack_batch([preprocess_bytes(Path(p).read_bytes(), spec) for p in splits["val"][0]])
    )
    with torch.inference_mode():
        logits_direct = model(server)
        logits_from_cache = model.head(feats)
    assert torch.allclose(logits_from_cache, logits_direct, atol=1e-4)
    assert labels.tolist() == splits["val"][1]


def test_augmentation_is_training_only_and_keeps_the_input_format(tmp_path: Path) -> None:
    spec = default_spec("logreg", input_size=64, resize=72)
    _, splits = load_splits(read_manifest(small_manifest(tmp_path)))
    aug = AugmentedImages(*splits["train"], spec, 0.6, seed=0, view=1)
    other = AugmentedImages(*splits["train"], spec, 0.6, seed=0, view=2)
    a, _ = aug[0]
    b, _ = other[0]
    assert a.dtype == torch.uint8
    assert a.shape == (64, 64, 3)
    assert not torch.equal(a, b)  # another view, another random crop
    assert torch.equal(a, aug[0][0])  # a view is reproducible (cached features stay valid)
    plain = EvalImages(*splits["train"], spec)
    assert torch.equal(plain[0][0], plain[0][0])  # evaluation input is deterministic
