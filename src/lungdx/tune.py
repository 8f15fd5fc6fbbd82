"""Hyperparameter search with Optuna: grid, random and Bayesian (TPE), resumable and shareable.

A study lives in an Optuna storage: SQLite in the output folder by default, or a PostgreSQL or
MySQL URL that workers on several machines share. Each trial is one ``fit`` (or one per fold,
cross-validated on the train + validation part) in ``OUT/trials/NNNN``, scored on validation;
the test split is never used. Rerunning the same search continues its study: only the missing
trials run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import socket
import sqlite3
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from lungdx.config import ConfigError, RunConfig, apply_overrides, to_dict
from lungdx.data.split import kfold_patients
from lungdx.io.files import write_atomic
from lungdx.train import SPLIT_COLUMNS, FitResult, fit, prepare_data

try:
    import optuna
    from optuna.trial import TrialState
except ImportError as err:  # an optional extra: keep the message actionable
    raise ImportError("lungdx.tune needs Optuna: pip install 'lungdx[tune]' (or pip install optuna)") from err

logger = logging.getLogger(__name__)

METHODS = ("grid", "random", "bayes")
OBJECTIVES = {"val_loss": "minimize", "val_auc": "maximize"}
# The paper's grid: learning rate x batch size x dropout (dropout is a paper_cnn argument).
PAPER_GRID = {"train.lr": [1e-2, 1e-3, 1e-4], "train.batch_size": [32, 64, 128], "model.kwargs.dropout": [0.3, 0.5, 0.7]}
DEFAULT_TRIALS = 20  # random and bayes; a grid defaults to its size
# With k folds a trial reports (fold, epoch) as step fold * FOLD_STEPS + epoch, so the pruner
# compares a trial with the others at the same fold and epoch.
FOLD_STEPS = 10_000
# Optuna's documented remedies for concurrent workers: a lock timeout for SQLite, heartbeats so a
# killed worker's trial is failed and retried by the next worker that asks for a trial.
SQLITE_TIMEOUT_S = 120
HEARTBEAT_S = 30
GRACE_S = 120
DONE = (TrialState.COMPLETE, TrialState.PRUNED)
WORKER = f"{socket.gethostname()}:{os.getpid()}"
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


@dataclass(frozen=True)
class Param:
    """One searched config field (by dotted key): a list of choices, or an int or float range."""

    key: str
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    integer: bool = False

    def grid_values(self) -> list:
        """The values a grid visits: the choices, or the range walked by ``step``."""
        if self.choices:
            return [_encode(choice) for choice in self.choices]
        if self.step is None or self.log:
            raise ConfigError(f"search space '{self.key}': a grid needs a list of values or a range with a step (no log)")
        count = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        values = [self.low + index * self.step for index in range(count)]
        return [int(value) for value in values] if self.integer else [round(value, 12) for value in values]

    def suggest(self, trial: optuna.Trial, grid: bool) -> Any:
        """Ask the trial for a value (choices that are lists or mappings travel as YAML text)."""
        if grid or self.choices:
            return self.decode(trial.suggest_categorical(self.key, self.grid_values()))
        if self.integer:
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, float(self.low), float(self.high), step=self.step, log=self.log)

    def decode(self, value: Any) -> Any:
        for choice in self.choices:
            if isinstance(choice, (list, dict)) and _encode(choice) == value:
                return choice
        return value

    def override(self, value: Any) -> str:
        """``key=value`` for ``apply_overrides`` (JSON is valid YAML, so lists and strings survive)."""
        return f"{self.key}={json.dumps(value)}"


@dataclass(frozen=True)
class TuneSettings:
    """How to search.

    Attributes:
        method: ``grid`` (GridSampler), ``random`` (RandomSampler) or ``bayes`` (TPESampler).
        n_trials: finished (complete or pruned) trials the study should hold in all, counting
            every worker's; None is the grid's size, or 20 for random and bayes.
        objective: ``val_loss`` (minimised) or ``val_auc`` (maximised), taken at the epoch ``fit``
            keeps (the best by validation loss), so it describes the model a retrain gives; for ``nodule_net``,
            the detector stage's (the nodule map's focal loss and presence AUC at its kept epoch).
        cv_folds: 0 scores on the validation split; k >= 2 scores the mean over k patient-level
            folds of the train + validation part (test rows stay out).
        prune: report every epoch and stop hopeless trials (MedianPruner).
        storage: an Optuna storage URL; None is ``sqlite:///OUT/study.db``.
        study_name: None derives one from the search (same search, same study).
        seed: seed of the samplers (a grid's visiting order, random and TPE draws).
        worker_trials: most trials this process runs (None: until the study is done).
    """

    method: str = "grid"
    n_trials: int | None = None
    objective: str = "val_loss"
    cv_folds: int = 0
    prune: bool = True
    storage: str | None = None
    study_name: str | None = None
    seed: int = 0
    worker_trials: int | None = None


@dataclass
class TuneResult:
    """What ``tune`` left in the output folder, and the study's best trial (None when none completed)."""

    out_dir: Path
    study_name: str
    storage: str
    counts: dict[str, int]
    best_number: int | None
    best_value: float | None
    best_params: dict[str, Any]
    files: dict[str, Path]


def load_space(path: str | Path) -> list[Param]:
    """Read a YAML search space: ``dotted.key: [choices]`` or ``dotted.key: {low, high, step, log, type}``."""
    try:
        values = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read the search space: {err}") from err
    if not isinstance(values, dict) or not values:
        raise ConfigError(f"{path}: a search space is a mapping of dotted config keys to choices or ranges")
    return [parse_param(str(key), spec) for key, spec in values.items()]


def parse_param(key: str, spec: Any) -> Param:
    """One search-space entry: a list of choices, ``{choices: [...]}`` or ``{low, high, step, log, type}``."""
    if isinstance(spec, dict) and "choices" in spec:
        spec = spec["choices"]
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"search space '{key}': empty list of choices")
        return Param(key, choices=tuple(_number(value) for value in spec))
    if not isinstance(spec, dict):
        raise ConfigError(f"search space '{key}': expected a list of choices or a range mapping, got {spec!r}")
    unknown = set(spec) - {"low", "high", "step", "log", "type"}
    if unknown:
        raise ConfigError(f"search space '{key}': unknown range keys {sorted(unknown)} (use low, high, step, log, type)")
    low, high, step = (_number(spec.get(name)) for name in ("low", "high", "step"))
    if not all(isinstance(value, (int, float)) for value in (low, high)) or not low < high:
        raise ConfigError(f"search space '{key}': a range needs numbers low < high, got low={low!r} high={high!r}")
    kind = spec.get("type", "int" if all(isinstance(v, int) for v in (low, high, step or 1)) else "float")
    if kind not in ("int", "float"):
        raise ConfigError(f"search space '{key}': type must be int or float, got {kind!r}")
    if spec.get("log") and step is not None:
        raise ConfigError(f"search space '{key}': a log range takes no step")
    return Param(key, low=low, high=high, step=step, log=bool(spec.get("log", False)), integer=kind == "int")


def paper_space(config: RunConfig) -> list[Param]:
    """The paper's 3 x 3 x 3 grid; dropout only where the model is paper_cnn (other models name it differently)."""
    space = [Param(key, choices=tuple(values)) for key, values in PAPER_GRID.items()]
    if config.model.name != "paper_cnn":
        logger.warning("the paper's grid searches paper_cnn's dropout; %s gets learning rate x batch size only "
                       "(give a search space to search its own arguments)", config.model.name)
        space = [param for param in space if param.key != "model.kwargs.dropout"]
    return space


def check_space(config: RunConfig, space: list[Param], method: str) -> None:
    """Raise ConfigError for an unknown key, a duplicate, or a range a grid cannot walk."""
    keys = [param.key for param in space]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"search space names a key twice: {keys}")
    example = [param.override(param.decode(param.grid_values()[0]) if param.choices else param.low) for param in space]
    apply_overrides(config, example)
    if method == "grid":
        for param in space:
            param.grid_values()


def study_name(config: RunConfig, space: list[Param], settings: TuneSettings) -> str:
    """A name fixed by what is searched and how: rerunning the same search finds the same study.

    The data location, cache folder and device are left out, so that workers whose data live
    in different folders share one study.
    """
    values = to_dict(config)
    for section, key in (("data", "path"), ("data", "cache_dir"), ("train", "device")):
        values[section].pop(key, None)
    search = {"config": values, "space": [dataclasses.asdict(param) for param in space], "method": settings.method,
              "objective": settings.objective, "cv_folds": settings.cv_folds, "seed": settings.seed}
    digest = hashlib.blake2b(json.dumps(search, sort_keys=True, default=str).encode(), digest_size=5).hexdigest()
    return f"lungdx-{settings.method}-{settings.objective}-{digest}"


def tune(config: RunConfig, out_dir: str | Path, settings: TuneSettings = TuneSettings(), *,
         space: list[Param] | None = None, pruner: optuna.pruners.BasePruner | None = None,
         progress: bool = False) -> TuneResult:
    """Run (or continue) a study and write its trials table, ``best.yaml`` and plots to ``out_dir``.

    Args:
        config: the base configuration every trial starts from.
        out_dir: output folder; trials run in ``out_dir/trials/NNNN``.
        settings: method, budget, objective, storage.
        space: searched fields; None is the paper's grid (``paper_space``).
        pruner: an Optuna pruner replacing the default (MedianPruner, or none when not ``settings.prune``).
        progress: a progress bar over trials on stderr.
    """
    _check_settings(settings)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    space = space if space is not None else paper_space(config)
    check_space(config, space, settings.method)
    storage_url = settings.storage or f"sqlite:///{out_dir.resolve() / 'study.db'}"
    name = settings.study_name or study_name(config, space, settings)
    _claim_out_dir(out_dir, name, storage_url)
    folds = write_folds(config, out_dir / "folds", settings.cv_folds) if settings.cv_folds else []
    study = _open_study(storage_url, name, space, settings, pruner)
    target = _target(space, settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    if settings.method == "grid":
        _requeue_failed(study)
    remaining = _remaining(study, target, settings.method == "grid")
    n_trials = max(0, min(remaining, settings.worker_trials if settings.worker_trials is not None else remaining))
    logger.info("study %s: %d of %d trials to go, %d to run here", name, max(remaining, 0), target, n_trials)
    outputs = _Outputs(out_dir, config, space, settings.objective)
    bar = _Progress(target, progress)
    try:
        if n_trials:
            objective = _Objective(config, space, out_dir, settings, folds)
            callbacks = [_stop_when_done(target, settings.method == "grid"), bar, outputs]
            # A RuntimeError (a diverged fit, out of memory) fails that trial only; anything else stops the study.
            study.optimize(objective, n_trials=n_trials, callbacks=callbacks, catch=(RuntimeError,))
    finally:
        bar.close()
    return outputs.write(study, plots=True, storage_url=storage_url)


def _check_settings(settings: TuneSettings) -> None:
    if settings.method not in METHODS:
        raise ValueError(f"unknown search method {settings.method!r} (use one of {', '.join(METHODS)})")
    if settings.objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {settings.objective!r} (use one of {', '.join(OBJECTIVES)})")
    if settings.cv_folds == 1 or settings.cv_folds < 0:
        raise ValueError(f"cv_folds must be 0 (no cross-validation) or at least 2, got {settings.cv_folds}")
    for name in ("n_trials", "worker_trials"):
        value = getattr(settings, name)
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")


def _target(space: list[Param], settings: TuneSettings) -> int:
    if settings.method != "grid":
        return settings.n_trials or DEFAULT_TRIALS
    size = math.prod(len(param.grid_values()) for param in space)
    if settings.n_trials is not None and settings.n_trials > size:
        logger.warning("the grid has %d points; %d trials would repeat some, so %d run", size, settings.n_trials, size)
    return min(settings.n_trials or size, size)


def _claim_out_dir(out_dir: Path, name: str, storage_url: str) -> None:
    """Record which study ``out_dir`` holds; refuse another (its trial numbers would collide in ``trials/``)."""
    record = {"study_name": name, "storage": _masked(storage_url)}
    path = out_dir / "study.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if {key: saved.get(key) for key in record} != record:
            raise ValueError(f"{out_dir} holds study {saved.get('study_name')!r} in {saved.get('storage')}, not "
                             f"{name!r} in {record['storage']}: a changed search is a new study; use a new --out "
                             "(or the same settings, or --study-name, to continue that one)")
        return
    write_atomic(path, json.dumps(record, indent=2))


def _masked(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def open_storage(url: str, attempts: int = 5) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats; SQLite in WAL mode and waiting for locks rather than failing.

    Opening is retried: two workers starting together can race to create the same tables.
    """
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:"):
        _sqlite_wal(url)
        engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
    else:  # a server restart or a cut idle connection during a long study: reconnect instead of failing a trial
        engine_kwargs = {"pool_pre_ping": True}
    from sqlalchemy.exc import SQLAlchemyError

    for attempt in range(1, attempts + 1):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3))
        except (SQLAlchemyError, optuna.exceptions.StorageInternalError) as err:
            if attempt == attempts:
                raise
            logger.info("opening %s failed (%s); retrying", _masked(url), err)
            time.sleep(0.5 * attempt)
    raise AssertionError("unreachable")


def _sqlite_wal(url: str) -> None:
    # WAL lets readers go on while one worker writes: fewer "database is locked" waits. It is
    # persistent in the file; it needs a local disk (not NFS), as SQLite itself does for locking.
    from sqlalchemy.engine import make_url

    database = make_url(url).database
    if not database or database == ":memory:":
        return
    Path(database).parent.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(database, timeout=SQLITE_TIMEOUT_S)) as connection:
        connection.execute("PRAGMA journal_mode=WAL")


def _open_study(storage_url: str, name: str, space: list[Param], settings: TuneSettings,
                pruner: optuna.pruners.BasePruner | None) -> optuna.Study:
    if pruner is None:
        pruner = optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=3) if settings.prune \
            else optuna.pruners.NopPruner()
    study = optuna.create_study(storage=open_storage(storage_url), study_name=name, sampler=_sampler(space, settings),
                                pruner=pruner, direction=OBJECTIVES[settings.objective], load_if_exists=True)
    if study.direction.name.lower() != OBJECTIVES[settings.objective]:
        raise ValueError(f"study {name!r} was made to {study.direction.name.lower()}, not to "
                         f"{OBJECTIVES[settings.objective]} {settings.objective}")
    return study


def _sampler(space: list[Param], settings: TuneSettings) -> optuna.samplers.BaseSampler:
    if settings.method == "grid":
        # The seed shuffles the visiting order; every worker must share it (grid ids index the shuffled grid).
        return optuna.samplers.GridSampler({param.key: param.grid_values() for param in space}, seed=settings.seed)
    if settings.method == "random":
        return _TrialSeeded(lambda seed: optuna.samplers.RandomSampler(seed=seed), settings.seed)
    return _TrialSeeded(lambda seed: optuna.samplers.TPESampler(seed=seed), settings.seed)


class _TrialSeeded(optuna.samplers.BaseSampler):
    """A fresh sampler per trial, seeded by (seed, trial number).

    One seeded sampler per process would draw the same points again in a resumed study and in
    two workers started together; trial numbers are unique in a study, so these draws are not.
    """

    def __init__(self, make: Callable[[int], optuna.samplers.BaseSampler], seed: int):
        self._make, self._seed, self._samplers = make, seed, {}

    def _for(self, trial) -> optuna.samplers.BaseSampler:
        if trial.number not in self._samplers:
            self._samplers[trial.number] = self._make(self._seed * 1_000_003 + trial.number)
        return self._samplers[trial.number]

    def infer_relative_search_space(self, study, trial):
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self._for(trial).before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self._for(trial).after_trial(study, trial, state, values)
        self._samplers.pop(trial.number, None)


def _requeue_failed(study: optuna.Study) -> None:
    """Queue a grid point again when its only trials failed (an interrupted run, a crash)."""
    trials = study.get_trials(deepcopy=True)  # the retry callback appends to a trial's retry history
    covered = {t.system_attrs.get("grid_id") for t in trials if t.state != TrialState.FAIL}
    retried = {number for t in trials for number in t.system_attrs.get("retry_history", [])}
    for trial in trials:
        grid_id = trial.system_attrs.get("grid_id")
        if trial.state == TrialState.FAIL and grid_id is not None and grid_id not in covered and trial.number not in retried:
            logger.info("trial %d failed; its grid point runs again", trial.number)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.RetryHeartbeatStaleTrialCallback()(study, trial)
            covered.add(grid_id)


def _remaining(study: optuna.Study, target: int, grid: bool) -> int:
    """Trials still to start: the target less those finished or running (in any worker)."""
    trials = [t for t in study.get_trials(deepcopy=False) if t.state in (*DONE, TrialState.RUNNING)]
    if grid:
        return target - len({t.system_attrs.get("grid_id") for t in trials})
    return target - len(trials)


def _stop_when_done(target: int, grid: bool) -> Callable:
    def callback(study: optuna.Study, trial) -> None:
        if _remaining(study, target, grid) <= 0:
            study.stop()
    return callback


class _Objective:
    """One trial: apply the sampled values, fit (per fold), report every epoch, return the score."""

    def __init__(self, config: RunConfig, space: list[Param], out_dir: Path, settings: TuneSettings, folds: list[Path]):
        self.config, self.space, self.out_dir, self.settings, self.folds = config, space, out_dir, settings, folds

    def __call__(self, trial: optuna.Trial) -> float:
        grid = self.settings.method == "grid"
        values = {param.key: param.suggest(trial, grid) for param in self.space}
        config = apply_overrides(self.config, [param.override(values[param.key]) for param in self.space])
        run_dir = self.out_dir / "trials" / f"{trial.number:04d}"
        if run_dir.exists():
            raise FileExistsError(f"{run_dir} exists but the study has no record of it (was its storage removed?); "
                                  "use a new output folder")
        trial.set_user_attr("worker", WORKER)
        trial.set_user_attr("run_dir", str(run_dir))
        logger.info("trial %d: %s", trial.number, ", ".join(f"{key}={value}" for key, value in values.items()))
        scores = []
        for fold, split_file in enumerate(self.folds or [None]):
            fold_config, fold_dir = config, run_dir
            if split_file is not None:
                fold_config = replace(config, data=replace(config.data, split_file=str(split_file)))
                fold_dir = run_dir / f"fold{fold}"
            try:
                result = fit(fold_config, fold_dir, on_epoch=self._reporter(trial, fold * FOLD_STEPS))
            except RuntimeError as err:
                trial.set_user_attr("error", str(err))
                raise
            scores.append(objective_value(result, self.settings.objective))
        if len(scores) > 1:
            trial.set_user_attr("fold_values", scores)
        return float(np.mean(scores))

    def _reporter(self, trial: optuna.Trial, offset: int) -> Callable[[dict], None]:
        key = self.settings.objective

        def on_epoch(row: dict) -> None:
            if row.get("stage", SCORED_STAGE) != SCORED_STAGE:  # nodule_net's other stages count their epochs anew
                return
            trial.report(row[key], offset + row["epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {row['epoch']}: {key} {row[key]:.4f}")
        return on_epoch


SCORED_STAGE = "detector"
"""The stage a staged model (``nodule_net``: lungs, detector, verifier, judge, each counting epochs from 1) is tuned
on: its ``best_epoch`` is the detector's, and the detector's rows carry the presence map's validation loss and AUC."""


def objective_value(result: FitResult, objective: str) -> float:
    """The objective at the epoch ``fit`` kept (the best by validation loss; a staged model's detector epoch)."""
    row = next(row for row in result.history
               if row.get("stage", SCORED_STAGE) == SCORED_STAGE and row["epoch"] == result.best_epoch)
    return float(row[objective])


def write_folds(config: RunConfig, folder: Path, n_folds: int) -> list[Path]:
    """k split files over the train + validation patients (one fold as ``val`` each); test rows stay ``test``.

    The patient-level split of ``config`` decides the test rows, exactly as in ``fit``.
    """
    frame = prepare_data(config).frame
    development = kfold_patients(frame[frame["split"] != "test"], n_folds, seed=config.data.split_seed)
    test = frame[frame["split"] == "test"]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for fold in range(n_folds):
        rows = development.assign(split=np.where(development["fold"] == fold, "val", "train"))
        path = folder / f"fold{fold}.csv"
        write_atomic(path, pd.concat([rows[SPLIT_COLUMNS], test[SPLIT_COLUMNS]]).to_csv(index=False))
        paths.append(path)
    return paths


class _Progress:
    """A tqdm bar over the study's finished trials (every worker's), with the best value so far."""

    def __init__(self, target: int, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=target, desc="trials", unit="trial", disable=not enabled)

    def __call__(self, study: optuna.Study, trial) -> None:
        trials = study.get_trials(deepcopy=False, states=DONE)
        self.bar.n = min(len(trials), self.bar.total)
        best = [t.value for t in trials if t.state == TrialState.COMPLETE]
        if best:
            pick = min if study.direction == optuna.study.StudyDirection.MINIMIZE else max
            self.bar.set_postfix(best=f"{pick(best):.4f}", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


class _Outputs:
    """Trials table (CSV, Markdown) and ``best.yaml`` after every trial; plots at the end."""

    def __init__(self, out_dir: Path, config: RunConfig, space: list[Param], objective: str):
        self.out_dir, self.config, self.space, self.objective = out_dir, config, space, objective

    def __call__(self, study: optuna.Study, trial) -> None:
        self.write(study, plots=False)

    def write(self, study: optuna.Study, *, plots: bool, storage_url: str = "") -> TuneResult:
        table = trials_table(study, self.objective)
        files = {"trials_csv": self.out_dir / "trials.csv", "trials_md": self.out_dir / "trials.md"}
        write_atomic(files["trials_csv"], table.to_csv(index=False))
        importances = param_importances(study) if plots else {}
        write_atomic(files["trials_md"], trials_markdown(study, table, self.objective, importances))
        best = _best_trial(study)
        params = {}
        if best is not None:
            params = {param.key: param.decode(best.params[param.key]) for param in self.space if param.key in best.params}
            files["best_yaml"] = self.out_dir / "best.yaml"
            self._write_best(study, best, params, files["best_yaml"])
        if plots:
            files.update(plot_study(study, importances, self.out_dir, self.objective))
        counts = {state.name.lower(): int((table["state"] == state.name).sum()) for state in TrialState}
        return TuneResult(self.out_dir, study.study_name, _masked(storage_url) if storage_url else "", counts,
                          best.number if best else None, best.value if best else None, params, files)

    def _write_best(self, study: optuna.Study, best, params: dict[str, Any], path: Path) -> None:
        config = apply_overrides(self.config, [param.override(params[param.key]) for param in self.space
                                               if param.key in params])
        header = (f"# Best trial of study {study.study_name!r}: trial {best.number}, {self.objective} {best.value:.6g}\n"
                  f"# searched: {', '.join(f'{key}={value}' for key, value in params.items())}\n"
                  f"# retrain, then test once: lungdx train --config {path} --out RUN --evaluate\n")
        write_atomic(path, header + yaml.safe_dump(to_dict(config), sort_keys=False))


def _best_trial(study: optuna.Study):
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if math.isfinite(t.value)]
    if not complete:
        return None
    return (min if study.direction == optuna.study.StudyDirection.MINIMIZE else max)(complete, key=lambda t: t.value)


def trials_table(study: optuna.Study, objective: str) -> pd.DataFrame:
    """One row per trial: number, state, the searched values, the objective, epochs, seconds, worker, note."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        duration = trial.duration.total_seconds() if trial.duration is not None else None
        note = trial.user_attrs.get("error", "")
        if trial.state == TrialState.PRUNED:
            note = "pruned; value of its last epoch"
        if "retry_history" in trial.system_attrs:
            note = f"retry of trial {trial.system_attrs['retry_history'][0]}" + (f"; {note}" if note else "")
        rows.append({"number": trial.number, "state": trial.state.name, **trial.params, objective: trial.value,
                     "epochs": len(trial.intermediate_values), "seconds": round(duration, 1) if duration else None,
                     "worker": trial.user_attrs.get("worker", ""), "note": note})
    return pd.DataFrame(rows, columns=None if rows else ["number", "state", objective, "epochs", "seconds", "worker", "note"])


def trials_markdown(study: optuna.Study, table: pd.DataFrame, objective: str, importances: dict[str, float]) -> str:
    """The trials table as Markdown, the best trial first, then parameter importances when known."""
    best = _best_trial(study)
    lines = [f"# Study {study.study_name}", ""]
    if best is not None:
        searched = ", ".join(f"{key}={value}" for key, value in best.params.items())
        lines += [f"Best: trial {best.number}, {objective} {best.value:.4f} ({searched}).", ""]
    else:
        lines += ["No trial has completed yet.", ""]
    columns = list(table.columns)
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in table.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(value) for value in row) + " |")
    if importances:
        lines += ["", "Parameter importances (fANOVA over completed trials):", "", "| Parameter | Importance |", "|---|---|"]
        lines += [f"| {key} | {value:.3f} |" for key, value in importances.items()]
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def param_importances(study: optuna.Study) -> dict[str, float]:
    """fANOVA importances (seeded); empty when there are too few completed trials or nothing varied."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    varied = [key for key in (complete[0].params if complete else {})
              if len({json.dumps(t.params.get(key), default=str) for t in complete}) > 1]
    if len(complete) < 2 or not varied:
        return {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
            return dict(optuna.importance.get_param_importances(study, evaluator=evaluator, params=varied))
    except (ValueError, RuntimeError, ZeroDivisionError) as err:
        logger.info("parameter importances not computed: %s", err)
        return {}


def plot_study(study: optuna.Study, importances: dict[str, float], out_dir: Path, objective: str = "value") -> dict[str, Path]:
    """``history.png`` (objective by trial, best so far) and ``importances.png`` (when importances are known)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        files["history_png"] = out_dir / "history.png"
        # Optuna's plot switches the global style to ggplot; the context puts it back afterwards.
        with warnings.catch_warnings(), plt.style.context("default"):
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            axes = optuna.visualization.matplotlib.plot_optimization_history(study, target_name=objective)
            axes.figure.tight_layout()
            axes.figure.savefig(files["history_png"], dpi=120)
            plt.close(axes.figure)
    if importances:
        figure, axes = plt.subplots(figsize=(5, 1.6 + 0.4 * len(importances)), dpi=120)
        names = list(importances)[::-1]
        axes.barh(names, [importances[name] for name in names], color="tab:blue")
        axes.set(xlabel="importance (fANOVA)", title="Parameter importances", xlim=(0, 1))
        figure.tight_layout()
        files["importances_png"] = out_dir / "importances.png"
        figure.savefig(files["importances_png"])
        plt.close(figure)
    return files


def _encode(value: Any) -> Any:
    # Optuna stores None, bool, int, float and str; a list or mapping travels as its YAML text.
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True).strip()
    return value


def _number(value: Any) -> Any:
    # YAML 1.1 reads '1e-4' (no dot) as a string.
    if isinstance(value, str) and _NUMBER.match(value):
        return float(value)
    return value
