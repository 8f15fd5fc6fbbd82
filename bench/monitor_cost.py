"""What monitoring costs a request before the write-behind log takes over, against the inference it follows.

For each of ``--limit`` images: the model's inference on one image (the baseline), then the
monitor's per-request work (``statistics_grid``, the pixel key's hash and ``image_statistics``),
and ``reference.intensity_statistics`` (numpy's histogram and percentiles, what the validation
reference is built with). Times are medians over ``--repeats`` calls in this process, on the
threads torch uses; the ratios are what this run measured, on the CPU it names. It also reports how
far the statistics of the strided view (at most ``reference.STATISTICS_SIDE_PX`` a side) lie from
those of every pixel: the largest bin-fraction and percentile differences per image.

    python bench/monitor_cost.py --run runs/jsrt-cv10-128/runs/r0-f00 --images ../shared/data/jsrt/images
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ceiling import cpu_model  # noqa: E402

from lungdx.io import read_image  # noqa: E402
from lungdx.monitoring.monitor import grid_statistics, statistics_grid  # noqa: E402
from lungdx.reference import intensity_statistics  # noqa: E402


def median_ms(function, repeats: int) -> float:
    function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def time_steps(predictor, pixels, repeats: int) -> dict[str, float]:
    """Median ms of one inference and of each monitoring step on one image."""
    grid = statistics_grid(pixels)
    return {"inference": median_ms(lambda: predictor.predict_pixels(pixels), repeats),
            "grid + key": median_ms(lambda: hashlib.sha256(memoryview(statistics_grid(pixels)).cast("B")).hexdigest(), repeats),
            "grid_statistics": median_ms(lambda: grid_statistics(grid.copy()), repeats),
            "intensity_statistics": median_ms(lambda: intensity_statistics(pixels), repeats)}


def sampling_error(pixels) -> tuple[float, float]:
    """(largest |bin fraction| difference, largest |p05, p50, p95| difference): the strided view against every pixel."""
    view, every = grid_statistics(statistics_grid(pixels)), grid_statistics(np.array(pixels, dtype=np.float64))
    bins = np.max(np.abs(np.subtract(view["histogram"], every["histogram"])))
    percentiles = max(abs(view[key] - every[key]) for key in ("p05", "p50", "p95"))
    return float(bins), float(percentiles)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="run folder whose model is the baseline's inference")
    parser.add_argument("--images", required=True, help="folder of PNG/JPEG/DICOM images")
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    from lungdx.predict import Predictor

    predictor = Predictor.from_path(args.run)
    paths = sorted(p for p in Path(args.images).iterdir() if p.is_file())[: args.limit]
    if not paths:
        raise SystemExit(f"{args.images}: no images")
    rows, errors = [], []
    for path in paths:
        pixels = read_image(path).pixels
        rows.append(time_steps(predictor, pixels, args.repeats))
        errors.append(sampling_error(pixels))
        shape, dtype = pixels.shape, pixels.dtype
    print(f"{cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads; {len(paths)} images "
          f"(last {shape[1]}x{shape[0]} {dtype}), median of {args.repeats} calls each")
    print("| step | ms per image (median over images) | share of one inference |")
    print("|---|---|---|")
    base = statistics.median(row["inference"] for row in rows)
    for key in rows[0]:
        value = statistics.median(row[key] for row in rows)
        print(f"| {key} | {value:.2f} | {value / base:.2f}x |")
    bins, percentiles = np.array(errors).T
    print(f"strided view against every pixel, per image: largest bin-fraction difference median {np.median(bins):.1e}, "
          f"max {bins.max():.1e}; largest percentile difference median {np.median(percentiles):.4f}, max {percentiles.max():.4f}")


if __name__ == "__main__":
    main()
