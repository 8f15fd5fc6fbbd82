"""Patient-level cross-validation: fold plans, inner validation splits, resume, summary."""

import json

import pandas as pd
import pytest
import yaml
from conftest import tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from lungdx.cv import CVPlan, cross_validate, fold_split, plan_folds


def _frame(patients_images, positive_every=3):
    rows = []
    for patient, n_images in enumerate(patients_images):
        for image in range(n_images):
            rows.append({"case_id": f"P{patient}-{image}", "patient_id": f"P{patient}", "path": f"/x/{patient}-{image}.png",
                         "target": int(patient % positive_every == 0)})
    return pd.DataFrame(rows)


@settings(max_examples=25, deadline=None)
@given(images=st.lists(st.integers(1, 4), min_size=30, max_size=60), folds=st.integers(2, 6), seed=st.integers(0, 99))
def test_a_patient_never_lands_in_two_folds(images, folds, seed):
    plan = plan_folds(_frame(images), CVPlan(folds=folds, repeats=2, seed=seed))
    for _, rows in plan.groupby("repeat"):
        assert (rows.groupby("patient_id")["fold"].nunique() == 1).all()
        assert set(rows["fold"]) == set(range(folds))
        assert len(rows) == sum(images)


def test_inner_validation_comes_from_the_training_folds_only():
    plan = plan_folds(_frame([2] * 40), CVPlan(folds=5, repeats=1, seed=0))
    for fold in range(5):
        split = fold_split(plan, fold, val_fraction=0.2, seed=fold)
        test_patients = set(plan.loc[plan["fold"] == fold, "patient_id"])
        assert set(split.loc[split["split"] == "test", "patient_id"]) == test_patients
        assert not test_patients & set(split.loc[split["split"] != "test", "patient_id"])
        assert (split.groupby("patient_id")["split"].nunique() == 1).all()
        assert {"train", "val", "test"} == set(split["split"])


def test_repeats_draw_different_folds_and_bad_plans_are_refused():
    plan = plan_folds(_frame([1] * 40), CVPlan(folds=4, repeats=2, seed=0))
    first = plan[plan["repeat"] == 0].set_index("case_id")["fold"]
    second = plan[plan["repeat"] == 1].set_index("case_id")["fold"]
    assert (first != second.loc[first.index]).any()
    with pytest.raises(ValueError, match="folds >= 2"):
        plan_folds(_frame([1] * 10), CVPlan(folds=1))
    with pytest.raises(ValueError, match="only 10 patients"):
        plan_folds(_frame([1] * 10), CVPlan(folds=20))


@pytest.fixture(scope="module")
def cv_run(phantom_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cv")
    config = tiny_config(phantom_dir, folder / "cache", "train.epochs=1", "eval.n_bootstrap=100")
    results = cross_validate(config, folder / "cv", CVPlan(folds=3, repeats=1, seed=0), by=("subtlety",))
    return config, folder / "cv", results


def test_cv_writes_per_fold_runs_and_a_summary(cv_run):
    _, out, results = cv_run
    for name in ("cv.md", "cv.json", "oof_predictions.csv", "roc_pooled.png", "folds.csv", "plan.yaml"):
        assert (out / name).is_file(), name
    assert len(results["per_fold"]) == 3
    for fold in range(3):
        assert (out / "runs" / f"r0-f{fold:02d}" / "evaluation" / "table1.json").is_file()
    text = (out / "cv.md").read_text()
    assert "mean +/- SD" in text and "Pooled out-of-fold" in text and "SYNTHETIC" in text
    summary = json.loads((out / "cv.json").read_text())
    assert summary["mean_sd"]["roc_auc"]["n_folds"] == 3
    assert "By subtlety" in text
    assert sum(row["counts"]["n"] for row in summary["subgroups"]) == summary["pooled"][0]["counts"]["n"]


def test_out_of_fold_predictions_cover_every_case_once(cv_run, phantom_dir):
    _, out, results = cv_run
    oof = pd.read_csv(out / "oof_predictions.csv", dtype={"case_id": str})
    folds = pd.read_csv(out / "folds.csv", dtype={"case_id": str})
    assert oof["case_id"].is_unique and set(oof["case_id"]) == set(folds["case_id"])
    # Each case was predicted by the fold model that held it out.
    merged = oof.merge(folds[["case_id", "fold"]], on="case_id", suffixes=("", "_planned"))
    assert (merged["fold"] == merged["fold_planned"]).all()
    assert results["pooled"][0]["counts"]["n"] == len(folds)


def test_cv_resumes_without_refitting_and_refuses_other_settings(cv_run):
    config, out, _ = cv_run
    model = out / "runs" / "r0-f01" / "model.pt"
    before = model.stat().st_mtime_ns
    (out / "runs" / "r0-f02" / "evaluation" / "table1.json").unlink()  # as if stopped before its evaluation
    cross_validate(config, out, CVPlan(folds=3, repeats=1, seed=0))
    assert model.stat().st_mtime_ns == before
    assert (out / "runs" / "r0-f02" / "evaluation" / "table1.json").is_file()
    with pytest.raises(FileExistsError, match="other settings"):
        cross_validate(config, out, CVPlan(folds=4, repeats=1, seed=0))
    # A plan written by an older lungdx lacks fields added since (at their defaults): still resumable.
    saved = yaml.safe_load((out / "plan.yaml").read_text())
    del saved["config"]["train"]["scheduler"]
    (out / "plan.yaml").write_text(yaml.safe_dump(saved))
    cross_validate(config, out, CVPlan(folds=3, repeats=1, seed=0))
    assert model.stat().st_mtime_ns == before
