"""The validation reference that production drift is measured against.

At the end of training (``train.fit``) the checkpoint gets a ``val_reference``: the validation
probabilities and statistics of the validation images' raw pixels (as read, before the model's
levelling, so a change of exposure or of the reading pipeline shows). The monitoring log
(``lungdx.monitoring``) computes the same statistics for each production image with the same
functions, so both sides are measured one way.

Only plain data (lists, dicts, floats) goes in, so ``torch.load(..., weights_only=True)`` reads it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lungdx.io.acceptance import polarity_contrast

logger = logging.getLogger(__name__)

FORMAT = "lungdx-reference/1"
INTENSITY_BINS = 32
"""Equal-width bins of the [0, 1] intensity histogram."""
STATISTICS_SIDE_PX = 256
"""Intensity statistics are computed on a strided view with at most about this many pixels per side (at most
65,536 pixels). On the first 32 JSRT images (1024 px), the view's 32-bin fractions lie within 3.4e-3 of every
pixel's (median of the per-image largest difference 1.3e-3) and its 5th/50th/95th percentiles within 0.020
(median 0.004, one 8-bit level): ``python bench/monitor_cost.py --limit 32``. Was 512 before 2026-12-04;
references stored before then were computed on that finer view and compare with new logs to those errors."""
ACQUISITION_FIELDS = ("manufacturer", "manufacturer_model", "view_position", "photometric_interpretation",
                      "pixel_spacing", "image_size")
"""Categorical fields compared between production and the reference."""
MAX_REFERENCE_IMAGES = 256


def intensity_statistics(pixels: np.ndarray) -> dict:
    """Histogram (fractions in :data:`INTENSITY_BINS` bins), mean, std, percentiles and polarity contrast of one image.

    ``polarity`` is ``lungdx.io.acceptance.polarity_contrast``: the acceptance policy refuses an image far
    outside the validation images' values of it and of ``mean``.
    """
    pixels = np.asarray(pixels)
    if pixels.ndim != 2 or pixels.size == 0:
        raise ValueError(f"intensity statistics need one (H, W) image; got shape {pixels.shape}")
    # A stride keeps a 3000 x 3000 radiograph cheap; the histogram of every k-th pixel is the same to a few 1e-3.
    stride = max(1, int(np.ceil(max(pixels.shape) / STATISTICS_SIDE_PX)))
    sample = np.asarray(pixels[::stride, ::stride], dtype=np.float64).ravel()
    if not np.isfinite(sample).all():
        raise ValueError("the image holds NaN or infinite pixels")
    counts = np.histogram(np.clip(sample, 0.0, 1.0), bins=INTENSITY_BINS, range=(0.0, 1.0))[0]
    p05, p50, p95 = np.percentile(sample, [5, 50, 95])
    return {"height": int(pixels.shape[0]), "width": int(pixels.shape[1]), "mean": float(sample.mean()),
            "std": float(sample.std()), "p05": float(p05), "p50": float(p50), "p95": float(p95),
            "polarity": polarity_contrast(pixels), "histogram": (counts / counts.sum()).tolist()}


def _two_significant(value: float) -> str:
    return f"{float(f'{value:.2g}'):g}"


def acquisition_fields(meta: dict, shape: Sequence[int]) -> dict[str, str | None]:
    """The categorical fields of :data:`ACQUISITION_FIELDS` from a reader's ``meta`` and the image shape.

    Pixel spacing is Pixel Spacing (0028,0030), else Imager Pixel Spacing (0018,1164), to 0.01 mm;
    the size is rounded to two significant figures, so 2494 x 2048 and 2500 x 2048 are one size.
    """
    spacing = meta.get("pixel_spacing_mm") or meta.get("imager_pixel_spacing_mm")
    return {"manufacturer": meta.get("manufacturer") or None,
            "manufacturer_model": meta.get("manufacturer_model") or meta.get("model") or None,
            "view_position": meta.get("view_position") or None,
            "photometric_interpretation": meta.get("photometric_interpretation") or None,
            "pixel_spacing": "x".join(f"{float(v):.2f}" for v in spacing) if spacing else None,
            "image_size": f"{_two_significant(shape[0])}x{_two_significant(shape[1])}"}


def build_reference(probabilities: Sequence[float], paths: Sequence[str | Path], *, source: str,
                    max_images: int = MAX_REFERENCE_IMAGES) -> dict:
    """Score and raw-pixel statistics of validation cases, as stored in a checkpoint's ``val_reference``.

    Args:
        probabilities: every validation probability (the score reference).
        paths: the validation images; at most ``max_images`` of them, evenly spaced, are read for
            the intensity and acquisition reference. Unreadable ones are skipped.
        source: says where the reference comes from (shown in monitoring reports).
    """
    from lungdx.io import ImageReadError, read_image

    chosen = [paths[int(i)] for i in np.unique(np.linspace(0, len(paths) - 1, min(len(paths), max_images)).astype(int))] \
        if len(paths) else []
    stats, fields = [], []
    for path in chosen:
        try:
            image = read_image(path)
        except (ImageReadError, ValueError, OSError) as err:
            logger.debug("reference: skipping %s (%s)", path, err)
            continue
        stats.append(intensity_statistics(image.pixels))
        fields.append(acquisition_fields(image.meta, image.pixels.shape))
    return {"format": FORMAT, "source": source, "probabilities": [float(p) for p in probabilities],
            "intensity": summarize_intensity(stats), "acquisition": count_fields(fields)}


def summarize_intensity(stats: Sequence[dict]) -> dict:
    """Mean histogram and the per-image means and percentiles of many :func:`intensity_statistics`."""
    if not stats:
        return {"n_images": 0, "histogram": [], "mean": [], "p05": [], "p50": [], "p95": [], "polarity": []}
    histogram = np.mean([s["histogram"] for s in stats], axis=0)
    return {"n_images": len(stats), "histogram": histogram.tolist(),
            **{key: [float(s[key]) for s in stats] for key in ("mean", "p05", "p50", "p95", "polarity")}}


def count_fields(rows: Sequence[dict]) -> dict[str, dict[str, int]]:
    """``{field: {value: count}}`` over rows of :func:`acquisition_fields`; a missing value counts as ``""``."""
    return {name: dict(Counter(row.get(name) or "" for row in rows)) for name in ACQUISITION_FIELDS}


def calibrated_probabilities(probabilities: Sequence[float], temperature: float | None) -> list[float]:
    """Reference probabilities under the checkpoint's temperature (``lungdx calibrate`` runs after training)."""
    from lungdx.predict import sigmoid

    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1 - 1e-12)
    if not temperature or temperature == 1.0:
        return p.tolist()
    return sigmoid((np.log(p) - np.log1p(-p)) / float(temperature)).tolist()


def load_reference(checkpoint: dict, run_dir: str | Path | None = None) -> dict | None:
    """The checkpoint's ``val_reference``; for older checkpoints, one rebuilt from the run folder.

    The fallback takes the validation rows of ``run_dir/evaluation/predictions.csv`` (scores, at the
    model's current temperature already) and reads the validation images listed in ``split.csv`` where
    they still exist. Returns None when neither is available; ``source`` always says which was used.
    """
    reference = checkpoint.get("val_reference")
    if reference:
        return {**reference, "probabilities": calibrated_probabilities(reference["probabilities"],
                                                                       checkpoint.get("temperature"))}
    if run_dir is None:
        return None
    import pandas as pd

    run_dir = Path(run_dir)
    predictions, split = run_dir / "evaluation" / "predictions.csv", run_dir / "split.csv"
    probabilities, paths = [], []
    if predictions.is_file():
        frame = pd.read_csv(predictions)
        probabilities = frame.loc[frame["split"] == "val", "probability"].tolist()
    if split.is_file():
        frame = pd.read_csv(split)
        paths = [p for p in frame.loc[frame["split"] == "val", "path"] if Path(p).is_file()]
    if not probabilities and not paths:
        return None
    return build_reference(probabilities, paths, source=f"rebuilt from {run_dir} (the checkpoint predates val_reference): "
                           f"{len(probabilities)} validation scores from evaluation/predictions.csv, "
                           f"validation images from split.csv")
