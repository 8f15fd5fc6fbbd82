"""Localisation results of a localising model (``nodule_net``): AUCs per question, FROC, pointing game,
lung Dice and the shortcut check, from the ``nodule_outputs.csv`` of its runs (pooled out-of-fold in CV).

Computed once here, shown by ``cv.cv_markdown``. Every interval is a 95% (or the configured level)
percentile bootstrap over patients.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

from lungdx import metrics

FROC_RATES = (0.5, 1.0, 2.0, 4.0)
POINTING_TOLERANCE = 1 / 32
"""Pointing game: the peak within the nodule radius + 16 px at 512 px (1/32 of the side, 11 mm on JSRT)."""
MIN_HIT_RADIUS = 1 / 64
"""FROC: a candidate hits a nodule within its radius, at least 8 px at 512 px (5.6 mm on JSRT)."""


def pointing_reach(radius, size: int, tolerance: float = POINTING_TOLERANCE):
    """How far from a nodule's centre a point still finds it: its radius + ``tolerance`` of ``size``."""
    return radius + tolerance * size


def pointing_hits(outputs: pd.DataFrame, size: int, tolerance: float = POINTING_TOLERANCE) -> np.ndarray:
    """1 / 0 per nodule case: is the map's peak within radius + tolerance (a fraction of ``size``)?"""
    nodules = outputs[outputs["has_nodule"] == 1]
    distance = np.hypot(nodules["peak_x"] - nodules["nodule_x"], nodules["peak_y"] - nodules["nodule_y"])
    return (distance <= pointing_reach(nodules["nodule_r"], size, tolerance)).to_numpy(dtype=float)


def froc_candidates(outputs: pd.DataFrame, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(score, is_hit, image index) of every candidate; a nodule counts once (its best-scoring hit).

    Candidates that hit an already-counted nodule are neither hits nor false positives (the usual
    FROC convention for several marks on one lesion).
    """
    scores, hits, images = [], [], []
    for index, row in enumerate(outputs.itertuples()):
        candidates = np.asarray(json.loads(row.candidates), dtype=float).reshape(-1, 3)
        counted = False
        has = row.has_nodule == 1 and math.isfinite(row.nodule_x)
        for x, y, score in candidates:  # highest first
            hit = has and math.hypot(x - row.nodule_x, y - row.nodule_y) <= max(row.nodule_r, MIN_HIT_RADIUS * size)
            if hit and counted:
                continue
            counted = counted or hit
            scores.append(score)
            hits.append(hit)
            images.append(index)
    return np.asarray(scores), np.asarray(hits, dtype=bool), np.asarray(images, dtype=int)


def froc(outputs: pd.DataFrame, size: int, rates=FROC_RATES) -> dict[float, float]:
    """Sensitivity (share of nodules found) at each false-positive rate per image."""
    scores, hits, _ = froc_candidates(outputs, size)
    return _froc_from(scores, hits, int((outputs["has_nodule"] == 1).sum()), len(outputs), rates)


def _froc_from(scores, hits, n_nodules: int, n_images: int, rates) -> dict[float, float]:
    """Sensitivity at each rate of false positives per image, at thresholds between distinct scores only: a
    threshold cannot split candidates of equal score, so the row order of a tie never decides."""
    order = np.argsort(-scores, kind="stable")
    true_positives, false_positives = np.cumsum(hits[order]), np.cumsum(~hits[order])
    ranked = scores[order]
    group_end = np.r_[ranked[1:] != ranked[:-1], True]
    result = {}
    for rate in rates:
        allowed = group_end & (false_positives <= rate * n_images)
        result[rate] = float(true_positives[allowed].max() / n_nodules) if allowed.any() and n_nodules else 0.0
    return result


def froc_with_ci(outputs: pd.DataFrame, size: int, *, n_resamples: int = 1000, confidence: float = 0.95,
                 seed: int = 0, rates=FROC_RATES) -> dict[str, dict]:
    """FROC sensitivities with a patient-level bootstrap CI."""
    scores, hits, images = froc_candidates(outputs, size)
    has = (outputs["has_nodule"] == 1).to_numpy()
    point = _froc_from(scores, hits, int(has.sum()), len(outputs), rates)
    patients = outputs["patient_id"].astype(str).to_numpy()
    unique, patient_of_image = np.unique(patients, return_inverse=True)
    rng = np.random.default_rng(seed)
    draws = {rate: [] for rate in rates}
    for _ in range(n_resamples):
        weight = np.bincount(rng.integers(len(unique), size=len(unique)), minlength=len(unique))[patient_of_image]
        repeat = weight[images]
        n_nodules = int((weight * has).sum())
        if not n_nodules:
            continue
        resampled = _froc_from(np.repeat(scores, repeat), np.repeat(hits, repeat), n_nodules, int(weight.sum()), rates)
        for rate in rates:
            draws[rate].append(resampled[rate])
    alpha = (1 - confidence) / 2
    return {f"{rate:g}": {"value": point[rate], "ci_low": float(np.quantile(draws[rate], alpha)),
                          "ci_high": float(np.quantile(draws[rate], 1 - alpha))} for rate in rates}


def _auc_entry(y_true, score, groups, settings) -> dict:
    y_true, score = np.asarray(y_true, int), np.asarray(score, float)
    low, high = metrics.bootstrap_ci(y_true, score, "roc_auc", groups=groups, **settings)
    return {"value": metrics.roc_auc(y_true, score), "ci_low": low, "ci_high": high, "n": int(len(y_true)),
            "n_pos": int(y_true.sum())}


def _mean_entry(values, groups, settings) -> dict:
    values = np.asarray(values, float)
    means, lows, highs = metrics.bootstrap_means(values[:, None], groups, settings["n_resamples"], settings["confidence"],
                                                 settings["seed"])
    return {"value": float(means[0]), "ci_low": float(lows[0]), "ci_high": float(highs[0]), "n": int(np.isfinite(values).sum())}


def summarise_localisation(outputs: pd.DataFrame, size: int, *, n_resamples: int = 1000, confidence: float = 0.95,
                           seed: int = 0) -> dict:
    """Every localisation measure on ``outputs`` (test rows of ``nodule_outputs.csv``, pooled across folds)."""
    settings = {"n_resamples": n_resamples, "confidence": confidence, "seed": seed}
    groups = outputs["patient_id"].astype(str).to_numpy()
    has = (outputs["has_nodule"] == 1).to_numpy()
    malignant = (outputs["malignant"].fillna(0) == 1).to_numpy()
    import torch

    from lungdx.models.nodule_net import combine_logits

    rest = combine_logits(torch.tensor(outputs["presence_logit"].to_numpy()),
                          torch.tensor(outputs["malignancy_logit"].to_numpy())).numpy()
    # The shortcut logit is the run's task logit: malignant_vs_rest's only when that was the task.
    same = np.allclose(outputs["task_logit"].to_numpy(float), rest, atol=1e-3)
    shortcut_rest = outputs["shortcut_task_logit"].to_numpy() if same else None
    nodule_rows = outputs[has]
    result = {
        "n_images": int(len(outputs)), "n_nodules": int(has.sum()), "image_size": size,
        "nodule_vs_normal_auc": _auc_entry(has, outputs["presence_logit"], groups, settings),
        "malignant_vs_rest_auc": _auc_entry(malignant, rest, groups, settings),
        "malignant_vs_benign_auc": _auc_entry(nodule_rows["malignant"].astype(int), nodule_rows["malignancy_logit"],
                                              nodule_rows["patient_id"].astype(str).to_numpy(), settings),
        "froc": froc_with_ci(outputs, size, **settings),
        "pointing_game": _mean_entry(pointing_hits(outputs, size), nodule_rows["patient_id"].astype(str).to_numpy(),
                                     settings),
        "pointing_tolerance_px": POINTING_TOLERANCE * size,
        "lung_dice": _mean_entry(outputs["lung_dice"], groups, settings),
        "failed_segmentations": int((~outputs["lung_ok"].astype(bool)).sum()) if "lung_ok" in outputs else
        int((outputs["lung_fraction"] < 0.05).sum()),
        "shortcut": {"nodule_vs_normal_auc": _auc_entry(has, outputs["shortcut_presence_logit"], groups, settings)},
    }
    result["shortcut"]["nodule_vs_normal_change"] = (result["shortcut"]["nodule_vs_normal_auc"]["value"]
                                                     - result["nodule_vs_normal_auc"]["value"])
    if shortcut_rest is not None:
        result["shortcut"]["malignant_vs_rest_auc"] = _auc_entry(malignant, shortcut_rest, groups, settings)
        result["shortcut"]["malignant_vs_rest_change"] = (result["shortcut"]["malignant_vs_rest_auc"]["value"]
                                                          - result["malignant_vs_rest_auc"]["value"])
    if "blacked_lung_share" in outputs:
        result["shortcut"]["lungs_untouched"] = _untouched_shortcut(outputs, has, groups, settings)
    return result


def _untouched_shortcut(outputs: pd.DataFrame, has: np.ndarray, groups: np.ndarray, settings: dict) -> dict:
    """The shortcut check on the images whose lung field (JSRT's mask) the black-out leaves whole.

    On the other images the black-out also removes lung, and a nodule there, which lowers the AUC
    without any shortcut; on these a change can only come from what lies outside the lungs.
    """
    keep = (outputs["blacked_lung_share"] == 0).to_numpy()
    entry = {"n": int(keep.sum()), "n_pos": int(has[keep].sum())}
    if 0 < entry["n_pos"] < entry["n"]:
        before = _auc_entry(has[keep], outputs["presence_logit"][keep], groups[keep], settings)
        after = _auc_entry(has[keep], outputs["shortcut_presence_logit"][keep], groups[keep], settings)
        entry.update(nodule_vs_normal_auc=before, shortcut_auc=after, change=after["value"] - before["value"])
    return entry


def localisation_markdown(result: dict, confidence: float = 0.95) -> str:
    """The localisation section of ``cv.md``."""
    level = round(100 * confidence)
    fmt = metrics.format_ci
    froc_cells = ", ".join(f"{rate} FP/image: {fmt(entry)}" for rate, entry in result["froc"].items())
    lines = [f"## Localisation and the three questions (pooled out-of-fold, {level}% patient-level bootstrap CI)", "",
             "| Measure | Value |", "|---|---|",
             f"| nodule_vs_normal AUC (map peak) | {fmt(result['nodule_vs_normal_auc'])} |",
             f"| malignant_vs_rest AUC (P(nodule) x P(malignant)) | {fmt(result['malignant_vs_rest_auc'])} |",
             f"| malignant_vs_benign AUC (nodule cases, judge at the peak) | {fmt(result['malignant_vs_benign_auc'])} |",
             f"| FROC sensitivity | {froc_cells} |",
             f"| Pointing game (peak within r + {result['pointing_tolerance_px']:g} px) | {fmt(result['pointing_game'])} "
             f"of {result['n_nodules']} nodules |",
             f"| Lung Dice (segmentation vs JSRT masks, {result['image_size'] // 4} px) | {fmt(result['lung_dice'])} |",
             f"| Failed segmentations (lung field outside 5-60% of the image) | {result['failed_segmentations']} |",
             f"| Shortcut check: nodule_vs_normal AUC with corners and borders blacked out | "
             f"{fmt(result['shortcut']['nodule_vs_normal_auc'])} (change {result['shortcut']['nodule_vs_normal_change']:+.3f}) |"]
    if "malignant_vs_rest_auc" in result["shortcut"]:
        lines.append(f"| Shortcut check: malignant_vs_rest AUC, same images | {fmt(result['shortcut']['malignant_vs_rest_auc'])} "
                     f"(change {result['shortcut']['malignant_vs_rest_change']:+.3f}) |")
    untouched = result["shortcut"].get("lungs_untouched", {})
    if "change" in untouched:
        lines.append(f"| Shortcut check on the {untouched['n']} images whose lungs the black-out leaves whole: "
                     f"nodule_vs_normal AUC | {fmt(untouched['nodule_vs_normal_auc'])} -> {fmt(untouched['shortcut_auc'])} "
                     f"(change {untouched['change']:+.3f}) |")
    lines += ["", f"{result['n_images']} images, {result['n_nodules']} nodules. FROC: a candidate (local maximum of the map, "
              "at least 24 px from a higher one, 5 per image) hits a nodule within its radius (at least "
              f"{MIN_HIT_RADIUS * result['image_size']:g} px); scores are pooled across folds.", ""]
    return "\n".join(lines)
