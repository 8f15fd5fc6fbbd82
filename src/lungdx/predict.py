"""One ``Predictor`` for the command line, the evaluation and the service.

It owns the only path from pixels to probabilities: ``preprocess.level`` (also what the cache
stores), ``preprocess.normalize``, the model, a sigmoid, and the operating threshold frozen in the
checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lungdx import runtime
from lungdx.checkpoint import load_checkpoint, model_from_checkpoint, model_identity
from lungdx.config import PreprocessConfig, from_dict
from lungdx.io import ImageReadError, is_chest_radiograph, read_image
from lungdx.preprocess import level, normalize

logger = logging.getLogger(__name__)


def model_input(levelled: torch.Tensor, config: PreprocessConfig, hardware: runtime.Hardware) -> torch.Tensor:
    """Levelled images (N, H, W) or (N, 1, H, W) in [0, 1] -> the normalised model input."""
    if levelled.ndim == 3:
        levelled = levelled[:, None]
    images = normalize(levelled.to(hardware.device, torch.float32), config)
    return images.contiguous(memory_format=torch.channels_last) if hardware.channels_last else images


@torch.inference_mode()
def compute_logits(model: nn.Module, levelled: np.ndarray | Sequence[np.ndarray], config: PreprocessConfig,
                   hardware: runtime.Hardware, batch_size: int = 64) -> np.ndarray:
    """Logits (N,) for levelled images (N, H, W) in [0, 1], in evaluation mode, batch by batch."""
    model.eval()
    logits = []
    for start in range(0, len(levelled), batch_size):
        chunk = torch.from_numpy(np.asarray(levelled[start : start + batch_size], dtype=np.float32))
        with hardware.autocast():
            logits.append(model(model_input(chunk, config, hardware)).float().cpu())
    return torch.cat(logits).reshape(-1).numpy() if logits else np.zeros(0, dtype=np.float32)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Probabilities from logits, numerically stable."""
    return (1.0 / (1.0 + np.exp(-np.clip(logits, -60, 60)))).astype(np.float64)


@dataclass
class Prediction:
    """The result for one image: probability, label at the threshold, or the reason it failed."""

    source: str
    probability: float | None = None
    label: int | None = None
    class_name: str | None = None
    threshold: float | None = None
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)


class Predictor:
    """A trained model with its preprocessing and operating threshold.

    Args:
        checkpoint: a loaded checkpoint (``lungdx.checkpoint.load_checkpoint``).
        device: ``auto``, ``cpu`` or ``cuda``.
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` (see ``lungdx.runtime``).
    """

    def __init__(self, checkpoint: dict, device: str = "auto", precision: str = "auto", channels_last: bool = True):
        self.checkpoint = checkpoint
        self.hardware = runtime.Hardware.resolve(device, precision, channels_last)
        self.preprocess_config = from_dict(PreprocessConfig, checkpoint["preprocess"])
        self.threshold = checkpoint.get("threshold")
        # Temperature scaling (``lungdx calibrate``): probabilities are sigmoid(logit / T).
        self.temperature = float(checkpoint.get("temperature") or 1.0)
        self.class_names = list(checkpoint["class_names"])
        self.model = self.hardware.prepare(model_from_checkpoint(checkpoint))

    @cached_property
    def identity(self) -> dict[str, str]:
        """``checkpoint.model_identity``, computed once (it hashes every weight)."""
        return model_identity(self.checkpoint)

    @classmethod
    def from_path(cls, path: str | Path, **kwargs) -> Predictor:
        """Load from a checkpoint file or a run folder (its ``model.pt``)."""
        path = Path(path)
        return cls(load_checkpoint(path / "model.pt" if path.is_dir() else path), **kwargs)

    def probabilities(self, levelled: np.ndarray | Sequence[np.ndarray], batch_size: int = 64) -> np.ndarray:
        """Probabilities for levelled images (N, H, W) in [0, 1] (the cache's stage).

        ``levelled`` may be any sliceable sequence, such as ``ImageCache.view``: only one batch is
        read into memory at a time.
        """
        return sigmoid(self.logits(levelled, batch_size) / self.temperature)

    def logits(self, levelled: np.ndarray | Sequence[np.ndarray], batch_size: int = 64) -> np.ndarray:
        """The model's raw logits (before temperature scaling) for levelled images."""
        return compute_logits(self.model, levelled, self.preprocess_config, self.hardware, batch_size)

    def level(self, pixels: np.ndarray) -> np.ndarray:
        """The checkpoint's levelling of one (H, W) image in [0, 1]."""
        return level(pixels, self.preprocess_config)

    def predict_pixels(self, pixels: np.ndarray, source: str = "<array>", meta: dict | None = None) -> Prediction:
        """Predict one (H, W) image in [0, 1] (MONOCHROME2 polarity)."""
        probability = float(self.probabilities(self.level(pixels)[None])[0])
        return self.decide(source, probability, meta or {})

    def predict_files(self, paths: Iterable[str | Path], batch_size: int = 16) -> list[Prediction]:
        """Predict image files; a file that cannot be read gets a Prediction with ``error`` set."""
        results, pending = [], []
        for path in paths:
            try:
                image = read_image(path)
                pending.append((len(results), self.level(image.pixels)))
                results.append(Prediction(source=str(path), meta=image.meta))
            except (ImageReadError, ValueError) as err:
                logger.warning("cannot predict: %s", err)
                results.append(Prediction(source=str(path), error=str(err)))
        if pending:
            probabilities = self.probabilities(np.stack([levelled for _, levelled in pending]), batch_size)
            for (index, _), probability in zip(pending, probabilities, strict=True):
                results[index] = self.decide(results[index].source, float(probability), results[index].meta)
        return results

    def decide(self, source: str, probability: float, meta: dict) -> Prediction:
        """The Prediction for a probability: label at the frozen threshold, and header warnings."""
        chest, reason = is_chest_radiograph(meta) if meta else (True, "")
        warnings = [] if chest else [f"not a frontal chest radiograph: {reason}"]
        if self.threshold is None:
            return Prediction(source=source, probability=probability, meta=meta, warnings=warnings)
        label = int(probability >= self.threshold)
        return Prediction(source=source, probability=probability, label=label, class_name=self.class_names[label],
                          threshold=self.threshold, meta=meta, warnings=warnings)
