"""Pass/fail budgets for a load run: fail ratio, request count and p95 latency per endpoint group.

The budgets live in ``loadtest/thresholds.toml``. :func:`check` is pure (stats in, breaches out),
so the locustfile applies it when the run ends and the tests feed it synthetic stats.
A CSV checker covers runs made elsewhere:

    python -m loadtest.thresholds reports/load/locust_stats.csv
"""

from __future__ import annotations

import argparse
import csv
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
    _reject_unknown(raw, {"max_fail_ratio", "min_requests", "groups"}, "thresholds: ")
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
    return Thresholds(max_fail_ratio, _number(raw, "min_requests", "thresholds: ", int), groups)


def load_thresholds(path: Path = DEFAULT_PATH) -> Thresholds:
    with path.open("rb") as fh:
        return parse_thresholds(tomllib.load(fh))


def check(stats: Iterable[EndpointStats], th: Thresholds) -> list[Breach]:
    """Every threshold the run breached; an empty list means the run passed."""
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
    parser = argparse.ArgumentParser(description="Check a locust stats CSV against thresholds.")
    parser.add_argument("stats_csv", type=Path)
    parser.add_argument("--thresholds", type=Path, default=DEFAULT_PATH)
    args = parser.parse_args()
    sys.exit(report(check(stats_from_csv(args.stats_csv), load_thresholds(args.thresholds))))


if __name__ == "__main__":
    main()
