"""Binary classification metrics, operating thresholds and bootstrap confidence intervals.

Pure ``(y_true, y_score)`` functions on numpy arrays: no torch, no plotting. ``y_true`` holds 0/1
labels (1 = disease), ``y_score`` any real score where higher means more likely positive (a
probability, or a logit). A case is called positive when ``y_score >= threshold``.

Point estimates come from scikit-learn. The bootstrap is the one exception: it computes confusion
counts and the AUC for all resamples at once with matrix arithmetic, because calling scikit-learn
thousands of times is slow; the tests check that both give the same numbers.

Undefined is reported as undefined: a ratio whose denominator is zero (precision with no positive
calls, sensitivity with no positive cases, the AUC with one class) is ``nan``, never a silent 0.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy import sparse
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

logger = logging.getLogger(__name__)

METRIC_NAMES = ("accuracy", "sensitivity", "specificity", "precision", "recall", "f1", "roc_auc")
"""Metric names in the order of the paper's Table 1."""

MetricFn = Callable[[np.ndarray, np.ndarray, float], float]

# Largest number of float64 cells one bootstrap chunk may hold (32 MiB) so memory stays bounded
# for large test sets; 1000 resamples of a few hundred patients fit in one chunk.
_CHUNK_CELLS = 1 << 22


# --------------------------------------------------------------------------------------------
# Input checking
# --------------------------------------------------------------------------------------------


def _check_inputs(y_true: ArrayLike, y_score: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(y_true as int64 0/1, y_score as float64)`` or raise ``ValueError``."""
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_true.ndim != 1 or y_score.ndim != 1:
        raise ValueError(
            f"y_true and y_score must be 1-D; got shapes {y_true.shape} and {y_score.shape}"
        )
    if len(y_true) != len(y_score):
        raise ValueError(f"y_true has {len(y_true)} entries but y_score has {len(y_score)}")
    if len(y_true) == 0:
        raise ValueError("y_true and y_score are empty")
    if not np.isin(y_true, (0, 1)).all():
        raise ValueError(f"y_true must hold only 0 and 1; got values {np.unique(y_true)[:10]}")
    if not np.isfinite(y_score).all():
        raise ValueError("y_score holds NaN or infinite values")
    return y_true.astype(np.int64), y_score


def _check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if np.isnan(threshold):
        raise ValueError("threshold is NaN")
    return threshold


def _check_two_classes(y_true: np.ndarray, what: str) -> None:
    n_pos = int(y_true.sum())
    if n_pos == 0 or n_pos == len(y_true):
        only = "positive" if n_pos else "negative"
        raise ValueError(
            f"{what} needs both classes in y_true, but all {len(y_true)} cases are {only}"
        )


def _labels(y_score: np.ndarray, threshold: float) -> np.ndarray:
    return (y_score >= threshold).astype(np.int64)


def _top_threshold(y_score: np.ndarray) -> float:
    """A finite threshold above every score: ``max(y_score) + 1`` (no case called positive).

    scikit-learn's ``roc_curve`` puts ``inf`` first (it used ``max + 1`` before 1.3); ``inf`` is
    not valid JSON and cannot be stored as an operating point, so it is replaced by this value.
    """
    top = float(np.max(y_score))
    return max(top + 1.0, float(np.nextafter(top, np.inf)))


# --------------------------------------------------------------------------------------------
# Point estimates (scikit-learn)
# --------------------------------------------------------------------------------------------


def accuracy(y_true: ArrayLike, y_score: ArrayLike, threshold: float = 0.5) -> float:
    """Fraction of cases whose label ``y_score >= threshold`` equals ``y_true``."""
    y_true, y_score = _check_inputs(y_true, y_score)
    return float(accuracy_score(y_true, _labels(y_score, _check_threshold(threshold))))


def sensitivity(y_true: ArrayLike, y_score: ArrayLike, threshold: float = 0.5) -> float:
    """True-positive rate TP / (TP + FN); ``nan`` when there are no positive cases."""
    y_true, y_score = _check_inputs(y_true, y_score)
    label = _labels(y_score, _check_threshold(threshold))
    return float(recall_score(y_true, label, labels=[0, 1], zero_division=np.nan))


def specificity(y_true: ArrayLike, y_score: ArrayLike, threshold: float = 0.5) -> float:
    """True-negative rate TN / (TN + FP); ``nan`` when there are no negative cases."""
    y_true, y_score = _check_inputs(y_true, y_score)
    label = _labels(y_score, _check_threshold(threshold))
    # Specificity is the recall of the negative class.
    return float(recall_score(y_true, label, labels=[0, 1], pos_label=0, zero_division=np.nan))


def precision(y_true: ArrayLike, y_score: ArrayLike, threshold: float = 0.5) -> float:
    """Positive predictive value TP / (TP + FP).

    Returns ``nan`` when no case is called positive: the ratio is undefined there, and reporting
    0 (scikit-learn's default) would understate a classifier that simply abstained.
    """
    y_true, y_score = _check_inputs(y_true, y_score)
    label = _labels(y_score, _check_threshold(threshold))
    return float(precision_score(y_true, label, labels=[0, 1], zero_division=np.nan))


def recall(y_true: ArrayLike, y_score: ArrayLike, threshold: float = 0.5) -> float:
    """Recall, identical to :func:`sensitivity` (kept under both names for Table 1)."""
    return sensitivity(y_true, y_score, threshold)


def f1(y_true: ArrayLike, y_score: ArrayLike, threshold: float = 0.5) -> float:
    """F1 score 2TP / (2TP + FP + FN); ``nan`` when there are neither positive cases nor calls."""
    y_true, y_score = _check_inputs(y_true, y_score)
    label = _labels(y_score, _check_threshold(threshold))
    return float(f1_score(y_true, label, labels=[0, 1], zero_division=np.nan))


def roc_auc(y_true: ArrayLike, y_score: ArrayLike, threshold: float | None = None) -> float:
    """Area under the ROC curve; ``nan`` when ``y_true`` holds one class.

    ``threshold`` is accepted and ignored so every metric shares one signature.
    """
    y_true, y_score = _check_inputs(y_true, y_score)
    if y_true.min() == y_true.max():
        return float("nan")
    return float(roc_auc_score(y_true, y_score))


_METRIC_FNS: dict[str, MetricFn] = {
    "accuracy": accuracy,
    "sensitivity": sensitivity,
    "specificity": specificity,
    "precision": precision,
    "recall": recall,
    "f1": f1,
    "roc_auc": roc_auc,
}


def binary_metrics(y_true: ArrayLike, y_score: ArrayLike, threshold: float) -> dict[str, float]:
    """Every metric in :data:`METRIC_NAMES` at ``threshold``, plus the confusion counts.

    Returns:
        The metrics in Table 1 order, then ``n``, ``n_pos``, ``n_neg``, ``tp``, ``fp``, ``tn``,
        ``fn`` (ints) and ``threshold``.
    """
    y_true, y_score = _check_inputs(y_true, y_score)
    threshold = _check_threshold(threshold)
    label = _labels(y_score, threshold)
    tn, fp, fn, tp = (int(c) for c in confusion_matrix(y_true, label, labels=[0, 1]).ravel())
    values: dict[str, Any] = {
        name: _METRIC_FNS[name](y_true, y_score, threshold) for name in METRIC_NAMES
    }
    n_pos = int(y_true.sum())
    values.update(n=len(y_true), n_pos=n_pos, n_neg=len(y_true) - n_pos)
    values.update(tp=tp, fp=fp, tn=tn, fn=fn, threshold=threshold)
    return values


# --------------------------------------------------------------------------------------------
# ROC curve and operating thresholds
# --------------------------------------------------------------------------------------------


def _finite_roc(y_true: np.ndarray, y_score: np.ndarray, drop_intermediate: bool = True):
    fpr, tpr, thresholds = roc_curve(y_true, y_score, drop_intermediate=drop_intermediate)
    thresholds = np.array(thresholds, dtype=np.float64)
    thresholds[~np.isfinite(thresholds)] = _top_threshold(y_score)
    return fpr, tpr, thresholds


def roc_points(y_true: ArrayLike, y_score: ArrayLike) -> dict[str, Any]:
    """The ROC curve as JSON-serialisable lists, for plotting or storing with a run.

    The first threshold, ``inf`` in scikit-learn, is replaced by ``max(y_score) + 1``: a finite
    value above every score, at which no case is called positive (the point fpr = tpr = 0).

    Returns:
        ``{"fpr": [...], "tpr": [...], "thresholds": [...], "auc": float}``, thresholds
        decreasing.

    Raises:
        ValueError: when ``y_true`` holds one class (the curve is undefined).
    """
    y_true, y_score = _check_inputs(y_true, y_score)
    _check_two_classes(y_true, "roc_points")
    fpr, tpr, thresholds = _finite_roc(y_true, y_score)
    return {
        "fpr": [float(v) for v in fpr],
        "tpr": [float(v) for v in tpr],
        "thresholds": [float(v) for v in thresholds],
        "auc": float(roc_auc_score(y_true, y_score)),
    }


def choose_threshold(
    y_true: ArrayLike, y_score: ArrayLike, method: str = "youden", target: float | None = None
) -> float:
    """Choose an operating threshold on validation data, to be frozen for the test set.

    Candidates are the thresholds of scikit-learn's ``roc_curve``, i.e. observed score values,
    so the validation metrics at the returned threshold are exactly those on the ROC curve.

    Args:
        y_true: Validation labels (both classes needed).
        y_score: Validation scores.
        method: ``"youden"`` maximises sensitivity + specificity - 1; among equal maxima the
            highest threshold wins (fewest positive calls for the same J).
            ``"sensitivity"`` returns the highest threshold whose sensitivity >= ``target``;
            ``"specificity"`` the lowest threshold whose specificity >= ``target``.
        target: Required rate in [0, 1] for ``"sensitivity"`` / ``"specificity"``.

    Returns:
        A finite threshold. Where only "call nothing positive" meets a specificity target, this
        is ``max(y_score) + 1``.

    Raises:
        ValueError: one-class ``y_true``, unknown ``method``, or a missing or invalid ``target``.
    """
    y_true, y_score = _check_inputs(y_true, y_score)
    _check_two_classes(y_true, "choose_threshold")
    # Every distinct score is a candidate (a point on a straight stretch of the curve can be the one a target picks).
    fpr, tpr, thresholds = _finite_roc(y_true, y_score, drop_intermediate=False)  # thresholds decreasing
    if method == "youden":
        if target is not None:
            raise ValueError("method='youden' takes no target")
        j = (tpr - fpr)[1:]  # index 0 (call nothing, J = 0) never beats the last point (J = 0)
        best = np.flatnonzero(j >= j.max() - 1e-12)[0]
        return float(thresholds[1:][best])
    if method not in ("sensitivity", "specificity"):
        raise ValueError(f"unknown method {method!r}; use 'youden', 'sensitivity' or 'specificity'")
    if target is None or not 0.0 <= float(target) <= 1.0:
        raise ValueError(f"method={method!r} needs a target in [0, 1]; got {target!r}")
    if method == "sensitivity":
        # tpr reaches 1 at the lowest score, so a qualifying threshold always exists.
        return float(thresholds[np.flatnonzero(tpr >= target)[0]])
    # Specificity is 1 at the first (call-nothing) threshold, so one always qualifies.
    return float(thresholds[np.flatnonzero(1.0 - fpr >= target)[-1]])


# --------------------------------------------------------------------------------------------
# Vectorised bootstrap
# --------------------------------------------------------------------------------------------


def _rates_from_counts(tp, fp, tn, fn) -> dict[str, np.ndarray]:
    """Threshold metrics from (arrays of) confusion counts; ``nan`` where undefined."""
    with np.errstate(divide="ignore", invalid="ignore"):
        sens = np.where(tp + fn > 0, tp / (tp + fn), np.nan)
        return {
            "accuracy": (tp + tn) / (tp + fp + tn + fn),
            "sensitivity": sens,
            "specificity": np.where(tn + fp > 0, tn / (tn + fp), np.nan),
            "precision": np.where(tp + fp > 0, tp / (tp + fp), np.nan),
            "recall": sens,
            "f1": np.where(tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan),
        }


def _auc_from_bins(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC from per-score-value counts, ties counted one half.

    ``pos[..., k]`` and ``neg[..., k]`` are the (weighted) numbers of positive and negative cases
    at the k-th distinct score, scores ascending. AUC = P(score_pos > score_neg) + P(tie) / 2,
    which equals the rank-sum formula with tied scores given their average rank.
    """
    neg_below = np.cumsum(neg, axis=-1) - neg
    wins = np.sum(pos * (neg_below + 0.5 * neg), axis=-1)
    pairs = pos.sum(axis=-1) * neg.sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(pairs > 0, wins / pairs, np.nan)


def _rank_auc(y_true: ArrayLike, y_score: ArrayLike, weights: ArrayLike | None = None) -> float:
    """AUC by the Mann-Whitney formula, each case counted ``weights[i]`` times (default 1)."""
    y_true, y_score = _check_inputs(y_true, y_score)
    w = np.ones(len(y_true)) if weights is None else np.asarray(weights, dtype=np.float64)
    _, score_bin = np.unique(y_score, return_inverse=True)
    n_bins = int(score_bin.max()) + 1
    pos = np.bincount(score_bin, weights=w * y_true, minlength=n_bins)
    neg = np.bincount(score_bin, weights=w * (1 - y_true), minlength=n_bins)
    return float(_auc_from_bins(pos, neg))


def _group_index(groups: ArrayLike | None, n: int) -> np.ndarray:
    """Map each row to a group number 0..G-1; each row is its own group when ``groups`` is None."""
    if groups is None:
        return np.arange(n)
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(f"groups must have shape ({n},) like y_true; got {groups.shape}")
    return np.unique(groups, return_inverse=True)[1].ravel()


def _draw_groups(rng: np.random.Generator, n_groups: int, n_resamples: int, n_rows: int):
    """Yield ``(chunk, n_groups)`` matrices of group indices drawn with replacement.

    The chunk size depends only on the data size (at most ``n_rows`` distinct scores and groups),
    so the vectorised and the callable paths see the same resamples for the same seed.
    """
    chunk = max(1, min(n_resamples, _CHUNK_CELLS // max(n_rows, 1)))
    for start in range(0, n_resamples, chunk):
        yield rng.integers(0, n_groups, size=(min(chunk, n_resamples - start), n_groups))


def _multiplicities(draws: np.ndarray, n_groups: int) -> np.ndarray:
    """How many times each group was drawn, per resample: ``(n_draws, n_groups)`` float64."""
    rows = draws.shape[0]
    flat = (draws + n_groups * np.arange(rows)[:, None]).ravel()
    return np.bincount(flat, minlength=rows * n_groups).reshape(rows, n_groups).astype(np.float64)


def _group_matrix(group: np.ndarray, score_bin: np.ndarray, values: np.ndarray, n_groups: int):
    """Sparse ``(n_score_bins, n_groups)`` matrix of ``values`` summed per (score bin, group)."""
    shape = (int(score_bin.max()) + 1, n_groups)
    return sparse.csr_matrix((values.astype(np.float64), (score_bin, group)), shape=shape)


def _bootstrap_all(y_true, y_score, threshold, group, n_resamples, seed) -> dict[str, np.ndarray]:
    """All :data:`METRIC_NAMES` on ``n_resamples`` group-level resamples, vectorised."""
    n_groups = int(group.max()) + 1
    label = _labels(y_score, threshold)
    cells = [y_true * label, (1 - y_true) * label, (1 - y_true) * (1 - label), y_true * (1 - label)]
    per_group = np.stack([np.bincount(group, weights=c, minlength=n_groups) for c in cells], 1)
    _, score_bin = np.unique(y_score, return_inverse=True)
    score_bin = score_bin.ravel()
    pos_bins = _group_matrix(group, score_bin, y_true, n_groups)
    neg_bins = _group_matrix(group, score_bin, 1 - y_true, n_groups)
    counts, aucs = [], []
    for draws in _draw_groups(np.random.default_rng(seed), n_groups, n_resamples, len(y_true)):
        weight = _multiplicities(draws, n_groups)  # (chunk, n_groups)
        counts.append(weight @ per_group)
        aucs.append(_auc_from_bins((pos_bins @ weight.T).T, (neg_bins @ weight.T).T))
    tp, fp, tn, fn = np.concatenate(counts).T
    return {**_rates_from_counts(tp, fp, tn, fn), "roc_auc": np.concatenate(aucs)}


def _bootstrap_callable(y_true, y_score, threshold, group, metric, n_resamples, seed):
    """``metric`` on each resample, drawing groups exactly as :func:`_bootstrap_all` does."""
    n_groups = int(group.max()) + 1
    order = np.argsort(group, kind="stable")
    starts = np.searchsorted(group[order], np.arange(n_groups + 1))
    rows_of = [order[starts[g] : starts[g + 1]] for g in range(n_groups)]
    values = []
    for draws in _draw_groups(np.random.default_rng(seed), n_groups, n_resamples, len(y_true)):
        for drawn in draws:
            rows = np.concatenate([rows_of[g] for g in drawn])
            values.append(float(metric(y_true[rows], y_score[rows], threshold)))
    return np.asarray(values)


def _percentile_ci(values: np.ndarray, confidence: float, name: str) -> tuple[float, float]:
    """Percentile interval of the defined (non-nan) resample values.

    Resamples where the metric is undefined (e.g. one class for the AUC) are skipped; when more
    than half are, the interval is not trustworthy and ``(nan, nan)`` is returned.
    """
    defined = values[~np.isnan(values)]
    skipped = len(values) - len(defined)
    if skipped:
        logger.debug("%s: %d of %d resamples undefined, skipped", name, skipped, len(values))
    if skipped > len(values) / 2:
        logger.warning(
            "%s: %d of %d bootstrap resamples undefined; CI reported as nan",
            name, skipped, len(values),
        )
        return float("nan"), float("nan")
    alpha = 1.0 - confidence
    low, high = np.quantile(defined, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def _check_bootstrap_args(n_resamples: int, confidence: float) -> None:
    if int(n_resamples) < 1:
        raise ValueError(f"n_resamples must be >= 1; got {n_resamples}")
    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must lie in (0, 1); got {confidence}")


def bootstrap_ci(
    y_true: ArrayLike,
    y_score: ArrayLike,
    metric: str | MetricFn,
    *,
    groups: ArrayLike | None = None,
    threshold: float = 0.5,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of one metric.

    Args:
        y_true: 0/1 labels.
        y_score: Scores.
        metric: A name in :data:`METRIC_NAMES` (computed vectorised, fast) or a callable
            ``(y_true, y_score, threshold) -> float`` (called once per resample).
        groups: One id per row, e.g. patient ids. Groups are resampled with replacement and
            every row of a drawn group is taken (patient-level bootstrap), so correlated images
            of one patient do not count as independent evidence. ``None``: rows are resampled.
        threshold: Operating threshold for threshold metrics (ignored by ``roc_auc``).
        n_resamples: Number of bootstrap resamples.
        confidence: Coverage of the interval, e.g. 0.95.
        seed: Seed of the resampling; the same seed draws the same resamples for every metric.

    Returns:
        ``(low, high)``. Resamples where the metric is undefined (``nan``, e.g. a single class
        for ``roc_auc``) are skipped; if more than half are skipped, ``(nan, nan)``.
    """
    y_true, y_score = _check_inputs(y_true, y_score)
    threshold = _check_threshold(threshold)
    _check_bootstrap_args(n_resamples, confidence)
    group = _group_index(groups, len(y_true))
    if callable(metric):
        values = _bootstrap_callable(y_true, y_score, threshold, group, metric, n_resamples, seed)
        return _percentile_ci(values, confidence, getattr(metric, "__name__", "metric"))
    if metric not in METRIC_NAMES:
        raise ValueError(f"unknown metric {metric!r}; use one of {METRIC_NAMES} or a callable")
    values = _bootstrap_all(y_true, y_score, threshold, group, n_resamples, seed)[metric]
    return _percentile_ci(values, confidence, metric)


def metrics_with_ci(
    y_true: ArrayLike,
    y_score: ArrayLike,
    threshold: float,
    *,
    groups: ArrayLike | None = None,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, dict]:
    """Every metric with its bootstrap confidence interval, all from one set of resamples.

    Arguments are as for :func:`bootstrap_ci`.

    Returns:
        ``{name: {"value", "ci_low", "ci_high"}}`` for each name in :data:`METRIC_NAMES`, plus
        ``"counts": {n, n_pos, n_neg, tp, fp, tn, fn, n_groups}``.
    """
    y_true, y_score = _check_inputs(y_true, y_score)
    threshold = _check_threshold(threshold)
    _check_bootstrap_args(n_resamples, confidence)
    group = _group_index(groups, len(y_true))
    point = binary_metrics(y_true, y_score, threshold)
    resampled = _bootstrap_all(y_true, y_score, threshold, group, n_resamples, seed)
    result: dict[str, dict] = {}
    for name in METRIC_NAMES:
        low, high = _percentile_ci(resampled[name], confidence, name)
        result[name] = {"value": point[name], "ci_low": low, "ci_high": high}
    result["counts"] = {k: point[k] for k in ("n", "n_pos", "n_neg", "tp", "fp", "tn", "fn")}
    result["counts"]["n_groups"] = int(group.max()) + 1
    return result


def labelled_metrics_with_ci(
    y_true: ArrayLike,
    y_score: ArrayLike,
    labels: ArrayLike,
    *,
    groups: ArrayLike | None = None,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, dict]:
    """As :func:`metrics_with_ci`, for labels that do not come from one threshold on ``y_score``.

    Used where each case carries its own threshold (pooled cross-validation folds): thresholded
    metrics come from ``labels``, the AUC from ``y_score``; both from the same resamples.
    """
    y_true, y_score = _check_inputs(y_true, y_score)
    labels = np.asarray(labels, dtype=np.float64)
    result = metrics_with_ci(y_true, labels, 0.5, groups=groups, n_resamples=n_resamples, confidence=confidence,
                             seed=seed)
    low, high = bootstrap_ci(y_true, y_score, "roc_auc", groups=groups, n_resamples=n_resamples,
                             confidence=confidence, seed=seed)
    result["roc_auc"] = {"value": roc_auc(y_true, y_score), "ci_low": low, "ci_high": high}
    return result


def bootstrap_means(values: ArrayLike, groups: ArrayLike, n_resamples: int = 1000, confidence: float = 0.95,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Column means of ``values`` (N, K) and their percentile-bootstrap CIs, resampling ``groups``.

    The same group-level resampling as :func:`bootstrap_ci`, for per-case measures that are not
    classification metrics (a heatmap's hit or energy share). NaN entries are left out of each
    column's mean; a column that is all NaN gives NaN.
    """
    values = np.asarray(values, dtype=np.float64)
    group = _group_index(groups, len(values))
    n_groups = int(group.max()) + 1
    present = ~np.isnan(values)
    sums = np.zeros((n_groups, values.shape[1]))
    counts = np.zeros_like(sums)
    np.add.at(sums, group, np.where(present, values, 0.0))
    np.add.at(counts, group, present)
    resampled = []
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums.sum(axis=0) / counts.sum(axis=0)
        for draws in _draw_groups(np.random.default_rng(seed), n_groups, n_resamples, len(values)):
            weight = _multiplicities(draws, n_groups)
            resampled.append((weight @ sums) / (weight @ counts))
    resampled = np.concatenate(resampled)
    alpha = (1 - confidence) / 2
    lows, highs = np.full(len(means), np.nan), np.full(len(means), np.nan)
    for column in range(values.shape[1]):
        finite = resampled[:, column][np.isfinite(resampled[:, column])]
        if len(finite):
            lows[column], highs[column] = np.quantile(finite, [alpha, 1 - alpha])
    return means, lows, highs


def format_ci(entry: dict) -> str:
    """``value [low, high]`` to three decimals, ``value`` where there is no CI, ``n/a`` where undefined."""
    value, low, high = entry.get("value"), entry.get("ci_low"), entry.get("ci_high")
    if value is None or value != value:
        return "n/a"
    if low is None or low != low:
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def json_safe(value: Any) -> Any:
    """Results as strict-JSON data: NaN becomes None, numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, (float, np.floating)):
        return None if np.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


# --------------------------------------------------------------------------------------------
# Operating points chosen on validation, applied to test
# --------------------------------------------------------------------------------------------

def threshold_band(
    y_val: ArrayLike, p_val: ArrayLike, method: str = "youden", target: float | None = None, *,
    groups: ArrayLike | None = None, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0,
) -> tuple[float, float]:
    """How uncertain the operating threshold is: a percentile bootstrap interval of :func:`choose_threshold`.

    The validation cases (patients, with ``groups``) are resampled and the threshold re-chosen the same way
    on each resample; a probability inside the interval is "near the threshold": another draw of
    validation cases would have put the threshold on its other side about as easily. Resamples with
    one class only are skipped; ``(nan, nan)`` when more than half are.
    """
    def rechosen(y_true, y_score, _threshold):
        if np.all(y_true == y_true[0]):
            return float("nan")
        return choose_threshold(y_true, y_score, method, target)

    return bootstrap_ci(y_val, p_val, rechosen, groups=groups, n_resamples=n_resamples, confidence=confidence, seed=seed)


OPERATING_POINTS = (("youden", None), ("sensitivity", 0.90), ("sensitivity", 0.95), ("specificity", 0.90))
"""The operating points every evaluation reports: Youden's J and fixed sensitivity / specificity."""


def operating_point_name(method: str, target: float | None) -> str:
    """``youden``, ``sensitivity>=0.90``, ``specificity>=0.90``."""
    return method if target is None else f"{method}>={target:.2f}"


def operating_points(
    y_val: ArrayLike, p_val: ArrayLike, y_test: ArrayLike, p_test: ArrayLike, points=OPERATING_POINTS
) -> list[dict[str, Any]]:
    """For each operating point: the threshold chosen on validation and the rates it gives on both splits.

    The threshold is frozen before the test scores are looked at; the test sensitivity at a
    "sensitivity >= 0.90" point is whatever the frozen threshold gives, often below 0.90.
    """
    rows = []
    for method, target in points:
        threshold = choose_threshold(y_val, p_val, method, target)
        val, test = binary_metrics(y_val, p_val, threshold), binary_metrics(y_test, p_test, threshold)
        rows.append({"point": operating_point_name(method, target), "method": method, "target": target,
                     "threshold": threshold,
                     **{f"val_{k}": val[k] for k in ("sensitivity", "specificity")},
                     **{f"test_{k}": test[k] for k in ("sensitivity", "specificity", "precision", "accuracy")}})
    return rows


# --------------------------------------------------------------------------------------------
# Precision-recall and calibration
# --------------------------------------------------------------------------------------------


def pr_points(y_true: ArrayLike, y_score: ArrayLike) -> dict[str, Any]:
    """Precision-recall curve and average precision (scikit-learn), JSON-serialisable."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    y_true, y_score = _check_inputs(y_true, y_score)
    _check_two_classes(y_true, "pr_points")
    precision_values, recall_values, _ = precision_recall_curve(y_true, y_score)
    return {"precision": [float(v) for v in precision_values], "recall": [float(v) for v in recall_values],
            "average_precision": float(average_precision_score(y_true, y_score)),
            "prevalence": float(y_true.mean())}


def _check_probabilities(y_prob: np.ndarray) -> None:
    if y_prob.size and (y_prob.min() < 0.0 or y_prob.max() > 1.0):
        raise ValueError("calibration needs probabilities in [0, 1], not logits or other scores")


def brier_score(y_true: ArrayLike, y_prob: ArrayLike) -> float:
    """Mean squared difference between probability and outcome (0 is perfect)."""
    y_true, y_prob = _check_inputs(y_true, y_prob)
    _check_probabilities(y_prob)
    return float(np.mean((y_prob - y_true) ** 2)) if len(y_true) else float("nan")


def reliability_curve(y_true: ArrayLike, y_prob: ArrayLike, n_bins: int = 10) -> dict[str, list]:
    """Equal-width probability bins: mean predicted probability, observed frequency and count per bin.

    Empty bins are left out. The basis of the reliability diagram and of the ECE.
    """
    y_true, y_prob = _check_inputs(y_true, y_prob)
    _check_probabilities(y_prob)
    # Bin b holds (b/n, (b+1)/n]; probability 0 goes to the first bin.
    bins = np.clip(np.ceil(y_prob * n_bins).astype(int) - 1, 0, n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    mean_prob = np.bincount(bins, weights=y_prob, minlength=n_bins)
    observed = np.bincount(bins, weights=y_true.astype(float), minlength=n_bins)
    used = counts > 0
    return {"bin_low": [b / n_bins for b in np.flatnonzero(used)],
            "bin_high": [(b + 1) / n_bins for b in np.flatnonzero(used)],
            "mean_probability": (mean_prob[used] / counts[used]).tolist(),
            "observed_frequency": (observed[used] / counts[used]).tolist(),
            "count": counts[used].tolist()}


def expected_calibration_error(y_true: ArrayLike, y_prob: ArrayLike, n_bins: int = 10) -> float:
    """ECE: count-weighted mean |observed frequency - mean probability| over equal-width bins."""
    curve = reliability_curve(y_true, y_prob, n_bins)
    counts = np.asarray(curve["count"], dtype=float)
    if not counts.sum():
        return float("nan")
    gaps = np.abs(np.asarray(curve["observed_frequency"]) - np.asarray(curve["mean_probability"]))
    return float(np.sum(counts * gaps) / counts.sum())


def fit_temperature(y_true: ArrayLike, logits: ArrayLike) -> float:
    """Temperature T minimising the binary cross-entropy of ``sigmoid(logits / T)`` (Guo et al. 2017).

    Fit on validation data only. T > 1 softens over-confident probabilities; the ranking (and so
    the AUC) is unchanged.
    """
    from scipy.optimize import minimize_scalar

    y_true, logits = _check_inputs(y_true, logits)
    _check_two_classes(y_true, "fit_temperature")

    def loss(log_t: float) -> float:
        scaled = logits / np.exp(log_t)
        # log(1 + exp(-|z|)) + max(z, 0) - y z: the numerically stable BCE with logits.
        return float(np.mean(np.logaddexp(0.0, scaled) - y_true * scaled))

    found = minimize_scalar(loss, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(found.x))


# --------------------------------------------------------------------------------------------
# Paired comparison of two models on the same cases
# --------------------------------------------------------------------------------------------


def _midrank_structural_components(pos: np.ndarray, neg: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AUC and DeLong's placement values V10 (per positive) and V01 (per negative); ties count 1/2."""
    from scipy.stats import rankdata

    m, n = len(pos), len(neg)
    combined = rankdata(np.concatenate([pos, neg]))
    rank_pos, rank_neg = rankdata(pos), rankdata(neg)
    v10 = (combined[:m] - rank_pos) / n        # share of negatives below each positive
    v01 = 1.0 - (combined[m:] - rank_neg) / m  # share of positives above each negative
    return float(v10.mean()), v10, v01


def delong_test(y_true: ArrayLike, score_a: ArrayLike, score_b: ArrayLike, confidence: float = 0.95) -> dict[str, float]:
    """DeLong, DeLong and Clarke-Pearson (1988) test of two correlated ROC AUCs on the same cases.

    The cases are taken as independent: with several images of one patient the standard error is too
    small (use ``paired_bootstrap_auc_difference`` with the patients as groups).

    Returns:
        ``auc_a``, ``auc_b``, ``difference`` (b - a), its standard error, ``z``, the two-sided
        ``p_value`` and a normal-approximation CI of the difference; all but the AUCs and the
        difference are nan with a single positive or a single negative case.
    """
    from scipy.stats import norm

    y_true, score_a = _check_inputs(y_true, score_a)
    _, score_b = _check_inputs(y_true, score_b)
    _check_two_classes(y_true, "delong_test")
    positive = y_true == 1
    aucs, v10s, v01s = [], [], []
    for score in (score_a, score_b):
        auc, v10, v01 = _midrank_structural_components(score[positive], score[~positive])
        aucs.append(auc)
        v10s.append(v10)
        v01s.append(v01)
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # one case of a class: its covariance is nan, handled below
        s10, s01 = np.cov(np.vstack(v10s)), np.cov(np.vstack(v01s))
    covariance = s10 / positive.sum() + s01 / (~positive).sum()
    variance = covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1]
    difference = aucs[1] - aucs[0]
    if not np.isfinite(variance):  # one positive or one negative case: no variance to test against
        nan = float("nan")
        return {"auc_a": aucs[0], "auc_b": aucs[1], "difference": difference, "se": nan, "z": nan, "p_value": nan,
                "ci_low": nan, "ci_high": nan}
    se = float(np.sqrt(max(variance, 0.0)))
    z = difference / se if se > 0 else (0.0 if difference == 0 else float("inf") * np.sign(difference))
    half = norm.ppf(0.5 + confidence / 2) * se
    return {"auc_a": aucs[0], "auc_b": aucs[1], "difference": difference, "se": se, "z": float(z),
            "p_value": float(2 * norm.sf(abs(z))) if se > 0 else (1.0 if difference == 0 else 0.0),
            "ci_low": float(difference - half), "ci_high": float(difference + half)}


def paired_bootstrap_auc_difference(
    y_true: ArrayLike, score_a: ArrayLike, score_b: ArrayLike, *, groups: ArrayLike | None = None,
    n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0,
) -> dict[str, float]:
    """Percentile CI of AUC(b) - AUC(a) from the same patient-level resamples for both models.

    The p-value is the two-sided share of resampled differences on the other side of 0.
    """
    y_true, score_a = _check_inputs(y_true, score_a)
    _, score_b = _check_inputs(y_true, score_b)
    _check_bootstrap_args(n_resamples, confidence)
    group = _group_index(groups, len(y_true))
    # The vectorised AUCs of both models come from the same seed, hence the same resamples.
    auc_a = _bootstrap_all(y_true, score_a, 0.5, group, n_resamples, seed)["roc_auc"]
    auc_b = _bootstrap_all(y_true, score_b, 0.5, group, n_resamples, seed)["roc_auc"]
    differences = auc_b - auc_a
    low, high = _percentile_ci(differences, confidence, "auc difference")  # nan when most resamples are undefined
    differences = differences[np.isfinite(differences)]
    share_below = float(np.mean(differences <= 0)) if len(differences) else float("nan")
    share_above = float(np.mean(differences >= 0)) if len(differences) else float("nan")
    return {"difference": roc_auc(y_true, score_b) - roc_auc(y_true, score_a), "ci_low": low, "ci_high": high,
            "p_value": min(1.0, 2 * min(share_below, share_above)), "n_resamples": int(len(differences))}


def mcnemar_test(y_true: ArrayLike, label_a: ArrayLike, label_b: ArrayLike) -> dict[str, float]:
    """McNemar's test on the correctness of two models' labels for the same cases.

    Exact (binomial) when there are fewer than 25 discordant cases, else chi-squared with
    continuity correction.
    """
    from scipy.stats import binomtest, chi2

    y_true = np.asarray(y_true).astype(int)
    correct_a = np.asarray(label_a).astype(int) == y_true
    correct_b = np.asarray(label_b).astype(int) == y_true
    only_a, only_b = int(np.sum(correct_a & ~correct_b)), int(np.sum(~correct_a & correct_b))
    discordant = only_a + only_b
    if discordant == 0:
        return {"only_a_correct": 0, "only_b_correct": 0, "statistic": 0.0, "p_value": 1.0, "method": "none discordant"}
    if discordant < 25:
        p_value = binomtest(only_a, discordant, 0.5).pvalue
        return {"only_a_correct": only_a, "only_b_correct": only_b, "statistic": float(min(only_a, only_b)),
                "p_value": float(p_value), "method": "exact binomial"}
    statistic = (abs(only_a - only_b) - 1) ** 2 / discordant
    return {"only_a_correct": only_a, "only_b_correct": only_b, "statistic": float(statistic),
            "p_value": float(chi2.sf(statistic, 1)), "method": "chi-squared, continuity corrected"}
