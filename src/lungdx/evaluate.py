"""The paper's Table 1 for train, validation and test, with patient-level bootstrap CIs.

The operating threshold comes from the checkpoint (chosen on validation at training time) and is
applied unchanged to every split; nothing here is tuned on test data.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace
from pathlib import Path

import pandas as pd

from lungdx import metrics
from lungdx.config import EvalConfig, load_config
from lungdx.predict import Predictor
from lungdx.train import prepare_data

logger = logging.getLogger(__name__)

SPLIT_TITLES = {"train": "Train", "val": "Validation", "test": "Test"}
METRIC_TITLES = {"accuracy": "Accuracy", "sensitivity": "Sensitivity", "specificity": "Specificity",
                 "precision": "Precision", "recall": "Recall", "f1": "F1 score", "roc_auc": "ROC AUC"}
# The paper reports these on data nobody can see; shown beside ours, never compared as equals.
PAPER_CLAIMS = {"accuracy": 0.948, "roc_auc": 0.976}


def evaluate_run(run_dir: str | Path, config: EvalConfig | None = None, *, device: str = "auto",
                 progress: bool = False, out_dir: str | Path | None = None) -> dict:
    """Predict every split of a finished run and write Table 1 (Markdown, JSON), predictions and ROC.

    Args:
        run_dir: a run folder made by ``fit`` (``config.yaml``, ``split.csv``, ``model.pt``).
        config: bootstrap settings; defaults to the run's own ``eval`` section.
        device: where to run the model.
        out_dir: where to write; defaults to ``run_dir/evaluation``.

    Returns:
        The JSON-serialisable results (also written to ``table1.json``).
    """
    run_dir = Path(run_dir)
    run_config = load_config(run_dir / "config.yaml")
    config = config or run_config.eval
    run_config = replace(run_config, data=replace(run_config.data, split_file=str(run_dir / "split.csv")))
    data = prepare_data(run_config, progress=progress)
    predictor = Predictor.from_path(run_dir, device=device)
    frame = data.frame.copy()
    frame["probability"] = predictor.probabilities(data.cache.view(frame["cache_index"].to_numpy()))
    threshold = predictor.threshold
    results = {"run": str(run_dir), "task": run_config.data.task, "model": run_config.model.name,
               "threshold": threshold, "threshold_method": predictor.checkpoint.get("threshold_method"),
               "image_size": run_config.preprocess.size, "n_bootstrap": config.n_bootstrap,
               "confidence": config.confidence, "synthetic": _is_synthetic(frame), "splits": {}, "roc": {}}
    for split in ("train", "val", "test"):
        rows = frame[frame["split"] == split]
        y_true, y_score = rows["target"].to_numpy(), rows["probability"].to_numpy()
        results["splits"][split] = metrics.metrics_with_ci(
            y_true, y_score, threshold, groups=rows["patient_id"].to_numpy(), n_resamples=config.n_bootstrap,
            confidence=config.confidence, seed=config.seed)
        results["roc"][split] = metrics.roc_points(y_true, y_score)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "evaluation"
    write_outputs(results, frame, out_dir)
    return results


def _is_synthetic(frame: pd.DataFrame) -> bool:
    return "synthetic" in frame.columns and bool((frame["synthetic"] == 1).all())


def write_outputs(results: dict, frame: pd.DataFrame, out_dir: Path) -> None:
    """``table1.md``, ``table1.json``, ``predictions.csv`` and ``roc.png`` in ``out_dir``."""
    from lungdx.plots import plot_roc

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "table1.json").write_text(json.dumps(metrics.json_safe(results), indent=2))
    (out_dir / "table1.md").write_text(table_markdown(results))
    columns = ["case_id", "patient_id", "split", "target", "probability"]
    predictions = frame[columns].assign(label=(frame["probability"] >= results["threshold"]).astype(int))
    predictions.to_csv(out_dir / "predictions.csv", index=False)
    suffix = " (synthetic data)" if results.get("synthetic") else ""
    plot_roc(results["roc"], out_dir / "roc.png", title=f"{results['model']} - {results['task']}{suffix}")


def table_markdown(results: dict) -> str:
    """The paper's Table 1 as Markdown: metrics by row, splits by column, value [CI]."""
    level = round(100 * results["confidence"])
    header = "| Metric | " + " | ".join(SPLIT_TITLES.values()) + " | Paper's claim |"
    synthetic = " (SYNTHETIC phantoms: says nothing about real radiographs)" if results.get("synthetic") else ""
    lines = [f"# Table 1: {results['model']} on {results['task']}{synthetic}", "",
             f"Threshold {results['threshold']:.4f} ({results['threshold_method']}), chosen on the validation split "
             f"and frozen for test. Brackets: {level}% CI, patient-level bootstrap with {results['n_bootstrap']} resamples.",
             "", header, "|" + "---|" * (len(SPLIT_TITLES) + 2)]
    for name, title in METRIC_TITLES.items():
        cells = [_cell(results["splits"][split][name]) for split in SPLIT_TITLES]
        claim = f"{PAPER_CLAIMS[name]:.3f}" if name in PAPER_CLAIMS else ""
        lines.append(f"| {title} | " + " | ".join(cells) + f" | {claim} |")
    counts = [results["splits"][split]["counts"] for split in SPLIT_TITLES]
    lines.append("| Images (positive / negative) | " + " | ".join(
        f"{c['n']} ({c['n_pos']} / {c['n_neg']})" for c in counts) + " | |")
    lines += ["", "The paper's figures come from data that is not public; they are shown for reference, "
              "not as a like-for-like comparison.", ""]
    return "\n".join(lines)


def _cell(entry: dict) -> str:
    value, low, high = entry["value"], entry["ci_low"], entry["ci_high"]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if low is None or math.isnan(low):
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"
