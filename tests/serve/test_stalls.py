"""Event-loop stalls: the loop's lag (server/loop_lag.py) measured, exported, logged and its kind
named, on a real server process frozen from outside and a real event loop kept busy; and the
garbage collector's pauses (server/gc_pauses.py), the start-up heap frozen."""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import logging
import os
import signal
import time

import httpx
import pytest
from conftest import predict_jpegs, prom
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import generate_latest

from server import gc_pauses, loop_lag
from server.gc_pauses import GcPauses
from server.loop_lag import LoopLag

pytestmark = pytest.mark.serve


def _late_wakeups(text: str, above: str) -> float:
    """Event-loop wake-ups later than ``above`` seconds (a bucket bound) so far."""
    return prom(text, "event_loop_lag_seconds_count") - prom(
        text, "event_loop_lag_seconds_bucket", le=above
    )


def _gc_pauses(text: str, generation: str) -> tuple[float, float]:
    return (
        prom(text, "python_gc_pause_seconds_count", generation=generation),
        prom(text, "python_gc_pause_seconds_sum", generation=generation),
    )


def test_the_started_server_freezes_its_heap_and_times_collections(server_process):
    """Once ready, a real server has frozen its start-up heap (tens of thousands of objects that
    no collection walks again) and times every collection, by generation, on /metrics."""
    server = server_process()
    server.wait_ready()
    predict_jpegs(server.url, 40)  # allocations enough for young collections
    text = httpx.get(f"{server.url}/metrics").text
    assert prom(text, "python_gc_frozen_objects") > 10_000, text
    count, total = _gc_pauses(text, "0")
    assert count > 0, text
    assert total > 0, text
    for generation in ("0", "1", "2"):
        buckets = [
            prom(text, "python_gc_pause_seconds_bucket", generation=generation, le=le)
            for le in (*map(str, gc_pauses.BUCKETS), "+Inf")
        ]
        assert buckets == sorted(buckets), (generation, buckets)
        assert buckets[-1] == _gc_pauses(text, generation)[0], (generation, buckets)


def test_gc_pauses_freeze_time_and_let_go() -> None:
    """In this process: ``start`` leaves far fewer objects for a collection to walk than it
    froze, times each collection in its generation, and ``stop`` unfreezes and stops timing."""
    pauses = GcPauses()
    registry = CollectorRegistry()
    registry.register(pauses)
    pauses.start()
    try:
        frozen = gc.get_freeze_count()
        assert frozen > 0
        assert len(gc.get_objects()) < frozen / 2, (len(gc.get_objects()), frozen)
        before = _gc_pauses(generate_latest(registry).decode(), "2")
        garbage = [[] for _ in range(1000)]
        for a, b in itertools.pairwise(garbage):
            a.append(b)
            b.append(a)  # cycles only a collection frees
        del garbage, a, b
        assert gc.collect() >= 1000
        count, total = _gc_pauses(generate_latest(registry).decode(), "2")
        assert count == before[0] + 1
        assert total > before[1]
    finally:
        pauses.stop()
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert _gc_pauses(generate_latest(registry).decode(), "2")[0] == count  # no longer timed


def test_a_stalled_event_loop_is_measured_and_logged(server_process):
    """A stall of the event loop, as a process frozen for 0.4 s (SIGSTOP, then SIGCONT) makes
    one: the wake-up after it is counted late in ``event_loop_lag_seconds`` and one warning line
    says how late and what the server held; the timer goes on afterwards."""
    server = server_process()
    server.wait_ready()
    text = httpx.get(f"{server.url}/metrics").text
    assert _late_wakeups(text, "0.25") == 0, text
    ticks = prom(text, "event_loop_lag_seconds_count")
    os.kill(server.pid, signal.SIGSTOP)
    try:
        time.sleep(0.4)
    finally:
        os.kill(server.pid, signal.SIGCONT)
    deadline = time.monotonic() + 10
    while True:
        text = httpx.get(f"{server.url}/metrics", timeout=5).text
        if _late_wakeups(text, "0.25") >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert _late_wakeups(text, "0.25") == 1, text
    assert _late_wakeups(text, "1.0") == 0, text  # 0.4 s frozen: late by less than that
    time.sleep(0.3)
    later = httpx.get(f"{server.url}/metrics").text
    assert prom(later, "event_loop_lag_seconds_count") > prom(text, "event_loop_lag_seconds_count")
    assert prom(text, "event_loop_lag_seconds_count") > ticks

    deadline = time.monotonic() + 5
    lines: list[dict] = []
    while not lines and time.monotonic() < deadline:
        lines = [
            json.loads(line)
            for line in server.log.read_text().splitlines()
            if '"the event loop ran late"' in line
        ]
        time.sleep(0.05)
    assert len(lines) == 1, server.output()
    (line,) = lines
    assert line["level"] == "warning", line
    assert line["logger"] == "server.loop", line
    assert 250 <= line["lag_ms"] < 1000, line
    assert line["late_wakeups"] == 1, line
    assert line["worst_lag_ms"] == line["lag_ms"], line
    assert line["queued_images"] == 0, line
    assert line["tasks"] >= 1, line
    # frozen, the loop's thread used no CPU: a starved loop, not work on it
    assert line["stall"] == "starved", line
    assert line["loop_cpu_ms"] < line["lag_ms"] / 2, line


def _histogram() -> Histogram:
    return Histogram(
        "event_loop_lag_seconds", "", buckets=loop_lag.BUCKETS, registry=CollectorRegistry()
    )


def test_work_on_the_event_loop_is_a_busy_stall(caplog: pytest.LogCaptureFixture) -> None:
    """0.4 s of CPU-bound work on the loop itself: one late wake-up, logged as ``busy`` with
    the loop thread's CPU; the wake-ups on time before it are counted and not logged."""
    histogram = _histogram()

    async def main() -> None:
        lag = LoopLag(histogram, lambda: {"queued_images": 0})
        lag.start()
        await asyncio.sleep(0.35)  # on-time wake-ups
        end = time.perf_counter() + 0.4
        while time.perf_counter() < end:  # the mistake: CPU-bound work on the event loop
            pass
        await asyncio.sleep(0.15)
        await lag.stop()

    with caplog.at_level(logging.WARNING, logger="server.loop"):
        asyncio.run(main())
    samples = {
        s.labels.get("le"): s.value
        for s in histogram.collect()[0].samples
        if s.name.endswith("_bucket")
    }
    assert samples["+Inf"] >= 4, samples
    assert samples["+Inf"] - samples["0.1"] == 1, samples  # the one wake-up after the work
    (record,) = caplog.records
    fields = record.fields
    assert record.getMessage() == "the event loop ran late"
    assert fields["stall"] == "busy", fields
    assert fields["lag_ms"] >= 250, fields  # 0.4 s of work, less at most one interval
    assert fields["loop_cpu_ms"] >= 200, fields  # the work's CPU, on the loop's own thread
    assert fields["late_wakeups"] == 1, fields
    assert fields["queued_images"] == 0, fields


def test_late_wakeups_are_logged_at_most_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Under a long run of stalls the log gets one line per ``log_every_s``, each counting the
    late wake-ups since the last line and the worst of them; every wake-up is in the histogram."""
    histogram = _histogram()
    lag = LoopLag(histogram, log_every_s=3600)
    with caplog.at_level(logging.WARNING, logger="server.loop"):
        for seconds in (0.15, 0.5, 0.2, 0.01):
            lag.record(seconds)
        lag._logged_at = float("-inf")  # the interval has passed
        lag.record(0.12)
    assert [r.fields["late_wakeups"] for r in caplog.records] == [1, 3], caplog.records
    assert [r.fields["worst_lag_ms"] for r in caplog.records] == [150.0, 500.0]
    assert [r.fields["lag_ms"] for r in caplog.records] == [150.0, 120.0]
    count = [s.value for s in histogram.collect()[0].samples if s.name.endswith("_count")]
    assert count == [5]
