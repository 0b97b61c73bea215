"""INTRA_OP_SPINNING: onnxruntime's pool threads sleep, spin during runs, or the faster of both.

The choice between spinning and sleeping is measured while serving (``PolicyChooser``): these
tests drive the chooser with known run times, then check on a real model that both sessions are
used, give the same answers, and that /metrics shows which policy ran.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BLUE, RED, image_bytes, prom, run, serve

from server.inference import AUTO, EXPLORE_EVERY, SLEEP, SPIN, PolicyChooser, load_model

pytestmark = pytest.mark.serve

JPEG = {"content-type": "image/jpeg"}


def drive(chooser: PolicyChooser, cost: dict[str, float], runs: int) -> list[str]:
    """``runs`` choices, each recorded with the given policy's cost; the policies chosen."""
    chosen = []
    for _ in range(runs):
        policy = chooser.choose()
        chooser.record(policy, cost[policy])
        chosen.append(policy)
    return chosen


def test_the_faster_policy_is_used_and_the_other_tried_now_and_then():
    chooser = PolicyChooser(("sleep", "spin"))
    assert chooser.preferred() is None
    chosen = drive(chooser, {"sleep": 0.005, "spin": 0.003}, 200)
    # three measuring runs each, then spin except for one exploring run in EXPLORE_EVERY
    assert chosen[:6].count("sleep") == 3
    assert chosen[:6].count("spin") == 3
    tail = chosen[6:]
    assert tail.count("sleep") == pytest.approx(len(tail) / EXPLORE_EVERY, abs=2)
    assert chooser.preferred() == "spin"


def test_the_choice_follows_a_change_in_the_machine():
    chooser = PolicyChooser(("sleep", "spin"))
    drive(chooser, {"sleep": 0.005, "spin": 0.003}, 100)
    # another process takes a core: spinning now loses, and the explore runs notice it
    after = drive(chooser, {"sleep": 0.005, "spin": 0.012}, 20 * EXPLORE_EVERY)
    assert after[-EXPLORE_EVERY + 1 :].count("sleep") >= EXPLORE_EVERY - 2
    assert chooser.preferred() == "sleep"


def test_a_single_policy_is_always_chosen():
    chooser = PolicyChooser(("sleep",))
    assert set(drive(chooser, {"sleep": 0.005}, 50)) == {"sleep"}


@pytest.mark.parametrize(
    ("spinning", "sessions"), [(SLEEP, ["sleep"]), (SPIN, ["spin"]), (AUTO, ["sleep", "spin"])]
)
def test_sessions_per_setting_give_identical_answers(tiny_model, spinning, sessions):
    model = load_model(tiny_model, intra_op_threads=2, spinning=spinning)
    assert list(model.sessions) == sessions
    size = model.contract.input_size
    batch = np.random.default_rng(0).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    answers = []
    used = set()
    for part in (batch[:1], batch):
        for _ in range(12):
            answers.append(model.run(part))
            used.add(model.last_policy)
    assert used == set(sessions)  # AUTO: lone images on both, batches on the sleeping one
    assert model.last_policy == sessions[0]
    for a in answers[1:12]:
        np.testing.assert_array_equal(a, answers[0])
    for a in answers[13:]:
        np.testing.assert_array_equal(a, answers[12])


def test_an_unknown_setting_is_refused(tiny_model):
    with pytest.raises(ValueError, match="spinning"):
        load_model(tiny_model, intra_op_threads=1, spinning=3)


def test_metrics_count_runs_by_policy(make_app):
    app = make_app(intra_op_spinning=AUTO, max_batch_size=1)

    async def scenario():
        async with serve(app) as client:
            for i in range(12):
                data = image_bytes((RED, BLUE)[i % 2])
                r = await client.post("/predict", content=data, headers=JPEG)
                assert r.status_code == 200
            return (await client.get("/metrics")).text

    metrics = run(scenario())
    sleep = prom(metrics, "inference_policy_runs_total", policy="sleep")
    spin = prom(metrics, "inference_policy_runs_total", policy="spin")
    assert sleep >= 3  # both measured before either is preferred
    assert spin >= 3
    assert sleep + spin == 12
