"""How often the acceptance policy's polarity check refuses real chest radiographs, and how often their inversions.

For each collection in ../shared/data, a reference is built from a random part of its images (as a
checkpoint's validation reference is, ``lungdx.reference.build_reference``), and the rest are judged
as they are and inverted (1 - x), by ``AcceptancePolicy.reference_problem``. A reference built from
JSRT also judges the other collections (a model trained on JSRT meeting other hospitals' images).

    python bench/acceptance_polarity.py            # figures quoted in README's "Checks at the boundary"
    python bench/acceptance_polarity.py --data ../shared/data --seed 0
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from lungdx.io import read_image
from lungdx.io.acceptance import AcceptancePolicy
from lungdx.reference import build_reference

COLLECTIONS = {"JSRT": ("jsrt/images", "*.png", 24), "NIH ChestX-ray14 64 px": ("nih_cxr14_64px_subset/images", "*.png", 200),
               "Kermany paediatric": ("kermany_pediatric_cxr_val16", "**/*.jpeg", 0)}


def judged(policy: AcceptancePolicy, files: list[Path]) -> tuple[int, int]:
    """(refused as they are, refused when inverted) among ``files``."""
    pixels = [read_image(path).pixels for path in files]
    return (sum(policy.reference_problem(p) is not None for p in pixels),
            sum(policy.reference_problem(1 - p) is not None for p in pixels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    print("| reference | judged | images | refused as they are | refused inverted |\n|---|---|---|---|---|")
    jsrt_policy = None
    for name, (folder, pattern, reference_size) in COLLECTIONS.items():
        files = sorted((args.data / folder).glob(pattern))
        if not files:
            print(f"| {name} | - | 0 (folder missing) | | |")
            continue
        files = [files[i] for i in rng.permutation(len(files))]
        if reference_size:
            policy = AcceptancePolicy(reference=build_reference([], files[:reference_size], source=name)["intensity"])
            refused, inverted = judged(policy, files[reference_size:])
            held_out = len(files) - reference_size
            share = 100 * inverted / held_out
            print(f"| {reference_size} {name} | other {name} | {held_out} | {refused} | {inverted} ({share:.0f}%) |")
            jsrt_policy = jsrt_policy or policy
        if jsrt_policy is not None and name != "JSRT":
            refused, inverted = judged(jsrt_policy, files)
            print(f"| 24 JSRT | {name} | {len(files)} | {refused} | {inverted} ({100 * inverted / len(files):.0f}%) |")


if __name__ == "__main__":
    main()
