"""A judge that reads the patient's age, on a finished nodule_net CV, without retraining anything.

Per fold, a logistic regression of malignancy on age (scikit-learn, default L2 strength, age
standardised by the fold's training nodules) is fitted on the nodule cases of that fold's training
split (``nodule_outputs.csv`` rows with ``split == train``; cases without an age are left out of the
fit and scored at the training nodules' mean age). Each row then gets the task probability
P(nodule) x P(malignant | age), P(nodule) from the row's own presence logit, in place of the CNN
judge's P(malignant | crop). Ages come from ``labels.csv`` of the CV's data folder.

By default it pools the folds' **validation** rows (the evidence the rule in docs/results.md decides
on) and prints the age judge beside the CV's own judge on the same rows. ``--split test`` pools the
test folds, with 95% patient-level bootstrap CIs and DeLong against the CV's own judge; use it only
after the rule has decided.

    python docs/experiments/age_judge.py runs/jsrt-cv10-nodule-v5-dbo-long
    python docs/experiments/age_judge.py runs/jsrt-cv10-nodule-v5-dbo-long --split test

Not part of lungdx: an experiment whose result is reported in docs/results.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).parent))
from pointing_by_stratum import data_folder  # noqa: E402

from lungdx import metrics  # noqa: E402
from lungdx.predict import sigmoid  # noqa: E402


def ages_of(cv_dir: Path) -> pd.Series:
    """Age in years by case_id, from ``labels.csv`` of the CV's data folder (NaN where unknown)."""
    path = data_folder(cv_dir) / "labels.csv"
    labels = pd.read_csv(path, dtype={"case_id": str})
    if "age" not in labels.columns:
        raise SystemExit(f"{path} (the data of {cv_dir}): no age column")
    return pd.to_numeric(labels.set_index("case_id")["age"], errors="coerce")


def age_judged(rows: pd.DataFrame, ages: pd.Series) -> tuple[pd.DataFrame, dict[str, float]]:
    """One fold's ``nodule_outputs.csv`` rows with ``age_malignancy`` (P(malignant | age)) and ``age_task``
    (P(nodule) x that), the regression fitted on the fold's training nodules; and its coefficients."""
    rows = rows.assign(age=rows["case_id"].map(ages))
    train = rows[(rows["split"] == "train") & (rows["has_nodule"] == 1) & rows["age"].notna()]
    model = make_pipeline(StandardScaler(), LogisticRegression())
    model.fit(train[["age"]].to_numpy(float), train["malignant"].astype(int).to_numpy())
    filled = rows["age"].fillna(train["age"].mean()).to_numpy(float).reshape(-1, 1)
    malignancy = model.predict_proba(filled)[:, 1]
    scaler, logistic = model[0], model[1]
    coefficients = {"slope_per_10_years": float(logistic.coef_[0, 0] / scaler.scale_[0] * 10),
                    "train_nodules": len(train), "train_mean_age": float(train["age"].mean())}
    task = sigmoid(rows["presence_logit"].to_numpy(float)) * malignancy
    return rows.assign(age_malignancy=malignancy, age_task=task), coefficients


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cv_dir", type=Path, help="a finished lungdx cv folder of nodule_net (or an ensemble of them)")
    parser.add_argument("--split", choices=("val", "test"), default="val",
                        help="whose rows to pool: validation (default; decides) or test (only after the rule has decided)")
    args = parser.parse_args()
    ages = ages_of(args.cv_dir)
    folds = sorted((args.cv_dir / "runs").glob("*/nodule_outputs.csv"))
    if not folds:
        raise SystemExit(f"{args.cv_dir}: no runs/*/nodule_outputs.csv (not a finished nodule_net CV?)")
    pooled, slopes = [], []
    for path in folds:
        judged, coefficients = age_judged(pd.read_csv(path, dtype={"case_id": str}), ages)
        pooled.append(judged[judged["split"] == args.split].assign(fold=path.parent.name))
        slopes.append(coefficients["slope_per_10_years"])
        print(f"{path.parent.name}: {coefficients['train_nodules']} training nodules, mean age "
              f"{coefficients['train_mean_age']:.1f}, log-odds slope {coefficients['slope_per_10_years']:+.3f} per 10 years")
    rows = pd.concat(pooled, ignore_index=True)
    rest = (rows["malignant"].fillna(0) == 1).astype(int).to_numpy()
    cnn_task = rows["task_logit"].to_numpy(float)
    nodules = rows[rows["has_nodule"] == 1]
    benign_truth = nodules["malignant"].astype(int).to_numpy()
    print(f"{args.cv_dir} ({len(folds)} folds, {args.split}: {len(rows)} rows, {len(nodules)} nodule rows, "
          f"{int(rows['age'].isna().sum())} without an age); slopes {min(slopes):+.3f} to {max(slopes):+.3f} per 10 years")
    figures = {"malignant_vs_rest": (rest, rows["age_task"].to_numpy(), cnn_task),
               "malignant_vs_benign": (benign_truth, nodules["age_malignancy"].to_numpy(), nodules["malignancy_logit"].to_numpy())}
    for name, (truth, age_score, cnn_score) in figures.items():
        line = f"  {name}: age judge {metrics.roc_auc(truth, age_score):.3f}, CNN judge {metrics.roc_auc(truth, cnn_score):.3f}"
        if args.split == "test":
            groups = (rows if name == "malignant_vs_rest" else nodules)["patient_id"].to_numpy()
            low, high = metrics.bootstrap_ci(truth, age_score, "roc_auc", groups=groups)
            test = metrics.delong_test(truth, cnn_score, age_score)
            line += (f"; age judge 95% CI [{low:.3f}, {high:.3f}]; age - CNN {test['difference']:+.3f} "
                     f"[{test['ci_low']:+.3f}, {test['ci_high']:+.3f}], DeLong p = {test['p_value']:.3f}")
        print(line)
    if args.split == "test":
        print(f"  age alone, malignant_vs_rest: {metrics.roc_auc(rest, rows['age_malignancy'].to_numpy()):.3f}; "
              f"presence alone: {metrics.roc_auc(rest, rows['presence_logit'].to_numpy()):.3f}")


if __name__ == "__main__":
    main()
