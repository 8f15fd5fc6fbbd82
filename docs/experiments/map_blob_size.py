"""Exploration: does the size of the nodule map's blob carry the malignancy signal the judge misses?

JSRT's ground-truth nodule size alone ranks malignant vs benign at AUC 0.67, while nodule_net's
judge ranks them at 0.43-0.45. This reads a finished ``lungdx cv`` folder of nodule_net, maps each
fold's *test* images with that fold's model, and measures the blob around the map's peak: the
connected cells whose probability is at least half the peak's. Its equivalent diameter (mm, at
JSRT's 0.7 mm per 512-grid pixel) is a score with no fitted parameter, so its pooled out-of-fold
AUC needs no training data and touches no test label before the AUC itself.

    python docs/experiments/map_blob_size.py runs/jsrt-cv10-nodule-hard

Not part of lungdx: an experiment whose result is reported in docs/results.md.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from lungdx.config import load_config
from lungdx.localisation import pointing_hits
from lungdx.predict import Predictor, model_input
from lungdx.train import prepare_data

MM_PER_PX_512 = 0.175 * 2048 / 512  # JSRT: 0.175 mm per pixel at 2048


def blob_diameter_px(nodule_map: torch.Tensor, input_size: int) -> np.ndarray:
    """Equivalent diameter (input px) of the connected blob at each map's peak (prob >= peak prob / 2).

    Written before ``nodule_net.blob_diameter`` (the size judge's measure), which counts the cells
    of half the peak within 48 px instead of the connected component; kept as it was, since the
    figures in docs/results.md were measured with it.
    """
    prob = torch.sigmoid(F.avg_pool2d(nodule_map.float(), 3, 1, 1, count_include_pad=False))[:, 0].numpy()
    stride = input_size / prob.shape[-1]
    sizes = []
    for image in prob:
        peak = np.unravel_index(np.argmax(image), image.shape)
        labels, _ = ndimage.label(image >= image[peak] / 2)
        cells = int((labels == labels[peak]).sum())
        sizes.append(2 * math.sqrt(cells / math.pi) * stride)
    return np.array(sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cv_dir", type=Path)
    args = parser.parse_args()
    rows = []
    for run_dir in sorted((args.cv_dir / "runs").iterdir()):
        config = load_config(run_dir / "config.yaml")
        data = prepare_data(config)
        test = data.rows("test")
        predictor = Predictor.from_path(run_dir, precision="fp32")
        levelled = data.cache.batch(test["cache_index"].to_numpy())
        with torch.inference_mode():
            analysis = predictor.model.eval().analyse(model_input(torch.from_numpy(levelled), config.preprocess,
                                                                  predictor.hardware))
        sizes = blob_diameter_px(analysis.nodule_map, config.preprocess.size) * MM_PER_PX_512
        rows.append(test[["case_id"]].assign(blob_mm=sizes, fold=run_dir.name))
    blobs = pd.concat(rows, ignore_index=True)
    outputs = pd.read_csv(args.cv_dir / "oof_nodule_outputs.csv", dtype={"case_id": str}).merge(blobs, on="case_id")
    nodules = outputs[outputs["has_nodule"] == 1].copy()
    nodules["hit"] = pointing_hits(nodules, 512).astype(bool)
    truth_mm = 2 * nodules["nodule_r"] * MM_PER_PX_512
    print(f"{len(nodules)} nodules ({int(nodules['malignant'].sum())} malignant), {int(nodules['hit'].sum())} found at the peak")
    print(f"blob diameter vs true diameter, found nodules: Spearman "
          f"{nodules.loc[nodules['hit'], 'blob_mm'].corr(truth_mm[nodules['hit']], method='spearman'):.3f}")
    for name, subset in (("all nodules", nodules), ("found at the peak", nodules[nodules["hit"]])):
        print(f"malignant vs benign, {name} (n={len(subset)}): blob diameter AUC "
              f"{roc_auc_score(subset['malignant'], subset['blob_mm']):.3f}, judge AUC "
              f"{roc_auc_score(subset['malignant'], subset['malignancy_logit']):.3f}, true diameter AUC "
              f"{roc_auc_score(subset['malignant'], 2 * subset['nodule_r']):.3f}")


if __name__ == "__main__":
    main()
