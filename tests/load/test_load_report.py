"""The benchmark report writer on a small synthetic result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest.bench_report import write_report

pytestmark = pytest.mark.load


def lat(p50: float) -> dict[str, float]:
    return {"n": 100, "mean": p50, "p50": p50, "p90": 1.5 * p50, "p99": 2 * p50, "max": 3 * p50}


def level(c: int, p50: float, ips: float) -> dict:
    return {
        "concurrency": c, "requests": 100, "ok": 99, "errors": 1, "statuses": {"200": 99, "0": 1},
        "latency_ms": lat(p50), "rejected_latency_ms": lat(float("nan")), "requests_per_s": ips,
        "images_per_s": ips, "window_s": 5.0, "client_cpu_s": 0.4, "client_cpu_share": 0.08,
        "server_rss_mb": 210.0,
    }  # fmt: skip


def inproc(p50: float, best: float) -> dict:
    return {
        "per_image": {"latency_ms": lat(p50), "preprocess_ms": lat(4.0), "images_per_s": 1e3 / p50},
        "batched": [
            {"batch_size": 8, "images_per_s": best},
            {"batch_size": 16, "images_per_s": best * 0.9},
        ],
    }


SYNTHETIC = {
    "generated_at": "2026-11-26T20:00:00+00:00",
    "machine": {
        "cpu_model": "Test CPU",
        "cores": 2,
        "usable_cpus": 2,
        "memory_gib": 24.0,
        "python": "3.11.7",
        "onnxruntime": "1.32.0",
        "numpy": "2.4.6",
    },
    "model": {"path": "models/model.onnx", "sha256": "ab" * 32, "model_name": "tiny"},
    "settings": {"intra_op_threads": 2},
    "method": "Synthetic figures.",
    "inprocess": [inproc(15.0, 100.0), inproc(16.0, 96.0)],
    "torch_eager": {"skipped": "no checkpoint"},
    "http": {
        "fp32 batching": [
            {**level(1, 17.0, 58.0), "stages_ms": {"head": 0.1, "inference": 8.5, "log": 0.05}},
            level(16, 150.0, 92.0),
        ],
        "fp32 no batching": [level(1, 17.5, 57.0), level(16, 190.0, 80.0)],
    },
    "servers": {"fp32 batching": {"ready_s": 1.2, "peak_rss_mb": 230.0, "exit_code": 0}},
    "overload": {
        **level(0, 90.0, 95.0),
        "statuses": {"200": 300, "503": 600},
        "requests": 900,
        "ok": 300,
        "rejected_latency_ms": lat(2.0),
        "offered_rps": 280.0,
        "offered_factor": 3.0,
        "max_queue_size": 8,
        "alive_after": True,
        "ready_status_after": 200,
    },
    "ratios": {
        "http_p50_c1_over_floor_p50": {
            "label": "HTTP p50 at c=1 / bare floor p50",
            "value": 17 / 15,
            "op": "<=",
            "target": 1.25,
            "met": True,
        },
        "http_c16_over_floor_batched": {
            "label": "HTTP images/s at c=16 / best batched",
            "value": 0.82,
            "op": ">=",
            "target": 0.85,
            "met": False,
        },
    },
}


def test_report_files_and_contents(tmp_path: Path) -> None:
    paths = write_report(SYNTHETIC, tmp_path / "bench")
    names = sorted(p.name for p in paths)
    assert names == [
        "latency.json",
        "latency.md",
        "latency_baseline.png",
        "latency_concurrency.png",
    ]

    doc = json.loads((tmp_path / "bench" / "latency.json").read_text())
    for key in (
        "machine",
        "model",
        "settings",
        "method",
        "inprocess",
        "http",
        "overload",
        "ratios",
    ):
        assert key in doc
    assert doc["model"]["sha256"] == "ab" * 32

    md = (tmp_path / "bench" / "latency.md").read_text()
    assert "Test CPU" in md
    assert "ab" * 32 in md
    header = "| server | concurrency | p50 ms | p90 ms | p99 ms | images/s | errors |"
    assert header in md
    assert "| fp32 no batching | 16 | 190.0 | 285.0 | 380.0 | 80.0 | 1 |" in md
    assert "| HTTP p50 at c=1 / bare floor p50 | 1.133 | <= 1.25 | yes |" in md
    assert "| HTTP images/s at c=16 / best batched | 0.820 | >= 0.85 | **no** |" in md
    assert "| 900 | 300 | 600 | 0 |" in md  # overload: requests, 200, 503, others
    # the stage breakdown at c=1; the log stage (after the answer) is not in the sum
    assert "| inference | onnxruntime run (per batch) | 8.500 |" in md
    assert "Stages before the answer add up to 8.60 ms" in md

    for png in ("latency_concurrency.png", "latency_baseline.png"):
        data = (tmp_path / "bench" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(data) > 5000


def test_report_without_optional_sections(tmp_path: Path) -> None:
    minimal = {"http": {"fp32 batching": [level(1, 17.0, 58.0)]}}
    write_report(minimal, tmp_path)
    md = (tmp_path / "latency.md").read_text()
    assert "| fp32 batching | 1 | 17.0 |" in md
    assert (tmp_path / "latency_concurrency.png").stat().st_size > 0


def test_plots_have_svg_twins(tmp_path):
    write_report(SYNTHETIC, tmp_path)
    for name in ("latency_concurrency.svg", "latency_baseline.svg"):
        text = (tmp_path / name).read_text()
        assert text.lstrip().startswith("<?xml")
        assert "<svg" in text


def test_batch_curve_is_read_from_the_ready_line_and_reported(tmp_path: Path) -> None:
    from loadtest.bench import batch_curve
    from loadtest.bench_report import markdown

    log = tmp_path / "server.log"
    ready = {
        "message": "ready",
        "batch_limit": 2,
        "seconds_per_image": {"1": 0.005, "2": 0.004},
        "parallel_runs": 2,
        "parallel_batch_limit": 1,
        "parallel_seconds_per_image": {"1": 0.009, "2": 0.0095},
        "startup_seconds": {"boot": 0.35, "model_load": 0.2, "warmup": 0.625},
    }
    log.write_text("not json\n" + json.dumps({"message": "starting"}) + "\n" + json.dumps(ready))
    assert batch_curve(log) == {
        "batch_limit": 2,
        "batch_curve": {"1": 0.005, "2": 0.004},
        "parallel_runs": 2,
        "parallel_batch_limit": 1,
        "parallel_batch_curve": {"1": 0.009, "2": 0.0095},
        "startup_seconds": {"boot": 0.35, "model_load": 0.2, "warmup": 0.625},
    }
    silent = tmp_path / "silent.log"  # a server that never got ready
    silent.write_text(json.dumps({"message": "cannot serve"}) + "\n")
    assert batch_curve(silent) == {}
    result = {"servers": {"fp32 batching": {"ready_s": 1.0, **batch_curve(log)}}}
    text = markdown(result)
    assert "| fp32 batching | 5.00 | 4.00 | 2 |" in text
    assert "| fp32 batching, parallel | 9.00 | 9.50 | 1 |" in text
    assert "| fp32 batching | 1.00 | boot 0.35, model_load 0.20, warmup 0.62 |" in text


def test_stage_plot_sets_the_floor_against_the_server(tmp_path: Path) -> None:
    from loadtest.bench_report import stage_bars

    c1 = level(1, 8.0, 9.0)
    c1["stages_ms"] = {"head": 0.1, "body": 0.1, "queue": 0.0, "decode": 0.8,
                       "preprocess": 0.9, "inference": 4.0, "respond": 0.2, "log": 0.3}  # fmt: skip
    floor_run = inproc(5.5, 180.0)
    floor_run["per_image"]["inference_ms"] = lat(3.8)
    result = {"http": {"fp32 batching": [c1]}, "inprocess": [floor_run]}
    bars = stage_bars(result)
    floor = dict(bars["bare floor"])
    assert floor == {"decode + preprocess": pytest.approx(1.7), "inference": 3.8}
    server = bars["HTTP server, c=1"]
    assert [name for name, _ in server][:7] == [
        "head", "body", "queue", "decode", "preprocess", "inference", "respond"
    ]  # fmt: skip
    assert "log" not in dict(server)  # after the answer: not part of what the client waits for
    assert sum(ms for _, ms in server) == pytest.approx(c1["latency_ms"]["p50"])
    paths = write_report(result, tmp_path)
    assert tmp_path / "latency_stages.png" in paths
    assert (tmp_path / "latency_stages.svg").read_text().lstrip().startswith("<?xml")


def test_label_agreement_is_reported_with_the_targets(tmp_path: Path) -> None:
    from loadtest.bench_report import markdown

    agreement = {"photos": 200, "same_label": 199, "max_abs_prob_diff": 0.4}
    result = {**SYNTHETIC, "labels": {**agreement, "differing": ["dog/7.jpg"]}}
    text = markdown(result)
    assert "in-process label on 199 of 200 photos" in text
    assert "different on dog/7.jpg" in text


def test_reference_pairs_are_tabled_with_their_medians(tmp_path: Path) -> None:
    def pair(floor: float, ref: float, server: float, loop: float) -> dict:
        return {
            "inprocess_p50_ms": floor, "http_c1_p50_ms": server, "latency_ratio": server / floor,
            "inprocess_best_batched_ips": 100.0, "http_c16_ips": 98.0, "throughput_ratio": 0.98,
            "http_errors": 0, "reference_c1_p50_ms": ref, "reference_errors": 0,
            "reference_ratio": ref / floor, "server_over_reference": server / ref,
            "reference_loop_cpu_ms": 0.4, "http_c1_loop_cpu_ms": loop,
            "reference_other_cpu_ms": 9.0, "http_c1_other_cpu_ms": 9.5,
        }  # fmt: skip

    result = {**SYNTHETIC, "pairs": [pair(8.0, 8.2, 10.0, 1.2), pair(8.4, 8.4, 9.2, 1.0),
                                     pair(9.0, 8.6, 10.8, 1.4)]}  # fmt: skip
    level1 = {**result["http"]["fp32 batching"][0], "loop_cpu_ms_per_request": 1.234,
              "other_cpu_ms_per_request": 9.5}  # fmt: skip
    result["http"] = {**result["http"], "fp32 batching": [level1, level(16, 150.0, 92.0)]}
    write_report(result, tmp_path)
    md = (tmp_path / "latency.md").read_text()
    assert "### The HTTP reference at c=1 (same pairs)" in md
    assert "| 2 | 8.4 | 8.4 | 9.2 | 1.000 | 1.095 | 0.40 | 1.00 | 9.00 | 9.50 | 0 |" in md
    # medians, column by column: floor 8.4, reference 8.4, server 10.0, ratios of the pairs
    assert "| median | 8.4 | 8.4 | 10.0 | 1.000 | 1.220 | 0.40 | 1.20 | 9.00 | 9.50 |  |" in md
    assert "1.23 ms on the event loop's thread, 9.50 ms on all other threads" in md


def test_no_reference_table_without_reference_figures(tmp_path: Path) -> None:
    old = dict(SYNTHETIC)
    old["pairs"] = [{
        "inprocess_p50_ms": 8.0, "http_c1_p50_ms": 9.0, "latency_ratio": 1.125,
        "inprocess_best_batched_ips": 100.0, "http_c16_ips": 98.0, "throughput_ratio": 0.98,
        "http_errors": 0,
    }]  # fmt: skip
    write_report(old, tmp_path)
    md = (tmp_path / "latency.md").read_text()
    assert "## Paired measurements" in md
    assert "HTTP reference" not in md


INTERLEAVED = {
    "rounds": 40, "block": 10,
    "images": {"floor spin": 400, "floor sleep": 400, "server": 398, "reference": 400},
    "p50_ms": {"floor spin": 10.0, "floor sleep": 11.0, "server": 12.0, "reference": 11.0},
    "p90_ms": {"floor spin": 11.0, "floor sleep": 12.0, "server": 13.5, "reference": 12.0},
    "floor_policy": "spin", "floor_p50_ms": 10.0, "server_over_floor": 1.2,
    "reference_over_floor": 1.1, "server_over_reference": 12.0 / 11.0,
    "server_over_floor_halves": [1.18, 1.22], "errors": {"server": 2, "reference": 0},
}  # fmt: skip


def test_the_interleaved_c1_run_is_reported_and_is_the_c1_target(tmp_path: Path) -> None:
    from loadtest import bench

    pairs = [{
        "inprocess_p50_ms": 8.0, "http_c1_p50_ms": 8.4, "latency_ratio": 1.05,
        "inprocess_best_batched_ips": 100.0, "http_c16_ips": 98.0, "throughput_ratio": 0.98,
        "http_errors": 0,
    }]  # fmt: skip
    result = {**SYNTHETIC, "pairs": pairs, "interleaved_c1": INTERLEAVED}
    got = bench.ratios(result)
    assert got["http_p50_c1_over_floor_p50"]["value"] == 1.2  # not the pair's 1.05
    assert got["http_p50_c1_over_floor_p50"]["met"] is False
    assert got["http_c16_over_floor_batched"]["value"] == 0.98  # still the pairs' median
    without = bench.ratios({**SYNTHETIC, "pairs": pairs})  # a report from before the blocks
    assert without["http_p50_c1_over_floor_p50"]["value"] == 1.05
    write_report({**result, "ratios": got}, tmp_path)
    md = (tmp_path / "latency.md").read_text()
    assert "## Concurrency 1, interleaved (the c=1 target ratio)" in md
    assert "| bare floor, spinning pool threads (the floor) | 10.00 | 11.00 | 400 |" in md
    assert "| the server (`python -m server`, defaults) | 12.00 | 13.50 | 398 |" in md
    assert "Server / floor **1.200** (first and second half of the rounds: 1.180, 1.220)" in md
    assert "server / reference 1.091" in md
    assert "Errors: server 2, reference 0." in md
    assert "## Paired measurements (the c=16 target ratio is their median)" in md
    assert md.index("## Concurrency 1, interleaved") < md.index("## Paired measurements")


@pytest.mark.parametrize(
    ("levels", "message"),
    [
        ("1,8,32", "must include 16, the level the p99 / p50 target is measured at"),
        ("1,x", "comma-separated whole numbers"),
        ("0,16", "every level is at least 1"),
    ],
)
def test_bench_refuses_levels_that_cannot_give_its_targets_at_once(
    levels: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without c=16 the tail ratio could not be computed, which make bench found out only after
    minutes of measuring (and the README's own shortened command did that)."""
    from loadtest.bench import parse_args

    with pytest.raises(SystemExit) as exc:
        parse_args(["--concurrency", levels])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
