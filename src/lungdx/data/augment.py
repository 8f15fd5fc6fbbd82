"""Chest-safe augmentation of levelled batches (values in [0, 1]), on the training device.

Small rotations, scaling and translations (one affine warp per image), brightness, contrast and
gamma, and Gaussian noise. No horizontal flip unless asked for: on a chest radiograph the heart is
on the patient's left, and a flipped image is a different (rare, situs inversus) anatomy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lungdx.config import AugmentConfig


def affine_grid(theta: torch.Tensor, size: list[int]) -> torch.Tensor:
    """``F.affine_grid(theta, size, align_corners=False)`` for a 2-D ``size`` (N, C, H, W), built per axis.

    The same sampling grid to within float rounding (a few 1e-7 of the [-1, 1] range), faster on the CPU
    (bench/README.md): torch forms it as a batched (N, H*W, 3) x (3, 2) matmul over a full grid of pixel
    centres; here each output coordinate is ``a * x + (b * y + c)`` with ``x`` one row's pixel centres and
    ``y`` one column's. The nodule detector's sampler runs 1.6-2x faster with it (``bench/nodule_throughput.py``).
    """
    count, _, height, width = size
    grid = torch.empty(count, height, width, 2, dtype=theta.dtype, device=theta.device)
    x, y = (torch.linspace(-1, 1, side, dtype=theta.dtype, device=theta.device) * ((side - 1) / side)
            for side in (width, height))  # pixel centres, as affine_grid places them (align_corners=False)
    for axis in range(2):
        a, b, c = (theta[:, axis, column, None, None] for column in range(3))
        torch.add(y[None, :, None] * b + c, x[None, None, :] * a, out=grid[..., axis])
    return grid


def _uniform(shape, spread: float, generator: torch.Generator, device) -> torch.Tensor:
    return (torch.rand(shape, generator=generator) * 2 - 1).mul_(spread).to(device)


def augment(images: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Randomly transform a batch of shape (N, 1, H, W) in [0, 1]; returns a new tensor in [0, 1].

    Args:
        images: levelled images.
        config: ranges of each transform.
        generator: a CPU ``torch.Generator`` so that runs are reproducible on any device.
    """
    if not config.enabled:
        return images
    count, device = images.shape[0], images.device
    images = _affine(images, config, generator)
    if config.hflip:
        flip = torch.rand(count, generator=generator).to(device) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    gamma = torch.exp(_uniform(count, config.gamma, generator, device))[:, None, None, None]
    images = images.clamp(0, 1).pow(gamma)
    contrast = (1 + _uniform(count, config.contrast, generator, device))[:, None, None, None]
    brightness = _uniform(count, config.brightness, generator, device)[:, None, None, None]
    mean = images.mean(dim=(-2, -1), keepdim=True)
    images = (images - mean) * contrast + mean + brightness
    if config.noise_std > 0:
        noise = torch.randn(images.shape, generator=generator).to(device) * config.noise_std
        images = images + noise
    return images.clamp(0, 1)


def _affine(images: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    if config.rotation_deg == 0 and config.scale == 0 and config.translate == 0:
        return images
    return warp(images, random_affine(images.shape[0], config, generator))


def random_affine(count: int, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """(N, 2, 3) affine_grid matrices: rotation, scale and shift within the chest-safe ranges."""
    angle = _uniform(count, math.radians(config.rotation_deg), generator, "cpu")
    scale = 1 + _uniform(count, config.scale, generator, "cpu")
    shift = _uniform((count, 2), 2 * config.translate, generator, "cpu")  # grid units span 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    return torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)


def warp(images: torch.Tensor, theta: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """``images`` (N, C, H, W) resampled by ``theta`` (N, 2, 3): bilinear with the border repeated, or nearest
    with zeros outside (masks, logits). Repeating the border keeps the film edge rather than inventing black
    corners the model could learn."""
    grid = affine_grid(theta.to(images.device, images.dtype), list(images.shape))
    return F.grid_sample(images, grid, mode=mode, padding_mode="border" if mode == "bilinear" else "zeros",
                         align_corners=False)
