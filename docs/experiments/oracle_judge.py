"""Is there a malignancy signal in a crop centred on the nodule? A judge screen at known nodule positions.

The CNN judge of nodule_net ranks malignant vs benign at chance on new patients, and so did every judge
tried on its crops (docs/results.md). Those crops are 67 mm squares of the 512 px image at 64 px
(about 1.05 mm per pixel). This screen asks, without any detector, whether a crop CNN finds anything that
carries over between patients when the crop is centred on the labelled nodule and sampled finer, and
whether a CNN that *measures the nodule's size* does better than one that learns malignancy directly:
on JSRT the labelled size alone ranks malignant vs benign at AUC 0.67.

Per fold of lungdx cv's ten patient-level folds (the same folds and validation splits as
``lungdx cv --folds 10`` with the config's split settings; nothing is read from a run folder), a fresh
``MalignancyJudge`` network is trained on the training split's nodules only:

- ``--target size``: regress log(size_mm / 17 mm) (smooth L1). The crop is drawn zoomed by a random
  factor in [0.8, 1.25] and the target moves with it, so the network must measure, not recognise. Its
  score for malignancy is the measured size, oriented by the training split's labelled sizes (bigger is
  more malignant where they say so).
- ``--target malignant``: binary cross-entropy on the malignancy label (the recipe's judge, at oracle
  positions).

Crops: ``--crop-mm`` square (67 mm, the judge's) around the labelled centre, at ``--pixels``, sampled
from the levelled image at ``--size`` (JSRT's PNGs are 1024 px at 0.35 mm per pixel, so 1024 is the
finest here), standardised by the image's mean and SD inside its lung mask (JSRT's own masks: an upper
bound for what a judge behind the lung U-Net sees). Training crops: any rotation, mirrored half the time,
centre jittered by up to a quarter of the radius, contrast x [0.85, 1.15]; evaluation crops: none.
Adam 1e-3, batches of 32, ``--steps`` steps; scored on the validation split's nodules every ``--every``
steps. Only validation rows are read: the test folds stay unread, as for every rule in docs/results.md.

    python docs/experiments/oracle_judge.py --target size --size 1024 --pixels 96
    python docs/experiments/oracle_judge.py --target size --size 512 --pixels 64
    python docs/experiments/oracle_judge.py --target malignant --size 1024 --pixels 96

Prints, per check, pooled over the ten folds' validation nodules: malignant vs benign AUC of the score
beside that of the labelled size on the same rows, and for ``size`` the Spearman correlation and the
median absolute error of the measured size. Not part of lungdx: an analysis reported in docs/results.md.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from lungdx import metrics
from lungdx.config import load_config
from lungdx.cv import CVPlan, fold_split, plan_folds
from lungdx.data.nodules import localisation_targets
from lungdx.models.nodule_net import MalignancyJudge, standardise
from lungdx.train import prepare_data

MM_PER_PX_1024 = 0.35  # JSRT: 2048 px at 0.175 mm, stored here at 1024
SIZE_SCALE_MM = 17.0  # log target centred near JSRT's median nodule


def load_nodules(data: str, config_path: str, size: int):
    """(frame of the task's rows, levelled images of the nodule rows, their circles (x, y, r) on the ``size``
    grid, lung masks, malignancy, size_mm, row index in the frame)."""
    config = load_config(config_path)
    config = replace(config, data=replace(config.data, path=data, task="malignant_vs_rest", split_file=None),
                     preprocess=replace(config.preprocess, size=size))
    prepared = prepare_data(config, progress=True)
    frame = prepared.frame
    targets = localisation_targets(frame, config.preprocess)
    rows = np.flatnonzero(np.isfinite(targets.circles[:, 0]) & np.isfinite(targets.malignant))
    labels = pd.read_csv(Path(data) / "labels.csv", dtype={"case_id": str}).set_index("case_id")
    size_mm = labels.loc[frame["case_id"].iloc[rows], "size_mm"].to_numpy(float)
    images = prepared.cache.batch(frame["cache_index"].to_numpy()[rows])
    return (config, frame, images, targets.circles[rows], targets.lung_masks[rows], targets.malignant[rows], size_mm,
            rows)


def crops(images: torch.Tensor, centres: torch.Tensor, side_px: float, pixels: int, angle: torch.Tensor,
          flip: torch.Tensor, zoom: torch.Tensor) -> torch.Tensor:
    """(N, 1, pixels, pixels) squares of ``side_px / zoom`` input pixels around ``centres`` (N, 2) (x, y, input
    pixels, centres at integers), rotated by ``angle`` (radians) and mirrored where ``flip``."""
    size = images.shape[-1]
    half = side_px / zoom / size  # half the side in normalised units ([-1, 1] spans ``size``)
    cos, sin = torch.cos(angle) * half, torch.sin(angle) * half
    mirror = torch.where(flip, -1.0, 1.0)
    theta = torch.zeros(len(centres), 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos * mirror, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin * mirror, cos
    theta[:, :, 2] = (2 * centres + 1) / size - 1
    grid = F.affine_grid(theta, [len(centres), 1, pixels, pixels], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def train_fold(images, circles, malignant, size_mm, train, val, args, side_px: float, seed: int) -> dict[int, np.ndarray]:
    """One fold's judge; its validation scores (higher = more malignant for ``malignant``, the measured log
    size for ``size``) at each check."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = MalignancyJudge(widths=tuple(args.widths), dropout=args.dropout)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    picked = images[train]
    centres, radius = torch.from_numpy(circles[train, :2]), torch.from_numpy(circles[train, 2])
    size_target = torch.from_numpy(np.log(size_mm[train] / SIZE_SCALE_MM)).float()
    malignant_t = torch.from_numpy(malignant[train]).float()
    val_crops = crops(images[val], torch.from_numpy(circles[val, :2]), side_px, args.pixels, torch.zeros(len(val)),
                      torch.zeros(len(val), dtype=torch.bool), torch.ones(len(val)))
    train_crops = crops(picked, centres, side_px, args.pixels, torch.zeros(len(train)),
                        torch.zeros(len(train), dtype=torch.bool), torch.ones(len(train)))
    checks = {}
    for step in range(1, args.steps + 1):
        model.train()
        batch = torch.randint(len(train), (32,), generator=generator)
        jitter = (torch.rand(32, 2, generator=generator) * 2 - 1) * radius[batch, None] / 4
        angle = torch.rand(32, generator=generator) * 2 * math.pi
        flip = torch.rand(32, generator=generator) < 0.5
        zoom = torch.exp((torch.rand(32, generator=generator) * 2 - 1) * math.log(1.25)) if args.target == "size" \
            else torch.ones(32)
        x = crops(picked[batch], centres[batch] + jitter, side_px, args.pixels, angle, flip, zoom)
        x = x * (0.85 + 0.3 * torch.rand(32, 1, 1, 1, generator=generator))
        out = model(x).reshape(-1)
        if args.target == "size":
            loss = F.smooth_l1_loss(out, size_target[batch] + torch.log(zoom))
        else:
            loss = F.binary_cross_entropy_with_logits(out, malignant_t[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % args.every == 0:
            model.eval()
            with torch.no_grad():
                checks[step] = model(val_crops).reshape(-1).numpy()
                if args.show_fit:  # the fit on the training nodules themselves, cut as validation's are
                    fitted = model(train_crops).reshape(-1).numpy()
                    fit = (f"Spearman {spearmanr(fitted, size_mm[train]).statistic:.3f} with the labelled size"
                           if args.target == "size" else f"AUC {metrics.roc_auc(malignant[train], fitted):.3f}")
                    print(f"  step {step}: training nodules' {fit}", flush=True)
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/jsrt")
    parser.add_argument("--config", default="configs/nodule-blackout.yaml", help="split settings (and levelling)")
    parser.add_argument("--target", choices=("size", "malignant"), required=True)
    parser.add_argument("--size", type=int, default=1024, help="side of the levelled image the crops come from")
    parser.add_argument("--pixels", type=int, default=96, help="side of the crop the network sees")
    parser.add_argument("--crop-mm", type=float, default=67.2, help="side of the crop in mm (the judge's: 0.1875 x 512 px)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64, 96],
                        help="the network's block widths (the recipe's judge: 24 48 96 128)")
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--only", type=int, nargs="*", help="train these folds only (a timing or smoke run)")
    parser.add_argument("--show-fit", action="store_true",
                        help="also print, at each check, how well the network fits its own training nodules")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config, frame, levelled, circles, masks, malignant, size_mm, rows = load_nodules(args.data, args.config, args.size)
    images = standardise(torch.from_numpy(levelled)[:, None], torch.from_numpy(masks)[:, None].float())  # inside the lungs
    side_px = args.crop_mm / (MM_PER_PX_1024 * 1024 / args.size)
    print(f"{len(rows)} nodules, {args.size} px images, crops of {args.crop_mm:.1f} mm = {side_px:.0f} px at "
          f"{args.pixels} px ({args.crop_mm / args.pixels:.2f} mm per pixel), target {args.target}", flush=True)
    plan_rows = plan_folds(frame, CVPlan(folds=args.folds))
    train_fraction, val_fraction, _ = config.data.split
    case_at = pd.Series(np.arange(len(rows)), index=frame["case_id"].iloc[rows].to_numpy())
    pooled: dict[int, list] = {}
    for fold in args.only if args.only is not None else range(args.folds):
        started = time.perf_counter()
        split = fold_split(plan_rows[plan_rows["repeat"] == 0], fold, val_fraction / (train_fraction + val_fraction),
                           config.data.split_seed + fold)
        where = split.set_index("case_id")["split"]
        part = where.reindex(case_at.index).to_numpy()
        train, val = case_at.to_numpy()[part == "train"], case_at.to_numpy()[part == "val"]
        # the measured size is oriented by the training sizes; a malignancy logit is a score as it is
        orient = 1.0 if args.target == "malignant" or metrics.roc_auc(malignant[train], size_mm[train]) >= 0.5 else -1.0
        checks = train_fold(images, circles, malignant, size_mm, train, val, args, side_px, seed=fold)
        for step, scores in checks.items():
            pooled.setdefault(step, []).append((val, scores * orient, scores,
                                                np.full(len(val), np.median(size_mm[train]))))
        last = checks[max(checks)]
        print(f"fold {fold}: {len(train)} training and {len(val)} validation nodules, "
              f"{time.perf_counter() - started:.0f} s; last check: validation malignant vs benign AUC "
              f"{metrics.roc_auc(malignant[val], last * orient):.3f}", flush=True)
    print(f"pooled over the {args.folds} folds' validation nodules (each fold's scores as they are):")
    for step, parts in pooled.items():
        val = np.concatenate([p[0] for p in parts])
        score, raw, guess = (np.concatenate([p[k] for p in parts]) for k in (1, 2, 3))
        line = (f"step {step}: {len(val)} nodules, malignant vs benign AUC {metrics.roc_auc(malignant[val], score):.3f} "
                f"(labelled size on the same rows: {metrics.roc_auc(malignant[val], size_mm[val]):.3f})")
        if args.target == "size":
            measured = SIZE_SCALE_MM * np.exp(raw)
            line += (f"; measured vs labelled size: Spearman {spearmanr(measured, size_mm[val]).statistic:.3f}, "
                     f"median absolute error {np.median(np.abs(measured - size_mm[val])):.1f} mm "
                     f"(the training split's median size as the guess: {np.median(np.abs(guess - size_mm[val])):.1f} mm)")
        print(line, flush=True)


if __name__ == "__main__":
    main()
