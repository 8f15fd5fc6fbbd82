"""Run configuration: frozen dataclasses with defaults, YAML files that override, dotted one-offs.

Defaults live here; ``configs/*.yaml`` only override them; ``--set train.lr=3e-4`` changes one field
for one run. The resolved configuration is saved in every run folder.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message says which key and why."""


@dataclass(frozen=True)
class DataConfig:
    """Where the images are and what to learn from them.

    Attributes:
        path: a manifest CSV, a JSRT folder (``labels.csv`` layout or official ``CLNDAT_EN.txt``),
            an NIH ChestX-ray14 folder, a folder with one sub-folder per class, or a DICOM folder.
        format: ``auto`` (guess from the path) or one of ``manifest``, ``jsrt``, ``nih``,
            ``folders``, ``dicom``.
        task: ``nodule_vs_normal``, ``malignant_vs_benign``, ``malignant_vs_rest``, a binary
            manifest column (``nodule``), or ``COLUMN=VALUE`` (``label=pneumonia``).
        split: fractions of patients for train, validation and test.
        split_seed: seed of the patient-level split.
        split_file: reuse the split of an earlier run (its ``split.csv``) instead of drawing one.
        cache_dir: where preprocessed images are cached; None means ``~/.cache/lungdx``.
        patient_id_pattern: a regular expression that reads the patient ID from the file name of each image
            whose layout gives none (class folders, a manifest without ``patient_id``, DICOM without
            PatientID): the first group that matched, else the whole match
            (``lungdx.data.manifest.patient_ids_from_names``). None: each such image is its own patient.
    """

    path: str = ""
    format: str = "auto"
    task: str = "malignant_vs_rest"
    split: tuple[float, float, float] = (0.70, 0.15, 0.15)
    split_seed: int = 0
    split_file: str | None = None
    cache_dir: str | None = None
    patient_id_pattern: str | None = None


@dataclass(frozen=True)
class PreprocessConfig:
    """One preprocessing for training, evaluation and prediction (see ``lungdx.preprocess``).

    Attributes:
        size: output height and width in pixels.
        aspect: ``pad`` (fit the longer side, pad the shorter with zeros, no distortion),
            ``stretch`` (resize both sides, distorts non-square images) or ``crop`` (centre crop
            to a square, loses the edges of the longer side).
        window_percentiles: intensity levelling: values below the low / above the high percentile
            are clipped and the rest stretched to [0, 1]. ``(0, 100)`` is plain min-max.
        equalization: ``none``, ``hist`` (global histogram equalisation) or ``clahe``.
        clahe_clip: CLAHE clip limit (OpenCV units).
        clahe_tiles: CLAHE tile grid (tiles per side).
        denoise: ``none``, ``median`` (3x3), ``gaussian`` (sigma 1 px) or ``nlmeans``.
        normalization: ``per_image`` (zero mean, unit variance per image), ``fixed``
            (``(x - mean) / std``) or ``none``.
        mean: mean for ``fixed`` normalisation.
        std: standard deviation for ``fixed`` normalisation.
    """

    size: int = 256
    aspect: str = "pad"
    window_percentiles: tuple[float, float] = (0.5, 99.5)
    equalization: str = "none"
    clahe_clip: float = 2.0
    clahe_tiles: int = 8
    denoise: str = "none"
    normalization: str = "per_image"
    mean: float = 0.5
    std: float = 0.25


@dataclass(frozen=True)
class AugmentConfig:
    """Chest-safe augmentation, applied to training batches only.

    No horizontal flip by default: laterality matters on a chest radiograph (the heart is on
    the patient's left). Ranges are symmetric: rotation in [-rotation_deg, rotation_deg], etc.
    """

    enabled: bool = True
    rotation_deg: float = 7.0
    scale: float = 0.08
    translate: float = 0.05
    brightness: float = 0.08
    contrast: float = 0.15
    gamma: float = 0.15
    noise_std: float = 0.015
    hflip: bool = False


@dataclass(frozen=True)
class ModelConfig:
    """Which registered model to build, its keyword arguments and its starting weights.

    Attributes:
        weights: ``None`` (random initialisation), ``imagenet``, a state_dict file, or a lungdx run
            folder or checkpoint (see ``lungdx.models.weights``). An RGB stem is folded to one channel.
        keep_head: also load the head from ``weights`` when its shape matches (same task, new data);
            by default the head starts fresh.
    """

    name: str = "paper_cnn"
    kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    keep_head: bool = False


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, stopping and hardware settings.

    Attributes:
        pos_weight: positive-class weight of the BCE loss; ``None`` (unweighted), a number, or
            ``"auto"`` (negatives / positives in the training split).
        patience: epochs without a validation-loss improvement of more than ``min_delta``
            before stopping.
        device: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``auto`` (bf16 autocast on CPUs with bf16 support and on CUDA GPUs with
            bf16, fp16 AMP on older GPUs), ``fp32``, ``bf16`` or ``fp16``.
        channels_last: memory format for convolutions; ``auto`` turns it on (measured faster
            on CPU and GPU for these models).
        threshold_method: how the operating threshold is chosen on validation: ``youden``,
            ``sensitivity`` or ``specificity`` (with ``threshold_target``).
        optimizer: ``adam`` (L2 penalty of ``weight_decay`` in the gradient) or ``adamw``
            (decoupled weight decay). Biases and normalisation weights are never decayed.
        scheduler: learning-rate schedule per epoch: ``none``, ``cosine`` (to zero at ``epochs``)
            or ``plateau`` (times ``plateau_factor`` after ``plateau_patience`` epochs without a
            lower validation loss).
        freeze_epochs: epochs at the start that train the head only, with the backbone frozen
            (no gradients; batch norm and dropout in evaluation mode).
        backbone_lr_factor: the backbone's learning rate is ``lr`` times this (the head's is ``lr``).
    """

    epochs: int = 50
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    pos_weight: float | str | None = None
    patience: int = 10
    min_delta: float = 0.0
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    channels_last: str = "auto"
    threshold_method: str = "youden"
    threshold_target: float | None = None
    optimizer: str = "adam"
    scheduler: str = "none"
    plateau_patience: int = 3
    plateau_factor: float = 0.1
    freeze_epochs: int = 0
    backbone_lr_factor: float = 1.0


DET_SCHEDULES = ("constant", "cosine")
"""``nodule.det_schedule``: the detector's learning rate over its epochs."""

JUDGE_KEEPS = ("best", "last")
"""``nodule.judge_keep``: which of the judge's epochs is kept."""

INSERT_MATCHES = ("ring", "plane")
"""``nodule.insert_match``: what a donor's nodule patch is matched to its new place by (``data.nodules.insert_nodule``)."""


@dataclass(frozen=True)
class NoduleConfig:
    """Training stages of the localising model ``nodule_net`` (``lungdx.nodule_train``); other models ignore it.

    Of ``train.*`` the stages read ``lr``, ``optimizer``, ``weight_decay``, ``seed``, the threshold settings and
    (the judge's) ``batch_size``; a changed ``epochs``, ``patience``, ``scheduler`` and the like is ignored with a
    warning (``nodule_train.IGNORED_TRAIN``): these are the settings below.

    Attributes:
        seg_epochs, seg_patience: the lung U-Net (early stopping on validation loss).
        det_epochs, det_patience: the nodule-map detector.
        judge_epochs, judge_patience: the malignancy judge (and the candidate verifier).
        judge_keep: which of the judge's epochs is kept: ``best`` (the lowest validation loss, stopping
            early after ``judge_patience`` epochs without a better one) or ``last`` (all ``judge_epochs``
            are trained and the last is kept; validation is only watched, so its figures are not chosen
            on it).
        crop: side in input pixels of the detector's training crops (a multiple of 32; 0 = whole image).
        nodule_in_crop: share of crops centred near a nodule when the image has one.
        insert_prob: chance that a training normal gets a real training nodule blended into its lungs.
        insert_contrast: an inserted nodule's contrast against its new surroundings is its donor's times a
            factor drawn uniformly from [``insert_contrast``, 1] (1 = as cut): fainter nodules, like the
            subtle ones the detector misses most. Below 1 it draws one more random number per insertion.
        insert_match: what a donor's patch is matched to its new place by (``data.nodules.insert_nodule``):
            ``ring``, the mean of the ring around the nodule (1.2-1.6 radii) in donor and recipient; ``plane``,
            the plane fitted to each ring, level and tilt. With ``ring`` the blend's edge shows where the two
            slope differently (``docs/experiments/insertion_gallery.py --seam``). Every stage's insertions.
        synthetic: share of the detector's and the verifier's insertions that add a simulated nodule
            (``data.nodules.synthetic_nodule``: a ball's projected thickness with a random oval, lobulated
            outline) to the normal's own texture instead of blending in a donor's pixels. Its size and contrast
            are those of a random training nodule of the bank (``insert_contrast`` does not apply). The judge's
            insertions stay donors' (they carry a malignancy label). Above 0 it draws one more random number
            per insertion (0 = off).
        judge_jitter: the judge's crop centre moves by up to this many nodule radii (the detector's error).
        batch_size: images per detector and segmentation step (the judge uses ``train.batch_size``).
        det_ema: decay per step of an exponential moving average of the detector's weights, which is what
            is validated and kept (0 = off: the weights of the best epoch's last step).
        hard_negatives: share of the crops not centred on a nodule that are centred on one of the detector's
            own false-positive peaks on the training image instead of a random lung pixel (0 = off).
        hard_every: epochs between two refreshes of those peaks (the current detector on the whole,
            unaugmented training images); the first refresh comes after ``hard_every`` epochs.
        seg_black_out: chance that a lung U-Net training image gets random edge bands and upper corners
            blacked out (``nodule_train.random_black_out``), with the loss left out there (0 = off): so that
            its mask does not move when the shortcut check blacks out corners and borders.
        det_black_out: chance that a training sample of the detector, the verifier and the judge gets random
            edge bands and upper corners blacked out after its augmentation (0 = off), with the lung field
            left as it was: the black pixels inside the dilated lung mask are what the shortcut check shows
            the detector, and a nodule whose centre is blacked out is no longer a target.
        det_schedule: the detector's learning rate over its epochs: ``constant`` (``train.lr`` throughout) or
            ``cosine`` (from ``train.lr`` down to 1% of it at ``det_epochs``, one step per epoch; pair it
            with a ``det_patience`` as long as ``det_epochs``, so that the low-rate epochs are reached).
        det_repeats: crops drawn from each training image per detector epoch (each a new insertion,
            augmentation and crop position): more steps between two validations.
        hflip: mirror the detector's and the judge's training samples left-right with chance 0.5 (image,
            lung field and nodule together). Unlike ``augment.hflip`` for whole-image models, the
            nodule stages see lung crops, where a nodule looks the same on either side.
    """

    seg_epochs: int = 30
    seg_patience: int = 8
    det_epochs: int = 60
    det_patience: int = 12
    judge_epochs: int = 60
    judge_patience: int = 12
    judge_keep: str = "best"
    crop: int = 256
    nodule_in_crop: float = 0.7
    insert_prob: float = 0.7
    insert_contrast: float = 1.0
    insert_match: str = "ring"
    synthetic: float = 0.0
    judge_jitter: float = 0.5
    batch_size: int = 16
    det_ema: float = 0.0
    hard_negatives: float = 0.0
    hard_every: int = 2
    det_repeats: int = 1
    det_schedule: str = "constant"
    seg_black_out: float = 0.0
    det_black_out: float = 0.0
    hflip: bool = False

    def __post_init__(self):
        for name, choices in (("det_schedule", DET_SCHEDULES), ("judge_keep", JUDGE_KEEPS),
                              ("insert_match", INSERT_MATCHES)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"nodule.{name} must be one of {', '.join(choices)}; got '{getattr(self, name)}'")
        if not isinstance(self.det_repeats, int) or self.det_repeats < 1:
            raise ConfigError(f"nodule.det_repeats must be a whole number of at least 1; got {self.det_repeats!r}")
        if not 0 < self.insert_contrast <= 1:
            raise ConfigError(f"nodule.insert_contrast is a factor in (0, 1]; got {self.insert_contrast!r}")
        for name in ("seg_black_out", "det_black_out", "synthetic"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"nodule.{name} is a chance between 0 and 1; got {getattr(self, name)!r}")


@dataclass(frozen=True)
class EvalConfig:
    """Confidence intervals of the evaluation."""

    n_bootstrap: int = 1000
    confidence: float = 0.95
    seed: int = 0


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs; saved as ``config.yaml`` in the run folder."""

    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    nodule: NoduleConfig = field(default_factory=NoduleConfig)


def to_dict(config) -> dict[str, Any]:
    """A plain, YAML- and JSON-friendly dict of a config dataclass (tuples become lists)."""
    return _plain(dataclasses.asdict(config))


def _plain(value):
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def from_dict(cls, values: dict[str, Any], where: str = ""):
    """Build dataclass ``cls`` from ``values``; unknown keys raise ConfigError naming the key."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key '{where}{key}' (known here: {known})")
        default = getattr(cls(), key) if key in fields else None
        if dataclasses.is_dataclass(default):
            kwargs[key] = from_dict(type(default), value, f"{where}{key}.")
        elif isinstance(default, tuple) and isinstance(value, list):
            kwargs[key] = tuple(value)
        elif isinstance(default, float) and isinstance(value, (str, int)) and not isinstance(value, bool):
            kwargs[key] = _as_float(value, f"{where}{key}")
        else:
            kwargs[key] = value
    return cls(**kwargs)


def _as_float(value, key: str) -> float:
    # YAML 1.1 reads '3e-4' (no dot) as a string; accept it for float fields.
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"config key '{key}' needs a number, got {value!r}") from None


def _parse_value(raw: str):
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:  # not YAML ('[2024] jsrt'): the text itself
        return raw
    if isinstance(value, str) and _NUMBER.match(value):
        return float(value)
    return value


def apply_overrides(config: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply ``section.key=value`` overrides; values are parsed as YAML (``3e-4``, ``[1, 2]``)."""
    values = to_dict(config)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = values
        for key in keys[:-1]:
            if not isinstance(node.get(key), dict):
                raise ConfigError(f"override '{item}': '{key}' is not a config section")
            node = node[key]
        if keys[-1] not in node and not (len(keys) >= 2 and keys[-2] == "kwargs"):
            raise ConfigError(f"override '{item}': unknown key '{dotted}'")
        node[keys[-1]] = _parse_value(raw)
    return from_dict(RunConfig, values)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults, then the YAML file at ``path`` (if any), then the dotted ``overrides``."""
    config = RunConfig()
    if path is not None:
        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"{path}: cannot read config: {err}") from err
        merged = _merge(to_dict(config), values, str(path))
        config = from_dict(RunConfig, merged)
    return apply_overrides(config, overrides or [])


def _merge(base: dict, override: dict, where: str) -> dict:
    if not isinstance(override, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    merged = dict(base)
    for key, value in override.items():
        if isinstance(merged.get(key), dict) and isinstance(value, dict) and key != "kwargs":
            merged[key] = _merge(merged[key], value, f"{where}:{key}")
        else:
            merged[key] = value
    return merged


def save_config(config: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def with_resolved_paths(config: RunConfig) -> RunConfig:
    """``config`` with its file paths made absolute: ``data.path``, ``data.split_file``, ``data.cache_dir`` and a
    ``model.weights`` that is a file or folder here. A run folder's ``config.yaml`` then reads the same from any
    working folder (``lungdx evaluate RUN`` from elsewhere looked for ``../shared/data/jsrt`` there)."""
    def absolute(value: str | None) -> str | None:
        return str(Path(value).expanduser().resolve()) if value else value

    data = dataclasses.replace(config.data, path=absolute(config.data.path), split_file=absolute(config.data.split_file),
                               cache_dir=absolute(config.data.cache_dir))
    weights = config.model.weights
    if weights and Path(weights).expanduser().exists():
        weights = absolute(weights)
    return dataclasses.replace(config, data=data, model=dataclasses.replace(config.model, weights=weights))
