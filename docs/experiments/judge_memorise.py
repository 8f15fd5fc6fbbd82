"""Can the CNN judge memorise one fold's training nodule crops? A check of the judge's pipeline.

The crops are those the judge sees at inference (the fold's own lung mask, centred on the labelled
nodule), without augmentation, inserted nodules or dropout. A fresh ``MalignancyJudge`` is trained
on the training split's crops (Adam 1e-3, batches of 32) and scored on them and on the validation
split's every 50 steps. If it cannot memorise them, the crops or the labels are broken; if it can,
the recipe's judge fails to learn for other reasons (augmentation, steps).

Given a whole CV folder (or several folds), it trains one judge per fold and also prints the
validation AUC pooled over the folds at each check: whether what a judge learns from one fold's
training nodules carries over to other patients at any number of steps.

    python docs/experiments/judge_memorise.py runs/jsrt-cv10-nodule-v5-dbo/runs/r0-f00
    python docs/experiments/judge_memorise.py runs/jsrt-cv10-nodule-v5-dbo --steps 400

Not part of lungdx: an analysis whose result is reported in docs/results.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from lungdx import metrics
from lungdx.checkpoint import load_checkpoint
from lungdx.config import load_config
from lungdx.data.nodules import localisation_targets
from lungdx.models import create_model
from lungdx.models.nodule_net import MalignancyJudge
from lungdx.nodule_train import _DetectorBatches, _judge_samples, _lung_logits, localiser_kwargs
from lungdx.runtime import Hardware
from lungdx.train import prepare_data


def nodule_crops(run_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per split (train, val): the crops around the labelled nodules and their malignancy labels, cut as
    the judge's validation crops are (``nodule_train._judge_samples``: no jitter, no augmentation)."""
    config = load_config(run_dir / "config.yaml")
    data = prepare_data(config)
    every = localisation_targets(data.frame, config.preprocess)
    hardware = Hardware.resolve("cpu", "fp32", False)
    model = create_model("nodule_net", **localiser_kwargs(config))
    model.load_state_dict(load_checkpoint(run_dir / "model.pt")["state_dict"])
    model.eval()
    found = {}
    for split in ("train", "val"):
        targets = every.subset((data.frame["split"] == split).to_numpy())
        images = data.cache.batch(data.rows(split)["cache_index"].to_numpy())
        rows = _DetectorBatches(images, _lung_logits(model, images, config, hardware), targets.lung_masks, targets.circles,
                                targets.malignant, None, config, torch.Generator())
        with torch.inference_mode():
            crops, labels, _ = _judge_samples(model, rows, np.arange(len(images)), config, hardware, 0.0, False)
        found[split] = crops, labels
    return found


def fold_dirs(paths: list[Path]) -> list[Path]:
    """The finished folds named: a fold folder itself, or every fold of a CV folder (``runs/*/model.pt``)."""
    found = []
    for path in paths:
        found += [path] if (path / "model.pt").is_file() else sorted(p.parent for p in path.glob("runs/*/model.pt"))
    if not found:
        raise SystemExit(f"no finished nodule_net fold (model.pt) in {', '.join(map(str, paths))}")
    return found


def memorise(run_dir: Path, steps: int, every: int, dropout: float) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Train a fresh judge on one fold's training crops; the validation (labels, logits) at each check."""
    torch.manual_seed(0)
    crops = nodule_crops(run_dir)
    (train_x, train_y), (val_x, val_y) = crops["train"], crops["val"]
    print(f"{run_dir}: {len(train_y)} training nodules, {len(val_y)} validation nodules", flush=True)
    judge = MalignancyJudge(dropout=dropout)
    optimizer = torch.optim.Adam(judge.parameters(), lr=1e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    checks = {}
    for step in range(1, steps + 1):
        judge.train()
        rows = torch.randperm(len(train_x))[:32]
        loss = loss_fn(judge(train_x[rows]).reshape(-1), train_y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % every == 0:
            judge.eval()
            with torch.no_grad():
                train_logits, val_logits = judge(train_x).reshape(-1), judge(val_x).reshape(-1)
            checks[step] = val_y.numpy(), val_logits.numpy()
            print(f"step {step}: training loss {float(loss_fn(train_logits, train_y)):.3f}, "
                  f"training AUC {metrics.roc_auc(train_y.numpy(), train_logits.numpy()):.3f}, "
                  f"validation AUC {metrics.roc_auc(val_y.numpy(), val_logits.numpy()):.3f}", flush=True)
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="finished nodule_net folds, or CV folders (their lung U-Nets "
                        "draw the masks)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=50, help="steps between two checks")
    parser.add_argument("--dropout", type=float, default=0.0)
    args = parser.parse_args()
    folds = [memorise(run_dir, args.steps, args.every, args.dropout) for run_dir in fold_dirs(args.runs)]
    if len(folds) > 1:
        print(f"pooled over {len(folds)} folds' validation nodules (each fold's logits as they are):")
        for step in folds[0]:
            labels = np.concatenate([fold[step][0] for fold in folds])
            logits = np.concatenate([fold[step][1] for fold in folds])
            print(f"step {step}: {len(labels)} nodules, malignant vs benign AUC {metrics.roc_auc(labels, logits):.3f}")


if __name__ == "__main__":
    main()
