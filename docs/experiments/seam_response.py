"""Does a trained detector answer a donor insertion's window edge? Its nodule map at places in a run's training
normals before and after a patch is blended in there.

The patches: a nodule of the run's bank (as the detector's training inserted them) and, of the same size, a patch
of lung with no nodule cut from another training normal (only the blend's edge can be new there), each matched
to its place by the ring's mean (``nodule.insert_match=ring``, what these CVs trained with) and by the ring's plane
(``plane``). For each, the map's highest logit within one radius of the place, less the same figure without the
insertion, and how often that place holds the image's highest logit. An edge-free insertion of lung into lung
should move the map little; a detector that learnt the edge answers the ring-matched lung patch and not the
plane-matched one. Training images only; prints figures, no pixels.

    python docs/experiments/seam_response.py runs/jsrt-cv10-nodule-v5-dbo-synth/runs/r0-f00 --count 150

Not part of lungdx: an experiment whose result is reported in docs/results.md.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

KINDS = ("lung patch, ring", "lung patch, plane", "nodule, ring", "nodule, plane")


def map_logits(predictor, levelled: np.ndarray, batch_size: int = 8) -> np.ndarray:
    """(N, s, s) nodule-map logits of levelled (N, S, S) images, as the run's model computes them in evaluation."""
    from lungdx.predict import model_input

    model = predictor.model.eval()
    maps = []
    with torch.inference_mode():
        for start in range(0, len(levelled), batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(levelled[start : start + batch_size], dtype=np.float32))
            with predictor.hardware.autocast():
                images = model_input(chunk, predictor.preprocess_config, predictor.hardware)
                lung_logits = model.segment(images)
                masked, _ = model.mask_image(images, lung_logits)
                maps.append(model.detect(masked.to(images.dtype), lung_logits).float()[:, 0].cpu().numpy())
    return np.concatenate(maps)


def site_logit(nodule_map: np.ndarray, x: float, y: float, radius: float, size: int) -> tuple[float, bool]:
    """The map's highest logit within ``radius`` input pixels (at least 1.5 cells) of (x, y), and whether it is the
    whole map's highest."""
    scale = nodule_map.shape[-1] / size
    rows, columns = np.mgrid[: nodule_map.shape[0], : nodule_map.shape[1]]
    near = np.hypot((columns + 0.5) / scale - x, (rows + 0.5) / scale - y) <= max(radius, 1.5 / scale)
    best = float(nodule_map[near].max())
    return best, best >= float(nodule_map.max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished nodule_net run folder (config.yaml, split.csv, model.pt)")
    parser.add_argument("--count", type=int, default=150, help="insertions of each kind (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=5, help="seed of the picks and places (default: %(default)s)")
    args = parser.parse_args()

    from insertion_gallery import training_nodules

    from lungdx.data import nodules
    from lungdx.predict import Predictor

    images, targets, bank = training_nodules(args.run)
    normals = np.flatnonzero(~np.isfinite(targets.circles[:, 0]) & targets.has_mask)
    predictor = Predictor.from_path(args.run, device="cpu")
    size = images.shape[-1]
    rng = np.random.default_rng(args.seed)

    recipients, sites, variants = [], [], {kind: [] for kind in KINDS}
    while len(recipients) < args.count:
        index, donor = rng.choice(normals, 2, replace=False)
        patch = bank.patches[rng.integers(len(bank))]
        radius = patch.radius_px
        lungs = targets.lung_masks[index] > 0.5
        half = int(math.ceil(1.6 * radius)) + 2
        cut = nodules._place(targets.lung_masks[donor] > 0.5, half, radius, rng, 30)
        if cut is None:
            continue
        lung_patch = nodules.NodulePatch(nodules._cut(images[donor], cut[1], cut[0], radius), radius, math.nan, "lung")
        seed = int(rng.integers(2**31))  # every variant at the same place of the same recipient
        results = [nodules.insert_nodule(images[index], lungs, source, np.random.default_rng(seed), match=match)
                   for source in (lung_patch, patch) for match in ("ring", "plane")]
        if any(result is None for result in results):
            continue
        recipients.append(index)
        sites.append(results[0][1])
        for kind, result in zip(KINDS, results, strict=True):
            variants[kind].append(result[0])

    before = map_logits(predictor, images[np.array(recipients)])
    base = [site_logit(nodule_map, *site, size) for nodule_map, site in zip(before, sites, strict=True)]
    print(f"{args.run}: {len(sites)} places in {len(set(recipients))} training normals; the map's highest logit "
          "within one radius of the place")
    print(f"  {'as it was':20s} median {np.median([b[0] for b in base]):7.2f}   the image's peak there "
          f"{np.mean([b[1] for b in base]):.2f}")
    for kind in KINDS:
        after = map_logits(predictor, np.stack(variants[kind]))
        found = [site_logit(nodule_map, *site, size) for nodule_map, site in zip(after, sites, strict=True)]
        change = np.array([f[0] - b[0] for f, b in zip(found, base, strict=True)])
        low, median, high = np.percentile(change, [25, 50, 75])
        print(f"  {kind:20s} median {np.median([f[0] for f in found]):7.2f}   change {median:+.2f} "
              f"(quartiles {low:+.2f} to {high:+.2f})   the image's peak there {np.mean([f[1] for f in found]):.2f}")


if __name__ == "__main__":
    main()
