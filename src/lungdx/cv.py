"""Patient-level (repeated) stratified k-fold cross-validation around ``fit``.

Each fold holds out one fold of patients as its test set. The validation split that decides early
stopping and the operating threshold is drawn from the training folds only, so no fold's test
patients influence its model. Every fold is an ordinary run folder (config, split, history,
``model.pt``, ``evaluation/``), so an interrupted CV resumes where it stopped.

Reported as the literature does: test metrics per fold, their mean and standard deviation, and the
pooled out-of-fold ROC and AUC with a patient-level bootstrap CI.

Several workers (processes or machines, each possibly a torchrun job) may share one CV folder: a
worker claims a fold (``claims/``) before it trains it, so each fold is trained once; see ``Claims``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from lungdx import distributed, metrics
from lungdx.claims import STALE_AFTER_S, ClaimLost, Claims, publish
from lungdx.config import ConfigError, RunConfig, from_dict, load_config, to_dict
from lungdx.data.split import check_leakage, kfold_patients, split_train_val
from lungdx.evaluate import PAPER_CLAIMS, evaluate_run, format_number
from lungdx.subgroups import Stratifier, parse_by, subgroup_markdown, subgroup_metrics
from lungdx.train import discard_stopped_model, fit, prepare_data, stopped_while_finishing

logger = logging.getLogger(__name__)

FOLD_METRICS = ("accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc")


@dataclass(frozen=True)
class CVPlan:
    """How the CV is cut: number of folds and repeats, and the seed of the fold assignment."""

    folds: int = 10
    repeats: int = 1
    seed: int = 0


def plan_folds(frame: pd.DataFrame, plan: CVPlan) -> pd.DataFrame:
    """One row per (image, repeat) with its ``fold``; each repeat re-draws the folds with a new seed."""
    if plan.folds < 2 or plan.repeats < 1:
        raise ValueError(f"cross-validation needs folds >= 2 and repeats >= 1, got {plan.folds} and {plan.repeats}")
    n_patients = frame["patient_id"].nunique()
    if plan.folds > n_patients:
        raise ValueError(f"{plan.folds} folds but only {n_patients} patients")
    columns = ["case_id", "patient_id", "path", "target"]
    repeats = [kfold_patients(frame[columns], plan.folds, plan.seed + repeat).assign(repeat=repeat)
               for repeat in range(plan.repeats)]
    return pd.concat(repeats, ignore_index=True)


def fold_split(plan_rows: pd.DataFrame, fold: int, val_fraction: float, seed: int) -> pd.DataFrame:
    """train / val / test for one fold of one repeat: the fold is test; val comes from the other folds."""
    test = plan_rows[plan_rows["fold"] == fold].assign(split="test")
    rest = split_train_val(plan_rows[plan_rows["fold"] != fold], val_fraction, seed)
    split = pd.concat([rest, test], ignore_index=True)
    check_leakage(split)
    return split[["case_id", "patient_id", "path", "target", "split"]]


def fold_name(repeat: int, fold: int) -> str:
    return f"r{repeat}-f{fold:02d}"


def cross_validate(config: RunConfig, out_dir: str | Path, plan: CVPlan = CVPlan(), *, device: str = "auto",
                   progress: bool = False, by: tuple[str, ...] = (),
                   stale_after_s: float = STALE_AFTER_S) -> dict | None:
    """Train and evaluate one run per fold (resuming finished or interrupted folds), then summarise.

    Safe to run as several workers on one ``out_dir`` at once: each claims a fold before training it
    and skips folds other live workers hold; a worker that finds no fold left to claim returns. The
    summary is written by the worker that finishes the last fold (or by a rerun on a finished CV).

    Args:
        config: the run configuration every fold uses (its ``data.split`` fractions set the
            share of the training folds used for validation).
        out_dir: the CV folder: ``plan.yaml``, ``folds.csv``, ``splits/``, ``claims/``, ``runs/<fold>/``
            and the summary (``cv.json``, ``cv.md``, ``oof_predictions.csv``, ``roc_pooled.png``).
        plan: folds, repeats and seed.
        by: subgroup specifications (``subtlety``, ``size_mm:0,10,20,30,60``) for pooled out-of-fold
            metrics per stratum.
        stale_after_s: how old a claim's heartbeat must be before another worker takes its fold over.

    Returns:
        The summary (also written to ``cv.json``); None when this worker leaves the summary to
        another: folds are still held by other workers, or another worker has just written it.
    """
    out_dir = Path(out_dir)
    stratifiers = [parse_by(spec) for spec in by]  # a typo fails here, not after hours of training
    distributed.run_on_main(_check_plan_file, out_dir, config, plan)
    data = prepare_data(config, progress=progress and distributed.is_main())
    plan_rows = plan_folds(data.frame, plan)
    distributed.run_on_main(_write_plan, out_dir, plan_rows)
    units = {fold_name(r, f): (r, f) for r in range(plan.repeats) for f in range(plan.folds)}
    claims = Claims(out_dir / "claims", stale_after_s)  # claimed on rank 0; the other ranks follow
    finished_at_start = not distributed.run_on_main(_unfinished, claims, out_dir, units)
    while (name := distributed.run_on_main(_claim_next, claims, out_dir, units)) is not None:
        repeat, fold = units[name]
        logger.info("fold %s (%d of %d), worker %s", name, repeat * plan.folds + fold + 1, len(units), claims.worker)
        try:
            _train_fold(config, out_dir, plan_rows[plan_rows["repeat"] == repeat], repeat, fold, claims, device, progress)
        except ClaimLost as err:
            logger.warning("%s", err)
        finally:
            claims.release(name)  # a no-op on the ranks that hold nothing
    left = distributed.run_on_main(_unfinished, claims, out_dir, units)
    if left:
        logger.info("%s: %d fold(s) in other workers' hands (%s); the worker that finishes the last writes the "
                    "summary, or rerun to take over a crashed worker's fold", out_dir, len(left), ", ".join(left))
        return None
    return distributed.run_on_main(_summarise_once, claims, out_dir, plan, config, list(units), force=finished_at_start,
                                   stratifiers=stratifiers, dataset=data.frame)


def _train_fold(config: RunConfig, out_dir: Path, rows: pd.DataFrame, repeat: int, fold: int, claims: Claims,
                device: str, progress: bool) -> None:
    train_fraction, val_fraction, _ = config.data.split
    name = fold_name(repeat, fold)
    split_path = out_dir / "splits" / f"{name}.csv"
    seed = config.data.split_seed + 1000 * repeat + fold
    split = fold_split(rows, fold, val_fraction / (train_fraction + val_fraction), seed)
    distributed.run_on_main(split.to_csv, split_path, index=False)
    fold_config = replace(config, data=replace(config.data, split_file=str(split_path)))

    def check_claim(_row: dict) -> None:  # a worker taken for dead stops at the end of an epoch
        distributed.run_on_main(claims.check, name)

    _run_fold(fold_config, out_dir / "runs" / name, device, progress, on_epoch=check_claim)


def _claim_next(claims: Claims, out_dir: Path, units: dict) -> str | None:
    """The first unfinished fold this worker could claim, now claimed; None when there is none."""
    for name in units:
        if _fold_step(out_dir / "runs" / name, clean=False) == "done" or not claims.acquire(name):
            continue
        if _fold_step(out_dir / "runs" / name, clean=False) != "done":  # another worker may have finished it meanwhile
            return name
        claims.release(name)
    return None


def _unfinished(claims: Claims, out_dir: Path, units: dict) -> list[str]:
    """Folds not yet evaluated, or held by a live worker (which may be writing their evaluation now)."""
    return [name for name in units
            if _fold_step(out_dir / "runs" / name, clean=False) != "done" or claims.holder(name) is not None]


def _summarise_once(claims: Claims, out_dir: Path, plan: CVPlan, config: RunConfig, names: list[str], *, force: bool,
                    stratifiers: list[Stratifier], dataset: pd.DataFrame) -> dict | None:
    """``summarise`` unless another worker is writing, or has written, the summary of these very folds.

    ``force`` (every fold was finished before this worker started: a rerun) writes it again.
    """
    claim = claims.acquire("summary")
    if claim is None:
        logger.info("%s: the summary is being written by worker %s", out_dir, claims.holder("summary"))
        return None
    record = {}
    try:
        inputs = _summary_inputs(out_dir, names, stratifiers)
        if not force and claim.previous.get("inputs") == inputs and (out_dir / "cv.json").is_file():
            logger.info("%s: the summary of these folds was written by worker %s", out_dir, claim.previous.get("worker"))
            results = None
        else:
            results = summarise(out_dir, plan, config, stratifiers=stratifiers, dataset=dataset)
        record = {"inputs": inputs}  # kept only once the summary of these inputs exists
        return results
    finally:
        claims.release("summary", **record)


def _summary_inputs(out_dir: Path, names: list[str], stratifiers: list[Stratifier]) -> str:
    """A digest of what the summary is made of: every fold's evaluation, and the subgroups asked for."""
    digest = hashlib.sha256(repr(stratifiers).encode())
    for name in names:
        for part in ("table1.json", "predictions.csv"):
            digest.update((out_dir / "runs" / name / "evaluation" / part).read_bytes())
    return digest.hexdigest()


def _write_plan(out_dir: Path, plan_rows: pd.DataFrame) -> None:
    path = out_dir / "folds.csv"
    if not publish(path, plan_rows.to_csv(index=False)):
        if not _fold_assignment(pd.read_csv(path, dtype={"case_id": str})).equals(_fold_assignment(plan_rows)):
            raise FileExistsError(f"{path}: assigns other folds than this data gives (has the dataset changed?); "
                                  "use a new --out")
    (out_dir / "splits").mkdir(exist_ok=True)


def _fold_assignment(plan_rows: pd.DataFrame) -> pd.DataFrame:
    rows = plan_rows[["repeat", "case_id", "fold"]].astype({"repeat": int, "case_id": str, "fold": int})
    return rows.sort_values(["repeat", "case_id"], ignore_index=True)


def _check_plan_file(out_dir: Path, config: RunConfig, plan: CVPlan) -> None:
    settings = {"folds": plan.folds, "repeats": plan.repeats, "seed": plan.seed, "config": to_dict(config)}
    path = out_dir / "plan.yaml"
    out_dir.mkdir(parents=True, exist_ok=True)
    if publish(path, yaml.safe_dump(settings, sort_keys=False)):
        return
    if not _same_plan(yaml.safe_load(path.read_text()), settings):
        raise FileExistsError(f"{out_dir}: holds a cross-validation with other settings (plan.yaml); "
                              "use a new --out, or the same settings to resume it")
    logger.info("%s: resuming the cross-validation (or joining its other workers)", out_dir)


def _same_plan(saved: dict, settings: dict) -> bool:
    # The saved config is read through today's defaults, so a config field added by a newer lungdx
    # (at its default) does not stop an older CV from resuming.
    try:
        saved_config = to_dict(from_dict(RunConfig, saved.get("config", {})))
    except ConfigError:
        return False
    same_plan = all(saved.get(key) == settings[key] for key in ("folds", "repeats", "seed"))
    return same_plan and saved_config == yaml.safe_load(yaml.safe_dump(settings["config"]))


def _run_fold(config: RunConfig, run_dir: Path, device: str, progress: bool, *, on_epoch=None) -> None:
    """Train (every rank, under torchrun) and evaluate (rank 0) one fold, or what is left of it."""
    step = distributed.run_on_main(_fold_step, run_dir)
    if step == "done":
        return
    if step in ("new", "resume"):
        fit(config, run_dir, resume=step == "resume", progress=progress, on_epoch=on_epoch)
    distributed.run_on_main(_evaluate_fold, run_dir, config, device)


def _evaluate_fold(run_dir: Path, config: RunConfig, device: str) -> None:
    evaluate_run(run_dir, config.eval, device=device)  # the tables stay on disk: nothing to send to the other ranks


def _fold_step(run_dir: Path, *, clean: bool = True) -> str:
    """What a fold still needs: ``done``, ``evaluate``, ``resume`` or ``new``.

    ``model.pt`` is the last file a run writes (``lungdx.train.write_summary``): with it the fold is trained,
    unless ``lungdx.train.stopped_while_finishing``.

    ``clean`` removes a folder stopped before its first epoch ended (only under the fold's claim).
    """
    if (run_dir / "evaluation" / "table1.json").is_file():
        return "done"
    if (run_dir / "model.pt").is_file() and not stopped_while_finishing(run_dir):
        return "evaluate"
    if (run_dir / "last.pt").is_file():
        if clean:
            discard_stopped_model(run_dir)
        return "resume"
    if clean and run_dir.exists():
        shutil.rmtree(run_dir)  # stopped before its first epoch ended: nothing worth keeping
    return "new"


def fold_states(out_dir: str | Path) -> pd.DataFrame:
    """Where each fold of a CV folder (``lungdx cv`` or ``lungdx ensemble``) stands, from its files alone.

    One row per fold: ``state`` (``evaluated``, ``trained`` but not yet evaluated, ``training`` under a live
    worker's claim, ``stopped`` and resumable from ``last.pt``, ``not started``), ``progress`` (the last epoch in
    ``history.csv``, with its stage for nodule_net and the stage's epoch budget), ``worker`` (the live claim's
    ``host:pid``) and ``updated`` (when the fold's files last changed). No metric is shown: a CV's figures are
    read from ``cv.md`` once it is written, and validation and test figures are never needed to follow progress.
    Reads only; nothing is claimed, removed or written.
    """
    out_dir = Path(out_dir)
    if not (out_dir / "folds.csv").is_file():
        raise FileNotFoundError(f"{out_dir}: not a CV folder (no folds.csv); give the --out of `lungdx cv` or `lungdx ensemble`")
    folds = pd.read_csv(out_dir / "folds.csv")[["repeat", "fold"]].drop_duplicates().sort_values(["repeat", "fold"])
    claims = Claims(out_dir / "claims")
    rows = []
    for repeat, fold in folds.itertuples(index=False):
        name = fold_name(int(repeat), int(fold))
        run_dir = out_dir / "runs" / name
        step = _fold_step(run_dir, clean=False)
        worker = claims.holder(name)  # reads claim files by name; a missing folder holds none
        state = {"done": "evaluated", "evaluate": "trained", "resume": "stopped", "new": "not started"}[step]
        if worker is not None and step != "done":
            state = "evaluating" if step == "evaluate" else "training"
        files = [path for path in run_dir.glob("*") if path.is_file()] if run_dir.is_dir() else []
        updated = max((path.stat().st_mtime for path in files), default=None)
        progress = "finished" if step in ("done", "evaluate") else _progress(run_dir)
        rows.append({"fold": name, "state": state, "progress": progress, "worker": worker or "",
                     "trained_s": _trained_seconds(run_dir, finished=step in ("done", "evaluate")),
                     "updated": "" if updated is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(updated))})
    return pd.DataFrame(rows, columns=["fold", "state", "progress", "worker", "trained_s", "updated"])


def _trained_seconds(run_dir: Path, *, finished: bool) -> float:
    """Seconds a fold has trained, summed over the sessions it ran in: a finished nodule_net run's ``train_seconds``
    (``summary.json``), a stopped or running one's count in its ``last.pt``, else the sum of ``history.csv``'s epoch
    seconds (the paper CNN's epochs time everything); NaN where none can be read."""
    try:
        if finished:
            summary = json.loads((run_dir / "summary.json").read_text())
            if "train_seconds" in summary:
                return float(summary["train_seconds"])
        elif (run_dir / "last.pt").is_file():
            import torch

            # mmap: only the pickled index and the one number are read, not the weights and optimizer state
            state = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True, mmap=True)
            if isinstance(state, dict) and "seconds" in state and "current" in state:  # nodule_train's last.pt
                return float(state["seconds"])
        return float(pd.read_csv(run_dir / "history.csv")["seconds"].sum())
    except Exception:  # a missing, half-written or foreign file: no figure rather than a failed status
        return float("nan")


def time_left(states: pd.DataFrame) -> dict | None:
    """An estimate of the training time a CV still needs, from ``fold_states``: each unfinished fold needs the
    mean ``trained_s`` of the finished folds, less what it has trained; the live workers (at least one) take the
    folds in turn, each running fold staying with its worker. None until a fold has finished. Evaluation time
    and early stopping are not foreseen, and folds on a faster or slower machine shift the mean."""
    done = states["progress"].eq("finished")
    per_fold = states.loc[done, "trained_s"].dropna()
    if per_fold.empty:
        return None
    mean = float(per_fold.mean())
    left = (mean - states["trained_s"].fillna(0.0)).clip(lower=0.0)
    running = states["state"].eq("training") & ~done
    loads = sorted(left[running].tolist()) or [0.0]
    for seconds in left[~done & ~running]:
        loads[0] += seconds
        loads.sort()
    return {"seconds": max(loads), "workers": max(int(running.sum()), 1), "fold_seconds": mean,
            "finished": len(per_fold)}


def _progress(run_dir: Path) -> str:
    """The last epoch in ``history.csv``: ``detector epoch 67 of 100`` (nodule_net) or ``epoch 12 of 50``."""
    try:
        last = pd.read_csv(run_dir / "history.csv").iloc[-1]
    except (OSError, ValueError, IndexError, pd.errors.EmptyDataError):
        return ""
    try:
        config = load_config(run_dir / "config.yaml")
    except (OSError, ValueError, ConfigError):
        config = None
    stage = last.get("stage")
    if isinstance(stage, str):
        budgets = {} if config is None else {"lungs": config.nodule.seg_epochs, "detector": config.nodule.det_epochs,
                                             "verifier": config.nodule.judge_epochs, "judge": config.nodule.judge_epochs}
        return f"{stage} epoch {int(last['epoch'])}" + (f" of {budgets[stage]}" if stage in budgets else "")
    return f"epoch {int(last['epoch'])}" + ("" if config is None else f" of {config.train.epochs}")


def summarise(out_dir: str | Path, plan: CVPlan, config: RunConfig, *, stratifiers: list[Stratifier] | None = None,
              dataset: pd.DataFrame | None = None) -> dict:
    """Per-fold test metrics, mean +/- SD across folds, pooled out-of-fold metrics; writes the files.

    ``dataset`` (the task's rows with their manifest columns) is needed for ``stratifiers``.
    """
    out_dir = Path(out_dir)
    fold_rows, predictions, synthetic = [], [], []
    for repeat in range(plan.repeats):
        for fold in range(plan.folds):
            run_dir = out_dir / "runs" / fold_name(repeat, fold)
            table = json.loads((run_dir / "evaluation" / "table1.json").read_text())
            summary = json.loads((run_dir / "summary.json").read_text())
            test = table["splits"]["test"]
            synthetic.append(bool(table.get("synthetic")))
            fold_rows.append({"repeat": repeat, "fold": fold, "threshold": table["threshold"],
                              "best_epoch": summary["best_epoch"], "n_test": test["counts"]["n"],
                              "n_test_pos": test["counts"]["n_pos"],
                              **{name: _none_to_nan(test[name]["value"]) for name in FOLD_METRICS}})
            fold_predictions = pd.read_csv(run_dir / "evaluation" / "predictions.csv", dtype={"case_id": str,
                                                                                            "patient_id": str})
            predictions.append(fold_predictions.assign(repeat=repeat, fold=fold, threshold=table["threshold"]))
    folds = pd.DataFrame(fold_rows)
    all_predictions = pd.concat(predictions, ignore_index=True)
    oof = all_predictions[all_predictions["split"] == "test"].reset_index(drop=True)
    results = {"task": config.data.task, "model": config.model.name, "image_size": config.preprocess.size,
               "folds": plan.folds, "repeats": plan.repeats, "seed": plan.seed,
               "n_bootstrap": config.eval.n_bootstrap, "confidence": config.eval.confidence,
               "per_fold": folds.to_dict(orient="records"), "mean_sd": _mean_sd(folds),
               "pooled": [_pooled(oof[oof["repeat"] == r], config) for r in range(plan.repeats)],
               "operating_points": _pooled_operating_points(all_predictions, plan),
               "synthetic": all(synthetic)}
    if stratifiers:
        results["subgroups"] = _oof_subgroups(oof, dataset, stratifiers, config)
    localisation = _oof_localisation(out_dir, plan, config, dataset)
    if localisation is not None:
        results["localisation"] = localisation
    _write_summary(out_dir, results, oof)
    return results


def _oof_localisation(out_dir: Path, plan: CVPlan, config: RunConfig, dataset: pd.DataFrame | None = None) -> dict | None:
    """A localising model's pooled out-of-fold localisation results (first repeat), or None for other models."""
    from lungdx.localisation import summarise_localisation

    paths = [out_dir / "runs" / fold_name(0, fold) / "nodule_outputs.csv" for fold in range(plan.folds)]
    if not all(path.is_file() for path in paths):
        return None
    outputs = pd.concat([pd.read_csv(path, dtype={"case_id": str, "patient_id": str}) for path in paths], ignore_index=True)
    outputs = outputs[outputs["split"] == "test"].reset_index(drop=True)
    if "blacked_lung_share" not in outputs and dataset is not None and "lung_mask" in dataset:
        outputs["blacked_lung_share"] = _blacked_lung_share(outputs, dataset, config)  # runs made before the column
    (out_dir / "oof_nodule_outputs.csv").write_text(outputs.to_csv(index=False))
    return summarise_localisation(outputs, config.preprocess.size, n_resamples=config.eval.n_bootstrap,
                                  confidence=config.eval.confidence, seed=config.eval.seed)


def _blacked_lung_share(outputs: pd.DataFrame, dataset: pd.DataFrame, config: RunConfig) -> np.ndarray:
    """What ``nodule_train.nodule_outputs`` records now, from the dataset's lung masks: the share of each
    image's lungs that the shortcut check's black-out covers."""
    from lungdx.data.nodules import localisation_targets
    from lungdx.nodule_train import blacked_lung_share

    rows = dataset.astype({"case_id": str}).drop_duplicates("case_id").set_index("case_id").loc[outputs["case_id"]]
    targets = localisation_targets(rows.reset_index(), config.preprocess)
    return np.where(targets.has_mask, blacked_lung_share(targets.lung_masks), np.nan)


def _none_to_nan(value) -> float:
    return float("nan") if value is None else float(value)


def _mean_sd(folds: pd.DataFrame) -> dict[str, dict]:
    return {name: {"mean": float(np.nanmean(folds[name])) if folds[name].notna().any() else float("nan"),
                   "sd": float(np.nanstd(folds[name], ddof=1)) if folds[name].notna().sum() > 1 else float("nan"),
                   "n_folds": int(folds[name].notna().sum())} for name in FOLD_METRICS}


def _pooled(oof: pd.DataFrame, config: RunConfig) -> dict:
    """Out-of-fold predictions of one repeat: every case predicted once, by the model that never saw it."""
    y_true, probability = oof["target"].to_numpy(), oof["probability"].to_numpy()
    groups = oof["patient_id"].to_numpy()
    labels = (probability >= oof["threshold"].to_numpy()).astype(float)  # each case at its own fold's threshold
    pooled = metrics.labelled_metrics_with_ci(y_true, probability, labels, groups=groups,
                                              n_resamples=config.eval.n_bootstrap, confidence=config.eval.confidence,
                                              seed=config.eval.seed)
    return {**pooled, "roc": metrics.roc_points(y_true, probability)}


def _oof_subgroups(oof: pd.DataFrame, dataset: pd.DataFrame, stratifiers: list[Stratifier], config: RunConfig) -> list:
    """Pooled out-of-fold metrics per stratum (first repeat), each case at its own fold's threshold."""
    first = oof[oof["repeat"] == 0]
    columns = [s.column for s in stratifiers if s.column in dataset.columns]
    frame = first.merge(dataset[["case_id", *columns]].drop_duplicates("case_id"), on="case_id", how="left")
    frame["decision"] = (frame["probability"] >= frame["threshold"]).astype(int)
    return subgroup_metrics(frame, stratifiers, n_resamples=config.eval.n_bootstrap, confidence=config.eval.confidence,
                            seed=config.eval.seed)


def _pooled_operating_points(predictions: pd.DataFrame, plan: CVPlan) -> list[dict]:
    """Each operating point chosen on every fold's validation split, applied to its test fold, pooled."""
    pooled: dict[str, list] = {}
    for (_, _), rows in predictions.groupby(["repeat", "fold"]):
        val, test = rows[rows["split"] == "val"], rows[rows["split"] == "test"]
        for point in metrics.operating_points(val["target"], val["probability"], test["target"], test["probability"]):
            labels = (test["probability"].to_numpy() >= point["threshold"]).astype(int)
            pooled.setdefault(point["point"], []).append((test["target"].to_numpy(), labels))
    rows = []
    for point, parts in pooled.items():
        y_true = np.concatenate([y for y, _ in parts])
        labels = np.concatenate([label for _, label in parts])
        point_metrics = metrics.binary_metrics(y_true, labels.astype(float), 0.5)
        rows.append({"point": point, "sensitivity": point_metrics["sensitivity"],
                     "specificity": point_metrics["specificity"], "precision": point_metrics["precision"],
                     "n": int(len(y_true)) // plan.repeats})
    return rows


def _write_summary(out_dir: Path, results: dict, oof: pd.DataFrame) -> None:
    from lungdx.plots import plot_roc

    (out_dir / "cv.json").write_text(json.dumps(metrics.json_safe(results), indent=2))
    (out_dir / "cv.md").write_text(cv_markdown(results))
    oof.to_csv(out_dir / "oof_predictions.csv", index=False)
    curves = {f"Pooled out-of-fold, repeat {r + 1}": pooled["roc"] for r, pooled in enumerate(results["pooled"])}
    plot_roc(curves, out_dir / "roc_pooled.png",
             title=f"{results['model']} - {results['task']}: {results['folds']}-fold CV")


def cv_markdown(results: dict) -> str:
    """Per-fold table, mean +/- SD, pooled out-of-fold metrics with CIs and operating points."""
    level = round(100 * results["confidence"])
    titles = {"accuracy": "Accuracy", "sensitivity": "Sensitivity", "specificity": "Specificity",
              "precision": "Precision", "f1": "F1", "roc_auc": "ROC AUC"}
    synthetic = " (SYNTHETIC phantoms: says nothing about real radiographs)" if results.get("synthetic") else ""
    lines = [f"# {results['folds']}-fold patient-level cross-validation: {results['model']} on {results['task']}{synthetic}",
             "",
             f"{results['repeats']} repeat(s), {results['image_size']} px. Each fold's threshold is chosen on a validation "
             "split drawn from its training folds (Youden's J) and frozen for its test fold.", "",
             "## Test metrics per fold", "",
             "| Repeat | Fold | Test images (pos) | Threshold | Best epoch | " + " | ".join(titles.values()) + " |",
             "|" + "---|" * (5 + len(titles))]
    for row in results["per_fold"]:
        cells = " | ".join(format_number(row[name]) for name in titles)
        lines.append(f"| {row['repeat'] + 1} | {row['fold'] + 1} | {row['n_test']} ({row['n_test_pos']}) | "
                     f"{row['threshold']:.4f} | {row['best_epoch']} | {cells} |")
    mean_sd = results["mean_sd"]
    lines.append("| **mean +/- SD** | | | | | " + " | ".join(
        f"**{format_number(mean_sd[n]['mean'])} +/- {format_number(mean_sd[n]['sd'])}**" for n in titles) + " |")
    lines += ["", f"## Pooled out-of-fold ({level}% CI, patient-level bootstrap, {results['n_bootstrap']} resamples)", "",
              "| Repeat | " + " | ".join(titles.values()) + " | Images (pos / neg) |", "|" + "---|" * (len(titles) + 2)]
    for repeat, pooled in enumerate(results["pooled"]):
        cells = " | ".join(metrics.format_ci(pooled[name]) for name in titles)
        counts = pooled["counts"]
        lines.append(f"| {repeat + 1} | {cells} | {counts['n']} ({counts['n_pos']} / {counts['n_neg']}) |")
    lines += ["", "Pooled thresholded metrics label each case at its own fold's threshold. The pooled AUC ranks "
              "probabilities from different fold models together, which slightly understates a single model's AUC "
              "when the folds' models are calibrated differently.", "",
              "## Operating points (chosen on each fold's validation split, applied to its test fold, pooled)", "",
              "| Operating point | Sensitivity | Specificity | Precision |", "|---|---|---|---|"]
    for row in results["operating_points"]:
        lines.append(f"| {row['point']} | {format_number(row['sensitivity'])} | {format_number(row['specificity'])} | "
                     f"{format_number(row['precision'])} |")
    if results.get("localisation"):
        from lungdx.localisation import localisation_markdown

        lines += ["", localisation_markdown(results["localisation"], results["confidence"])]
    if results.get("subgroups"):
        lines += ["", "## Pooled out-of-fold metrics by subgroup (first repeat)", "",
                  subgroup_markdown(results["subgroups"], results["confidence"])]
    lines += ["", f"Paper's claims (data not public, not a like-for-like comparison): accuracy "
              f"{PAPER_CLAIMS['accuracy']:.3f}, ROC AUC {PAPER_CLAIMS['roc_auc']:.3f}.", ""]
    return "\n".join(lines)
