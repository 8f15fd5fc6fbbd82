"""Calibration, operating points, DeLong, McNemar and bootstrap coverage (issue: trustworthy evaluation)."""

import math

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from lungdx import metrics


def test_bootstrap_ci_covers_the_true_auc_about_95_percent_of_the_time():
    # Binormal scores: positives N(d, 1), negatives N(0, 1); the true AUC is Phi(d / sqrt(2)).
    rng = np.random.default_rng(123)
    d, n_pos, n_neg, repetitions = 1.0, 60, 60, 400
    true_auc = norm.cdf(d / math.sqrt(2))
    y_true = np.r_[np.ones(n_pos), np.zeros(n_neg)].astype(int)
    covered = 0
    for repetition in range(repetitions):
        scores = np.r_[rng.normal(d, 1, n_pos), rng.normal(0, 1, n_neg)]
        low, high = metrics.bootstrap_ci(y_true, scores, "roc_auc", n_resamples=400, seed=repetition)
        covered += low <= true_auc <= high
    coverage = covered / repetitions
    # 400 repetitions: binomial SD about 0.011 around 0.95; percentile intervals run slightly narrow.
    assert 0.91 <= coverage <= 0.98, coverage


def test_ece_is_near_zero_for_calibrated_scores_and_large_for_miscalibrated_ones():
    rng = np.random.default_rng(0)
    probability = rng.uniform(size=40_000)
    y_true = (rng.uniform(size=probability.size) < probability).astype(int)
    assert metrics.expected_calibration_error(y_true, probability) < 0.01
    assert metrics.expected_calibration_error(y_true, probability ** 3) > 0.1
    assert metrics.brier_score(y_true, probability) == pytest.approx(1 / 6, abs=0.01)  # E[p(1-p)] for uniform p


def test_reliability_curve_bins_by_hand():
    curve = metrics.reliability_curve([0, 1, 1, 0, 1], [0.05, 0.15, 0.95, 0.0, 1.0], n_bins=10)
    assert curve["bin_low"] == [0.0, 0.1, 0.9]
    assert curve["count"] == [2, 1, 2]
    assert curve["observed_frequency"] == [0.0, 1.0, 1.0]
    assert curve["mean_probability"] == pytest.approx([0.025, 0.15, 0.975])
    with pytest.raises(ValueError, match="probabilities"):
        metrics.reliability_curve([0, 1], [-2.0, 3.0])


def test_fit_temperature_recovers_the_temperature_of_overconfident_logits():
    rng = np.random.default_rng(1)
    true_logits = rng.normal(0, 1.5, 20_000)
    y_true = (rng.uniform(size=true_logits.size) < 1 / (1 + np.exp(-true_logits))).astype(int)
    assert metrics.fit_temperature(y_true, 3.0 * true_logits) == pytest.approx(3.0, rel=0.08)


def test_delong_against_a_hand_worked_example():
    # A: positives 0.35, 0.8, 0.7 against negatives 0.1, 0.4, 0.2 -> 8 of 9 pairs ordered: AUC 8/9.
    # Placements V10 = (2/3, 1, 1), V01 = (1, 2/3, 1); each has sample variance 1/27.
    # B separates perfectly (AUC 1, zero variance). var(B - A) = (1/27)/3 + (1/27)/3 = 2/81.
    y_true = [0, 0, 1, 1, 1, 0]
    score_a = [0.1, 0.4, 0.35, 0.8, 0.7, 0.2]
    score_b = [0.2, 0.3, 0.6, 0.9, 0.5, 0.1]
    result = metrics.delong_test(y_true, score_a, score_b)
    assert result["auc_a"] == pytest.approx(8 / 9) and result["auc_b"] == 1.0
    assert result["se"] == pytest.approx(math.sqrt(2) / 9)
    assert result["z"] == pytest.approx((1 / 9) / (math.sqrt(2) / 9))
    assert result["p_value"] == pytest.approx(2 * norm.sf(1 / math.sqrt(2)))


def test_delong_agrees_with_sklearn_auc_with_ties_and_is_antisymmetric():
    rng = np.random.default_rng(4)
    y_true = rng.integers(0, 2, 80)
    score_a = np.round(rng.normal(y_true * 0.8, 1), 1)  # rounding makes ties
    score_b = np.round(rng.normal(y_true * 0.3, 1), 1)
    forward, backward = metrics.delong_test(y_true, score_a, score_b), metrics.delong_test(y_true, score_b, score_a)
    assert forward["auc_a"] == pytest.approx(roc_auc_score(y_true, score_a))
    assert forward["difference"] == pytest.approx(-backward["difference"])
    assert forward["p_value"] == pytest.approx(backward["p_value"])
    assert metrics.delong_test(y_true, score_a, score_a)["p_value"] == 1.0


def test_paired_bootstrap_detects_a_real_difference_and_not_a_null_one():
    rng = np.random.default_rng(5)
    y_true = np.r_[np.ones(150), np.zeros(150)].astype(int)
    noise = rng.normal(0, 1, 300)
    strong, weak = y_true * 2.0 + noise, y_true * 0.2 + rng.normal(0, 1, 300)
    real = metrics.paired_bootstrap_auc_difference(y_true, weak, strong, n_resamples=1000)
    assert real["ci_low"] > 0 and real["p_value"] < 0.01
    null = metrics.paired_bootstrap_auc_difference(y_true, strong, strong + 1e-9 * rng.normal(size=300), n_resamples=500)
    assert null["ci_low"] <= 0 <= null["ci_high"]


def test_mcnemar_exact_and_chi_squared():
    y_true = np.ones(30, dtype=int)
    label_a = np.r_[np.ones(10), np.zeros(20)]          # A right on 10
    label_b = np.r_[np.ones(10), np.ones(2), np.zeros(18)]  # B right on those 10 and 2 more
    exact = metrics.mcnemar_test(y_true, label_a, label_b)
    assert (exact["only_a_correct"], exact["only_b_correct"]) == (0, 2)
    assert exact["method"] == "exact binomial" and exact["p_value"] == pytest.approx(0.5)  # 2 * 0.5^2
    y_true = np.zeros(60, dtype=int)
    label_a, label_b = np.r_[np.zeros(40), np.ones(20)], np.r_[np.ones(10), np.zeros(50)]
    chi = metrics.mcnemar_test(y_true, label_a, label_b)  # only A right: 10, only B right: 20 -> 30 discordant
    assert chi["statistic"] == pytest.approx((abs(10 - 20) - 1) ** 2 / 30)


def test_operating_points_are_chosen_on_validation_and_frozen_for_test():
    rng = np.random.default_rng(2)
    y_val, y_test = rng.integers(0, 2, 300), rng.integers(0, 2, 300)
    p_val, p_test = np.clip(0.3 * y_val + rng.uniform(0, 0.7, 300), 0, 1), np.clip(0.3 * y_test + rng.uniform(0, 0.7, 300), 0, 1)
    rows = {row["point"]: row for row in metrics.operating_points(y_val, p_val, y_test, p_test)}
    assert set(rows) == {"youden", "sensitivity>=0.90", "sensitivity>=0.95", "specificity>=0.90"}
    assert rows["sensitivity>=0.90"]["val_sensitivity"] >= 0.90
    assert rows["specificity>=0.90"]["val_specificity"] >= 0.90
    assert rows["sensitivity>=0.95"]["threshold"] <= rows["sensitivity>=0.90"]["threshold"]
    # The test rates are the frozen threshold's, whatever they come to.
    threshold = rows["youden"]["threshold"]
    assert rows["youden"]["test_sensitivity"] == metrics.sensitivity(y_test, p_test, threshold)
    changed = metrics.operating_points(y_val, p_val, y_test, np.clip(p_test * 0.5, 0, 1))
    assert changed[0]["threshold"] == threshold  # test scores never move the threshold


def test_pr_points_match_sklearn_average_precision():
    from sklearn.metrics import average_precision_score

    y_true, y_score = [0, 1, 1, 0, 1, 0, 0], [0.1, 0.9, 0.4, 0.35, 0.8, 0.2, 0.5]
    points = metrics.pr_points(y_true, y_score)
    assert points["average_precision"] == pytest.approx(average_precision_score(y_true, y_score))
    assert points["prevalence"] == pytest.approx(3 / 7) and points["recall"][-1] == 0.0
