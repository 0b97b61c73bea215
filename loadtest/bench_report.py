"""Write a benchmark result as ``latency.json``, ``latency.md`` and PNG plots.

The result is the plain dict that ``loadtest.bench`` builds; every section but ``http`` is
optional, so a partial run (no int8 model, no PyTorch checkpoint) still gives a full report.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

JSON_NAME, MD_NAME = "latency.json", "latency.md"
PLOT_CONCURRENCY, PLOT_BASELINE = "latency_concurrency.png", "latency_baseline.png"
PLOT_STAGES = "latency_stages.png"


def _f(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def inprocess_rows(result: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, in-process result) for every in-process measurement in the run."""
    rows = []
    for i, run in enumerate(result.get("inprocess", []), 1):
        rows.append((f"onnxruntime fp32, round {i}", run))
    if result.get("inprocess_int8"):
        rows.append(("onnxruntime int8", result["inprocess_int8"]))
    torch = result.get("torch_eager") or {}
    if "per_image" in torch:
        label = torch.get("runtime", "torch eager")
        if torch.get("same_run_as_onnx") is False:
            label += " (checkpoint of another training run)"
        rows.append((label, torch))
    return rows


STAGE_NAMES = {
    "head": "accept and parse the request head",
    "body": "read the body",
    "queue": "wait in the batch queue",
    "decode": "decode the image",
    "preprocess": "orient, convert, resize, crop",
    "inference": "onnxruntime run (per batch)",
    "respond": "build and send the answer",
    "log": "metrics and access log (after the answer)",
}


def stage_section(result: dict[str, Any]) -> list[str]:
    """Where a request's time goes at concurrency 1: the server's own per-stage means."""
    levels = {lv["concurrency"]: lv for lv in result.get("http", {}).get("fp32 batching", [])}
    level = levels.get(1)
    if not level or not level.get("stages_ms"):
        return []
    stages = level["stages_ms"]
    rows = [[name, STAGE_NAMES.get(name, ""), _f(ms, 3)] for name, ms in stages.items()]
    inside = sum(v for k, v in stages.items() if k != "log" and not math.isnan(v))
    out = ["## Where the time goes at concurrency 1 (server's own stage timings)", ""]
    out += _table(["stage", "what", "mean ms per request"], rows)
    out.append("")
    out.append(
        f"Stages before the answer add up to {_f(inside, 2)} ms; the client saw "
        f"{_f(level['latency_ms']['p50'], 2)} ms at the median (the rest is the loopback, the "
        "client and the event loop between stages)."
    )
    loop = level.get("loop_cpu_ms_per_request")
    if loop is not None and not math.isnan(loop):
        out.append(
            f"CPU per request at this level: {_f(loop, 2)} ms on the event loop's thread, "
            f"{_f(level['other_cpu_ms_per_request'], 2)} ms on all other threads together "
            "(decode, preprocess and the model's run among them)."
        )
    out.append("")
    return out


def _header(result: dict[str, Any]) -> list[str]:
    """Title, machine, model and settings."""
    m = result.get("machine", {})
    model = result.get("model", {})
    s = result.get("settings", {})
    out = ["# Latency per image: HTTP server vs the bare floor", ""]
    out.append(f"Generated {result.get('generated_at', '?')} by `make bench`.")
    out.append("")
    out.append(
        f"- Machine: {m.get('cpu_model', '?')}, {m.get('cores', '?')} cores "
        f"({m.get('usable_cpus', '?')} usable), {_f(m.get('memory_gib'))} GiB; "
        f"Python {m.get('python', '?')}, onnxruntime {m.get('onnxruntime', '?')}, "
        f"numpy {m.get('numpy', '?')}, Pillow {m.get('pillow', '?')}; load average "
        f"{m.get('loadavg_start', '?')} at start, {m.get('loadavg_end', '?')} at end."
    )
    out.append(
        f"- Model: `{model.get('path', '?')}` ({model.get('model_name', '?')} "
        f"{model.get('model_version', '')}), sha256 `{model.get('sha256', '?')}`."
    )
    if result.get("int8_model"):
        i8 = result["int8_model"]
        out.append(f"- int8 model: `{i8.get('path')}`, sha256 `{i8.get('sha256')}`.")
    out.append(f"- Settings: {json.dumps(s, sort_keys=True)}")
    out.append("")

    return out


def _targets(result: dict[str, Any]) -> list[str]:
    """The serving targets and whether they are met."""
    out: list[str] = []
    ratios = result.get("ratios", {})
    if ratios:
        out += ["## Targets", ""]
        rows = [
            [r["label"], _f(r.get("value"), 3), f"{r['op']} {r['target']}",
             "yes" if r.get("met") else "**no**"]
            for r in ratios.values()
        ]  # fmt: skip
        out += _table(["measure", "value", "target", "met"], rows)
        out.append("")
    agree = result.get("labels")
    if agree:
        out.append(
            f"Correctness: the default server gave the in-process label on {agree['same_label']} "
            f"of {agree['photos']} photos (largest probability difference "
            f"{agree['max_abs_prob_diff']:.2g})"
            + (f"; different on {', '.join(agree['differing'])}." if agree["differing"] else ".")
        )
        out.append("")
    return out


def _interleaved(result: dict[str, Any]) -> list[str]:
    """Concurrency 1, every target in short blocks taking turns: the c=1 target ratio."""
    run = result.get("interleaved_c1")
    if not run:
        return []
    p50, p90, n = run["p50_ms"], run["p90_ms"], run["images"]
    floor = f"floor {run['floor_policy']}"
    what = {
        "floor spin": "bare floor, spinning pool threads",
        "floor sleep": "bare floor, sleeping pool threads",
        "server": "the server (`python -m server`, defaults)",
        "reference": "HTTP reference (raw ASGI, `loadtest.rawasgi`)",
    }
    rows = [
        [what[t] + (" (the floor)" if t == floor else ""), _f(p50[t], 2), _f(p90[t], 2), str(n[t])]
        for t in what
        if t in p50
    ]
    halves = ", ".join(_f(x, 3) for x in run["server_over_floor_halves"])
    out = [
        "## Concurrency 1, interleaved (the c=1 target ratio)",
        "",
        f"{run['rounds']} rounds of one block of {run['block']} photos per target, the order "
        "rotating round by round (see Method).",
        "",
    ]
    out += _table(["target", "p50 ms", "p90 ms", "images"], rows)
    out += [
        "",
        f"Server / floor **{_f(run['server_over_floor'], 3)}** (first and second half of the "
        f"rounds: {halves}); HTTP reference / floor {_f(run['reference_over_floor'], 3)} (what "
        f"HTTP itself costs); server / reference {_f(run['server_over_reference'], 3)} (what the "
        f"server's own request path adds). Errors: server {run['errors']['server']}, reference "
        f"{run['errors']['reference']}.",
        "",
    ]
    return out


def _pairs(result: dict[str, Any]) -> list[str]:
    """The back-to-back pairs the c=16 target ratio comes from (and, before the interleaved
    blocks, the c=1 one)."""
    out: list[str] = []
    pairs = result.get("pairs", [])
    if pairs:
        title = (
            "## Paired measurements (the c=16 target ratio is their median)"
            if result.get("interleaved_c1")
            else "## Paired measurements (the target ratios are their medians)"
        )
        out += [title, ""]
        rows = [
            [str(i), _f(p["inprocess_p50_ms"]), _f(p["http_c1_p50_ms"]), _f(p["latency_ratio"], 3),
             _f(p["inprocess_best_batched_ips"]), _f(p["http_c16_ips"]),
             _f(p["throughput_ratio"], 3), str(p["http_errors"])]
            for i, p in enumerate(pairs, 1)
        ]  # fmt: skip
        out += _table(
            ["pair", "in-process p50 ms", "HTTP c=1 p50 ms", "ratio",
             "in-process best batched img/s", "HTTP c=16 img/s", "ratio", "HTTP errors"],
            rows,
        )  # fmt: skip
        out.append("")
        out += _reference(pairs)

    return out


def _reference(pairs: list[dict[str, Any]]) -> list[str]:
    """The same pairs at c=1 with the HTTP reference: what HTTP costs, what the server adds."""
    if not pairs or "reference_c1_p50_ms" not in pairs[0]:
        return []
    out = ["### The HTTP reference at c=1 (same pairs)", ""]
    out.append(
        "`loadtest.rawasgi`: the floor's work behind a raw ASGI app on the server's uvicorn, "
        "uvloop and httptools (no framework, queue, log or metrics). Reference / floor is what "
        "HTTP costs; server / reference is what the server's own request path adds. CPU ms per "
        "request: the event loop's thread, and every other thread together."
    )
    out.append("")
    rows = [
        [str(i), *(_f(p[k], d) for k, d in _REFERENCE_COLUMNS), str(p["reference_errors"])]
        for i, p in enumerate(pairs, 1)
    ]
    median = [_f(statistics.median(p[k] for p in pairs), d) for k, d in _REFERENCE_COLUMNS]
    rows.append(["median", *median, ""])
    out += _table(
        ["pair", "floor p50 ms", "reference p50 ms", "server p50 ms", "reference / floor",
         "server / reference", "loop CPU ms: reference", "loop CPU ms: server",
         "other threads CPU ms: reference", "other threads CPU ms: server", "reference errors"],
        rows,
    )  # fmt: skip
    out.append("")
    return out


# the reference table's figures, column by column: the pair's key and its decimal places
_REFERENCE_COLUMNS = (
    ("inprocess_p50_ms", 1), ("reference_c1_p50_ms", 1), ("http_c1_p50_ms", 1),
    ("reference_ratio", 3), ("server_over_reference", 3),
    ("reference_loop_cpu_ms", 2), ("http_c1_loop_cpu_ms", 2),
    ("reference_other_cpu_ms", 2), ("http_c1_other_cpu_ms", 2),
)  # fmt: skip


def _floor(result: dict[str, Any]) -> list[str]:
    """The bare floor: decode, preprocess and model in one process."""
    out: list[str] = []
    rows = []
    for label, run in inprocess_rows(result):
        pi = run["per_image"]
        best = max((b["images_per_s"] for b in run.get("batched", [])), default=math.nan)
        by_size = {b["batch_size"]: b["images_per_s"] for b in run.get("batched", [])}
        rows.append(
            [label, _f(pi["latency_ms"]["p50"]), _f(pi["latency_ms"]["p90"]),
             _f(pi["latency_ms"]["p99"]), _f(pi.get("preprocess_ms", {}).get("p50")),
             _f(pi["images_per_s"]),
             ", ".join(f"b{k}: {_f(v)}" for k, v in sorted(by_size.items())) or "-", _f(best)]
        )  # fmt: skip
    if rows:
        out += ["## Bare floor (decode + preprocess + model in one process, no HTTP)", ""]
        out += _table(
            ["runtime", "p50 ms", "p90 ms", "p99 ms", "of which preprocess p50 ms",
             "img/s at batch 1", "img/s batched", "best img/s"],
            rows,
        )  # fmt: skip
        out.append("")

    return out


def _http(result: dict[str, Any]) -> list[str]:
    """Every server variant at every concurrency level."""
    out: list[str] = []
    out += ["## HTTP server (closed loop, one image per request, multipart)", ""]
    rows = []
    for variant, levels in result.get("http", {}).items():
        for lv in levels:
            lat = lv["latency_ms"]
            rows.append(
                [variant, str(lv["concurrency"]), _f(lat["p50"]), _f(lat["p90"]), _f(lat["p99"]),
                 _f(lv["images_per_s"]), str(lv["errors"]), _f(lv.get("server_rss_mb"), 0),
                 _f(100 * lv.get("server_cpu_cores", math.nan), 0),
                 _f(100 * lv.get("client_cpu_share", math.nan), 0)]
            )  # fmt: skip
    out += _table(
        ["server", "concurrency", "p50 ms", "p90 ms", "p99 ms", "images/s", "errors",
         "server RSS MB", "server CPU %", "client CPU %"],
        rows,
    )  # fmt: skip
    out.append("")

    return out


def _phases(seconds: dict[str, float]) -> str:
    """The server's own start-up phases (``server_startup_seconds``), as it logged them."""
    return ", ".join(f"{name} {value:.2f}" for name, value in seconds.items()) or "-"


def _servers(result: dict[str, Any]) -> list[str]:
    """Start-up time, peak memory and exit code of each server process."""
    out: list[str] = []
    servers = result.get("servers", {})
    if servers:
        out += ["## Server processes", ""]
        rows = [
            [
                name,
                _f(sv.get("ready_s"), 2),
                _phases(sv.get("startup_seconds") or {}),
                _f(sv.get("peak_rss_mb"), 0),
                str(sv.get("exit_code")),
            ]
            for name, sv in servers.items()
        ]
        header = ["server", "ready after s", "of which, by start-up phase (s)"]
        out += _table([*header, "peak RSS MB (VmHWM)", "exit code on SIGTERM"], rows)
        out.append("")

    return out


def _batch_curves(result: dict[str, Any]) -> list[str]:
    """Each server's warm-up curve (ms per image by batch size) and the limit it chose."""
    curves = {name: sv for name, sv in result.get("servers", {}).items() if sv.get("batch_curve")}
    if not curves:
        return []
    sizes = sorted({int(n) for sv in curves.values() for n in sv["batch_curve"]})
    out = [
        "## Batch size: the curve each server measured at warm-up (ADAPTIVE_BATCH=1)",
        "",
        "Milliseconds per image of one onnxruntime run (best of 3) by batch size; batches stop",
        'at the smallest size within 5% of the best (the limit). "parallel": the one-thread',
        "session that runs batches side by side under load (PARALLEL_RUNS), timed alone.",
        "",
    ]
    rows = []
    for name, sv in curves.items():
        for label, curve, limit in (
            (name, sv["batch_curve"], sv.get("batch_limit")),
            (f"{name}, parallel", sv.get("parallel_batch_curve"), sv.get("parallel_batch_limit")),
        ):
            if curve:
                ms = [_f(curve.get(str(n), float("nan")) * 1000, 2) for n in sizes]
                rows.append([label, *ms, str(limit)])
    out += _table(["server", *[f"b{n}" for n in sizes], "limit"], rows)
    out.append("")
    return out


def _overload(result: dict[str, Any]) -> list[str]:
    """The overload run and the load generator's own ceiling."""
    out: list[str] = []
    ov = result.get("overload")
    if ov:
        acc, rej = ov["latency_ms"], ov["rejected_latency_ms"]
        out += ["## Overload", ""]
        out.append(
            f"Open loop at {_f(ov['offered_rps'])} requests/s ({_f(ov['offered_factor'])}x the "
            f"measured capacity) for {_f(ov['window_s'])} s, "
            f"MAX_QUEUE_SIZE={ov['max_queue_size']}: a full queue drains in about "
            f"{_f(ov.get('queue_drain_ms'), 0)} ms at that capacity."
        )
        out.append("")
        out += _table(
            ["requests", "answered 200", "503", "other errors", "200 p50 / p99 ms",
             "503 p50 / p99 ms", "images/s", "alive after", "ready after"],
            [[str(ov["requests"]), str(ov["ok"]), str(ov["statuses"].get("503", 0)),
              str(ov["requests"] - ov["ok"] - ov["statuses"].get("503", 0)),
              f"{_f(acc['p50'])} / {_f(acc['p99'])}", f"{_f(rej['p50'])} / {_f(rej['p99'])}",
              _f(ov["images_per_s"]), str(ov.get("alive_after")),
              str(ov.get("ready_status_after"))]],
        )  # fmt: skip
        out.append("")

    if ov and ov.get("connection_errors"):
        out += [f"Connection errors in the overload run: {ov['connection_errors']}.", ""]
    ceiling = result.get("client_ceiling")
    if ceiling:
        out.append(
            f"Load generator ceiling: {_f(ceiling['requests_per_s'], 0)} requests/s on "
            f"`{ceiling['path']}` at concurrency {ceiling['concurrency']} "
            "(same client, same server)."
        )
        out.append("")
    return out


def _tail(result: dict[str, Any]) -> list[str]:
    """Skipped references and the method."""
    out: list[str] = []
    torch = result.get("torch_eager") or {}
    if "skipped" in torch:
        out += [f"PyTorch eager reference skipped: {torch['skipped']}.", ""]
    if result.get("method"):
        out += ["## Method", "", result["method"], ""]
    return out


def markdown(result: dict[str, Any]) -> str:
    sections = (
        _header, _targets, _interleaved, _pairs, stage_section, _floor, _http, _servers,
        _batch_curves, _overload, _tail,
    )  # fmt: skip
    return "\n".join(line for section in sections for line in section(result))


def plot_concurrency(result: dict[str, Any], path: Path) -> None:
    fig, (ax_lat, ax_tput) = plt.subplots(1, 2, figsize=(11, 4.2))
    for variant, levels in result.get("http", {}).items():
        conc = [lv["concurrency"] for lv in levels]
        (line,) = ax_lat.plot(conc, [lv["latency_ms"]["p50"] for lv in levels], marker="o",
                              label=f"{variant} p50")  # fmt: skip
        ax_lat.plot(conc, [lv["latency_ms"]["p99"] for lv in levels], marker="x", linestyle="--",
                    color=line.get_color(), label=f"{variant} p99")  # fmt: skip
        ax_tput.plot(conc, [lv["images_per_s"] for lv in levels], marker="o", label=variant)
    inproc = result.get("inprocess", [])
    if inproc:
        p50 = min(r["per_image"]["latency_ms"]["p50"] for r in inproc)
        best = max(
            b["images_per_s"] for r in inproc for b in r.get("batched", []) or [{"images_per_s": 0}]
        )
        ax_lat.axhline(p50, color="grey", linestyle=":", label="in-process p50 (batch 1)")
        ax_tput.axhline(best, color="grey", linestyle=":", label="in-process best batched")
    for ax in (ax_lat, ax_tput):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent connections")
        ax.grid(True, alpha=0.3)
    ax_lat.set_yscale("log")
    ax_lat.set_ylabel("latency per request, ms")
    ax_tput.set_ylabel("images / s")
    ax_tput.set_ylim(bottom=0)  # differences of a few percent must not look like a cliff
    ax_lat.legend(fontsize=7)
    ax_tput.legend(fontsize=7)
    fig.suptitle("HTTP server: latency and throughput vs concurrency")
    fig.tight_layout()
    _save(fig, path)


def _save(fig: Any, path: Path) -> None:
    """PNG for the report, and an SVG twin: vector, diffable, fit to commit beside the docs."""
    fig.savefig(path, dpi=110)
    fig.savefig(path.with_suffix(".svg"))
    plt.close(fig)


def plot_baseline(result: dict[str, Any], path: Path) -> None:
    labels, p50, p99 = [], [], []
    for label, run in inprocess_rows(result):
        labels.append(label)
        p50.append(run["per_image"]["latency_ms"]["p50"])
        p99.append(run["per_image"]["latency_ms"]["p99"])
    for variant, levels in result.get("http", {}).items():
        c1 = next((lv for lv in levels if lv["concurrency"] == 1), None)
        if c1:
            labels.append(f"HTTP {variant}, c=1")
            p50.append(c1["latency_ms"]["p50"])
            p99.append(c1["latency_ms"]["p99"])
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(labels) + 1.5))
    y = range(len(labels))
    ax.barh([i + 0.2 for i in y], p50, height=0.4, label="p50")
    ax.barh([i - 0.2 for i in y], p99, height=0.4, label="p99")
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms per image (decode + preprocess + model), one at a time")
    ax.legend()
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def stage_bars(result: dict[str, Any]) -> dict[str, list[tuple[str, float]]]:
    """Mean ms per image by part: the bare floor's and the HTTP server's at c=1 (its stages,
    then what the client saw beyond them); empty where the run lacks either."""
    levels = {lv["concurrency"]: lv for lv in result.get("http", {}).get("fp32 batching", [])}
    level = levels.get(1)
    floor = result.get("inprocess") or []
    if not level or not level.get("stages_ms") or not floor:
        return {}
    per_image = floor[0]["per_image"]
    if "inference_ms" not in per_image:
        return {}
    infer = per_image["inference_ms"]["mean"]
    bars = {"bare floor": [("decode + preprocess", per_image["latency_ms"]["mean"] - infer)]}
    bars["bare floor"].append(("inference", infer))
    measured = level["stages_ms"]
    stages = [  # in the order a request goes through them; "log" comes after the answer
        (k, measured[k])
        for k in STAGE_NAMES
        if k != "log" and not math.isnan(measured.get(k, math.nan))
    ]
    rest = level["latency_ms"]["p50"] - sum(v for _, v in stages)
    bars["HTTP server, c=1"] = [*stages, ("loopback, client, event loop", max(rest, 0.0))]
    return bars


def plot_stages(result: dict[str, Any], path: Path) -> bool:
    """Stacked bars of where a lone image's time goes, floor against server; False if no data."""
    bars = stage_bars(result)
    if not bars:
        return False
    fig, ax = plt.subplots(figsize=(9, 2.6))
    colours: dict[str, Any] = {}
    cmap = plt.get_cmap("tab10")
    for row, parts in enumerate(bars.values()):
        left = 0.0
        for name, ms in parts:
            colour = colours.setdefault(name, cmap(len(colours) % 10))
            ax.barh(row, ms, left=left, color=colour, label=name)
            left += ms
    handles, names = ax.get_legend_handles_labels()
    unique = dict(zip(names, handles, strict=True))  # one legend entry per part
    ax.legend(unique.values(), unique.keys(), fontsize=7, ncol=5, loc="upper center",
              bbox_to_anchor=(0.5, -0.3))  # fmt: skip
    ax.set_yticks(range(len(bars)), list(bars), fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms per image, one at a time (the server's last part: client p50 minus stages)")
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    return True


def write_report(result: dict[str, Any], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [
        out_dir / JSON_NAME,
        out_dir / MD_NAME,
        out_dir / PLOT_CONCURRENCY,
        out_dir / PLOT_BASELINE,
    ]
    paths[0].write_text(json.dumps(result, indent=2, sort_keys=True, default=str))
    paths[1].write_text(markdown(result))
    plot_concurrency(result, paths[2])
    plot_baseline(result, paths[3])
    if plot_stages(result, out_dir / PLOT_STAGES):
        paths.append(out_dir / PLOT_STAGES)
    return paths
