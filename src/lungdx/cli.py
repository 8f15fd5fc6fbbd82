"""The ``lungdx`` command line: parse, build a config, call one library function, report."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import re
import sys
import textwrap
import time
import warnings
from pathlib import Path

EPILOG = """\
examples:
  lungdx demo                                   # whole chain on synthetic phantoms (a few minutes)
  lungdx train --data ../shared/data/jsrt --task malignant_vs_rest --out runs/jsrt-mal
  lungdx train --data labels.csv --task nodule --set preprocess.size=128 --set train.epochs=20 --out runs/x
  lungdx evaluate runs/jsrt-mal                 # Table 1 (train / validation / test) + ROC figure
  lungdx evaluate runs/jsrt-mal --by subtlety --by size_mm:0,10,20,30,60 --by sex
  lungdx cv --data ../shared/data/jsrt --task malignant_vs_rest --folds 10 --out runs/jsrt-cv
  lungdx ensemble runs/cv-a runs/cv-b --member tta=hflip --out runs/cv-ab   # nodule_nets averaged, fold by fold
  lungdx report runs/jsrt-mal                   # one offline HTML file + JSON + model card
  lungdx compare runs/A runs/B                  # same test set: is B really better than A?
  lungdx predict runs/jsrt-mal image.png image.dcm
  lungdx train --data ../shared/data/jsrt --model densenet121 --weights runs/nih-densenet --out runs/jsrt-dn
  lungdx tune --data ../shared/data/jsrt --method bayes --trials 40 --out runs/tune1   # rerun to resume
  lungdx explain runs/jsrt-mal image.png --method gradcam --out overlay.png
  lungdx explain runs/jsrt-nod --localization   # pointing game: do the heatmaps find the nodules?
  lungdx serve runs/jsrt-mal --port 8000        # web page + API at http://127.0.0.1:8000/ (serve extra)
  lungdx monitor report --db sqlite:///monitor.db --since 30d --out monitor.html
  lungdx listen runs/jsrt-mal --port 11112 --pacs http://127.0.0.1:8042/dicom-web   # DICOM node (pacs extra)
  lungdx deidentify in_dir/ out_dir/            # PS3.15 basic profile research export
"""

logger = logging.getLogger("lungdx")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lungdx", description="Chest radiograph diagnosis (lung nodules) with convolutional neural networks.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"lungdx {_version()}")
    _add_common(parser, argparse.SUPPRESS)
    parser.set_defaults(verbose=False, quiet=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    _add_common(common, argparse.SUPPRESS)
    commands.add_parser = functools.partial(commands.add_parser, parents=[common])
    _add_demo(commands)
    _add_train(commands)
    _add_evaluate(commands)
    _add_cv(commands)
    _add_cv_status(commands)
    _add_ensemble(commands)
    _add_report(commands)
    _add_tune(commands)
    _add_predict(commands)
    _add_explain(commands)
    _add_pacs(commands)
    _add_monitor(commands)
    _add_serve(commands)
    models = commands.add_parser("models", help="list the registered models")
    models.set_defaults(handler=_cmd_models)
    return parser


def _add_common(parser: argparse.ArgumentParser, default) -> None:
    # Accepted before or after the command name (`lungdx -q demo`, `lungdx demo -q`).
    parser.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", default=default,
                        help="no progress bars; warnings and errors only")


def _add_demo(commands) -> None:
    demo = commands.add_parser("demo", help="run the whole chain on built-in synthetic chest phantoms",
                               description="Make synthetic chest phantoms, split by patient, train the paper's CNN, "
                                           "choose the threshold on validation and write Table 1 and the ROC figure. "
                                           "The numbers describe synthetic data only.")
    demo.add_argument("--out", default="lungdx-demo", help="output folder (default: %(default)s)")
    demo.add_argument("--images", type=int, default=600, help="number of phantoms (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the phantoms (default: %(default)s)")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. train.epochs=5")
    demo.add_argument("--force", action="store_true", help="replace an earlier demo run in --out")
    demo.set_defaults(handler=_cmd_demo)


def _add_train(commands) -> None:
    train = commands.add_parser("train", help="train a model; writes a run folder",
                                description="Train on a dataset with a patient-level train/validation/test split. "
                                            "The best epoch by validation loss is kept and its operating threshold "
                                            "is chosen on validation. The test split is not looked at.",
                                epilog="data layouts: a manifest CSV (image, label columns, patient_id), a JSRT folder "
                                       "(labels.csv or CLNDAT_EN.txt + .IMG), an NIH ChestX-ray14 folder, one folder "
                                       "per class, or a DICOM folder.\n"
                                       "tasks: nodule_vs_normal, malignant_vs_benign, malignant_vs_rest, a binary "
                                       "column name, or COLUMN=VALUE.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_run_config(train)
    train.add_argument("--out", required=True, help="run folder to create")
    train.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    train.add_argument("--evaluate", action="store_true", help="run `lungdx evaluate` on the run when training ends")
    train.set_defaults(handler=_cmd_train)


def _add_evaluate(commands) -> None:
    evaluate = commands.add_parser("evaluate", help="Table 1 for train / validation / test with CIs, ROC figure",
                                   description="Predict every split of a run with the threshold frozen at training "
                                               "time; 95%% CIs by patient-level bootstrap.")
    evaluate.add_argument("run", help="run folder made by `lungdx train`")
    evaluate.add_argument("--bootstrap", type=int, help="bootstrap resamples (default: the run's eval.n_bootstrap, 1000)")
    evaluate.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    evaluate.add_argument("--by", action="append", default=[], metavar="COLUMN[:EDGES]",
                          help="test metrics per stratum of a dataset column, e.g. --by sex --by size_mm:0,10,20,30,60 "
                               "(repeatable; numeric columns need bin edges)")
    evaluate.set_defaults(handler=_cmd_evaluate)


def _add_run_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="dataset path (overrides data.path)")
    parser.add_argument("--task", help="what to predict (overrides data.task)")
    parser.add_argument("--patient-id-pattern", metavar="REGEX",
                        help="read the patient ID from the file names of images whose layout gives none (class "
                             "folders, a manifest without patient_id, DICOM without PatientID): the first group that "
                             "matched, else the whole match; e.g. '(person\\d+)_|(IM-\\d+)-' for Kermany's pediatric "
                             "set. A name it does not match is an error. Overrides data.patient_id_pattern")
    parser.add_argument("--model", help="registered model name (overrides model.name); see `lungdx models`")
    parser.add_argument("--weights", metavar="imagenet|PATH|RUN",
                        help="start from pretrained weights (overrides model.weights): imagenet, a state_dict file, "
                             "or a lungdx run folder / model.pt; the head starts fresh. Pair with "
                             "--set train.freeze_epochs=N --set train.backbone_lr_factor=0.1")
    parser.add_argument("--config", help="YAML file overriding the defaults (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="one-off override, e.g. --set train.lr=3e-4 (repeatable)")


# Each shortcut flag of _add_run_config and the (section, key) it sets: one table for both readers below, so a new
# flag cannot be added to one and forgotten in the other.
_SHORTCUTS = {"data": ("data", "path"), "task": ("data", "task"), "patient_id_pattern": ("data", "patient_id_pattern"),
              "model": ("model", "name"), "weights": ("model", "weights")}


def _config_given(args) -> bool:
    """Whether the command line sets anything of the run's config (``--config``, ``--set`` or a shortcut flag)."""
    return bool(args.config or args.set) or any(getattr(args, flag, None) is not None for flag in _SHORTCUTS)


def _run_config(args, *, require_data: bool = True):
    """The config of `--config`, `--set` and the shortcut flags; exits when no dataset is given."""
    from lungdx.config import apply_overrides, load_config

    config = apply_overrides(load_config(args.config), list(args.set))
    # The shortcut flags are taken as given, not read as YAML: '/data/scan #2' is a path, not '/data/scan'.
    for flag, (section, key) in _SHORTCUTS.items():
        if getattr(args, flag) is not None:
            part = dataclasses.replace(getattr(config, section), **{key: getattr(args, flag)})
            config = dataclasses.replace(config, **{section: part})
    if require_data and not config.data.path:
        raise SystemExit(f"lungdx {args.command}: no data given (use --data PATH or data.path in --config)")
    return config


def _add_cv(commands) -> None:
    cv = commands.add_parser("cv", help="patient-level (repeated) k-fold cross-validation",
                             description="Train one run per fold: each fold of patients is the test set once; the "
                                         "validation split for early stopping and the threshold comes from the other "
                                         "folds. Reports per-fold Table 1, mean +/- SD across folds and the pooled "
                                         "out-of-fold ROC AUC with a patient-level bootstrap CI. Rerun the same "
                                         "command to resume an interrupted CV. Folds in parallel: start the same "
                                         "command several times (processes or machines, one shared --out); each "
                                         "worker claims a fold before training it, and the one that finishes the "
                                         "last fold writes the summary.")
    _add_run_config(cv)
    cv.add_argument("--folds", type=int, default=10, help="number of folds (default: %(default)s)")
    cv.add_argument("--repeats", type=int, default=1, help="repeats with re-drawn folds (default: %(default)s)")
    cv.add_argument("--seed", type=int, default=0, help="seed of the fold assignment (default: %(default)s)")
    cv.add_argument("--device", default="auto", help="device for evaluation: auto, cpu or cuda (default: %(default)s)")
    cv.add_argument("--by", action="append", default=[], metavar="COLUMN[:EDGES]",
                    help="pooled out-of-fold metrics per stratum, e.g. --by subtlety --by size_mm:0,10,20,30,60")
    cv.add_argument("--out", required=True, help="CV folder to create, resume or share with other workers")
    cv.set_defaults(handler=_cmd_cv)


def _cmd_cv(args) -> int:
    from lungdx import distributed
    from lungdx.cv import CVPlan, cross_validate

    config = _run_config(args)
    with distributed.session():  # under torchrun: every fold trains on all ranks, rank 0 writes
        main_rank = distributed.is_main()
        if main_rank:
            _log_to_file(Path(args.out) / "cv.log")
        else:
            logging.getLogger("lungdx").setLevel(max(logging.getLogger("lungdx").level, logging.WARNING))
        results = cross_validate(config, args.out, CVPlan(args.folds, args.repeats, args.seed), device=args.device,
                                 progress=not args.quiet, by=tuple(args.by))
    if not main_rank:
        return 0
    out = Path(args.out)
    if results is None:
        print(f"This worker has no fold left to train; the rest are in other workers' hands, and the one that "
              f"finishes the last fold writes {out / 'cv.md'} (rerun this command to take over a crashed worker's "
              "fold, see cv.log).")
        return 0
    print((out / "cv.md").read_text())
    print(f"Written: {out / 'cv.md'}, {out / 'cv.json'}, {out / 'oof_predictions.csv'}, {out / 'roc_pooled.png'}")
    return 0


def _add_cv_status(commands) -> None:
    status = commands.add_parser(
        "cv-status", help="where each fold of a running or stopped CV stands (reads files only)",
        description="For each CV folder (the --out of `lungdx cv` or `lungdx ensemble`): each fold's state "
                    "(evaluated, trained, training or evaluating under a live worker, stopped and resumable, not "
                    "started), its last epoch (and stage, for nodule_net), the minutes it has trained over all its "
                    "sessions, the worker holding it and when its files last changed; and, once a fold has finished, "
                    "the training time the CV still needs with its live workers (the finished folds' mean per fold). "
                    "No metric is shown: the figures are in cv.md once the last fold is done. Nothing is claimed or "
                    "written, so it is safe beside running workers. Resume a stopped fold by running the same "
                    "`lungdx cv` command again.")
    status.add_argument("out", nargs="+", type=Path, help="CV folder(s)")
    status.set_defaults(handler=_cmd_cv_status)


def _cmd_cv_status(args) -> int:
    from lungdx.cv import fold_states, time_left

    for index, out in enumerate(args.out):
        try:
            states = fold_states(out)
        except FileNotFoundError as err:
            raise SystemExit(f"lungdx cv-status: {err}") from None
        if index:
            print()
        counts = states["state"].value_counts()
        summary = ", ".join(f"{counts[state]} {state}" for state in states["state"].unique())
        written = out / "cv.md"
        tail = f"; {written} written" if written.is_file() else "; no cv.md yet"
        print(f"{out}: {len(states)} folds: {summary}{tail}")
        shown = states.assign(trained=states["trained_s"].map(_minutes)).drop(columns="trained_s")
        print(shown[["fold", "state", "progress", "trained", "worker", "updated"]].to_string(index=False))
        estimate = time_left(states)
        if estimate is None:
            print("time left: estimated once a fold has finished")
        else:
            print(f"time left: about {_minutes(estimate['seconds'])} of training with {estimate['workers']} "
                  f"worker(s), at the {estimate['finished']} finished fold(s)' mean of "
                  f"{_minutes(estimate['fold_seconds'])} each (evaluation and early stopping not foreseen)")
    return 0


def _minutes(seconds: float) -> str:
    """``41 min`` or ``5.2 h``; empty for NaN."""
    if seconds != seconds:
        return ""
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def _add_ensemble(commands) -> None:
    ensemble = commands.add_parser(
        "ensemble", help="average finished nodule_net runs (or CVs, fold by fold) into one model",
        description=textwrap.fill(
                    "Read two or more nodule_net runs trained on the same rows as one model (nodule_ensemble): the "
                    "mean of their lung logits gives one mask, the mean of their nodule maps gives the peak and the "
                    "candidates, the mean of their judges the malignancy. Writes a run folder like `lungdx train` "
                    "(model.pt with the threshold chosen on the shared validation split, evaluation, nodule_outputs.csv) "
                    "that predict, serve, listen and pacs-run use unchanged. Given `lungdx cv` folders with the same "
                    "folds, it assembles each fold from that fold's members only and writes a CV folder (cv.md, "
                    "pooled out-of-fold figures) that `lungdx compare` reads. Rerun to resume; run it again beside "
                    "itself (the same command) and the workers share the folds, as with `lungdx cv`.", 100),
        epilog="examples:\n"
               "  lungdx ensemble runs/jsrt-nod-a runs/jsrt-nod-b --out runs/jsrt-nod-ab\n"
               "  lungdx ensemble runs/jsrt-cv10-nodule-cosine runs/jsrt-cv10-nodule-v5 --member tta=hflip "
               "--out runs/jsrt-cv10-nodule-ens\n"
               "  lungdx compare runs/jsrt-cv10-nodule-v5 runs/jsrt-cv10-nodule-ens",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ensemble.add_argument("sources", nargs="+", metavar="RUN_OR_CV",
                          help="finished nodule_net run folders, or `lungdx cv` folders (all of one kind)")
    ensemble.add_argument("--member", action="append", default=[], metavar="KEY=VALUE",
                          help="a nodule_net argument set on every member, e.g. tta=hflip (repeatable)")
    ensemble.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    ensemble.add_argument("--out", required=True, help="the ensemble's run folder, or CV folder for CV sources")
    ensemble.set_defaults(handler=_cmd_ensemble)


def _cmd_ensemble(args) -> int:
    from lungdx.config import _parse_value
    from lungdx.ensemble import assemble_cv, assemble_run

    member_kwargs = {}
    for item in args.member:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--member {item!r}: expected KEY=VALUE, e.g. tta=hflip")
        member_kwargs[key.strip()] = _parse_value(value)
    sources = [Path(source) for source in args.sources]
    kinds = {"cv" if (source / "plan.yaml").is_file() else "run" for source in sources}
    if len(kinds) > 1:
        raise ValueError("give either run folders or `lungdx cv` folders, not both")
    out = Path(args.out)
    if kinds == {"cv"}:
        _log_to_file(out / "ensemble.log")
        if assemble_cv(sources, out, member_kwargs=member_kwargs, device=args.device, progress=not args.quiet) is None:
            print(f"{out}: other workers are still assembling folds; the last of them writes the summary "
                  "(or run this again once they are done)")
            return 0
        print((out / "cv.md").read_text())
        print(f"Written: {out / 'cv.md'}, {out / 'cv.json'}, {out / 'oof_predictions.csv'}, {out / 'oof_nodule_outputs.csv'}")
        return 0
    assemble_run(sources, out, member_kwargs=member_kwargs, device=args.device, progress=not args.quiet)
    print((out / "evaluation" / "table1.md").read_text())
    print(f"Written: {out / 'model.pt'}, {out / 'nodule_outputs.csv'}, {out / 'evaluation'}")
    return 0


def _add_tune(commands) -> None:
    tune = commands.add_parser("tune", help="hyperparameter search (grid, random, Bayesian) with Optuna",
                               description="Search config fields (by default the paper's grid: learning rate x batch "
                                           "size x dropout). Each trial trains in OUT/trials/NNNN and is scored on "
                                           "validation (or k-fold on train + validation); the test split is never "
                                           "used. Rerunning the same command continues the study; the same command "
                                           "with one --storage URL on several machines shares it (docs/tuning.md).",
                               epilog="search space YAML: one dotted config key per line, e.g.\n"
                                      "  train.lr: {low: 1.0e-5, high: 1.0e-2, log: true}\n"
                                      "  train.batch_size: [32, 64, 128]\n"
                                      "  model.kwargs.dropout: {low: 0.2, high: 0.7, step: 0.1}\n"
                                      "see configs/search/.",
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_run_config(tune)
    tune.add_argument("--method", choices=("grid", "random", "bayes"), default="grid",
                      help="Optuna GridSampler, RandomSampler or TPESampler (default: %(default)s)")
    tune.add_argument("--trials", type=int, help="trials the study should hold in all, every worker's together "
                                                 "(default: the grid's size; 20 for random and bayes)")
    tune.add_argument("--space", help="search space YAML (default: the paper's grid)")
    tune.add_argument("--objective", choices=("val_loss", "val_auc"), default="val_loss",
                      help="validation loss (minimised) or AUC (maximised) (default: %(default)s)")
    tune.add_argument("--cv", type=int, default=0, metavar="K",
                      help="score each trial by K-fold cross-validation on train + validation (default: off)")
    tune.add_argument("--no-prune", action="store_true", help="never stop a trial early for being behind the median")
    tune.add_argument("--storage", help="Optuna storage URL (default: sqlite:///OUT/study.db); PostgreSQL or MySQL "
                                        "to share the study between machines")
    tune.add_argument("--study-name", help="study to create or continue (default: derived from the search)")
    tune.add_argument("--seed", type=int, default=0, help="seed of the sampler (default: %(default)s)")
    tune.add_argument("--worker-trials", type=int, help="most trials this process runs (default: until the study is done)")
    tune.add_argument("--out", required=True, help="output folder (trials table, best.yaml, plots, trial runs)")
    tune.set_defaults(handler=_cmd_tune)


def _cmd_tune(args) -> int:
    config = _run_config(args)
    try:
        import optuna

        from lungdx.tune import TuneSettings, load_space, tune
    except ImportError as err:
        raise SystemExit(f"lungdx tune: needs the tune extra (pip install -e '.[tune]'): {err}") from None
    _log_to_file(Path(args.out) / "tune.log")
    # Optuna's messages ("Trial 3 finished with value ...") go through logging (stderr, tune.log) at lungdx's
    # level (the root logger's is WARNING, which hid them).
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    optuna.logging.set_verbosity(logging.getLogger("lungdx").getEffectiveLevel())
    logging.getLogger("optuna").handlers = list(logging.getLogger("lungdx").handlers)
    settings = TuneSettings(method=args.method, n_trials=args.trials, objective=args.objective, cv_folds=args.cv,
                            prune=not args.no_prune, storage=args.storage, study_name=args.study_name,
                            seed=args.seed, worker_trials=args.worker_trials)
    try:
        result = tune(config, args.out, settings, space=load_space(args.space) if args.space else None,
                      progress=not args.quiet)
    except KeyboardInterrupt:
        print(f"interrupted; rerun the same command to continue the study (results so far in {args.out})", file=sys.stderr)
        return 130
    counts = ", ".join(f"{n} {state}" for state, n in result.counts.items() if n)
    print(f"Study {result.study_name} ({result.storage}): {counts or 'no trials'}.")
    print(result.files["trials_md"].read_text())
    if result.best_number is None:
        print("No trial completed: no best.yaml.")
        return 1
    print(f"Written: {', '.join(str(path) for path in result.files.values())}")
    print(f"Next (retrain, then test once): lungdx train --config {result.files['best_yaml']} --out RUN --evaluate")
    return 0


def _add_report(commands) -> None:
    report = commands.add_parser("report", help="one offline HTML report + JSON + model card for a run",
                                 description="Evaluate the run and write report/report.html (every figure embedded, no "
                                             "network needed), report/report.json (the same numbers) and "
                                             "report/model_card.md.")
    report.add_argument("run", help="finished run folder")
    report.add_argument("--by", action="append", default=[], metavar="COLUMN[:EDGES]",
                        help="subgroup table per stratum, as for `lungdx evaluate --by`")
    report.add_argument("--out", help="output folder (default: RUN/report)")
    report.add_argument("--no-gallery", action="store_true", help="leave out the review gallery (heatmaps)")
    report.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    report.set_defaults(handler=_cmd_report)
    compare = commands.add_parser("compare", help="paired comparison of two runs on the same test cases",
                                  description="DeLong's test and a patient-level paired bootstrap of the AUC "
                                              "difference, and McNemar's test of the decisions, on the test cases "
                                              "both runs share. Refuses when the test sets differ.")
    compare.add_argument("run_a", help="run folder A (the reference), or a `lungdx cv` folder (pooled out-of-fold predictions)")
    compare.add_argument("run_b", help="run folder B (the challenger), or a `lungdx cv` folder")
    compare.add_argument("--bootstrap", type=int, default=2000, help="paired bootstrap resamples (default: %(default)s)")
    compare.add_argument("--out", help="also write comparison.md and comparison.json here")
    compare.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    compare.set_defaults(handler=_cmd_compare)
    calibrate = commands.add_parser("calibrate", help="fit temperature scaling on validation; store it in model.pt",
                                    description="Fit one temperature T on the run's validation logits so that "
                                                "probabilities are calibrated; the ranking (AUC) and every decision "
                                                "stay as they were (the threshold is mapped too).")
    calibrate.add_argument("run", help="finished run folder")
    calibrate.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    calibrate.set_defaults(handler=_cmd_calibrate)


def _cmd_report(args) -> int:
    from lungdx.report import write_report

    files = write_report(args.run, out_dir=args.out, by=tuple(args.by), device=args.device, gallery=not args.no_gallery,
                         progress=not args.quiet)
    print(f"Written: {files.html} (open it in any browser, offline), {files.json}, {files.model_card}")
    return 0


def _cmd_compare(args) -> int:
    from lungdx.compare import compare_runs, comparison_markdown, write_comparison

    result = compare_runs(args.run_a, args.run_b, n_resamples=args.bootstrap, device=args.device)
    print(comparison_markdown(result))
    if args.out:
        write_comparison(result, args.out)
        print(f"Written: {Path(args.out) / 'comparison.md'}, {Path(args.out) / 'comparison.json'}")
    return 0


def _cmd_calibrate(args) -> int:
    from lungdx.calibrate import calibrate_run

    report = calibrate_run(args.run, device=args.device, progress=not args.quiet)
    print(f"{args.run}: temperature {report['temperature']:.3f}; validation ECE {report['val_ece_before']:.3f} -> "
          f"{report['val_ece_after']:.3f}, Brier {report['val_brier_before']:.3f} -> {report['val_brier_after']:.3f}. "
          "Written into model.pt; run `lungdx evaluate` again for the test figures.")
    return 0


def _add_predict(commands) -> None:
    predict = commands.add_parser(
        "predict", help="probability and label for image files (PNG, JPEG, DICOM, JSRT .IMG)",
        description="One line per image: probability, label at the run's frozen threshold and, for nodule_net, where\n"
                    "the nodule map peaks. Every image first passes the acceptance policy shared by every entrance\n"
                    "(README, 'Checks at the boundary'): a refused one prints FILE<TAB>REFUSED<TAB>reason, gets no\n"
                    "probability, and makes the exit status 1.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    predict.add_argument("run", help="run folder or checkpoint file (model.pt)")
    predict.add_argument("images", nargs="+", help="image files")
    predict.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    predict.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    _add_precision(predict)
    _add_acceptance(predict)
    predict.set_defaults(handler=_cmd_predict)


def _add_precision(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--precision", default="checkpoint", choices=["checkpoint", "auto", "fp32", "bf16", "fp16"],
                        help="checkpoint = the precision the threshold was chosen in (model.pt's numeric_precision), so "
                             "decisions are the validated ones; auto (bf16 on a CPU or GPU with native bf16) or bf16 "
                             "may be faster but move probabilities slightly and may flip decisions near the "
                             "threshold (default: %(default)s)")


def _add_acceptance(parser: argparse.ArgumentParser) -> None:
    """The acceptance policy's options (lungdx.io.acceptance), the same at every entrance."""
    from lungdx.io.acceptance import DEFAULT_MAX_PIXELS

    parser.add_argument("--allow-non-chest", action="store_true",
                        help="score DICOM images whose header says not CR/DX, For Processing, not chest or not PA/AP, "
                             "with a warning, "
                             "instead of refusing them (research only)")
    parser.add_argument("--max-megapixels", type=float, default=DEFAULT_MAX_PIXELS / 1e6,
                        help="largest image, read from its header before decoding (default: %(default)g)")


def _policy(args):
    from lungdx.io.acceptance import AcceptancePolicy

    return AcceptancePolicy(max_pixels=int(args.max_megapixels * 1_000_000), allow_non_chest=args.allow_non_chest)


LOCALIZATION_SPLIT, LOCALIZATION_BOOTSTRAP = "test", 1000
"""``lungdx explain --localization``'s defaults (the options have none, so that an IMAGE given with them is refused)."""


def _add_explain(commands) -> None:
    explain = commands.add_parser(
        "explain", help="heatmap overlay for one image, or the pointing game on a run's nodule cases",
        description="Explain a run's prediction on one image: an overlay PNG in the image's own geometry (colour\n"
                    "bar, probability and threshold written on it) and the raw heatmap as .npy beside it. Or, with\n"
                    "--localization, measure whether the heatmaps point at the ground-truth nodules of the run's\n"
                    "dataset: pointing game and energy share, per subtlety, beside a random-heatmap baseline.",
        epilog="examples:\n  lungdx explain runs/jsrt-mal image.png --method gradcam --out overlay.png\n"
               "  lungdx explain runs/jsrt-nod --localization --split test",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    explain.add_argument("run", help="run folder (or model.pt for a single image)")
    explain.add_argument("image", nargs="?", help="image file (PNG, JPEG, TIFF, DICOM, JSRT .IMG)")
    explain.add_argument("--method", default="gradcam", choices=("gradcam", "gradcampp", "occlusion", "nodule_map"),
                         help="explanation method (default: %(default)s); nodule_map: the model's own map "
                              "(nodule_net only)")
    explain.add_argument("--out", help="overlay PNG (default: IMAGE-STEM_METHOD.png here); with --localization, "
                                       "a folder (default: RUN/explain/localization-METHOD-SPLIT)")
    explain.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    explain.add_argument("--localization", action="store_true", help="pointing game on the run's nodule cases")
    explain.add_argument("--split", choices=("train", "val", "test", "all"),
                         help=f"cases for --localization (default: {LOCALIZATION_SPLIT}; train and all include training "
                              "cases)")
    explain.add_argument("--tolerance", type=float, action="append", metavar="FRACTION",
                         help="added to each nodule radius, as a fraction of the model input side (repeatable; "
                              "default: 0 and 1/16, i.e. 0 and 16 px at 256 px)")
    explain.add_argument("--bootstrap", type=int,
                         help=f"bootstrap resamples for --localization (default: {LOCALIZATION_BOOTSTRAP})")
    explain.add_argument("--patch", type=int, help="occlusion patch side in model-input pixels (default: an eighth of it)")
    explain.add_argument("--stride", type=int, help="occlusion stride in pixels (default: half the patch)")
    _add_acceptance(explain)
    explain.set_defaults(handler=_cmd_explain)


def _cmd_explain(args) -> int:
    from lungdx.explain import DEFAULT_TOLERANCE, explain_file, localize_run, write_explanation, write_localization
    from lungdx.io import ImageReadError
    from lungdx.io.acceptance import Refused
    from lungdx.predict import Predictor

    if args.localization == bool(args.image):
        print("lungdx explain: error: give either an IMAGE or --localization", file=sys.stderr)
        return 2
    options = {key: value for key, value in (("patch", args.patch), ("stride", args.stride)) if value is not None}
    if options and args.method != "occlusion":
        print("lungdx explain: error: --patch and --stride apply to --method occlusion only", file=sys.stderr)
        return 2
    if args.image and (args.split, args.tolerance, args.bootstrap) != (None, None, None):
        print("lungdx explain: error: --split, --tolerance and --bootstrap apply to --localization only", file=sys.stderr)
        return 2
    if args.localization:
        tolerances, split = args.tolerance or [0.0, DEFAULT_TOLERANCE], args.split or LOCALIZATION_SPLIT
        n_bootstrap = LOCALIZATION_BOOTSTRAP if args.bootstrap is None else args.bootstrap
        result = localize_run(args.run, method=args.method, split=split, tolerances=tolerances, n_bootstrap=n_bootstrap,
                              device=args.device, options=options)
        out = Path(args.out) if args.out else Path(args.run) / "explain" / f"localization-{args.method}-{split}"
        paths = write_localization(result, out)
        print(result.markdown())
        print("Written: " + ", ".join(str(path) for path in paths.values()))
        return 0
    try:
        predictor = Predictor.from_path(args.run, device=args.device, policy=_policy(args))
        explanation = explain_file(predictor, args.image, args.method, **options)
    except ImageReadError as err:
        print(f"{err.path}\tREFUSED\t{err.reason}" if isinstance(err, Refused) else f"lungdx explain: error: {err}",
              file=sys.stderr)
        return 2
    out = args.out or f"{Path(args.image).stem}_{args.method}.png"
    if out.endswith(("/", os.sep)):  # a folder still to make (Path drops the slash that says so)
        Path(out).mkdir(parents=True, exist_ok=True)
    png, npy = write_explanation(explanation, out)
    threshold = "no threshold" if explanation.threshold is None else f"threshold {explanation.threshold:.4f}"
    notices = [] if explanation.notice is None else [
        explanation.notice + ("" if args.method == "occlusion" else "; try --method occlusion")]
    print(f"{args.image}\tp={explanation.probability:.4f}\t{explanation.class_name}\t({threshold})"
          + "".join(f"\tWARNING: {text}" for text in [*explanation.warnings, *notices]))
    print(f"Written: {png} (overlay), {npy} (heatmap, {explanation.heatmap_original.shape[0]} x "
          f"{explanation.heatmap_original.shape[1]}, the image's rows x columns)")
    return 0


def _add_serve(commands) -> None:
    serve = commands.add_parser(
        "serve", help="the inference service and the radiologist's web page (FastAPI + uvicorn)",
        description="Serve one trained model over HTTP: the web page at /, POST /v1/predictions, GET /v1/model, "
                    "/healthz, /readyz, /metrics and the OpenAPI docs at /docs. Needs the serve extra: "
                    "pip install -e '.[serve]'.",
        epilog="examples:\n  lungdx serve runs/jsrt-mal --port 8000\n"
               "  lungdx serve runs/jsrt-mal --host 0.0.0.0 --api-key-file key.txt --db sqlite:///monitor.db\n"
               "  curl -F file=@image.dcm -H 'X-API-Key: ...' 'http://127.0.0.1:8000/v1/predictions?heatmap=true'",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("run", type=Path, help="run folder (or model.pt) to serve")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key-file", type=Path, help="file holding the API key (at least 16 characters); "
                       "else $LUNGDX_API_KEY; without either, no key is asked for")
    serve.add_argument("--db", default="sqlite:///monitor.db",
                       help="SQLAlchemy URL of the prediction and feedback log (default: %(default)s); 'none' turns it off")
    serve.add_argument("--max-upload-mb", type=float, default=64.0, help="largest request body (default: %(default)s)")
    serve.add_argument("--max-batch", type=int, default=16, help="micro-batch size; 1 turns batching off (default: %(default)s)")
    serve.add_argument("--max-wait-ms", type=float, default=5.0,
                       help="how long a request waits for others to batch with (default: %(default)s)")
    serve.add_argument("--max-decodes", type=int, metavar="N",
                       help="the most uploads decoded and levelled at once, in threads of their own (a 50-megapixel "
                            "16-bit RGB PNG takes about 1.7 GB while it decodes; default: the CPUs this process may use)")
    serve.add_argument("--decode-wait-s", type=float, default=5.0,
                       help="how long an upload waits for a decoding slot before it is answered 503 with Retry-After "
                            "(default: %(default)s)")
    serve.add_argument("--max-queue", type=int, default=16,
                       help="the most decoded images waiting for the model; one more is answered 503 with Retry-After "
                            "(default: %(default)s)")
    serve.add_argument("--archive", type=Path, metavar="DIR",
                       help="keep each image's pixels here (16-bit PNG, no header) so that confirmed cases can be "
                            "exported for retraining and a candidate model challenged on them (lungdx monitor)")
    serve.add_argument("--webhook", metavar="URL", help="POST monitoring alerts (raised and cleared) here as JSON")
    serve.add_argument("--heatmap-method", choices=["auto", "gradcam", "occlusion", "nodule_map"], default="auto",
                       help="heatmap of ?heatmap=true: auto = the model's own nodule map for nodule_net, Grad-CAM otherwise")
    serve.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    _add_precision(serve)
    _add_acceptance(serve)
    serve.set_defaults(handler=_cmd_serve)


def _cmd_serve(args) -> int:
    import os

    try:
        import uvicorn

        from lungdx.service.app import create_app
        from lungdx.service.settings import ServiceSettings
    except ImportError as err:
        raise RuntimeError(f"the service needs the serve extra (pip install -e '.[serve]'): {err}") from err
    from lungdx.checkpoint import load_checkpoint

    # A clear error now, instead of a traceback from inside the server's startup.
    load_checkpoint(args.run / "model.pt" if args.run.is_dir() else args.run)
    if args.api_key_file is not None:
        if not args.api_key_file.is_file():
            raise FileNotFoundError(f"{args.api_key_file}: no such API key file")
        api_key = args.api_key_file.read_text().strip()
    else:
        api_key = os.environ.get("LUNGDX_API_KEY") or None
    settings = ServiceSettings(
        run=args.run, api_key=api_key, db_url=None if args.db.lower() == "none" else args.db, device=args.device,
        precision=args.precision, max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_pixels=int(args.max_megapixels * 1_000_000), allow_non_chest=args.allow_non_chest, max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms, decode_wait_s=args.decode_wait_s, max_queue=args.max_queue,
        **({} if args.max_decodes is None else {"max_decodes": args.max_decodes}),
        heatmap_method=args.heatmap_method, archive_dir=args.archive, webhook_url=args.webhook)
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s without an API key: anyone who reaches this port can use the model", args.host)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="warning" if args.quiet else "info")
    return 0


def _add_monitor(commands) -> None:
    monitor = commands.add_parser(
        "monitor", help="monitoring log of the service: report, export confirmed cases, challenge a new model",
        description="Read the prediction and feedback log that `lungdx serve --db URL` writes (any SQLAlchemy URL).\n"
                    "The log holds no images; export and challenge use the image archive the service keeps with\n"
                    "--archive DIR (header-free 16-bit PNGs named by prediction id; see docs/monitoring.md).",
        epilog="examples:\n  lungdx monitor report --db sqlite:///monitor.db --since 30d --out monitor.html\n"
               "  lungdx monitor export --db sqlite:///monitor.db --out feedback_manifest.csv\n"
               "  lungdx monitor challenge runs/new --db sqlite:///monitor.db --current runs/jsrt-mal",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = monitor.add_subparsers(dest="monitor_command", required=True, metavar="ACTION")
    report = actions.add_parser("report", help="offline HTML report: volume, alerts, drift, rolling performance")
    report.add_argument("--since", default="30d", help="period: 30d, 12h, 90m, 2w or all (default: %(default)s)")
    report.add_argument("--out", default="monitor_report.html", help="HTML file (default: %(default)s)")
    export = actions.add_parser(
        "export", help="confirmed cases as a manifest CSV to retrain on",
        description="Write every confirmed case as a manifest (image, case_id, patient_id, label, target and the task's "
                    "label columns), readable by `lungdx train --data FILE.csv`. Images come from the service's archive; "
                    "cases without an archived image are left out unless --include-missing, which writes them with an "
                    "empty image and their pseudonymous case_key (HMAC of the SOP Instance UID) for the site to resolve "
                    "with its own UID-to-file mapping. patient_id is the case key: one image per patient.")
    export.add_argument("--out", default="feedback_manifest.csv", help="CSV file (default: %(default)s)")
    export.add_argument("--include-missing", action="store_true", help="also list confirmed cases without an archived image")
    challenge = actions.add_parser(
        "challenge", help="candidate model against the current one on the confirmed cases (paired tests)",
        description="Score the confirmed cases' archived images with the candidate and compare it with the current "
                    "model: DeLong and paired bootstrap of the AUC difference, McNemar of the decisions. Without "
                    "--current, the logged predictions of the model the service runs are used.")
    challenge.add_argument("candidate", help="run folder (or model.pt) of the new model")
    challenge.add_argument("--current", help="run folder of the current model (re-scores the same images)")
    challenge.add_argument("--bootstrap", type=int, default=2000, help="paired bootstrap resamples (default: %(default)s)")
    challenge.add_argument("--out", help="also write comparison.md and comparison.json here")
    challenge.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    for action in (report, export, challenge):
        action.add_argument("--db", required=True, help="SQLAlchemy URL of the log, e.g. sqlite:///monitor.db")
        action.add_argument("--model", help="model version to describe (default: the one registered last)")
    for action in (export, challenge):
        action.add_argument("--archive", help="image archive folder (default: the one the service recorded)")
    monitor.set_defaults(handler=_cmd_monitor)


def _cmd_monitor(args) -> int:
    from lungdx.monitoring import Monitor, challenge, export_feedback, render_report

    with Monitor.open(args.db, model_version=args.model) as monitor:
        if args.monitor_command == "report":
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(render_report(monitor, since=args.since), encoding="utf-8")
            print(f"Written: {args.out} (open it in any browser, offline)")
        elif args.monitor_command == "export":
            counts = export_feedback(monitor, args.out, archive_dir=args.archive, include_missing=args.include_missing)
            left = "listed with an empty image" if args.include_missing else "left out (--include-missing lists them)"
            print(f"Written: {counts['path']}: {counts['rows']} confirmed cases; {counts['without_image']} without an "
                  f"archived image {left}")
        else:
            from lungdx.compare import comparison_markdown, write_comparison

            result = challenge(monitor, args.candidate, current=args.current, archive_dir=args.archive,
                               n_resamples=args.bootstrap, device=args.device)
            print(comparison_markdown(result))
            print(f"Cases: {result['cases']}; {result['confirmed_without_image']} confirmed cases had no archived image.")
            if args.out:
                write_comparison(result, args.out)
                print(f"Written: {Path(args.out) / 'comparison.md'}, {Path(args.out) / 'comparison.json'}")
    return 0


def _add_pacs(commands) -> None:
    listen = commands.add_parser(
        "listen", help="DICOM node: analyse received chest radiographs, send SR + heatmap back to the PACS",
        epilog="example:\n  lungdx listen runs/jsrt-mal --aet LUNGDX --port 11112 "
               "--pacs http://127.0.0.1:8042/dicom-web --pacs-aet ORTHANC",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    listen.add_argument("run", help="run folder (or model.pt)")
    listen.add_argument("--aet", default="LUNGDX", help="this node's AE title (default: %(default)s)")
    listen.add_argument("--host", default="0.0.0.0", help="address to listen on (default: %(default)s)")
    listen.add_argument("--port", type=int, default=11112, help="DICOM port (default: %(default)s)")
    _add_destination(listen)
    listen.set_defaults(handler=_cmd_listen)
    pull = commands.add_parser("pacs-run", help="pull a study by DICOMweb, analyse it, push the results back")
    pull.add_argument("run", help="run folder (or model.pt)")
    pull.add_argument("--study", required=True, help="Study Instance UID")
    _add_destination(pull)
    pull.set_defaults(handler=_cmd_pacs_run)
    deid = commands.add_parser("deidentify", help="PS3.15 Basic Profile de-identified copy of a DICOM folder")
    deid.add_argument("in_dir", help="folder of DICOM files (searched recursively)")
    deid.add_argument("out_dir", help="folder for the de-identified files")
    deid.add_argument("--shift-dates", type=int, metavar="DAYS",
                      help="shift every date by DAYS (not 0) instead of replacing it with 19000101, keeping intervals; "
                           "use one secret shift per export (birth dates still get the dummy)")
    deid.set_defaults(handler=_cmd_deidentify)


def _add_destination(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pacs", help="the PACS's DICOMweb base URL, e.g. http://127.0.0.1:8042/dicom-web")
    parser.add_argument("--pacs-aet", default="ORTHANC", help="the PACS's AE title (default: %(default)s)")
    parser.add_argument("--pacs-host", help="the PACS's host for --send-by cstore")
    parser.add_argument("--pacs-port", type=int, help="the PACS's DICOM port for --send-by cstore")
    parser.add_argument("--send-by", default="stow", choices=("stow", "cstore"),
                        help="how results go back to the PACS (default: %(default)s)")
    parser.add_argument("--fhir", help="FHIR base URL to POST the DiagnosticReport bundles to (optional)")
    parser.add_argument("--fhir-patient-system", metavar="URI", type=_absolute_uri,
                        help="the FHIR identifier system of this site's Patient IDs (0010,0020), e.g. "
                             "'urn:oid:1.2.3.4.5' or 'https://hospital.example/mrn': the Bundles' subject gets it, so "
                             "the EHR can match the patient; without it the subject is the ID alone (a warning says so). "
                             "An instance whose Issuer of Patient ID (0010,0021) is not --fhir-patient-issuer (a study "
                             "from another hospital) gets no system")
    parser.add_argument("--fhir-patient-issuer", metavar="ISSUER",
                        help="the Issuer of Patient ID (0010,0021) of this site's own IDs; instances without one are "
                             "taken as the site's (default: only those)")
    parser.add_argument("--state", default="lungdx-pacs", help="inbox/outbox folder (default: %(default)s)")
    _add_retention(parser)
    parser.add_argument("--device", default="cpu", help="auto, cpu or cuda (default: %(default)s)")
    _add_acceptance(parser)


def _add_retention(parser: argparse.ArgumentParser) -> None:
    """How long results and kept instances stay in STATE (lungdx.integrations.outbox.Retention): they are patient data."""
    from lungdx.integrations.outbox import Retention

    parser.add_argument("--keep-sent", type=_retention_days, default=Retention.sent_days, metavar="DAYS",
                        help="delete delivered results (SR, heatmap, FHIR bundle: patient data) from STATE/outbox/sent/ "
                             "DAYS days after delivery, and the copy of each FHIR bundle in STATE/fhir/ DAYS days after "
                             "it was written (a system collecting bundles from that folder must take them sooner); 0 "
                             "deletes each result as soon as the PACS or EHR took it and writes no copy, 'never' keeps "
                             "them all (default: %(default)g)")
    parser.add_argument("--keep-refused", type=_retention_days, default=Retention.refused_days, metavar="DAYS",
                        help="delete what waits for a person DAYS days after it began to wait: results a destination "
                             "refused for good, in STATE/outbox/refused/ (read why in its state.json, move it back to "
                             "pending/ once the cause is fixed), and received instances whose analysis failed or whose "
                             "pixels could not be read, in STATE/failed/ and STATE/unreadable/ (put one back into "
                             "STATE/inbox/ once fixed, or send it again from the PACS after it went); longer than "
                             "--keep-sent's by default, for that review; 0 keeps none of them, 'never' keeps them all "
                             "(default: %(default)g)")


def _absolute_uri(text: str) -> str:
    """An absolute URI (a scheme, then no white space), as FHIR's Identifier.system must be."""
    uri = text.strip()
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*:\S+", uri):
        raise argparse.ArgumentTypeError(f"expected an absolute URI such as urn:oid:1.2.3 or https://hospital.example/mrn, "
                                         f"got {text!r}")
    return uri


def _retention_days(text: str) -> float | None:
    if text.strip().lower() == "never":
        return None
    try:
        days = float(text)
        if days >= 0:  # also refuses NaN
            return days
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected a number of days (0 or more) or 'never', got {text!r}")


def _pacs_processor(args):
    from lungdx.integrations.outbox import Retention
    from lungdx.integrations.service import dicom_sender, make_processor

    sender = dicom_sender(args.send_by, dicomweb=args.pacs, host=args.pacs_host, port=args.pacs_port,
                          called_aet=args.pacs_aet, calling_aet=getattr(args, "aet", "LUNGDX"))
    return make_processor(args.run, args.state, sender, fhir_url=args.fhir, device=args.device, policy=_policy(args),
                          retention=Retention(sent_days=args.keep_sent, refused_days=args.keep_refused),
                          patient_system=args.fhir_patient_system, patient_issuer=args.fhir_patient_issuer)


def _cmd_listen(args) -> int:
    import signal

    from lungdx.integrations.pipeline import Node

    def stop(_signum, _frame):  # a service manager's SIGTERM stops the node as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    node = Node(_pacs_processor(args), aet=args.aet, host=args.host, port=args.port)
    node.start()
    print(f"{args.aet} listening on {args.host}:{args.port}; state in {args.state} (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        node.stop()
    return 0


def _cmd_pacs_run(args) -> int:
    from lungdx.integrations.dicomweb import DicomWebClient
    from lungdx.integrations.pipeline import NothingToAnalyse, pacs_run

    if not args.pacs:
        raise SystemExit("lungdx pacs-run: --pacs (the DICOMweb base URL) is required")
    processor = _pacs_processor(args)
    try:
        run = pacs_run(processor, DicomWebClient(args.pacs), args.study)
    except NothingToAnalyse as err:
        print(f"lungdx pacs-run: {err}", file=sys.stderr)
        run = None
    # What earlier runs left waiting still goes, and the retention still prunes: an empty study is no reason not to.
    delivered = processor.deliver()
    waiting = len(processor.outbox.pending())
    if run is None:
        if delivered or waiting:
            print(f"lungdx pacs-run: delivered {delivered} earlier result(s), {waiting} waiting in {processor.outbox.folder}",
                  file=sys.stderr)
        return 1
    print(f"analysed {len(run.analysed)} instance(s), {run.already} already analysed by this model version, "
          f"{len(run.skipped)} skipped; delivered {delivered} result(s), {waiting} waiting in {processor.outbox.folder}")
    return 0 if not waiting else 1


def _cmd_deidentify(args) -> int:
    from lungdx.io.deidentify import deidentify_folder

    summary = deidentify_folder(args.in_dir, args.out_dir, date_shift_days=args.shift_dates)
    print(f"wrote {len(summary.written)} de-identified file(s) to {args.out_dir}; skipped {len(summary.skipped)}; "
          f"{len(summary.warnings)} burned-in annotation warning(s)")
    return 0


def _version() -> str:
    from lungdx import __version__

    return __version__


def _cmd_demo(args) -> int:
    from tqdm.auto import tqdm

    from lungdx.demo import run_demo

    started = time.perf_counter()
    bar = tqdm(total=args.images, desc="synthetic phantoms", unit="img", disable=args.quiet, leave=False)
    result = run_demo(args.out, n_images=args.images, seed=args.seed, overrides=args.set, overwrite=args.force,
                      progress=not args.quiet, phantom_progress=lambda done, total: bar.update(done - bar.n))
    bar.close()
    print(result.table_markdown.read_text())
    test_auc = result.results["splits"]["test"]["roc_auc"]
    print(f"Demo finished in {time.perf_counter() - started:.0f} s. The data are SYNTHETIC phantoms.")
    if not (test_auc["ci_low"] or 0) > 0.5:  # NaN and None count as "not above chance"
        print("The test AUC's confidence interval includes 0.5: the model learned little. The paper's CNN needs "
              "more data, epochs or resolution to find small nodules; the demo shows the chain, not a good model.")
    print(f"  phantoms:     {result.data_dir}")
    print(f"  run folder:   {result.run_dir}  (config, split, history, model.pt)")
    print(f"  Table 1:      {result.table_markdown}")
    print(f"  ROC figure:   {result.roc_figure}")
    print(f"  try:          lungdx predict {result.run_dir} {next(iter(sorted((result.data_dir / 'images').iterdir())))}")
    return 0


def _cmd_train(args) -> int:
    from lungdx import distributed
    from lungdx.train import fit

    config = _run_config(args, require_data=not args.resume)
    saved = Path(args.out) / "config.yaml"
    if args.resume and not _config_given(args) and saved.is_file():  # the README's `train --resume --out RUN`
        from lungdx.config import load_config

        config = load_config(saved)
    with distributed.session():  # under torchrun: this process joins the run's process group
        main_rank = distributed.is_main()  # rank 0 alone logs to the run folder and prints
        if main_rank:
            _log_to_file(Path(args.out) / "train.log")
        else:
            logging.getLogger("lungdx").setLevel(max(logging.getLogger("lungdx").level, logging.WARNING))
        result = fit(config, args.out, resume=args.resume, progress=not args.quiet)
    if not main_rank:
        return 0
    print(f"Run written to {result.run_dir}: best epoch {result.best_epoch} of {len(result.history)}, "
          f"threshold {result.threshold:.4f} (chosen on validation).")
    if args.evaluate:
        return _cmd_evaluate(argparse.Namespace(run=args.out, bootstrap=None, device="auto", quiet=args.quiet))
    print(f"Next: lungdx evaluate {result.run_dir}")
    return 0


def _cmd_evaluate(args) -> int:
    from dataclasses import replace

    from lungdx.config import load_config
    from lungdx.evaluate import evaluate_run

    config = load_config(Path(args.run) / "config.yaml").eval
    if args.bootstrap is not None:
        config = replace(config, n_bootstrap=args.bootstrap)
    evaluate_run(args.run, config, device=args.device, progress=not args.quiet, by=tuple(getattr(args, "by", ())))
    out = Path(args.run) / "evaluation"
    print((out / "table1.md").read_text())
    print(f"Written: {out / 'table1.md'}, {out / 'table1.json'}, {out / 'predictions.csv'}, {out / 'roc.png'}")
    return 0


def _cmd_predict(args) -> int:
    from dataclasses import asdict

    from lungdx.predict import Predictor
    from lungdx.report import NOT_FOR_CLINICAL_USE
    from lungdx.wording import state_result

    predictor = Predictor.from_path(args.run, device=args.device, precision=args.precision, policy=_policy(args))
    predictions = predictor.predict_files(args.images)
    for prediction in predictions:
        statement = state_result(prediction.probability, predictor.checkpoint) if prediction.probability is not None else None
        if args.json:
            row = asdict(prediction)
            row.pop("meta")
            row["statement"] = statement.as_dict() if statement else None
            print(json.dumps(row))
        elif prediction.refusal:  # one line: the file, the verdict, the policy's reason (no probability)
            print(f"{prediction.source}\tREFUSED\t{prediction.error.removeprefix(prediction.source + ': ')}")
        elif prediction.error:
            print(f"{prediction.source}\tERROR\t{prediction.error}")
        else:
            print(_prediction_line(prediction, statement))
    if not args.json and any(p.probability is not None for p in predictions):
        print(NOT_FOR_CLINICAL_USE)
    return 1 if any(p.error for p in predictions) else 0


def _prediction_line(prediction, statement) -> str:
    """One line of ``lungdx predict``: the file, p, the decision (with the near-threshold flag), threshold, location."""
    warning = "".join(f"\tWARNING: {text}" for text in prediction.warnings)
    found = prediction.location
    where = (f"\tmap peak at x={found['x']:.0f} y={found['y']:.0f} px (P(nodule) {found['presence']:.3f}, "
             f"P(malignant | nodule) {found['malignancy']:.3f})" if found else "")
    if statement.threshold is None:
        return f"{prediction.source}\tp={prediction.probability:.4f}\t(no threshold){where}{warning}"
    near = " (near the threshold: uncertain)" if statement.near_threshold else ""
    band = f"; 95% interval {statement.band[0]:.4f}-{statement.band[1]:.4f}" if statement.band else ""
    return (f"{prediction.source}\tp={prediction.probability:.4f}\t{statement.decision}{near}"
            f"\t(threshold {statement.threshold:.4f}, {statement.threshold_method} on validation{band}){where}{warning}")


def _cmd_models(args) -> int:
    from lungdx.models import list_models

    print("\n".join(list_models()))
    return 0


class _RunLog(logging.FileHandler):
    """The log file of one command's run folder (``train.log``, ``cv.log``...)."""


def _log_to_file(path: Path) -> None:
    """Log to ``path`` from now on, instead of an earlier command's run log (main() run twice in one process)."""
    lungdx_logger = logging.getLogger("lungdx")
    for earlier in [handler for handler in lungdx_logger.handlers if isinstance(handler, _RunLog)]:
        lungdx_logger.removeHandler(earlier)
        earlier.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = _RunLog(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    lungdx_logger.addHandler(handler)


class _QuotedValuesWithheld(logging.Filter):
    """Replaces each quoted value of a record with ``'<withheld>'``, keeping the rest of its text."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = _QUOTED.sub("'<withheld>'", record.getMessage()), None
        return True


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def withhold_header_values_in_library_logs() -> None:
    """pydicom's reading warnings quote the value they find invalid (``Invalid value for VR UI: '1.2...PATIENT4711'``),
    a UID, a name or a date in clear: its log records keep their text without the quoted values, and the same
    warnings are not printed a second time through Python's warnings (pydicom sends each both ways)."""
    library = logging.getLogger("pydicom")
    if not any(isinstance(existing, _QuotedValuesWithheld) for existing in library.filters):
        library.addFilter(_QuotedValuesWithheld())
    warnings.filterwarnings("ignore", message="Invalid value for VR")


SERVER_ARENAS = 2
"""glibc malloc arenas for the long-running servers (``runtime.tune_allocator``)."""

# How each resumable command goes on after Ctrl-C. A CV's fold is resumed by the same `lungdx cv` command, never by
# `lungdx train --resume` on its folder: that bypasses the fold claims, and another worker could train it too.
INTERRUPTED_HINTS = {
    "train": "the run continues with `lungdx train --resume --out RUN`",
    "cv": "run the same `lungdx cv` command again: finished folds are kept and the stopped one resumes",
    "tune": "run the same `lungdx tune` command again: finished trials are kept",
    "ensemble": "run the same `lungdx ensemble` command again: finished folds are kept",
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lungdx`` console script."""
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    # Other libraries speak at WARNING and above only: highdicom's and pynetdicom's INFO and DEBUG
    # messages quote UIDs and whole headers, and no patient data may reach a log; pydicom's warnings
    # lose the values they quote.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("lungdx").setLevel(level)
    withhold_header_values_in_library_logs()
    from lungdx.runtime import limit_blas_threads, tune_allocator

    tune_allocator(max_arenas=SERVER_ARENAS if args.command in ("serve", "listen") else None)
    if args.command in ("serve", "listen", "pacs-run"):
        limit_blas_threads(1)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        hint = INTERRUPTED_HINTS.get(args.command)
        print(f"interrupted; {hint}" if hint else "interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left early (`lungdx cv-status runs/cv | head`): no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would fail again
        return 141  # as a shell reports a process ended by SIGPIPE
    except Exception as err:
        if args.verbose or not _expected(err):
            raise
        print(f"lungdx {args.command}: error: {err}", file=sys.stderr)
        return 2


def _expected(err: Exception) -> bool:
    """Errors that say what is wrong with the input or the machine: printed in one line, without a traceback.

    OSError covers a file where a folder goes, a full disk, a missing permission; ImageReadError names the image.
    """
    from lungdx.io.errors import ImageReadError  # imported here: the CLI starts without lungdx's readers

    return isinstance(err, ValueError | OSError | RuntimeError | ImageReadError)


if __name__ == "__main__":
    sys.exit(main())
