"""Per-stratum metrics: parsing --by, binning, warnings on strata too small to say anything."""

import numpy as np
import pandas as pd
import pytest

from lungdx.subgroups import MISSING, Stratifier, assign_strata, parse_by, subgroup_markdown, subgroup_metrics


def test_parse_by():
    assert parse_by("sex") == Stratifier("sex")
    assert parse_by("size_mm:0,10,20") == Stratifier("size_mm", (0.0, 10.0, 20.0))
    for bad, message in (("size_mm:10,5", "increasing"), ("size_mm:a,b", "numbers"), (":1,2", "column name"),
                         ("size_mm:3", "two increasing")):
        with pytest.raises(ValueError, match=message):
            parse_by(bad)


def test_bins_are_half_open_with_a_closed_last_bin_and_missing_values_kept():
    frame = pd.DataFrame({"size_mm": [0, 9.9, 10, 30, 60, 61, np.nan, None]})
    strata = assign_strata(frame, parse_by("size_mm:0,10,30,60")).tolist()
    assert strata == ["[0, 10)", "[0, 10)", "[10, 30)", "[30, 60]", "[30, 60]", "outside the bins", MISSING, MISSING]


def test_categorical_strata_and_unknown_column():
    frame = pd.DataFrame({"subtlety": [1.0, 5.0, np.nan], "sex": ["male", "female", ""]})
    assert assign_strata(frame, Stratifier("subtlety")).tolist() == ["1", "5", MISSING]
    assert assign_strata(frame, Stratifier("sex")).tolist() == ["male", "female", MISSING]
    with pytest.raises(ValueError, match="no such column.*subtlety"):
        assign_strata(frame, Stratifier("size"))


def test_subgroup_metrics_match_the_stratum_and_warn_when_small():
    rng = np.random.default_rng(0)
    n = 200
    frame = pd.DataFrame({"patient_id": [f"P{i}" for i in range(n)], "target": rng.integers(0, 2, n),
                          "sex": np.where(np.arange(n) < 190, "female", "male")})
    frame["probability"] = np.clip(frame["target"] * 0.3 + rng.uniform(0, 0.7, n), 0, 1)
    frame["decision"] = (frame["probability"] >= 0.5).astype(int)
    rows = {row["stratum"]: row for row in subgroup_metrics(frame, [Stratifier("sex")], n_resamples=200)}
    female = frame[frame["sex"] == "female"]
    expected = ((female["decision"] == 1) & (female["target"] == 1)).sum() / (female["target"] == 1).sum()
    assert rows["female"]["sensitivity"]["value"] == pytest.approx(expected)
    assert rows["female"]["warning"] is None
    assert "too small" in rows["male"]["warning"] or "one class" in rows["male"]["warning"]
    assert "| female | 190" in subgroup_markdown(list(rows.values()))
