"""Stage ``train``: fit the model ``train.model`` and write ``models/checkpoint.pt``.

Two regimes, picked by the model:

- frozen backbone (``efficientnet_lite0`` pretrained, ``logreg``): backbone features of every
  photo are computed once (plus ``augment_views`` augmented views of each training photo) and a
  linear head is trained on them; optionally the last ``fine_tune_blocks`` are then fine-tuned;
- from scratch (``mobilenet_v3_small``): the whole network trains on augmented photos.

Validation and test photos go through ``catsdogs.preprocessing.preprocess_bytes`` only, so the model
is selected on exactly the input the server will give it. Early stopping watches validation loss
and the best epoch is kept.

    python -m training.train
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import hashlib
import json
import logging
import math
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from catsdogs.hashing import file_sha256
from catsdogs.manifest import SPLITS, ManifestRow, read_manifest
from catsdogs.metrics import classification_metrics
from catsdogs.preprocessing import PreprocessSpec, decode_image, preprocess_bytes
from training.models import (
    LITE_VARIANTS,
    ORT_BATCH,
    CascadeClassifier,
    EfficientNetLiteFeatures,
    ImageClassifier,
    build_model,
    default_spec,
    linear_head,
    onnx_features_session,
    save_checkpoint,
)
from training.params import (
    PARAMS_FILE,
    ParamsError,
    TrainParams,
    cascade_members,
    load_train,
    load_yaml,
    own_view_resize,
    refuse,
)
from training.run_tracking import Tracker

log = logging.getLogger("training.train")


# ---------------------------------------------------------------------------- data


class EvalImages(Dataset):
    """Photos exactly as the server preprocesses them: uint8 (H, W, 3) and the class index."""

    def __init__(self, paths: list[str], labels: list[int], spec: PreprocessSpec) -> None:
        self.paths, self.labels, self.spec = paths, labels, spec

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        arr = preprocess_bytes(Path(self.paths[i]).read_bytes(), self.spec)
        return torch.from_numpy(arr.copy()), self.labels[i]  # writable copy for torch


class AugmentedImages(Dataset):
    """Training-only views: the server's decoder, then a random resized crop and a flip.

    The crop box and the flip of a photo in view ``view`` follow from (seed, view, the photo's
    bytes) alone: the same view is the same picture at any output size (a distillation source
    labels exactly what the served model sees), features cached per photo stay valid in any order
    or subset, and the data folder's path (which differs between clones) changes nothing.
    """

    def __init__(
        self,
        paths: list[str],
        labels: list[int],
        spec: PreprocessSpec,
        scale_min: float,
        *,
        seed: int,
        view: int,
    ) -> None:
        self.paths, self.labels, self.spec = paths, labels, spec
        self.scale_min, self.seed, self.view = scale_min, seed, view
        self.resample = Image.Resampling[spec.interpolation.upper()]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        data = Path(self.paths[i]).read_bytes()
        img = decode_image(data)
        key = f"{self.seed}:{self.view}:{hashlib.sha256(data).hexdigest()}".encode()
        rng = np.random.default_rng(int(hashlib.sha256(key).hexdigest()[:16], 16))
        box = crop_box(img.width, img.height, (self.scale_min, 1.0), rng)
        size = (self.spec.input_size, self.spec.input_size)
        img = img.resize(size, self.resample, box=box)  # crop, then an antialiased resize
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        arr = np.array(img, dtype=np.uint8)  # (H, W, 3), a writable copy
        return torch.from_numpy(arr), self.labels[i]


def crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    rng: np.random.Generator,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (left, top, right, bottom), drawn from ``rng``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    # no box fitted in 10 draws: the largest centred box within the ratio range
    w, h = width, height
    if width / height < ratio[0]:
        h = round(width / ratio[0])
    elif width / height > ratio[1]:
        w = round(height * ratio[1])
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def load_splits(manifest: list[ManifestRow]) -> tuple[list[str], dict[str, tuple[list, list]]]:
    class_names = sorted({r.label for r in manifest})
    index = {name: i for i, name in enumerate(class_names)}
    splits: dict[str, tuple[list, list]] = {s: ([], []) for s in SPLITS}
    for r in manifest:
        paths, labels = splits[r.split]
        paths.append(str(r.path))
        labels.append(index[r.label])
    return class_names, splits


def check_classes(class_names: list[str], splits: dict[str, tuple[list, list]]) -> None:
    """Every class needs training photos: a class with none is an answer the model can never
    learn to give (a folder of one photo that hashed into val or test). A class ten times
    smaller than the largest is said: the model will lean to the larger ones."""
    counts = {s: collections.Counter(labels) for s, (_, labels) in splits.items()}
    train = [counts["train"][i] for i in range(len(class_names))]
    for i, name in enumerate(class_names):
        if train[i] == 0:
            elsewhere = ", ".join(f"{counts[s][i]} in {s}" for s in SPLITS if s != "train")
            raise SystemExit(
                f"train: class {name!r} has no training photo ({elsewhere}): the model could "
                "never learn it; add photos of it, or remove its folder"
            )
    largest = max(train)
    for i, name in enumerate(class_names):
        if train[i] * 10 < largest:
            log.warning(
                "class %r has %d training photos against %d for the largest: the model will "
                "lean to the larger classes",
                name,
                train[i],
                largest,
            )


# ---------------------------------------------------------------------------- helpers


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ParamsError("train.device: cuda, but no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def batches(loader: DataLoader, desc: str) -> Iterable:
    return tqdm(loader, desc=desc, leave=False, unit="batch", mininterval=2.0)


@torch.inference_mode()
def extract_features(
    model: ImageClassifier, dataset: Dataset, batch_size: int, device: torch.device, desc: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, F) float32 features of the frozen part and (N,) labels, in dataset order.

    On the CPU an EfficientNet-Lite backbone runs through onnxruntime (the serving runtime, several
    times faster than eager PyTorch here); elsewhere, and for other models, PyTorch computes them.
    """
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    run = features_fn(model, dataset, device)
    feats, labels = [], []
    for x, y in batches(loader, desc):
        feats.append(run(x))
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def features_fn(model: ImageClassifier, dataset: Dataset, device: torch.device) -> Any:
    """uint8 (N, H, W, 3) batch -> (N, F) float32 CPU features, by the fastest engine at hand."""
    if device.type == "cpu" and isinstance(model.backbone, EfficientNetLiteFeatures):
        size = dataset[0][0].shape[0]
        session = onnx_features_session(model, size, torch.get_num_threads())

        def run(x: torch.Tensor) -> torch.Tensor:
            parts = [session.run(None, {"image": c.numpy()})[0] for c in x.split(ORT_BATCH)]
            return torch.from_numpy(np.concatenate(parts))

        return run
    return lambda x: model.features(x.to(device)).float().cpu()


def scored(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Loss plus the project's classification metrics (catsdogs.metrics) of a set of logits."""
    loss = nn.functional.cross_entropy(logits, labels).item()
    probs = logits.softmax(dim=1).numpy()
    return {"loss": loss, **classification_metrics(labels.numpy(), probs)}


class EarlyStopping:
    """Keeps the state of the epoch with the lowest validation loss."""

    def __init__(self, patience: int) -> None:
        self.patience, self.best_loss, self.best_epoch, self.bad = patience, float("inf"), 0, 0
        self.best_state: dict[str, torch.Tensor] | None = None

    def step(self, epoch: int, val_loss: float, module: nn.Module) -> bool:
        """Record an epoch; True means stop."""
        if val_loss < self.best_loss - 1e-6:
            self.best_loss, self.best_epoch, self.bad = val_loss, epoch, 0
            self.best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        else:
            self.bad += 1
        return self.bad >= self.patience


# ---------------------------------------------------------------------------- regimes


def distillation_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    soft_targets: torch.Tensor | None,
    *,
    alpha: float,
    temperature: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``(1 - alpha) * CE(labels) + alpha * T^2 * KL(source_T || model_T)`` (Hinton et al.).

    ``soft_targets``: (N, C) source probabilities at temperature T; None gives plain CE. The T^2
    keeps the soft term's gradients on the scale of the hard one whatever T is.
    """
    ce = nn.functional.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    if soft_targets is None or alpha == 0:
        return ce
    log_p = nn.functional.log_softmax(logits / temperature, dim=1)
    kl = nn.functional.kl_div(log_p, soft_targets, reduction="batchmean")
    return alpha * temperature**2 * kl + (1 - alpha) * ce


def fit_head(
    head: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    params: TrainParams,
    device: torch.device,
    on_epoch: Any,
    soft_targets: torch.Tensor | None = None,
) -> int:
    """Train ``head`` on cached features with early stopping; returns the best epoch.

    ``on_epoch(epoch, train_loss, train_acc, val_metrics)`` logs each epoch; None: quiet.
    ``soft_targets`` (N, C), row for row with ``train``: a source's probabilities at
    ``params.distill_temperature``, mixed in with ``params.distill_alpha``. Early stopping always
    watches the plain cross-entropy on the true labels of ``val``.
    """
    xs, ys = train[0].to(device), train[1].to(device)
    soft = soft_targets.to(device) if soft_targets is not None else None
    xv, yv = val[0].to(device), val[1]
    opt = torch.optim.AdamW(head.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    stopper = EarlyStopping(params.patience)
    gen = torch.Generator().manual_seed(params.seed)
    for epoch in range(1, params.epochs + 1):
        head.train()
        order = torch.randperm(len(xs), generator=gen).to(device)
        total, correct, seen = 0.0, 0, 0
        steps = range(0, len(order), params.batch_size)
        quiet = on_epoch is None  # probes (sources, cross-validation folds) log nothing per epoch
        bar = tqdm(steps, f"head epoch {epoch}", leave=False, mininterval=2.0, disable=quiet)
        for start in bar:
            idx = order[start : start + params.batch_size]
            logits = head(xs[idx])
            loss = distillation_loss(
                logits,
                ys[idx],
                soft[idx] if soft is not None else None,
                alpha=params.distill_alpha,
                temperature=params.distill_temperature,
                label_smoothing=params.label_smoothing,
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            correct += (logits.argmax(1) == ys[idx]).sum().item()
            seen += len(idx)
        head.eval()
        with torch.inference_mode():
            val_metrics = scored(head(xv).float().cpu(), yv)
        if on_epoch is not None:
            on_epoch(epoch, total / seen, correct / seen, val_metrics)
        if stopper.step(epoch, val_metrics["loss"], head):
            break
    assert stopper.best_state is not None
    head.load_state_dict(stopper.best_state)
    return stopper.best_epoch


Features = tuple[torch.Tensor, torch.Tensor]  # (N, F) float32 features, (N,) class indices


def source_soft_targets(
    sources: list[tuple[Features, Features]],
    params: TrainParams,
    device: torch.device,
    n_classes: int,
) -> tuple[torch.Tensor, list[dict[str, float]]]:
    """A linear probe per source (its (train, val) features), then the mean of their
    probabilities at ``params.distill_temperature`` on the training rows: (N, C) soft targets.

    Also returns each source probe's validation metrics. The probes train on the same rows and
    with the same head settings as the served model, without distillation.
    """
    probe_params = dataclasses.replace(params, distill_from=None)
    probs, scores = [], []
    for train_feats, val_feats in sources:
        head = linear_head(train_feats[0].shape[1], n_classes, params.dropout).to(device)
        fit_head(head, train_feats, val_feats, probe_params, device, None)
        head.eval()
        with torch.inference_mode():
            logits = head(train_feats[0].to(device)).float().cpu()
            val_scores = scored(head(val_feats[0].to(device)).float().cpu(), val_feats[1])
        probs.append((logits / params.distill_temperature).softmax(dim=1))
        scores.append({k: float(v) for k, v in val_scores.items()})
    return torch.stack(probs).mean(dim=0), scores


def fit_end_to_end(
    model: ImageClassifier,
    trainable: list[nn.Parameter],
    frozen_modules: list[nn.Module],
    train_set: Dataset,
    val_set: Dataset,
    params: TrainParams,
    epochs: int,
    lr: float,
    device: torch.device,
    on_epoch: Any,
    first_epoch: int = 1,
    start_epoch: int | None = None,
) -> int:
    """Train ``trainable`` through the whole network on augmented photos; returns the best epoch.

    With ``start_epoch`` the model as given is that epoch's (fine-tuning starts from the fitted
    head's best epoch): its validation loss is measured first and it competes with the epochs
    here, so the model is kept as given when none of them beats it."""
    gen = torch.Generator().manual_seed(params.seed)
    train_loader = DataLoader(
        train_set, batch_size=params.batch_size, shuffle=True, num_workers=1, generator=gen
    )
    val_loader = DataLoader(val_set, batch_size=params.batch_size, shuffle=False, num_workers=1)
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=params.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=max(1, epochs * len(train_loader))
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=params.label_smoothing)
    stopper = EarlyStopping(params.patience)
    if start_epoch is not None:
        logits, labels = predict(model, val_loader, device)
        stopper.step(start_epoch, scored(logits, labels)["loss"], model)
    for epoch in range(first_epoch, first_epoch + epochs):
        if isinstance(train_set, AugmentedImages):
            train_set.view = epoch  # new crops every epoch (workers copy the dataset per epoch)
        model.train()
        for m in frozen_modules:  # frozen BatchNorm keeps its ImageNet statistics
            m.eval()
        total, correct, seen = 0.0, 0, 0
        for x, y in tqdm(train_loader, desc=f"epoch {epoch}", unit="batch", mininterval=2.0):
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss = loss_fn(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
        logits, labels = predict(model, val_loader, device)
        val_metrics = scored(logits, labels)
        on_epoch(epoch, total / seen, correct / seen, val_metrics)
        if stopper.step(epoch, val_metrics["loss"], model):
            break
    assert stopper.best_state is not None
    model.load_state_dict(stopper.best_state)
    if stopper.best_epoch == start_epoch:
        log.info(
            "no epoch beat the starting model's validation loss %.4f: epoch %d's model is kept",
            stopper.best_loss,
            start_epoch,
        )
    return stopper.best_epoch


@torch.inference_mode()
def predict(
    model: nn.Module, loader: DataLoader, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    out, labels = [], []
    for x, y in batches(loader, "predict"):
        out.append(model(x.to(device)).float().cpu())
        labels.append(y)
    return torch.cat(out), torch.cat(labels)


def fine_tune_parts(model: ImageClassifier, blocks: int) -> tuple[list, list]:
    """Trainable parameters (last ``blocks`` blocks, head conv, head) and the modules kept in
    eval mode while they train: the frozen blocks, and every BatchNorm layer of the tail.

    BatchNorm keeps its ImageNet statistics (its scale and shift still train). In train mode it
    normalises by each batch's own statistics, which for a batch of cat and dog photos are far
    from ImageNet's: on real photos a Lite0 with a fitted head went from a loss of 0.011 in eval
    mode to 3.6 with its BatchNorm layers in train mode, so fine-tuning started from a broken
    model and ended worse than the frozen backbone."""
    net = model.backbone.net  # EfficientNetLiteFeatures
    tail = [*net._blocks[-blocks:], net._conv_head, net._bn1, model.head]
    frozen = [net._conv_stem, net._bn0, *net._blocks[:-blocks]]
    norms = (nn.BatchNorm1d, nn.BatchNorm2d)
    frozen += [m for t in tail for m in t.modules() if isinstance(m, norms)]
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for m in tail:
        for p in m.parameters():
            p.requires_grad_(True)
            params.append(p)
    return params, frozen


# ---------------------------------------------------------------------------- reports


def write_history(history: list[dict[str, float]], out_dir: Path) -> None:
    with open(out_dir / "history.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(history[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(history)


def plot_curves(history: list[dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("loss", "accuracy"), strict=True):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], label=f"train {key}")
        ax.plot(epochs, [h[f"val_{key}"] for h in history], label=f"val {key}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(
    logits: torch.Tensor, labels: torch.Tensor, names: list[str], path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(4.5, 4))
    ConfusionMatrixDisplay.from_predictions(
        labels.numpy(), logits.argmax(1).numpy(), display_labels=names, ax=ax, colorbar=False
    )
    ax.set_title("validation")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------- main


class EpochLog:
    """Per epoch: one history row (reports/train/history.csv), a log line and MLflow metrics."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker
        self.history: list[dict[str, float]] = []

    def __call__(
        self, epoch: int, train_loss: float, train_acc: float, val: dict[str, float]
    ) -> None:
        row = {
            "epoch": epoch,
            "train_loss": round(train_loss, 6),
            "train_accuracy": round(train_acc, 6),
            "val_loss": round(val["loss"], 6),
            "val_accuracy": round(val["accuracy"], 6),
        }
        self.history.append(row)
        log.info(
            "epoch %d  train loss %.4f acc %.4f  val loss %.4f acc %.4f",
            epoch,
            train_loss,
            train_acc,
            val["loss"],
            val["accuracy"],
        )
        metrics = {k: v for k, v in row.items() if k != "epoch"}
        self.tracker.call("log_metrics", metrics, step=epoch)


def start_tracking(
    params: TrainParams,
    all_params: dict[str, Any],
    tags: dict[str, str],
    device: torch.device,
    n_train: int,
) -> tuple[Tracker, str]:
    """Open the MLflow run (or nothing, when no store answers) and log every parameter."""
    tracker = Tracker()
    run_id = tracker.start(run_name=params.model, tags=tags)
    flat = {
        f"{s}.{k}": v
        for s, sec in all_params.items()
        if isinstance(sec, dict)
        for k, v in sec.items()
    }
    tracker.call("log_params", {k: str(v) for k, v in flat.items()})
    tracker.call("log_params", {"device": str(device), "n_train": n_train})
    return tracker, run_id


def view_sets(
    paths: list[str], labels: list[int], spec: PreprocessSpec, params: TrainParams
) -> list[Dataset]:
    """The training views of a split: the server's view, then ``augment_views`` augmented ones."""
    return [EvalImages(paths, labels, spec)] + [
        AugmentedImages(paths, labels, spec, params.crop_scale_min, seed=params.seed, view=view)
        for view in range(1, params.augment_views + 1)
    ]


def split_features(
    model: ImageClassifier,
    splits: dict[str, tuple[list, list]],
    spec: PreprocessSpec,
    params: TrainParams,
    device: torch.device,
) -> tuple[Features, Features]:
    """Features of every training view (concatenated, view by view) and of validation."""
    t0 = time.monotonic()
    parts = view_sets(*splits["train"], spec, params)
    train_feats = [
        extract_features(model, p, params.batch_size, device, f"{spec.input_size}px view {i}")
        for i, p in enumerate(parts)
    ]
    val_set = EvalImages(*splits["val"], spec)
    val_feats = extract_features(model, val_set, params.batch_size, device, "features val")
    log.info(
        "features of %d images at %d px in %.0f s",
        sum(len(f[0]) for f in train_feats) + len(val_feats[0]),
        spec.input_size,
        time.monotonic() - t0,
    )
    xs = torch.cat([f[0] for f in train_feats])
    ys = torch.cat([f[1] for f in train_feats])
    return (xs, ys), val_feats


def source_names(params: TrainParams) -> list[str]:
    """``train.distill_from``: none, one model name, or an ensemble joined with ``+``."""
    return params.distill_from.split("+") if params.distill_from else []


def source_spec(name: str, interpolation: str) -> PreprocessSpec:
    """A source sees the photos at the input size its ImageNet weights were trained at."""
    size, resize = LITE_VARIANTS[name]
    return default_spec(name, size, resize, interpolation=interpolation)


def distill_from_sources(
    splits: dict[str, tuple[list, list]],
    params: TrainParams,
    device: torch.device,
    n_classes: int,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Soft targets for every training view from ``train.distill_from``; and what to record."""
    sources = []
    for name in source_names(params):
        spec = source_spec(name, params.interpolation)
        source = build_model(name, n_classes, pretrained=True, spec=spec)
        source.to(device=device, memory_format=torch.channels_last)
        sources.append(split_features(source, splits, spec, params, device))
        del source
    soft, scores = source_soft_targets(sources, params, device, n_classes)
    record = {
        "source": params.distill_from,
        "alpha": params.distill_alpha,
        "temperature": params.distill_temperature,
        "source_val_accuracy": [round(s["accuracy"], 6) for s in scores],
    }
    log.info("distillation: %s", json.dumps(record))
    return soft, record


def fit_frozen_backbone(
    model: ImageClassifier,
    splits: dict[str, tuple[list, list]],
    spec: PreprocessSpec,
    params: TrainParams,
    device: torch.device,
    epochs: EpochLog,
) -> tuple[int, dict[str, Any] | None]:
    """Features once (plus augmented views), a linear head on them (taught by the sources'
    soft targets when ``train.distill_from`` is set), then optional fine-tuning.

    Returns the best epoch and the distillation record (None without a source)."""
    train_paths, train_labels = splits["train"]
    train_feats, val_feats = split_features(model, splits, spec, params, device)
    soft, distillation = None, None
    if source_names(params):
        n_classes = model.head[-1].out_features
        soft, distillation = distill_from_sources(splits, params, device, n_classes)
    best_epoch = fit_head(model.head, train_feats, val_feats, params, device, epochs, soft)
    if params.fine_tune_blocks <= 0 or params.fine_tune_epochs <= 0:
        return best_epoch, distillation
    trainable, frozen_modules = fine_tune_parts(model, params.fine_tune_blocks)
    aug = AugmentedImages(
        train_paths, train_labels, spec, params.crop_scale_min, seed=params.seed, view=1
    )
    val_set = EvalImages(*splits["val"], spec)
    best_epoch = fit_end_to_end(
        model,
        trainable,
        frozen_modules,
        aug,
        val_set,
        params,
        params.fine_tune_epochs,
        params.fine_tune_lr,
        device,
        epochs,
        first_epoch=len(epochs.history) + 1,
        start_epoch=best_epoch,  # fine-tuning must beat the head alone to be kept
    )
    return best_epoch, distillation


def fit_cascade(
    splits: dict[str, tuple[list, list]],
    params: TrainParams,
    device: torch.device,
    n_classes: int,
) -> list[tuple[dict[str, Any], ImageClassifier]]:
    """``train.cascade``: a linear probe on each other model's frozen features, from the same
    input and training views as the first model (each network at its own side, resized inside
    the graph), or with ``cascade_views: own`` from the photos prepared at its own side. Returns
    each with what its checkpoint entry needs to rebuild it (its ``preprocessing``: its view)."""
    probe_params = dataclasses.replace(params, distill_from=None)
    own = params.cascade_views == "own"
    members = []
    for name, size in cascade_members(params):
        options: dict[str, Any] = {"dropout": params.dropout, "logreg_pool": params.logreg_pool}
        if own:
            side, resize = size, own_view_resize(params, size)
        else:
            side, resize = params.input_size, params.resize
            if size != params.input_size:
                options["network_size"] = size
        spec = default_spec(name, side, resize, interpolation=params.interpolation)
        member = build_model(
            name, n_classes, pretrained=name in LITE_VARIANTS, spec=spec, **options
        )
        member.to(device=device, memory_format=torch.channels_last)
        train_feats, val_feats = split_features(member, splits, spec, probe_params, device)
        fit_head(member.head, train_feats, val_feats, probe_params, device, None)
        member.eval()
        info = {"model_name": name, "model_options": options, "preprocessing": spec.to_json()}
        members.append((info, member))
        log.info("cascade: %s at %d px fitted (%s view)", name, size, params.cascade_views)
    return members


class CascadeImages(Dataset):
    """Each photo at the first model's view and at each other model's own: a tuple of uint8
    (H, W, 3) tensors, one per spec, and the class index."""

    def __init__(self, paths: list[str], labels: list[int], specs: list[PreprocessSpec]) -> None:
        self.paths, self.labels, self.specs = paths, labels, specs

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[tuple[torch.Tensor, ...], int]:
        data = Path(self.paths[i]).read_bytes()
        views = tuple(torch.from_numpy(preprocess_bytes(data, s).copy()) for s in self.specs)
        return views, self.labels[i]


def predict_views(
    model: CascadeClassifier, loader: DataLoader, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``predict`` for a cascade whose models each take their own view (``CascadeImages``):
    log-probabilities, as the cascade's ``forward`` gives them."""
    model.eval()
    out, labels = [], []
    with torch.inference_mode():
        for (x, *views), y in batches(loader, "predict"):
            probs, _ = model.probabilities(x.to(device), [v.to(device) for v in views])
            out.append(torch.log(probs.clamp_min(1e-30)).float().cpu())
            labels.append(y)
    return torch.cat(out), torch.cat(labels)


def fit_from_scratch(
    model: ImageClassifier,
    splits: dict[str, tuple[list, list]],
    spec: PreprocessSpec,
    params: TrainParams,
    device: torch.device,
    epochs: EpochLog,
) -> tuple[int, None]:
    """Every weight trained on augmented photos; returns the best epoch (and no distillation)."""
    val_set = EvalImages(*splits["val"], spec)
    aug = AugmentedImages(*splits["train"], spec, params.crop_scale_min, seed=params.seed, view=1)
    best_epoch = fit_end_to_end(
        model,
        list(model.parameters()),
        [],
        aug,
        val_set,
        params,
        params.epochs,
        params.lr,
        device,
        epochs,
    )
    return best_epoch, None


def write_reports(
    report_dir: Path,
    params: TrainParams,
    history: list[dict[str, float]],
    val_metrics: dict[str, Any],
    figures: tuple[torch.Tensor, torch.Tensor, list[str]],
) -> None:
    """metrics.json, history.csv, the curves and the validation confusion matrix."""
    logits, labels, class_names = figures
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "metrics.json").write_text(
        json.dumps({"model": params.model, "val": val_metrics}, indent=2) + "\n"
    )
    write_history(history, report_dir)
    best = val_metrics["best_epoch"]
    plot_curves(history, report_dir / "curves.png", f"{params.model} (best epoch {best})")
    plot_confusion(logits, labels, class_names, report_dir / "confusion_matrix.png")


def log_outputs(
    tracker: Tracker,
    val_metrics: dict[str, Any],
    report_dir: Path,
    model_path: Path,
    data_report: Path | None,
) -> None:
    # the kept (best) epoch's figures; per-epoch curves are train_*/val_* with step=epoch
    tracker.call("log_metrics", {f"best_val_{k}": float(v) for k, v in val_metrics.items()})
    for name in ("metrics.json", "history.csv", "curves.png", "confusion_matrix.png"):
        tracker.call("log_artifact", str(report_dir / name), artifact_path="train")
    if data_report is not None and data_report.exists():
        tracker.call("log_artifact", str(data_report), artifact_path="data")
    tracker.call("log_artifact", str(model_path), artifact_path="checkpoint")
    tracker.end()


def train(
    params: TrainParams,
    manifest_path: Path,
    model_path: Path,
    report_dir: Path,
    all_params: dict[str, Any],
    data_report: Path | None = None,
) -> dict[str, Any]:
    """The whole stage; returns the checkpoint meta."""
    started = time.monotonic()
    set_seed(params.seed)
    if params.threads:
        torch.set_num_threads(params.threads)
    device = pick_device(params.device)
    class_names, splits = load_splits(read_manifest(manifest_path))
    for split in ("train", "val"):
        if not splits[split][0]:
            raise SystemExit(f"train: the {split} split is empty; add photos or change fractions")
    check_classes(class_names, splits)
    spec = default_spec(
        params.model, params.input_size, params.resize, interpolation=params.interpolation
    )
    options: dict[str, Any] = {"dropout": params.dropout, "logreg_pool": params.logreg_pool}
    if params.network_size is not None:  # the checkpoint rebuilds the in-graph resize
        options["network_size"] = params.network_size
    # only the EfficientNet-Lite models have offline weights; the others start from scratch
    pretrained = params.pretrained and params.model in LITE_VARIANTS
    model = build_model(params.model, len(class_names), pretrained=pretrained, spec=spec, **options)
    model.to(device=device, memory_format=torch.channels_last)
    data_version = file_sha256(manifest_path)
    commit = git_commit()
    tags = {"git_commit": commit, "data_version": data_version, "model_name": params.model}
    if params.distill_from:
        tags["distill_from"] = params.distill_from
    if params.cascade:
        tags["cascade"] = f"{params.cascade} below {params.cascade_below:g}"
    tracker, run_id = start_tracking(params, all_params, tags, device, len(splits["train"][0]))
    # a crash ends the run FAILED, a stop (Ctrl-C, SIGTERM) KILLED: never FINISHED or RUNNING
    with tracker.ended_on_failure():
        epochs = EpochLog(tracker)
        frozen = params.model == "logreg" or pretrained  # nothing to learn in the backbone
        fit = fit_frozen_backbone if frozen else fit_from_scratch
        best_epoch, distillation = fit(model, splits, spec, params, device, epochs)
        cascade = fit_cascade(splits, params, device, len(class_names)) if params.cascade else []
        # what is served answers validation: the model, or the cascade it starts
        served: nn.Module = model
        if cascade:
            own = params.cascade_views == "own"
            views = [PreprocessSpec.from_json(info["preprocessing"]) for info, _ in cascade]
            served = CascadeClassifier(
                model, [m for _, m in cascade], params.cascade_below, views=views if own else None
            )

        if isinstance(served, CascadeClassifier) and served.views:
            views = CascadeImages(*splits["val"], [spec, *served.views])
            loader = DataLoader(views, batch_size=params.batch_size, shuffle=False, num_workers=0)
            logits, labels = predict_views(served, loader, device)
        else:
            val_set = EvalImages(*splits["val"], spec)
            loader = DataLoader(val_set, batch_size=params.batch_size, shuffle=False, num_workers=0)
            logits, labels = predict(served, loader, device)
        val_metrics: dict[str, Any] = scored(logits, labels)
        val_metrics["best_epoch"] = best_epoch
        val_metrics["train_seconds"] = round(time.monotonic() - started, 1)
        log.info("best epoch %d: val %s", best_epoch, json.dumps(val_metrics))
        write_reports(
            report_dir, params, epochs.history, val_metrics, (logits, labels, class_names)
        )

        meta = {
            "model_name": params.model,
            "class_names": class_names,
            "preprocessing": spec.to_json(),
            "mlflow_run_id": run_id,
            "data_version": data_version,
            "git_commit": commit,
            "params": dataclasses.asdict(params),
            "val_metrics": val_metrics,
            "model_options": options,
            "split_counts": {s: len(splits[s][0]) for s in splits},
            "distillation": distillation,  # source, alpha, temperature; None without one
        }
        if cascade:
            meta["cascade"] = {
                "models": [f"{name}@{size}" for name, size in cascade_members(params)],
                "below": params.cascade_below,
            }
            if params.cascade_views == "own":  # each model's view: its checkpoint entry's spec
                meta["cascade"]["views"] = "own"
        model.to(device="cpu", memory_format=torch.contiguous_format)
        for _, member in cascade:
            member.to(device="cpu", memory_format=torch.contiguous_format)
        save_checkpoint(model_path, model, meta, cascade or None)
        log_outputs(tracker, val_metrics, report_dir, model_path, data_report)
        return meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=PARAMS_FILE)
    parser.add_argument("--manifest", default="data/prepared/manifest.csv")
    parser.add_argument("--model-out", default="models/checkpoint.pt")
    parser.add_argument("--reports", default="reports/train")
    parser.add_argument("--data-report", default="reports/data.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        params = load_train(args.params)
    except ParamsError as exc:  # one line naming the key, no traceback
        refuse("train", exc)
    # a SIGTERM (a CI job cancelled, docker stop) unwinds like Ctrl-C, so the run is recorded
    signal.signal(signal.SIGTERM, _terminated)
    try:
        train(
            params,
            Path(args.manifest),
            Path(args.model_out),
            Path(args.reports),
            load_yaml(args.params),
            Path(args.data_report),
        )
    except ParamsError as exc:  # what only the machine can say (train.device: cuda), before work
        refuse("train", exc)
    except KeyboardInterrupt:
        # Ctrl-C is the user's own stop, not a crash: one line, no traceback, the shell's 130
        print(
            "train: stopped (Ctrl-C); no checkpoint written, the MLflow run is KILLED",
            file=sys.stderr,
        )
        raise SystemExit(128 + signal.SIGINT) from None


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    main()
