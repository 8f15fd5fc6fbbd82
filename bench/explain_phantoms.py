"""Positive control for the explanations: a model that can only have learned the nodule must point at it.

    python bench/explain_phantoms.py --out runs/explain-phantoms [--docs-images docs/images]

1. Writes a synthetic phantom data set in the JSRT ``labels.csv`` layout, like
   ``lungdx.data.phantoms.write_phantom_dataset`` but with larger, higher-contrast nodules (35-50 mm,
   peak density 0.5-0.8): half the images have one, half none, and nothing else differs.
2. Registers a small CNN (batch norm, global max pooling) for this process only and trains it with
   ``lungdx.train.fit``; ``lungdx.evaluate.evaluate_run`` writes ``predictions.csv``.
3. Runs ``lungdx.explain.review_gallery`` and ``lungdx.explain.localize_run`` (Grad-CAM, Grad-CAM++,
   occlusion) on the test split and prints the pointing-game tables.
4. With ``--docs-images``, writes three small gallery overlays there (72 dpi): a true positive, a false
   negative (or false positive) and a true negative.

Everything is synthetic: nothing here says anything about real radiographs.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn

COLUMNS = ("image", "case_id", "label", "has_nodule", "malignant", "subtlety", "size_mm", "nodule_x", "nodule_y",
           "nodule_radius_px", "lung_mask", "patient_id", "synthetic")


class ExplainDemoCNN(nn.Module):
    """Three conv blocks with batch norm, global max pooling, one logit."""

    gradcam_layer = "features.9"

    def __init__(self, input_size: int = 128, in_channels: int = 1):
        super().__init__()

        def block(inputs, outputs):
            return [nn.Conv2d(inputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU()]

        self.features = nn.Sequential(nn.Conv2d(in_channels, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16),
                                      nn.ReLU(), *block(16, 32), nn.MaxPool2d(2), *block(32, 32))
        self.head = nn.Linear(32, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).amax(dim=(2, 3)))


def write_dataset(out_dir: Path, n_images: int, size: int, seed: int) -> Path:
    """Phantoms with enlarged nodules (even case numbers) or none (odd), in the JSRT labels.csv layout."""
    from lungdx.data.phantoms import render, sample_anatomy, sample_view

    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "lung_masks").mkdir(parents=True, exist_ok=True)
    rng, rows = np.random.default_rng(seed), []
    for index in range(n_images):
        anatomy = sample_anatomy(rng, "malignant" if index % 2 == 0 else "non_nodule")
        if anatomy.nodule is not None:
            nodule = dataclasses.replace(anatomy.nodule, size_mm=round(float(rng.uniform(35, 50)), 1),
                                         contrast=float(rng.uniform(0.5, 0.8)), spicules=())
            anatomy = dataclasses.replace(anatomy, nodule=nodule)
        phantom = render(anatomy, sample_view(rng), size, rng)
        case_id, info = f"PHANT{index + 1:04d}", phantom.info
        Image.fromarray(np.round(phantom.image * 65535).astype(np.uint16)).save(out_dir / "images" / f"{case_id}.png")
        Image.fromarray(phantom.lung_mask.astype(np.uint8)).save(out_dir / "lung_masks" / f"{case_id}.png")
        row = dict.fromkeys(COLUMNS, "")
        row.update(image=f"images/{case_id}.png", case_id=case_id, label=info["kind"], has_nodule=int(info["has_nodule"]),
                   lung_mask=f"lung_masks/{case_id}.png", patient_id=f"SYN{index + 1:05d}", synthetic=1)
        if info["has_nodule"]:
            row.update(malignant=1, subtlety=info["subtlety"], size_mm=info["size_mm"], nodule_x=info["nodule_x"],
                       nodule_y=info["nodule_y"], nodule_radius_px=info["nodule_radius_px"])
        rows.append(row)
    with (out_dir / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "README.md").write_text("# SYNTHETIC phantoms with enlarged nodules (bench/explain_phantoms.py)\n")
    return out_dir


def small_png(source: str | Path, target: Path) -> int:
    """An optimised copy of a figure; returns its size in bytes."""
    with Image.open(source) as image:
        image.convert("RGB").save(target, optimize=True)
    return target.stat().st_size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the data set, the run and the figures")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", type=int, default=128, help="phantom and model input size in pixels")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--docs-images", help="copy three overlays here (small palette PNGs)")
    args = parser.parse_args()

    from lungdx.config import apply_overrides, load_config
    from lungdx.evaluate import evaluate_run
    from lungdx.explain import localize_run, review_gallery, write_localization
    from lungdx.models import register_model
    from lungdx.train import fit

    @register_model
    def explain_demo_cnn(**kwargs) -> ExplainDemoCNN:
        return ExplainDemoCNN(**kwargs)

    started, out = time.perf_counter(), Path(args.out)
    data = write_dataset(out / "phantoms", args.images, args.size, args.seed)
    config = apply_overrides(load_config(), [
        f"data.path={data}", f"data.cache_dir={out / 'cache'}", "data.task=nodule_vs_normal", f"preprocess.size={args.size}",
        "model.name=explain_demo_cnn", f"train.epochs={args.epochs}", "train.batch_size=16", "train.lr=0.003",
        "train.patience=4", "eval.n_bootstrap=200"])
    run = fit(config, out / "run").run_dir
    results = evaluate_run(run)
    print(f"test AUC {results['splits']['test']['roc_auc']['value']:.3f} (synthetic)")
    predictions = pd.read_csv(run / "evaluation" / "predictions.csv")
    gallery = review_gallery(run, predictions, out / "gallery", per_category=2, device="cpu")
    (out / "gallery.json").write_text(json.dumps(gallery, indent=2))
    for method in ("gradcam", "gradcampp", "occlusion"):
        result = localize_run(run, method=method, split="test", by=None, device="cpu")
        write_localization(result, out / f"localization-{method}")
        print(result.markdown())
    if args.docs_images:
        docs = Path(args.docs_images)
        docs.mkdir(parents=True, exist_ok=True)
        small = review_gallery(run, predictions, out / "docs-gallery", per_category=1, device="cpu", dpi=72)
        first = {entry["category"]: entry for entry in small}
        picks = [first.get("true_positive"), first.get("false_negative") or first.get("false_positive"), first.get("true_negative")]
        for entry in filter(None, picks):
            target = docs / f"explain-phantom-{entry['category'].replace('_', '-')}.png"
            print(f"{target}: {small_png(entry['path'], target) // 1024} KB ({entry['case_id']}, p={entry['probability']:.3f})")
    print(f"finished in {time.perf_counter() - started:.0f} s; outputs in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
