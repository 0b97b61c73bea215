"""Drift reference statistics and scores (catsdogs.drift), numpy only."""

import json

import numpy as np
import pytest

from catsdogs import drift

pytestmark = pytest.mark.serve


def _reference(rng: np.random.Generator, n: int = 2000) -> dict:
    p_cat = rng.beta(8, 1, size=n)  # confident, like a good model on validation
    flip = rng.random(n) < 0.5
    probs = np.where(flip[:, None], np.c_[p_cat, 1 - p_cat], np.c_[1 - p_cat, p_cat])
    return drift.build_reference_stats(
        class_names=["cat", "dog"],
        train_labels=["cat"] * 600 + ["dog"] * 400,
        val_probabilities=probs,
        widths=rng.integers(200, 321, size=n),
        heights=rng.integers(150, 321, size=n),
        brightness=rng.normal(115, 25, size=n).clip(0, 255),
    )


def test_bin_counts_use_fixed_edges_and_clip_outliers():
    edges = (0.0, 1.0, 2.0, 3.0)
    counts = drift.bin_counts([-5, 0, 0.5, 1.0, 2.999, 3.0, 99, float("nan")], edges)
    # a value on an edge goes to the bin that starts there; outliers go to the end bins
    assert counts.tolist() == [3, 1, 3]


def test_reference_stats_schema_is_json_and_complete():
    ref = _reference(np.random.default_rng(0))
    again = json.loads(json.dumps(ref))  # strictly serialisable (no numpy scalars, no inf)
    assert again == ref
    assert ref["n"] == 2000
    assert ref["class_names"] == ["cat", "dog"]
    assert ref["class_balance"] == {"cat": 0.6, "dog": 0.4}
    assert sum(ref["predicted_balance"].values()) == pytest.approx(1.0)
    for name, edges in drift.NUMERIC_FEATURES.items():
        assert ref[name]["edges"] == list(edges)
        assert len(ref[name]["counts"]) == len(edges) - 1
    assert sum(ref["confidence"]["counts"]) == 2000
    assert 0.5 <= ref["confidence"]["mean"] <= 1.0


def test_reference_stats_rejects_bad_input():
    with pytest.raises(ValueError, match="val_probabilities"):
        drift.build_reference_stats(
            class_names=["cat", "dog"],
            train_labels=["cat"],
            val_probabilities=np.ones((3, 3)),
            widths=[1],
            heights=[1],
            brightness=[1.0],
        )
    with pytest.raises(ValueError, match="not among class_names"):
        drift.build_reference_stats(
            class_names=["cat", "dog"],
            train_labels=["cow"],
            val_probabilities=np.ones((1, 2)),
            widths=[1],
            heights=[1],
            brightness=[1.0],
        )


def test_psi_and_ks_are_zero_for_identical_and_large_for_disjoint():
    a = [10, 20, 30, 40]
    assert drift.psi(a, a) == pytest.approx(0.0)
    assert drift.ks_binned(a, [1, 2, 3, 4]) == pytest.approx(0.0)
    assert drift.psi([100, 0, 0, 0], [0, 0, 0, 100]) > 5
    assert drift.ks_binned([100, 0, 0, 0], [0, 0, 0, 100]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="mismatch"):
        drift.psi([1, 2], [1, 2, 3])


def test_matched_traffic_scores_low_and_shifted_traffic_high():
    rng = np.random.default_rng(1)
    ref = _reference(rng)
    n = 500
    matched = drift.drift_scores(
        ref,
        confidence=rng.beta(8, 1, size=n).clip(0.5, 1.0),
        width=rng.integers(200, 321, size=n),
        height=rng.integers(150, 321, size=n),
        brightness=rng.normal(115, 25, size=n).clip(0, 255),
        labels=list(rng.choice(["cat", "dog"], size=n)),
    )
    shifted = drift.drift_scores(
        ref,
        confidence=rng.uniform(0.5, 0.7, size=n),  # the model is unsure
        width=rng.integers(3000, 4000, size=n),  # phone photos instead of web thumbnails
        height=rng.integers(2000, 3000, size=n),
        brightness=rng.normal(30, 10, size=n).clip(0, 255),  # night shots
        labels=["dog"] * n,
    )
    features = {"confidence", "width", "height", "brightness", drift.LABEL_FEATURE}
    assert set(matched) == set(shifted) == features
    for name in features:
        assert matched[name]["psi"] < drift.PSI_MODERATE, (name, matched[name])
        assert matched[name]["level"] == "none"
        assert shifted[name]["psi"] > drift.PSI_SIGNIFICANT, (name, shifted[name])
        assert shifted[name]["level"] == "significant"
        assert shifted[name]["ks"] > matched[name]["ks"]


def test_features_missing_from_the_reference_are_not_scored():
    ref = {"confidence": {"edges": list(drift.CONFIDENCE_EDGES), "counts": [0] * 10 + [5]}}
    scores = drift.drift_scores(
        ref, confidence=[0.9995] * 5, width=[1], height=[1], brightness=[1.0], labels=["cat"]
    )
    assert set(scores) == {"confidence"}
    assert scores["confidence"]["psi"] == pytest.approx(0.0)
