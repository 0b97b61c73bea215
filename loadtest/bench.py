"""``make bench``: latency per image of the HTTP server against in-process inference.

    python -m loadtest.bench --model models/model.onnx --out reports/bench

Runs, in this order, in one go so that every figure shares the machine's state of the moment:
1. the in-process baseline (``loadtest.inprocess`` in .venv-serve), fp32 and int8 if present;
2. the servers (``python -m server`` in .venv-serve): batching on (defaults), batching off
   (MAX_BATCH_SIZE=1) and int8, all started up front; then for each concurrency level each server
   in turn, so a noisy neighbour slows all variants alike (interleaved);
3. an overload run: a fresh server with a small MAX_QUEUE_SIZE, offered more than it can do;
4. the in-process baseline again (the HTTP figures are bracketed by two baselines);
5. PyTorch eager on the training checkpoint (``loadtest.torch_ref`` in .venv-train), if present.
The load generator (``loadtest.loadgen``) runs in this process, apart from the server's.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from loadtest import loadgen
from loadtest.report import write_report
from loadtest.serverproc import (
    ROOT,
    SERVE_PYTHON,
    ServerProcess,
    http_status,
    start_server,
    stop_server,
)

log = logging.getLogger(__name__)

TRAIN_PYTHON = ROOT / ".venv-train" / "bin" / "python"
DEFAULT_PHOTOS = ROOT.parent / "shared" / "data" / "catsdogs" / "originals"

TARGETS = {  # issue 4's acceptance figures
    "http_p50_c1_over_inprocess_p50": ("HTTP p50 at c=1 / in-process p50", "<=", 1.25),
    "http_c16_over_best_batched": ("HTTP images/s at c=16 / best in-process batched", ">=", 0.85),
    "server_peak_rss_mb": ("server peak RSS under load, MB", "<", 400.0),
    "time_to_ready_s": ("time from start to ready, s", "<", 3.0),
}

METHOD = """\
All figures come from one `make bench` run on the machine above; the variants are interleaved
(for each concurrency level every server takes its turn) and the HTTP sweep is bracketed by two
in-process rounds, so drift of the shared machine hits all alike.
In-process: the server's own `preprocess_bytes` (decode, EXIF, resize, centre crop) and its own
`load_model` session (same session options and intra-op threads as the server), one photo at a time
at batch 1 over all photos, then all photos in batches of 8, 16 and 32 (decode included).
HTTP: the server as users run it (`python -m server`, its default settings but the ones named),
driven by an asyncio HTTP/1.1 client in a separate process with keep-alive connections and
prebuilt multipart `POST /predict` requests cycling over the same photos; closed loop (each
connection sends its next request when the last is answered), a warm-up second discarded, then
a fixed window. Latency is from the first byte sent to the last byte received; only 200 answers
whose body is a prediction count as successes; images/s counts successes in the window.
The client's own CPU share is reported: on 2 cores it competes with the server, so HTTP figures
include the cost of the client, as a co-located client would.
Ratios are conservative: HTTP p50 at c=1 is divided by the *lower* in-process p50 of the two
rounds, HTTP throughput at c=16 by the *highest* in-process batched throughput of any round or size.
Memory is the server's VmHWM (peak resident set) from /proc after the whole sweep up to c=32.
Time to ready is from spawning the process to the first 200 of `/health/ready` (polled every 20 ms).
Overload: a fresh server with a small MAX_QUEUE_SIZE gets an open-loop request rate a few times
its measured capacity; accepted requests must stay bounded and the rest must be refused fast (503).
"""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
        "'quantization')}))"
    )
    meta = json.loads(subprocess.check_output([str(SERVE_PYTHON), "-c", probe, str(path)]))
    return {"path": str(path), "sha256": sha256(path), "bytes": path.stat().st_size, **meta}


def run_json(cmd: list[str], out: Path, timeout_s: float) -> dict[str, Any]:
    log.info("running %s", " ".join(cmd[1:4]))
    subprocess.run([*cmd, "--out", str(out)], cwd=ROOT, check=True, timeout=timeout_s)
    return json.loads(out.read_text())


def inprocess(model: Path, photos: Path, threads: int, scratch: Path, tag: str) -> dict[str, Any]:
    cmd = [str(SERVE_PYTHON), "-m", "loadtest.inprocess", "--model", str(model)]
    cmd += ["--photos", str(photos), "--threads", str(threads)]
    return run_json(cmd, scratch / f"inprocess-{tag}.json", timeout_s=180)


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
) -> dict[str, Any]:
    run = loadgen.closed_loop(server.url, requests, concurrency, args.duration, args.warmup)
    cpu0, t0 = server.cpu_s(), time.perf_counter()
    summary = asyncio.run(run).summary()
    # cores the server kept busy over the whole level (warm-up and tail included)
    cores = (server.cpu_s() - cpu0) / (time.perf_counter() - t0)
    now_mb, _ = rss_mb(server)
    return {
        "concurrency": concurrency,
        **summary,
        "server_rss_mb": now_mb,
        "server_cpu_cores": cores,
    }


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


def ratios(result: dict[str, Any]) -> dict[str, Any]:
    base = result["inprocess"]
    http = result["http"]["fp32 batching"]
    by_c = {lv["concurrency"]: lv for lv in http}
    p50_inproc = min(r["per_image"]["latency_ms"]["p50"] for r in base)
    best_batched = max(b["images_per_s"] for r in base for b in r["batched"])
    out = {}
    if 1 in by_c:
        out["http_p50_c1_over_inprocess_p50"] = ratio(
            "http_p50_c1_over_inprocess_p50", by_c[1]["latency_ms"]["p50"] / p50_inproc
        )
    if 16 in by_c:
        out["http_c16_over_best_batched"] = ratio(
            "http_c16_over_best_batched", by_c[16]["images_per_s"] / best_batched
        )
    server = result["servers"]["fp32 batching"]
    out["server_peak_rss_mb"] = ratio("server_peak_rss_mb", server["peak_rss_mb"])
    out["time_to_ready_s"] = ratio("time_to_ready_s", server["ready_s"])
    return out


def http_sweep(
    variants: dict[str, tuple[Path, dict[str, str]]],
    photos: list[tuple[str, bytes]],
    args: argparse.Namespace,
    result: dict[str, Any],
) -> None:
    servers: dict[str, ServerProcess] = {}
    try:
        for name, (model, env) in variants.items():
            log_path = args.out / f"server-{name.replace(' ', '-')}.log"
            servers[name] = start_server(model, log_path, env=env)
            log.info("%s ready in %.2f s", name, servers[name].ready_s)
        result["http"] = {name: [] for name in variants}
        for c in args.concurrency:
            for name, server in servers.items():
                host = server.url.removeprefix("http://")
                reqs = [loadgen.predict_request(host, n, d) for n, d in photos]
                level = measure_level(server, reqs, c, args)
                result["http"][name].append(level)
                log.info(
                    "%-16s c=%-3d p50 %7.1f ms  p99 %7.1f ms  %6.1f img/s  errors %d",
                    name, c, level["latency_ms"]["p50"], level["latency_ms"]["p99"],
                    level["images_per_s"], level["errors"],
                )  # fmt: skip
        host = servers["fp32 batching"].url
        ceiling = asyncio.run(
            loadgen.closed_loop(host, [loadgen.get_request(host[7:], "/health/live")], 16, 2.0, 0.5)
        ).summary()
        result["client_ceiling"] = {"path": "/health/live", "concurrency": 16, **ceiling}
    finally:
        result["servers"] = {}
        for name, server in servers.items():
            _, peak = rss_mb(server)
            alive = server.alive()
            code = stop_server(server)
            result["servers"][name] = {
                "ready_s": server.ready_s, "peak_rss_mb": peak, "alive_at_end": alive,
                "exit_code": code, "env": variants[name][1],
            }  # fmt: skip


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
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
    parser.add_argument("--no-int8", action="store_true")
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if not args.model.is_file():
        parser.error(f"--model {args.model}: no such file (run `make pipeline` first)")
    model = args.model.resolve()
    int8 = args.int8_model.resolve() if args.int8_model.is_file() and not args.no_int8 else None
    threads = args.threads or len(os.sched_getaffinity(0))
    args.out.mkdir(parents=True, exist_ok=True)
    photos = loadgen.load_photos(args.photos)
    started = time.perf_counter()

    result: dict[str, Any] = {
        "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "model": model_info(model),
        "int8_model": model_info(int8) if int8 else None,
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
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        scratch = Path(tmp)
        result["inprocess"] = [inprocess(model, args.photos, threads, scratch, "fp32-1")]
        if int8:
            result["inprocess_int8"] = inprocess(int8, args.photos, threads, scratch, "int8")
        base_env = {"INTRA_OP_THREADS": str(threads)}
        variants = {
            "fp32 batching": (model, {**base_env, "PREDICTION_LOG_PATH": str(scratch / "a.db")}),
            "fp32 no batching": (
                model,
                {**base_env, "MAX_BATCH_SIZE": "1", "PREDICTION_LOG_PATH": str(scratch / "b.db")},
            ),
        }
        if int8:
            variants["int8 batching"] = (
                int8, {**base_env, "PREDICTION_LOG_PATH": str(scratch / "c.db")}
            )  # fmt: skip
        http_sweep(variants, photos, args, result)
        by_c = {lv["concurrency"]: lv for lv in result["http"]["fp32 batching"]}
        capacity = max(lv["requests_per_s"] for lv in by_c.values())
        result["overload"] = overload(model, photos, capacity, args, scratch, threads)
        result["inprocess"].append(inprocess(model, args.photos, threads, scratch, "fp32-2"))
        if not args.no_torch:
            result["torch_eager"] = torch_reference(
                args.checkpoint.resolve(), args.photos, threads, args.torch_photos, scratch
            )
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
