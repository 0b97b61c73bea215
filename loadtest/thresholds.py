"""Pass/fail budgets for a load run: fail ratio, request count and p95 latency per endpoint group.

The budgets live in ``loadtest/thresholds.toml``. :func:`check` is pure (stats in, breaches out),
so the locustfile applies it when the run ends and the tests feed it synthetic stats. The run
writes what it judged to ``<csv prefix>_final.json`` (``reports/load/locust_final.json``), which
re-checks a finished run exactly:

    python -m loadtest.thresholds reports/load/locust_final.json
    python -m loadtest.thresholds reports/load/locust_stats.csv   # a run made elsewhere

locust writes its stats CSV once a second and not at shutdown, so a CSV can miss the run's last
second (a failure there included), and it has no labels: ``min_accuracy`` is not checked on it.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import sys
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_PATH = Path(__file__).with_name("thresholds.toml")


@dataclass(frozen=True)
class GroupBudget:
    p95_ms: float
    min_requests: int = 0


@dataclass(frozen=True)
class Thresholds:
    max_fail_ratio: float
    min_requests: int
    groups: dict[str, GroupBudget] = field(default_factory=dict)
    # share of labelled photos (LOAD_PHOTOS/<class>/...) predicted right; None: not checked
    min_accuracy: float | None = None


@dataclass(frozen=True)
class Labels:
    """Predictions of labelled photos the run checked against their folder's class."""

    right: int
    wrong: int


@dataclass(frozen=True)
class EndpointStats:
    """What a run measured for one request name."""

    name: str
    requests: int
    failures: int
    p95_ms: float


@dataclass(frozen=True)
class Breach:
    threshold: str  # e.g. "groups./predict/batch.p95_ms"
    message: str


def _number(raw: dict[str, Any], key: str, where: str, kind: type) -> Any:
    value = raw[key]
    # bool is an int in Python; a budget of `true` is a typo, not a number
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}{key}: expected a number, got {value!r}")
    if kind is int and not float(value).is_integer():
        raise ValueError(f"{where}{key}: expected an integer, got {value!r}")
    if value < 0:
        raise ValueError(f"{where}{key}: must be >= 0, got {value!r}")
    return kind(value)


def _reject_unknown(raw: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{where}unknown key(s) {unknown}")


def parse_thresholds(raw: dict[str, Any]) -> Thresholds:
    """A decoded TOML document -> :class:`Thresholds`; unknown or mistyped keys raise."""
    _reject_unknown(
        raw, {"max_fail_ratio", "min_requests", "min_accuracy", "groups"}, "thresholds: "
    )
    for key in ("max_fail_ratio", "min_requests"):
        if key not in raw:
            raise ValueError(f"thresholds: missing key {key!r}")
    max_fail_ratio = _number(raw, "max_fail_ratio", "thresholds: ", float)
    if max_fail_ratio > 1:
        raise ValueError("thresholds: max_fail_ratio is a ratio in [0, 1]")
    groups: dict[str, GroupBudget] = {}
    for name, table in raw.get("groups", {}).items():
        where = f"thresholds: groups.{name!r}."
        if not isinstance(table, dict):
            raise ValueError(f"{where[:-1]} must be a table")
        _reject_unknown(table, {"p95_ms", "min_requests"}, where)
        if "p95_ms" not in table:
            raise ValueError(f"{where}p95_ms is missing")
        groups[name] = GroupBudget(
            p95_ms=_number(table, "p95_ms", where, float),
            min_requests=_number(table, "min_requests", where, int)
            if "min_requests" in table
            else 0,
        )
    min_accuracy = None
    if "min_accuracy" in raw:
        min_accuracy = _number(raw, "min_accuracy", "thresholds: ", float)
        if min_accuracy > 1:
            raise ValueError("thresholds: min_accuracy is a ratio in [0, 1]")
    return Thresholds(
        max_fail_ratio,
        _number(raw, "min_requests", "thresholds: ", int),
        groups,
        min_accuracy,
    )


def load_thresholds(path: Path = DEFAULT_PATH) -> Thresholds:
    with path.open("rb") as fh:
        return parse_thresholds(tomllib.load(fh))


def check(
    stats: Iterable[EndpointStats], th: Thresholds, labels: Labels | None = None
) -> list[Breach]:
    """Every threshold the run breached; an empty list means the run passed. ``labels``: the
    run's checked labels (None: unknown, as in a CSV, and ``min_accuracy`` is skipped)."""
    by_name = {s.name: s for s in stats}
    total = sum(s.requests for s in by_name.values())
    failed = sum(s.failures for s in by_name.values())
    breaches: list[Breach] = []
    if total < th.min_requests:
        breaches.append(
            Breach("min_requests", f"the run made {total} requests, fewer than {th.min_requests}")
        )
    ratio = failed / total if total else 0.0
    if ratio > th.max_fail_ratio:
        breaches.append(
            Breach(
                "max_fail_ratio",
                f"{failed}/{total} requests failed (ratio {ratio:.4f} > {th.max_fail_ratio})",
            )
        )
    if th.min_accuracy is not None and labels is not None:
        checked = labels.right + labels.wrong
        if checked == 0:
            breaches.append(
                Breach(
                    "min_accuracy",
                    "no prediction of a labelled photo was checked (LOAD_PHOTOS/<class>/...)",
                )
            )
        elif labels.right / checked < th.min_accuracy:
            breaches.append(
                Breach(
                    "min_accuracy",
                    f"{labels.right} of {checked} labelled photos predicted right "
                    f"({labels.right / checked:.4f} < {th.min_accuracy})",
                )
            )
    for name, budget in th.groups.items():
        s = by_name.get(name)
        if s is None or s.requests == 0:
            breaches.append(Breach(f"groups.{name}.min_requests", f"{name}: no request was made"))
            continue
        if s.requests < budget.min_requests:
            breaches.append(
                Breach(
                    f"groups.{name}.min_requests",
                    f"{name}: {s.requests} requests, fewer than {budget.min_requests}",
                )
            )
        if math.isnan(s.p95_ms) or s.p95_ms > budget.p95_ms:
            breaches.append(
                Breach(
                    f"groups.{name}.p95_ms",
                    f"{name}: p95 {s.p95_ms:.0f} ms over the budget of {budget.p95_ms:.0f} ms",
                )
            )
    return breaches


def stats_from_locust(stats: Any) -> list[EndpointStats]:
    """locust's ``environment.stats`` -> one :class:`EndpointStats` per request name."""
    out: dict[str, EndpointStats] = {}
    for entry in stats.entries.values():
        p95 = (
            float(entry.get_response_time_percentile(0.95) or 0.0)
            if entry.num_requests
            else math.nan
        )
        prev = out.get(entry.name)
        if prev is not None:  # same name, another method: merge counts, keep the worse p95
            p95 = max(p95, prev.p95_ms)
            entry_requests = prev.requests + entry.num_requests
            entry_failures = prev.failures + entry.num_failures
        else:
            entry_requests, entry_failures = entry.num_requests, entry.num_failures
        out[entry.name] = EndpointStats(entry.name, entry_requests, entry_failures, p95)
    return list(out.values())


def stats_from_csv(path: Path) -> list[EndpointStats]:
    """locust's ``<prefix>_stats.csv`` -> one :class:`EndpointStats` per row (not Aggregated)."""
    out: list[EndpointStats] = []
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            if row["Name"] == "Aggregated":
                continue
            requests = int(row["Request Count"])
            p95 = float(row["95%"]) if requests and row["95%"] not in ("", "N/A") else math.nan
            out.append(EndpointStats(row["Name"], requests, int(row["Failure Count"]), p95))
    return out


def write_final(
    path: Path, stats: list[EndpointStats], labels: Labels, breaches: list[Breach]
) -> None:
    """What the run's verdict was made of, for :func:`read_final` (a re-check) and people."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "endpoints": [dataclasses.asdict(s) for s in stats],
        "labels": dataclasses.asdict(labels),
        "breaches": [dataclasses.asdict(b) for b in breaches],
    }
    path.write_text(json.dumps(data, indent=2, allow_nan=True) + "\n")


def read_final(path: Path) -> tuple[list[EndpointStats], Labels]:
    data = json.loads(path.read_text())
    stats = [EndpointStats(**e) for e in data["endpoints"]]
    return stats, Labels(**data["labels"])


def report(breaches: list[Breach]) -> int:
    """Log the verdict; the exit code for it."""
    if not breaches:
        log.info("load thresholds: all met")
        return 0
    for b in breaches:
        log.error("load threshold breached [%s]: %s", b.threshold, b.message)
    return 1


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    parser = argparse.ArgumentParser(description="Check a finished load run against thresholds.")
    parser.add_argument("stats", type=Path, help="<prefix>_final.json, or a locust stats CSV")
    parser.add_argument("--thresholds", type=Path, default=DEFAULT_PATH)
    args = parser.parse_args()
    budgets = load_thresholds(args.thresholds)
    if args.stats.suffix == ".json":
        stats, labels = read_final(args.stats)
        sys.exit(report(check(stats, budgets, labels)))
    log.warning(
        "%s: locust's CSV can miss the run's last second, and has no labels (min_accuracy not "
        "checked); the run's _final.json has both",
        args.stats,
    )
    sys.exit(report(check(stats_from_csv(args.stats), budgets)))


if __name__ == "__main__":
    main()
