"""The decoded-pixels budget (MAX_INFLIGHT_PIXELS): an image that does not fit waits a bounded
time (MAX_PIXELS_WAIT_MS) for other decodes to release theirs, then is refused with 503 and
``Retry-After``; a cascade's other views never wait, and a row they leave unescalated is counted.

The waits are checked on ``server.limits.Budget`` itself and on real server processes: a batch
of large images sent to an idle server is answered in full (it was refused in part, on every
retry alike, when its own images competed for the budget), and a real overload is still refused.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import BLUE, RED, image_bytes, prom, run, serve, solid_png, tiny_contract

from catsdogs.contract import INPUT_NAME
from catsdogs.preprocessing import PreprocessSpec
from server.app import _escalation
from server.inference import InferenceModel, PolicyChooser
from server.limits import Budget, OverBudgetError

pytestmark = pytest.mark.serve

PNG = {"Content-Type": "image/png"}


# ---------------------------------------------------------------------- Budget
def test_a_reservation_that_does_not_fit_waits_for_a_release() -> None:
    budget = Budget(10, "decoded pixels")
    budget.reserve_or_raise(8)
    waited: list[float] = []

    def reserve() -> None:
        started = time.perf_counter()
        budget.reserve_or_raise(5, wait_s=10.0)
        waited.append(time.perf_counter() - started)

    waiter = threading.Thread(target=reserve)
    waiter.start()
    time.sleep(0.2)
    assert waiter.is_alive()  # waiting, not refused
    budget.release(8)  # another decode ends
    waiter.join(5)
    assert not waiter.is_alive()
    assert 0.15 < waited[0] < 5
    assert budget.used == 5


def test_a_wait_that_runs_out_is_refused_and_holds_nothing() -> None:
    budget = Budget(10, "decoded pixels")
    budget.reserve_or_raise(8)
    started = time.perf_counter()
    with pytest.raises(OverBudgetError, match="decoded pixels"):
        budget.reserve_or_raise(5, wait_s=0.2)
    assert 0.15 < time.perf_counter() - started < 5
    assert budget.used == 8
    # a release that leaves too little wakes the waiter, which waits on for the rest of its bound
    release = threading.Timer(0.05, budget.release, (1,))
    release.start()
    started = time.perf_counter()
    with pytest.raises(OverBudgetError):
        budget.reserve_or_raise(5, wait_s=0.2)
    assert 0.15 < time.perf_counter() - started < 5
    release.join()
    assert budget.used == 7


def test_without_a_wait_or_past_the_whole_limit_it_refuses_at_once() -> None:
    budget = Budget(10, "request bytes")
    budget.reserve_or_raise(8)
    started = time.perf_counter()
    with pytest.raises(OverBudgetError):
        budget.reserve_or_raise(5)  # the byte budget on the event loop: never waits
    budget.release(8)
    with pytest.raises(OverBudgetError):
        budget.reserve_or_raise(11, wait_s=10.0)  # no release could ever make room
    assert time.perf_counter() - started < 1
    assert budget.used == 0


class CorruptImageError(Exception):
    pass


def test_a_hold_that_fails_inside_releases_and_wakes_a_waiter() -> None:
    budget = Budget(10, "decoded pixels")
    entered = threading.Event()
    got: list[bool] = []

    def waiter() -> None:
        entered.wait(5)
        with budget.hold(10, wait_s=10.0):
            got.append(True)

    def decode_fails() -> None:
        with budget.hold(10):
            entered.set()
            time.sleep(0.1)  # the waiter is waiting for this hold
            raise CorruptImageError

    thread = threading.Thread(target=waiter)
    thread.start()
    with pytest.raises(CorruptImageError):
        decode_fails()
    thread.join(5)
    assert got == [True]
    assert budget.used == 0


# ---------------------------------------------------------------------- a cascade's views
class SecondStep:
    """A cascade's second step that answers "dog" for every row it is fed."""

    def __init__(self) -> None:
        self.rows: list[int] = []

    def run(self, names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        n = len(feed[INPUT_NAME])
        self.rows.append(n)
        return [np.tile(np.array([[0.0, 1.0]], np.float32), (n, 1))]


def cascade_on_views(second: SecondStep) -> InferenceModel:
    """The escalation half of a cascade whose second model takes a view of its own; every row
    escalates (no answer of the tiny model reaches a probability of 1)."""
    return InferenceModel(
        sessions={},
        contract=tiny_contract(),
        path=Path("cascade.onnx"),
        intra_op_threads=1,
        chooser=PolicyChooser(("sleep",)),
        second=second,
        first_answers="m0/probabilities",
        views={"image@40/45": PreprocessSpec(input_size=40, resize=45)},
        below=1.0,
    )


def test_an_escalation_that_finds_the_budget_full_keeps_the_answer_at_once_and_counts_it(
    make_app, caplog: pytest.LogCaptureFixture
) -> None:
    """The server's escalation (``server.app._escalation``) on the batch's thread does not wait
    for room in the pixel budget, however long MAX_PIXELS_WAIT_MS lets a first decode wait: the
    row keeps the first model's answer, with a warning, and
    inference_escalation_skipped_images_total{reason="pixels"} counts it. With room, the same
    row goes through the second step."""
    app = make_app(max_pixels_wait_ms=5000.0)
    settings = app.state.settings
    pixels = Budget(settings.max_inflight_pixels, "decoded pixels")
    second = SecondStep()

    async def scenario():
        async with serve(app) as client:
            app.state.batcher.escalate = _escalation(cascade_on_views(second), settings, pixels)
            pixels.reserve_or_raise(pixels.limit)  # other batches' decodes hold all of it
            started = time.perf_counter()
            full = await client.post(
                "/predict", content=image_bytes(RED), headers={"Content-Type": "image/jpeg"}
            )
            seconds = time.perf_counter() - started
            skipped = (await client.get("/metrics")).text
            pixels.release(pixels.limit)
            free = await client.post(
                "/predict", content=image_bytes(RED), headers={"Content-Type": "image/jpeg"}
            )
            return full, seconds, skipped, free, (await client.get("/metrics")).text

    full, seconds, skipped, free, metrics = run(scenario())
    assert full.status_code == 200, full.text
    assert full.json()["label"] == "cat"  # the first model's answer
    assert seconds < 2.5  # not the 5 s a first decode may wait
    assert second.rows == [1]  # only the request with room reached the second step
    assert prom(skipped, "inference_escalation_skipped_images_total", reason="pixels") == 1
    assert prom(skipped, "inference_escalation_skipped_images_total", reason="decode") == 0
    assert prom(skipped, "inference_escalated_images_total") == 0
    assert "not escalated (pixels)" in caplog.text
    assert free.json()["label"] == "dog"  # the second step's answer
    assert prom(metrics, "inference_escalated_images_total") == 1
    assert prom(metrics, "inference_escalation_skipped_images_total") == 1
    assert prom(metrics, "inference_rejected_total") == 0
    assert pixels.used == 0


# ---------------------------------------------------------------------- real servers
SIDE = 3000


@pytest.mark.slow
def test_a_batch_of_large_images_to_an_idle_server_waits_for_its_own_pixels(
    server_process,
) -> None:
    """MAX_INFLIGHT_PIXELS just above one image: a batch of three decodes them side by side
    (three decode threads), and the second and third wait for the pixels of the ones before
    them instead of being refused (they were, on every try, before images waited). Sent three
    times, so a run whose decodes happened not to overlap cannot pass for one that waited."""
    png = solid_png(SIDE)
    server = server_process(
        MAX_PIXELS=str(SIDE * SIDE),
        MAX_INFLIGHT_PIXELS=str(SIDE * SIDE + 1),
        DECODE_THREADS="3",
        ADAPTIVE_BATCH="0",  # one batch of three (MAX_BATCH_SIZE 4), decoded at once
    )
    server.wait_ready()
    files = [("files", (f"{i}.png", png, "image/png")) for i in range(3)]
    for _ in range(3):
        r = httpx.post(f"{server.url}/predict/batch", files=files, timeout=30)
        assert r.status_code == 200, r.text
        entries = r.json()["predictions"]
        assert [e.get("label", e.get("error")) for e in entries] == ["cat"] * 3
    # two large uploads at once on the idle server: both answered
    blue = solid_png(SIDE, BLUE)
    with ThreadPoolExecutor(2) as pool:
        replies = list(
            pool.map(
                lambda body: httpx.post(
                    f"{server.url}/predict", content=body, headers=PNG, timeout=30
                ),
                [png, blue],
            )
        )
    assert [r.status_code for r in replies] == [200, 200], [r.text for r in replies]
    assert [r.json()["label"] for r in replies] == ["cat", "dog"]
    text = httpx.get(f"{server.url}/metrics").text
    assert prom(text, "inference_rejected_total", reason="pixels") == 0


@pytest.mark.slow
def test_a_real_overload_of_the_pixel_budget_is_still_refused_with_retry_after(
    server_process,
) -> None:
    """Where the budget stays held longer than the wait (MAX_PIXELS_WAIT_MS=1, one image's
    pixels, four runs decoding side by side), images are refused as before: 503 overloaded with
    Retry-After, counted under reason="pixels", while the health probes are answered at once and
    every answer comes within a few seconds. Then a lone image is served (nothing leaked)."""
    png = solid_png(SIDE)
    server = server_process(
        MAX_PIXELS=str(SIDE * SIDE),
        MAX_INFLIGHT_PIXELS=str(SIDE * SIDE),
        MAX_PIXELS_WAIT_MS="1",
        PARALLEL_RUNS="4",
        MAX_BATCH_SIZE="1",  # each request its own run, each run one decode
    )
    server.wait_ready()

    def send(_: int) -> httpx.Response:
        return httpx.post(f"{server.url}/predict", content=png, headers=PNG, timeout=30)

    refused: list[httpx.Response] = []
    served = 0
    for _ in range(5):  # the decodes of a round overlap unless the machine serialises them
        started = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            replies = pool.map(send, range(8))
            probe = httpx.get(f"{server.url}/health/live", timeout=5)
            probe_s = time.perf_counter() - started
            replies = list(replies)
        assert time.perf_counter() - started < 20
        assert probe.status_code == 200
        assert probe_s < 5
        statuses = [r.status_code for r in replies]
        assert set(statuses) <= {200, 503}, statuses
        served += statuses.count(200)
        refused += [r for r in replies if r.status_code == 503]
        if refused:
            break
    assert refused, "no decodes overlapped in 5 rounds of 8 requests"
    assert served >= 1
    for r in refused:
        assert r.json()["error"]["code"] == "overloaded"
        assert "decoded pixels" in r.json()["error"]["message"]
        assert int(r.headers["retry-after"]) >= 1
    text = httpx.get(f"{server.url}/metrics").text
    assert prom(text, "inference_rejected_total", reason="pixels") == len(refused)
    alone = httpx.post(f"{server.url}/predict", content=png, headers=PNG, timeout=30)
    assert alone.status_code == 200, alone.text


def test_the_wait_is_a_setting_with_a_bound() -> None:
    from server.settings import Settings, SettingsError

    assert Settings().max_pixels_wait_ms == 2000.0
    assert Settings.from_env({"MAX_PIXELS_WAIT_MS": "0"}).max_pixels_wait_ms == 0
    for bad in ("-1", "60001"):
        with pytest.raises(SettingsError, match="MAX_PIXELS_WAIT_MS"):
            Settings.from_env({"MAX_PIXELS_WAIT_MS": bad})
    assert replace(Settings(), max_pixels_wait_ms=60_000).max_pixels_wait_ms == 60_000
