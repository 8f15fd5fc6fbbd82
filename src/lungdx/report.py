"""One report per run: a self-contained HTML file, the same numbers as JSON, and a model card.

The HTML embeds every figure as a data URI and carries its own CSS: it opens offline, from a USB
stick or a hospital network without internet, with no CDN. Numbers come from ``evaluate_run``;
nothing is computed twice.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import yaml

from lungdx import metrics
from lungdx.checkpoint import load_checkpoint
from lungdx.evaluate import FIGURES, SPLIT_TITLES, evaluate_run, format_number, metrics_table, table_markdown
from lungdx.subgroups import subgroup_markdown

logger = logging.getLogger(__name__)

FIGURE_TITLES = {"roc": "ROC curves", "pr": "Precision-recall curves", "calibration": "Reliability diagram",
                 "confusion": "Confusion matrix (test)", "scores": "Score histograms (test)",
                 "training": "Training curves"}
NOT_FOR_CLINICAL_USE = ("Not for clinical use. lungdx is research software, not a medical device; its output must "
                        "not guide the diagnosis or treatment of any patient.")


@dataclass(frozen=True)
class ReportFiles:
    """The three files ``write_report`` makes."""

    html: Path
    json: Path
    model_card: Path


def write_report(run_dir: str | Path, *, out_dir: str | Path | None = None, by: tuple[str, ...] = (),
                 device: str = "auto", gallery: bool = True, progress: bool = False) -> ReportFiles:
    """Evaluate the run (again, so the report matches the model as it is now) and write the report.

    Args:
        run_dir: a finished run folder.
        out_dir: defaults to ``run_dir/report``.
        by: subgroup specifications, as for ``lungdx evaluate --by``.
        gallery: add the review gallery (most confident TP, FP, FN, TN of the test split with heatmaps).
    """
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "report"
    evaluation_dir = run_dir / "evaluation"
    # Evaluated first: a mistyped run folder is an error, not a new folder (which a later train would refuse)
    results = evaluate_run(run_dir, device=device, progress=progress, by=by, out_dir=evaluation_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = run_info(run_dir)
    items = _gallery(run_dir, out_dir, device) if gallery else []
    card = model_card(results, info)
    files = ReportFiles(out_dir / "report.html", out_dir / "report.json", out_dir / "model_card.md")
    files.model_card.write_text(card)
    payload = {"run": str(run_dir), "run_info": info, "evaluation": results, "gallery": items,
               "figures": {name: str(evaluation_dir / file) for name, file in FIGURES.items()
                           if (evaluation_dir / file).is_file()}}
    files.json.write_text(json.dumps(metrics.json_safe(payload), indent=2))
    files.html.write_text(report_html(results, info, card, evaluation_dir, items))
    return files


def run_info(run_dir: Path) -> dict:
    """What the run folder says about itself: config, summary, checkpoint identity and versions."""
    checkpoint = load_checkpoint(run_dir / "model.pt")
    summary_path = run_dir / "summary.json"
    return {"config": yaml.safe_load((run_dir / "config.yaml").read_text()),
            "summary": json.loads(summary_path.read_text()) if summary_path.is_file() else {},
            "model_name": checkpoint["model"]["name"], "model_kwargs": checkpoint["model"]["kwargs"],
            "epoch": checkpoint.get("epoch"), "data_fingerprint": checkpoint.get("data_fingerprint"),
            "versions": checkpoint.get("versions", {}), "temperature": checkpoint.get("temperature"),
            "class_names": checkpoint.get("class_names")}


def _gallery(run_dir: Path, out_dir: Path, device: str) -> list[dict]:
    try:
        from lungdx.explain import review_gallery
    except ImportError:
        return []
    import pandas as pd

    predictions = pd.read_csv(run_dir / "evaluation" / "predictions.csv", dtype={"case_id": str, "patient_id": str})
    try:
        return review_gallery(run_dir, predictions, out_dir / "gallery", device=device)
    except Exception as err:  # the report is still worth having without its gallery
        logger.warning("%s: review gallery left out: %s", run_dir, err)
        return [{"error": str(err)}]


def _training_line(config: dict, info: dict, summary: dict) -> str:
    """The model card's training line: one fit's settings, or the stages of a staged model (``nodule_net``), which
    ignores ``train.epochs`` and ``train.patience``, or an ensemble's members (trained elsewhere, not here)."""
    train, stages = config["train"], summary.get("best_epochs")
    if summary.get("members"):
        return f"- Assembled from {len(summary['members'])} finished runs (no training of its own): " \
               f"{', '.join(f'`{member}`' for member in summary['members'])}."
    if isinstance(stages, dict) and "nodule" in config:
        nodule = config["nodule"]
        kept = ", ".join(f"{stage} {epoch}" for stage, epoch in stages.items())
        return (f"- Training in stages, each stopping on its validation loss: lungs up to {nodule['seg_epochs']} epochs "
                f"(patience {nodule['seg_patience']}), detector up to {nodule['det_epochs']} (patience "
                f"{nodule['det_patience']}), verifier and judge up to {nodule['judge_epochs']} (patience "
                f"{nodule['judge_patience']}, judge keeps its {nodule['judge_keep']} epoch); lr {train['lr']}, "
                f"batch {nodule['batch_size']} (judge {train['batch_size']}); epochs kept: {kept}.")
    return (f"- Training: {train['epochs']} epochs at most, lr {train['lr']}, batch {train['batch_size']}, early "
            f"stopping on validation loss (patience {train['patience']}); best epoch {info.get('epoch')} of "
            f"{summary.get('epochs_run', '?')}.")


def model_card(results: dict, info: dict) -> str:
    """The model card in Markdown: intended use, data, metrics with CIs, subgroups, calibration, limitations."""
    config, summary = info["config"], info["summary"]
    test = results["splits"]["test"]
    lines = [f"# Model card: {results['model']} for {results['task']}", "", f"**{NOT_FOR_CLINICAL_USE}**", "",
             "## Intended use", "",
             f"Research on automated {_task_phrase(results['task'])} in frontal (PA) chest radiographs, and "
             "comparison of methods on public data. Not intended for screening, diagnosis, triage or any decision "
             "about a patient.", "",
             "## Model", "",
             f"- Architecture: `{info['model_name']}` with arguments `{json.dumps(info['model_kwargs'])}`; one logit, "
             f"sigmoid probability of '{(info.get('class_names') or ['', 'positive'])[-1]}'.",
             f"- Input: {results['image_size']}x{results['image_size']} px, preprocessing "
             f"`{json.dumps(config.get('preprocess', {}))}`.",
             _training_line(config, info, summary),
             f"- Operating threshold {results['threshold']:.4f} ({results['threshold_method']}), chosen on validation "
             "and frozen for test.",
             f"- Software: {', '.join(f'{k} {v}' for k, v in info['versions'].items())}.", "",
             "## Data and splits", "",
             f"- Dataset: `{config['data']['path']}` (format {config['data']['format']}), task `{results['task']}`"
             f"{'; SYNTHETIC phantoms' if results.get('synthetic') else ''}.",
             "- Patient-level split: no patient has images in two splits. "
             + "; ".join(f"{SPLIT_TITLES[s]} {results['splits'][s]['counts']['n']} images "
                         f"({results['splits'][s]['counts']['n_pos']} positive)" for s in SPLIT_TITLES) + ".",
             f"- Training data fingerprint `{info.get('data_fingerprint')}`.", "",
             "## Performance", "", *metrics_table(results), "",
             "The paper's claims come from data that is not public; shown for reference only.", "",
             "## Calibration", "", _calibration_line(results), ""]
    if results.get("subgroups"):
        lines += ["## Subgroups (test split)", "", subgroup_markdown(results["subgroups"], results["confidence"])]
    lines += ["## Limitations", ""] + [f"- {text}" for text in limitations(results, info)] + [""]
    lines += [f"Test ROC AUC {metrics.format_ci(test['roc_auc'])} on {test['counts']['n']} images.", ""]
    return "\n".join(lines)


def _task_phrase(task: str) -> str:
    return {"malignant_vs_rest": "detection of malignant lung nodules",
            "nodule_vs_normal": "detection of lung nodules",
            "malignant_vs_benign": "classification of lung nodules as malignant or benign"}.get(task, f"'{task}' classification")


def _calibration_line(results: dict) -> str:
    test = results["calibration"]["test"]
    temperature = results.get("temperature") or 1.0
    how = f"after temperature scaling (T = {temperature:.3f}, fitted on validation)" if temperature != 1.0 else \
        "without temperature scaling"
    return (f"Test ECE {format_number(test['ece'])}, Brier score {format_number(test['brier'])}, {how}. "
            "See the reliability diagram.")


def limitations(results: dict, info: dict) -> list[str]:
    """Plain statements a reader needs before trusting any number in the report."""
    test = results["splits"]["test"]
    auc = test["roc_auc"]
    items = [NOT_FOR_CLINICAL_USE]
    if results.get("synthetic"):
        items.append("Trained and tested on synthetic phantoms: the numbers say nothing about real radiographs.")
    if auc["ci_low"] is not None and auc["ci_low"] == auc["ci_low"] and auc["ci_low"] <= 0.5:
        items.append("The test AUC's confidence interval includes 0.5: no evidence that the model discriminates better "
                     "than chance on unseen patients.")
    items.append(f"The test split holds {test['counts']['n']} images ({test['counts']['n_pos']} positive); intervals "
                 "this wide mean single-number comparisons between models are unreliable (use `lungdx compare`).")
    items.append("One dataset, one split: performance on other hospitals, scanners, populations and acquisition "
                 "protocols is unknown and likely lower.")
    if "jsrt" in str(info["config"]["data"]["path"]).lower():
        items.append("JSRT: digitised film from 14 Japanese institutions (1990s); nodule and non-nodule images were "
                     "collected as separate sets, so a model can learn set differences rather than nodules.")
    if (results.get("temperature") or 1.0) == 1.0:
        items.append("Probabilities are not calibrated (`lungdx calibrate` fits a temperature on validation); read "
                     "them as scores, not as risks.")
    return items


def report_html(results: dict, info: dict, card: str, evaluation_dir: Path, gallery: list[dict]) -> str:
    """The self-contained HTML page: model card, figures (data URIs), full evaluation tables, gallery."""
    import markdown

    def render(text: str) -> str:
        return markdown.markdown(text, extensions=["tables"])

    figures = "".join(
        f'<figure><img alt="{html.escape(FIGURE_TITLES[name])}" src="{_data_uri(evaluation_dir / file)}">'
        f"<figcaption>{html.escape(FIGURE_TITLES[name])}</figcaption></figure>"
        for name, file in FIGURES.items() if (evaluation_dir / file).is_file())
    evaluation = table_markdown(results).split("\n", 1)[1]
    title = f"lungdx report: {results['model']} on {results['task']}"
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><style>{REPORT_CSS}</style></head><body>"
            f"<div class=\"banner\">{html.escape(NOT_FOR_CLINICAL_USE)}</div><main>{render(card)}"
            f"<h2>Figures</h2><div class=\"figures\">{figures}</div>"
            f"<h2>Full evaluation</h2>{render(evaluation)}{_gallery_html(gallery)}</main></body></html>\n")


def _gallery_html(items: list[dict]) -> str:
    if not items:
        return ""
    if any("error" in item for item in items):
        return f"<h2>Review gallery</h2><p>Left out: {html.escape(items[0]['error'])}</p>"
    cards = []
    for item in items:
        caption = f"{item['category'].replace('_', ' ')}: {item['case_id']}, p = {item['probability']:.3f}"
        notice = f'<p class="notice">{html.escape(item["notice"])}</p>' if item.get("notice") else ""
        cards.append(f'<figure><img alt="{html.escape(caption)}" src="{_data_uri(Path(item["path"]))}">'
                     f"<figcaption>{html.escape(caption)}{notice}</figcaption></figure>")
    return ("<h2>Review gallery (test split)</h2><p>The most confident true positives, false positives, false negatives "
            "and true negatives, with the model's heatmap; circles mark the ground-truth nodule where the dataset "
            f"gives it.</p><div class=\"figures\">{''.join(cards)}</div>")


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


REPORT_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;background:#fafbfc}
main{max-width:1100px;margin:0 auto;padding:1rem 2rem 3rem}
.banner{background:#8b1a1a;color:#fff;padding:.7rem 2rem;font-weight:600}
table{border-collapse:collapse;margin:.8rem 0;font-size:.9rem}
th,td{border:1px solid #cfd6e0;padding:.3rem .6rem;text-align:left}
th{background:#eef2f7}
.figures{display:flex;flex-wrap:wrap;gap:1rem}
figure{margin:0;background:#fff;border:1px solid #dde3ea;padding:.5rem}
figure img{max-width:480px;height:auto;display:block}
figcaption{font-size:.85rem;color:#4a5568;margin-top:.3rem}
code{background:#eef2f7;padding:0 .2rem}
.alert{background:#fde8e8}.ok{background:#e8f6ec}
.notice{margin:.3rem 0 0;padding:.2rem .4rem;background:#b91c1c;color:#fff;font-weight:600}
"""
