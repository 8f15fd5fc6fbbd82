"""Preprocessing shared by training, evaluation and prediction.

Two stages, so that augmentation can work on display intensities between them:

1. ``level``: resize to ``size`` x ``size`` (aspect handling per ``PreprocessConfig.aspect``),
   intensity levelling by a percentile window, optional histogram equalisation or CLAHE, optional
   denoising. Output in [0, 1]. This is what the on-disk cache stores.
2. ``normalize``: per-image standardisation (or a fixed mean/std). Cheap; done per batch.

``preprocess`` runs both and is what a model sees at prediction time. Training runs the same two
functions with augmentation in between, so a model never sees pixels prepared two ways.

Aspect handling: with ``pad`` (default) the longer side is resized to ``size`` and the shorter
side is padded symmetrically with zeros (air-dark) after levelling, so anatomy is not distorted and
the window percentiles are computed on the image content only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from lungdx.config import PreprocessConfig

_EPS = 1e-6


def level(pixels: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Resize, level, equalise and denoise one image.

    Args:
        pixels: (H, W) float image in [0, 1], MONOCHROME2 polarity.
        config: preprocessing settings.

    Returns:
        (size, size) float32 image in [0, 1].
    """
    pixels = np.asarray(pixels, dtype=np.float32)
    if pixels.ndim != 2 or min(pixels.shape) < 2:
        raise ValueError(f"expected a 2-D image of at least 2x2 pixels, got shape {pixels.shape}")
    content = _resize_content(pixels, config.size, config.aspect)
    content = window(content, *config.window_percentiles)
    content = equalize(content, config.equalization, config.clahe_clip, config.clahe_tiles)
    content = denoise(content, config.denoise)
    return _pad_square(content, config.size)


def _resize_content(pixels: np.ndarray, size: int, aspect: str) -> np.ndarray:
    height, width = pixels.shape
    if aspect == "stretch":
        target = (size, size)
    elif aspect == "pad":
        scale = size / max(height, width)
        target = (max(1, round(height * scale)), max(1, round(width * scale)))
    elif aspect == "crop":
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        pixels = pixels[top : top + side, left : left + side]
        target = (size, size)
    else:
        raise ValueError(f"unknown aspect handling '{aspect}' (use pad, stretch or crop)")
    shrinking = target[0] < pixels.shape[0]
    # INTER_AREA averages when shrinking (no aliasing of rib edges and noise); cubic when enlarging.
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC
    resized = cv2.resize(pixels, (target[1], target[0]), interpolation=interpolation)
    return np.clip(resized, 0.0, 1.0)


def _pad_square(content: np.ndarray, size: int) -> np.ndarray:
    height, width = content.shape
    if (height, width) == (size, size):
        return content.astype(np.float32, copy=False)
    canvas = np.zeros((size, size), dtype=np.float32)
    top, left = (size - height) // 2, (size - width) // 2
    canvas[top : top + height, left : left + width] = content
    return canvas


def window(pixels: np.ndarray, low_percentile: float, high_percentile: float) -> np.ndarray:
    """Clip to the [low, high] percentile range and stretch it to [0, 1]."""
    low, high = np.percentile(pixels, [low_percentile, high_percentile])
    if high - low < _EPS:
        return np.zeros_like(pixels, dtype=np.float32)
    return np.clip((pixels - low) / (high - low), 0.0, 1.0).astype(np.float32)


def equalize(pixels: np.ndarray, method: str, clip: float = 2.0, tiles: int = 8) -> np.ndarray:
    """Histogram equalisation (``hist``), CLAHE (``clahe``) or nothing (``none``), on 16 bits."""
    if method == "none":
        return pixels
    as_uint16 = np.round(pixels * 65535).astype(np.uint16)
    if method == "clahe":
        clahe = cv2.createCLAHE(clipLimit=clip, tileGridSize=(tiles, tiles))
        return clahe.apply(as_uint16).astype(np.float32) / 65535.0
    if method == "hist":
        histogram = np.bincount(as_uint16.ravel(), minlength=65536)
        cdf = np.cumsum(histogram).astype(np.float64)
        cdf = (cdf - cdf[np.nonzero(histogram)[0][0]]) / max(cdf[-1] - cdf.min(), 1.0)
        return np.clip(cdf[as_uint16], 0.0, 1.0).astype(np.float32)
    raise ValueError(f"unknown equalization '{method}' (use none, hist or clahe)")


def denoise(pixels: np.ndarray, method: str) -> np.ndarray:
    """Noise removal: ``median`` 3x3, ``gaussian`` (sigma 1 px), ``nlmeans`` or ``none``."""
    if method == "none":
        return pixels
    if method == "median":
        return cv2.medianBlur(pixels.astype(np.float32), 3)
    if method == "gaussian":
        return cv2.GaussianBlur(pixels.astype(np.float32), (0, 0), 1.0)
    if method == "nlmeans":
        as_uint8 = np.round(pixels * 255).astype(np.uint8)
        return cv2.fastNlMeansDenoising(as_uint8, None, h=5).astype(np.float32) / 255.0
    raise ValueError(f"unknown denoise method '{method}' (use none, median, gaussian or nlmeans)")


def normalize(images, config: PreprocessConfig):
    """Standardise images of shape (..., H, W); works on numpy arrays and torch tensors."""
    if config.normalization == "none":
        return images
    if config.normalization == "fixed":
        return (images - config.mean) / config.std
    if config.normalization != "per_image":
        raise ValueError(f"unknown normalization '{config.normalization}' (use per_image, fixed or none)")
    if isinstance(images, np.ndarray):
        mean = images.mean(axis=(-2, -1), keepdims=True)
        std = images.std(axis=(-2, -1), keepdims=True)
    else:
        mean = images.mean(dim=(-2, -1), keepdim=True)
        std = images.std(dim=(-2, -1), keepdim=True, unbiased=False)
    return (images - mean) / (std + _EPS)


def preprocess(pixels: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """The full preprocessing a model sees: ``(H, W)`` in [0, 1] -> ``(1, size, size)`` float32."""
    return normalize(level(pixels, config), config)[None].astype(np.float32)


@dataclass(frozen=True)
class GridMap:
    """Where ``preprocess.level`` put an image: box (top, left, height, width) in each grid."""

    grid_box: tuple[int, int, int, int]
    image_box: tuple[int, int, int, int]
    size: int

    @classmethod
    def of(cls, shape: Sequence[int], config: PreprocessConfig) -> GridMap:
        """The placement of an image of ``shape`` (rows, columns) by ``preprocess.level`` with ``config``."""
        height, width, size = int(shape[0]), int(shape[1]), config.size
        if config.aspect == "stretch":
            return cls((0, 0, size, size), (0, 0, height, width), size)
        if config.aspect == "crop":
            side = min(height, width)
            return cls((0, 0, size, size), ((height - side) // 2, (width - side) // 2, side, side), size)
        if config.aspect != "pad":
            raise ValueError(f"unknown aspect handling '{config.aspect}' (use pad, stretch or crop)")
        # The same arithmetic as preprocess._resize_content and _pad_square.
        scale = size / max(height, width)
        content = (max(1, round(height * scale)), max(1, round(width * scale)))
        return cls(((size - content[0]) // 2, (size - content[1]) // 2, *content), (0, 0, height, width), size)

    def point_to_grid(self, x: float, y: float, radius: float = 0.0) -> tuple[float, float, float]:
        """Image pixel coordinates (column, row, radius) to the model grid (pixel centres at integers)."""
        (gt, gl, gh, gw), (it, il, ih, iw) = self.grid_box, self.image_box
        sx, sy = gw / iw, gh / ih
        return gl + (x + 0.5 - il) * sx - 0.5, gt + (y + 0.5 - it) * sy - 0.5, radius * math.sqrt(sx * sy)

    def point_to_image(self, x: float, y: float, radius: float = 0.0) -> tuple[float, float, float]:
        """Model-grid coordinates (column, row, radius) back to the image's pixels (the inverse of ``point_to_grid``)."""
        (gt, gl, gh, gw), (it, il, ih, iw) = self.grid_box, self.image_box
        sx, sy = gw / iw, gh / ih
        return il + (x + 0.5 - gl) / sx - 0.5, it + (y + 0.5 - gt) / sy - 0.5, radius / math.sqrt(sx * sy)

    def to_grid(self, array: np.ndarray, interpolation: int = cv2.INTER_NEAREST) -> np.ndarray:
        """An image-sized array (a lung mask) resampled onto the model grid, zero outside the image."""
        (gt, gl, gh, gw), (it, il, ih, iw) = self.grid_box, self.image_box
        crop = np.asarray(array, dtype=np.float32)[it : it + ih, il : il + iw]
        canvas = np.zeros((self.size, self.size), dtype=np.float32)
        canvas[gt : gt + gh, gl : gl + gw] = cv2.resize(crop, (gw, gh), interpolation=interpolation)
        return canvas

    def to_image(self, grid_array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        """A model-grid array (a heatmap) resampled onto the image's rows and columns, zero where unseen."""
        (gt, gl, gh, gw), (it, il, ih, iw) = self.grid_box, self.image_box
        content = np.asarray(grid_array, dtype=np.float32)[gt : gt + gh, gl : gl + gw]
        result = np.zeros(tuple(int(s) for s in shape[:2]), dtype=np.float32)
        result[it : it + ih, il : il + iw] = cv2.resize(content, (iw, ih), interpolation=cv2.INTER_LINEAR)
        return np.clip(result, 0.0, 1.0)
