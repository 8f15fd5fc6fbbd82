"""The paper's Table 1 for train, validation and test, with patient-level bootstrap CIs.

The operating threshold comes from the checkpoint (chosen on validation at training time) and is
applied unchanged to every split; nothing here is tuned on test data.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pandas as pd

from lungdx import metrics
from lungdx.config import EvalConfig, load_config
from lungdx.io.files import write_atomic
from lungdx.predict import Predictor
from lungdx.subgroups import parse_by, subgroup_markdown, subgroup_metrics
from lungdx.train import prepare_data

logger = logging.getLogger(__name__)

SPLIT_TITLES = {"train": "Train", "val": "Validation", "test": "Test"}
METRIC_TITLES = {"accuracy": "Accuracy", "sensitivity": "Sensitivity", "specificity": "Specificity",
                 "precision": "Precision", "recall": "Recall", "f1": "F1 score", "roc_auc": "ROC AUC"}
# The paper reports these on data nobody can see; shown beside ours, never compared as equals.
PAPER_CLAIMS = {"accuracy": 0.948, "roc_auc": 0.976}


def load_run_data(run_dir: str | Path, *, progress: bool = False):
    """The run's config and its data with the run's own split (``split.csv``)."""
    run_dir = Path(run_dir)
    run_config = load_config(run_dir / "config.yaml")
    run_config = replace(run_config, data=replace(run_config.data, split_file=str(run_dir / "split.csv")))
    return run_config, prepare_data(run_config, progress=progress)


def evaluate_run(run_dir: str | Path, config: EvalConfig | None = None, *, device: str = "auto",
                 progress: bool = False, out_dir: str | Path | None = None, by: tuple[str, ...] = ()) -> dict:
    """Predict every split of a finished run and write Table 1 and the other views.

    Args:
        run_dir: a run folder made by ``fit`` (``config.yaml``, ``split.csv``, ``model.pt``).
        config: bootstrap settings; defaults to the run's own ``eval`` section.
        device: where to run the model.
        out_dir: where to write; defaults to ``run_dir/evaluation``.
        by: subgroup specifications (``sex``, ``size_mm:0,10,20,30,60``) for per-stratum test metrics.

    Returns:
        The JSON-serialisable results (also written to ``table1.json``).
    """
    run_dir = Path(run_dir)
    stratifiers = [parse_by(spec) for spec in by]
    run_config, data = load_run_data(run_dir, progress=progress)
    config = config or run_config.eval
    predictor = Predictor.from_path(run_dir, device=device, precision="checkpoint")
    frame = data.frame.copy()
    frame["probability"] = predictor.probabilities(data.cache.view(frame["cache_index"].to_numpy()))
    threshold = predictor.threshold
    frame["decision"] = (frame["probability"] >= threshold).astype(int)  # beside the dataset's own label column
    ci = {"n_resamples": config.n_bootstrap, "confidence": config.confidence, "seed": config.seed}
    results = {"run": str(run_dir), "task": run_config.data.task, "model": run_config.model.name,
               "threshold": threshold, "threshold_method": predictor.checkpoint.get("threshold_method"),
               "temperature": predictor.temperature, "numeric_precision": predictor.hardware.precision,
               "image_size": run_config.preprocess.size,
               "n_bootstrap": config.n_bootstrap, "confidence": config.confidence, "synthetic": _is_synthetic(frame),
               "class_names": predictor.class_names, "splits": {}, "roc": {}, "pr": {}, "calibration": {}}
    for split in ("train", "val", "test"):
        rows = frame[frame["split"] == split]
        y_true, y_score = rows["target"].to_numpy(), rows["probability"].to_numpy()
        results["splits"][split] = metrics.metrics_with_ci(y_true, y_score, threshold,
                                                           groups=rows["patient_id"].to_numpy(), **ci)
        results["roc"][split] = metrics.roc_points(y_true, y_score)
        results["pr"][split] = metrics.pr_points(y_true, y_score)
        results["calibration"][split] = {"ece": metrics.expected_calibration_error(y_true, y_score),
                                         "brier": metrics.brier_score(y_true, y_score),
                                         "reliability": metrics.reliability_curve(y_true, y_score)}
    val, test = frame[frame["split"] == "val"], frame[frame["split"] == "test"]
    results["operating_points"] = metrics.operating_points(val["target"], val["probability"], test["target"],
                                                           test["probability"])
    if stratifiers:
        results["subgroups"] = subgroup_metrics(test, stratifiers, **ci)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "evaluation"
    write_outputs(results, frame, out_dir, history=run_dir / "history.csv")
    return results


def _is_synthetic(frame: pd.DataFrame) -> bool:
    return "synthetic" in frame.columns and bool((frame["synthetic"] == 1).all())


FIGURES = {"roc": "roc.png", "pr": "pr.png", "calibration": "calibration.png", "confusion": "confusion.png",
           "scores": "scores.png", "training": "training.png"}
"""The evaluation's figures, each drawn from results computed once."""


def write_outputs(results: dict, frame: pd.DataFrame, out_dir: Path, history: Path | None = None) -> None:
    """``table1.md``, ``predictions.csv``, the figures of :data:`FIGURES` and, last, ``table1.json`` in ``out_dir``.

    ``table1.json`` is what ``lungdx cv`` takes for a finished evaluation: written last and atomically, so a
    process stopped in between leaves none and the evaluation is made again. ``predictions.csv``'s ``label`` is
    the decision at the frozen threshold (``frame["decision"]``).
    """
    from lungdx import plots

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "table1.json").unlink(missing_ok=True)  # a rerun over an old evaluation: done only once rewritten
    (out_dir / "table1.md").write_text(table_markdown(results))
    columns = ["case_id", "patient_id", "split", "target", "probability", "label"]
    write_atomic(out_dir / "predictions.csv", frame.assign(label=frame["decision"])[columns].to_csv(index=False).encode())
    suffix = " (synthetic data)" if results.get("synthetic") else ""
    title = f"{results['model']} - {results['task']}{suffix}"
    plots.plot_roc(results["roc"], out_dir / FIGURES["roc"], title=title)
    plots.plot_pr(results["pr"], out_dir / FIGURES["pr"], title=title)
    plots.plot_reliability({split: c["reliability"] for split, c in results["calibration"].items()},
                           out_dir / FIGURES["calibration"], title=title)
    plots.plot_confusion(results["splits"]["test"]["counts"], results.get("class_names") or ["negative", "positive"],
                         out_dir / FIGURES["confusion"], title=f"Test split at threshold {results['threshold']:.3f}")
    test = frame[frame["split"] == "test"]
    plots.plot_score_histograms(test["probability"].to_numpy(), test["target"].to_numpy(), results["threshold"],
                                out_dir / FIGURES["scores"], title=f"Test split: {title}")
    if history is not None and history.is_file():
        summary = history.with_name("summary.json")  # the kept epoch, which need not have the least val_loss
        best = json.loads(summary.read_text()).get("best_epoch") if summary.is_file() else None
        plots.plot_training_curves(pd.read_csv(history), out_dir / FIGURES["training"], title=title,
                                   best_epoch=best if isinstance(best, int) else None)
    write_atomic(out_dir / "table1.json", json.dumps(metrics.json_safe(results), indent=2).encode())


def table_markdown(results: dict) -> str:
    """The paper's Table 1 as Markdown: metrics by row, splits by column, value [CI]."""
    level = round(100 * results["confidence"])
    synthetic = " (SYNTHETIC phantoms: says nothing about real radiographs)" if results.get("synthetic") else ""
    lines = [f"# Table 1: {results['model']} on {results['task']}{synthetic}", "",
             f"Threshold {results['threshold']:.4f} ({results['threshold_method']}), chosen on the validation split "
             f"and frozen for test. Brackets: {level}% CI, patient-level bootstrap with {results['n_bootstrap']} resamples.",
             ""] + metrics_table(results)
    lines += ["", "The paper's figures come from data that is not public; they are shown for reference, "
              "not as a like-for-like comparison.", ""]
    lines += _operating_points_markdown(results) + _calibration_markdown(results)
    if results.get("subgroups"):
        lines += ["## Test metrics by subgroup", "", subgroup_markdown(results["subgroups"], results["confidence"])]
    return "\n".join(lines)


def metrics_table(results: dict) -> list[str]:
    """Table 1's Markdown rows: metrics by row, splits by column, value [CI], the paper's claims beside."""
    lines = ["| Metric | " + " | ".join(SPLIT_TITLES.values()) + " | Paper's claim |",
             "|" + "---|" * (len(SPLIT_TITLES) + 2)]
    for name, title in METRIC_TITLES.items():
        cells = [metrics.format_ci(results["splits"][split][name]) for split in SPLIT_TITLES]
        claim = f"{PAPER_CLAIMS[name]:.3f}" if name in PAPER_CLAIMS else ""
        lines.append(f"| {title} | " + " | ".join(cells) + f" | {claim} |")
    counts = [results["splits"][split]["counts"] for split in SPLIT_TITLES]
    lines.append("| Images (positive / negative) | " + " | ".join(
        f"{c['n']} ({c['n_pos']} / {c['n_neg']})" for c in counts) + " | |")
    return lines


def _operating_points_markdown(results: dict) -> list[str]:
    lines = ["## Operating points", "", "Each threshold is chosen on the validation split and applied unchanged to "
             "test; a test sensitivity below its validation target is what the frozen threshold gives.", "",
             "| Operating point | Threshold | Val sensitivity | Val specificity | Test sensitivity | Test specificity "
             "| Test precision |", "|---|---|---|---|---|---|---|"]
    for row in results.get("operating_points", []):
        cells = " | ".join(format_number(row[k]) for k in ("val_sensitivity", "val_specificity", "test_sensitivity",
                                                      "test_specificity", "test_precision"))
        lines.append(f"| {row['point']} | {row['threshold']:.4f} | {cells} |")
    return lines + [""]


def _calibration_markdown(results: dict) -> list[str]:
    temperature = results.get("temperature") or 1.0
    scaled = f"temperature scaling T = {temperature:.3f} (fitted on validation)" if temperature != 1.0 else \
        "no temperature scaling (`lungdx calibrate RUN` fits one on validation)"
    lines = ["## Calibration", "", f"Probabilities with {scaled}. ECE: expected calibration error over 10 equal-width "
             "bins; Brier: mean squared error of the probability.", "", "| Split | ECE | Brier score |", "|---|---|---|"]
    for split, title in SPLIT_TITLES.items():
        entry = results.get("calibration", {}).get(split)
        if entry:
            lines.append(f"| {title} | {format_number(entry['ece'])} | {format_number(entry['brier'])} |")
    return lines + [""]


def format_number(value) -> str:
    """Three decimals, or ``n/a`` for None and NaN."""
    return "n/a" if value is None or value != value else f"{value:.3f}"
