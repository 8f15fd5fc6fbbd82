"""The pooled validation figures of finished nodule_net CVs: the evidence the rules in docs/results.md decide on.

Each fold's validation split (never trained on; it chose the stopping epochs and the threshold, so it
is a little optimistic), scored by that fold's own model (``nodule_outputs.csv``, rows with
``split == val``), pooled over the folds. Test folds are not read unless asked for.

    python docs/experiments/pooled_validation.py runs/jsrt-cv10-nodule-v5 runs/jsrt-cv10-nodule-ens

``--split train`` gives the same figures on each fold's own training images (unaugmented, no
insertions): how closely the detectors fit what they were trained on. ``--split test`` pools the
test folds, for use only after a rule has decided.

Not part of lungdx: an experiment whose result is reported in docs/results.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from size_judge_refit import validation_summary  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cv_dirs", type=Path, nargs="+")
    parser.add_argument("--split", choices=("val", "train", "test"), default="val",
                        help="whose rows to pool: validation (default), the folds' own training images, or test")
    args = parser.parse_args()
    for cv_dir in args.cv_dirs:
        folds = sorted((cv_dir / "runs").glob("*/nodule_outputs.csv"))
        rows = pd.concat([pd.read_csv(path, dtype={"case_id": str}).assign(fold=path.parent.name) for path in folds],
                         ignore_index=True)
        summary = validation_summary(rows[rows["split"] == args.split])
        print(f"{cv_dir} ({len(folds)} folds, {args.split}):", {key: round(float(value), 3) for key, value in summary.items()})


if __name__ == "__main__":
    main()
