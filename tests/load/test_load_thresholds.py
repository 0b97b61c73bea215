"""The pass/fail logic of a load run, on synthetic stats."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest

from loadtest.thresholds import (
    DEFAULT_PATH,
    EndpointStats,
    check,
    load_thresholds,
    parse_thresholds,
    report,
    stats_from_csv,
)

pytestmark = pytest.mark.load

BUDGETS = {
    "max_fail_ratio": 0.01,
    "min_requests": 100,
    "groups": {
        "/predict": {"p95_ms": 500, "min_requests": 50},
        "/metadata": {"p95_ms": 100},
    },
}


def clean_run() -> list[EndpointStats]:
    return [EndpointStats("/predict", 200, 1, 320.0), EndpointStats("/metadata", 20, 0, 12.0)]


def test_a_clean_run_passes() -> None:
    assert check(clean_run(), parse_thresholds(BUDGETS)) == []


def test_too_many_failures_breaches_the_fail_ratio() -> None:
    stats = [EndpointStats("/predict", 200, 5, 320.0), EndpointStats("/metadata", 20, 0, 12.0)]
    breaches = check(stats, parse_thresholds(BUDGETS))
    assert [b.threshold for b in breaches] == ["max_fail_ratio"]
    assert "5/220" in breaches[0].message


def test_a_slow_group_breaches_its_p95_budget_and_is_named() -> None:
    stats = [EndpointStats("/predict", 200, 0, 320.0), EndpointStats("/metadata", 20, 0, 150.0)]
    breaches = check(stats, parse_thresholds(BUDGETS))
    assert [b.threshold for b in breaches] == ["groups./metadata.p95_ms"]
    assert "150" in breaches[0].message
    assert "100" in breaches[0].message


def test_too_few_requests_breach_both_total_and_group_minimums() -> None:
    stats = [EndpointStats("/predict", 40, 0, 320.0), EndpointStats("/metadata", 20, 0, 12.0)]
    names = {b.threshold for b in check(stats, parse_thresholds(BUDGETS))}
    assert names == {"min_requests", "groups./predict.min_requests"}


def test_a_group_that_never_ran_breaches() -> None:
    stats = [EndpointStats("/predict", 200, 0, 320.0)]
    names = [b.threshold for b in check(stats, parse_thresholds(BUDGETS))]
    assert "groups./metadata.min_requests" in names


def test_report_gives_the_exit_code() -> None:
    th = parse_thresholds(BUDGETS)
    assert report(check(clean_run(), th)) == 0
    assert report(check([EndpointStats("/predict", 1, 1, 9e9)], th)) == 1


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ({**BUDGETS, "max_fail_rate": 0.1}, "max_fail_rate"),
        ({**BUDGETS, "max_fail_ratio": "0.1"}, "max_fail_ratio"),
        ({**BUDGETS, "max_fail_ratio": 2}, "max_fail_ratio"),
        ({**BUDGETS, "min_requests": True}, "min_requests"),
        ({**BUDGETS, "groups": {"/p": {"p95": 1}}}, "p95"),
        ({**BUDGETS, "groups": {"/p": {"min_requests": 1}}}, "p95_ms"),
        ({"min_requests": 1}, "max_fail_ratio"),
    ],
)
def test_bad_config_is_rejected_naming_the_key(raw: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        parse_thresholds(raw)


def test_the_shipped_config_covers_every_locust_request_name() -> None:
    th = load_thresholds(DEFAULT_PATH)
    source = (DEFAULT_PATH.parent / "locustfile.py").read_text()
    for name in th.groups:
        assert f'name="{name}"' in source
    with DEFAULT_PATH.open("rb") as fh:
        assert tomllib.load(fh)["max_fail_ratio"] == 0.0  # CI demands zero failures


def test_stats_from_locust_csv(tmp_path: Path) -> None:
    csv_path = tmp_path / "locust_stats.csv"
    csv_path.write_text(
        "Type,Name,Request Count,Failure Count,Median Response Time,95%,99%\n"
        "POST,/predict,200,3,80,410,900\n"
        "GET,/metadata,0,0,0,N/A,N/A\n"
        ",Aggregated,200,3,80,410,900\n"
    )
    stats = stats_from_csv(csv_path)
    assert stats[0] == EndpointStats("/predict", 200, 3, 410.0)
    assert stats[1].requests == 0
    assert math.isnan(stats[1].p95_ms)
    names = {b.threshold for b in check(stats, parse_thresholds(BUDGETS))}
    assert "groups./metadata.min_requests" in names
    assert "max_fail_ratio" in names


def test_min_accuracy_is_judged_on_the_labels_and_never_passes_empty() -> None:
    from loadtest.thresholds import Labels

    budgets = parse_thresholds({**BUDGETS, "min_accuracy": 0.9})
    assert check(clean_run(), budgets, Labels(right=95, wrong=5)) == []
    (wrong,) = check(clean_run(), budgets, Labels(right=1, wrong=99))
    assert wrong.threshold == "min_accuracy"
    assert "1 of 100 labelled photos predicted right (0.0100 < 0.9)" in wrong.message
    (empty,) = check(clean_run(), budgets, Labels(right=0, wrong=0))
    assert "no prediction of a labelled photo was checked" in empty.message
    assert check(clean_run(), budgets) == []  # a CSV: no labels known, not judged
    with pytest.raises(ValueError, match="min_accuracy is a ratio"):
        parse_thresholds({**BUDGETS, "min_accuracy": 90})
    assert load_thresholds(DEFAULT_PATH).min_accuracy == 0.9


def test_the_final_json_rechecks_exactly_what_was_judged(tmp_path: Path) -> None:
    from loadtest.thresholds import Breach, Labels, read_final, write_final

    stats = [EndpointStats("/predict", 200, 3, 320.0), EndpointStats("/metadata", 0, 0, math.nan)]
    labels = Labels(right=150, wrong=2)
    path = tmp_path / "locust_final.json"
    write_final(path, stats, labels, [Breach("max_fail_ratio", "3/200 requests failed")])
    back, back_labels = read_final(path)
    assert back_labels == labels
    assert back[0] == stats[0]
    assert back[1].name == "/metadata"
    assert math.isnan(back[1].p95_ms)
