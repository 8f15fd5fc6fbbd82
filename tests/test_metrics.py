"""Tests for lungdx.metrics: hand-computed values, scikit-learn agreement, invariants, bootstrap."""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from lungdx import metrics
from lungdx.metrics import (
    METRIC_NAMES,
    accuracy,
    binary_metrics,
    bootstrap_ci,
    choose_threshold,
    f1,
    metrics_with_ci,
    precision,
    recall,
    roc_auc,
    roc_points,
    sensitivity,
    specificity,
)

logger = logging.getLogger(__name__)

# Hand example. At threshold 0.5 (a case is called positive when score >= 0.5):
#
#                 called 1   called 0
#   truly 1       TP = 3     FN = 1      (0.9, 0.8, 0.5 | 0.3)
#   truly 0       FP = 2     TN = 4      (0.7, 0.5 | 0.4, 0.2, 0.1, 0.0)
#
# The positive 0.5 and the negative 0.5 tie exactly at the threshold: both are called positive.
# AUC over the 4 x 6 = 24 (positive, negative) pairs, a tie counting 1/2:
#   0.9 -> 6, 0.8 -> 6, 0.5 -> 4 + 1/2 (beats 0.4, 0.2, 0.1, 0.0; ties 0.5), 0.3 -> 3
#   = 19.5 / 24 = 13/16.
HAND_TRUE = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
HAND_SCORE = [0.9, 0.8, 0.5, 0.3, 0.7, 0.5, 0.4, 0.2, 0.1, 0.0]
HAND_EXPECTED = {
    "accuracy": Fraction(7, 10),
    "sensitivity": Fraction(3, 4),
    "specificity": Fraction(4, 6),
    "precision": Fraction(3, 5),
    "recall": Fraction(3, 4),
    "f1": Fraction(2 * 3, 2 * 3 + 2 + 1),
    "roc_auc": Fraction(13, 16),
}


def same(a: float, b: float) -> bool:
    """Equal up to rounding, with nan equal to nan."""
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-12, abs=1e-12)


def binormal(rng: np.random.Generator, n_pos: int, n_neg: int, d: float):
    """Scores N(0, 1) for negatives and N(d, 1) for positives: true AUC = Phi(d / sqrt(2))."""
    y_true = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
    y_score = np.r_[rng.normal(d, 1.0, n_pos), rng.normal(0.0, 1.0, n_neg)]
    return y_true, y_score


# Labels with ties in the scores: scores are few distinct multiples of 1/8.
labelled_scores = st.integers(min_value=1, max_value=40).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 1), min_size=n, max_size=n),
        st.lists(st.integers(0, 8), min_size=n, max_size=n).map(lambda v: [x / 8 for x in v]),
    )
)
two_class_scores = labelled_scores.filter(lambda d: 0 < sum(d[0]) < len(d[0]))


# --------------------------------------------------------------------------------------------
# Point estimates
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", METRIC_NAMES)
def test_hand_computed_values(name):
    fn = metrics._METRIC_FNS[name]
    assert fn(HAND_TRUE, HAND_SCORE, 0.5) == pytest.approx(float(HAND_EXPECTED[name]), abs=1e-15)


def test_binary_metrics_hand_example():
    result = binary_metrics(HAND_TRUE, HAND_SCORE, 0.5)
    assert list(result)[: len(METRIC_NAMES)] == list(METRIC_NAMES)
    counts = {k: result[k] for k in ("n", "n_pos", "n_neg", "tp", "fp", "tn", "fn")}
    assert counts == {"n": 10, "n_pos": 4, "n_neg": 6, "tp": 3, "fp": 2, "tn": 4, "fn": 1}
    assert result["threshold"] == 0.5
    for name in METRIC_NAMES:
        assert result[name] == pytest.approx(float(HAND_EXPECTED[name]), abs=1e-15)


def test_threshold_just_above_a_tie_flips_both_tied_cases():
    result = binary_metrics(HAND_TRUE, HAND_SCORE, np.nextafter(0.5, 1.0))
    assert (result["tp"], result["fp"], result["tn"], result["fn"]) == (2, 1, 5, 2)


def test_undefined_ratios_are_nan_not_zero():
    # Nothing called positive: precision undefined; F1 = 2*0 / (0 + 0 + 2) = 0 is defined.
    assert math.isnan(precision([1, 1, 0], [0.1, 0.2, 0.3], 0.9))
    assert f1([1, 1, 0], [0.1, 0.2, 0.3], 0.9) == 0.0
    # No positive cases: sensitivity, recall and AUC undefined; no negatives: specificity.
    assert math.isnan(sensitivity([0, 0], [0.1, 0.9]))
    assert math.isnan(recall([0, 0], [0.1, 0.9]))
    assert math.isnan(roc_auc([0, 0], [0.1, 0.9]))
    assert math.isnan(specificity([1, 1], [0.1, 0.9]))
    # Neither positives nor positive calls: F1 undefined.
    assert math.isnan(f1([0, 0], [0.1, 0.2], 0.5))


@settings(max_examples=100, deadline=None)
@given(data=labelled_scores, use_score=st.booleans(), pick=st.integers(0, 10**6))
def test_binary_metrics_agree_with_sklearn(data, use_score, pick):
    y_true, y_score = (np.asarray(v) for v in data)
    # Half the time the threshold sits exactly on an observed score (the >= edge case).
    threshold = float(y_score[pick % len(y_score)]) if use_score else (pick % 1000) / 999
    label = (y_score >= threshold).astype(int)
    one_class = y_true.min() == y_true.max()
    expected = {
        "accuracy": accuracy_score(y_true, label),
        "sensitivity": recall_score(y_true, label, labels=[0, 1], zero_division=np.nan),
        "specificity": recall_score(
            y_true, label, labels=[0, 1], pos_label=0, zero_division=np.nan
        ),
        "precision": precision_score(y_true, label, labels=[0, 1], zero_division=np.nan),
        "f1": f1_score(y_true, label, labels=[0, 1], zero_division=np.nan),
        "roc_auc": np.nan if one_class else roc_auc_score(y_true, y_score),
    }
    expected["recall"] = expected["sensitivity"]
    result = binary_metrics(y_true, y_score, threshold)
    tn, fp, fn, tp = confusion_matrix(y_true, label, labels=[0, 1]).ravel()
    assert (result["tp"], result["fp"], result["tn"], result["fn"]) == (tp, fp, tn, fn)
    for name in METRIC_NAMES:
        assert same(result[name], float(expected[name])), name
    # The vectorised formulas used by the bootstrap agree with scikit-learn too.
    rates = metrics._rates_from_counts(*(np.float64(c) for c in (tp, fp, tn, fn)))
    for name, value in rates.items():
        assert same(float(value), float(expected[name])), name
    assert same(metrics._rank_auc(y_true, y_score), float(expected["roc_auc"]))


@pytest.mark.parametrize(
    "bad",
    [
        ([0, 1], [0.5]),
        ([], []),
        ([0, 2], [0.1, 0.2]),
        ([0, 1], [0.1, np.nan]),
        ([[0, 1]], [[0.1, 0.2]]),
    ],
    ids=["length", "empty", "label-2", "nan-score", "2d"],
)
def test_bad_inputs_raise(bad):
    with pytest.raises(ValueError):
        accuracy(*bad)


def test_boolean_labels_accepted():
    assert accuracy(np.array(HAND_TRUE, bool), HAND_SCORE) == pytest.approx(0.7)


# --------------------------------------------------------------------------------------------
# AUC: invariance and the vectorised rank formula
# --------------------------------------------------------------------------------------------

MONOTONE_MAPS = {
    "cube": lambda x: x**3,
    "exp": lambda x: np.exp(x / 10),
    "tanh": lambda x: np.tanh(x / 40),
    "affine": lambda x: 3 * x - 7,
}


@settings(max_examples=100, deadline=None)
@given(
    y_true=st.lists(st.integers(0, 1), min_size=2, max_size=60),
    raw=st.lists(st.integers(-30, 30), min_size=60, max_size=60),
    map_name=st.sampled_from(sorted(MONOTONE_MAPS)),
)
def test_auc_unchanged_by_strictly_monotone_map(y_true, raw, map_name):
    y_score = np.asarray(raw[: len(y_true)], dtype=float)
    mapped = MONOTONE_MAPS[map_name](y_score)
    assert same(roc_auc(y_true, mapped), roc_auc(y_true, y_score))
    assert same(metrics._rank_auc(y_true, mapped), metrics._rank_auc(y_true, y_score))
    if 0 < sum(y_true) < len(y_true):  # a decreasing map mirrors the AUC
        assert roc_auc(y_true, -mapped) == pytest.approx(1 - roc_auc(y_true, y_score))


@settings(max_examples=100, deadline=None)
@given(data=two_class_scores, weights=st.lists(st.integers(0, 4), min_size=40, max_size=40))
def test_rank_auc_matches_sklearn_with_ties_and_weights(data, weights):
    y_true, y_score = (np.asarray(v) for v in data)
    assert metrics._rank_auc(y_true, y_score) == pytest.approx(roc_auc_score(y_true, y_score))
    # Integer weights are multiplicities: same as repeating the rows.
    w = np.asarray(weights[: len(y_true)])
    rep_true, rep_score = np.repeat(y_true, w), np.repeat(y_score, w)
    expected = roc_auc_score(rep_true, rep_score) if 0 < rep_true.sum() < len(rep_true) else np.nan
    assert same(metrics._rank_auc(y_true, y_score, w), float(expected))


def test_rank_auc_matches_sklearn_on_larger_random_data():
    rng = np.random.default_rng(3)
    for _ in range(20):
        y_true = rng.integers(0, 2, 500)
        y_score = rng.integers(0, 30, 500) / 29  # heavy ties
        assert metrics._rank_auc(y_true, y_score) == pytest.approx(
            roc_auc_score(y_true, y_score), abs=1e-12
        )


# --------------------------------------------------------------------------------------------
# ROC points and thresholds
# --------------------------------------------------------------------------------------------


def test_roc_points_json_and_finite():
    points = roc_points(HAND_TRUE, HAND_SCORE)
    json.dumps(points, allow_nan=False)
    assert len(points["fpr"]) == len(points["tpr"]) == len(points["thresholds"])
    assert points["thresholds"][0] == pytest.approx(max(HAND_SCORE) + 1)
    assert (points["fpr"][0], points["tpr"][0]) == (0.0, 0.0)
    assert (points["fpr"][-1], points["tpr"][-1]) == (1.0, 1.0)
    assert points["auc"] == pytest.approx(13 / 16)
    assert np.all(np.diff(points["thresholds"]) < 0)


def test_roc_points_one_class_raises():
    with pytest.raises(ValueError, match="both classes"):
        roc_points([1, 1, 1], [0.1, 0.2, 0.3])


def test_youden_separates_separable_data():
    y_true = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    y_score = [0.1, 0.2, 0.25, 0.3, 0.4, 0.6, 0.65, 0.7, 0.8, 0.9]
    threshold = choose_threshold(y_true, y_score)
    assert sensitivity(y_true, y_score, threshold) == 1.0
    assert specificity(y_true, y_score, threshold) == 1.0
    assert 0.4 < threshold <= 0.6


def test_youden_tie_takes_higher_threshold():
    # J = 1/2 at threshold 4 (tpr 1/2, fpr 0) and at threshold 2 (tpr 1, fpr 1/2).
    assert choose_threshold([0, 1, 0, 1], [1.0, 2.0, 3.0, 4.0]) == 4.0


@pytest.mark.parametrize("target", [0.0, 0.5, 0.8, 0.95, 1.0])
def test_sensitivity_target_met_by_highest_threshold(target):
    rng = np.random.default_rng(7)
    y_true, y_score = binormal(rng, 40, 60, 1.0)
    y_score = np.round(y_score, 1)  # ties
    threshold = choose_threshold(y_true, y_score, "sensitivity", target)
    assert np.isfinite(threshold)
    assert sensitivity(y_true, y_score, threshold) >= target
    higher = y_score[y_score > threshold]
    if higher.size:  # the next observed score up would miss the target
        assert sensitivity(y_true, y_score, higher.min()) < target


@pytest.mark.parametrize("target", [0.0, 0.5, 0.9, 1.0])
def test_specificity_target_met_by_lowest_threshold(target):
    rng = np.random.default_rng(8)
    y_true, y_score = binormal(rng, 40, 60, 1.0)
    y_score = np.round(y_score, 1)
    threshold = choose_threshold(y_true, y_score, "specificity", target)
    assert np.isfinite(threshold)
    assert specificity(y_true, y_score, threshold) >= target
    lower = y_score[y_score < threshold]
    if lower.size:
        assert specificity(y_true, y_score, lower.max()) < target


def test_a_target_can_pick_a_point_on_a_straight_stretch_of_the_roc_curve():
    # Points collinear with their neighbours (a run of positives, a run of negatives) are thresholds too;
    # scikit-learn's roc_curve drops them by default.
    y_true, y_score = [1, 1, 1, 0, 0, 0], [0.9, 0.8, 0.7, 0.3, 0.2, 0.1]
    assert choose_threshold(y_true, y_score, "sensitivity", 0.6) == 0.8
    assert choose_threshold(y_true, y_score, "specificity", 0.5) == 0.3
    assert choose_threshold(y_true, y_score) == 0.7  # Youden's J: unchanged


def test_delong_with_one_positive_case_has_no_p_value():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a nan answer, not numpy's degrees-of-freedom warnings in the user's output
        result = metrics.delong_test([1, 0, 0, 0, 0], [0.9, 0.1, 0.2, 0.3, 0.4], [0.5, 0.1, 0.6, 0.3, 0.4])
    assert result["difference"] == pytest.approx(-0.25) and math.isnan(result["p_value"]) and math.isnan(result["se"])


def test_specificity_one_when_top_score_negative_calls_nothing():
    y_true, y_score = [1, 0, 1, 0], [0.2, 0.9, 0.5, 0.1]
    threshold = choose_threshold(y_true, y_score, "specificity", 1.0)
    assert threshold == pytest.approx(1.9)
    assert specificity(y_true, y_score, threshold) == 1.0


@pytest.mark.parametrize("method, target", [("youden", None), ("sensitivity", 0.9)])
def test_choose_threshold_one_class_raises(method, target):
    with pytest.raises(ValueError, match="both classes"):
        choose_threshold([0, 0, 0], [0.1, 0.5, 0.9], method, target)


@pytest.mark.parametrize(
    "method, target", [("sensitivity", None), ("specificity", 1.5), ("f1", None), ("youden", 0.9)]
)
def test_choose_threshold_bad_arguments_raise(method, target):
    with pytest.raises(ValueError):
        choose_threshold(HAND_TRUE, HAND_SCORE, method, target)


# --------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------


def test_bootstrap_auc_ci_coverage_binormal():
    d = 1.0
    true_auc = 0.5 * (1 + math.erf(d / math.sqrt(2) / math.sqrt(2)))  # Phi(d / sqrt(2))
    rng = np.random.default_rng(2024)
    covered = 0
    n_datasets = 200
    for i in range(n_datasets):
        y_true, y_score = binormal(rng, 50, 50, d)
        low, high = bootstrap_ci(y_true, y_score, "roc_auc", n_resamples=300, seed=i)
        covered += low <= true_auc <= high
    assert 0.88 <= covered / n_datasets <= 0.99


def test_patient_bootstrap_of_duplicated_rows_is_wider():
    rng = np.random.default_rng(5)
    y_true, y_score = binormal(rng, 30, 30, 1.0)
    # Three identical images per patient: rows are perfectly correlated within a patient.
    rep_true, rep_score = np.repeat(y_true, 3), np.repeat(y_score, 3)
    patient = np.repeat(np.arange(60), 3)
    for name in ("roc_auc", "accuracy"):
        row = bootstrap_ci(rep_true, rep_score, name, threshold=0.5, seed=1)
        grouped = bootstrap_ci(rep_true, rep_score, name, groups=patient, threshold=0.5, seed=1)
        assert grouped[1] - grouped[0] > 1.3 * (row[1] - row[0])
        # Resampling patients of the tripled data = resampling rows of the unique data.
        unique = bootstrap_ci(y_true, y_score, name, threshold=0.5, seed=1)
        assert grouped == pytest.approx(unique)


@pytest.mark.parametrize("use_groups", [False, True])
@pytest.mark.parametrize("name", METRIC_NAMES)
def test_vectorised_bootstrap_equals_sklearn_callable(name, use_groups):
    rng = np.random.default_rng(11)
    y_true, y_score = binormal(rng, 25, 35, 0.8)
    y_score = np.round(y_score, 1)
    groups = rng.integers(0, 20, len(y_true)) if use_groups else None
    kwargs = dict(groups=groups, threshold=0.3, n_resamples=100, seed=4)
    fast = bootstrap_ci(y_true, y_score, name, **kwargs)
    slow = bootstrap_ci(y_true, y_score, metrics._METRIC_FNS[name], **kwargs)
    assert fast == pytest.approx(slow, abs=1e-12)


def test_chunked_bootstrap_matches_callable(monkeypatch):
    monkeypatch.setattr(metrics, "_CHUNK_CELLS", 7 * 60)  # 7 resamples per chunk
    rng = np.random.default_rng(12)
    y_true, y_score = binormal(rng, 30, 30, 1.0)
    fast = bootstrap_ci(y_true, y_score, "roc_auc", n_resamples=50, seed=2)
    slow = bootstrap_ci(y_true, y_score, roc_auc, n_resamples=50, seed=2)
    assert fast == pytest.approx(slow, abs=1e-12)
    assert fast[0] < fast[1]


def test_bootstrap_seed_reproducible():
    rng = np.random.default_rng(13)
    y_true, y_score = binormal(rng, 30, 30, 1.0)
    first = bootstrap_ci(y_true, y_score, "roc_auc", n_resamples=100, seed=9)
    assert bootstrap_ci(y_true, y_score, "roc_auc", n_resamples=100, seed=9) == first
    assert bootstrap_ci(y_true, y_score, "roc_auc", n_resamples=100, seed=10) != first


def test_percentile_ci_skips_undefined_until_half():
    values = np.r_[np.arange(5.0), np.full(5, np.nan)]  # exactly half undefined: kept
    assert metrics._percentile_ci(values, 0.5, "m") == (1.0, 3.0)
    values = np.r_[np.arange(4.0), np.full(6, np.nan)]  # more than half: no interval
    assert all(math.isnan(v) for v in metrics._percentile_ci(values, 0.95, "m"))


def test_bootstrap_one_class_auc_is_nan_and_rare_positive_is_not():
    y_score = np.linspace(0, 1, 30)
    assert all(math.isnan(v) for v in bootstrap_ci(np.zeros(30, int), y_score, "roc_auc"))
    # One positive among 30: about e^-1 of resamples lack it and are skipped, under half.
    y_true = np.r_[1, np.zeros(29, int)]
    low, high = bootstrap_ci(y_true, y_score, "roc_auc")
    assert 0.0 <= low <= high <= 1.0


def test_bootstrap_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown metric"):
        bootstrap_ci(HAND_TRUE, HAND_SCORE, "auc")
    with pytest.raises(ValueError, match="groups"):
        bootstrap_ci(HAND_TRUE, HAND_SCORE, "accuracy", groups=[1, 2])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci(HAND_TRUE, HAND_SCORE, "accuracy", confidence=95)


def test_metrics_with_ci_1000_resamples_of_250_patients():
    rng = np.random.default_rng(21)
    y_true, y_score = binormal(rng, 100, 150, 1.2)
    patient = np.arange(250) // 2  # two images per patient
    start = time.perf_counter()
    result = metrics_with_ci(y_true, y_score, 0.6, groups=patient, n_resamples=1000, seed=3)
    # Measured, not asserted (house rule: no timed assertions): see --log-cli-level=INFO.
    logger.info("metrics_with_ci, 1000 x 250: %.3f s", time.perf_counter() - start)
    point = binary_metrics(y_true, y_score, 0.6)
    assert list(result) == [*METRIC_NAMES, "counts"]
    for name in METRIC_NAMES:
        entry = result[name]
        assert entry["value"] == point[name]
        ci = bootstrap_ci(y_true, y_score, name, groups=patient, threshold=0.6, seed=3)
        assert (entry["ci_low"], entry["ci_high"]) == pytest.approx(ci)
        assert 0.0 <= entry["ci_low"] < entry["ci_high"] <= 1.0
    expected_counts = {k: point[k] for k in ("n", "n_pos", "n_neg", "tp", "fp", "tn", "fn")}
    assert result["counts"] == {**expected_counts, "n_groups": 125}
    json.dumps(result, allow_nan=False)
