"""PARALLEL_RUNS: under load, batches run side by side on one-thread sessions, one core each.

A request that finds the server idle runs alone, on every core; one that finds company switches
the server to parallel runs until it is idle again, and the two modes never overlap. These tests
slow the runs down (a sleep in the run's thread) so the overlap is visible, then check the same
on a real server process with real photos.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from conftest import BLUE, RED, image_bytes, photos, prom, run, serve

from server.inference import load_model

pytestmark = pytest.mark.serve

JPEG = {"content-type": "image/jpeg"}


def record_runs(app, seconds: float) -> list[tuple[str, float, float]]:
    """Slow both kinds of run down by ``seconds``; returns (kind, start, end) of each run."""
    batcher = app.state.batcher
    runs: list[tuple[str, float, float]] = []
    lock = threading.Lock()

    def wrap(kind, inner):
        def slow(batch):
            start = time.perf_counter()
            time.sleep(seconds)
            out = inner(batch)
            with lock:
                runs.append((kind, start, time.perf_counter()))
            return out

        return slow

    batcher.run = wrap("alone", batcher.run)
    batcher.run_parallel = wrap("parallel", batcher.run_parallel)
    return runs


def most_at_once(runs, kind=None) -> int:
    """The largest number of runs (of ``kind``, or any) that were running at one moment."""
    events = sorted(
        [(s, 1) for k, s, _ in runs if kind in (None, k)]
        + [(e, -1) for k, _, e in runs if kind in (None, k)]
    )
    now = peak = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak


async def _predict(client, color):
    return await client.post("/predict", content=image_bytes(color), headers=JPEG)


def test_a_lone_request_runs_alone_and_concurrent_ones_side_by_side(make_app):
    app = make_app(parallel_runs=2, max_batch_size=1)

    async def scenario():
        async with serve(app) as client:
            runs = record_runs(app, 0.05)
            lone = [await _predict(client, c) for c in (RED, BLUE)]
            alone_runs = list(runs)
            colors = [RED, BLUE] * 6
            together = await asyncio.gather(*(_predict(client, c) for c in colors))
            metrics = (await client.get("/metrics")).text
            return lone, alone_runs, together, runs, metrics

    lone, alone_runs, together, runs, metrics = run(scenario())
    assert [r.json()["label"] for r in lone] == ["cat", "dog"]
    assert [kind for kind, _, _ in alone_runs] == ["alone", "alone"]
    assert [r.status_code for r in together] == [200] * 12
    # every answer belongs to its own request, whichever run it was in
    assert [r.json()["label"] for r in together] == ["cat", "dog"] * 6
    kinds = [kind for kind, _, _ in runs[2:]]
    assert kinds.count("parallel") >= 10  # the first of the burst may find the server idle
    assert most_at_once(runs, "parallel") == 2  # never more than PARALLEL_RUNS
    assert most_at_once(runs) == 2  # an alone run (every core) never overlaps a parallel one
    assert prom(metrics, "inference_parallel_runs") == 2
    assert prom(metrics, "inference_policy_runs_total", policy="parallel") == kinds.count(
        "parallel"
    )


def test_the_server_runs_alone_again_once_idle(make_app):
    app = make_app(parallel_runs=2, max_batch_size=1)

    async def scenario():
        async with serve(app) as client:
            runs = record_runs(app, 0.03)
            await asyncio.gather(*(_predict(client, c) for c in [RED, BLUE] * 3))
            before = len(runs)
            after = [await _predict(client, c) for c in (RED, BLUE, RED)]
            return runs[before:], after

    later, after = run(scenario())
    assert [r.json()["label"] for r in after] == ["cat", "dog", "cat"]
    assert [kind for kind, _, _ in later] == ["alone"] * 3


def test_parallel_runs_batch_up_to_their_own_limit(make_app):
    app = make_app(parallel_runs=2, max_batch_size=3)

    async def scenario():
        async with serve(app) as client:
            batcher = app.state.batcher
            inner = batcher.run_parallel
            sizes: list[int] = []

            def slow(batch):
                sizes.append(len(batch))
                time.sleep(0.05)
                return inner(batch)

            batcher.run_parallel = slow
            responses = await asyncio.gather(*(_predict(client, c) for c in [RED, BLUE] * 8))
            return sizes, responses

    sizes, responses = run(scenario())
    assert [r.json()["label"] for r in responses] == ["cat", "dog"] * 8
    assert max(sizes) == 3  # requests queued behind two busy runs are batched
    assert sum(sizes) <= 16


def test_one_parallel_run_means_none(make_app):
    app = make_app(parallel_runs=1)

    async def scenario():
        async with serve(app) as client:
            responses = await asyncio.gather(*(_predict(client, c) for c in [RED, BLUE] * 4))
            return responses, (await client.get("/metrics")).text

    responses, metrics = run(scenario())
    assert [r.json()["label"] for r in responses] == ["cat", "dog"] * 4
    assert app.state.model.parallel is None
    assert prom(metrics, "inference_parallel_runs") == 1
    assert prom(metrics, "inference_policy_runs_total", policy="parallel") == 0


def test_the_one_thread_session_gives_the_same_answers(tiny_model):
    model = load_model(tiny_model, intra_op_threads=2, parallel_runs=2)
    size = model.contract.input_size
    batch = np.random.default_rng(1).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    np.testing.assert_array_equal(model.run_parallel(batch), model.run(batch))
    np.testing.assert_array_equal(model.run_parallel(batch[:1]), model.run(batch[:1]))


def test_a_real_server_under_concurrent_load_runs_in_parallel(server_process):
    """Real photos from 8 client threads at once against ``python -m server``: every answer is
    the one the same photo gets alone, and /metrics shows parallel runs did the work."""
    server = server_process(PARALLEL_RUNS="2", INTRA_OP_THREADS="2")
    server.wait_ready()
    files = photos("cat", 6) + photos("dog", 6)
    blobs = [f.read_bytes() for f in files]
    with httpx.Client(base_url=server.url, timeout=30) as client:
        alone = [client.post("/predict", content=b, headers=JPEG).json() for b in blobs]

    def post(blob: bytes) -> dict:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            return c.post("/predict", content=blob, headers=JPEG).json()

    with ThreadPoolExecutor(max_workers=8) as pool:
        together = list(pool.map(post, blobs * 4))
    with httpx.Client(base_url=server.url, timeout=30) as client:
        metrics = client.get("/metrics").text
    for i, answer in enumerate(together):
        expected = alone[i % len(blobs)]
        assert answer["label"] == expected["label"]
        assert answer["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-6)
    assert prom(metrics, "inference_parallel_runs") == 2
    assert prom(metrics, "inference_policy_runs_total", policy="parallel") > 0


def test_a_batch_request_larger_than_a_batch_runs_in_parallel(make_app):
    app = make_app(parallel_runs=2, max_batch_size=2)

    async def scenario():
        async with serve(app) as client:
            runs = record_runs(app, 0.05)
            files = [("files", (f"{i}.jpg", image_bytes((RED, BLUE)[i % 2]), "image/jpeg"))
                     for i in range(6)]  # fmt: skip
            response = await client.post("/predict/batch", files=files)
            return response, runs

    response, runs = run(scenario())
    assert response.status_code == 200
    labels = [p["label"] for p in response.json()["predictions"]]
    assert labels == ["cat", "dog"] * 3
    assert {kind for kind, _, _ in runs} == {"parallel"}
    assert most_at_once(runs) == 2


def test_parallel_runs_have_their_own_measured_curve(make_app):
    app = make_app(parallel_runs=2, max_batch_size=3, adaptive_batch=1)

    async def scenario():
        async with serve(app) as client:
            return (await client.get("/metrics")).text

    metrics = run(scenario())
    batcher = app.state.batcher
    assert sorted(batcher.parallel_curve) == [1, 2, 3]
    for n, seconds in batcher.parallel_curve.items():
        assert seconds > 0
        assert prom(
            metrics, "inference_warmup_parallel_seconds_per_image", batch_size=str(n)
        ) == pytest.approx(seconds)
    assert 1 <= batcher.parallel_limit <= 3
    assert prom(metrics, "inference_parallel_batch_limit") == batcher.parallel_limit
