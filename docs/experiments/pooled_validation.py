"""The pooled validation figures of finished nodule_net CVs: the evidence the rules in docs/results.md decide on.

Each fold's validation split (never trained on; it chose the stopping epochs and the threshold, so it
is a little optimistic), scored by that fold's own model (``nodule_outputs.csv``, rows with
``split == val``), pooled over the folds. Test folds are not read unless asked for.

    python docs/experiments/pooled_validation.py runs/jsrt-cv10-nodule-v5 runs/jsrt-cv10-nodule-ens

``--split train`` gives the same figures on each fold's own training images (unaugmented, no
insertions): how closely the detectors fit what they were trained on. ``--split test`` pools the
test folds, for use only after a rule has decided.

``--by-subtlety`` adds the presence AUC of each subtlety group's nodule rows against all normal rows
(subtlety from the ``labels.csv`` of the CV's data folder, as ``pointing_by_stratum.py`` reads it):
where the presence AUC is lost.

``--candidate-rank`` adds, per subtlety group, the rank (1-5) of the first of the map's candidates
that lies within the pointing game's reach of the nodule (radius + 1/32 of the side), or "none":
how many missed nodules a better ranking of the candidates could still find, and how many the map
does not offer at all.

``--describe-ranks`` adds, for the most subtle nodule rows (subtlety 1-2) at rank 1, ranks 2-5 and
not a candidate: how many rows and distinct cases, their median size, malignant share and lobe
(JSRT's ``location``).

``--against REF`` adds paired DeLong tests against another CV on the same folds (same rows: fold and
case): the nodule vs normal AUC (presence logits) and the malignant vs rest AUC (task logits),
difference = this CV less REF.

Not part of lungdx: an experiment whose result is reported in docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from pointing_by_stratum import data_folder, labels_of  # noqa: E402
from size_judge_refit import validation_summary  # noqa: E402

from lungdx import metrics  # noqa: E402
from lungdx.localisation import pointing_reach  # noqa: E402

SUBTLETY_GROUPS = {"1-2 (most subtle)": (1, 2), "3": (3,), "4-5 (obvious)": (4, 5)}


def presence_by_subtlety(rows: pd.DataFrame, labels: pd.DataFrame) -> dict[str, tuple[int, float]]:
    """Per subtlety group: (nodule rows, presence AUC of those rows against every normal row)."""
    subtlety = rows["case_id"].map(labels.set_index("case_id")["subtlety"])
    missing = rows.loc[(rows["has_nodule"] == 1) & subtlety.isna(), "case_id"]
    if len(missing):
        raise SystemExit(f"labels.csv of the CV's data folder gives no subtlety for nodule cases {', '.join(missing[:5])}: "
                         "is it JSRT's?")
    normals = rows[rows["has_nodule"] == 0]
    found = {}
    for name, levels in SUBTLETY_GROUPS.items():
        nodules = rows[(rows["has_nodule"] == 1) & subtlety.isin(levels)]
        truth = np.r_[np.ones(len(nodules)), np.zeros(len(normals))]
        scores = np.r_[nodules["presence_logit"].to_numpy(), normals["presence_logit"].to_numpy()]
        found[name] = len(nodules), metrics.roc_auc(truth, scores)
    return found


def nodule_ranks(rows: pd.DataFrame, size: int = 512) -> pd.Series:
    """Per nodule row: the rank (1-5) of the first of the map's candidates within the pointing game's reach, 0 if none."""
    nodules = rows[rows["has_nodule"] == 1]
    ranks = []
    for row in nodules.itertuples():
        candidates = np.asarray(json.loads(row.candidates), dtype=float).reshape(-1, 3)
        distance = np.hypot(candidates[:, 0] - row.nodule_x, candidates[:, 1] - row.nodule_y)
        hit = np.flatnonzero(distance <= pointing_reach(row.nodule_r, size))
        ranks.append(int(hit[0]) + 1 if len(hit) else 0)  # 0: no candidate on the nodule
    return pd.Series(ranks, index=nodules.index, dtype=int)


def candidate_ranks(rows: pd.DataFrame, labels: pd.DataFrame, size: int = 512) -> dict[str, dict[str, int]]:
    """Per subtlety group: how many nodule rows have their first hitting candidate at rank 1, 2, ... or none."""
    ranks = nodule_ranks(rows, size)
    subtlety = rows.loc[ranks.index, "case_id"].map(labels.set_index("case_id")["subtlety"])
    found = {}
    for name, levels in SUBTLETY_GROUPS.items():
        counts = ranks[subtlety.isin(levels)].value_counts()
        found[name] = {str(rank): int(counts[rank]) for rank in sorted(counts.index) if rank} | (
            {"none": int(counts[0])} if 0 in counts.index else {})
    return found


def describe_ranks(rows: pd.DataFrame, labels: pd.DataFrame, size: int = 512) -> dict[str, dict]:
    """The most subtle nodule rows (subtlety 1-2) by where the map put them (rank 1, ranks 2-5, not a candidate):
    rows, distinct cases, median size (mm), malignant share and JSRT's lobe (upper, middle, lower, other)."""
    ranks = nodule_ranks(rows, size)
    nodules = rows.loc[ranks.index].assign(rank=ranks).merge(labels[["case_id", "subtlety", "size_mm", "location"]],
                                                             on="case_id", how="left")
    nodules = nodules[nodules["subtlety"].isin((1, 2))]
    lobe = nodules["location"].astype(str).str.extract(r"(upper|middle|lower)", expand=False).fillna("other")
    found = {}
    for name, chosen in (("rank 1", nodules["rank"] == 1), ("ranks 2-5", nodules["rank"] > 1),
                         ("not a candidate", nodules["rank"] == 0)):
        group = nodules[chosen]
        found[name] = {"rows": len(group), "cases": group["case_id"].nunique(),
                       "median_size_mm": float(group["size_mm"].median()) if len(group) else float("nan"),
                       "malignant": round(float(group["malignant"].mean()), 2) if len(group) else float("nan"),
                       "lobe": {key: int(value) for key, value in lobe[chosen].value_counts().items()}}
    return found


def pooled_rows(cv_dir: Path, split: str) -> tuple[pd.DataFrame, int]:
    """The ``split`` rows of every fold's ``nodule_outputs.csv`` (a ``fold`` column added), and the number of folds."""
    folds = sorted((cv_dir / "runs").glob("*/nodule_outputs.csv"))
    if not folds:
        raise SystemExit(f"{cv_dir}: no runs/*/nodule_outputs.csv (is it a finished nodule_net CV?)")
    rows = pd.concat([pd.read_csv(path, dtype={"case_id": str}).assign(fold=path.parent.name) for path in folds],
                     ignore_index=True)
    return rows[rows["split"] == split], len(folds)


def paired_tests(rows: pd.DataFrame, reference: pd.DataFrame, names: tuple[Path, Path]) -> dict[str, dict[str, float]]:
    """DeLong tests of ``rows`` against ``reference`` on the same (fold, case) rows: presence and malignant vs rest
    (``names``: the two CV folders, for the error when their rows differ)."""
    key = ["fold", "case_id"]
    joined = rows.merge(reference, on=key, suffixes=("", "_ref"), validate="one_to_one")
    if len(joined) != len(rows) or len(joined) != len(reference):
        raise SystemExit(f"{names[0]} and {names[1]} share {len(joined)} rows of {len(rows)} and {len(reference)}: "
                         "not the same folds")
    rest = (joined["malignant"].fillna(0) == 1).astype(int).to_numpy()
    return {"nodule_vs_normal": metrics.delong_test(joined["has_nodule"].to_numpy(), joined["presence_logit_ref"].to_numpy(),
                                                    joined["presence_logit"].to_numpy()),
            "malignant_vs_rest": metrics.delong_test(rest, joined["task_logit_ref"].to_numpy(), joined["task_logit"].to_numpy())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cv_dirs", type=Path, nargs="+")
    parser.add_argument("--split", choices=("val", "train", "test"), default="val",
                        help="whose rows to pool: validation (default), the folds' own training images, or test")
    parser.add_argument("--by-subtlety", action="store_true",
                        help="also the presence AUC per JSRT subtlety group against the normals")
    parser.add_argument("--candidate-rank", action="store_true",
                        help="also, per subtlety group, the rank of the first candidate on the nodule (or none)")
    parser.add_argument("--describe-ranks", action="store_true",
                        help="also the most subtle nodule rows by where the map put them: size, malignancy, lobe")
    parser.add_argument("--against", type=Path, metavar="REF",
                        help="also paired DeLong tests against this CV's rows (same folds): presence and malignant vs rest")
    args = parser.parse_args()
    reference = pooled_rows(args.against, args.split)[0] if args.against else None
    for cv_dir in args.cv_dirs:
        rows, folds = pooled_rows(cv_dir, args.split)
        summary = validation_summary(rows)
        print(f"{cv_dir} ({folds} folds, {args.split}):", {key: round(float(value), 3) for key, value in summary.items()})
        if args.by_subtlety:
            for name, (count, auc) in presence_by_subtlety(rows, labels_of(cv_dir)).items():
                print(f"  subtlety {name}: {count} nodule rows, presence AUC against the normals {auc:.3f}")
        if args.candidate_rank:
            for name, counts in candidate_ranks(rows, labels_of(cv_dir)).items():
                print(f"  subtlety {name}: first candidate on the nodule at rank", counts)
        if args.describe_ranks:
            labels = pd.read_csv(data_folder(cv_dir) / "labels.csv").astype({"subtlety": "Int64"})
            for name, described in describe_ranks(rows, labels).items():
                print(f"  subtlety 1-2, {name}:", described)
        if reference is not None:
            for name, test in paired_tests(rows, reference, (cv_dir, args.against)).items():
                print(f"  against {args.against}, {name}: {test['auc_b']:.3f} vs {test['auc_a']:.3f}, difference "
                      f"{test['difference']:+.3f} [{test['ci_low']:+.3f}, {test['ci_high']:+.3f}], DeLong p = {test['p_value']:.3f}")


if __name__ == "__main__":
    main()
