"""Fine-tuning keeps an epoch only when it beats the model it started from on validation."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from training.params import TrainParams
from training.train import fit_end_to_end

pytestmark = pytest.mark.train

HEAD_EPOCH = 4  # the epoch the starting model stands for (the fitted head's best)


def separable(n: int, seed: int, flipped: bool = False) -> TensorDataset:
    """Two classes on either side of x0 = 0, well apart; ``flipped`` swaps the labels."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 2, generator=gen) * 0.3
    x[:, 0] += torch.where(y == 1, 2.0, -2.0)
    return TensorDataset(x, 1 - y if flipped else y)


def fine_tune(model: nn.Module, lr: float, misleading: bool = False) -> tuple[int, list[float]]:
    """Three epochs of fit_end_to_end from ``model``; the best epoch and each epoch's val loss.

    ``misleading``: the training photos' labels contradict validation's, so every step is worse."""
    val_losses: list[float] = []
    best = fit_end_to_end(
        model,
        list(model.parameters()),
        [],
        separable(64, seed=1, flipped=misleading),
        separable(32, seed=2),
        TrainParams(batch_size=8, patience=5, label_smoothing=0.0, weight_decay=0.0),
        epochs=3,
        lr=lr,
        device=torch.device("cpu"),
        on_epoch=lambda epoch, loss, acc, val: val_losses.append(val["loss"]),
        first_epoch=HEAD_EPOCH + 1,
        start_epoch=HEAD_EPOCH,
    )
    return best, val_losses


def linear(weight: list[list[float]]) -> nn.Linear:
    layer = nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.zero_()
    return layer


def test_a_start_no_epoch_beats_is_kept_exactly() -> None:
    torch.manual_seed(0)
    model = linear([[-3.0, 0.0], [3.0, 0.0]])  # already right, with a small loss
    start = {k: v.clone() for k, v in model.state_dict().items()}
    best, val_losses = fine_tune(model, lr=0.5, misleading=True)
    assert len(val_losses) == 3  # every epoch ran and was scored, and none was kept
    assert best == HEAD_EPOCH
    for name, value in model.state_dict().items():
        assert torch.equal(value, start[name]), name


def test_an_epoch_that_beats_the_start_is_kept() -> None:
    torch.manual_seed(0)
    model = linear([[0.0, 0.0], [0.0, 0.0]])  # chance: a loss of ln 2
    best, val_losses = fine_tune(model, lr=0.5)
    assert best > HEAD_EPOCH
    assert val_losses[best - HEAD_EPOCH - 1] == min(val_losses)
    assert val_losses[best - HEAD_EPOCH - 1] < 0.5
    assert not torch.equal(model.weight, torch.zeros(2, 2))
