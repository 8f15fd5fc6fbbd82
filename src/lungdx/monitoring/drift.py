"""Drift measures: pure functions of a reference and a window of logged predictions.

- Score drift: the population stability index (PSI) over bins at the reference's quantiles, and the
  two-sample Kolmogorov-Smirnov test (scipy).
- Input drift: the PSI of the mean raw-pixel intensity histogram and the KS test of the per-image
  mean intensity; the acquisition fields (manufacturer, view, photometric interpretation, spacing,
  size) as the share of the window with a value the reference never had.

A check on too few cases says so ("insufficient data") instead of alerting.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lungdx.monitoring.settings import MonitorSettings
from lungdx.reference import ACQUISITION_FIELDS

PSI_FLOOR = 1e-4
"""Empty bins are floored to this fraction, so the PSI stays finite."""


def population_stability_index(expected: Sequence[float], actual: Sequence[float]) -> float:
    """PSI = sum((a - e) ln(a / e)) of two distributions over the same bins (counts or fractions)."""
    expected, actual = np.asarray(expected, dtype=np.float64), np.asarray(actual, dtype=np.float64)
    if expected.shape != actual.shape or expected.ndim != 1 or expected.size < 2:
        raise ValueError(f"PSI needs two distributions over the same >= 2 bins; got {expected.shape} and {actual.shape}")
    if expected.sum() <= 0 or actual.sum() <= 0:
        raise ValueError("PSI needs non-empty distributions")
    e = np.maximum(expected / expected.sum(), PSI_FLOOR)
    a = np.maximum(actual / actual.sum(), PSI_FLOOR)
    e, a = e / e.sum(), a / a.sum()
    return float(np.sum((a - e) * np.log(a / e)))


PSI_CASES_PER_BIN = 10
"""Reference cases per score bin: with fewer the PSI measures sampling noise more than drift."""


def score_psi(reference: Sequence[float], window: Sequence[float], max_bins: int = 10) -> float | None:
    """PSI of scores over bins at the reference's quantiles (:data:`PSI_CASES_PER_BIN` reference cases per bin).

    Returns None when the reference is too small for two such bins.
    """
    reference, window = np.asarray(reference, dtype=np.float64), np.asarray(window, dtype=np.float64)
    n_bins = min(len(reference) // PSI_CASES_PER_BIN, max_bins)
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, n_bins + 1)[1:-1])) if n_bins >= 2 else []
    if len(edges) == 0:
        return None
    expected = np.bincount(np.searchsorted(edges, reference, side="right"), minlength=len(edges) + 1)
    actual = np.bincount(np.searchsorted(edges, window, side="right"), minlength=len(edges) + 1)
    return population_stability_index(expected, actual)


def ks_test(reference: Sequence[float], window: Sequence[float]) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov ``(statistic, p_value)``."""
    from scipy.stats import ks_2samp

    result = ks_2samp(np.asarray(reference, dtype=np.float64), np.asarray(window, dtype=np.float64))
    return float(result.statistic), float(result.pvalue)


def unseen_share(reference_counts: dict[str, int], values: Sequence[str | None]) -> tuple[float, list[str]]:
    """Share of ``values`` never seen in the reference, and those values (most frequent first)."""
    seen = {key for key, count in reference_counts.items() if count}
    unseen = [value or "" for value in values if (value or "") not in seen]
    ordered = sorted(set(unseen), key=lambda v: -unseen.count(v))
    return (len(unseen) / len(values) if len(values) else 0.0), ordered


def _check(name: str, kind: str, value: float | None, limit: float, alert: bool, status: str, detail: str, n: int) -> dict:
    return {"name": name, "kind": kind, "value": value, "limit": limit, "alert": bool(alert), "status": status,
            "detail": detail, "n": n}


def _psi_check(name: str, kind: str, psi: float | None, limit: float, n: int, status: str) -> dict:
    if status != "ok":
        return _check(name, kind, None, limit, False, status, status, n)
    if psi is None:
        return _check(name, kind, None, limit, False, "insufficient reference",
                      f"the PSI needs at least {2 * PSI_CASES_PER_BIN} reference cases with distinct values", n)
    alert = psi > limit
    return _check(name, kind, psi, limit, alert, "alert" if alert else "ok", f"PSI {psi:.3f} (limit {limit:g})", n)


def _ks_check(name: str, kind: str, ks: tuple[float, float] | None, alpha: float, n: int, status: str) -> dict:
    if status != "ok" or ks is None:
        return _check(name, kind, None, alpha, False, status, status, n)
    alert = ks[1] < alpha
    return _check(name, kind, ks[1], alpha, alert, "alert" if alert else "ok",
                  f"KS statistic {ks[0]:.3f}, p = {ks[1]:.2g} (alert below {alpha:g})", n)


def drift_checks(reference: dict | None, window: dict, settings: MonitorSettings) -> list[dict]:
    """Every drift check of a window against the reference.

    Args:
        reference: ``lungdx.reference.load_reference`` output, or None.
        window: ``probability`` (list), ``intensity_mean`` (list), ``intensity_histogram`` (list of lists)
            and one list per field of ``ACQUISITION_FIELDS``, all over the same predictions.
    """
    n = len(window["probability"])
    reference = reference or {}
    checks = []
    ref_scores = reference.get("probabilities") or []
    status = _status(n, len(ref_scores), settings, "no validation scores in the reference")
    ok = status == "ok"
    checks.append(_psi_check("score_psi", "score", score_psi(ref_scores, window["probability"]) if ok else None,
                             settings.score_psi_limit, n, status))
    checks.append(_ks_check("score_ks", "score", ks_test(ref_scores, window["probability"]) if ok else None,
                            settings.ks_alpha, n, status))
    intensity = reference.get("intensity") or {}
    status = _status(n, intensity.get("n_images", 0), settings, "no validation images in the reference")
    ok = status == "ok"
    psi = population_stability_index(intensity["histogram"], np.mean(window["intensity_histogram"], axis=0)) if ok else None
    checks.append(_psi_check("intensity_psi", "input", psi, settings.intensity_psi_limit, n, status))
    checks.append(_ks_check("intensity_ks", "input", ks_test(intensity["mean"], window["intensity_mean"]) if ok else None,
                            settings.ks_alpha, n, status))
    acquisition = reference.get("acquisition") or {}
    for field in ACQUISITION_FIELDS:
        counts = acquisition.get(field) or {}
        if not any(key for key in counts):
            checks.append(_check(field, "acquisition", None, settings.unseen_share_limit, False, "no reference",
                                 "the reference images do not carry this field", n))
            continue
        if n < settings.min_samples:
            checks.append(_check(field, "acquisition", None, settings.unseen_share_limit, False, "insufficient data",
                                 f"{n} predictions in the window; {settings.min_samples} needed", n))
            continue
        share, values = unseen_share(counts, window[field])
        alert = share > settings.unseen_share_limit
        shown = ", ".join(v or "(missing)" for v in values[:3])
        checks.append(_check(field, "acquisition", share, settings.unseen_share_limit, alert, "alert" if alert else "ok",
                             f"{share:.0%} of the window unseen in the reference" + (f" ({shown})" if shown else ""), n))
    return checks


def _status(n: int, n_reference: int, settings: MonitorSettings, missing: str) -> str:
    if n_reference == 0:
        return missing
    if n_reference < settings.min_reference:
        return f"insufficient reference ({n_reference} cases; {settings.min_reference} needed)"
    if n < settings.min_samples:
        return "insufficient data"
    return "ok"
