"""Metrics per stratum of a manifest column (``--by sex``, ``--by size_mm:0,10,20,30,60``).

A model can be good on average and poor on subtle nodules, small nodules, or one sex. Each
stratum gets the same metrics and patient-level CIs as the whole split, and a warning where it is
too small for the numbers to mean anything.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd

from lungdx import metrics

MISSING = "(no value)"


@dataclass(frozen=True)
class Stratifier:
    """A column, and bin edges for numeric columns (``None``: one stratum per distinct value)."""

    column: str
    edges: tuple[float, ...] | None = None

    @property
    def title(self) -> str:
        return self.column if self.edges is None else f"{self.column} (bins {', '.join(_edge(e) for e in self.edges)})"


def parse_by(spec: str) -> Stratifier:
    """``column`` or ``column:e0,e1,...,ek`` (k bins [e0, e1), ..., [e(k-1), ek], edges increasing)."""
    column, _, edges = spec.partition(":")
    if not column:
        raise ValueError(f"--by {spec!r}: give a column name, optionally with bin edges (size_mm:0,10,20,30,60)")
    if not edges:
        return Stratifier(column)
    try:
        values = tuple(float(edge) for edge in edges.split(","))
    except ValueError:
        raise ValueError(f"--by {spec!r}: bin edges must be numbers separated by commas") from None
    if len(values) < 2 or any(b <= a for a, b in zip(values, values[1:], strict=False)):
        raise ValueError(f"--by {spec!r}: need at least two increasing bin edges")
    return Stratifier(column, values)


def _edge(value: float) -> str:
    return f"{value:g}"


def assign_strata(frame: pd.DataFrame, stratifier: Stratifier) -> pd.Series:
    """The stratum label of every row; missing values form their own stratum."""
    if stratifier.column not in frame.columns:
        known = ", ".join(c for c in frame.columns if c not in ("path", "cache_index"))
        raise ValueError(f"--by {stratifier.column}: no such column in the dataset (columns: {known})")
    values = frame[stratifier.column]
    if stratifier.edges is None:
        return values.map(lambda v: MISSING if _is_missing(v) else _label(v))
    numbers = pd.to_numeric(values, errors="coerce")
    edges = stratifier.edges
    labels = [f"[{_edge(a)}, {_edge(b)})" for a, b in zip(edges[:-2], edges[1:-1], strict=True)]
    labels.append(f"[{_edge(edges[-2])}, {_edge(edges[-1])}]")
    index = np.searchsorted(np.asarray(edges), numbers.to_numpy(), side="right") - 1
    index = np.where(numbers.to_numpy() == edges[-1], len(edges) - 2, index)  # the last bin is closed
    out = [MISSING if math.isnan(v) else (labels[i] if 0 <= i < len(labels) else "outside the bins")
           for v, i in zip(numbers.to_numpy(dtype=float), index, strict=True)]
    return pd.Series(out, index=frame.index)


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value == ""


def _label(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def subgroup_metrics(frame: pd.DataFrame, stratifiers: list[Stratifier], *, n_resamples: int = 1000,
                     confidence: float = 0.95, seed: int = 0, min_cases: int = 10, min_per_class: int = 5) -> list[dict]:
    """Metrics with CIs per stratum.

    Args:
        frame: one row per case with ``target``, ``probability``, ``decision`` (0/1 at the frozen threshold),
            ``patient_id`` and the stratifier columns (the dataset's own ``label`` among them, if asked for).
        min_cases, min_per_class: strata below these get a warning (and AUC n/a without both classes).

    Returns:
        One dict per (column, stratum): ``column``, ``stratum``, ``counts``, the metrics and ``warning``.
    """
    rows = []
    for stratifier in stratifiers:
        strata = assign_strata(frame, stratifier)
        for stratum in sorted(strata.unique(), key=_sort_key):
            part = frame[strata == stratum]
            rows.append({"column": stratifier.column, "title": stratifier.title, "stratum": stratum,
                         **_stratum_metrics(part, n_resamples, confidence, seed),
                         "warning": _warning(part, min_cases, min_per_class)})
    return rows


def _stratum_metrics(part: pd.DataFrame, n_resamples: int, confidence: float, seed: int) -> dict:
    y_true = part["target"].to_numpy()
    with _quiet(metrics.logger):  # undefined CIs in tiny strata are expected; the stratum's warning says so
        return metrics.labelled_metrics_with_ci(y_true, part["probability"].to_numpy(), part["decision"].to_numpy(),
                                                groups=part["patient_id"].to_numpy(), n_resamples=n_resamples,
                                                confidence=confidence, seed=seed)


@contextmanager
def _quiet(logger: logging.Logger):
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _warning(part: pd.DataFrame, min_cases: int, min_per_class: int) -> str | None:
    n, n_pos = len(part), int(part["target"].sum())
    if n_pos == 0 or n_pos == n:
        return f"only one class ({n} cases): AUC undefined, only the rate of that class means something"
    if n < min_cases or min(n_pos, n - n_pos) < min_per_class:
        return f"too small to say anything ({n} cases, {n_pos} positive): read the CI, not the value"
    return None


def _sort_key(stratum: str):
    # Numeric strata in numeric order, bins by their lower edge, missing last.
    if stratum == MISSING:
        return (2, 0.0, stratum)
    text = stratum.lstrip("[")
    try:
        return (0, float(text.split(",")[0]), stratum)
    except ValueError:
        return (1, 0.0, stratum)


def subgroup_markdown(rows: list[dict], confidence: float = 0.95) -> str:
    """One table per stratifier: cases, sensitivity, specificity, accuracy and AUC with CIs."""
    level = round(100 * confidence)
    lines = []
    for title in dict.fromkeys(row["title"] for row in rows):
        lines += [f"### By {title} ({level}% CI)", "",
                  "| Stratum | Cases (pos / neg) | Sensitivity | Specificity | Accuracy | ROC AUC | Note |",
                  "|---|---|---|---|---|---|---|"]
        for row in (r for r in rows if r["title"] == title):
            counts = row["counts"]
            cells = " | ".join(metrics.format_ci(row[name]) for name in ("sensitivity", "specificity", "accuracy", "roc_auc"))
            lines.append(f"| {row['stratum']} | {counts['n']} ({counts['n_pos']} / {counts['n_neg']}) | {cells} | "
                         f"{row['warning'] or ''} |")
        lines.append("")
    return "\n".join(lines)
