"""Pointing game of nodule_net cross-validations by JSRT subtlety, size and fold, and two CVs paired.

Reads ``oof_nodule_outputs.csv`` of each finished ``lungdx cv`` folder given (every fold's test
images, scored by that fold's model) and JSRT's ``labels.csv`` (subtlety, size_mm), and prints the
nodules whose map peak lies within radius + 16 px (``lungdx.localisation.pointing_hits``), by
stratum and by fold; ``--by-lung-mask`` also splits them by whether the nodule's centre lies on the
dataset's lung mask, and counts the map's peaks that lie off it: on the normal images (all, and
the highest-scoring quarter, the false positives that cost the most) and on the nodules it missed.
With two folders (the same folds), it also gives the paired comparison: how
many nodules only one of them finds, and McNemar's exact test on those.

    python docs/experiments/pointing_by_stratum.py runs/jsrt-cv10-nodule-hard runs/jsrt-cv10-nodule-flip3

Not part of lungdx: an analysis whose result is reported in docs/results.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from scipy.stats import binomtest

from lungdx.localisation import pointing_hits

SIZE_BINS = [0, 10, 20, 30, 60]


def outputs_of(folder: Path) -> tuple[pd.DataFrame, int]:
    """A CV folder's ``oof_nodule_outputs.csv`` and the image side its coordinates are in (``plan.yaml``)."""
    plan = yaml.safe_load((folder / "plan.yaml").read_text())
    return pd.read_csv(folder / "oof_nodule_outputs.csv"), int(plan["config"]["preprocess"]["size"])


def peaks_off_mask(outputs: pd.DataFrame, size: int, data: Path) -> str:
    """Where the map's peaks off the lung mask are: on the normal images, the top quarter of them by presence
    score, and the missed nodules (test folds, ``outputs_of``)."""
    from nodule_visibility import points_on_mask

    off = ~points_on_mask(data, outputs.rename(columns={"peak_x": "x", "peak_y": "y"}), size)
    normals = outputs["has_nodule"] == 0
    top = outputs[normals].nlargest(int(normals.sum()) // 4, "presence_logit").index
    missed = outputs.index[outputs["has_nodule"] == 1][pointing_hits(outputs, size) == 0]
    return (f"normal images {int(off[normals].sum())} of {int(normals.sum())}, their highest-scoring quarter "
            f"{int(off[top].sum())} of {len(top)}, missed nodules {int(off[missed].sum())} of {len(missed)}")


def hits(folder: Path, outputs: pd.DataFrame, size: int) -> pd.DataFrame:
    """Per nodule case of a CV folder (its ``outputs_of``): case_id, fold, hit (0/1)."""
    nodules = outputs[outputs["has_nodule"] == 1].copy()
    nodules["hit"] = pointing_hits(outputs, size)
    folds = pd.read_csv(folder / "folds.csv")
    fold_column = next(column for column in folds.columns if column.startswith("fold"))
    nodules = nodules.merge(folds[["case_id", fold_column]].rename(columns={fold_column: "fold"}), on="case_id", how="left")
    return nodules[["case_id", "fold", "hit"]]


def data_folder(folder: Path) -> Path:
    """The data folder a ``lungdx cv`` folder was made from (its ``plan.yaml``)."""
    plan = yaml.safe_load((folder / "plan.yaml").read_text())
    return Path(plan["config"]["data"]["path"])


def labels_of(folder: Path) -> pd.DataFrame:
    labels = pd.read_csv(data_folder(folder) / "labels.csv")[["case_id", "subtlety", "size_mm"]]
    return labels.astype({"subtlety": "Int64"})


def table(nodules: pd.DataFrame, by: str) -> str:
    grouped = nodules.groupby(by, observed=True)["hit"].agg(["sum", "count"])
    return ", ".join(f"{key}: {int(row['sum'])}/{int(row['count'])}" for key, row in grouped.iterrows())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="finished lungdx cv folders of nodule_net (one or two)")
    parser.add_argument("--by-lung-mask", action="store_true",
                        help="also by whether the nodule's centre lies on the dataset's lung mask (lung_mask in labels.csv)")
    args = parser.parse_args()
    labels = labels_of(args.folders[0])
    if args.by_lung_mask:  # the folders share their data (the same folds): read the masks once
        from nodule_visibility import lung_mask_places

        places = lung_mask_places(data_folder(args.folders[0]))["on_mask"].map({True: "inside", False: "outside"})
    per_folder = {}
    for folder in args.folders:
        outputs, size = outputs_of(folder)
        nodules = hits(folder, outputs, size)
        nodules = nodules.merge(labels, on="case_id", how="left")
        nodules["size"] = pd.cut(nodules["size_mm"], SIZE_BINS, right=True)
        per_folder[folder] = nodules
        print(f"{folder}: pointing {int(nodules['hit'].sum())} of {len(nodules)} ({nodules['hit'].mean():.3f})")
        print(f"  by subtlety (1 = extremely subtle ... 5 = obvious): {table(nodules, 'subtlety')}")
        print(f"  by size (mm): {table(nodules, 'size')}")
        if args.by_lung_mask:
            nodules["lung_mask"] = nodules["case_id"].map(places)
            print(f"  by the centre's place on the lung mask: {table(nodules, 'lung_mask')}")
            print(f"  peaks off the lung mask: {peaks_off_mask(outputs, size, data_folder(folder))}")
        print(f"  by fold: {table(nodules, 'fold')}")
    if len(args.folders) == 2:
        first, second = (per_folder[folder].set_index("case_id")["hit"] for folder in args.folders)
        first, second = first.align(second, join="inner")
        only_first, only_second = int(((first == 1) & (second == 0)).sum()), int(((first == 0) & (second == 1)).sum())
        discordant = only_first + only_second
        p = binomtest(only_first, discordant, 0.5).pvalue if discordant else float("nan")
        print(f"paired on {len(first)} nodules: found only by {args.folders[0]}: {only_first}, only by {args.folders[1]}: "
              f"{only_second}, by both: {int(((first == 1) & (second == 1)).sum())}; McNemar exact p = {p:.3f}")
        print(f"  difference in pointing: {np.mean(second) - np.mean(first):+.3f}")


if __name__ == "__main__":
    main()
