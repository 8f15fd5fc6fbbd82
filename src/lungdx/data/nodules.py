"""Localisation data: lung masks and nodule circles on the model grid, target maps, nodule insertion.

Pure functions over arrays and a manifest frame: ``lungdx.nodule_train`` builds the training data of
``nodule_net`` from them. Everything here is computed from the rows it is given; the training code
hands it training-split rows only (``NoduleBank`` refuses any other split), so no test image or
nodule patch reaches training.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from lungdx.config import INSERT_MATCHES, PreprocessConfig
from lungdx.preprocess import GridMap

logger = logging.getLogger(__name__)

JSRT_PIXEL_MM_2048 = 0.175
"""JSRT's pixel size at 2048 x 2048 (the official ``.IMG`` layout)."""


def nodule_circle(row: Mapping, shape: Sequence[int]) -> tuple[float, float, float] | None:
    """(column, row, radius) of the nodule in the image's pixels, or None when the row gives none.

    ``nodule_x``, ``nodule_y``, ``nodule_radius_px`` (pixels of the image file: the JSRT
    ``labels.csv`` layout and lungdx's phantoms), else JSRT's official ``nodule_x_2048``,
    ``nodule_y_2048`` and ``size_mm`` at 0.175 mm per pixel, scaled to the image's width.
    """
    circle = [_finite(row.get(key)) for key in ("nodule_x", "nodule_y", "nodule_radius_px")]
    if None not in circle:
        return tuple(circle)
    x, y, size_mm = (_finite(row.get(key)) for key in ("nodule_x_2048", "nodule_y_2048", "size_mm"))
    if None in (x, y, size_mm):
        return None
    scale = shape[1] / 2048
    return x * scale, y * scale, size_mm / 2 / JSRT_PIXEL_MM_2048 * scale


def _finite(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def image_shape(path: str | Path) -> tuple[int, int]:
    """(rows, columns) of an image file, from its header where the format allows."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.height, image.width
    except Exception:  # DICOM, JSRT raw: decode once
        from lungdx.io import read_image

        return tuple(read_image(path).pixels.shape[:2])


@dataclass
class LocalisationTargets:
    """Per row of a frame, on the model grid (``size`` x ``size``).

    Attributes:
        lung_masks: (N, size, size) uint8 {0, 1}; all zero where the row has no mask file.
        has_mask: (N,) bool.
        circles: (N, 3) float32 nodule column, row, radius in grid pixels; NaN without a nodule.
        malignant: (N,) float32 1 / 0, NaN without a nodule or label.
    """

    lung_masks: np.ndarray
    has_mask: np.ndarray
    circles: np.ndarray
    malignant: np.ndarray

    def subset(self, rows: np.ndarray) -> LocalisationTargets:
        """The targets of the rows selected by a boolean (or index) array, in order."""
        return LocalisationTargets(self.lung_masks[rows], self.has_mask[rows], self.circles[rows], self.malignant[rows])


def localisation_targets(frame: pd.DataFrame, config: PreprocessConfig) -> LocalisationTargets:
    """Lung masks (``lung_mask`` column) and nodule circles of every row, mapped onto the model grid."""
    size = config.size
    masks = np.zeros((len(frame), size, size), dtype=np.uint8)
    has_mask = np.zeros(len(frame), dtype=bool)
    circles = np.full((len(frame), 3), np.nan, dtype=np.float32)
    malignant = np.full(len(frame), np.nan, dtype=np.float32)
    for index, row in enumerate(frame.to_dict("records")):
        shape = image_shape(row["path"])
        grid = GridMap.of(shape, config)
        mask_path = row.get("lung_mask")
        if isinstance(mask_path, str) and mask_path:
            mask = read_mask(mask_path, shape)
            masks[index] = grid.to_grid(mask, cv2.INTER_AREA) > 0.5
            has_mask[index] = True
        if _finite(row.get("has_nodule")) == 1:
            circle = nodule_circle(row, shape)
            if circle is not None:
                circles[index] = grid.point_to_grid(*circle)
            label = _finite(row.get("malignant"))
            malignant[index] = np.nan if label is None else label
    return LocalisationTargets(masks, has_mask, circles, malignant)


def read_mask(path: str | Path, shape: Sequence[int]) -> np.ndarray:
    """A binary lung mask file (any non-zero pixel is lung) as float32 (rows, columns) of the image's shape."""
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise ValueError(f"{path}: cannot read the lung mask")
    if mask.ndim == 3:
        mask = mask[..., 0]
    mask = (mask > 0).astype(np.float32)
    if mask.shape != tuple(shape[:2]):
        mask = cv2.resize(mask, (int(shape[1]), int(shape[0])), interpolation=cv2.INTER_NEAREST)
    return mask


def dice(mask_a: np.ndarray, mask_b: np.ndarray) -> float:
    """Dice overlap of two binary masks (1.0 when both are empty)."""
    a, b = np.asarray(mask_a, bool), np.asarray(mask_b, bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(a, b).sum() / total)


def target_map(circles: torch.Tensor, size: int, stride: int = 4, min_sigma_px: float = 4.0) -> torch.Tensor:
    """Gaussian nodule targets (N, 1, size/stride, size/stride) in [0, 1] from (N, 3) circles in input px.

    sigma is half the radius (at least ``min_sigma_px``); the cell nearest the centre is exactly 1 (the
    positive of the CenterNet focal loss). Rows with a NaN circle get an all-zero map.
    """
    cells = size // stride
    centres = torch.arange(cells, dtype=torch.float32) * stride + (stride - 1) / 2  # cell centres in input px
    maps = torch.zeros(len(circles), 1, cells, cells)
    for index, (x, y, radius) in enumerate(circles.tolist()):
        if not math.isfinite(x) or not (0 <= x < size and 0 <= y < size):
            continue
        sigma = max(radius / 2, min_sigma_px)
        gx = torch.exp(-((centres - x) ** 2) / (2 * sigma**2))
        gy = torch.exp(-((centres - y) ** 2) / (2 * sigma**2))
        maps[index, 0] = gy[:, None] * gx[None, :]
        column, row = min(cells - 1, max(0, int(x // stride))), min(cells - 1, max(0, int(y // stride)))
        maps[index, 0, row, column] = 1.0
    return maps


def focal_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
               alpha: float = 2.0, beta: float = 4.0) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss, normalised by the number of nodules (at least 1)."""
    logits = logits.float()
    log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
    p = log_p.exp()
    positive = target >= 1.0
    loss = torch.where(positive, (1 - p) ** alpha * log_p, (1 - target) ** beta * p**alpha * log_not_p)
    if weight is not None:
        loss = loss * weight
    return -loss.sum() / positive.sum().clamp_min(1)


# ---------------------------------------------------------------------------------------------
# Nodule insertion: real nodules from training images blended into training lungs, or simulated ones
# ---------------------------------------------------------------------------------------------


@dataclass
class NodulePatch:
    """A nodule cut from a training image: levelled pixels, its alpha and where it came from."""

    pixels: np.ndarray
    radius_px: float
    malignant: float
    case_id: str

    @functools.cached_property
    def contrast(self) -> float:
        """Mean level inside half the radius minus the ring's (``_ring_mean``): positive for a nodule denser
        than its surroundings (JSRT's training nodules: median about 0.03 of the levelled range)."""
        side = self.pixels.shape[0]
        centre = (side - 1) / 2
        yy, xx = np.mgrid[:side, :side]
        inner = np.hypot(xx - centre, yy - centre) <= 0.5 * self.radius_px
        return float(self.pixels[inner].mean()) - _ring_mean(self.pixels, self.radius_px)


class NoduleBank:
    """Patches around the nodules of training rows, for ``insert_nodule``.

    Args:
        levelled: (N, S, S) levelled images of ``rows``.
        rows: the frame rows (with ``split``, ``case_id``) the images belong to: training rows only.
        circles: (N, 3) nodule circles of the rows in grid pixels (NaN without a nodule).
        malignant: (N,) malignancy labels.
    """

    def __init__(self, levelled: np.ndarray, rows: pd.DataFrame, circles: np.ndarray, malignant: np.ndarray):
        if len(rows) and set(rows["split"]) != {"train"}:
            raise ValueError(f"a nodule bank takes training rows only; got splits {sorted(set(rows['split']))}")
        self.patches: list[NodulePatch] = []
        for image, case_id, (x, y, radius), label in zip(levelled, rows["case_id"], circles, malignant, strict=True):
            if not math.isfinite(x):
                continue
            patch = _cut(np.asarray(image, np.float32), x, y, radius)
            if patch is not None:
                self.patches.append(NodulePatch(patch, float(radius), float(label), str(case_id)))
        self.case_ids = {patch.case_id for patch in self.patches}

    def __len__(self) -> int:
        return len(self.patches)


def _cut(image: np.ndarray, x: float, y: float, radius: float) -> np.ndarray | None:
    half = int(math.ceil(1.6 * radius)) + 2
    column, row = int(round(x)), int(round(y))
    if row - half < 0 or column - half < 0 or row + half + 1 > image.shape[0] or column + half + 1 > image.shape[1]:
        return None
    return image[row - half : row + half + 1, column - half : column + half + 1].copy()


def _alpha(side: int, radius: float) -> np.ndarray:
    centre = (side - 1) / 2
    yy, xx = np.mgrid[:side, :side]
    distance = np.hypot(xx - centre, yy - centre)
    # 1 inside the nodule, a cosine fall-off to 0 at 1.5 radii: no visible seam.
    ramp = np.clip((distance - radius) / max(0.5 * radius, 1.0), 0, 1)
    return (0.5 * (1 + np.cos(np.pi * ramp))).astype(np.float32)


def _ring(side: int, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A square patch's ring at 1.2-1.6 radii from its centre (bool), and the column and row offsets from it."""
    centre = (side - 1) / 2
    yy, xx = np.mgrid[:side, :side] - centre
    distance = np.hypot(xx, yy)
    return (distance >= 1.2 * radius) & (distance <= 1.6 * radius), xx, yy


def _ring_mean(pixels: np.ndarray, radius: float) -> float:
    ring, _, _ = _ring(pixels.shape[0], radius)
    return float(pixels[ring].mean()) if ring.any() else float(pixels.mean())


def _ring_plane(pixels: np.ndarray, radius: float) -> np.ndarray:
    """The least-squares plane through the ring at 1.2-1.6 radii of a square patch, over the whole patch: its
    level and its tilt (the ring's mean where the ring has fewer than three pixels)."""
    ring, xx, yy = _ring(pixels.shape[0], radius)
    if ring.sum() < 3:
        return np.full_like(pixels, _ring_mean(pixels, radius))
    design = np.stack([np.ones(int(ring.sum())), xx[ring], yy[ring]], axis=1)
    level, along, down = np.linalg.lstsq(design, pixels[ring].astype(np.float64), rcond=None)[0]
    return (level + along * xx + down * yy).astype(pixels.dtype)


def _place(lung_mask: np.ndarray, half: int, radius: float, rng: np.random.Generator,
           tries: int) -> tuple[int, int] | None:
    """A random (row, column) where a patch of side ``2 * half + 1`` fits the image and the nodule's centre and
    its four points at ``radius`` lie inside ``lung_mask``; None after ``tries`` draws."""
    rows, columns = np.nonzero(lung_mask)
    if len(rows) == 0:
        return None
    offsets = radius * np.array([[0, 0], [1, 0], [-1, 0], [0, 1], [0, -1]])
    for _ in range(tries):
        pick = rng.integers(len(rows))
        row, column = int(rows[pick]), int(columns[pick])
        if row - half < 0 or column - half < 0 or row + half + 1 > lung_mask.shape[0] or column + half + 1 > lung_mask.shape[1]:
            continue
        points = (np.array([column, row]) + offsets).round().astype(int)
        if lung_mask[points[:, 1], points[:, 0]].all():
            return row, column
    return None


def insert_nodule(image: np.ndarray, lung_mask: np.ndarray, patch: NodulePatch, rng: np.random.Generator,
                  tries: int = 30, contrast: float = 1.0,
                  match: str = "ring") -> tuple[np.ndarray, tuple[float, float, float]] | None:
    """Blend ``patch`` into ``image`` at a random place where the nodule lies inside ``lung_mask``.

    The patch is shifted to the recipient's local level, its difference from that level scaled by
    ``contrast`` (below 1: a fainter nodule than the donor's), and blended with a soft circular alpha
    (1 inside the nodule, 0 from 1.5 radii). ``match`` says what is matched at the ring around the
    nodule (1.2-1.6 radii): ``ring``, the two rings' means; ``plane``, the planes fitted to them, level
    and tilt, so that a donor cut from a sloping part of the lung does not leave a step where the
    blend ends on a recipient that slopes otherwise (``_ring_plane``). Both draw the same random
    numbers. Returns the new image and the circle (column, row, radius), or None when no place
    inside the lungs fits.
    """
    if not 0 < contrast <= 1:
        raise ValueError(f"contrast must be in (0, 1]; got {contrast}")
    if match not in INSERT_MATCHES:
        raise ValueError(f"match must be one of {', '.join(INSERT_MATCHES)}; got '{match}'")
    side = patch.pixels.shape[0]
    half = side // 2
    radius = patch.radius_px
    place = _place(lung_mask, half, radius, rng, tries)
    if place is None:
        return None
    row, column = place
    region = image[row - half : row + half + 1, column - half : column + half + 1]
    if match == "plane":
        shifted = contrast * (patch.pixels - _ring_plane(patch.pixels, radius)) + _ring_plane(region, radius)
    else:
        shifted = contrast * (patch.pixels - _ring_mean(patch.pixels, radius)) + _ring_mean(region, radius)
    alpha = _alpha(side, radius)
    result = image.copy()
    result[row - half : row + half + 1, column - half : column + half + 1] = np.clip(
        alpha * shifted + (1 - alpha) * region, 0, 1)
    return result, (float(column), float(row), radius)


def synthetic_nodule(radius: float, amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """A simulated nodule to add to a radiograph's own texture: (S, S), S = 2 * ceil(1.6 * radius) + 5.

    The projected thickness of a solid ball, sqrt(1 - d^2) for the normalised distance d from its
    centre, with an outline made oval (axis ratio 0.75-1, its area that of the circle of ``radius``)
    and lobulated (a 3- to 6-lobed ripple of up to 10% of the radius), at a random orientation, edges
    softened by a Gaussian of 0.15 radii (the film's unsharpness). Scaled so that the mean inside half
    the radius is ``amplitude``, as ``NodulePatch.contrast`` measures a real nodule.
    """
    half = int(math.ceil(1.6 * radius)) + 2
    coords = np.arange(-half, half + 1, dtype=np.float64)
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    ratio, turn, lobes, ripple, phase = (rng.uniform(0.75, 1.0), rng.uniform(0, np.pi), int(rng.integers(3, 7)),
                                         rng.uniform(0.0, 0.1), rng.uniform(0, 2 * np.pi))
    along = xx * np.cos(turn) + yy * np.sin(turn)
    across = -xx * np.sin(turn) + yy * np.cos(turn)
    angle = np.arctan2(across, along)
    distance = np.hypot(along * math.sqrt(ratio), across / math.sqrt(ratio)) / radius
    distance = distance / (1 + ripple * np.cos(lobes * angle + phase))
    thickness = np.sqrt(np.clip(1 - distance**2, 0, None)).astype(np.float32)
    sigma = max(0.15 * radius, 0.5)
    thickness = cv2.GaussianBlur(thickness, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_CONSTANT)
    inner = np.hypot(xx, yy) <= 0.5 * radius
    return (amplitude / max(float(thickness[inner].mean()), 1e-6) * thickness).astype(np.float32)


def add_nodule(image: np.ndarray, lung_mask: np.ndarray, nodule: np.ndarray, radius: float, rng: np.random.Generator,
               tries: int = 30) -> tuple[np.ndarray, tuple[float, float, float]] | None:
    """Add ``nodule`` (a ``synthetic_nodule``) to ``image`` at a random place where it lies inside ``lung_mask``:
    the recipient keeps its own texture, the nodule's density adds to it. Returns the new image and the circle
    (column, row, radius), or None when no place inside the lungs fits."""
    half = nodule.shape[0] // 2
    place = _place(lung_mask, half, radius, rng, tries)
    if place is None:
        return None
    row, column = place
    result = image.copy()
    window = (slice(row - half, row + half + 1), slice(column - half, column + half + 1))
    result[window] = np.clip(result[window] + nodule, 0, 1)
    return result, (float(column), float(row), radius)
