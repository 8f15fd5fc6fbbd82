"""What the images and masks of a JSRT-like dataset give a detector, nodule by nodule, by subtlety.

From ``labels.csv`` (nodule centre and radius in the image's pixels, subtlety) and the images and lung
masks it names, per nodule case:

- ``contrast``: the mean grey level within half the radius of the centre less the mean of a ring
  from 1.3 to 1.8 radii (the image's own grey levels: 0-255 for JSRT's 8-bit PNGs here);
- ``ring_sd``: the grey levels' standard deviation in that ring (the anatomy the nodule must stand out
  from; 8-bit rounding adds a standard deviation of only 0.29);
- ``on_mask``: whether the centre lies on the lung mask (the region ``nodule_net`` looks at with
  ``region=lungs``);
- ``in_hull``: whether it lies in the mask's orthogonal convex hull at 128 px (``lung_hull``, the
  region with ``region=hull``).

It also prints the mean share of the image inside the masks and inside their hulls, over every image.

    python docs/experiments/nodule_visibility.py ../shared/data/jsrt

No model is involved; it reads every nodule case, whatever fold it falls in.

Not part of lungdx: an analysis whose result is reported in docs/results.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from lungdx.models.nodule_net import lung_hull

SEG_SIDE = 128  # the lung U-Net's grid at 512 px input


def lung_mask_places(folder: Path) -> pd.DataFrame:
    """Per nodule case (indexed by case_id): ``on_mask`` and ``in_hull`` (see above), from the lung masks only."""
    labels = pd.read_csv(folder / "labels.csv")
    missing = {"case_id", "has_nodule", "nodule_x", "nodule_y", "lung_mask"} - set(labels.columns)
    if missing:
        raise SystemExit(f"{folder / 'labels.csv'}: no {', '.join(sorted(missing))} column (needs JSRT's nodule centres "
                         "and lung masks)")
    places = {}
    for row in labels[labels["has_nodule"] == 1].itertuples():
        mask_image = Image.open(folder / row.lung_mask)
        mask = np.asarray(mask_image) > 0
        small = np.asarray(mask_image.resize((SEG_SIDE, SEG_SIDE), Image.NEAREST)) > 0
        hull = lung_hull(torch.from_numpy(small).float()[None, None])[0, 0].numpy() > 0
        column, line = int(round(row.nodule_x)), int(round(row.nodule_y))
        scale = SEG_SIDE / mask.shape[0]
        places[row.case_id] = {"on_mask": bool(mask[line, column]),
                               "in_hull": bool(hull[min(int(line * scale), SEG_SIDE - 1), min(int(column * scale), SEG_SIDE - 1)])}
    return pd.DataFrame.from_dict(places, orient="index")


def points_on_mask(folder: Path, points: pd.DataFrame, size: int) -> pd.Series:
    """Whether each point (columns ``case_id``, ``x``, ``y`` in pixels of a ``size`` px image) lies on its
    image's lung mask in ``labels.csv``: for a model's peaks, where the map looked."""
    labels = pd.read_csv(folder / "labels.csv").set_index("case_id")
    masks: dict[str, np.ndarray] = {}
    found = []
    for row in points.itertuples():
        if row.case_id not in masks:
            masks[row.case_id] = np.asarray(Image.open(folder / labels.loc[row.case_id, "lung_mask"])) > 0
        mask = masks[row.case_id]
        scale = mask.shape[0] / size
        found.append(bool(mask[min(int(row.y * scale), mask.shape[0] - 1), min(int(row.x * scale), mask.shape[1] - 1)]))
    return pd.Series(found, index=points.index)


def region_shares(folder: Path) -> tuple[float, float]:
    """Mean share of the image, at the lung U-Net's grid, inside the lung mask and inside its hull, over every
    image with a mask (normals included)."""
    shares = []
    for path in pd.read_csv(folder / "labels.csv")["lung_mask"].dropna():
        small = torch.from_numpy(np.asarray(Image.open(folder / path).resize((SEG_SIDE, SEG_SIDE), Image.NEAREST)) > 0)
        small = small.float()[None, None]
        shares.append((float(small.mean()), float(lung_hull(small).mean())))
    return tuple(np.mean(shares, axis=0).tolist())


def visibility(folder: Path) -> pd.DataFrame:
    labels = pd.read_csv(folder / "labels.csv")
    rows = []
    for row in labels[labels["has_nodule"] == 1].itertuples():
        image = np.asarray(Image.open(folder / row.image), np.float32)
        yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
        distance = np.hypot(xx - row.nodule_x, yy - row.nodule_y)
        radius = row.nodule_radius_px
        ring = image[(distance >= 1.3 * radius) & (distance <= 1.8 * radius)]
        rows.append({"case_id": row.case_id, "subtlety": int(row.subtlety),
                     "contrast": float(image[distance <= 0.5 * radius].mean() - ring.mean()), "ring_sd": float(ring.std())})
    return pd.DataFrame(rows).join(lung_mask_places(folder), on="case_id")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="a JSRT-like folder: labels.csv with nodule_x, nodule_y, nodule_radius_px, "
                                                "subtlety, image and lung_mask")
    args = parser.parse_args()
    found = visibility(args.data)
    summary = found.groupby("subtlety").agg(nodules=("case_id", "size"), median_contrast=("contrast", "median"),
                                            median_ring_sd=("ring_sd", "median"), on_mask=("on_mask", "sum"),
                                            in_hull=("in_hull", "sum"))
    print(summary.round(2).to_string())
    print(f"all: {len(found)} nodules, {int(found['on_mask'].sum())} centres on the lung mask, "
          f"{int(found['in_hull'].sum())} in its hull")
    mask_share, hull_share = region_shares(args.data)
    print(f"share of the image (every mask, {SEG_SIDE} px): lung mask {mask_share:.3f}, its hull {hull_share:.3f}")
    off = found[~found["on_mask"]]
    print("off the mask:", ", ".join(f"{case} (subtlety {level})" for case, level in zip(off["case_id"], off["subtlety"],
                                                                                       strict=True)))


if __name__ == "__main__":
    main()
