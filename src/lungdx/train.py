"""Training: ``prepare_data``, ``train_one_epoch``, ``evaluate_epoch``, ``EarlyStopping`` and ``fit``.

A run folder holds the resolved config, the split manifest, the images left out (with reasons),
the per-epoch history, ``last.pt`` (to resume) and ``model.pt`` (the best epoch by validation loss,
with its operating threshold chosen on validation).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from lungdx import distributed, metrics
from lungdx.checkpoint import load_checkpoint, model_from_checkpoint, save_atomic, save_checkpoint, versions
from lungdx.config import RunConfig, load_config, save_config, to_dict, with_resolved_paths
from lungdx.data.augment import augment
from lungdx.data.cache import ImageCache, build_cache
from lungdx.data.manifest import apply_task, class_names, describe_classes, load_configured_dataset
from lungdx.data.split import check_leakage, split_patients
from lungdx.io.files import write_atomic
from lungdx.models import create_model
from lungdx.models.registry import assembled, localises
from lungdx.models.weights import IMAGENET, WeightsError, head_prefixes, is_head, load_weights, split_parameters
from lungdx.predict import compute_logits, model_input, sigmoid
from lungdx.reference import build_reference
from lungdx.runtime import Hardware

logger = logging.getLogger(__name__)

STATE_FORMAT = "lungdx-train-state/1"
SPLIT_COLUMNS = ["case_id", "patient_id", "path", "target", "split"]


@dataclass
class PreparedData:
    """The task's rows (with ``split``, ``target`` and ``cache_index``) and the image cache."""

    frame: pd.DataFrame
    cache: ImageCache
    excluded: pd.DataFrame = field(default_factory=pd.DataFrame)

    def rows(self, split: str) -> pd.DataFrame:
        return self.frame[self.frame["split"] == split]


def prepare_data(config: RunConfig, *, progress: bool = False) -> PreparedData:
    """Read the dataset, build or open its cache, pick the task's rows and split by patient."""
    frame = load_configured_dataset(config.data)
    with tqdm(total=len(frame), desc="decode + preprocess", unit="img", disable=not progress, leave=False) as bar:
        cache = build_cache(frame["path"].tolist(), config.preprocess, config.data.cache_dir, progress=bar.update)
    frame["cache_index"] = np.arange(len(frame))
    frame = apply_task(frame, config.data.task)
    readable = cache.valid[frame["cache_index"].to_numpy()]
    excluded = frame.loc[~readable, ["case_id", "path"]].assign(reason=lambda f: f["path"].map(cache.errors))
    if len(excluded):
        # The verdicts live in the cache: a file mended, or a decoder installed, is read again only in a new cache.
        logger.warning("%d unreadable or blank images left out (see excluded.csv); the image cache %s keeps these "
                       "verdicts: remove it to read them again (after installing a missing decoder, say)",
                       len(excluded), cache.folder)
    frame = frame[readable].reset_index(drop=True)
    if config.data.split_file:
        frame = _apply_split_file(frame, Path(config.data.split_file))
        empty = [name for name in ("train", "val") if not (frame["split"] == name).any()]
        if empty:  # training needs both: said here, not as an empty concatenation or metric later
            raise ValueError(f"{config.data.split_file}: no '{empty[0]}' rows among the dataset's readable images of "
                             f"task {config.data.task}")
    else:
        frame = split_patients(frame, config.data.split, config.data.split_seed)
    logger.info("task %s: %s", config.data.task, describe_classes(frame))
    return PreparedData(frame=frame, cache=cache, excluded=excluded)


def _apply_split_file(frame: pd.DataFrame, split_file: Path) -> pd.DataFrame:
    try:
        saved = pd.read_csv(split_file, dtype={"case_id": str, "patient_id": str})
    except (OSError, pd.errors.ParserError) as err:
        raise ValueError(f"{split_file}: cannot read the split file: {err}") from err
    if not {"path", "split"} <= set(saved.columns):
        raise ValueError(f"{split_file}: a split file needs 'path' and 'split' columns (as in a run's split.csv)")
    assignment = dict(zip(saved["path"], saved["split"], strict=True))
    frame = frame.assign(split=frame["path"].map(assignment))
    missing = int(frame["split"].isna().sum())
    if missing:
        logger.warning("%s: %d images of the dataset are not in the split file and are left out", split_file, missing)
        frame = frame[frame["split"].notna()].reset_index(drop=True)
    check_leakage(frame)
    return frame


def data_fingerprint(frame: pd.DataFrame) -> str:
    """Hash of (file name, byte size, target, split) of every row: same data, same fingerprint."""
    digest = hashlib.blake2b(digest_size=12)
    for row in frame.sort_values("path").itertuples():
        size = Path(row.path).stat().st_size if Path(row.path).exists() else -1
        digest.update(f"{Path(row.path).name}\0{size}\0{row.target}\0{row.split}\n".encode())
    return digest.hexdigest()


class EarlyStopping:
    """Stop when the validation loss has not improved by ``min_delta`` for ``patience`` epochs."""

    def __init__(self, patience: int = 10, min_delta: float = 0.0):
        self.patience, self.min_delta = patience, min_delta
        self.best_loss, self.best_epoch, self.bad_epochs = float("inf"), -1, 0

    def step(self, loss: float, epoch: int) -> bool:
        """Record an epoch; True when it is the best so far."""
        if loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_epoch, self.bad_epochs = loss, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"best_loss": self.best_loss, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.best_loss, self.best_epoch, self.bad_epochs = state["best_loss"], state["best_epoch"], state["bad_epochs"]


def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module, data: PreparedData,
                    config: RunConfig, hardware: Hardware, generator: torch.Generator,
                    scaler: torch.amp.GradScaler | None = None, progress: bool = False,
                    eval_layers: Sequence[nn.Module] = (), augment_generator: torch.Generator | None = None,
                    ) -> dict[str, float]:
    """One pass over the training split in random order, with augmentation; returns loss/accuracy/AUC.

    ``eval_layers`` stay in evaluation mode (a frozen backbone's batch norm and dropout).
    ``augment_generator`` draws the augmentation (default: ``generator``, which also draws the order).

    Under torch.distributed (``model`` wrapped in DDP) every rank draws the same order from
    ``generator`` and takes its share of each batch of ``train.batch_size`` images (rank r: the
    batch's images r, r + W, ...); the returned metrics are over the whole epoch, all ranks together.
    """
    model.train()
    for layer in eval_layers:
        layer.eval()
    rank, world = distributed.rank(), distributed.world_size()
    augment_generator = generator if augment_generator is None else augment_generator
    rows = data.rows("train")
    order = torch.randperm(len(rows), generator=generator).numpy()
    indices, targets = rows["cache_index"].to_numpy()[order], rows["target"].to_numpy()[order]
    batch_size = config.train.batch_size
    all_logits, total_loss = [], 0.0
    for start in tqdm(range(0, len(order), batch_size), desc="train", leave=False, disable=not progress):
        # Sorted reads are sequential in the memory-mapped cache; the order inside a batch is irrelevant.
        global_count = min(batch_size, len(order) - start)
        chunk = slice(start + rank, start + global_count, world)
        in_order = np.argsort(indices[chunk])
        batch_index, batch_target = indices[chunk][in_order], targets[chunk][in_order]
        levelled = torch.from_numpy(data.cache.batch(batch_index))[:, None].to(hardware.device)
        if len(batch_index):
            images = model_input(augment(levelled, config.augment, augment_generator), config.preprocess, hardware)
        else:  # a rank's empty share of a small last batch: nothing to augment or normalise, but it joins the step
            images = levelled.contiguous(memory_format=torch.channels_last) if hardware.channels_last else levelled
        target = torch.as_tensor(batch_target, dtype=torch.float32, device=hardware.device)[:, None]
        with hardware.autocast():
            logits = model(images)
        loss = shard_loss(loss_fn, logits.float(), target, global_count, world)
        optimizer_step(loss, optimizer, scaler)
        total_loss += float(loss.detach()) * global_count / world  # this rank's sum of per-image losses
        all_logits.append((batch_target, logits.detach().float().cpu().reshape(-1).numpy()))
    y_true = np.concatenate([t for t, _ in all_logits])
    scores = np.concatenate([s for _, s in all_logits])
    if world > 1:
        shares = distributed.all_gather_object((total_loss, y_true, scores))
        total_loss = sum(share[0] for share in shares)
        y_true, scores = np.concatenate([share[1] for share in shares]), np.concatenate([share[2] for share in shares])
    return _epoch_metrics(total_loss / len(order), y_true, sigmoid(scores))


def shard_loss(loss_fn: nn.Module, logits: torch.Tensor, target: torch.Tensor, global_count: int, world: int) -> torch.Tensor:
    """This rank's loss, such that DDP's mean of the ranks' gradients is the gradient of the global batch's mean loss.

    ``loss_fn`` averages over this rank's images; times their count it is their sum, and
    ``sum * world / global_count`` averaged over ``world`` ranks is the mean over the global batch.
    A rank left without images (a last batch smaller than the world) still joins the step with a
    zero loss over the whole graph, so DDP's all-reduce is never waited for in vain. In a single
    process this is ``loss_fn(logits, target)``, unchanged.
    """
    if world == 1:
        return loss_fn(logits, target)
    if len(target) == 0:
        return logits.sum() * 0.0
    return loss_fn(logits, target) * (len(target) * world / global_count)


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    """Backward pass and update; with a GradScaler (fp16 AMP) the loss is scaled against underflow."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
        return
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def evaluate_epoch(model: nn.Module, loss_fn: nn.Module, data: PreparedData, split: str, config: RunConfig,
                   hardware: Hardware) -> tuple[dict[str, float], np.ndarray]:
    """Loss, accuracy at 0.5 and AUC on one split, and the probabilities (row order of the split)."""
    rows = data.rows(split)
    logits = compute_logits(model, data.cache.view(rows["cache_index"].to_numpy()), config.preprocess, hardware,
                            config.train.batch_size)
    y_true = rows["target"].to_numpy()
    # pandas hands out read-only arrays (copy-on-write); torch wants writable ones.
    target = torch.tensor(np.array(y_true, dtype=np.float32), device=hardware.device)[:, None]
    loss = float(loss_fn(torch.from_numpy(logits.copy()).to(hardware.device)[:, None], target))
    probabilities = sigmoid(logits)
    return _epoch_metrics(loss, y_true, probabilities), probabilities


def _epoch_metrics(loss: float, y_true: np.ndarray, y_score: np.ndarray) -> dict[str, float]:
    return {"loss": loss, "accuracy": metrics.accuracy(y_true, y_score, 0.5), "auc": metrics.roc_auc(y_true, y_score)}


@dataclass
class FitResult:
    """What ``fit`` made: the run folder, the best epoch, the threshold and the history."""

    run_dir: Path
    best_epoch: int
    threshold: float
    history: list[dict]
    stopped_early: bool


def fit(config: RunConfig, run_dir: str | Path, *, resume: bool = False, progress: bool = False,
        on_epoch: Callable[[dict], None] | None = None) -> FitResult:
    """Train ``config.model`` on ``config.data`` and write the run folder.

    Under torchrun (a process group set up by ``lungdx.distributed``) every rank calls ``fit``: the
    training split is sharded per batch (see ``train_one_epoch``), rank 0 alone writes the run folder,
    validates each epoch and chooses the threshold, and every rank gets the same rows and result.

    Args:
        config: the run's configuration (saved as ``config.yaml``).
        run_dir: output folder; must be new or empty unless ``resume``.
        resume: continue from ``run_dir/last.pt`` (the saved config is used and must match).
        progress: show progress bars on stderr (rank 0 only).
        on_epoch: called with each epoch's history row once it is saved (on every rank, with the same
            row); an exception it raises (a tuner pruning the trial, say) stops training and
            propagates, ``last.pt`` kept.
    """
    run_dir = Path(run_dir)
    if assembled(config.model.name):
        raise ValueError(f"{config.model.name} is assembled from finished runs, not trained: train its members (for "
                         "example --model nodule_net), then `lungdx ensemble RUN RUN ... --out DIR`")
    if not resume:
        _check_distributable(config)
    config = distributed.run_on_main(_prepare_run_dir, config, run_dir, resume)
    _check_distributable(config)
    progress = progress and distributed.is_main()
    data = prepare_data(_with_saved_split(config, run_dir, resume), progress=progress)
    distributed.run_on_main(_write_data_files, data, run_dir, resume)
    hardware = _rank_hardware(Hardware.resolve(config.train.device, config.train.precision, config.train.channels_last))
    torch.manual_seed(config.train.seed)
    if localises(config.model.name):  # nodule_net: its own staged training, the same run folder
        from lungdx.nodule_train import fit_localiser, localiser_kwargs

        model = create_model(config.model.name, **localiser_kwargs(config))
        return fit_localiser(config, run_dir, data, model, hardware, progress=progress, on_epoch=on_epoch, resume=resume)
    model = create_model(config.model.name, **model_kwargs(config))
    if config.model.weights and not resume:  # a resumed run has its weights in last.pt
        check_weights_held_out(config.model.weights, data.frame)
        load_weights(model, config.model.weights, keep_head=config.model.keep_head)
    model = hardware.prepare(model)
    if distributed.active():
        model = distributed.sync_batch_norm(model, hardware.device)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    freezer = BackboneFreezer(model, config.train.freeze_epochs)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=_pos_weight(config, data)).to(hardware.device)
    # fp16 scales its loss against underflow on any device (GradScaler("cuda") disabled itself on a CPU).
    scaler = torch.amp.GradScaler(hardware.device.type) if hardware.amp_dtype == torch.float16 else None
    generator = torch.Generator().manual_seed(config.train.seed + 1)
    stopper = EarlyStopping(config.train.patience, config.train.min_delta)
    history: list[dict] = []
    if resume:
        history = _load_state(run_dir / "last.pt", model, optimizer, stopper, generator, scheduler, scaler)
    fingerprint = _same_on_all_ranks(data_fingerprint(data.frame))
    # DDP reduces the gradients of the parameters that need them; a frozen backbone's get none.
    trained = (distributed.data_parallel(model, hardware.device, find_unused_parameters=config.train.freeze_epochs > 0)
               if distributed.active() else model)
    logger.info("training %s on %s, %s, autocast %s, channels_last %s, %d process(es)", config.model.name,
                hardware.device, describe_classes(data.rows("train")), hardware.amp_dtype, hardware.channels_last,
                distributed.world_size())
    epochs = tqdm(range(len(history) + 1, config.train.epochs + 1), desc="epochs", disable=not progress,
                  initial=len(history), total=config.train.epochs)
    for epoch in epochs:
        if stopper.should_stop:
            break
        frozen = freezer.set_epoch(epoch)
        lr = max(group["lr"] for group in optimizer.param_groups)
        started = time.perf_counter()
        train_row = train_one_epoch(trained, optimizer, loss_fn, data, config, hardware, generator, scaler, progress,
                                    eval_layers=freezer.eval_layers, augment_generator=_rank_generator(config, epoch))
        train_seconds = time.perf_counter() - started
        val_row = distributed.run_on_main(lambda: evaluate_epoch(model, loss_fn, data, "val", config, hardware)[0])
        row = distributed.broadcast_object(
            {"epoch": epoch, **{f"train_{k}": v for k, v in train_row.items()},
             **{f"val_{k}": v for k, v in val_row.items()}, "seconds": round(time.perf_counter() - started, 2),
             "train_images_per_s": round(len(data.rows("train")) / train_seconds, 1), "lr": lr, "frozen": frozen})
        history.append(row)
        step_scheduler(scheduler, val_row["loss"])
        improved = stopper.step(val_row["loss"], epoch)
        if distributed.is_main():
            if improved:
                _save_model(run_dir / "best.pt", model, config, data, fingerprint, epoch=epoch, threshold=None)
            _save_state(run_dir / "last.pt", model, optimizer, stopper, generator, history, scheduler, scaler)
            _write_history(history, run_dir)
        epochs.set_postfix(train_loss=f"{train_row['loss']:.3f}", val_loss=f"{val_row['loss']:.3f}",
                           val_auc=f"{val_row['auc']:.3f}")
        if on_epoch is not None:
            on_epoch(row)
    return distributed.run_on_main(_finish, run_dir, config, data, hardware, loss_fn, fingerprint, stopper, history)


def _check_distributable(config: RunConfig) -> None:
    if distributed.active() and localises(config.model.name):
        raise ValueError(f"{config.model.name}: distributed training (torchrun) supports the single-stage models for "
                         "now; train this localising model's staged training in one process, without torchrun")


def _rank_hardware(hardware: Hardware) -> Hardware:
    """Under torch.distributed, ``cuda`` means this rank's GPU (set from LOCAL_RANK by ``distributed.init``)."""
    if not distributed.active() or hardware.device.type != "cuda":
        return hardware
    own = torch.device("cuda", torch.cuda.current_device())
    if hardware.device.index is not None and hardware.device != own:
        logger.warning("train.device %s ignored under torchrun: rank %d trains on %s", hardware.device,
                       distributed.rank(), own)
    return replace(hardware, device=own)


def _rank_generator(config: RunConfig, epoch: int) -> torch.Generator | None:
    """Under torch.distributed: this rank's augmentation generator for ``epoch``; None (the shared one) otherwise.

    Each rank augments (and drops out) other images than the others, so it draws from its own
    stream, seeded from (seed, rank, epoch): a resumed run draws what the uninterrupted one would
    have without saving every rank's state. torch's global generator (dropout) is reseeded alike.
    """
    if not distributed.active():
        return None
    seed = int(np.random.SeedSequence([config.train.seed, distributed.rank(), epoch]).generate_state(1)[0])
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _same_on_all_ranks(fingerprint: str) -> str:
    """The data fingerprint, checked to be the same on every rank (same files, targets and split)."""
    fingerprints = distributed.all_gather_object(fingerprint)
    if len(set(fingerprints)) > 1:
        raise ValueError(f"the ranks see different data or splits (fingerprints {fingerprints}): every machine needs "
                         "the same data files at the same path")
    return fingerprint


OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def optimizer_class(config: RunConfig) -> type[torch.optim.Optimizer]:
    """``train.optimizer``'s class; a clear error for an unknown name."""
    if config.train.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown train.optimizer '{config.train.optimizer}' (use {' or '.join(OPTIMIZERS)})")
    return OPTIMIZERS[config.train.optimizer]


def build_optimizer(model: nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    """Adam or AdamW: the head at ``lr``, the backbone at ``lr * backbone_lr_factor``.

    Biases and normalisation weights (1-D tensors) get no weight decay. Groups with the same
    settings are merged, so the defaults give one group over ``model.parameters()`` in order.
    """
    train = config.train
    kind = optimizer_class(config)
    backbone, head = split_parameters(model)
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for named, lr in ((backbone, train.lr * train.backbone_lr_factor), (head, train.lr)):
        for _, param in named:
            groups.setdefault((lr, train.weight_decay if param.ndim > 1 else 0.0), []).append(param)
    return kind([{"params": params, "lr": lr, "weight_decay": decay}
                 for (lr, decay), params in groups.items()], lr=train.lr)


def build_scheduler(optimizer: torch.optim.Optimizer, config: RunConfig):
    """The per-epoch learning-rate schedule of ``train.scheduler``; None for ``none``."""
    train = config.train
    if train.scheduler == "none":
        return None
    if train.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(train.epochs, 1))
    if train.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=train.plateau_factor,
                                                          patience=train.plateau_patience)
    raise ValueError(f"unknown train.scheduler '{train.scheduler}' (use none, cosine or plateau)")


def step_scheduler(scheduler, val_loss: float) -> None:
    """Advance the schedule by one epoch (the plateau schedule watches the validation loss)."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(val_loss)
    elif scheduler is not None:
        scheduler.step()


class BackboneFreezer:
    """Freezes everything but the head for the first ``epochs`` epochs, then releases it.

    While frozen, backbone parameters get no gradients and ``eval_layers`` lists the backbone's
    layers, which ``train_one_epoch`` keeps in evaluation mode: batch-norm statistics and dropout
    stay fixed too, so the head learns on the features it will see later.
    """

    def __init__(self, model: nn.Module, epochs: int):
        prefixes = head_prefixes(model)
        self.epochs, self.frozen = epochs, False
        self.backbone_parameters = [param for _, param in split_parameters(model)[0]]
        self.layers = [module for name, module in model.named_modules()
                       if name and not is_head(name, prefixes) and next(module.children(), None) is None]

    def set_epoch(self, epoch: int) -> bool:
        """Freeze or release for ``epoch`` (1-based); True while frozen."""
        self.frozen = epoch <= self.epochs
        for param in self.backbone_parameters:
            param.requires_grad_(not self.frozen)
        return self.frozen

    @property
    def eval_layers(self) -> list[nn.Module]:
        return self.layers if self.frozen else []


_BEFORE_THE_FIRST_EPOCH = {"train.log", "config.yaml", "versions.json", "split.csv", "excluded.csv"}


def _prepare_run_dir(config: RunConfig, run_dir: Path, resume: bool) -> RunConfig:
    if resume:
        discard_stopped_model(run_dir)
        if (run_dir / "model.pt").is_file():
            raise FileExistsError(f"{run_dir}: this run has finished (model.pt exists); nothing to resume")
        if not (run_dir / "last.pt").is_file():
            raise FileNotFoundError(f"{run_dir}: nothing to resume (no last.pt): no epoch had finished; run the same "
                                    "command without --resume to start it again in this folder")
        saved = load_config(run_dir / "config.yaml")
        given, kept = to_dict(with_resolved_paths(config)), to_dict(with_resolved_paths(saved))
        differ = sorted(f"{section}.{key}" for section in kept for key in kept[section]
                        if isinstance(kept[section], dict) and given.get(section, {}).get(key) != kept[section][key])
        if differ:
            logger.warning("%s: resuming with the run's saved config.yaml, which differs from the given one in %s",
                           run_dir, ", ".join(differ))
        return saved
    # A run stopped before its first epoch ended holds only what was written before training: it starts again here.
    if run_dir.exists() and any(p.name not in _BEFORE_THE_FIRST_EPOCH for p in run_dir.iterdir()):
        raise FileExistsError(f"{run_dir}: run folder exists and is not empty (use --resume to continue it, or a new --out)")
    run_dir.mkdir(parents=True, exist_ok=True)
    config = with_resolved_paths(config)  # the run folder reads the same from any working folder
    save_config(config, run_dir / "config.yaml")
    (run_dir / "versions.json").write_text(json.dumps(versions(), indent=2))
    return config


def _with_saved_split(config: RunConfig, run_dir: Path, resume: bool) -> RunConfig:
    if resume and (run_dir / "split.csv").is_file():
        return replace(config, data=replace(config.data, split_file=str(run_dir / "split.csv")))
    return config


def check_weights_held_out(weights: str | Path, frame: pd.DataFrame) -> None:
    """Refuse weights from a lungdx run that trained or chose its epoch on this run's test patients.

    A run on the same data with another task or split setting splits the patients differently: fine-tuned from
    it, a model would be tested on patients its weights learnt from. The source's ``split.csv`` (beside its
    ``model.pt`` or ``last.pt``) tells; the data are the same when its images are. Other weights files say
    nothing about their training data and pass.
    """
    source = Path(weights).expanduser()
    split_file = source / "split.csv" if source.is_dir() else source.parent / "split.csv"
    if str(weights) == IMAGENET or not split_file.is_file():
        return
    try:
        seen = pd.read_csv(split_file, dtype={"patient_id": str}, usecols=["patient_id", "path", "split"])
    except (OSError, ValueError) as err:
        raise WeightsError(f"{split_file}: cannot read the split of the run the weights come from ({err})") from err
    if not set(seen["path"]) & set(frame["path"]):
        return  # other images: patient IDs of another dataset mean other patients
    learnt = set(seen.loc[seen["split"].isin(["train", "val"]), "patient_id"])
    test = set(frame.loc[frame["split"] == "test", "patient_id"].astype(str))
    shared = sorted(learnt & test)
    if shared:
        # A count, no IDs: an error message ends up in logs
        raise WeightsError(f"{weights}: trained on {len(shared)} of this run's {len(test)} test patients ({split_file} "
                           "splits them otherwise), so the test split would not be held out; use its split "
                           f"(--set data.split_file={split_file}) or weights that never saw them")


def _write_data_files(data: PreparedData, run_dir: Path, resume: bool = False) -> None:
    # A resumed run keeps the split.csv it was read from: rewriting it could leave half a file for the next resume.
    if not (resume and (run_dir / "split.csv").is_file()):
        write_atomic(run_dir / "split.csv", data.frame[SPLIT_COLUMNS].to_csv(index=False))
    if len(data.excluded):
        write_atomic(run_dir / "excluded.csv", data.excluded.to_csv(index=False))


def model_kwargs(config: RunConfig) -> dict:
    """The model's keyword arguments; ``input_size`` follows the preprocessing size unless set."""
    return {"input_size": config.preprocess.size, **config.model.kwargs}


def _pos_weight(config: RunConfig, data: PreparedData) -> torch.Tensor | None:
    setting = config.train.pos_weight
    if setting is None:
        return None
    if setting == "auto":
        targets = data.rows("train")["target"]
        setting = (len(targets) - targets.sum()) / max(targets.sum(), 1)
    return torch.tensor([float(setting)])


def _save_model(path: Path, model: nn.Module, config: RunConfig, data: PreparedData, fingerprint: str, *,
                epoch: int, threshold: float | None, **info) -> None:
    save_checkpoint(path, model, model_name=config.model.name, model_kwargs=model_kwargs(config),
                    preprocess=to_dict(config.preprocess), task=config.data.task,
                    class_names=list(class_names(config.data.task)), threshold=threshold,
                    data_fingerprint=fingerprint, epoch=epoch, **info)


def _save_state(path: Path, model, optimizer, stopper: EarlyStopping, generator: torch.Generator, history,
                scheduler=None, scaler: torch.amp.GradScaler | None = None) -> None:
    state = {"format": STATE_FORMAT, "model": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
             "optimizer": optimizer.state_dict(), "early_stopping": stopper.state_dict(),
             "scheduler": scheduler.state_dict() if scheduler is not None else None,
             "generator": generator.get_state(), "torch_rng": torch.get_rng_state(), "history": history,
             # fp16's loss scale: a resumed run that started again from 65536 would skip steps the run did not.
             "scaler": scaler.state_dict() if scaler is not None else None}
    if torch.cuda.is_available():
        # Dropout on a GPU draws from the CUDA generators: without them a resumed run drops other units.
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    save_atomic(state, path)


def _read_state(path: Path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path}: not a lungdx training state")
    return state


def _load_state(path: Path, model, optimizer, stopper: EarlyStopping, generator: torch.Generator,
                scheduler=None, scaler: torch.amp.GradScaler | None = None) -> list[dict]:
    state = distributed.run_on_main(_read_state, path)  # the run folder need only be on rank 0's machine
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    stopper.load_state_dict(state["early_stopping"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available() and len(state["cuda_rng"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    logger.info("resuming %s after epoch %d", path.parent, len(state["history"]))
    return list(state["history"])


def _write_history(history: list[dict], run_dir: Path) -> None:
    pd.DataFrame(history).to_csv(run_dir / "history.csv", index=False)


def write_summary(run_dir: Path, summary: dict) -> None:
    """``summary.json``. A run writes it before ``model.pt``, its last file: a folder with ``model.pt`` is a
    finished run (``lungdx cv`` evaluates it, ``--resume`` refuses it), one stopped before has ``last.pt`` to
    resume from."""
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))


def stopped_while_finishing(run_dir: Path) -> bool:
    """Whether ``model.pt`` in ``run_dir`` is not a finished run's: a staged (nodule_net) run of lungdx before
    2026-12-06, which wrote ``model.pt`` before ``summary.json``, stopped in between. Its ``last.pt`` has every
    stage trained and makes ``model.pt`` again. (A paper CNN run of then had removed ``best.pt`` by that point,
    so its ``model.pt`` is the only copy and is kept.)"""
    if not ((run_dir / "model.pt").is_file() and (run_dir / "last.pt").is_file()) or (run_dir / "summary.json").is_file():
        return False
    try:
        return localises(load_config(run_dir / "config.yaml").model.name)
    except (OSError, ValueError):
        return False


def discard_stopped_model(run_dir: Path) -> None:
    """Remove ``model.pt`` when ``stopped_while_finishing``, so the run resumes from ``last.pt``."""
    if stopped_while_finishing(run_dir):
        logger.warning("%s: model.pt without summary.json (a run stopped while finishing); resuming from last.pt",
                       run_dir)
        (run_dir / "model.pt").unlink()


def _finish(run_dir: Path, config: RunConfig, data: PreparedData, hardware: Hardware, loss_fn, fingerprint: str,
            stopper: EarlyStopping, history: list[dict]) -> FitResult:
    """Reload the best epoch, choose the threshold on validation, write the summary and then ``model.pt``."""
    if not (run_dir / "best.pt").is_file():
        raise RuntimeError(f"{run_dir}: no epoch gave a finite validation loss (see history.csv); no model to keep")
    best = load_checkpoint(run_dir / "best.pt")
    model = hardware.prepare(model_from_checkpoint(best))
    val_row, probabilities = evaluate_epoch(model, loss_fn, data, "val", config, hardware)
    y_val = data.rows("val")["target"].to_numpy()
    threshold = metrics.choose_threshold(y_val, probabilities, config.train.threshold_method,
                                         config.train.threshold_target)
    val_metrics = metrics.binary_metrics(y_val, probabilities, threshold)
    band = metrics.threshold_band(y_val, probabilities, config.train.threshold_method, config.train.threshold_target,
                                  groups=data.rows("val")["patient_id"].to_numpy(), seed=config.eval.seed)
    summary = {"best_epoch": best["epoch"], "epochs_run": len(history), "stopped_early": stopper.should_stop,
               "threshold": threshold, "threshold_method": config.train.threshold_method,
               "val_metrics_at_threshold": metrics.json_safe(val_metrics), "data_fingerprint": fingerprint,
               "device": str(hardware.device), "autocast": str(hardware.amp_dtype),
               "images": {split: describe_classes(data.rows(split)) for split in ("train", "val", "test")},
               "excluded_images": len(data.excluded)}
    write_summary(run_dir, summary)
    _save_model(run_dir / "model.pt", model, config, data, fingerprint, epoch=best["epoch"], threshold=threshold,
                threshold_method=config.train.threshold_method, threshold_band=metrics.json_safe(list(band)),
                val_metrics=metrics.json_safe(val_metrics), numeric_precision=hardware.precision,
                val_loss=val_row["loss"],
                val_reference=build_reference(probabilities, data.rows("val")["path"].tolist(),
                                              source=f"validation split at training time ({run_dir.name})"))
    (run_dir / "best.pt").unlink()  # only once model.pt holds the best epoch: a run stopped before still has it
    return FitResult(run_dir, best["epoch"], threshold, history, stopper.should_stop)
