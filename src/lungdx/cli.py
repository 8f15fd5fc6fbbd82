"""The ``lungdx`` command line: parse, build a config, call one library function, report."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import time
from pathlib import Path

EPILOG = """\
examples:
  lungdx demo                                   # whole chain on synthetic phantoms (a few minutes)
  lungdx train --data ../shared/data/jsrt --task malignant_vs_rest --out runs/jsrt-mal
  lungdx train --data labels.csv --task nodule --set preprocess.size=128 --set train.epochs=20 --out runs/x
  lungdx evaluate runs/jsrt-mal                 # Table 1 (train / validation / test) + ROC figure
  lungdx predict runs/jsrt-mal image.png image.dcm
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
    _add_predict(commands)
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
    train.add_argument("--data", help="dataset path (overrides data.path)")
    train.add_argument("--task", help="what to predict (overrides data.task)")
    train.add_argument("--model", help="registered model name (overrides model.name); see `lungdx models`")
    train.add_argument("--config", help="YAML file overriding the defaults (see configs/)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="one-off override, e.g. --set train.lr=3e-4 (repeatable)")
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
    evaluate.set_defaults(handler=_cmd_evaluate)


def _add_predict(commands) -> None:
    predict = commands.add_parser("predict", help="probability and label for image files (PNG, JPEG, DICOM, JSRT .IMG)")
    predict.add_argument("run", help="run folder or checkpoint file (model.pt)")
    predict.add_argument("images", nargs="+", help="image files")
    predict.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    predict.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    predict.set_defaults(handler=_cmd_predict)


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
    from lungdx.config import apply_overrides, load_config
    from lungdx.train import fit

    overrides = list(args.set)
    for flag, key in ((args.data, "data.path"), (args.task, "data.task"), (args.model, "model.name")):
        if flag is not None:
            overrides.append(f"{key}={flag}")
    config = apply_overrides(load_config(args.config), overrides)
    if not config.data.path and not args.resume:
        raise SystemExit("lungdx train: no data given (use --data PATH or data.path in --config)")
    _log_to_file(Path(args.out) / "train.log")
    result = fit(config, args.out, resume=args.resume, progress=not args.quiet)
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
    evaluate_run(args.run, config, device=args.device, progress=not args.quiet)
    out = Path(args.run) / "evaluation"
    print((out / "table1.md").read_text())
    print(f"Written: {out / 'table1.md'}, {out / 'table1.json'}, {out / 'predictions.csv'}, {out / 'roc.png'}")
    return 0


def _cmd_predict(args) -> int:
    from dataclasses import asdict

    from lungdx.predict import Predictor

    predictor = Predictor.from_path(args.run, device=args.device)
    predictions = predictor.predict_files(args.images)
    for prediction in predictions:
        if args.json:
            row = asdict(prediction)
            row.pop("meta")
            print(json.dumps(row))
        elif prediction.error:
            print(f"{prediction.source}\tERROR\t{prediction.error}")
        else:
            warning = "".join(f"\tWARNING: {text}" for text in prediction.warnings)
            print(f"{prediction.source}\tp={prediction.probability:.4f}\t{prediction.class_name}"
                  f"\t(threshold {prediction.threshold:.4f}){warning}")
    return 1 if any(p.error for p in predictions) else 0


def _cmd_models(args) -> int:
    from lungdx.models import list_models

    print("\n".join(list_models()))
    return 0


def _log_to_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("lungdx").addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lungdx`` console script."""
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from lungdx.runtime import tune_allocator

    tune_allocator()
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("interrupted; a training run continues with `lungdx train --resume --out RUN`", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        if args.verbose:
            raise
        print(f"lungdx {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
