"""The bare floor's measurement order: each thread policy in blocks, never photo by photo."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from loadtest import inprocess

pytestmark = pytest.mark.load


@pytest.mark.parametrize(("n", "block"), [(200, 25), (7, 25), (26, 25), (13, 1), (50, 4)])
def test_every_policy_runs_every_item_once_in_blocks(n: int, block: int) -> None:
    order = inprocess.in_blocks(n, ["spin", "sleep"], block)
    assert sorted(order) == sorted((p, i) for p in ("spin", "sleep") for i in range(n))
    turns = [len(list(group)) for _, group in itertools.groupby(p for p, _ in order)]
    # a policy's turn is one or two whole blocks (ABBA), never a single photo; only the last
    # two turns may take in the last, shorter block
    checked = turns if n % block == 0 else turns[:-2]
    assert all(length % block == 0 for length in checked)
    # which policy goes first alternates block by block
    firsts = [order[2 * block * b][0] for b in range(n // block)]
    assert firsts == [("spin", "sleep")[b % 2] for b in range(n // block)]


def test_per_image_switches_policy_only_between_blocks_after_a_pause(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    pauses: list[int] = []
    monkeypatch.setattr(inprocess, "preprocess_bytes", lambda data, spec: np.zeros((4, 4, 3)))
    monkeypatch.setattr(inprocess.time, "sleep", lambda s: pauses.append(len(calls)))

    def fake(policy: str) -> inprocess.RunFn:
        def run(batch: np.ndarray, photos: list[bytes]) -> np.ndarray:
            assert len(photos) == len(batch)
            calls.append(policy)
            return np.zeros((len(batch), 2))

        return run

    result = inprocess.per_image({"spin": fake("spin"), "sleep": fake("sleep")}, [b"x"] * 60, None)
    switches = [k for k in range(1, len(calls)) if calls[k] != calls[k - 1]]
    assert calls.count("spin") == calls.count("sleep") == 60
    assert switches == [25, 75, 110]  # blocks of 25, ABBA: A25 B25 | B25 A25 | A10 B10
    assert pauses == switches  # the other policy never starts while a pool may still spin
    assert set(result["policies"]) == {"spin", "sleep"}
    assert result["policy"] in {"spin", "sleep"}
