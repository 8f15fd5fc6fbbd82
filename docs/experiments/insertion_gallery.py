"""Nodules put into training normals, side by side: a donor's patch (``insert_nodule``) and a simulated nodule
(``add_nodule`` of a ``synthetic_nodule``) of the same size and contrast, on the same normal image.

The images, the lung masks and the nodule bank are those of one finished nodule_net run (a CV fold):
its own training split, levelled as the detector sees them, before augmentation. The figure shows
JSRT's pixels, so it is written under ``runs/`` (not committed) and only looked at.

    python docs/experiments/insertion_gallery.py runs/jsrt-cv10-nodule-v5-dbo-long/runs/r0-f00 --out runs/insertions.png

Not part of lungdx: an experiment whose result is reported in docs/results.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished nodule_net run folder (config.yaml, split.csv)")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write (under runs/: JSRT may not be redistributed)")
    parser.add_argument("--pairs", type=int, default=9, help="normal images to show, one pair each (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=3, help="seed of the picks and placements (default: %(default)s)")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lungdx import train
    from lungdx.config import load_config
    from lungdx.data.nodules import NoduleBank, add_nodule, insert_nodule, localisation_targets, synthetic_nodule

    config = load_config(args.run / "config.yaml")
    data = train.prepare_data(train._with_saved_split(config, args.run, True))
    rows = (data.frame["split"] == "train").to_numpy()
    targets = localisation_targets(data.frame, config.preprocess).subset(rows)
    images = data.cache.batch(data.rows("train")["cache_index"].to_numpy())
    bank = NoduleBank(images, data.rows("train"), targets.circles, targets.malignant)
    rng = np.random.default_rng(args.seed)
    normals = np.flatnonzero(~np.isfinite(targets.circles[:, 0]) & targets.has_mask)[: args.pairs]
    columns = 6
    lines = int(np.ceil(2 * len(normals) / columns))
    figure, axes = plt.subplots(lines, columns, figsize=(15, 2.5 * lines), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, index in enumerate(normals):
        patch = bank.patches[rng.integers(len(bank))]
        lungs = targets.lung_masks[index] > 0.5
        simulated = add_nodule(images[index], lungs, synthetic_nodule(patch.radius_px, abs(patch.contrast), rng),
                               patch.radius_px, rng)
        donor = insert_nodule(images[index], lungs, patch, rng)
        for j, (result, name) in enumerate(((simulated, "simulated"), (donor, "donor"))):
            ax = axes.flat[2 * k + j]
            if result is None:
                ax.set_title(f"{name}: no place in the lungs", fontsize=8)
                continue
            x, y, radius = result[1]
            half = int(4 * radius) + 10
            ax.imshow(result[0][max(int(y) - half, 0) : int(y) + half, max(int(x) - half, 0) : int(x) + half],
                      cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{name}, r {radius:.0f} px, contrast {patch.contrast:.3f}", fontsize=8)
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=70)
    print(f"written: {args.out} ({len(normals)} normals of {args.run}'s training split, {len(bank)} bank nodules)")


if __name__ == "__main__":
    main()
