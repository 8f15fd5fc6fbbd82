"""Paired comparison of two runs on the same test cases: is B really better than A?

Two models tested on the same patients are correlated; comparing their two confidence intervals
side by side ignores that and is too conservative, or too eager when the intervals are read
loosely. The paired tests here use the case-by-case pairing: DeLong's test and a patient-level
paired bootstrap for the AUC difference, McNemar's test for the decisions at each run's frozen threshold.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pandas as pd

from lungdx import metrics

logger = logging.getLogger(__name__)


class DifferentTestSets(ValueError):
    """The two runs were not tested on the same cases, so a paired comparison is meaningless."""


def load_test_predictions(run_dir: str | Path, *, device: str = "auto") -> pd.DataFrame:
    """The test rows of ``run_dir/evaluation/predictions.csv``, evaluating the run first when missing.

    A cross-validation folder (``lungdx cv``: ``oof_predictions.csv``) gives its pooled out-of-fold
    predictions of the first repeat, each case labelled at its own fold's threshold.
    """
    run_dir = Path(run_dir)
    oof = run_dir / "oof_predictions.csv"
    if oof.is_file():
        frame = pd.read_csv(oof, dtype={"case_id": str, "patient_id": str})
        frame = frame[frame["repeat"] == frame["repeat"].min()].copy()
        frame["label"] = (frame["probability"] >= frame["threshold"]).astype(int)
        return frame.set_index("case_id").sort_index()
    path = run_dir / "evaluation" / "predictions.csv"
    if not path.is_file():
        from lungdx.evaluate import evaluate_run

        logger.info("%s: not evaluated yet; evaluating", run_dir)
        evaluate_run(run_dir, device=device)
    frame = pd.read_csv(path, dtype={"case_id": str, "patient_id": str})
    return frame[frame["split"] == "test"].set_index("case_id").sort_index()


def paired_test_cases(a: pd.DataFrame, b: pd.DataFrame, names: tuple[str, str] = ("A", "B")) -> pd.DataFrame:
    """Join two runs' test predictions case by case; raise DifferentTestSets unless cases and truths agree."""
    only_a, only_b = a.index.difference(b.index), b.index.difference(a.index)
    if len(only_a) or len(only_b):
        examples = ", ".join(map(_shown, list(only_a[:2]) + list(only_b[:2])))
        raise DifferentTestSets(f"the test sets differ: {len(only_a)} cases only in {names[0]}, {len(only_b)} only in "
                              f"{names[1]} (e.g. {examples}); a paired comparison needs the same test cases (train B "
                              f"with --set data.split_file=<A>/split.csv)")
    joined = a[["patient_id", "target", "probability", "label"]].add_suffix("_a").join(
        b[["target", "probability", "label"]].add_suffix("_b")).rename(columns={"patient_id_a": "patient_id"})
    differing = joined[joined["target_a"] != joined["target_b"]]
    if len(differing):
        raise DifferentTestSets(f"the runs disagree on the ground truth of {len(differing)} test cases "
                              f"(e.g. {_shown(differing.index[0])}): different tasks or label files")
    return joined


def _shown(case_id: object) -> str:
    """A case ID as an error may name it: a DICOM dataset's case IDs are SOP Instance UIDs, which only appear as
    their ``uid_digest`` (as in every log); names such as JPCLN001 as they are."""
    from lungdx.io.deidentify import uid_digest

    text = str(case_id)
    return f"instance {uid_digest(text)}" if re.fullmatch(r"\d+(\.\d+)+", text) else text


def compare_runs(run_a: str | Path, run_b: str | Path, *, n_resamples: int = 2000, confidence: float = 0.95,
                 seed: int = 0, device: str = "auto") -> dict:
    """DeLong and paired-bootstrap tests of AUC(B) - AUC(A) and McNemar's test, on the shared test cases."""
    joined = paired_test_cases(load_test_predictions(run_a, device=device), load_test_predictions(run_b, device=device),
                               (str(run_a), str(run_b)))
    y_true = joined["target_a"].to_numpy()
    score_a, score_b = joined["probability_a"].to_numpy(), joined["probability_b"].to_numpy()
    return {"run_a": str(run_a), "run_b": str(run_b), "n_cases": int(len(joined)), "n_positive": int(y_true.sum()),
            "n_patients": int(joined["patient_id"].nunique()), "confidence": confidence,
            "delong": metrics.delong_test(y_true, score_a, score_b, confidence),
            "paired_bootstrap": metrics.paired_bootstrap_auc_difference(
                y_true, score_a, score_b, groups=joined["patient_id"].to_numpy(), n_resamples=n_resamples,
                confidence=confidence, seed=seed),
            "mcnemar": metrics.mcnemar_test(y_true, joined["label_a"].to_numpy(), joined["label_b"].to_numpy()),
            "accuracy_a": metrics.binary_metrics(y_true, joined["label_a"].to_numpy(float), 0.5)["accuracy"],
            "accuracy_b": metrics.binary_metrics(y_true, joined["label_b"].to_numpy(float), 0.5)["accuracy"]}


def comparison_markdown(result: dict) -> str:
    """A short Markdown summary of ``compare_runs``."""
    level = round(100 * result["confidence"])
    delong, boot, mcnemar = result["delong"], result["paired_bootstrap"], result["mcnemar"]
    # DeLong and McNemar take every image as independent; with several images of a patient only the
    # patient-level bootstrap is honest about the uncertainty.
    one_per_patient = result.get("n_patients", result["n_cases"]) == result["n_cases"]
    judge, judged_by = (delong, "DeLong") if one_per_patient else (boot, "paired patient-level bootstrap")
    verdict = ("B's AUC differs from A's" if judge["p_value"] < 1 - result["confidence"]
               else "no evidence that the AUCs differ")
    return "\n".join([
        f"# Paired comparison on {result['n_cases']} shared test cases ({result['n_positive']} positive)", "",
        f"- A: `{result['run_a']}`", f"- B: `{result['run_b']}`", "",
        "| Test | A | B | B - A | " + f"{level}% CI | p-value |", "|---|---|---|---|---|---|",
        f"| ROC AUC, DeLong | {delong['auc_a']:.3f} | {delong['auc_b']:.3f} | {delong['difference']:+.3f} | "
        f"[{delong['ci_low']:+.3f}, {delong['ci_high']:+.3f}] | {delong['p_value']:.3f} |",
        f"| ROC AUC, paired patient-level bootstrap ({boot['n_resamples']} resamples) | | | {boot['difference']:+.3f} | "
        f"{_interval(boot)} | {boot['p_value']:.3f} |",
        f"| Accuracy at each run's threshold, McNemar ({mcnemar['method']}) | {result['accuracy_a']:.3f} | "
        f"{result['accuracy_b']:.3f} | {result['accuracy_b'] - result['accuracy_a']:+.3f} | "
        f"{mcnemar['only_a_correct']} cases only A right, {mcnemar['only_b_correct']} only B right | "
        f"{mcnemar['p_value']:.3f} |", "",
        f"Verdict at the {100 - level}% level ({judged_by}): {verdict}.",
        *([] if one_per_patient else [f"{result['n_cases']} images of {result['n_patients']} patients: DeLong and McNemar "
                                      "take images as independent and understate the uncertainty here.", ""]), ""])


def _interval(entry: dict) -> str:
    low, high = entry["ci_low"], entry["ci_high"]
    return "n/a" if low is None or low != low else f"[{low:+.3f}, {high:+.3f}]"


def write_comparison(result: dict, out_dir: str | Path) -> None:
    """``comparison.json`` and ``comparison.md`` in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "comparison.json").write_text(json.dumps(metrics.json_safe(result), indent=2))
    (out_dir / "comparison.md").write_text(comparison_markdown(result))
