"""Nodules put into training normals, side by side: a donor's patch (``insert_nodule``) and a simulated nodule
(``add_nodule`` of a ``synthetic_nodule``) of the same size and contrast, on the same normal image.

The images, the lung masks and the nodule bank are those of one finished nodule_net run (a CV fold):
its own training split, levelled as the detector sees them, before augmentation. The figure shows
JSRT's pixels, so it is written under ``runs/`` (not committed) and only looked at.

    python docs/experiments/insertion_gallery.py runs/jsrt-cv10-nodule-v5-dbo-long/runs/r0-f00 --out runs/insertions.png

``--seam N`` measures instead of drawing: how much a window edge shows around N insertions of each kind into
the run's training normals (donors matched by ring mean, as lungdx did first, and by plane,
``nodule.insert_match``), against the real nodules of its training images. The measure is the mean
gradient magnitude in the ring where a donor's patch is blended in (1.05-1.5 radii) over that in the ring
just outside it (1.6-2.2 radii), both in the same image: a seam raises it above what the real nodules show.
Prints figures only (no pixels), read on training images only.

    python docs/experiments/insertion_gallery.py runs/jsrt-cv10-nodule-v5-dbo-synth/runs/r0-f00 --seam 400

Not part of lungdx: an experiment whose result is reported in docs/results.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def training_nodules(run: Path):
    """A finished run's training images (levelled, (N, S, S)), their localisation targets and its nodule bank."""
    from lungdx import train
    from lungdx.config import load_config
    from lungdx.data.nodules import NoduleBank, localisation_targets

    config = load_config(run / "config.yaml")
    data = train.prepare_data(train._with_saved_split(config, run, True))
    rows = (data.frame["split"] == "train").to_numpy()
    targets = localisation_targets(data.frame, config.preprocess).subset(rows)
    images = data.cache.batch(data.rows("train")["cache_index"].to_numpy())
    return images, targets, NoduleBank(images, data.rows("train"), targets.circles, targets.malignant)


def ring_ratio(image: np.ndarray, x: float, y: float, radius: float) -> float:
    """Mean gradient magnitude at 1.05-1.5 radii from (x, y) over that at 1.6-2.2 radii (NaN off the image)."""
    half = int(np.ceil(2.2 * radius)) + 2
    column, row = int(round(x)), int(round(y))
    if row - half < 1 or column - half < 1 or row + half + 2 > image.shape[0] or column + half + 2 > image.shape[1]:
        return float("nan")
    window = image[row - half - 1 : row + half + 2, column - half - 1 : column + half + 2].astype(np.float64)
    gy, gx = np.gradient(window)
    magnitude = np.hypot(gx, gy)[1:-1, 1:-1]
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    distance = np.hypot(xx + column - x, yy + row - y) / radius
    blend = (distance >= 1.05) & (distance <= 1.5)
    outside = (distance >= 1.6) & (distance <= 2.2)
    return float(magnitude[blend].mean() / max(magnitude[outside].mean(), 1e-9))


def seam_table(images: np.ndarray, targets, bank, rng: np.random.Generator, count: int) -> None:
    """The window-edge measure (``ring_ratio``) of real nodules, donor insertions and simulated ones."""
    from lungdx.data.nodules import add_nodule, insert_nodule, synthetic_nodule

    real = [ring_ratio(images[i], *targets.circles[i]) for i in np.flatnonzero(np.isfinite(targets.circles[:, 0]))]
    normals = np.flatnonzero(~np.isfinite(targets.circles[:, 0]) & targets.has_mask)
    kinds: dict[str, list[float]] = {"real nodules in their own images": real, "donor insertions (ring)": [],
                                     "donor insertions (plane)": [], "simulated insertions": []}
    for _ in range(count):
        index, patch = normals[rng.integers(len(normals))], bank.patches[rng.integers(len(bank))]
        lungs = targets.lung_masks[index] > 0.5
        seed = int(rng.integers(2**31))  # the two donor insertions at the same place
        for name, result in (
                ("donor insertions (ring)", insert_nodule(images[index], lungs, patch, np.random.default_rng(seed))),
                ("donor insertions (plane)", insert_nodule(images[index], lungs, patch, np.random.default_rng(seed),
                                                           match="plane")),
                ("simulated insertions", add_nodule(images[index], lungs, synthetic_nodule(
                    patch.radius_px, abs(patch.contrast), rng), patch.radius_px, rng))):
            if result is not None:
                kinds[name].append(ring_ratio(result[0], *result[1]))
    print("gradient at 1.05-1.5 radii over 1.6-2.2 radii (a window edge raises it):")
    for name, values in kinds.items():
        values = np.asarray(values)
        values = values[np.isfinite(values)]
        low, median, high = np.percentile(values, [25, 50, 75])
        print(f"  {name:34s} n {len(values):4d}  median {median:.3f}  quartiles {low:.3f}-{high:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished nodule_net run folder (config.yaml, split.csv)")
    parser.add_argument("--out", type=Path, help="PNG to write (under runs/: JSRT may not be redistributed)")
    parser.add_argument("--pairs", type=int, default=9, help="normal images to show, one pair each (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=3, help="seed of the picks and placements (default: %(default)s)")
    parser.add_argument("--seam", type=int, default=0, metavar="N",
                        help="print the window-edge measure over N insertions of each kind instead of drawing")
    args = parser.parse_args()
    if not args.seam and args.out is None:
        parser.error("--out is required unless --seam is given")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lungdx.data.nodules import add_nodule, insert_nodule, synthetic_nodule

    images, targets, bank = training_nodules(args.run)
    rng = np.random.default_rng(args.seed)
    if args.seam:
        seam_table(images, targets, bank, rng, args.seam)
        return
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
