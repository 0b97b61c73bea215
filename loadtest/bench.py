"""``make bench``: latency per image of the HTTP server against in-process inference.

    python -m loadtest.bench --model models/model.onnx --out reports/bench

Runs, in this order, in one go so that every figure shares the machine's state of the moment:
1. the in-process baseline (``loadtest.inprocess`` in .venv-serve), fp32 and int8 if present;
2. the servers (``python -m server`` in .venv-serve): batching on (defaults), batching off
   (MAX_BATCH_SIZE=1) and int8, all started up front; then for each concurrency level each server
   in turn, so a noisy neighbour slows all variants alike (interleaved); then the pairs, with the
   HTTP reference (``loadtest.rawasgi``) at c=1 in each;
3. an overload run: a fresh server with a small MAX_QUEUE_SIZE, offered more than it can do;
4. the in-process baseline again (the HTTP figures are bracketed by two baselines);
5. PyTorch eager on the training checkpoint (``loadtest.torch_ref`` in .venv-train), if present.
The load generator (``loadtest.loadgen``) runs in this process, apart from the server's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import logging
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from catsdogs.hashing import file_sha256
from catsdogs.photos import load_photos
from loadtest import loadgen
from loadtest.bench_report import write_report
from loadtest.serverproc import (
    DEFAULT_PHOTOS,
    ROOT,
    SERVE_PYTHON,
    ServerProcess,
    exit_on_sigterm,
    http_status,
    start_server,
    stop_server,
)
from loadtest.stats import summarize_ms

log = logging.getLogger(__name__)

TRAIN_PYTHON = ROOT / ".venv-train" / "bin" / "python"

TARGETS = {  # the serving targets: overhead near zero against the bare floor
    "http_p50_c1_over_floor_p50": ("HTTP p50 at c=1 / bare floor p50", "<=", 1.10),
    "http_c16_over_floor_batched": ("HTTP images/s at c=16 / bare floor best batched", ">=", 0.95),
    "http_p99_over_p50_c16": ("HTTP p99 / p50 at c=16", "<=", 3.0),  # at TAIL_LEVEL
    "server_peak_rss_mb": ("server peak RSS under load, MB", "<", 300.0),
    "time_to_ready_s": ("time from start to ready, s", "<", 2.0),
}
TAIL_LEVEL = 16  # the concurrency the tail target is measured at (every sweep includes it)
BLOCK_PAUSE_S = 0.05  # between interleaved blocks: a spinning onnxruntime pool stops meanwhile
STAGES = ("head", "body", "queue", "decode", "preprocess", "inference", "respond", "log")
_STAGE_LINE = re.compile(r'^request_stage_seconds_(sum|count)\{stage="(\w+)"\} (\S+)$', re.M)

METHOD = """\
All figures come from one `make bench` run on the machine above, which is shared and whose speed
drifts by tens of percent within minutes; so nothing is compared across time. The servers' variants
are interleaved (for each concurrency level every server takes its turn). The c=1 target ratio
comes from interleaved blocks: 40 rounds (`--interleave-rounds`), each running the same 10 photos
(`--interleave-block`; the next 10 in the next round) on the floor under each thread policy, on
the server and on the HTTP reference, one connection each, in an order that rotates round by
round with a 50 ms pause between blocks; a block takes about 0.1 s, so all four see the same
machine state, and the ratio is the server's p50 over all its images against the faster policy's
(the first round warms up and is dropped; each half of the rounds gives its own ratio, a check of
how steady it is). The c=16 target ratio comes from pairs measured back to back, in-process then
HTTP or the other way round, alternating, six times (`--pairs`; an even number, so each order
counts as much in the median, which took its value from the larger group with five): the
median of the paired ratios (every pair is in the report, with its c=1 ratio too: measured
seconds apart, those moved by tens of percent with the machine, and the HTTP reference
sometimes beat the floor).
The bare floor ("in-process"): a worker process in the serving environment with the project's
preprocessing (`catsdogs.preprocessing.preprocess_bytes`: decode, EXIF, resize, centre crop) and
plain onnxruntime sessions (no queue, no event loop, no threads beyond onnxruntime's; a cascade
runs as the server runs it: its first step, then its second step, fed the first model's answers,
on the rows that escalate, so no model runs twice on a photo), one photo at a time at batch 1
over all photos, and all photos in batches of 4, 8, 16 and 32; every case is
measured under both onnxruntime thread policies (idle pool threads spinning or sleeping), in
blocks of 25 photos taking turns ABBA with a pause between turns (photo by photo, one session's
spinning threads slowed the other's runs), and the faster is the floor; "best batched" is the
fastest size in that pair. The spinning policy is onnxruntime's default: after each run its pool
threads spin for about 25 ms (a core's CPU time, measured on this project's 2-core VM), so
between a block's photos one core stays busy and the next run starts without waking a thread;
the server's pool threads stop spinning when a run ends.
The full floor table is measured before and after the HTTP part. Where the time goes: the
server's own per-stage histograms (`request_stage_seconds`, from real requests) are read from
`/metrics` before and after each level; the report gives their mean per request at c=1.
The HTTP reference (`loadtest.rawasgi`): the floor's work (the same preprocessing and session
options, a batch-1 run on one executor thread) behind a raw ASGI app on the server's own uvicorn,
uvloop and httptools, with no framework, queue, log or metrics; it runs at c=1 in every pair, so
the server's gap to the floor splits into what HTTP costs (reference / floor) and what the
server's own request path adds (server / reference). CPU per request: each thread's CPU time
(/proc/PID/task/TID/schedstat) over a level, divided by the requests answered; the event loop is
the main thread.
HTTP: the server as users run it (`python -m server`, its defaults but the settings named), driven
by an asyncio HTTP/1.1 client in a separate process with keep-alive connections and prebuilt
multipart `POST /predict` requests cycling over the same photos; closed loop (each connection sends
its next request when the last is answered), a warm-up second discarded, then a fixed window.
Latency is from the first byte sent to the last byte received; only 200 answers whose body is a
prediction count as successes; images/s counts successes in the window. The client's CPU share is
reported: on 2 cores it competes with the server, as a co-located client would.
Memory is the server's VmHWM (peak resident set) from /proc after the sweep to c=32 and the pairs.
Time to ready is from spawning the process to the first 200 of `/health/ready` (polled every 20 ms).
Overload: a fresh server with a small MAX_QUEUE_SIZE is offered an open-loop request rate a few
times its measured capacity; accepted requests must stay bounded and the rest must be refused fast.
"""


def shown(path: Path) -> str:
    """A path as the report shows it: relative to the project when inside it."""
    resolved = path.resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def machine_info() -> dict[str, Any]:
    cpu_model = "unknown"
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as fh:
        mem_kb = int(fh.readline().split()[1])
    probe = (
        "import json, sys, numpy, onnxruntime, PIL; print(json.dumps({"
        "'python': sys.version.split()[0], 'numpy': numpy.__version__,"
        " 'onnxruntime': onnxruntime.__version__,"
        " 'pillow': PIL.__version__}))"
    )
    versions = json.loads(subprocess.check_output([str(SERVE_PYTHON), "-c", probe], cwd=ROOT))
    return {
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "memory_gib": mem_kb / 2**20,
        "kernel": platform.release(),
        **versions,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def model_info(path: Path) -> dict[str, Any]:
    probe = (
        "import json, sys, onnxruntime as ort; "
        "m = ort.InferenceSession(sys.argv[1]).get_modelmeta().custom_metadata_map; "
        "print(json.dumps({k: m.get(k) for k in ('model_name', 'model_version', 'input_size', "
        "'quantization', 'mlflow_run_id')}))"
    )
    meta = json.loads(subprocess.check_output([str(SERVE_PYTHON), "-c", probe, str(path)]))
    return {"path": str(path), "sha256": file_sha256(path), "bytes": path.stat().st_size, **meta}


def run_json(cmd: list[str], out: Path, timeout_s: float) -> dict[str, Any]:
    log.info("running %s", " ".join(cmd[1:4]))
    subprocess.run([*cmd, "--out", str(out)], cwd=ROOT, check=True, timeout=timeout_s)
    return json.loads(out.read_text())


class InprocessWorker:
    """``loadtest.inprocess --worker`` in .venv-serve: a loaded session that measures on demand."""

    def __init__(self, model: Path, photos: Path, threads: int) -> None:
        cmd = [str(SERVE_PYTHON), "-m", "loadtest.inprocess", "--worker", "--model", str(model)]
        cmd += ["--photos", str(photos), "--threads", str(threads)]
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.header = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the in-process worker exited with {self.proc.wait()}")
        return json.loads(line)

    def call(self, op: str, **params: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **params}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.call_quit()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def call_quit(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
        self.proc.stdin.close()


def torch_reference(
    checkpoint: Path, photos: Path, threads: int, limit: int, scratch: Path
) -> dict[str, Any]:
    if not TRAIN_PYTHON.exists():
        return {"skipped": f"{TRAIN_PYTHON} not found"}
    if not checkpoint.is_file():
        return {"skipped": f"{checkpoint} not found"}
    cmd = [str(TRAIN_PYTHON), "-m", "loadtest.torch_ref", "--checkpoint", str(checkpoint)]
    cmd += ["--photos", str(photos), "--threads", str(threads), "--limit", str(limit)]
    try:
        return run_json(cmd, scratch / "torch.json", timeout_s=240)
    except (subprocess.SubprocessError, OSError, ValueError) as exc:
        log.warning("PyTorch reference failed: %s", exc)
        return {"skipped": f"failed: {type(exc).__name__}"}


def rss_mb(server: ServerProcess) -> tuple[float, float]:
    mem = server.memory_kb()
    return mem.get("VmRSS", 0) / 1024, mem.get("VmHWM", 0) / 1024


def measure_level(
    server: ServerProcess,
    requests: list[loadgen.Request],
    concurrency: int,
    args: argparse.Namespace,
    stages: bool = True,
) -> dict[str, Any]:
    """One closed-loop level; ``stages``: read the server's stage histograms around it."""
    run = loadgen.closed_loop(server.url, requests, concurrency, args.duration, args.warmup)
    stages0 = stage_totals(server.url) if stages else {}
    threads0 = server.thread_cpu_s()
    cpu0, t0 = server.cpu_s(), time.perf_counter()
    summary = asyncio.run(run).summary()
    elapsed = time.perf_counter() - t0
    # cores the server kept busy over the whole level (warm-up and tail included)
    cores = (server.cpu_s() - cpu0) / elapsed
    now_mb, _ = rss_mb(server)
    level = {
        "concurrency": concurrency,
        **summary,
        "server_rss_mb": now_mb,
        "server_cpu_cores": cores,
        **cpu_per_request(server.pid, threads0, server.thread_cpu_s(), elapsed, summary),
    }
    if stages:
        level["stages_ms"] = stage_means(stages0, stage_totals(server.url))
    return level


def cpu_per_request(
    pid: int, before: dict[int, float], after: dict[int, float], elapsed_s: float,
    summary: dict[str, Any],
) -> dict[str, float]:  # fmt: skip
    """CPU milliseconds per answered request: the event loop's thread (the main thread, whose
    id is the process's) and all other threads together. Each thread's CPU share over the
    level, divided by the requests answered per second in its window."""
    rate = summary["requests_per_s"]
    if not rate or elapsed_s <= 0:
        return {"loop_cpu_ms_per_request": math.nan, "other_cpu_ms_per_request": math.nan}
    used = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    loop = used.pop(pid, math.nan)
    return {
        "loop_cpu_ms_per_request": 1000 * loop / elapsed_s / rate,
        "other_cpu_ms_per_request": 1000 * sum(used.values()) / elapsed_s / rate,
    }


def stage_totals(url: str) -> dict[str, tuple[float, float]]:
    """(sum in seconds, count) of each request stage, from the server's /metrics."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    totals: dict[str, list[float]] = {}
    for kind, stage, value in _STAGE_LINE.findall(text):
        totals.setdefault(stage, [0.0, 0.0])[0 if kind == "sum" else 1] = float(value)
    return {stage: (v[0], v[1]) for stage, v in totals.items()}


def stage_means(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
) -> dict[str, float]:
    """Mean milliseconds per observation of each stage between two scrapes."""
    means = {}
    for stage in [*STAGES, *(s for s in after if s not in STAGES)]:  # one the server adds too
        s0, n0 = before.get(stage, (0.0, 0.0))
        s1, n1 = after.get(stage, (0.0, 0.0))
        means[stage] = 1000 * (s1 - s0) / (n1 - n0) if n1 > n0 else math.nan
    return means


def overload(
    model: Path, photos: list[tuple[str, bytes]], capacity_rps: float, args: argparse.Namespace,
    scratch: Path, threads: int,
) -> dict[str, Any]:  # fmt: skip
    env = {
        "INTRA_OP_THREADS": str(threads),
        "MAX_QUEUE_SIZE": str(args.overload_queue),
        "PREDICTION_LOG_PATH": str(scratch / "overload.db"),
    }
    server = start_server(model, args.out / "server-overload.log", env=env)
    try:
        host = server.url.removeprefix("http://")
        reqs = [loadgen.predict_request(host, n, d) for n, d in photos]
        rate = args.overload_factor * capacity_rps
        log.info("overload: %.0f requests/s open loop for %.0f s", rate, args.overload_duration)
        run = loadgen.open_loop(server.url, reqs, rate, args.overload_duration, warmup_s=0.5)
        summary = asyncio.run(run).summary()
        alive = server.alive()
        ready = http_status(server.url + "/health/ready")
        _, peak = rss_mb(server)
    finally:
        code = stop_server(server)
    return {
        **summary,
        "offered_rps": rate,
        # time to drain a full queue at the measured capacity: what an accepted request may wait
        "queue_drain_ms": 1000.0 * args.overload_queue / capacity_rps,
        "offered_factor": args.overload_factor,
        "max_queue_size": args.overload_queue,
        "alive_after": alive,
        "ready_status_after": ready,
        "peak_rss_mb": peak,
        "exit_code": code,
    }


def ratio(key: str, value: float) -> dict[str, Any]:
    label, op, target = TARGETS[key]
    met = (value <= target) if op == "<=" else (value >= target) if op == ">=" else (value < target)
    return {"label": label, "value": value, "op": op, "target": target, "met": bool(met)}


def best_batched(run: dict[str, Any]) -> float:
    return max(b["images_per_s"] for b in run["batched"])


def paired(
    worker: InprocessWorker, server: ServerProcess, reference: ServerProcess,
    photos: list[tuple[str, bytes]], args: argparse.Namespace, bar: tqdm,
) -> list[dict[str, Any]]:  # fmt: skip
    """In-process and HTTP back to back, alternating which goes first: one ratio per pair. At
    c=1 the HTTP reference (``loadtest.rawasgi``) runs in the same pair, between the two."""
    host = server.url.removeprefix("http://")
    reqs = [loadgen.predict_request(host, n, d) for n, d in photos]
    ref_reqs = [loadgen.predict_request(reference.url[7:], n, d) for n, d in photos]
    pairs = []
    for i in range(args.pairs):
        steps: list[tuple[str, Any]] = [
            ("inproc_c1", lambda: worker.call("per_image")),
            ("reference_c1", lambda: measure_level(reference, ref_reqs, 1, args, stages=False)),
            ("http_c1", lambda: measure_level(server, reqs, 1, args)),
            ("inproc_batched", lambda: worker.call("batched")),
            ("http_c16", lambda: measure_level(server, reqs, 16, args)),
        ]
        order = steps if i % 2 == 0 else [*steps[2::-1], steps[4], steps[3]]
        got = {}
        for name, fn in order:
            bar.set_postfix_str(f"pair {i + 1} {name}")
            got[name] = fn()
            bar.update()
        pair = {
            "inprocess_p50_ms": got["inproc_c1"]["latency_ms"]["p50"],
            "http_c1_p50_ms": got["http_c1"]["latency_ms"]["p50"],
            "inprocess_best_batched_ips": best_batched(got["inproc_batched"]),
            "http_c16_ips": got["http_c16"]["images_per_s"],
            "http_errors": got["http_c1"]["errors"] + got["http_c16"]["errors"],
            "reference_c1_p50_ms": got["reference_c1"]["latency_ms"]["p50"],
            "reference_errors": got["reference_c1"]["errors"],
            "http_c1_loop_cpu_ms": got["http_c1"]["loop_cpu_ms_per_request"],
            "http_c1_other_cpu_ms": got["http_c1"]["other_cpu_ms_per_request"],
            "reference_loop_cpu_ms": got["reference_c1"]["loop_cpu_ms_per_request"],
            "reference_other_cpu_ms": got["reference_c1"]["other_cpu_ms_per_request"],
        }
        pair["latency_ratio"] = pair["http_c1_p50_ms"] / pair["inprocess_p50_ms"]
        pair["reference_ratio"] = pair["reference_c1_p50_ms"] / pair["inprocess_p50_ms"]
        pair["server_over_reference"] = pair["http_c1_p50_ms"] / pair["reference_c1_p50_ms"]
        pair["throughput_ratio"] = pair["http_c16_ips"] / pair["inprocess_best_batched_ips"]
        log.info(
            "pair %d: p50 %.1f ms HTTP / %.1f ms in-process = %.2f; %.1f img/s HTTP c=16 / "
            "%.1f img/s batched = %.2f", i + 1, pair["http_c1_p50_ms"], pair["inprocess_p50_ms"],
            pair["latency_ratio"], pair["http_c16_ips"], pair["inprocess_best_batched_ips"],
            pair["throughput_ratio"],
        )  # fmt: skip
        pairs.append(pair)
    return pairs


async def interleaved_c1(
    worker: InprocessWorker, server: ServerProcess, reference: ServerProcess,
    photos: list[tuple[str, bytes]], rounds: int, block: int,
) -> dict[str, Any]:  # fmt: skip
    """Concurrency 1, interleaved block by block: ``rounds`` rounds, each with one block of
    ``block`` photos (the same ones) on every target: the floor on each thread policy, the
    server and the HTTP reference, in an order that rotates round by round, with a pause
    between blocks (a spinning pool stops). A block takes about 0.1 s, far less than the few
    seconds in which this VM's speed drifts, so every target sees the same machine; the floor
    is the faster policy's p50 over all its images. The first round warms up and is dropped."""
    if rounds < 2 or block < 1:
        raise ValueError(f"interleaved c=1 needs 2 rounds or more and blocks of 1 or more photos, "
                         f"not {rounds} and {block}")  # fmt: skip
    targets = ["floor spin", "floor sleep", "server", "reference"]
    # per target, one list of request seconds per measured round (a failed request leaves its
    # round shorter, never shifts another round's times into the wrong half)
    by_round: dict[str, list[list[float]]] = {t: [] for t in targets}
    errors = {"server": 0, "reference": 0}
    procs = {"server": server, "reference": reference}
    connections = {
        name: loadgen.Connection("127.0.0.1", int(proc.url.rsplit(":", 1)[1]))
        for name, proc in procs.items()
    }
    requests = {
        name: [loadgen.predict_request(proc.url[7:], n, d) for n, d in photos]
        for name, proc in procs.items()
    }
    try:
        for r in range(rounds + 1):
            start = (r * block) % len(photos)
            shift = r % len(targets)
            for target in targets[shift:] + targets[:shift]:
                await asyncio.sleep(BLOCK_PAUSE_S)
                if target.startswith("floor"):
                    policy = target.split()[1]
                    got = worker.call("images", policy=policy, start=start, count=block)
                    times = got["seconds"]
                else:
                    times = []
                    for k in range(block):
                        req = requests[target][(start + k) % len(photos)]
                        sample = await connections[target].send(req)
                        if sample.ok:
                            times.append(sample.latency)
                        else:
                            errors[target] += 1
                if r:  # round 0 warms the connections and the caches up
                    by_round[target].append(times)
    finally:
        for conn in connections.values():
            await conn.close()
    seconds = {t: [s for times in v for s in times] for t, v in by_round.items()}
    failed = [t for t, v in seconds.items() if len(v) < 2]
    if failed:
        raise RuntimeError(f"interleaved c=1: too few successful requests on {failed}: {errors}")
    summary = {t: summarize_ms(v) for t, v in seconds.items()}
    p50 = {t: s["p50"] for t, s in summary.items()}
    floor_policy = min(("floor spin", "floor sleep"), key=p50.__getitem__)
    floor = p50[floor_policy]
    halves = halves_over_floor(by_round)
    return {
        "rounds": rounds,
        "block": block,
        "images": {t: len(v) for t, v in seconds.items()},
        "p50_ms": p50,
        "p90_ms": {t: s["p90"] for t, s in summary.items()},
        "floor_policy": floor_policy.split()[1],
        "floor_p50_ms": floor,
        "server_over_floor": p50["server"] / floor,
        "reference_over_floor": p50["reference"] / floor,
        "server_over_reference": p50["server"] / p50["reference"],
        "server_over_floor_halves": halves,
        "errors": errors,
    }


def halves_over_floor(by_round: dict[str, list[list[float]]]) -> list[float]:
    """The server's p50 over the faster floor policy's in each half of the measured rounds (how
    steady the figure is). ``by_round``: per target, one list of seconds per round, so a round
    shortened by a failed request still counts in its own half."""
    half = len(by_round["server"]) // 2
    ratios = []
    for part in (slice(0, half), slice(half, None)):
        p50 = {t: statistics.median([s for times in v[part] for s in times] or [math.nan])
               for t, v in by_round.items()}  # fmt: skip
        ratios.append(p50["server"] / min(p50["floor spin"], p50["floor sleep"]))
    return ratios


def label_agreement(
    worker: InprocessWorker, server: ServerProcess, photos: list[tuple[str, bytes]]
) -> dict[str, Any]:
    """Every photo once through the server and once in-process: same label, and how far apart
    the probabilities are (the server must give the floor's answers, not only its speed)."""
    import urllib.request

    expected = worker.call("labels")["labels"]
    metadata = json.loads(urllib.request.urlopen(f"{server.url}/metadata", timeout=30).read())
    classes = metadata["class_names"]
    same, worst, differ = 0, 0.0, []
    for (name, data), (index, probs) in zip(photos, expected, strict=True):
        request = urllib.request.Request(
            f"{server.url}/predict", data=data, headers={"Content-Type": "image/jpeg"}
        )
        answer = json.loads(urllib.request.urlopen(request, timeout=30).read())
        got = [answer["probabilities"][c] for c in classes]
        worst = max(worst, *(abs(a - b) for a, b in zip(got, probs, strict=True)))
        if answer["label"] == classes[index]:
            same += 1
        else:
            differ.append(name)
    return {"photos": len(photos), "same_label": same, "max_abs_prob_diff": worst,
            "differing": differ}  # fmt: skip


def ratios(result: dict[str, Any]) -> dict[str, Any]:
    pairs = result["pairs"]
    server = result["servers"]["fp32 batching"]
    c16 = {lv["concurrency"]: lv for lv in result["http"]["fp32 batching"]}.get(TAIL_LEVEL)
    tail = c16["latency_ms"]["p99"] / c16["latency_ms"]["p50"] if c16 else math.nan
    # c=1: the interleaved blocks where they ran (every target on the same machine state);
    # the pairs' median otherwise (reports written before them)
    interleaved = result.get("interleaved_c1")
    c1 = (
        interleaved["server_over_floor"]
        if interleaved
        else statistics.median(p["latency_ratio"] for p in pairs)
    )
    return {
        "http_p50_c1_over_floor_p50": ratio("http_p50_c1_over_floor_p50", c1),
        "http_c16_over_floor_batched": ratio(
            "http_c16_over_floor_batched", statistics.median(p["throughput_ratio"] for p in pairs)
        ),
        "http_p99_over_p50_c16": ratio("http_p99_over_p50_c16", tail),
        "server_peak_rss_mb": ratio("server_peak_rss_mb", server["peak_rss_mb"]),
        "time_to_ready_s": ratio("time_to_ready_s", server["ready_s"]),
    }


def http_sweep(
    variants: dict[str, tuple[Path, dict[str, str]]],
    photos: list[tuple[str, bytes]],
    args: argparse.Namespace,
    result: dict[str, Any],
    worker: InprocessWorker,
    bar: tqdm,
) -> None:
    servers: dict[str, ServerProcess] = {}
    reference: ServerProcess | None = None
    try:
        for name, (model, env) in variants.items():
            log_path = args.out / f"server-{name.replace(' ', '-')}.log"
            servers[name] = start_server(model, log_path, env=env)
            log.info("%s ready in %.2f s", name, servers[name].ready_s)
        model, env = variants["fp32 batching"]
        reference = start_server(
            model, args.out / "reference.log", env=env, module="loadtest.rawasgi"
        )
        result["http"] = {name: [] for name in variants}
        for c in args.concurrency:
            for name, server in servers.items():
                host = server.url.removeprefix("http://")
                reqs = [loadgen.predict_request(host, n, d) for n, d in photos]
                bar.set_postfix_str(f"{name} c={c}")
                level = measure_level(server, reqs, c, args)
                bar.update()
                result["http"][name].append(level)
                log.info(
                    "%-16s c=%-3d p50 %7.1f ms  p99 %7.1f ms  %6.1f img/s  errors %d",
                    name, c, level["latency_ms"]["p50"], level["latency_ms"]["p99"],
                    level["images_per_s"], level["errors"],
                )  # fmt: skip
        result["pairs"] = paired(worker, servers["fp32 batching"], reference, photos, args, bar)
        bar.set_postfix_str("c=1 interleaved")
        result["interleaved_c1"] = asyncio.run(
            interleaved_c1(
                worker, servers["fp32 batching"], reference, photos,
                args.interleave_rounds, args.interleave_block,
            )
        )  # fmt: skip
        bar.update()
        log.info(
            "c=1 interleaved: p50 %.2f ms server / %.2f ms floor = %.3f (halves %s)",
            result["interleaved_c1"]["p50_ms"]["server"], result["interleaved_c1"]["floor_p50_ms"],
            result["interleaved_c1"]["server_over_floor"],
            ", ".join(f"{x:.3f}" for x in result["interleaved_c1"]["server_over_floor_halves"]),
        )  # fmt: skip
        result["labels"] = label_agreement(worker, servers["fp32 batching"], photos)
        host = servers["fp32 batching"].url
        bar.set_postfix_str("client ceiling")
        ceiling = asyncio.run(
            loadgen.closed_loop(host, [loadgen.get_request(host[7:], "/health/live")], 16, 2.0, 0.5)
        ).summary()
        bar.update()
        result["client_ceiling"] = {"path": "/health/live", "concurrency": 16, **ceiling}
    finally:
        if reference is not None:
            _, peak = rss_mb(reference)
            result["reference"] = {"ready_s": reference.ready_s, "peak_rss_mb": peak,
                                   "exit_code": stop_server(reference)}  # fmt: skip
        result["servers"] = {}
        for name, server in servers.items():
            _, peak = rss_mb(server)
            alive = server.alive()
            code = stop_server(server)
            result["servers"][name] = {
                "ready_s": server.ready_s, "peak_rss_mb": peak, "alive_at_end": alive,
                "exit_code": code, "env": variants[name][1], **batch_curve(server.log),
            }  # fmt: skip


def batch_curve(log_path: Path) -> dict[str, Any]:
    """The batch limit and the warm-up's seconds per image by batch size (ADAPTIVE_BATCH), and
    the start-up's seconds per phase, as the server's ``ready`` log line reports them; empty
    when the line is not there."""
    for line in log_path.read_text(errors="replace").splitlines():
        if '"ready"' not in line:
            continue
        try:
            fields = json.loads(line)
        except ValueError:
            continue
        if fields.get("message") == "ready":
            curve = fields.get("seconds_per_image") or {}
            return {
                "batch_limit": fields.get("batch_limit"),
                "batch_curve": curve,
                "parallel_runs": fields.get("parallel_runs"),
                "parallel_batch_limit": fields.get("parallel_batch_limit"),
                "parallel_batch_curve": fields.get("parallel_seconds_per_image") or {},
                "startup_seconds": fields.get("startup_seconds") or {},
            }
    return {}


def measured(
    worker: InprocessWorker, model: Path, int8: Path | None, photos: list[tuple[str, bytes]],
    args: argparse.Namespace, result: dict[str, Any], scratch: Path, threads: int, bar: tqdm,
) -> None:  # fmt: skip
    """The HTTP part: the servers' sweep with the in-process pairs, then the overload run."""
    base_env = {"INTRA_OP_THREADS": str(threads)}
    variants = {
        "fp32 batching": (model, {**base_env, "PREDICTION_LOG_PATH": str(scratch / "a.db")}),
        "fp32 no batching": (
            model,
            {**base_env, "MAX_BATCH_SIZE": "1", "PREDICTION_LOG_PATH": str(scratch / "b.db")},
        ),
        # the default (INTRA_OP_SPINNING=2) measures spinning against sleeping pool threads
        # while it serves; this variant pins the safe one, to show what the choice is worth
        "fp32 sleeping threads": (
            model,
            {**base_env, "INTRA_OP_SPINNING": "0", "PREDICTION_LOG_PATH": str(scratch / "d.db")},
        ),
    }
    # the default runs batches side by side under load (PARALLEL_RUNS, one core each); this
    # variant runs one batch at a time on every core, to show what parallel runs are worth
    variants["fp32 one run at a time"] = (
        model, {**base_env, "PARALLEL_RUNS": "1", "PREDICTION_LOG_PATH": str(scratch / "e.db")}
    )  # fmt: skip
    if int8:
        variants["int8 batching"] = (
            int8, {**base_env, "PREDICTION_LOG_PATH": str(scratch / "c.db")}
        )  # fmt: skip
    http_sweep(variants, photos, args, result, worker, bar)
    by_c = {lv["concurrency"]: lv for lv in result["http"]["fp32 batching"]}
    capacity = max(lv["requests_per_s"] for lv in by_c.values())
    bar.set_postfix_str("overload")
    result["overload"] = overload(model, photos, capacity, args, scratch, threads)
    bar.update()


def planned_steps(args: argparse.Namespace, int8: bool) -> int:
    """Measurements main() will make, for the progress bar: in-process tables, the HTTP levels
    of every server variant, the pairs' five parts, the interleaved c=1 run, the client ceiling,
    overload, PyTorch."""
    variants = 4 if int8 else 3
    inprocess = 2 + int(int8)
    http = variants * len(args.concurrency) + 5 * args.pairs + 1 + 1 + 1
    return inprocess + http + int(not args.no_torch)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "model.onnx")
    parser.add_argument("--int8-model", type=Path, default=ROOT / "models/int8/model.int8.onnx")
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "models" / "checkpoint.pt")
    parser.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS)
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "bench")
    parser.add_argument("--threads", type=int, default=0, help="0 = the CPUs this process may use")
    parser.add_argument("--concurrency", default="1,2,4,8,16,32")
    parser.add_argument("--duration", type=float, default=6.0, help="measured seconds per level")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--overload-factor", type=float, default=3.0)
    parser.add_argument("--overload-queue", type=int, default=8)
    parser.add_argument("--overload-duration", type=float, default=8.0)
    parser.add_argument("--torch-photos", type=int, default=100)
    parser.add_argument(
        "--pairs", type=int, default=6,
        help="in-process/HTTP pairs for the c=16 ratio (even: both orders alike)",
    )  # fmt: skip
    parser.add_argument(
        "--interleave-rounds", type=int, default=40, help="c=1 rounds, one block per target each"
    )
    parser.add_argument("--interleave-block", type=int, default=10, help="photos per c=1 block")
    parser.add_argument("--no-int8", action="store_true")
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args(argv)
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        parser.error(f"--concurrency {args.concurrency!r}: comma-separated whole numbers")
    if min(args.concurrency) < 1:
        parser.error("--concurrency: every level is at least 1")
    if TAIL_LEVEL not in args.concurrency:
        # found out after minutes of measuring, as a ratio that could not be computed
        parser.error(
            f"--concurrency {','.join(map(str, args.concurrency))}: must include {TAIL_LEVEL}, "
            "the level the p99 / p50 target is measured at"
        )
    if not args.model.is_file():
        parser.error(f"--model {args.model}: no such file (run `make pipeline` first)")
    return args


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args()
    exit_on_sigterm()  # a SIGTERM stops the servers and workers before this process ends
    model = args.model.resolve()
    int8 = args.int8_model.resolve() if args.int8_model.is_file() and not args.no_int8 else None
    threads = args.threads or len(os.sched_getaffinity(0))
    args.out.mkdir(parents=True, exist_ok=True)
    photos = load_photos(args.photos)
    started = time.perf_counter()

    result: dict[str, Any] = {
        "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "settings": {
            "intra_op_threads": threads,
            "photos": len(photos),
            "concurrency": args.concurrency,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "overload_queue": args.overload_queue,
            "overload_factor": args.overload_factor,
        },
        "method": METHOD.replace("\n", " ").replace("  ", " ").strip(),
    }
    # on a terminal, one bar over every planned measurement; log lines print above it
    bar = tqdm(total=planned_steps(args, int8 is not None), desc="bench", unit="step", disable=None)
    with logging_redirect_tqdm(), bar, tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        scratch = Path(tmp)
        # every stage of the run uses one snapshot, even if the pipeline rewrites models/ meanwhile
        model = Path(shutil.copy2(model, scratch / "model.onnx"))
        int8 = Path(shutil.copy2(int8, scratch / "model.int8.onnx")) if int8 else None
        checkpoint = args.checkpoint.resolve()
        if checkpoint.is_file():
            checkpoint = Path(shutil.copy2(checkpoint, scratch / "checkpoint.pt"))
        result["model"] = {**model_info(model), "path": shown(args.model)}
        result["int8_model"] = (
            {**model_info(int8), "path": shown(args.int8_model)} if int8 else None
        )
        if int8:
            int8_worker = InprocessWorker(int8, args.photos, threads)
            try:
                bar.set_postfix_str("in-process int8")
                result["inprocess_int8"] = int8_worker.call("full")
                bar.update()
            finally:
                int8_worker.close()
        worker = InprocessWorker(model, args.photos, threads)
        try:
            bar.set_postfix_str("in-process")
            result["inprocess"] = [worker.call("full")]
            bar.update()
            measured(worker, model, int8, photos, args, result, scratch, threads, bar)
            bar.set_postfix_str("in-process again")
            result["inprocess"].append(worker.call("full"))
            bar.update()
        finally:
            worker.close()
        if not args.no_torch:
            bar.set_postfix_str("PyTorch eager")
            ref = torch_reference(checkpoint, args.photos, threads, args.torch_photos, scratch)
            bar.update()
            if "mlflow_run_id" in ref:
                ref["same_run_as_onnx"] = ref["mlflow_run_id"] == result["model"].get(
                    "mlflow_run_id"
                )
            result["torch_eager"] = ref
    result["ratios"] = ratios(result)
    result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["elapsed_s"] = time.perf_counter() - started
    for path in write_report(result, args.out):
        log.info("wrote %s", path)
    for r in result["ratios"].values():
        log.info("%-50s %8.3f  (target %s %s: %s)", r["label"], r["value"], r["op"], r["target"],
                 "met" if r["met"] else "MISSED")  # fmt: skip
    if any(math.isnan(r["value"]) for r in result["ratios"].values()):
        sys.exit("some ratio could not be computed")


if __name__ == "__main__":
    main()
