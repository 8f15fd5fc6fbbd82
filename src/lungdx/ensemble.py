"""Assemble finished nodule_net runs into one ``nodule_ensemble`` run, or two or more CVs fold by fold.

``assemble_run`` takes run folders trained on the same rows (the same data fingerprint: every row's file,
target and split), reads their checkpoints as the members of a ``NoduleEnsemble``, chooses the operating
threshold on the shared validation split (as training does) and writes a run folder like any
other: ``model.pt`` (served by ``Predictor``, ``serve``, ``listen`` and ``pacs-run`` unchanged),
``config.yaml``, ``split.csv``, ``nodule_outputs.csv``, ``summary.json`` and the evaluation.

``assemble_cv`` does the same for every fold of CV folders that share their fold assignment
(``folds.csv``): fold k's ensemble reads only fold k's members, each of which never trained on fold
k's test patients, so the pooled out-of-fold figures stay out-of-fold. The result is a CV folder
(``cv.md``, ``cv.json``, ``oof_predictions.csv``, ``oof_nodule_outputs.csv``) that ``lungdx compare``
reads like any other. Both are resumable: a fold or run already evaluated is kept. Like ``lungdx cv``,
several workers may assemble one CV folder at once (the same command, run again): each claims a fold
(``lungdx.claims``), and the worker that finds every fold evaluated writes the summary.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import pandas as pd
import yaml
from tqdm.auto import tqdm

from lungdx.checkpoint import load_checkpoint, versions
from lungdx.config import load_config, save_config, to_dict

logger = logging.getLogger(__name__)

MEMBER_MODEL = "nodule_net"
SHARED_ARGS = ("input_size", "task", "in_channels")


def _member_checkpoints(members: list[Path]) -> list[dict]:
    """The members' checkpoints, checked to be nodule_nets of one task and preprocessing on the same rows."""
    if len(members) < 2:
        raise ValueError("an ensemble needs at least two runs")
    payloads = []
    for run in members:
        if not (run / "model.pt").is_file():
            raise FileNotFoundError(f"{run}: no model.pt (not a finished run)")
        payload = load_checkpoint(run / "model.pt")
        if payload["model"]["name"] != MEMBER_MODEL:
            raise ValueError(f"{run}: a {payload['model']['name']} run; an ensemble is made of {MEMBER_MODEL} runs")
        payloads.append(payload)
    first = payloads[0]
    for run, payload in zip(members[1:], payloads[1:], strict=True):
        for key in ("task", "preprocess", "data_fingerprint"):
            if payload.get(key) != first.get(key):  # the fingerprint covers every row's file, target and split
                raise ValueError(f"{run}: its {key} differs from {members[0]}'s; ensemble members must be trained on "
                                 "the same rows and splits, task and preprocessing")
    return payloads


def assemble_run(members: list[str | Path], out_dir: str | Path, *, member_kwargs: dict | None = None,
                 device: str = "auto", progress: bool = False) -> Path:
    """One ``nodule_ensemble`` run folder from finished nodule_net runs on the same rows.

    Args:
        members: the members' run folders.
        out_dir: the ensemble's run folder (kept as it is when already evaluated).
        member_kwargs: nodule_net arguments set on every member (``{"tta": "hflip"}``: the mirrored
            second pass), on top of each member's own.
        device: ``auto``, ``cpu`` or ``cuda``.
    """
    from lungdx.data.nodules import localisation_targets
    from lungdx.evaluate import evaluate_run, load_run_data
    from lungdx.models import create_model
    from lungdx.nodule_train import finish_localiser, localiser_kwargs
    from lungdx.runtime import Hardware

    members, out_dir = [Path(run) for run in members], Path(out_dir)
    if _evaluated(out_dir):
        logger.info("%s: already assembled and evaluated; kept", out_dir)
        return out_dir
    partial = out_dir.exists() and any(out_dir.iterdir())
    if partial and _saved_model_name(out_dir) != "nodule_ensemble":
        raise FileExistsError(f"{out_dir}: exists and is not an ensemble run; use a new --out")
    payloads = _member_checkpoints(members)
    arguments = [{key: value for key, value in payload["model"]["kwargs"].items() if key not in SHARED_ARGS}
                 | dict(member_kwargs or {}) for payload in payloads]
    _, data = load_run_data(members[0], progress=progress)  # the members' rows, as they were split
    config = load_config(members[0] / "config.yaml")
    config = replace(config, model=replace(config.model, name="nodule_ensemble", kwargs={"members": arguments}, weights=None))
    model = create_model("nodule_ensemble", **localiser_kwargs(config))
    state = {f"members.{index}.{key}": value for index, payload in enumerate(payloads)
             for key, value in payload["state_dict"].items()}
    model.load_state_dict(state)
    hardware = Hardware.resolve(device, config.train.precision, config.train.channels_last)
    model = hardware.prepare(model.eval())
    if partial:
        shutil.rmtree(out_dir)  # an earlier attempt stopped before its evaluation: start it again
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, out_dir / "config.yaml")
    (out_dir / "versions.json").write_text(json.dumps(versions(), indent=2))
    shutil.copyfile(members[0] / "split.csv", out_dir / "split.csv")
    member_summaries = [_read_json(run / "summary.json") for run in members]
    epochs = "/".join(str(payload.get("epoch")) for payload in payloads)  # each member's detector epoch
    targets = localisation_targets(data.frame, config.preprocess)
    finish_localiser(out_dir, config, data, model, hardware, targets, {"detector": epochs},
                     payloads[0]["data_fingerprint"], members=[str(run) for run in members],
                     member_train_seconds=[summary.get("train_seconds") for summary in member_summaries])
    evaluate_run(out_dir, device=device)
    return out_dir


def _saved_model_name(run_dir: Path) -> str | None:
    try:
        return load_config(run_dir / "config.yaml").model.name
    except (OSError, ValueError):
        return None


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def assemble_cv(cv_dirs: list[str | Path], out_dir: str | Path, *, member_kwargs: dict | None = None,
                device: str = "auto", progress: bool = False) -> dict | None:
    """A CV folder whose fold k is the ensemble of fold k of each CV in ``cv_dirs`` (same ``folds.csv``).

    Returns ``cv.summarise``'s results (also written: ``cv.md``, ``cv.json``, ...), or None when other
    workers still hold folds (the last of them to finish writes the summary).
    """
    from lungdx.claims import Claims
    from lungdx.cv import CVPlan, _fold_assignment, fold_name, summarise
    from lungdx.io.files import write_atomic

    cv_dirs, out_dir = [Path(path) for path in cv_dirs], Path(out_dir)
    plans = []
    for path in cv_dirs:
        if not (path / "plan.yaml").is_file() or not (path / "folds.csv").is_file():
            raise FileNotFoundError(f"{path}: not a `lungdx cv` folder (no plan.yaml and folds.csv)")
        plans.append(yaml.safe_load((path / "plan.yaml").read_text()))
    folds = [pd.read_csv(path / "folds.csv", dtype={"case_id": str}) for path in cv_dirs]
    for path, plan, assignment in zip(cv_dirs[1:], plans[1:], folds[1:], strict=True):
        if any(plan[key] != plans[0][key] for key in ("folds", "repeats", "seed")) or \
                not _fold_assignment(assignment).equals(_fold_assignment(folds[0])):
            raise ValueError(f"{path}: its folds differ from {cv_dirs[0]}'s (folds.csv); an ensemble CV needs the same folds")
    plan = CVPlan(plans[0]["folds"], plans[0]["repeats"], plans[0]["seed"])
    names = [fold_name(repeat, fold) for repeat in range(plan.repeats) for fold in range(plan.folds)]
    unfinished = [str(path / "runs" / name) for path in cv_dirs for name in names
                  if not (path / "runs" / name / "model.pt").is_file()]
    if unfinished:
        raise ValueError(f"unfinished folds: {', '.join(unfinished)}; finish those CVs first (rerun their lungdx cv)")
    recipe = {"members": [str(path) for path in cv_dirs], "member_kwargs": dict(member_kwargs or {})}
    if out_dir.exists() and any(path.name != "ensemble.log" for path in out_dir.iterdir()):  # the CLI's log comes first
        saved = yaml.safe_load((out_dir / "ensemble.yaml").read_text()) if (out_dir / "ensemble.yaml").is_file() else None
        if saved != recipe:
            raise FileExistsError(f"{out_dir}: exists and holds " + ("another ensemble (ensemble.yaml)" if saved else
                                  "something else") + "; use a new --out, or the same sources and --member to resume")
    out_dir.mkdir(parents=True, exist_ok=True)
    # The recipe first: a worker joining from now on finds it and knows the folder for this ensemble's.
    write_atomic(out_dir / "ensemble.yaml", yaml.safe_dump(recipe, sort_keys=False))
    shutil.copyfile(cv_dirs[0] / "folds.csv", out_dir / "folds.csv")
    claims = Claims(out_dir / "claims")
    for name in tqdm(names, desc="folds", unit="fold", disable=not progress):
        if _evaluated(out_dir / "runs" / name) or claims.acquire(name) is None:
            continue  # done, or another worker is assembling it
        try:
            assemble_run([path / "runs" / name for path in cv_dirs], out_dir / "runs" / name,
                         member_kwargs=member_kwargs, device=device)
        finally:
            claims.release(name)
    held = [name for name in names if not _evaluated(out_dir / "runs" / name)]
    if held:
        logger.info("%s: folds %s are being assembled by other workers; the last of them writes the summary",
                    out_dir, ", ".join(held))
        return None
    if claims.acquire("summary") is None:
        logger.info("%s: the summary is being written by worker %s", out_dir, claims.holder("summary"))
        return None
    try:
        config = load_config(out_dir / "runs" / names[0] / "config.yaml")
        (out_dir / "plan.yaml").write_text(yaml.safe_dump({"folds": plan.folds, "repeats": plan.repeats,
                                                           "seed": plan.seed, "config": to_dict(config)}, sort_keys=False))
        return summarise(out_dir, plan, config)
    finally:
        claims.release("summary")


def _evaluated(run_dir: Path) -> bool:
    from lungdx.cv import _fold_step

    return _fold_step(run_dir, clean=False) == "done"  # what lungdx cv counts as a finished fold
