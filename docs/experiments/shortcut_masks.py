"""Why nodule_net's shortcut check moves: the lung mask, or the pixels inside it?

``lungdx cv`` reports how the AUC changes when the test images' corners and borders are blacked
out (``nodule_train.black_out_borders``). The detector and the judge see only pixels inside the
dilated lung mask, so a change can come from two places: the lung U-Net (which sees the whole
image) drawing a different mask, or the blacked-out band reaching inside the mask (and the
standardisation inside it). This re-scores each fold's test images with that fold's model (fp32)
three ways: as they are; blacked out (the check); and blacked out but masked with the mask of
the untouched image. It prints the masks' Dice and how far the presence logit and the map's
peak move, and the nodule_vs_normal AUC of each way.

    python docs/experiments/shortcut_masks.py runs/jsrt-cv10-nodule-flip3

Not part of lungdx: an analysis whose result is reported in docs/results.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from lungdx.config import load_config
from lungdx.data.nodules import dice
from lungdx.models.nodule_net import map_peak
from lungdx.nodule_train import black_out_borders
from lungdx.predict import Predictor, model_input
from lungdx.train import prepare_data


@torch.inference_mode()
def score(model, inputs: torch.Tensor, lung_logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(presence logit (N,), peak (N, 2)) of ``inputs`` masked by ``lung_logits``."""
    masked, _ = model.mask_image(inputs, lung_logits)
    presence, peak = map_peak(model.detect(masked, lung_logits), model.input_size)
    return presence.numpy(), peak.numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cv_dir", type=Path)
    parser.add_argument("--folds", type=int, default=None, help="only the first N folds")
    args = parser.parse_args()
    rows = []
    for run_dir in sorted((args.cv_dir / "runs").iterdir())[: args.folds]:
        print(f"{run_dir.name} ...", flush=True)
        config = load_config(run_dir / "config.yaml")
        data = prepare_data(config)
        test = data.rows("test")
        predictor = Predictor.from_path(run_dir, precision="fp32", channels_last=False)
        model, hardware = predictor.model.eval(), predictor.hardware
        levelled = data.cache.batch(test["cache_index"].to_numpy())
        with torch.inference_mode():
            inputs = model_input(torch.from_numpy(levelled), config.preprocess, hardware)
            blacked = model_input(torch.from_numpy(black_out_borders(levelled)), config.preprocess, hardware)
            lungs, lungs_blacked = model.segment(inputs), model.segment(blacked)
        presence, peak = score(model, inputs, lungs)
        presence_blacked, peak_blacked = score(model, blacked, lungs_blacked)
        presence_same_mask, _ = score(model, blacked, lungs)
        masks, masks_blacked = (lungs[:, 0] > 0).numpy(), (lungs_blacked[:, 0] > 0).numpy()
        rows.append(test[["case_id"]].assign(
            fold=run_dir.name, mask_dice=[dice(a, b) for a, b in zip(masks, masks_blacked, strict=True)],
            presence=presence, presence_blacked=presence_blacked, presence_blacked_same_mask=presence_same_mask,
            peak_shift_px=np.hypot(*(peak - peak_blacked).T)))
    frame = pd.concat(rows, ignore_index=True)
    outputs = pd.read_csv(args.cv_dir / "oof_nodule_outputs.csv", dtype={"case_id": str})
    frame = frame.merge(outputs[["case_id", "has_nodule", "blacked_lung_share"]], on="case_id")
    untouched = frame["blacked_lung_share"] == 0
    print(f"{len(frame)} test images ({int(untouched.sum())} whose JSRT lung mask the black-out leaves whole)")
    for name, subset in (("all", frame), ("lungs untouched", frame[untouched])):
        print(f"{name}: mask Dice blacked vs not: median {subset['mask_dice'].median():.4f}, "
              f"min {subset['mask_dice'].min():.4f}, share below 0.99 {np.mean(subset['mask_dice'] < 0.99):.3f}; "
              f"peak moved > 16 px on {np.mean(subset['peak_shift_px'] > 16):.3f}")
        for column in ("presence", "presence_blacked", "presence_blacked_same_mask"):
            print(f"  nodule_vs_normal AUC, {column}: {roc_auc_score(subset['has_nodule'], subset[column]):.3f}; "
                  f"median |change of the logit| {np.median(np.abs(subset[column] - subset['presence'])):.3f}")


if __name__ == "__main__":
    main()
