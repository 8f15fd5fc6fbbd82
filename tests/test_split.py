import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lungdx.data.manifest import apply_task, load_dataset
from lungdx.data.split import (
    LeakageError,
    check_leakage,
    kfold_patients,
    split_patients,
)


def _frame(n_patients=60, images_per_patient=(1, 3), seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for patient in range(n_patients):
        target = int(rng.random() < 0.4)
        for image in range(rng.integers(*images_per_patient, endpoint=True)):
            rows.append({"patient_id": f"P{patient}", "case_id": f"P{patient}_{image}", "target": target})
    return pd.DataFrame(rows)


def test_split_is_patient_level_stratified_and_seeded():
    frame = _frame()
    first = split_patients(frame, seed=3)
    assert first.groupby("patient_id")["split"].nunique().max() == 1
    assert set(first["split"]) == {"train", "val", "test"}
    pd.testing.assert_series_equal(first["split"], split_patients(frame, seed=3)["split"])
    assert not first["split"].equals(split_patients(frame, seed=4)["split"])


def test_leakage_check_fails_loudly():
    frame = pd.DataFrame({"patient_id": ["a", "a", "b"], "split": ["train", "test", "val"]})
    with pytest.raises(LeakageError, match="1 patients appear in more than one split"):
        check_leakage(frame)


def test_kfold_patient_groups():
    frame = kfold_patients(_frame(), n_folds=5)
    assert sorted(frame["fold"].unique()) == [0, 1, 2, 3, 4]
    assert frame.groupby("patient_id")["fold"].nunique().max() == 1


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000), n_patients=st.integers(40, 120))
def test_split_fractions_and_class_ratio(seed, n_patients):
    frame = _frame(n_patients, (1, 1), seed)
    split = split_patients(frame, (0.7, 0.15, 0.15), seed)
    counts = split["split"].value_counts(normalize=True)
    assert abs(counts["train"] - 0.7) < 0.06 and abs(counts["test"] - 0.15) < 0.06
    overall = frame["target"].mean()
    for name in ("train", "val", "test"):
        part = split[split["split"] == name]
        assert abs(part["target"].mean() - overall) <= 1.5 / len(part) + 0.02


def test_jsrt_split_keeps_ratios(jsrt_dir):
    frame = split_patients(apply_task(load_dataset(jsrt_dir), "malignant_vs_rest"), seed=0)
    check_leakage(frame)
    sizes = frame["split"].value_counts()
    assert (sizes["train"], sizes["val"], sizes["test"]) in {(172, 37, 38), (173, 37, 37), (172, 38, 37)}
    for name in ("train", "val", "test"):
        assert abs(frame[frame["split"] == name]["target"].mean() - 100 / 247) < 0.03
