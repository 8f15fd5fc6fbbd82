"""A malignancy judge on frozen ImageNet features, on a finished nodule_net CV's folds.

For each fold of a ``lungdx cv`` folder it takes that fold's saved model (lung mask, masked and
standardised image: what the CNN judge sees) and:

- crops the judge's own region (``crop_fraction`` of the input side) at 224 px around each training
  nodule's labelled centre, jittered by up to ``nodule.judge_jitter`` radii (``--copies`` times) and
  mirrored;
- turns each crop into EfficientNet-Lite0's global-average-pooled ImageNet features (1280 values; the
  RGB stem folded to one channel, ``lungdx.models.weights``);
- fits an L2 logistic regression on the training split's nodules only, its strength chosen by a
  5-fold cross-validation grouped by patient inside the training split (scored by ROC AUC);
- scores every validation and test image's crop at the fold's own map peak (``nodule_outputs.csv``),
  where the CV's CNN judge was scored.

By default it prints the pooled **validation** rows (nodule cases: malignant vs benign; all rows:
malignant vs rest with the fold's presence logit), beside the CV's own judge on the same rows.
``--test`` also prints the pooled test folds; once read, those must not choose anything.

    python docs/experiments/frozen_feature_judge.py runs/jsrt-cv10-nodule-v5
    python docs/experiments/frozen_feature_judge.py runs/jsrt-cv10-nodule-v5 --test

The per-image scores are kept in ``CV/frozen_feature_judge.csv`` (a rerun reads the folds it holds).
Not part of lungdx: an experiment whose result is reported in docs/results.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torchvision.ops import roi_align

from lungdx import metrics
from lungdx.config import load_config
from lungdx.models.backbones import EfficientNetLite0
from lungdx.models.nodule_net import combine_logits
from lungdx.models.weights import load_weights
from lungdx.predict import Predictor, model_input
from lungdx.train import prepare_data

SIDE = 224


def lite0_trunk() -> EfficientNetLite0:
    trunk = EfficientNetLite0(in_channels=1)
    load_weights(trunk, "imagenet")
    return trunk.eval()


@torch.inference_mode()
def features(trunk: EfficientNetLite0, crops: torch.Tensor, batch: int = 64) -> np.ndarray:
    parts = [trunk.pool(trunk.top(trunk.blocks(trunk.stem(crops[start : start + batch]))))
             for start in range(0, len(crops), batch)]
    return torch.cat(parts).numpy() if parts else np.zeros((0, 1280), np.float32)


def crops_at(masked: torch.Tensor, centres: np.ndarray, rows: np.ndarray, half: float) -> torch.Tensor:
    """(M, 1, SIDE, SIDE) crops of ``masked[rows]`` centred at ``centres`` (M, 2: column, row in input px)."""
    centres_t = torch.as_tensor(centres, dtype=torch.float32)
    boxes = torch.cat([torch.as_tensor(rows, dtype=torch.float32)[:, None], centres_t - half, centres_t + half], 1)
    return roi_align(masked, boxes, (SIDE, SIDE), spatial_scale=1.0, sampling_ratio=2, aligned=True)


@torch.inference_mode()
def masked_images(run_dir: Path, rows: pd.DataFrame, data, config) -> tuple[torch.Tensor, float]:
    predictor = Predictor.from_path(run_dir, precision="fp32", channels_last=False)
    model, hardware = predictor.model.eval(), predictor.hardware
    parts = []
    for start in range(0, len(rows), 16):
        levelled = data.cache.batch(rows["cache_index"].to_numpy()[start : start + 16])
        inputs = model_input(torch.from_numpy(levelled), config.preprocess, hardware)
        parts.append(model.mask_image(inputs, model.segment(inputs))[0].float())
    return torch.cat(parts), model.crop_fraction * model.input_size / 2


def judge_fold(run_dir: Path, trunk: EfficientNetLite0, copies: int, seed: int) -> pd.DataFrame:
    config = load_config(run_dir / "config.yaml")
    data = prepare_data(config)
    outputs = pd.read_csv(run_dir / "nodule_outputs.csv", dtype={"case_id": str, "patient_id": str})
    frame = data.frame.assign(case_id=data.frame["case_id"].astype(str))
    outputs = outputs.merge(frame[["case_id", "cache_index"]], on="case_id", how="left", validate="one_to_one")
    nodules = outputs[(outputs["split"] == "train") & outputs["malignant"].notna() & outputs["nodule_x"].notna()]
    scored = outputs[outputs["split"].isin(["val", "test"])].reset_index(drop=True)
    used = pd.concat([nodules, scored], ignore_index=True)
    masked, half = masked_images(run_dir, used, data, config)
    rng = np.random.default_rng(seed)
    train_index = np.repeat(np.arange(len(nodules)), copies)
    centres = nodules[["nodule_x", "nodule_y"]].to_numpy()[train_index]
    reach = config.nodule.judge_jitter * nodules["nodule_r"].to_numpy()[train_index, None]
    centres = centres + rng.uniform(-1, 1, centres.shape) * reach
    train_crops = crops_at(masked, centres, train_index, half)
    train_crops = torch.cat([train_crops, train_crops.flip(-1)])
    labels = np.tile(nodules["malignant"].to_numpy()[train_index], 2).astype(int)
    groups = np.tile(nodules["patient_id"].to_numpy()[train_index], 2)
    train_features = features(trunk, train_crops)
    splits = list(GroupKFold(5).split(train_features, labels, groups))  # a patient's copies stay in one part
    classifier = make_pipeline(StandardScaler(), LogisticRegressionCV(
        Cs=np.logspace(-5, 0, 11), l1_ratios=(0.0,), cv=splits, scoring="roc_auc", max_iter=5000))
    classifier.fit(train_features, labels)
    peaks = scored[["peak_x", "peak_y"]].to_numpy()
    scored_crops = crops_at(masked, peaks, np.arange(len(nodules), len(used)), half)
    scored = scored.assign(fold=run_dir.name, frozen_logit=classifier.decision_function(features(trunk, scored_crops)),
                           frozen_c=float(classifier[-1].C_[0]))
    scored["frozen_task_logit"] = combine_logits(torch.tensor(scored["presence_logit"].to_numpy()),
                                                 torch.tensor(scored["frozen_logit"].to_numpy())).numpy()
    return scored.drop(columns=["candidates", "cache_index"])


def report(rows: pd.DataFrame, split: str) -> None:
    part = rows[rows["split"] == split]
    nodules = part[part["malignant"].notna() & (part["has_nodule"] == 1)]
    groups = part["patient_id"].to_numpy()
    print(f"pooled {split} rows: {len(part)} ({part['case_id'].nunique()} images, {len(nodules)} nodule rows)")
    for name, column, task_column in (("the CV's judge", "malignancy_logit", "task_logit"),
                                      ("frozen Lite0 features", "frozen_logit", "frozen_task_logit")):
        truth, scores = nodules["malignant"].to_numpy().astype(int), nodules[column].to_numpy()
        low, high = metrics.bootstrap_ci(truth, scores, "roc_auc", groups=nodules["patient_id"].to_numpy())
        rest = metrics.roc_auc((part["malignant"] == 1).to_numpy().astype(int), part[task_column].to_numpy())
        print(f"  {name}: malignant_vs_benign {metrics.roc_auc(truth, scores):.3f} [{low:.3f}, {high:.3f}], "
              f"malignant_vs_rest {rest:.3f} ({len(set(groups))} patients)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cv_dir", type=Path)
    parser.add_argument("--copies", type=int, default=4, help="jittered crops per training nodule (each also mirrored)")
    parser.add_argument("--test", action="store_true", help="also print the pooled test folds")
    args = parser.parse_args()
    kept = args.cv_dir / "frozen_feature_judge.csv"
    rows = pd.read_csv(kept, dtype={"case_id": str, "patient_id": str}) if kept.is_file() else pd.DataFrame()
    trunk = None
    for fold, run_dir in enumerate(sorted((args.cv_dir / "runs").iterdir())):
        if len(rows) and run_dir.name in set(rows["fold"]):
            continue
        print(f"{run_dir.name} ...", flush=True)
        trunk = trunk or lite0_trunk()
        rows = pd.concat([rows, judge_fold(run_dir, trunk, args.copies, seed=fold)], ignore_index=True)
        rows.to_csv(kept, index=False)
    print("regularisation C per fold:", rows.groupby("fold")["frozen_c"].first().round(5).to_dict())
    report(rows, "val")
    if args.test:
        report(rows, "test")


if __name__ == "__main__":
    main()
