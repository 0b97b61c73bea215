"""Typed views of ``params.yaml``: one frozen dataclass per stage section.

Every key must be known and of the declared type, so a typo such as ``train.lr: "1e-3"`` or
``train.epocs`` stops the stage at once instead of silently training with a default.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

PARAMS_FILE = "params.yaml"
MODEL_NAMES = (
    "efficientnet_lite0",
    "efficientnet_lite1",
    "efficientnet_lite2",
    "mobilenet_v3_small",
    "logreg",
)

# EfficientNet-Lite variant -> (the weights' own input size, the shorter side resized before its
# centre crop). Lite1 and Lite2 are wider and deeper and were trained at larger inputs; a
# larger model distilled from sees photos at its own size (training.train), the served model at
# params.yaml's train.input_size.
LITE_VARIANTS = {
    "efficientnet_lite0": (224, 256),
    "efficientnet_lite1": (240, 274),
    "efficientnet_lite2": (260, 297),
}

# A network may run at another side than its input's (train.network_size, a cascade's
# "model@side"), the input resized inside the graph: down to any side, or up to this many times
# the input's (upsampling adds no detail: past that it only costs time)
MAX_UPSAMPLE = 2


def max_network_size(input_size: int) -> int:
    """The largest side a network may run at on an ``input_size`` input."""
    return MAX_UPSAMPLE * input_size


class ParamsError(ValueError):
    """A section of params.yaml is missing, has an unknown key or a value of the wrong type."""


def refuse(stage: str, exc: ParamsError) -> typing.NoReturn:
    """A bad parameter stops a stage before any work: one line on stderr that names the key, and
    exit status 2, as export and evaluate do (1 is a failure while working, 130 and 143 a stop)."""
    print(f"{stage}: {exc}", file=sys.stderr)
    raise SystemExit(2)


@dataclass(frozen=True)
class FetchParams:
    url: str  # the public Microsoft PetImages zip
    sha256: str  # pinned checksum of that zip
    size: int  # bytes, checked before hashing
    download_dir: str  # where the zip and its extracted photos live (not a DVC output)
    timeout_s: float = 60.0
    chunk_bytes: int = 1 << 20


@dataclass(frozen=True)
class PrepareParams:
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    max_per_class: int | None = None  # keep at most this many photos a class (None: all)
    min_side: int = 32  # smaller photos are dropped as "too_small"
    max_pixels: int = 40_000_000  # larger are dropped as "too_many_pixels"
    workers: int = 2
    split_salt: str = "catsdogs-split-v1"  # changing it reshuffles every split


@dataclass(frozen=True)
class TrainParams:
    model: str = "efficientnet_lite0"
    pretrained: bool = True
    input_size: int = 224
    resize: int = 256
    # the side the network runs at when not input_size: the input is resized to it inside the
    # model (one served input for networks of several sizes; up to MAX_UPSAMPLE times
    # input_size, upsampled: objects at the scale a backbone's weights know); None: input_size
    network_size: int | None = None
    interpolation: str = "bilinear"
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch intra-op threads; 0 = all cores
    batch_size: int = 64
    epochs: int = 60  # head epochs on cached features, or whole-model epochs from scratch
    patience: int = 8  # early stopping on validation loss
    lr: float = 0.001
    weight_decay: float = 0.0001
    label_smoothing: float = 0.0
    dropout: float = 0.2
    augment_views: int = 1  # extra augmented views of each training photo (cached features)
    crop_scale_min: float = 0.6  # RandomResizedCrop lower bound of the area kept
    fine_tune_blocks: int = 0  # >0: afterwards fine-tune the last N backbone blocks end to end
    fine_tune_epochs: int = 0
    fine_tune_lr: float = 0.0001
    logreg_pool: int = 4  # logreg sees the input average-pooled by this factor
    # distillation: a linear probe on each larger model's frozen features (EfficientNet-Lite, at its
    # own input size) labels every training view; the head learns from those soft targets
    distill_from: str | None = None  # a model name, or an ensemble "name+name"; None: off
    distill_alpha: float = 0.5  # weight of the soft (source) term; 1 - alpha: the true labels
    distill_temperature: float = (
        2.0  # softens the larger model's logits and the served model's alike
    )
    # a cascade: more frozen-backbone probes ("model" or "model@side", joined with "+"), run in
    # the same file only on the images the model gives a probability below cascade_below; their
    # and the model's probabilities averaged answer those (export.cascade). None: off
    cascade: str | None = None
    cascade_below: float = 0.9
    # what the cascade's other models see: "shared", the one input_size input resized inside the
    # graph to each network's side; "own", each photo prepared again at each model's own side
    # (and a resize in the same ratio), for the escalated photos only: the views make cv measured
    cascade_views: str = "shared"


@dataclass(frozen=True)
class CvParams:
    folds: int = 5
    salt: str = "catsdogs-cv-v1"  # fold = sha256(salt, photo bytes) -> [0, 1) -> one of `folds`
    stop_fraction: float = 0.15  # of the training folds (by hash) held out for early stopping
    repeats: int = 3  # whole cross-validations per configuration, repeat r with train.seed + r
    baseline: str = ""  # the configuration the others are compared with photo by photo
    cache_dir: str = "data/cv-cache"  # frozen-backbone features, per backbone and view
    sheet_columns: int = 8  # contact sheet of the mistakes: thumbnails a row
    thumb_px: int = 112
    latency_batch: int = 8  # the cost stage times batch 1 and this batch through onnxruntime
    latency_runs: int = 30  # median of this many calls per model and batch, interleaved
    configs: dict = dataclasses.field(default_factory=dict)  # name -> overrides of `train`
    # name -> "config+config...": those configurations' probabilities averaged, repeat by repeat.
    # Not one served model (it costs every member's run): the ceiling for distilling them
    ensembles: dict = dataclasses.field(default_factory=dict)
    # name -> {first: config, then: config or ensemble, below: p}: the first answers every photo;
    # a photo whose answer it gives with a probability below `below` is answered by `then`
    cascades: dict = dataclasses.field(default_factory=dict)


T = TypeVar("T")


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:  # YAML writes 1 for 1.0; accept ints, never bools or strings
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if annotation is dict:
        return isinstance(value, dict)
    raise TypeError(f"unsupported params annotation {annotation!r}")


# A float in exponent form without a dot (1e-3, 1e-05): YAML 1.2 (and DVC, which writes
# `dvc exp run -S train.lr=1e-5` that way) reads a number, PyYAML's YAML 1.1 a string.
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)[eE][-+]?\d+")


def _exponent_float(value: Any, annotation: Any) -> Any:
    """``value`` as a float where the key takes one and YAML 1.1 left it a string."""
    takes_float = annotation is float or float in typing.get_args(annotation)
    if takes_float and isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
        return float(value)
    return value


def parse_section(cls: type[T], section: str, raw: Any) -> T:
    """``raw`` (a mapping from YAML) -> ``cls``; errors name ``section.key``."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{section}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in raw:
        if key not in fields:
            raise ParamsError(f"{section}.{key}: unknown key (known: {', '.join(fields)})")
    raw = {key: _exponent_float(value, hints[key]) for key, value in raw.items()}
    for key, value in raw.items():
        if not _type_ok(value, hints[key]):
            raise ParamsError(f"{section}.{key}: expected {_type_name(hints[key])}, got {value!r}")
    missing = [
        name
        for name, f in fields.items()
        if name not in raw
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ParamsError(f"{section}.{missing[0]}: required key missing")
    values = {k: float(v) if hints[k] is float else v for k, v in raw.items()}
    try:
        return cls(**values)
    except ValueError as exc:  # a dataclass's own check: its message starts with the key
        raise ParamsError(f"{section}.{exc}") from exc
    except TypeError as exc:
        raise ParamsError(f"{section}: {exc}") from exc


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    return "null" if annotation is type(None) else annotation.__name__


def load_yaml(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections")
    return data


def load_section(cls: type[T], section: str, path: str | Path = PARAMS_FILE) -> T:
    data = load_yaml(path)
    if section not in data:
        raise ParamsError(f"{section}: section missing from {path}")
    return parse_section(cls, section, data[section])


def load_fetch(path: str | Path = PARAMS_FILE) -> FetchParams:
    return load_section(FetchParams, "fetch", path)


def load_prepare(path: str | Path = PARAMS_FILE) -> PrepareParams:
    params = load_section(PrepareParams, "prepare", path)
    if params.val_fraction < 0 or params.test_fraction < 0:
        raise ParamsError("prepare.val_fraction: fractions must be >= 0")
    if params.val_fraction + params.test_fraction >= 1:
        raise ParamsError("prepare.test_fraction: val_fraction + test_fraction must be < 1")
    if params.max_per_class is not None and params.max_per_class < 1:
        raise ParamsError("prepare.max_per_class: must be >= 1 or null")
    if params.max_pixels < 1:
        raise ParamsError("prepare.max_pixels: must be >= 1")
    return params


def load_train(path: str | Path = PARAMS_FILE) -> TrainParams:
    return check_train(load_section(TrainParams, "train", path))


def load_cv(path: str | Path = PARAMS_FILE) -> tuple[CvParams, dict[str, TrainParams]]:
    """The ``cv`` section and each named configuration: ``train`` with the config's overrides.

    Every configuration is checked like the train section itself (unknown key, wrong type)."""
    cv = load_section(CvParams, "cv", path)
    if cv.folds < 2:
        raise ParamsError("cv.folds: must be >= 2")
    if not 0 < cv.stop_fraction < 1:
        raise ParamsError("cv.stop_fraction: must be within (0, 1)")
    if cv.repeats < 1:
        raise ParamsError("cv.repeats: must be >= 1")
    if not cv.configs:
        raise ParamsError("cv.configs: name at least one configuration")
    # a configuration is one model: the train section's cascade is not inherited (cv.cascades
    # measures cascades from the configurations' answers)
    train = {k: v for k, v in (load_yaml(path).get("train") or {}).items() if k not in CASCADE_KEYS}
    configs = {}
    for name, overrides in cv.configs.items():
        section = f"cv.configs.{name}"
        if not isinstance(overrides, dict | None):
            raise ParamsError(f"{section}: expected a mapping of train keys")
        params = parse_section(TrainParams, section, {**train, **(overrides or {})})
        configs[str(name)] = check_train(params, section)
    if cv.baseline and cv.baseline not in configs:
        raise ParamsError(f"cv.baseline: {cv.baseline!r} is not one of cv.configs")
    cascade_steps(cv, configs)
    return cv, configs


CASCADE_MODELS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "logreg")
CASCADE_VIEWS = ("shared", "own")  # train.cascade_views
CASCADE_KEYS = ("cascade", "cascade_below", "cascade_views")  # what makes a train section a cascade
MAX_VIEW = 1024  # a cascade model's own view, at most (px)


def cascade_members(params: TrainParams, section: str = "train") -> list[tuple[str, int]]:
    """``train.cascade`` as (model, network side) pairs: an EfficientNet-Lite at its weights'
    own side unless ``@side`` says otherwise; the input resized to it inside the graph, or with
    ``cascade_views: own`` a view of its own at that side (:func:`own_view_resize`)."""
    if not params.cascade:
        return []
    key = f"{section}.cascade"
    if params.cascade_views not in CASCADE_VIEWS:
        raise ParamsError(
            f"{section}.cascade_views: {params.cascade_views!r} is not one of {CASCADE_VIEWS}"
        )
    if params.cascade_views == "own" and params.network_size is not None:
        raise ParamsError(
            f"{section}.cascade_views: 'own' gives each model its own view; the first model runs"
            " at train.input_size (network_size null)"
        )
    if params.model not in CASCADE_MODELS or (params.model != "logreg" and not params.pretrained):
        raise ParamsError(f"{key}: the first model must be a frozen backbone (pretrained Lite)")
    if params.fine_tune_blocks > 0 and params.fine_tune_epochs > 0:
        raise ParamsError(f"{key}: a cascade's models are linear probes; turn fine-tuning off")
    members = []
    for item in params.cascade.split("+"):
        name, _, side = item.partition("@")
        if name not in CASCADE_MODELS:
            raise ParamsError(f"{key}: {name!r} is not one of {list(CASCADE_MODELS)}")
        if side and not side.isdigit():
            raise ParamsError(f"{key}: {item!r}: the side after '@' must be a number of pixels")
        size = int(side) if side else LITE_VARIANTS.get(name, (params.input_size,))[0]
        if params.cascade_views == "own" and not 0 < size <= MAX_VIEW:
            raise ParamsError(f"{key}: {item!r}: its own view must be 1..{MAX_VIEW} px")
        if params.cascade_views == "shared" and not 0 < size <= max_network_size(params.input_size):
            raise ParamsError(
                f"{key}: {item!r} runs at {size} px, over {MAX_UPSAMPLE}x train.input_size"
                f" ({params.input_size}): the one input is resized to each model, at most"
                f" {MAX_UPSAMPLE}x up"
            )
        members.append((name, size))
    return members


def own_view_resize(params: TrainParams, size: int) -> int:
    """The shorter side a cascade model's own view of ``size`` px is resized to before the
    centre crop: train.resize in the same ratio to train.input_size (224 of 256: 240 of 274,
    260 of 297, as each model was cross-validated)."""
    return round(size * params.resize / params.input_size)


def ensemble_members(cv: CvParams, configs: dict[str, TrainParams]) -> dict[str, list[str]]:
    """``cv.ensembles`` as lists of configuration names; errors name ``cv.ensembles.<name>``."""
    members = {}
    for name, value in cv.ensembles.items():
        section = f"cv.ensembles.{name}"
        if name in configs:
            raise ParamsError(f"{section}: the name is already one of cv.configs")
        if not isinstance(value, str):
            raise ParamsError(f"{section}: expected configuration names joined by '+'")
        names = value.split("+")
        unknown = [n for n in names if n not in configs]
        if unknown:
            raise ParamsError(f"{section}: {unknown[0]!r} is not one of cv.configs")
        if len(set(names)) < 2:
            raise ParamsError(f"{section}: name at least two different configurations")
        members[str(name)] = names
    return members


@dataclass(frozen=True)
class Cascade:
    first: str  # a configuration: answers every photo
    then: str  # a configuration or an ensemble: answers the photos the first is unsure of
    below: float  # the first's probability for its answer under which `then` answers


def cascade_steps(cv: CvParams, configs: dict[str, TrainParams]) -> dict[str, Cascade]:
    """``cv.cascades`` checked; errors name ``cv.cascades.<name>``."""
    ensembles = ensemble_members(cv, configs)
    cascades = {}
    for name, raw in cv.cascades.items():
        section = f"cv.cascades.{name}"
        if name in configs or name in ensembles:
            raise ParamsError(f"{section}: the name is already a configuration or an ensemble")
        step = parse_section(Cascade, section, raw)
        if step.first not in configs:
            raise ParamsError(f"{section}.first: {step.first!r} is not one of cv.configs")
        if step.then not in configs and step.then not in ensembles:
            raise ParamsError(
                f"{section}.then: {step.then!r} is neither in cv.configs nor in cv.ensembles"
            )
        if step.then == step.first:
            raise ParamsError(f"{section}.then: must differ from first")
        if not 0 < step.below <= 1:
            raise ParamsError(f"{section}.below: a probability within (0, 1]")
        cascades[str(name)] = step
    return cascades


def check_train(params: TrainParams, section: str = "train") -> TrainParams:
    """The rules a train section (or a cross-validation configuration) must follow."""
    if params.device not in ("auto", "cpu", "cuda"):
        raise ParamsError(f"{section}.device: expected auto, cpu or cuda, got {params.device!r}")
    if params.model not in MODEL_NAMES:
        raise ParamsError(
            f"{section}.model: unknown {params.model!r}; choose one of {list(MODEL_NAMES)}"
        )
    if params.epochs < 1:
        raise ParamsError(f"{section}.epochs: must be >= 1")
    if params.network_size is not None:
        if not 0 < params.network_size <= max_network_size(params.input_size):
            raise ParamsError(
                f"{section}.network_size: must be within 1..{max_network_size(params.input_size)}"
                f" ({MAX_UPSAMPLE}x input_size) or null, got {params.network_size}"
            )
        if params.network_size == params.input_size:
            params = dataclasses.replace(params, network_size=None)  # the same model
    for name in params.distill_from.split("+") if params.distill_from else []:
        if not name.startswith("efficientnet_lite") or name not in MODEL_NAMES:
            raise ParamsError(
                f"{section}.distill_from: {name!r} is not a pretrained EfficientNet-Lite model"
            )
    if params.cascade is not None:
        cascade_members(params, section)
    # what the train stage can do with the model; found here, before any work, not minutes in
    pretrained_lite = params.pretrained and params.model in LITE_VARIANTS
    if params.fine_tune_blocks > 0 and params.fine_tune_epochs > 0 and not pretrained_lite:
        raise ParamsError(
            f"{section}.fine_tune_blocks: fine-tuning applies to a pretrained EfficientNet-Lite"
            f" model, not {params.model}{'' if params.pretrained else ' from scratch'}; set it to 0"
        )
    if params.distill_from and not (pretrained_lite or params.model == "logreg"):
        raise ParamsError(
            f"{section}.distill_from: needs a frozen backbone (a pretrained EfficientNet-Lite or"
            f" logreg), not {params.model} trained from scratch"
        )
    if not 0.0 < params.cascade_below <= 1.0:
        raise ParamsError(f"{section}.cascade_below: must be within (0, 1]")
    if not 0.0 <= params.distill_alpha <= 1.0:
        raise ParamsError(f"{section}.distill_alpha: must be within [0, 1]")
    if params.distill_temperature <= 0:
        raise ParamsError(f"{section}.distill_temperature: must be > 0")
    # bounds torch would otherwise enforce minutes later, in a traceback that names no key
    positive = (lambda v: v > 0, "> 0")
    at_least_0 = (lambda v: v >= 0, ">= 0")
    at_least_1 = (lambda v: v >= 1, ">= 1")
    below_1 = (lambda v: 0 <= v < 1, "within [0, 1)")
    bounds = {
        "lr": positive,
        "fine_tune_lr": positive,
        "weight_decay": at_least_0,
        "label_smoothing": below_1,
        "dropout": below_1,
        "crop_scale_min": (lambda v: 0 < v <= 1, "within (0, 1]"),
        "batch_size": at_least_1,
        "threads": at_least_0,
        "patience": at_least_1,
        "augment_views": at_least_0,
        "fine_tune_blocks": at_least_0,
        "fine_tune_epochs": at_least_0,
        "logreg_pool": at_least_1,
    }
    for key, (holds, rule) in bounds.items():
        value = getattr(params, key)
        if not holds(value):  # NaN holds nothing: refused too
            raise ParamsError(f"{section}.{key}: must be {rule}, got {value}")
    return params


def default_row(train: TrainParams, cv: CvParams, configs: dict[str, TrainParams]) -> str | None:
    """The name under which ``make cv`` measured the ``train`` section itself: the
    configuration equal to it or, when it is a cascade, the ``cv.cascades`` entry whose first
    model is that configuration, whose threshold is ``cascade_below`` and whose later models are
    ``train.cascade``'s, each on its own view or on the first's as ``cascade_views`` says.
    None: it was not measured."""
    unset = {f.name: f.default for f in dataclasses.fields(TrainParams) if f.name in CASCADE_KEYS}
    alone = dataclasses.replace(train, **unset)
    first = next((n for n, p in configs.items() if p == alone), None)
    if first is None or not train.cascade:
        return first
    wanted = sorted(cascade_members(train))
    ensembles = ensemble_members(cv, configs)
    for name, step in cascade_steps(cv, configs).items():
        if step.first != first or step.below != train.cascade_below:
            continue
        later = [configs[m] for m in ensembles.get(step.then, [step.then]) if m != first]
        own = all(p.network_size is None for p in later)
        sides = sorted((p.model, p.network_size or p.input_size) for p in later)
        if sides == wanted and own == (train.cascade_views == "own"):
            return name
    return None
