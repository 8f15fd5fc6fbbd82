"""Patient-level splits: every image of a patient lands in one split, classes stay balanced."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

SPLITS = ("train", "val", "test")


class LeakageError(RuntimeError):
    """One patient appears in more than one split."""


def _patient_table(frame: pd.DataFrame) -> pd.DataFrame:
    # A patient counts as positive when any of their images is: keeps rare positives spread out.
    return frame.groupby("patient_id", sort=True)["target"].max().reset_index()


def split_patients(frame: pd.DataFrame, fractions=(0.70, 0.15, 0.15), seed: int = 0) -> pd.DataFrame:
    """Add a ``split`` column (train / val / test), stratified by class, at patient level.

    Args:
        frame: manifest with ``patient_id`` and ``target``.
        fractions: fractions of patients for train, validation and test (sum to 1).
        seed: seed of the random assignment.
    """
    train_fraction, val_fraction, test_fraction = fractions
    if not np.isclose(train_fraction + val_fraction + test_fraction, 1.0) or min(fractions) <= 0:
        raise ValueError(f"split fractions must be positive and sum to 1, got {tuple(fractions)}")
    patients = _patient_table(frame)
    rest, test = train_test_split(patients, test_size=test_fraction, random_state=seed,
                                  stratify=patients["target"])
    train, val = train_test_split(rest, test_size=val_fraction / (train_fraction + val_fraction),
                                  random_state=seed, stratify=rest["target"])
    assignment = {**dict.fromkeys(train["patient_id"], "train"), **dict.fromkeys(val["patient_id"], "val"),
                  **dict.fromkeys(test["patient_id"], "test")}
    frame = frame.copy()
    frame["split"] = frame["patient_id"].map(assignment)
    check_leakage(frame)
    return frame


def split_train_val(frame: pd.DataFrame, val_fraction: float, seed: int = 0) -> pd.DataFrame:
    """Split ``frame`` (training patients only) into ``train`` and ``val`` at patient level, stratified."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    patients = _patient_table(frame)
    train, val = train_test_split(patients, test_size=val_fraction, random_state=seed, stratify=patients["target"])
    assignment = {**dict.fromkeys(train["patient_id"], "train"), **dict.fromkeys(val["patient_id"], "val")}
    frame = frame.copy()
    frame["split"] = frame["patient_id"].map(assignment)
    return frame


def kfold_patients(frame: pd.DataFrame, n_folds: int = 5, seed: int = 0) -> pd.DataFrame:
    """Add a ``fold`` column (0 .. n_folds-1): stratified k-fold with patients as groups."""
    folds = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    frame = frame.copy()
    frame["fold"] = -1
    for fold, (_, held_out) in enumerate(folds.split(frame, frame["target"], groups=frame["patient_id"])):
        frame.iloc[held_out, frame.columns.get_loc("fold")] = fold
    check_leakage(frame, column="fold")
    return frame


def check_leakage(frame: pd.DataFrame, column: str = "split") -> None:
    """Raise LeakageError when any patient has images in more than one split (or fold)."""
    spread = frame.groupby("patient_id")[column].nunique()
    leaked = spread[spread > 1]
    if len(leaked):
        examples = ", ".join(map(str, leaked.index[:3]))
        raise LeakageError(f"{len(leaked)} patients appear in more than one {column} (e.g. {examples}): "
                           "results would be optimistic; split by patient_id")
