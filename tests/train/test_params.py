"""params.yaml: every stage section parses; unknown or wrongly typed keys are named."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from export.params import EvaluateParams, ExportParams, load_export
from training.params import (
    FetchParams,
    ParamsError,
    PrepareParams,
    TrainParams,
    load_fetch,
    load_prepare,
    load_train,
    parse_section,
)

pytestmark = pytest.mark.train

ROOT = Path(__file__).resolve().parents[2]


def test_the_repository_params_parse() -> None:
    params = ROOT / "params.yaml"
    assert len(load_fetch(params).sha256) == 64
    assert load_prepare(params).val_fraction > 0
    assert load_train(params).model == "efficientnet_lite0"


def stage_params(stage: str) -> set[str]:
    """The params.yaml keys a dvc.yaml stage lists (DVC reruns the stage when one changes)."""
    listed = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["params"]
    return {key for key in listed if isinstance(key, str)}


@pytest.mark.parametrize(
    ("stage", "cls", "section"),
    [
        ("download", FetchParams, "fetch"),
        ("prepare", PrepareParams, "prepare"),
        ("train", TrainParams, "train"),
        ("export", ExportParams, "export"),
        ("evaluate", EvaluateParams, "evaluate"),
    ],
)
def test_each_stage_lists_every_key_of_the_section_it_reads(stage, cls, section) -> None:
    # a key the stage reads but dvc.yaml does not list changes the result without a rerun, and
    # DVC's run cache can hand back outputs made with another value
    keys = {f"{section}.{field.name}" for field in dataclasses.fields(cls)}
    missing = sorted(keys - stage_params(stage))
    assert not missing, f"dvc.yaml stage {stage} reads but does not list {missing}"


def test_params_are_frozen() -> None:
    params = parse_section(TrainParams, "train", {"epochs": 3})
    with pytest.raises(AttributeError):
        params.epochs = 4  # type: ignore[misc]


@pytest.mark.parametrize(
    ("section", "raw", "named"),
    [
        ("train", {"epocs": 3}, "train.epocs"),
        ("train", {"lr": "fast"}, "train.lr"),
        ("train", {"lr": "1e-3x"}, "train.lr"),
        ("train", {"epochs": 2.5}, "train.epochs"),
        ("train", {"epochs": True}, "train.epochs"),
        ("train", {"pretrained": "yes"}, "train.pretrained"),
        ("train", {"model": 3}, "train.model"),
        ("prepare", {"max_per_class": "all"}, "prepare.max_per_class"),
        ("prepare", {"workers": None}, "prepare.workers"),
    ],
)
def test_unknown_or_wrongly_typed_key_is_named(section, raw, named) -> None:
    cls = {"train": TrainParams, "prepare": PrepareParams}[section]
    with pytest.raises(ParamsError, match=named.replace(".", r"\.")):
        parse_section(cls, section, raw)


def test_exponent_floats_yaml_1_1_leaves_as_strings_are_numbers() -> None:
    """PyYAML (YAML 1.1) reads 1e-3 and 1e-05 as strings; YAML 1.2 and DVC (`dvc exp run -S
    train.lr=1e-5` writes that) read numbers. Only keys that take a float convert them."""
    params = parse_section(TrainParams, "train", {"lr": "1e-3", "fine_tune_lr": "1E-05"})
    assert (params.lr, params.fine_tune_lr) == (0.001, 1e-05)
    with pytest.raises(ParamsError, match=r"train\.model: expected str"):
        parse_section(TrainParams, "train", {"model": 1e-3})
    assert parse_section(TrainParams, "train", {"model": "logreg"}).model == "logreg"


def test_ints_are_accepted_for_floats_and_null_for_optional() -> None:
    params = parse_section(TrainParams, "train", {"lr": 1, "weight_decay": 0})
    assert params.lr == 1.0
    assert isinstance(params.lr, float)
    assert parse_section(PrepareParams, "prepare", {"max_per_class": None}).max_per_class is None


def test_missing_required_key_is_named() -> None:
    with pytest.raises(ParamsError, match=r"fetch\.sha256"):
        parse_section(FetchParams, "fetch", {"url": "http://x", "size": 1, "download_dir": "d"})


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_value_checks_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=r"train\.model"):
        load_train(write(tmp_path, "train:\n  model: resnet9000\n"))
    with pytest.raises(ParamsError, match=r"train\.device"):
        load_train(write(tmp_path, "train:\n  device: tpu\n"))
    with pytest.raises(ParamsError, match=r"prepare\.test_fraction"):
        load_prepare(write(tmp_path, "prepare:\n  val_fraction: 0.6\n  test_fraction: 0.5\n"))
    with pytest.raises(ParamsError, match=r"prepare\.max_per_class"):
        load_prepare(write(tmp_path, "prepare:\n  max_per_class: 0\n"))
    with pytest.raises(ParamsError, match=r"prepare\.max_pixels"):
        load_prepare(write(tmp_path, "prepare:\n  max_pixels: 0\n"))
    with pytest.raises(ParamsError, match="train: section missing"):
        load_train(write(tmp_path, "prepare: {}\n"))
    with pytest.raises(ParamsError, match="expected a mapping"):
        load_train(write(tmp_path, "train: [1, 2]\n"))
    # a dataclass's own check, as section.key like the rest (it read "export: serve: ...")
    repository = (ROOT / "params.yaml").read_text()
    assert "  serve: fp32" in repository
    fp16 = write(tmp_path, repository.replace("  serve: fp32", "  serve: fp16"))
    with pytest.raises(
        ParamsError, match=r"^export\.serve: expected 'fp32' or 'int8', got 'fp16'$"
    ):
        load_export(fp16)


def test_cuda_asked_for_on_a_machine_without_it_is_one_line_naming_the_key() -> None:
    import torch

    from training.train import pick_device

    if torch.cuda.is_available():  # this check is for CPU machines; CUDA ones pick the GPU
        assert pick_device("cuda").type == "cuda"
        return
    with pytest.raises(ParamsError, match=r"^train\.device: cuda, but no CUDA device"):
        pick_device("cuda")


@pytest.mark.parametrize(
    ("train", "message"),
    [
        (
            "  model: mobilenet_v3_small\n  fine_tune_blocks: 2\n  fine_tune_epochs: 1\n",
            r"^train\.fine_tune_blocks: fine-tuning applies to a pretrained EfficientNet-Lite"
            r" model, not mobilenet_v3_small; set it to 0$",
        ),
        (
            "  pretrained: false\n  fine_tune_blocks: 2\n  fine_tune_epochs: 1\n",
            r"not efficientnet_lite0 from scratch; set it to 0$",
        ),
        (
            "  model: mobilenet_v3_small\n  distill_from: efficientnet_lite1\n",
            r"^train\.distill_from: needs a frozen backbone .* not mobilenet_v3_small trained",
        ),
    ],
)
def test_settings_the_train_stage_cannot_train_are_refused_before_any_work(
    tmp_path: Path, train: str, message: str
) -> None:
    """The train stage found these minutes in, after the features, with a message naming no
    stage; fine-tuning a model from scratch was ignored without a word."""
    with pytest.raises(ParamsError, match=message):
        load_train(write(tmp_path, "train:\n" + train))
    # what the stage can train passes: fine-tuning a pretrained Lite, distilling into logreg
    load_train(write(tmp_path, "train:\n  fine_tune_blocks: 2\n  fine_tune_epochs: 1\n"))
    load_train(write(tmp_path, "train:\n  model: logreg\n  distill_from: efficientnet_lite1\n"))


@pytest.mark.parametrize(
    ("module", "text", "line"),
    [
        ("training.fetch", "fetch:\n  timeout: 5\n", "fetch: fetch.timeout: unknown key"),
        (
            "training.prepare",
            "prepare:\n  max_per_class: 0\ntrain: {}\n",
            "prepare: prepare.max_per_class: must be >= 1 or null",
        ),
        ("training.train", "train:\n  epochs: 0\n", "train: train.epochs: must be >= 1"),
        (
            "training.cv",
            "cv:\n  folds: 1\n  configs: {a: {}}\ntrain: {}\n",
            "cv: cv.folds: must be >= 2",
        ),
    ],
)
def test_every_stage_refuses_a_bad_parameter_with_one_line_and_exit_2(
    tmp_path: Path, module: str, text: str, line: str
) -> None:
    """Export and evaluate exited 2, train and prepare 1, fetch and cv with a traceback."""
    import os
    import subprocess
    import sys

    (tmp_path / "params.yaml").write_text(text)
    out = subprocess.run(
        [sys.executable, "-m", module, "--params", str(tmp_path / "params.yaml")],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.splitlines()[0].startswith(line), out.stderr[-3000:]
    assert len(out.stderr.splitlines()) == 1, out.stderr[-3000:]
