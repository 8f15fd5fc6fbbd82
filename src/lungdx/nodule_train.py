"""Training of ``nodule_net`` in three stages: lung field, nodule map, malignancy judge.

``lungdx.train.fit`` hands a localising model (one with ``analyse``) to ``fit_localiser``, so that
``lungdx train`` and ``lungdx cv`` work as for every other model and write the same run folder
(config, split, history, ``model.pt`` with the threshold chosen on validation, ``summary.json``),
plus ``nodule_outputs.csv``: per image, the lung Dice, the map's peak and candidates, each stage's
logit, and the logit on the same image with its corners and borders blacked out (shortcut check).

Each stage stops early on its own validation loss. Only training-split rows reach a gradient:
validation rows decide stopping and the threshold, test rows are only predicted at the end.

``last.pt`` is written after every stage epoch (``_Checkpoints``): a run stopped anywhere resumes from
its last finished epoch (``lungdx train --resume``, or ``lungdx cv`` run again) and trains what the
uninterrupted run would have. ``model.pt`` is the last file a run writes (after ``nodule_outputs.csv`` and
``summary.json``); ``last.pt`` is removed after it.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from lungdx import metrics
from lungdx.checkpoint import save_atomic, save_checkpoint
from lungdx.config import RunConfig, to_dict
from lungdx.data.augment import augment, random_affine, warp
from lungdx.data.manifest import class_names, describe_classes
from lungdx.data.nodules import (
    NoduleBank,
    add_nodule,
    dice,
    focal_loss,
    insert_nodule,
    localisation_targets,
    synthetic_nodule,
    target_map,
)
from lungdx.localisation import POINTING_TOLERANCE, pointing_reach
from lungdx.models.nodule_net import MAX_LUNG_FRACTION, MIN_LUNG_FRACTION, TASKS, blob_diameter, lung_field, map_peak, map_peaks
from lungdx.predict import model_input, sigmoid
from lungdx.reference import build_reference
from lungdx.runtime import Hardware
from lungdx.train import optimizer_class, write_summary

logger = logging.getLogger(__name__)

IGNORED_TRAIN = ("epochs", "patience", "min_delta", "pos_weight", "scheduler", "plateau_patience", "plateau_factor",
                 "freeze_epochs", "backbone_lr_factor")
"""``train.*`` settings of the single-stage trainer that ``nodule_net``'s stages do not read (see ``nodule.*``)."""


def stage_optimizer(module: nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    """A stage's optimizer: ``train.optimizer`` (Adam or AdamW) at ``train.lr``, with ``train.weight_decay`` on its
    weights but not on biases and normalisation weights (1-D), as ``lungdx.train.build_optimizer``. Without weight
    decay it is one group over ``module.parameters()`` in order, as before the option existed (an older
    ``last.pt`` resumes)."""
    train, kind = config.train, optimizer_class(config)
    if not train.weight_decay:
        return kind(module.parameters(), lr=train.lr, weight_decay=0.0)
    params = list(module.parameters())
    return kind([{"params": [p for p in params if p.ndim > 1], "weight_decay": train.weight_decay},
                 {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}], lr=train.lr)


def warn_ignored_train_settings(config: RunConfig) -> None:
    """A warning naming each ``train.*`` setting in ``IGNORED_TRAIN`` that is not at its default."""
    from lungdx.config import TrainConfig

    defaults = TrainConfig()
    changed = [f"train.{name}={getattr(config.train, name)!r}" for name in IGNORED_TRAIN
               if getattr(config.train, name) != getattr(defaults, name)]
    if changed:
        logger.warning("%s trains in stages and ignores %s: its epochs, patience and schedule are the nodule.* "
                       "settings (lungdx.config.NoduleConfig)", config.model.name, ", ".join(changed))


class _History(list):
    """The stage epochs so far, written to ``history.csv`` as each one ends (progress is visible during a run);
    ``on_epoch`` (``train.fit``'s hook: a CV worker's claim check) is called with each row once it is saved."""

    def __init__(self, path: Path, on_epoch=None):
        super().__init__()
        self.path, self.on_epoch = path, on_epoch

    def append(self, row: dict) -> None:
        super().append(row)
        self._write()
        if self.on_epoch is not None:
            self.on_epoch(row)

    def restore(self, rows: list[dict]) -> None:
        """The rows of a resumed run's finished epochs (the hook has seen them before)."""
        self[:] = rows
        self._write()

    def _write(self) -> None:
        pd.DataFrame(self).to_csv(self.path, index=False)


LOCALISER_STATE = "lungdx-localiser-state/1"


class _Checkpoints:
    """``last.pt`` of a staged run, rewritten after every stage epoch that does not end its stage and after every stage.

    It holds the whole model (the stage under way's module with its weights of that epoch), the finished stages'
    best epochs, the history, the random states and the seconds trained so far; while a stage is under way, also
    its loop state (``parts``: its optimizer, early stopping, schedule, weight average and sampler, anything with
    ``state_dict``/``load_state_dict``). A stage resumed from it draws the same random numbers as it would have
    without the stop.
    """

    def __init__(self, path: Path, model: nn.Module, generator: torch.Generator, history: _History):
        self.path, self.model, self.generator, self.history = path, model, generator, history
        self.best: dict[str, int] = {}
        self.current: dict | None = None  # the stage under way when last.pt was written
        self.saved: dict | None = None  # last.pt as loaded, while a stage is to resume
        self.seconds_before, self.started = 0.0, time.perf_counter()

    @property
    def seconds(self) -> float:
        """Seconds trained so far, over every session of the run."""
        return self.seconds_before + time.perf_counter() - self.started

    def load(self) -> None:
        """Put the saved run back: the model, finished stages, history and random states."""
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises several types for corrupt or foreign files
            raise ValueError(f"{self.path}: cannot be read as a training state ({error}); start a new run instead") from error
        if not isinstance(state, dict) or state.get("format") != LOCALISER_STATE:
            raise ValueError(f"{self.path}: not a staged training state (a nodule_net run's last.pt); "
                             "start a new run instead")
        self.model.load_state_dict(state["model"])
        self.best, self.current, self.seconds_before = dict(state["best"]), state["current"], float(state["seconds"])
        self.saved = state
        self._set_random()
        self.history.restore(list(state["history"]))
        where = f"{self.current['stage']} epoch {self.current['epoch']}" if self.current else "the stage boundary"
        logger.info("%s: resuming after %s (finished stages: %s)", self.path.parent, where, ", ".join(self.best) or "none")

    def done(self, stage: str) -> bool:
        return stage in self.best

    def finished(self, stage: str, best_epoch: int) -> None:
        """Record that ``stage`` ended (its module holds its kept weights)."""
        self.best[stage], self.current = best_epoch, None
        self._save()

    def epoch(self, stage: str, epoch: int, **parts) -> None:
        """After ``epoch`` of ``stage`` when the stage goes on."""
        self.current = {"stage": stage, "epoch": epoch,
                        **{name: part.state_dict() for name, part in parts.items() if part is not None}}
        self._save()

    def resume(self, stage: str, module: nn.Module, **parts) -> int:
        """Put ``stage``'s saved state back into ``module`` and ``parts``; returns the first epoch to train."""
        if self.current is None or self.current["stage"] != stage:
            return 1
        # Again after the stage's set-up, which may have changed the module (the size_cnn judge's prior).
        prefix = next(name for name, child in self.model.named_modules() if child is module) + "."
        module.load_state_dict({key[len(prefix):]: value for key, value in self.saved["model"].items()
                                if key.startswith(prefix)})
        for name, part in parts.items():
            if part is not None:
                part.load_state_dict(self.current[name])
        self._set_random()  # after the stage's set-up, which draws from the generator as it did the first time
        return self.current["epoch"] + 1

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def _set_random(self) -> None:
        self.generator.set_state(self.saved["generator"])
        torch.set_rng_state(self.saved["torch_rng"])

    def _save(self) -> None:
        state = {"format": LOCALISER_STATE, "model": _on_cpu(self.model.state_dict()), "best": self.best,
                 "current": self.current, "seconds": self.seconds, "history": list(self.history),
                 "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state()}
        save_atomic(state, self.path)


class _NoCheckpoints:
    """A stage trained on its own (tests, experiments): nothing is written, nothing resumes."""

    def epoch(self, *args, **kwargs) -> None:
        pass

    def resume(self, *args, **kwargs) -> int:
        return 1


_NO_CHECKPOINTS = _NoCheckpoints()


def _on_cpu(state: dict) -> dict:
    return {key: value.detach().cpu() if torch.is_tensor(value) else value for key, value in state.items()}


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC, or NaN where the labels are not both classes (a small validation split can lack one)."""
    labels = np.asarray(labels)
    return metrics.roc_auc(labels, scores) if 0 < labels.sum() < len(labels) else math.nan


class _Stopper:
    def __init__(self, patience: int):
        self.patience, self.best, self.best_epoch, self.bad, self.state = patience, math.inf, 0, 0, None

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad": self.bad,
                "state": None if self.state is None else _on_cpu(self.state)}

    def load_state_dict(self, saved: dict) -> None:
        self.best, self.best_epoch, self.bad, self.state = saved["best"], saved["best_epoch"], saved["bad"], saved["state"]

    def step(self, loss: float, epoch: int, module: nn.Module) -> None:
        if not math.isfinite(loss):  # no validation rows for this stage: keep the last epoch
            self.best_epoch, self.state = epoch, {k: v.detach().clone() for k, v in module.state_dict().items()}
            return
        if loss < self.best:
            self.best, self.best_epoch, self.bad = loss, epoch, 0
            self.state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        else:
            self.bad += 1

    @property
    def stop(self) -> bool:
        return self.bad >= self.patience


# ---------------------------------------------------------------------------------------------
# Joint geometric augmentation: image, masks and nodule centres move together
# ---------------------------------------------------------------------------------------------


def warp_circles(circles: torch.Tensor, theta: torch.Tensor, size: int) -> torch.Tensor:
    """Where the (N, 3) circles (column, row, radius in px) land after ``warp`` with ``theta``."""
    xy = (2 * circles[:, :2] + 1) / size - 1  # normalised, align_corners=False
    matrix, shift = theta[:, :, :2], theta[:, :, 2]
    # warp samples the input at A p_out + t, so a point of the input moves to A^-1 (p_in - t).
    out = torch.linalg.solve(matrix, (xy - shift)[..., None])[..., 0]
    scale = torch.sqrt(torch.linalg.det(matrix).abs())
    return torch.cat([((out + 1) * size - 1) / 2, circles[:, 2:] / scale[:, None]], 1)


def mirror(rows: torch.Tensor, images: torch.Tensor, lung_logits: torch.Tensor, *circles: torch.Tensor):
    """``images`` (N, 1, S, S) and ``lung_logits`` (N, 1, s, s) mirrored left-right on the ``rows`` (N,) bool,
    and each (N, 3) circle tensor's column moved with them (pixel centres at integers: c -> S - 1 - c)."""
    size = images.shape[-1]
    images = torch.where(rows[:, None, None, None], images.flip(-1), images)
    lung_logits = torch.where(rows[:, None, None, None], lung_logits.flip(-1), lung_logits)
    moved = []
    for circle in circles:
        circle = circle.clone()
        circle[rows, 0] = size - 1 - circle[rows, 0]
        moved.append(circle)
    return (images, lung_logits, *moved)


# ---------------------------------------------------------------------------------------------
# The stages
# ---------------------------------------------------------------------------------------------


def _seg_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """BCE + soft Dice; ``weight`` (same shape, 0 / 1) leaves pixels out of both."""
    logits = logits.float()
    prob = torch.sigmoid(logits)
    if weight is None:
        weight = torch.ones_like(target)
    overlap = (prob * target * weight).sum(dim=(1, 2, 3))
    soft_dice = 1 - (2 * overlap + 1) / ((prob * weight).sum(dim=(1, 2, 3)) + (target * weight).sum(dim=(1, 2, 3)) + 1)
    bce = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="sum") / weight.sum().clamp_min(1.0)
    return bce + soft_dice.mean()


def random_black_out(images: torch.Tensor, chance: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, kept): with chance ``chance`` per image, a band along each edge (0-8% of the side, each
    edge its own width) and each upper corner (a square of 0-25% of the side) set to 0, as collimation,
    film edges and the shortcut check (``black_out_borders``) leave them; ``kept`` is 0 there, 1 elsewhere.

    For the lung U-Net (``nodule.seg_black_out``): trained with them and with the loss left out where the
    image was blacked out, its mask of the lungs that remain visible should not move when the corners go
    black. For the detector, verifier and judge (``nodule.det_black_out``): black pixels at the lung edge,
    inside the dilated mask, become something seen in training.
    """
    size = images.shape[-1]
    kept = torch.ones_like(images)
    draws = torch.rand(images.shape[0], 7, generator=generator)
    limits = torch.tensor([0.08] * 4 + [0.25] * 2) * size  # edge bands, then corner squares
    for row, draw in enumerate(draws):
        if draw[0] < chance:
            region = black_out_region(size, *(int(value) for value in (draw[1:] * limits).tolist()))
            kept[row, :, torch.from_numpy(region)] = 0
    return images * kept, kept


def blacked_out_centres(kept: torch.Tensor, circles: torch.Tensor) -> torch.Tensor:
    """(B,) True where a circle's centre (x, y in ``kept``'s pixels) lies on a blacked-out pixel (``kept`` 0)."""
    found = torch.isfinite(circles[:, 0])
    x, y = torch.nan_to_num(circles[:, :2]).round().long().clamp(0, kept.shape[-1] - 1).unbind(1)
    return found & (kept[torch.arange(len(circles)), 0, y, x] == 0)


def _epochs(first: int, last: int, stage: str, progress: bool):
    """Epochs ``first`` ... ``last`` of ``stage``, with a progress bar that counts the ones a resumed run had done."""
    return tqdm(range(first, last + 1), desc=stage, leave=False, disable=not progress, initial=first - 1, total=last)


def _small_masks(masks: np.ndarray, size: int) -> torch.Tensor:
    tensor = torch.from_numpy(masks.astype(np.float32))[:, None]
    return (F.interpolate(tensor, size=(size, size), mode="area") > 0.5).float()


def train_lungs(model, images: dict, masks: dict, config: RunConfig, hardware: Hardware, generator, history, progress,
                checkpoints=_NO_CHECKPOINTS):
    """Stage 1: the lung U-Net on the training rows' masks; stops on validation loss."""
    lungs, settings = model.lungs, config.nodule
    optimizer = stage_optimizer(lungs, config)
    targets = {split: _small_masks(masks[split], model.seg_size) for split in masks}
    stopper = _Stopper(settings.seg_patience)
    intensity = replace(config.augment, rotation_deg=0.0, scale=0.0, translate=0.0)
    first = checkpoints.resume("lungs", lungs, optimizer=optimizer, stopper=stopper)
    for epoch in _epochs(first, settings.seg_epochs, "lungs", progress):
        lungs.train()
        order = torch.randperm(len(images["train"]), generator=generator).numpy()
        started, total = time.perf_counter(), 0.0
        for start in range(0, len(order), settings.batch_size):
            index = np.sort(order[start : start + settings.batch_size])
            batch = torch.from_numpy(images["train"][index])[:, None]
            target = targets["train"][index]
            if config.augment.enabled:
                theta = random_affine(len(index), config.augment, generator)
                batch, target = warp(batch, theta), (warp(target, theta, "nearest") > 0.5).float()
                batch = augment(batch, intensity, generator)
            weight = None
            if settings.seg_black_out:
                batch, kept = random_black_out(batch, settings.seg_black_out, generator)
                weight = (F.interpolate(kept, size=target.shape[-2:], mode="area") == 1).float().to(hardware.device)
            inputs = model_input(batch, config.preprocess, hardware)
            with hardware.autocast():
                logits = model.segment(inputs)
            loss = _seg_loss(logits, target.to(hardware.device), weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(index)
        val_loss, val_dice = _eval_lungs(model, images["val"], targets["val"], config, hardware)
        stopper.step(val_loss, epoch, lungs)
        history.append({"stage": "lungs", "epoch": epoch, "train_loss": total / len(order), "val_loss": val_loss,
                        "val_dice": val_dice, "seconds": round(time.perf_counter() - started, 2)})
        if stopper.stop:
            break
        checkpoints.epoch("lungs", epoch, optimizer=optimizer, stopper=stopper)
    lungs.load_state_dict(stopper.state)
    return stopper.best_epoch


@torch.inference_mode()
def _lung_logits(model, levelled: np.ndarray, config: RunConfig, hardware: Hardware, batch: int = 32) -> torch.Tensor:
    model.eval()
    parts = []
    for start in range(0, len(levelled), batch):
        inputs = model_input(torch.from_numpy(levelled[start : start + batch]), config.preprocess, hardware)
        with hardware.autocast():
            parts.append(model.segment(inputs).float().cpu())
    return torch.cat(parts) if parts else torch.zeros(0, 1, model.seg_size, model.seg_size)


def warn_failed_lung_fields(lung_logits: torch.Tensor, seg_epochs: int) -> int:
    """Warn when the lung U-Net's field on training images is a failed segmentation (``lung_field``, the rule
    ``NoduleNet.analyse`` judges by); returns how many. The later stages look only inside the field, so an image
    without one teaches them nothing (an empty field gives the detector a loss of 0)."""
    _, plausible = lung_field(lung_logits)
    failed = int((~plausible).sum())
    if failed:
        logger.warning("lungs: the lung field is a failed segmentation (outside %.0f-%.0f%% of the image) on %d of %d "
                       "training images; the detector, the verifier and the judge look only inside it and learn nothing "
                       "there. Train the lungs longer (nodule.seg_epochs, now %d) or check the lung masks",
                       100 * MIN_LUNG_FRACTION, 100 * MAX_LUNG_FRACTION, failed, len(plausible), seg_epochs)
    return failed


def _eval_lungs(model, levelled, target, config, hardware) -> tuple[float, float]:
    logits = _lung_logits(model, levelled, config, hardware)
    loss = float(_seg_loss(logits, target))
    scores = [dice(p > 0, t > 0.5) for p, t in zip(logits.numpy(), target.numpy(), strict=True)]
    return loss, float(np.mean(scores))


class _DetectorBatches:
    """Augmented, masked training crops with their target maps (nodule insertion into normals)."""

    def __init__(self, images, lung_logits, gt_masks, circles, malignant, bank: NoduleBank | None, config: RunConfig,
                 generator: torch.Generator, *, synthetic: float = 0.0):
        """``synthetic``: the share of insertions that are simulated nodules (``nodule.synthetic`` for the detector
        and the verifier; the judge's batches keep 0, so it gets as many labelled inserted nodules as without)."""
        self.synthetic = synthetic
        self.images, self.lung_logits, self.gt_masks = images, lung_logits, gt_masks
        self.circles, self.malignant, self.bank, self.config = circles, malignant, bank, config
        self.generator = generator
        self.rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        self.hard_points: list[np.ndarray] | None = None  # per image: the detector's false-positive peaks (K, 2)
        self.hard_chance = config.nodule.hard_negatives  # chance that a row gets one of them

    def state_dict(self) -> dict:
        """What sampling has changed: the numpy generator and the false-positive peaks (for a resumed stage)."""
        hard = None if self.hard_points is None else [torch.from_numpy(points) for points in self.hard_points]
        return {"rng": self.rng.bit_generator.state, "hard_points": hard}

    def load_state_dict(self, saved: dict) -> None:
        self.rng.bit_generator.state = saved["rng"]
        hard = saved["hard_points"]
        self.hard_points = None if hard is None else [points.numpy() for points in hard]

    def _hard_circles(self, index: np.ndarray) -> np.ndarray:
        """(B, 3): one of each row's false-positive peaks (radius 1) with chance ``hard_chance``, else NaN."""
        picked = np.full((len(index), 3), np.nan, np.float32)
        if self.hard_points is None:
            return picked
        for row, image_index in enumerate(index):
            points = self.hard_points[image_index]
            if len(points) and self.rng.random() < self.hard_chance:
                picked[row] = (*points[self.rng.integers(len(points))], 1.0)
        return picked

    def sample(self, index: np.ndarray):
        """(levelled (B,1,S,S), lung logits (B,1,S/4,S/4), circles (B,3), malignant (B,), hard (B,3)) after
        insertion + warp; ``hard`` is a false-positive peak to centre a crop on (NaN: none)."""
        settings = self.config.nodule
        levelled = self.images[index].copy()
        circles = self.circles[index].copy()
        malignant = self.malignant[index].copy()
        for row, image_index in enumerate(index):
            if math.isfinite(circles[row, 0]) or self.bank is None or not len(self.bank) or self.rng.random() >= settings.insert_prob:
                continue
            patch = self.bank.patches[self.rng.integers(len(self.bank))]
            # Options left at their defaults draw nothing: the random stream of the recipes without them is unchanged.
            if self.synthetic and self.rng.random() < self.synthetic:
                nodule = synthetic_nodule(patch.radius_px, abs(patch.contrast), self.rng)
                inserted = add_nodule(levelled[row], self.gt_masks[image_index], nodule, patch.radius_px, self.rng)
                label = math.nan  # a simulated nodule is neither benign nor malignant: the judge leaves it out
            else:
                contrast = self.rng.uniform(settings.insert_contrast, 1.0) if settings.insert_contrast < 1 else 1.0
                inserted = insert_nodule(levelled[row], self.gt_masks[image_index], patch, self.rng, contrast=contrast,
                                         match=settings.insert_match)
                label = patch.malignant
            if inserted is not None:
                levelled[row], circles[row] = inserted[0], inserted[1]
                malignant[row] = label
        batch = torch.from_numpy(levelled)[:, None]
        logits = self.lung_logits[index]
        circles_t, hard = torch.from_numpy(circles), torch.from_numpy(self._hard_circles(index))
        if self.config.augment.enabled:
            theta = random_affine(len(index), self.config.augment, self.generator)
            batch = warp(batch, theta)
            logits = warp(logits, theta, "nearest")
            logits = torch.where(logits == 0, torch.full_like(logits, -1.0), logits)  # outside the film: no lung
            circles_t = warp_circles(circles_t, theta, batch.shape[-1])
            hard = warp_circles(hard, theta, batch.shape[-1])
            intensity = replace(self.config.augment, rotation_deg=0.0, scale=0.0, translate=0.0)
            batch = augment(batch, intensity, self.generator)
        if settings.hflip:
            batch, logits, circles_t, hard = mirror(torch.rand(len(index), generator=self.generator) < 0.5, batch, logits,
                                                    circles_t, hard)
        malignant_t = torch.from_numpy(malignant)
        if settings.det_black_out:  # after every warp: the film's edges, as the shortcut check blacks them out
            batch, kept = random_black_out(batch, settings.det_black_out, self.generator)
            hidden = blacked_out_centres(kept, circles_t)
            circles_t[hidden], malignant_t[hidden] = math.nan, math.nan
        return batch, logits, circles_t, malignant_t, hard

    def crop_offsets(self, circles: torch.Tensor, lung_logits: torch.Tensor, size: int, crop: int,
                     hard: torch.Tensor) -> list[tuple[int, int]]:
        """Crop corners: near the nodule, else on a false-positive peak (``hard``, NaN: none), else on a random
        lung pixel."""
        offsets = []
        for circle, logits, point in zip(circles.tolist(), lung_logits, hard.tolist(), strict=True):
            if math.isfinite(circle[0]) and self.rng.random() < self.config.nodule.nodule_in_crop:
                centre = np.array(circle[:2]) + self.rng.uniform(-crop / 3, crop / 3, 2)
            elif math.isfinite(point[0]):
                centre = np.array(point[:2]) + self.rng.uniform(-crop / 4, crop / 4, 2)
            else:
                rows, columns = torch.nonzero(logits[0] > 0, as_tuple=True)
                stride = size / logits.shape[-1]
                if len(rows):
                    pick = self.rng.integers(len(rows))
                    centre = np.array([float(columns[pick]), float(rows[pick])]) * stride
                else:
                    centre = self.rng.uniform(0, size, 2)
            left, top = (np.clip(centre - crop / 2, 0, size - crop) // 4 * 4).astype(int)
            offsets.append((int(left), int(top)))
        return offsets


def _detector_step(model, batches: _DetectorBatches, index, config, hardware):
    batch, lung_logits, circles, _, hard = batches.sample(index)
    size, crop = batch.shape[-1], config.nodule.crop or batch.shape[-1]
    inputs = model_input(batch, config.preprocess, hardware)
    masked, _ = model.mask_image(inputs, lung_logits.to(hardware.device))
    target = target_map(circles, size)
    weight = model.map_region(lung_logits, target.shape[-2:])
    crops, crop_targets, crop_weights = [], [], []
    for row, (left, top) in enumerate(batches.crop_offsets(circles, lung_logits, size, crop, hard)):
        crops.append(masked[row, :, top : top + crop, left : left + crop])
        cell = slice(top // 4, (top + crop) // 4), slice(left // 4, (left + crop) // 4)
        crop_targets.append(target[row, :, cell[0], cell[1]])
        crop_weights.append(weight[row, :, cell[0], cell[1]])
    crops_t = torch.stack(crops)
    if hardware.channels_last:
        crops_t = crops_t.contiguous(memory_format=torch.channels_last)
    with hardware.autocast():
        logits = model.detector(crops_t.to(inputs.dtype))
    return focal_loss(logits, torch.stack(crop_targets).to(hardware.device), torch.stack(crop_weights).to(hardware.device))


@torch.inference_mode()
def _detector_outputs(model, levelled: np.ndarray, lung_logits: torch.Tensor, config, hardware, batch: int = 16):
    """Map logits (N, 1, S/4, S/4) on whole, unaugmented images."""
    model.eval()
    parts = []
    for start in range(0, len(levelled), batch):
        inputs = model_input(torch.from_numpy(levelled[start : start + batch]), config.preprocess, hardware)
        logits = lung_logits[start : start + batch].to(hardware.device)
        masked, _ = model.mask_image(inputs, logits)
        with hardware.autocast():
            parts.append(model.detect(masked.to(inputs.dtype), logits).float().cpu())
    return torch.cat(parts)


def train_detector(model, images, lung_logits, targets, bank, config, hardware, generator, history, progress,
                   checkpoints=_NO_CHECKPOINTS):
    """Stage 2: the nodule-map detector on augmented training crops; stops on the validation map loss."""
    settings = config.nodule
    optimizer = stage_optimizer(model.detector, config)
    batches = _DetectorBatches(images["train"], lung_logits["train"], targets["train"].lung_masks,
                               targets["train"].circles, targets["train"].malignant, bank, config, generator,
                               synthetic=settings.synthetic)
    size = images["train"].shape[-1]
    val_target = target_map(torch.from_numpy(targets["val"].circles), size)
    val_has = np.isfinite(targets["val"].circles[:, 0]).astype(int)
    stopper = _Stopper(settings.det_patience)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, settings.det_epochs),
                                                          eta_min=config.train.lr / 100) \
        if settings.det_schedule == "cosine" else None
    # An exponential moving average of the weights: validated, kept and returned instead of the last step's
    # weights, it smooths the epoch-to-epoch swings that ~25 validation images make of the map loss.
    ema = AveragedModel(model.detector, multi_avg_fn=get_ema_multi_avg_fn(settings.det_ema), use_buffers=True) \
        if settings.det_ema else None
    first = checkpoints.resume("detector", model.detector, optimizer=optimizer, stopper=stopper, schedule=schedule, ema=ema,
                               batches=batches)
    for epoch in _epochs(first, settings.det_epochs, "detector", progress):
        model.detector.train()
        order = torch.cat([torch.randperm(len(images["train"]), generator=generator)
                           for _ in range(settings.det_repeats)]).numpy()
        started, total = time.perf_counter(), 0.0
        for start in range(0, len(order), settings.batch_size):
            index = np.sort(order[start : start + settings.batch_size])
            loss = _detector_step(model, batches, index, config, hardware)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if ema is not None:
                ema.update_parameters(model.detector)
            total += float(loss.detach()) * len(index)
        live = copy.deepcopy(model.detector.state_dict()) if ema is not None else None
        if ema is not None:
            model.detector.load_state_dict(ema.module.state_dict())
        maps = _detector_outputs(model, images["val"], lung_logits["val"], config, hardware)
        inside = (maps > -29).float()
        val_loss = float(focal_loss(maps, val_target, inside)) if len(maps) else math.nan
        presence = map_peak(maps, size)[0].numpy()
        stopper.step(val_loss, epoch, model.detector)
        if live is not None:
            model.detector.load_state_dict(live)
        history.append({"stage": "detector", "epoch": epoch, "train_loss": total / len(order), "val_loss": val_loss,
                        "val_auc": _auc(val_has, presence),
                        "seconds": round(time.perf_counter() - started, 2),
                        "train_images_per_s": round(len(order) / (time.perf_counter() - started), 1),
                        "lr": optimizer.param_groups[0]["lr"]})
        if schedule is not None:
            schedule.step()
        if stopper.stop:
            break
        if settings.hard_negatives and epoch % max(1, settings.hard_every) == 0:
            batches.hard_points = false_positive_peaks(model, images["train"], lung_logits["train"],
                                                      targets["train"].circles, config, hardware)
        checkpoints.epoch("detector", epoch, optimizer=optimizer, stopper=stopper, schedule=schedule,
                          ema=ema, batches=batches)
    model.detector.load_state_dict(stopper.state)
    return stopper.best_epoch


def false_positive_peaks(model, levelled: np.ndarray, lung_logits: torch.Tensor, circles: np.ndarray, config, hardware,
                         count: int = 5) -> list[np.ndarray]:
    """Per training image, the current detector's highest map peaks that are not on the image's nodule.

    A peak within the pointing game's distance (radius + 1/32 of the side) of the nodule is a hit, not a
    false positive. These are the hard negatives: rib crossings, vessels and hila that the map mistakes for
    a nodule, which random lung crops show too rarely.
    """
    size = levelled.shape[-1]
    maps = _detector_outputs(model, levelled, lung_logits, config, hardware)
    found = map_peaks(maps, size, count=count + 1)
    return [points[:, :2].numpy()[hits == 0][:count].astype(np.float32)
            for points, hits in zip(found, candidate_labels(found, circles, size), strict=True)]


def _verifier_samples(model, batches: _DetectorBatches, index, config, hardware):
    """Training crops for the verifier from rows ``index``: around each (real or inserted) nodule, jittered
    as far as a candidate that hits it can be (half a radius plus half the pointing tolerance), labelled 1;
    around one of the row's false-positive peaks (``batches.hard_points``), jittered by a map cell, labelled 0.
    A peak within the pointing distance of the row's nodule (an inserted one can land there) is left out."""
    batch, lung_logits, circles, _, hard = batches.sample(index)
    size = batch.shape[-1]
    inputs = model_input(batch, config.preprocess, hardware)
    masked, _ = model.mask_image(inputs, lung_logits.to(hardware.device))
    has_nodule = torch.isfinite(circles[:, 0])
    near = has_nodule & (torch.hypot(hard[:, 0] - circles[:, 0], hard[:, 1] - circles[:, 1]) <= pointing_reach(circles[:, 2], size))
    has_hard = torch.isfinite(hard[:, 0]) & ~near
    spread = torch.cat([config.nodule.judge_jitter * circles[has_nodule, 2:] + POINTING_TOLERANCE * size / 2,
                        torch.full((int(has_hard.sum()), 1), 4.0)])
    centres = torch.cat([circles[has_nodule, :2], hard[has_hard, :2]])
    centres = centres + (torch.rand(len(centres), 2, generator=batches.generator) * 2 - 1) * spread
    rows = torch.cat([torch.nonzero(has_nodule)[:, 0], torch.nonzero(has_hard)[:, 0]])
    labels = torch.cat([torch.ones(int(has_nodule.sum())), torch.zeros(int(has_hard.sum()))])
    if not len(rows):
        return None, None
    return model.crops(masked, centres.to(hardware.device), rows.to(hardware.device)), labels.to(hardware.device)


def candidate_labels(candidates: list[torch.Tensor], circles: np.ndarray, size: int) -> list[np.ndarray]:
    """Per image, 1 / 0 per candidate: within the pointing distance (radius + 1/32 of the side) of its nodule."""
    labels = []
    for points, circle in zip(candidates, circles, strict=True):
        xy = points[:, :2].float().cpu().numpy()
        hit = np.hypot(*(xy - circle[:2]).T) <= pointing_reach(circle[2], size) if math.isfinite(circle[0]) \
            else np.zeros(len(xy), bool)
        labels.append(hit.astype(np.float32))
    return labels


@torch.inference_mode()
def _validation_candidates(model, levelled, lung_logits, circles, config, hardware, batch: int = 16):
    """The finished detector's top candidates on the validation images, in one pass per batch (mask, map,
    peaks, crops): (crops or None without any candidate, hit labels, each one's image, map logits)."""
    model.eval()
    size = levelled.shape[-1]
    found, crops = [], []
    for start in range(0, len(levelled), batch):
        inputs = model_input(torch.from_numpy(levelled[start : start + batch]), config.preprocess, hardware)
        logits = lung_logits[start : start + batch].to(hardware.device)
        masked, _ = model.mask_image(inputs, logits)
        with hardware.autocast():
            maps = model.detect(masked.to(inputs.dtype), logits).float()
        peaks = [points.cpu() for points in map_peaks(maps, size, count=model.candidate_count)]
        found += peaks
        part = model.candidate_crops(masked, peaks)
        if part is not None:
            crops.append(part)
    labels = candidate_labels(found, circles, size)
    points = torch.cat(found) if found else torch.zeros(0, 3)
    image = np.repeat(np.arange(len(found)), [len(p) for p in found])
    return (torch.cat(crops) if crops else None, torch.from_numpy(np.concatenate(labels) if labels else np.zeros(0, np.float32)),
            image, points[:, 2].numpy())


def train_verifier(model, images, lung_logits, targets, bank, config, hardware, generator, history, progress,
                   checkpoints=_NO_CHECKPOINTS):
    """Stage 2b (``verifier=cnn``): the candidate verifier, after the detector is final.

    Positives are crops around the training split's nodules (real and inserted into normals, augmented as
    the detector's samples); negatives are crops around the finished detector's false-positive peaks on the
    (unaugmented) training images, moved with each sample's warp. It stops early on the validation loss
    over the detector's top candidates on the validation images.
    """
    settings = config.nodule
    optimizer = stage_optimizer(model.verifier, config)
    train = _DetectorBatches(images["train"], lung_logits["train"], targets["train"].lung_masks,
                             targets["train"].circles, targets["train"].malignant, bank, config, generator,
                             synthetic=settings.synthetic)
    train.hard_points = false_positive_peaks(model, images["train"], lung_logits["train"], targets["train"].circles,
                                             config, hardware, count=model.candidate_count)
    train.hard_chance = 1.0
    val_crops, val_labels, val_image, val_map = _validation_candidates(model, images["val"], lung_logits["val"],
                                                                       targets["val"].circles, config, hardware)
    val_has = np.isfinite(targets["val"].circles[:, 0]).astype(int)

    def score_validation() -> torch.Tensor:
        model.verifier.eval()
        with torch.inference_mode(), hardware.autocast():
            return model.verifier(val_crops).float().reshape(-1).cpu()

    loss_fn = nn.BCEWithLogitsLoss()
    stopper = _Stopper(settings.judge_patience)
    first = checkpoints.resume("verifier", model.verifier, optimizer=optimizer, stopper=stopper, batches=train)
    for epoch in _epochs(first, settings.judge_epochs, "verifier", progress):
        model.verifier.train()
        order = torch.randperm(len(images["train"]), generator=generator).numpy()
        started, total, count = time.perf_counter(), 0.0, 0
        for start in range(0, len(order), settings.batch_size):
            crops, labels = _verifier_samples(model, train, np.sort(order[start : start + settings.batch_size]), config,
                                              hardware)
            if crops is None:
                continue
            with hardware.autocast():
                logits = model.verifier(crops).float().reshape(-1)
            loss = loss_fn(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, count = total + float(loss.detach()) * len(labels), count + len(labels)
        row = {"stage": "verifier", "epoch": epoch, "train_loss": total / max(count, 1),
               "seconds": round(time.perf_counter() - started, 2)}
        if val_crops is not None:
            val_logits = score_validation()
            row["val_loss"] = float(loss_fn(val_logits, val_labels))
            row["val_candidate_auc"] = _auc(val_labels.numpy(), val_logits.numpy())
            best = pd.Series(val_map + val_logits.numpy()).groupby(val_image).max()
            # An image without candidates (no lung field found) ranks below every image with one.
            presence = best.reindex(range(len(val_has)), fill_value=float(best.min()) - 1 if len(best) else 0.0).to_numpy()
            row["val_auc"] = _auc(val_has, presence)
        else:
            row["val_loss"] = row["train_loss"]
        stopper.step(row["val_loss"], epoch, model.verifier)
        history.append(row)
        if stopper.stop:
            break
        checkpoints.epoch("verifier", epoch, optimizer=optimizer, stopper=stopper, batches=train)
    model.verifier.load_state_dict(stopper.state)
    if val_crops is not None:
        fit_candidate_scores(model, val_map, score_validation().numpy(), val_labels.numpy())
    return stopper.best_epoch


def fit_candidate_scores(model, map_logits: np.ndarray, verifier_logits: np.ndarray, hits: np.ndarray,
                         min_hits: int = 5) -> None:
    """``model.verify_coef``: a logistic regression of hit / miss on the validation candidates' map and
    verifier logits. They are images neither stage trained on (on its training images the detector is
    over-confident, and so is the verifier on its own crops). With fewer than ``min_hits`` hits or misses
    the default (the sum of the two logits) stays, with a warning."""
    from sklearn.linear_model import LogisticRegression

    hits = np.asarray(hits, int)
    if min(hits.sum(), len(hits) - hits.sum()) < min_hits:
        logger.warning("verifier: %d of %d validation candidates hit a nodule; the candidate score stays map logit + "
                       "verifier logit", int(hits.sum()), len(hits))
        return
    fitted = LogisticRegression().fit(np.column_stack([map_logits, verifier_logits]), hits)
    coef = torch.tensor([*fitted.coef_[0].tolist(), float(fitted.intercept_[0])])
    model.verify_coef.copy_(coef.to(model.verify_coef.device))
    logger.info("verifier: candidate score = %.3f x map + %.3f x verifier %+.3f, from %d validation candidates (%d hits)",
                *coef.tolist(), len(hits), int(hits.sum()))


def _judge_samples(model, batches: _DetectorBatches, index, config, hardware, jitter: float, augmented: bool):
    """Crops around the (possibly inserted, jittered) nodules of rows ``index``, their malignancy labels and
    their radii (input px, after any warp); ``(None, None, None)`` when none of the rows has a labelled nodule."""
    if augmented:
        batch, lung_logits, circles, malignant, _ = batches.sample(index)
    else:
        batch = torch.from_numpy(batches.images[index])[:, None]
        lung_logits = batches.lung_logits[index]
        circles, malignant = torch.from_numpy(batches.circles[index]), torch.from_numpy(batches.malignant[index])
    keep = torch.isfinite(circles[:, 0]) & torch.isfinite(malignant)
    if not keep.any():
        return None, None, None
    batch, lung_logits, circles, malignant = batch[keep], lung_logits[keep], circles[keep], malignant[keep]
    inputs = model_input(batch, config.preprocess, hardware)
    masked, _ = model.mask_image(inputs, lung_logits.to(hardware.device))
    centres = circles[:, :2] + (torch.rand(len(circles), 2, generator=batches.generator) * 2 - 1) * jitter * circles[:, 2:]
    return (model.crops(masked, centres.to(hardware.device)), malignant.to(hardware.device),
            circles[:, 2].to(hardware.device))


def fit_size_prior(judge: nn.Module, radii: np.ndarray, malignant: np.ndarray) -> None:
    """``SizeCNNJudge.coef``: a logistic regression of malignancy on the labelled log diameters (2 r) of the
    training split's real nodules (inserted ones repeat their donors). Both classes are needed; without them
    the judge says 0.5 (a warning)."""
    from sklearn.linear_model import LogisticRegression

    keep = np.isfinite(radii) & (radii > 0) & np.isfinite(malignant)
    coef = torch.zeros(2)
    if len(np.unique(malignant[keep])) == 2:
        fitted = LogisticRegression().fit(np.log(2 * radii[keep])[:, None], malignant[keep])
        coef = torch.tensor([float(fitted.intercept_[0]), float(fitted.coef_[0, 0])])
        logger.info("size_cnn judge: logit = %.3f + %.3f x log(diameter px), from %d training nodules", *coef.tolist(),
                    int(keep.sum()))
    else:
        logger.warning("size_cnn judge: the training split's nodules are not both malignant and benign; it says 0.5")
    judge.coef.copy_(coef.to(judge.coef.device))


def _judge_loss(model, crops: torch.Tensor, malignant: torch.Tensor, radii: torch.Tensor, hardware):
    """(loss, malignancy logits): the crop CNN's log loss on malignancy, or (``judge=size_cnn``) the smooth-L1
    error of its log diameter against the labelled one."""
    with hardware.autocast():
        if model.judge_kind == "size_cnn":
            measured = model.judge.log_diameter(crops.to(torch.float32))
            loss = F.smooth_l1_loss(measured, torch.log(2 * radii.float()), beta=0.2)
            return loss, model.judge.malignancy(measured).detach()
        logits = model.judge(crops.to(torch.float32)).float().reshape(-1)
    return F.binary_cross_entropy_with_logits(logits, malignant), logits.detach()


def train_judge(model, images, lung_logits, targets, bank, config, hardware, generator, history, progress,
                checkpoints=_NO_CHECKPOINTS):
    """Stage 3: the malignancy judge on crops around training nodules (real and inserted).

    With ``judge=size_cnn`` the CNN learns the nodules' diameters instead, and malignancy is the logistic
    function of the diameter fitted on the training nodules' labels (``fit_size_prior``) first.
    """
    settings = config.nodule
    optimizer = stage_optimizer(model.judge, config)
    train = _DetectorBatches(images["train"], lung_logits["train"], targets["train"].lung_masks,
                             targets["train"].circles, targets["train"].malignant, bank, config, generator)
    val = _DetectorBatches(images["val"], lung_logits["val"], targets["val"].lung_masks,
                           targets["val"].circles, targets["val"].malignant, None, config, generator)
    if model.judge_kind == "size_cnn":
        fit_size_prior(model.judge, targets["train"].circles[:, 2], targets["train"].malignant)
    stopper = _Stopper(settings.judge_patience)
    val_crops, val_labels, val_radii = _judge_samples(model, val, np.arange(len(images["val"])), config, hardware, 0.0,
                                                      False)
    first = checkpoints.resume("judge", model.judge, optimizer=optimizer, stopper=stopper, batches=train)
    for epoch in _epochs(first, settings.judge_epochs, "judge", progress):
        model.judge.train()
        order = torch.randperm(len(images["train"]), generator=generator).numpy()
        started, total, count = time.perf_counter(), 0.0, 0
        for start in range(0, len(order), config.train.batch_size):
            index = np.sort(order[start : start + config.train.batch_size])
            crops, labels, radii = _judge_samples(model, train, index, config, hardware, settings.judge_jitter, True)
            if crops is None:
                continue
            loss, _ = _judge_loss(model, crops, labels, radii, hardware)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, count = total + float(loss.detach()) * len(labels), count + len(labels)
        row = {"stage": "judge", "epoch": epoch, "train_loss": total / max(count, 1),
               "seconds": round(time.perf_counter() - started, 2)}
        if val_crops is not None:
            model.judge.eval()
            with torch.inference_mode():
                val_loss, val_logits = _judge_loss(model, val_crops, val_labels, val_radii, hardware)
            row["val_loss"] = float(val_loss)
            row["val_auc"] = _auc(val_labels.cpu().numpy(), val_logits.cpu().numpy())
        else:
            row["val_loss"] = row["train_loss"]
        stopper.step(row["val_loss"], epoch, model.judge)
        history.append(row)
        if stopper.stop and settings.judge_keep == "best":
            break
        checkpoints.epoch("judge", epoch, optimizer=optimizer, stopper=stopper, batches=train)
    if settings.judge_keep == "last":
        return settings.judge_epochs
    model.judge.load_state_dict(stopper.state)
    return stopper.best_epoch


def _nodule_sizes(model, levelled, lung_logits, targets, config, hardware) -> tuple[np.ndarray, np.ndarray]:
    """Blob diameters at the map's peak (input px) and malignancy labels of the rows with a labelled nodule."""
    rows = np.flatnonzero(np.isfinite(targets.circles[:, 0]) & np.isfinite(targets.malignant))
    if not len(rows):
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    maps = _detector_outputs(model, levelled[rows], lung_logits[rows], config, hardware)
    return blob_diameter(maps, levelled.shape[-1]).numpy(), targets.malignant[rows]


def fit_size_judge(model, images, lung_logits, targets, config, hardware, history) -> int:
    """Stage 3 with ``judge=size``: a logistic regression of malignancy on the found nodule's blob diameter.

    Fitted on the training split's real nodules (inserted ones carry their donor's size, not new
    information), measured where the finished detector puts its peak, as at inference.
    """
    from sklearn.linear_model import LogisticRegression

    started = time.perf_counter()
    sizes, labels = _nodule_sizes(model, images["train"], lung_logits["train"], targets["train"], config, hardware)
    coef = torch.zeros(2)
    if len(np.unique(labels)) == 2:
        fitted = LogisticRegression().fit(sizes[:, None] / 100, labels)
        coef = torch.tensor([float(fitted.intercept_[0]), float(fitted.coef_[0, 0])])
    else:
        logger.warning("size judge: the training split's nodules are not both malignant and benign; it says 0.5")
    model.judge.coef.copy_(coef.to(model.judge.coef.device))
    row = {"stage": "judge", "epoch": 1, "train_loss": _log_loss(labels, model.judge(torch.from_numpy(sizes))),
           "seconds": round(time.perf_counter() - started, 2)}
    val_sizes, val_labels = _nodule_sizes(model, images["val"], lung_logits["val"], targets["val"], config, hardware)
    val_logits = model.judge(torch.from_numpy(val_sizes))
    row["val_loss"] = _log_loss(val_labels, val_logits) if len(val_labels) else math.nan
    row["val_auc"] = _auc(val_labels, val_logits.numpy())
    history.append(row)
    logger.info("size judge: logit = %.3f + %.3f x diameter / 100 px, from %d training nodules", *coef.tolist(), len(sizes))
    return 1


def _log_loss(labels: np.ndarray, logits: torch.Tensor) -> float:
    if not len(labels):
        return math.nan
    return float(F.binary_cross_entropy_with_logits(logits.float(), torch.from_numpy(np.asarray(labels, np.float32))))


# ---------------------------------------------------------------------------------------------
# Outputs for evaluation
# ---------------------------------------------------------------------------------------------


def black_out_region(size: int, top: int, bottom: int, left: int, right: int, corner_left: int,
                     corner_right: int) -> np.ndarray:
    """(size, size) bool, True where a black-out covers: a band of the given pixels along each edge and a
    square of the given side in each upper corner (0 = none)."""
    region = np.zeros((size, size), bool)
    region[:top, :] = True
    region[size - bottom :, :] = True
    region[:, :left] = True
    region[:, size - right :] = True
    region[:corner_left, :corner_left] = True
    region[:corner_right, size - corner_right :] = True
    return region


def shortcut_region(size: int, border: float = 0.06, corner: float = 0.2) -> np.ndarray:
    """The shortcut check's black-out: a band of ``border`` of the side along every edge, and both upper
    corners as squares of ``corner`` of the side."""
    band, square = max(1, round(border * size)), round(corner * size)
    return black_out_region(size, band, band, band, band, square, square)


def black_out_borders(levelled: np.ndarray, border: float = 0.06, corner: float = 0.2) -> np.ndarray:
    """The shortcut check's images: ``shortcut_region`` set to 0 (air-dark)."""
    images = np.array(levelled, dtype=np.float32, copy=True)
    images[..., shortcut_region(images.shape[-1], border, corner)] = 0
    return images


def blacked_lung_share(lung_masks: np.ndarray) -> np.ndarray:
    """(N,) share of each lung mask (N, S, S) that ``black_out_borders`` blacks out (NaN without a mask)."""
    masks = np.asarray(lung_masks) != 0
    blacked = shortcut_region(masks.shape[-1])
    total = masks.sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, masks[:, blacked].sum(axis=-1) / total, np.nan)


@torch.inference_mode()
def analyse_levelled(model, levelled, config: RunConfig, hardware: Hardware, batch: int = 16) -> dict[str, np.ndarray]:
    """Per image: presence, malignancy and task logits, peak, top candidates, lung mask and fraction."""
    model.eval()
    out: dict[str, list] = {"presence": [], "malignancy": [], "task": [], "peak": [], "lung_fraction": [], "lung_ok": [],
                            "lung_small": [], "candidates": []}
    for start in range(0, len(levelled), batch):
        inputs = model_input(torch.from_numpy(np.asarray(levelled[start : start + batch], np.float32)), config.preprocess,
                             hardware)
        with hardware.autocast():
            analysis = model.analyse(inputs)
        out["presence"].append(analysis.presence.cpu().numpy())
        out["malignancy"].append(analysis.malignancy.cpu().numpy())
        out["task"].append(model.task_logit(analysis).float().cpu().numpy())
        out["peak"].append(analysis.peak.cpu().numpy())
        out["lung_fraction"].append(analysis.lung_fraction.cpu().numpy())
        out["lung_ok"].append(analysis.lung_ok.cpu().numpy())
        out["lung_small"].append((analysis.lung_logits.float() > 0).cpu().numpy()[:, 0])
        found = analysis.candidates if analysis.candidates is not None else map_peaks(analysis.nodule_map, model.input_size)
        out["candidates"] += [c.float().cpu().numpy() for c in found]
    result = {key: np.concatenate(value) for key, value in out.items() if key != "candidates"}
    result["candidates"] = out["candidates"]
    return result


def nodule_outputs(model, frame: pd.DataFrame, levelled_view, targets, config: RunConfig, hardware: Hardware) -> pd.DataFrame:
    """``nodule_outputs.csv``: one row per image of every split (see the module docstring)."""
    levelled = levelled_view[:]
    found = analyse_levelled(model, levelled, config, hardware)
    shortcut = analyse_levelled(model, black_out_borders(levelled), config, hardware)
    small = _small_masks(targets.lung_masks, model.seg_size).numpy()[:, 0] > 0.5
    blacked = blacked_lung_share(targets.lung_masks)
    rows = []
    for i, row in enumerate(frame.itertuples()):
        circle = targets.circles[i]
        rows.append({"case_id": row.case_id, "patient_id": row.patient_id, "split": row.split, "target": row.target,
                     "has_nodule": int(float(getattr(row, "has_nodule", 0) or 0) == 1 or np.isfinite(circle[0])),
                     "malignant": targets.malignant[i], "nodule_x": circle[0], "nodule_y": circle[1], "nodule_r": circle[2],
                     "presence_logit": found["presence"][i], "malignancy_logit": found["malignancy"][i],
                     "task_logit": found["task"][i], "peak_x": found["peak"][i, 0], "peak_y": found["peak"][i, 1],
                     "candidates": json.dumps(np.round(found["candidates"][i], 2).tolist()),
                     "lung_fraction": found["lung_fraction"][i], "lung_ok": bool(found["lung_ok"][i]),
                     "lung_dice": dice(found["lung_small"][i], small[i]) if targets.has_mask[i] else math.nan,
                     "shortcut_presence_logit": shortcut["presence"][i], "shortcut_task_logit": shortcut["task"][i],
                     "blacked_lung_share": blacked[i] if targets.has_mask[i] else math.nan})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def localiser_kwargs(config: RunConfig) -> dict:
    """The model's arguments: the input size and the run's task (``nodule_net`` scores one of three)."""
    if config.data.task not in TASKS:
        raise ValueError(f"{config.model.name} scores {', '.join(TASKS)}; task '{config.data.task}' is not one of them")
    return {"input_size": config.preprocess.size, "task": config.data.task, **config.model.kwargs}


def load_detector_weights(model: nn.Module, source: str) -> None:
    """``imagenet``: the Lite0 detector's encoder from the ImageNet weights (RGB stem folded to one channel)."""
    from lungdx.models.backbones import EfficientNetLite0
    from lungdx.models.weights import load_weights

    if source != "imagenet" or not hasattr(model.detector, "encoder_state_dict"):
        raise ValueError(f"{type(model).__name__}: weights '{source}' not supported (use imagenet with "
                         "--set model.kwargs.detector=lite0)")
    donor = EfficientNetLite0(in_channels=1)
    load_weights(donor, "imagenet")
    encoder = model.detector.encoder_state_dict(donor.state_dict())
    missing = model.detector.load_state_dict(encoder, strict=False)
    assert not missing.unexpected_keys, missing.unexpected_keys
    logger.info("detector encoder: %d ImageNet tensors of EfficientNet-Lite0", len(encoder))


def fit_localiser(config: RunConfig, run_dir: Path, data, model: nn.Module, hardware: Hardware, *, progress: bool = False,
                  on_epoch=None, resume: bool = False):
    """Train the three stages on ``data`` (a ``PreparedData``), then write the run folder's products.

    ``on_epoch`` is called with each stage epoch's history row, as ``train.fit`` calls it. ``resume``
    continues from ``run_dir/last.pt``: finished stages are kept, the stage under way goes on from its
    last finished epoch.
    """
    from lungdx.train import FitResult, data_fingerprint

    warn_ignored_train_settings(config)
    frame = data.frame
    every = localisation_targets(frame, config.preprocess)  # masks read once, for training and for the outputs
    targets = {split: every.subset((frame["split"] == split).to_numpy()) for split in ("train", "val", "test")}
    if not targets["train"].has_mask.any():
        raise ValueError(f"{config.data.path}: {config.model.name} needs lung-field masks (a 'lung_mask' column of "
                         "image paths) for its training images; none of them has one")
    images = {split: data.cache.batch(data.rows(split)["cache_index"].to_numpy()) for split in ("train", "val")}
    has_mask = targets["train"].has_mask
    generator = torch.Generator().manual_seed(config.train.seed + 1)
    if config.model.weights and not resume:  # a resumed run has its weights in last.pt
        load_detector_weights(model, config.model.weights)
    model = hardware.prepare(model)
    history = _History(run_dir / "history.csv", on_epoch)
    checkpoints = _Checkpoints(run_dir / "last.pt", model, generator, history)
    if resume:
        checkpoints.load()

    def stage(name: str, train) -> None:  # a stage that a resumed run finished before is not trained again
        if not checkpoints.done(name):
            checkpoints.finished(name, train())

    seg_images = {"train": images["train"][has_mask], "val": images["val"][targets["val"].has_mask]}
    seg_masks = {"train": targets["train"].lung_masks[has_mask], "val": targets["val"].lung_masks[targets["val"].has_mask]}
    stage("lungs", lambda: train_lungs(model, seg_images, seg_masks, config, hardware, generator, history, progress,
                                       checkpoints))
    lung_logits = {split: _lung_logits(model, images[split], config, hardware) for split in images}
    warn_failed_lung_fields(lung_logits["train"], config.nodule.seg_epochs)
    bank = NoduleBank(images["train"], data.rows("train"), targets["train"].circles, targets["train"].malignant)
    logger.info("nodule bank: %d patches from %d training images", len(bank), len(bank.case_ids))
    common = (model, images, lung_logits, targets, bank, config, hardware, generator, history, progress, checkpoints)
    stage("detector", lambda: train_detector(*common))
    if model.verifier is not None:
        stage("verifier", lambda: train_verifier(*common))
    if model.judge_kind == "size":
        stage("judge", lambda: fit_size_judge(model, images, lung_logits, targets, config, hardware, history))
    else:
        stage("judge", lambda: train_judge(*common))
    best = checkpoints.best
    threshold = finish_localiser(run_dir, config, data, model, hardware, every, best, data_fingerprint(frame),
                                 epochs_run=len(history), train_seconds=round(checkpoints.seconds, 1),
                                 nodule_bank={"patches": len(bank), "case_ids": sorted(bank.case_ids)})
    checkpoints.remove()
    return FitResult(run_dir, best["detector"], threshold, history, True)


def finish_localiser(run_dir: Path, config: RunConfig, data, model: nn.Module, hardware: Hardware, targets, best: dict,
                     fingerprint: str, **summary) -> float:
    """A finished localiser's products: ``nodule_outputs.csv``, ``summary.json`` (with ``summary``'s entries) and,
    last (see ``lungdx.train.write_summary``), ``model.pt`` with the threshold chosen on validation; returns the
    threshold. ``best["detector"]`` is the epoch the checkpoint names."""
    from lungdx.predict import compute_logits

    val = data.rows("val")
    val_probability = sigmoid(compute_logits(model, data.cache.view(val["cache_index"].to_numpy()), config.preprocess,
                                             hardware, 16))
    y_val = val["target"].to_numpy()
    threshold = metrics.choose_threshold(y_val, val_probability, config.train.threshold_method, config.train.threshold_target)
    val_metrics = metrics.binary_metrics(y_val, val_probability, threshold)
    band = metrics.threshold_band(y_val, val_probability, config.train.threshold_method, config.train.threshold_target,
                                  groups=val["patient_id"].to_numpy(), seed=config.eval.seed)
    outputs = nodule_outputs(model, data.frame, data.cache.view(data.frame["cache_index"].to_numpy()), targets, config,
                             hardware)
    outputs.to_csv(run_dir / "nodule_outputs.csv", index=False)
    dice_by_split = {split: float(outputs.loc[outputs["split"] == split, "lung_dice"].mean()) for split in ("train", "val", "test")}
    summary = {"best_epoch": best["detector"], "best_epochs": best, **summary, "stopped_early": True,
               "threshold": threshold, "threshold_method": config.train.threshold_method,
               "val_metrics_at_threshold": metrics.json_safe(val_metrics), "data_fingerprint": fingerprint,
               "device": str(hardware.device), "autocast": str(hardware.amp_dtype),
               "lung_dice": metrics.json_safe(dice_by_split),
               "images": {split: describe_classes(data.rows(split)) for split in ("train", "val", "test")},
               "excluded_images": len(data.excluded)}
    write_summary(run_dir, summary)
    kwargs = localiser_kwargs(config)  # model.pt last: a run stopped before it resumes from last.pt
    save_checkpoint(run_dir / "model.pt", model, model_name=config.model.name, model_kwargs=kwargs,
                    preprocess=to_dict(config.preprocess), task=config.data.task,
                    class_names=list(class_names(config.data.task)), threshold=threshold, data_fingerprint=fingerprint,
                    epoch=best["detector"], threshold_method=config.train.threshold_method,
                    threshold_band=metrics.json_safe(list(band)),
                    val_metrics=metrics.json_safe(val_metrics), best_epochs=best, numeric_precision=hardware.precision,
                    val_reference=build_reference(val_probability, val["path"].tolist(),
                                                  source=f"validation split at training time ({run_dir.name})"))
    return threshold
