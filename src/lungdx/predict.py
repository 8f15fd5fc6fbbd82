"""One ``Predictor`` for the command line, the evaluation and the service.

It owns the only path from pixels to probabilities: ``preprocess.level`` (also what the cache
stores), ``preprocess.normalize``, the model, a sigmoid, and the operating threshold frozen in the
checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lungdx import runtime
from lungdx.checkpoint import load_checkpoint, model_from_checkpoint, model_identity
from lungdx.config import PreprocessConfig, from_dict
from lungdx.io import ImageReadError, Radiograph
from lungdx.io.acceptance import AcceptancePolicy, Refused
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
    refusal: str | None = None
    """The acceptance check that refused the image (``Refused.kind``), when ``error`` is a refusal."""
    warnings: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    location: dict | None = None
    """A localising model's finding (``NoduleLocation.as_dict``): where the nodule is, in the image's pixels."""


@dataclass
class NoduleLocation:
    """Where a localising model (``nodule_net``) puts the nodule, and each stage's probability.

    Attributes:
        x, y: the nodule map's peak, column and row in the original image's pixels.
        grid_x, grid_y: the same point on the model grid (model-input pixels).
        presence: P(nodule present), the map's value at its peak (through the checkpoint's temperature when
            it is the task's probability, nodule_vs_normal, so that it equals the reported probability).
        malignancy: P(malignant | nodule), the judge's crop around the peak (likewise for malignant_vs_benign).
        lung_fraction: share of the model input inside the segmented lung field.
        lung_ok: False when the segmentation failed (see ``NoduleAnalysis.lung_ok``).
        radius: a nominal radius in image pixels for marking the point (half the judge's crop is larger).
    """

    x: float
    y: float
    grid_x: float
    grid_y: float
    presence: float
    malignancy: float
    lung_fraction: float
    lung_ok: bool
    radius: float

    def as_dict(self) -> dict:
        return {key: value if isinstance(value, bool) else round(float(value), 4) for key, value in self.__dict__.items()}


class Predictor:
    """A trained model with its preprocessing and operating threshold.

    Args:
        checkpoint: a loaded checkpoint (``lungdx.checkpoint.load_checkpoint``).
        device: ``auto``, ``cpu`` or ``cuda``.
        precision: ``checkpoint`` (the default): the precision the threshold was chosen at (``numeric_precision`` in
            ``model.pt``; for a checkpoint made before it was recorded, ``auto``, what its training chose, with a log
            line), so the threshold chosen on validation is applied as chosen and a model trained in fp32 on one
            machine is scored in fp32 on another that would pick bf16. ``auto``, ``fp32``, ``bf16`` or ``fp16`` (see
            ``lungdx.runtime``) choose otherwise: ``auto`` may be faster (bf16 where native) but moves probabilities
            slightly and may flip decisions near the threshold.
        policy: which images get a probability (``lungdx.io.acceptance``); its intensity reference is the
            checkpoint's validation reference unless the policy brings one.
    """

    def __init__(self, checkpoint: dict, device: str = "auto", precision: str = "checkpoint", channels_last: bool = True,
                 policy: AcceptancePolicy | None = None):
        self.checkpoint = checkpoint
        policy = policy or AcceptancePolicy()
        if policy.reference is None:
            policy = replace(policy, reference=(checkpoint.get("val_reference") or {}).get("intensity"))
        self.policy = policy
        recorded = checkpoint.get("numeric_precision")
        if precision == "checkpoint":
            if not recorded:
                # Made before numeric_precision was recorded: its threshold was chosen in what its training machine's
                # ``auto`` gave, so ``auto`` here is the closest guess (fp32 on a CPU without native bf16).
                logger.info("the %s checkpoint does not record the precision its threshold was chosen in; predicting "
                            "in auto", checkpoint["model"]["name"])
            precision = recorded or "auto"
        self.hardware = runtime.Hardware.resolve(device, precision, channels_last)
        if recorded and self.hardware.precision != recorded:
            logger.info("predicting in %s; the threshold was chosen in %s (probabilities may differ in the third "
                        "decimal; precision='checkpoint' reproduces them)", self.hardware.precision, recorded)
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

    @property
    def localises(self) -> bool:
        """True for a model that also says where the nodule is (it has ``analyse``)."""
        return hasattr(self.model, "analyse")

    @torch.inference_mode()
    def locate(self, levelled: np.ndarray, shapes: Sequence[Sequence[int]], batch_size: int = 16) -> tuple[np.ndarray, list]:
        """A localising model's logits (N,) and ``NoduleLocation`` per image (``shapes``: each original (rows, columns)).

        One pass of ``analyse`` gives both, so a location costs no second forward pass.
        """
        from lungdx.preprocess import GridMap

        self.model.eval()
        logits, locations = [], []
        for start in range(0, len(levelled), batch_size):
            chunk = torch.from_numpy(np.asarray(levelled[start : start + batch_size], dtype=np.float32))
            with self.hardware.autocast():
                images = model_input(chunk, self.preprocess_config, self.hardware)
                analysis = self.model.analyse(images)
                logits.append(self.model.task_logit(analysis).float().cpu())
            # A calibrated model's temperature also scales the part that is its task's probability, so that
            # P(nodule) of a nodule_vs_normal model is the probability it reports (and likewise P(malignant)).
            presence = analysis.presence.float() / (self.temperature if self.model.task == "nodule_vs_normal" else 1.0)
            malignancy = analysis.malignancy.float() / (self.temperature if self.model.task == "malignant_vs_benign" else 1.0)
            for index in range(len(chunk)):
                grid_x, grid_y = (float(v) for v in analysis.peak[index].cpu())
                shape = shapes[start + index]
                x, y, radius = GridMap.of(shape, self.preprocess_config).point_to_image(
                    grid_x, grid_y, self.model.crop_fraction * self.model.input_size / 4)
                locations.append(NoduleLocation(x, y, grid_x, grid_y, float(torch.sigmoid(presence[index])),
                                                float(torch.sigmoid(malignancy[index])),
                                                float(analysis.lung_fraction[index]), bool(analysis.lung_ok[index]),
                                                radius))
        return (torch.cat(logits).numpy() if logits else np.zeros(0, np.float32)), locations

    def read(self, path: str | Path) -> Radiograph:
        """Read an image file through the acceptance policy (``Refused`` names the check that failed)."""
        return self.policy.read(path)

    def level(self, pixels: np.ndarray) -> np.ndarray:
        """The checkpoint's levelling of one (H, W) image in [0, 1]."""
        return level(pixels, self.preprocess_config)

    def predict_pixels(self, pixels: np.ndarray, source: str = "<array>", meta: dict | None = None) -> Prediction:
        """Predict one (H, W) image in [0, 1] (MONOCHROME2 polarity)."""
        return self.predict_levelled(self.level(pixels), pixels.shape[:2], source, meta)

    def predict_levelled(self, levelled: np.ndarray, shape: Sequence[int], source: str = "<array>",
                         meta: dict | None = None) -> Prediction:
        """Predict one levelled (size, size) image of an original of ``shape`` (rows, columns)."""
        probabilities, locations = self.score(levelled[None], [shape])
        return self.decide(source, float(probabilities[0]), meta or {}, locations[0])

    def score(self, levelled: np.ndarray, shapes: Sequence[Sequence[int]], batch_size: int = 16) -> tuple[np.ndarray, list]:
        """Probabilities (N,) and, for a localising model, a ``NoduleLocation`` per image (else None each)."""
        if self.localises:
            logits, locations = self.locate(levelled, shapes, batch_size)
            return sigmoid(logits / self.temperature), locations
        return self.probabilities(levelled, batch_size), [None] * len(levelled)

    def predict_files(self, paths: Iterable[str | Path], batch_size: int = 16) -> list[Prediction]:
        """Predict image files; a file that is refused or cannot be read gets a Prediction with ``error`` set."""
        results, pending = [], []
        for path in paths:
            try:
                image = self.read(path)
                pending.append((len(results), self.level(image.pixels), image.pixels.shape[:2]))
                results.append(Prediction(source=str(path), meta=image.meta))
            except (ImageReadError, ValueError) as err:
                # a refusal is the policy's verdict, reported in the Prediction; an unreadable file is a warning
                logger.log(logging.INFO if isinstance(err, Refused) else logging.WARNING, "cannot predict: %s", err)
                results.append(Prediction(source=str(path), error=str(err),
                                          refusal=err.kind if isinstance(err, Refused) else None))
        if pending:
            probabilities, locations = self.score(np.stack([levelled for _, levelled, _ in pending]),
                                                  [shape for _, _, shape in pending], batch_size)
            for (index, _, _), probability, location in zip(pending, probabilities, locations, strict=True):
                results[index] = self.decide(results[index].source, float(probability), results[index].meta, location)
        return results

    def decide(self, source: str, probability: float, meta: dict, location: NoduleLocation | None = None) -> Prediction:
        """The Prediction for a probability: label at the frozen threshold, the reading's warnings, the location."""
        from lungdx.models.nodule_net import MAX_LUNG_FRACTION, MIN_LUNG_FRACTION

        warnings = list(meta.get("warnings", []))  # an overridden acceptance check (AcceptancePolicy.read)
        if location is not None and not location.lung_ok:
            warnings.append(f"lung segmentation failed: the lung field is {100 * location.lung_fraction:.1f}% of the image "
                            f"(expected {100 * MIN_LUNG_FRACTION:.0f}-{100 * MAX_LUNG_FRACTION:.0f}%, on an image with "
                            "contrast), so the nodule location and score are unreliable")
        found = location.as_dict() if location is not None else None
        if self.threshold is None:
            return Prediction(source=source, probability=probability, meta=meta, warnings=warnings, location=found)
        label = int(probability >= self.threshold)
        return Prediction(source=source, probability=probability, label=label, class_name=self.class_names[label],
                          threshold=self.threshold, meta=meta, warnings=warnings, location=found)

