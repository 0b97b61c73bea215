"""Stage ``cv``: k-fold cross-validation of named training configurations over every photo.

Each configuration of ``params.yaml``'s ``cv.configs`` is the ``train`` section with a few keys
overridden. Folds come from the photo's content hash (as the train/val/test split does), so a
photo always lands in the same fold and duplicates can never straddle two. Per configuration and
fold, a head trains on the other folds (early stopping on a hash-chosen slice of them) and
predicts the held-out fold; the out-of-fold predictions of all photos give the accuracy, its
Wilson 95% interval, the photos it gets wrong and a contact sheet of them. The same head is also
fitted once on the standard split (train, early stopping on val) and scored on test.

A head's random start, its batch order and the random crops of its augmented views move the
count of mistakes by several photos (on the 3,991 photos, Lite0's ranged from 24 to 32 over eight
head seeds on the same features), as much as the differences between configurations. So the whole
cross-validation is repeated ``cv.repeats`` times, repeat ``r`` with ``train.seed + r`` (new
augmented views, a new head start and order; the folds stay): the figures are the means over the
repeats, with their spread, and a configuration is compared with the baseline repeat by repeat.

Frozen-backbone features are computed once per backbone, input size and view, for every photo,
and cached under ``cv.cache_dir``, so adding a configuration costs only its head fits (and the
features of a backbone or view not seen before).

    python -m training.cv --manifest data/prepared/manifest.csv --out reports/cv

Writes ``summary.json`` (every figure, per configuration), ``table.md``, and per configuration
``<name>/mistakes.csv``, ``<name>/mistakes.jpg`` and ``<name>/predictions.csv`` (out-of-fold
probability of every photo). One MLflow run per configuration in the experiment ``catsdogs-cv``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from catsdogs.cv_text import accuracy_text, arch_key, mistakes_text, row_label
from catsdogs.hashing import file_sha256
from catsdogs.manifest import ManifestRow, read_manifest
from catsdogs.preprocessing import PreprocessSpec, decode_image
from training.models import LITE_VARIANTS, build_model, default_spec, linear_head
from training.params import (
    PARAMS_FILE,
    Cascade,
    CvParams,
    ParamsError,
    TrainParams,
    cascade_steps,
    default_row,
    ensemble_members,
    load_cv,
    load_train,
    refuse,
)
from training.prepare import hash_unit
from training.run_tracking import Tracker
from training.train import (
    AugmentedImages,
    EvalImages,
    Features,
    extract_features,
    fit_head,
    git_commit,
    pick_device,
    set_seed,
    source_names,
    source_soft_targets,
    source_spec,
)

log = logging.getLogger("training.cv")

EXPERIMENT = "catsdogs-cv"
Z95 = 1.959963984540054  # two-sided 95% normal quantile


# ---------------------------------------------------------------------------- folds and figures


def fold_of(sha256: str, folds: int, salt: str) -> int:
    """The fold of a photo, from its content hash alone (the split's mapping, another salt)."""
    return min(folds - 1, int(hash_unit(f"{salt}:fold:{sha256}") * folds))


def stops_early(sha256: str, fraction: float, salt: str) -> bool:
    """Whether a photo of the training folds is in the early-stopping slice."""
    return hash_unit(f"{salt}:stop:{sha256}") < fraction


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (good near 0 and 1, unlike Wald's)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p-value: photos right for A only vs right for B only."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2 * tail)


# ---------------------------------------------------------------------------- feature cache


@dataclass(frozen=True)
class Photos:
    """Every photo of the manifest, in manifest order."""

    paths: list[str]
    labels: np.ndarray  # (N,) class index
    sha256: list[str]
    split: np.ndarray  # (N,) "train" | "val" | "test"
    class_names: list[str]

    @classmethod
    def from_rows(cls, rows: list[ManifestRow]) -> Photos:
        names = sorted({r.label for r in rows})
        return cls(
            paths=[str(r.path) for r in rows],
            labels=np.array([names.index(r.label) for r in rows], dtype=np.int64),
            sha256=[r.sha256 for r in rows],
            split=np.array([r.split for r in rows]),
            class_names=names,
        )


class FeatureCache:
    """``(N, F)`` features of every photo for a backbone at a size and one view, on disk.

    One ``.npz`` per (backbone, spec, view) holds the sha256 of each photo next to its features,
    so a photo is computed once whatever subset or order is asked for later.
    """

    def __init__(self, root: Path, batch_size: int, device: torch.device) -> None:
        self.root, self.batch_size, self.device = root, batch_size, device

    def get(
        self, model_name: str, spec: PreprocessSpec, params: TrainParams, view: int, photos: Photos
    ) -> np.ndarray:
        key = f"{model_name}-{spec.input_size}-{spec.resize}-{spec.interpolation}"
        if params.network_size is not None:  # the view resized inside the model
            key += f"-net{params.network_size}"
        if model_name == "logreg":
            key += f"-pool{params.logreg_pool}"
        if view:
            # "bycontent": the crop follows the photo's bytes (caches from before, when it
            # followed the manifest path, hold other crops and are never read)
            key_view = f"view{view}-seed{params.seed}-scale{params.crop_scale_min:g}-bycontent"
        else:
            key_view = "eval"
        path = self.root / key / f"{key_view}.npz"
        cached: dict[str, np.ndarray] = {}
        if path.exists():
            with np.load(path) as npz:
                cached = dict(zip(npz["sha256"].tolist(), npz["features"], strict=True))
        missing = [i for i, h in enumerate(photos.sha256) if h not in cached]
        if missing:
            feats = self._compute(model_name, spec, params, view, photos, missing)
            cached.update(zip([photos.sha256[i] for i in missing], feats, strict=True))
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npz")
            np.savez(
                tmp,
                sha256=np.array(list(cached)),
                features=np.stack(list(cached.values())).astype(np.float32),
            )
            tmp.replace(path)
        return np.stack([cached[h] for h in photos.sha256])

    def _compute(
        self,
        model_name: str,
        spec: PreprocessSpec,
        params: TrainParams,
        view: int,
        photos: Photos,
        index: list[int],
    ) -> np.ndarray:
        paths = [photos.paths[i] for i in index]
        labels = photos.labels[index].tolist()
        dataset = (
            AugmentedImages(paths, labels, spec, params.crop_scale_min, seed=params.seed, view=view)
            if view
            else EvalImages(paths, labels, spec)
        )
        model = build_model(
            model_name,
            len(photos.class_names),
            pretrained=model_name in LITE_VARIANTS,
            spec=spec,
            logreg_pool=params.logreg_pool,
            network_size=params.network_size,
        )
        model.to(device=self.device, memory_format=torch.channels_last)
        t0 = time.monotonic()
        desc = f"{model_name} {spec.input_size}px view {view}"
        feats, _ = extract_features(model, dataset, self.batch_size, self.device, desc)
        rate = (time.monotonic() - t0) / len(index)
        log.info("%s: %d photos, %.1f ms each", desc, len(index), rate * 1000)
        return feats.numpy()


def frozen_backbone(params: TrainParams) -> bool:
    """Models whose features never change in training: pretrained EfficientNet-Lite, logreg."""
    return params.model == "logreg" or (params.model in LITE_VARIANTS and params.pretrained)


def view_features(
    cache: FeatureCache, model_name: str, spec: PreprocessSpec, params: TrainParams, p: Photos
) -> list[np.ndarray]:
    """Features of every photo in the server's view, then in each augmented view."""
    return [cache.get(model_name, spec, params, v, p) for v in range(params.augment_views + 1)]


# ---------------------------------------------------------------------------- one configuration


def stack(views: list[np.ndarray], rows: np.ndarray, labels: np.ndarray) -> Features:
    """Rows ``rows`` of every view, view after view: (len(views) * len(rows), F) and labels."""
    x = np.concatenate([v[rows] for v in views])
    y = np.tile(labels[rows], len(views))
    return torch.from_numpy(x), torch.from_numpy(y)


def fit_predict(
    served: list[np.ndarray],
    sources: list[list[np.ndarray]],
    labels: np.ndarray,
    fit_rows: np.ndarray,
    stop_rows: np.ndarray,
    predict_rows: np.ndarray,
    params: TrainParams,
    device: torch.device,
) -> np.ndarray:
    """Train a head on ``fit_rows`` (every view), stop early on ``stop_rows`` (server's view),
    return class probabilities of ``predict_rows`` (server's view): (len(predict_rows), C)."""
    set_seed(params.seed)
    n_classes = int(labels.max()) + 1
    train = stack(served, fit_rows, labels)
    stop = stack(served[:1], stop_rows, labels)
    soft = None
    if sources:
        sets = [(stack(t, fit_rows, labels), stack(t[:1], stop_rows, labels)) for t in sources]
        soft, _ = source_soft_targets(sets, params, device, n_classes)
    head = linear_head(train[0].shape[1], n_classes, params.dropout).to(device)
    fit_head(head, train, stop, params, device, None, soft)
    head.eval()
    with torch.inference_mode():
        x = torch.from_numpy(served[0][predict_rows]).to(device)
        return head(x).float().softmax(dim=1).cpu().numpy()


def evaluate_config(
    name: str,
    params: TrainParams,
    photos: Photos,
    cache: FeatureCache,
    cv: CvParams,
    device: torch.device,
) -> dict[str, Any]:
    """Out-of-fold probabilities of every photo in each repeat, ``(repeats, N, C)``, and the
    standard split's test accuracy in each repeat."""
    if params.fine_tune_blocks > 0 and params.fine_tune_epochs > 0:
        raise SystemExit(f"cv.configs.{name}: fine-tuning is measured on the standard split only")
    if not frozen_backbone(params):
        raise SystemExit(f"cv.configs.{name}: cross-validation needs a frozen backbone")
    spec = default_spec(
        params.model, params.input_size, params.resize, interpolation=params.interpolation
    )
    folds = np.array([fold_of(h, cv.folds, cv.salt) for h in photos.sha256])
    stop = np.array([stops_early(h, cv.stop_fraction, cv.salt) for h in photos.sha256])
    shape = (cv.repeats, len(photos.paths), len(photos.class_names))
    probs = np.zeros(shape, dtype=np.float64)
    test_rows = np.flatnonzero(photos.split == "test")
    test_probs = np.zeros((cv.repeats, len(test_rows), len(photos.class_names)))
    cv_seconds = head_seconds = 0.0
    for r in range(cv.repeats):
        run = dataclasses.replace(params, seed=params.seed + r)
        served = view_features(cache, run.model, spec, run, photos)
        sources = [
            view_features(cache, t, source_spec(t, run.interpolation), run, photos)
            for t in source_names(run)
        ]
        t0 = time.monotonic()
        for k in range(cv.folds):
            held = np.flatnonzero(folds == k)
            fit_rows = np.flatnonzero((folds != k) & ~stop)
            stop_rows = np.flatnonzero((folds != k) & stop)
            probs[r, held] = fit_predict(
                served, sources, photos.labels, fit_rows, stop_rows, held, run, device
            )
        cv_seconds += time.monotonic() - t0
        t0 = time.monotonic()
        test_probs[r] = fit_predict(
            served,
            sources,
            photos.labels,
            np.flatnonzero(photos.split == "train"),
            np.flatnonzero(photos.split == "val"),
            test_rows,
            run,
            device,
        )
        head_seconds += time.monotonic() - t0
    return {
        "probs": probs,
        "folds": folds,
        "test": scored_on_test(test_probs, photos.labels[test_rows]),
        "test_probs": test_probs,
        "cv_head_seconds": round(cv_seconds, 1),  # every repeat
        "split_head_seconds": round(head_seconds / cv.repeats, 1),  # one train stage's head
    }


def scored_on_test(test_probs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """The standard split's test photos: how many each repeat's head got right."""
    correct = (test_probs.argmax(2) == labels).sum(1)
    return {"n": len(labels), "correct": [int(c) for c in correct]}


def ensemble_result(results: list[dict[str, Any]], photos: Photos) -> dict[str, Any]:
    """The members' out-of-fold (and test) probabilities averaged, repeat by repeat: repeat
    ``r`` of every member has the same seed and folds, so each repeat is one ensemble's answers.
    """
    test_probs = np.mean([r["test_probs"] for r in results], axis=0)
    test_rows = np.flatnonzero(photos.split == "test")
    return {
        "probs": np.mean([r["probs"] for r in results], axis=0),
        "folds": results[0]["folds"],
        "test": scored_on_test(test_probs, photos.labels[test_rows]),
        "test_probs": test_probs,
        "cv_head_seconds": round(sum(r["cv_head_seconds"] for r in results), 1),
        "split_head_seconds": round(sum(r["split_head_seconds"] for r in results), 1),
    }


def cascade_result(
    first: dict[str, Any], then: dict[str, Any], below: float, photos: Photos
) -> dict[str, Any]:
    """``first``'s answers, except for the photos whose answer it gives with a probability
    below ``below``: those get ``then``'s probabilities. Repeat by repeat, as for an ensemble;
    ``escalated`` is the share of photos ``then`` answered, per repeat."""

    def mix(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        unsure = a.max(axis=2) < below  # (repeats, N)
        return np.where(unsure[..., None], b, a), unsure

    probs, unsure = mix(first["probs"], then["probs"])
    test_probs, test_unsure = mix(first["test_probs"], then["test_probs"])
    test_rows = np.flatnonzero(photos.split == "test")
    return {
        "probs": probs,
        "folds": first["folds"],
        "test": scored_on_test(test_probs, photos.labels[test_rows]),
        "test_probs": test_probs,
        "escalated": unsure.mean(axis=1),
        "test_escalated": test_unsure.mean(axis=1) if len(test_rows) else np.zeros(len(probs)),
    }


def summarise(result: dict[str, Any], photos: Photos, cv: CvParams) -> dict[str, Any]:
    """The figures of one configuration: means over the repeats, with their spread.

    ``mistakes`` is what one trained head gets wrong on average (its accuracy interval is
    Wilson's at that mean, the sampling error of the photos); ``mistakes_per_repeat`` shows what
    the seed alone moves.
    """
    probs, folds = result["probs"], result["folds"]
    right = probs.argmax(2) == photos.labels  # (repeats, N)
    n = right.shape[1]
    per_repeat = (~right).sum(1)
    mistakes = float(per_repeat.mean())
    low, high = wilson_interval(n - mistakes, n)
    p_true = probs[:, np.arange(n), photos.labels]
    test = result["test"]
    test_accuracy = [c / test["n"] for c in test["correct"]] if test["n"] else []
    return {
        "n": n,
        "repeats": int(right.shape[0]),
        "correct": round(n - mistakes, 4),
        "mistakes": round(mistakes, 4),
        "mistakes_sd": round(float(per_repeat.std(ddof=1)), 4) if len(per_repeat) > 1 else 0.0,
        "mistakes_per_repeat": per_repeat.tolist(),
        "wrong_in_every_repeat": int((~right).all(0).sum()),
        "wrong_in_any_repeat": int((~right).any(0).sum()),
        "accuracy": round(1 - mistakes / n, 6),
        "ci95": [round(low, 6), round(high, 6)],
        "log_loss": round(float(-np.log(np.clip(p_true, 1e-12, 1)).mean()), 6),
        "fold_accuracy": [round(float(right[:, folds == k].mean()), 6) for k in range(cv.folds)],
        "test_n": test["n"],
        "test_accuracy": round(float(np.mean(test_accuracy)), 6) if test_accuracy else None,
        "test_accuracy_per_repeat": [round(a, 6) for a in test_accuracy],
        "cv_head_seconds": result["cv_head_seconds"],
        "split_head_seconds": result["split_head_seconds"],
    }


def served_arch(params: TrainParams) -> dict[str, Any]:
    """What serving a configuration runs: the model, its input side and, when it resizes that
    input inside the graph, the side its network runs at."""
    served: dict[str, Any] = {"model": params.model, "input_size": params.input_size}
    if params.network_size is not None:
        served["network_size"] = params.network_size
    return served


def train_images(params: TrainParams, photos: Photos) -> dict[str, int]:
    """Images the train stage passes through each backbone for this configuration: every
    training photo in every view, and validation once; the same again for each source."""
    n_train = int((photos.split == "train").sum())
    n_val = int((photos.split == "val").sum())
    n = n_train * (1 + params.augment_views) + n_val
    images = {arch_key(served_arch(params)): n}
    for t in source_names(params):
        images[f"{t}@{LITE_VARIANTS[t][0]}"] = images.get(f"{t}@{LITE_VARIANTS[t][0]}", 0) + n
    return images


# ---------------------------------------------------------------------------- reports


def write_predictions(
    out: Path, probs: np.ndarray, folds: np.ndarray, photos: Photos
) -> list[dict[str, Any]]:
    """predictions.csv (every photo) and mistakes.csv (every photo wrong in at least one
    repeat); returns the mistakes, the most often wrong and then the surest first.

    ``probs`` is ``(repeats, N, C)``. A row's ``predicted`` is the answer given most often (for
    a mistake: the wrong answer given most often), ``p`` its mean probability over the repeats
    and ``wrong_in`` the number of repeats that got the photo wrong.
    """
    out.mkdir(parents=True, exist_ok=True)
    names = photos.class_names
    answers = probs.argmax(2)  # (repeats, N)
    rows, mistakes = [], []
    for i, path in enumerate(photos.paths):
        label = int(photos.labels[i])
        wrong = answers[:, i][answers[:, i] != label]
        given = wrong if len(wrong) else answers[:, i]
        pred = int(np.bincount(given, minlength=probs.shape[2]).argmax())
        row = {
            "path": path,
            "label": names[label],
            "predicted": names[pred],
            "p": round(float(probs[:, i, pred].mean()), 6),
            "wrong_in": len(wrong),
            "fold": int(folds[i]),
        }
        rows.append(row)
        if len(wrong):
            mistakes.append(row)
    mistakes.sort(key=lambda r: (-r["wrong_in"], -r["p"], r["path"]))
    for name, data in (("predictions.csv", rows), ("mistakes.csv", mistakes)):
        with open(out / name, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(data)
    return mistakes


def contact_sheet(
    mistakes: list[dict[str, Any]],
    path: Path,
    columns: int,
    thumb: int,
    title: str,
    repeats: int = 1,
) -> None:
    """A grid of the mistaken photos, each captioned ``label->predicted p`` (and, with several
    repeats, in how many of them it was wrong)."""
    font = ImageFont.load_default()
    caption, header = 26, 20
    rows = max(1, math.ceil(len(mistakes) / columns))
    width = columns * (thumb + 4) + 4
    sheet = Image.new("RGB", (width, header + rows * (thumb + caption + 4) + 4), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 4), title, fill="black", font=font)
    if not mistakes:
        draw.text((4, header + 4), "no mistakes", fill="black", font=font)
    for i, m in enumerate(mistakes):
        img = decode_image(Path(m["path"]).read_bytes())
        img.thumbnail((thumb, thumb))
        x = 4 + (i % columns) * (thumb + 4)
        y = header + (i // columns) * (thumb + caption + 4)
        sheet.paste(img, (x + (thumb - img.width) // 2, y + (thumb - img.height) // 2))
        text = f"{m['label']}->{m['predicted']} {m['p']:.2f}"
        if repeats > 1:
            text += f" {m['wrong_in']}/{repeats}"
        draw.text((x, y + thumb + 1), Path(m["path"]).stem[:18], fill="black", font=font)
        draw.text((x, y + thumb + 13), text, fill="firebrick", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, quality=85, optimize=True)


def compare(summary: dict[str, Any], right: dict[str, np.ndarray], baseline: str) -> None:
    """Paired with the baseline photo by photo, repeat by repeat (the same seed for both): who
    fixes what, with an exact McNemar test per repeat. ``mcnemar_p`` is the largest of them: a
    difference counts only if every repeat shows it."""
    if not baseline:
        return
    base = right[baseline]  # (repeats, N)
    for name, s in summary.items():
        if name == baseline:
            continue
        fixed = (right[name] & ~base).sum(1)
        broken = (~right[name] & base).sum(1)
        p = [mcnemar_p(int(f), int(b)) for f, b in zip(fixed, broken, strict=True)]
        s["vs_baseline"] = {
            "baseline": baseline,
            "fixed": round(float(fixed.mean()), 4),
            "broken": round(float(broken.mean()), 4),
            "fixed_per_repeat": fixed.tolist(),
            "broken_per_repeat": broken.tolist(),
            "mcnemar_p_per_repeat": [round(x, 6) for x in p],
            "mcnemar_p": round(max(p), 6),
        }


def markdown_table(
    summary: dict[str, Any],
    default: str | None,
    ensembles: dict[str, Any] | None = None,
    cascades: dict[str, Any] | None = None,
) -> str:
    """The configurations, then the ensembles (``name = a + b``: not one served model) and the
    cascades (``first``, and ``then`` for the photos it is unsure of)."""
    rows = {**summary, **(ensembles or {}), **(cascades or {})}
    lines = [
        "| configuration | CV accuracy (95% CI) | mistakes (mean ± sd, range) "
        "| vs baseline (fixed/broken, largest p) | test accuracy |",
        "|---|---|---|---|---|",
    ]
    for name, s in rows.items():
        label = row_label(name, s, " (default)" if name == default else "")
        vs = s.get("vs_baseline")
        vs_text = (
            f"+{vs['fixed']:.1f}/-{vs['broken']:.1f}, p={vs['mcnemar_p']:.3g}" if vs else "baseline"
        )
        lines.append(
            f"| {label} | {accuracy_text(s)} "
            f"| {mistakes_text(s)} | {vs_text} | {s['test_accuracy']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def track(
    name: str,
    params: TrainParams | list[str] | Cascade,
    cv: CvParams,
    s: dict[str, Any],
    out: Path,
    tags: dict[str, str],
) -> str:
    """One MLflow run per configuration (or ensemble: ``params`` its members), so the UI lines
    them up; returns its id."""
    tracker = Tracker()
    if isinstance(params, list):
        flat = {"ensemble.members": "+".join(params)}
        tags = {**tags, "cv_ensemble": name}
    elif isinstance(params, Cascade):
        flat = {f"cascade.{k}": str(v) for k, v in dataclasses.asdict(params).items()}
        tags = {**tags, "cv_cascade": name}
    else:
        flat = {f"train.{k}": str(v) for k, v in dataclasses.asdict(params).items()}
    run_id = tracker.start(run_name=name, tags={**tags, "cv_config": name}, experiment=EXPERIMENT)
    skip = ("configs", "ensembles", "cascades")
    flat.update({f"cv.{k}": str(v) for k, v in dataclasses.asdict(cv).items() if k not in skip})
    tracker.call("log_params", flat)
    metrics = {
        "cv_accuracy": s["accuracy"],
        "cv_ci95_low": s["ci95"][0],
        "cv_ci95_high": s["ci95"][1],
        "cv_mistakes": s["mistakes"],
        "cv_mistakes_sd": s["mistakes_sd"],
        "cv_log_loss": s["log_loss"],
        "test_accuracy": s["test_accuracy"],
        **{f"fold_{k}_accuracy": a for k, a in enumerate(s["fold_accuracy"])},
        **{f"repeat_{r}_mistakes": m for r, m in enumerate(s["mistakes_per_repeat"])},
    }
    if "escalated" in s:
        metrics["cv_escalated"] = s["escalated"]
    if "vs_baseline" in s:
        metrics.update({f"vs_baseline_{k}": s["vs_baseline"][k] for k in ("fixed", "broken")})
    tracker.call("log_metrics", metrics)
    for artifact in ("mistakes.csv", "mistakes.jpg", "predictions.csv"):
        tracker.call("log_artifact", str(out / name / artifact), artifact_path="cv")
    tracker.end()
    return run_id


# ---------------------------------------------------------------------------- main


def cross_validate(
    manifest: Path,
    out: Path,
    cv: CvParams,
    configs: dict[str, TrainParams],
    default: TrainParams,
) -> dict[str, Any]:
    """The whole stage; returns what ``summary.json`` holds."""
    started = time.monotonic()
    first = next(iter(configs.values()))
    if first.threads:
        torch.set_num_threads(first.threads)
    device = pick_device(first.device)
    photos = Photos.from_rows(read_manifest(manifest))
    cache = FeatureCache(Path(cv.cache_dir), first.batch_size, device)
    data_version = file_sha256(manifest)
    tags = {"data_version": data_version, "git_commit": git_commit(), "kind": "cross-validation"}
    default_name = default_row(default, cv, configs)
    members = ensemble_members(cv, configs)
    cascades = cascade_steps(cv, configs)
    summary: dict[str, dict[str, Any]] = {}
    ensembles: dict[str, dict[str, Any]] = {}
    right: dict[str, np.ndarray] = {}
    results: dict[str, dict[str, Any]] = {}

    def report_on(name: str, result: dict[str, Any]) -> dict[str, Any]:
        s = summarise(result, photos, cv)
        mistakes = write_predictions(out / name, result["probs"], result["folds"], photos)
        title = (
            f"{name}: {mistakes_text(s)} wrong over {cv.repeats} repeats, {len(mistakes)} "
            f"photos at least once ({cv.folds}-fold, true->predicted p repeats)"
        )
        contact_sheet(
            mistakes, out / name / "mistakes.jpg", cv.sheet_columns, cv.thumb_px, title, cv.repeats
        )
        right[name] = result["probs"].argmax(2) == photos.labels
        log.info(
            "%s: accuracy %.4f (%.4f-%.4f), mistakes %s, test %.4f",
            name,
            s["accuracy"],
            *s["ci95"],
            mistakes_text(s),
            s["test_accuracy"],
        )
        return s

    for name, params in configs.items():
        log.info("configuration %s", name)
        results[name] = evaluate_config(name, params, photos, cache, cv, device)
        s = report_on(name, results[name])
        s["train_images"] = train_images(params, photos)
        s["params"] = {
            k: v for k, v in dataclasses.asdict(params).items() if v != getattr(default, k)
        }
        s["overrides"] = cv.configs[name] or {}
        s["served"] = served_arch(params)
        s["resize"] = params.resize  # with input_size, the view a cascade's file feeds it
        summary[name] = s
    for name, names in members.items():
        results[name] = ensemble_result([results[m] for m in names], photos)
        s = report_on(name, results[name])
        s["members"] = names
        ensembles[name] = s
    staged: dict[str, dict[str, Any]] = {}
    for name, step in cascades.items():
        result = cascade_result(results[step.first], results[step.then], step.below, photos)
        then = members.get(step.then, [step.then])
        seconds = [results[m] for m in dict.fromkeys([step.first, *then])]
        result["cv_head_seconds"] = round(sum(r["cv_head_seconds"] for r in seconds), 1)
        result["split_head_seconds"] = round(sum(r["split_head_seconds"] for r in seconds), 1)
        s = report_on(name, result)
        s.update(first=step.first, then=step.then, below=step.below, then_members=then)
        s["escalated_per_repeat"] = [round(float(x), 6) for x in result["escalated"]]
        s["escalated"] = round(float(result["escalated"].mean()), 6)
        s["test_escalated"] = round(float(result["test_escalated"].mean()), 6)
        staged[name] = s
    compare({**summary, **ensembles, **staged}, right, cv.baseline)
    for name, params in configs.items():
        summary[name]["mlflow_run_id"] = track(name, params, cv, summary[name], out, tags)
    for name, s in ensembles.items():
        s["mlflow_run_id"] = track(name, s["members"], cv, s, out, tags)
    for name, s in staged.items():
        s["mlflow_run_id"] = track(name, cascades[name], cv, s, out, tags)
    report = {
        "folds": cv.folds,
        "repeats": cv.repeats,
        "n": len(photos.paths),
        "data_version": data_version,
        "default": default_name,
        "baseline": cv.baseline or None,
        "seconds": round(time.monotonic() - started, 1),
        "configs": summary,
        "ensembles": ensembles,
        "cascades": staged,
    }
    (out / "summary.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "table.md").write_text(markdown_table(summary, default_name, ensembles, staged))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=PARAMS_FILE)
    parser.add_argument("--manifest", type=Path, default=Path("data/prepared/manifest.csv"))
    parser.add_argument("--out", type=Path, default=Path("reports/cv"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        cv, configs = load_cv(args.params)
        default = load_train(args.params)
        args.out.mkdir(parents=True, exist_ok=True)
        cross_validate(args.manifest, args.out, cv, configs, default)
    except ParamsError as exc:  # one line naming the key (train.device: cuda included), exit 2
        refuse("cv", exc)


if __name__ == "__main__":
    main()
