"""Figures from results computed elsewhere (no metric arithmetic here)."""

from __future__ import annotations

from pathlib import Path

SPLIT_STYLE = {"train": ("Train", "tab:blue"), "val": ("Validation", "tab:orange"), "test": ("Test", "tab:green")}


def plot_roc(roc: dict[str, dict], path: str | Path, title: str = "ROC") -> None:
    """One ROC figure with a curve per split; ``roc[split]`` as from ``metrics.roc_points``."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5, 5), dpi=120)
    for split, points in roc.items():
        name, colour = SPLIT_STYLE.get(split, (split, None))
        auc = points.get("auc")
        label = f"{name} (AUC {auc:.3f})" if auc is not None and auc == auc else f"{name} (AUC n/a)"
        axes.plot(points["fpr"], points["tpr"], color=colour, label=label, linewidth=1.8)
    axes.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="Chance")
    axes.set(xlabel="1 - specificity (false positive rate)", ylabel="Sensitivity (true positive rate)",
             xlim=(0, 1), ylim=(0, 1.01), title=title)
    axes.set_aspect("equal")
    axes.legend(loc="lower right", fontsize=8)
    _save(figure, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path) -> None:
    figure.tight_layout()
    figure.savefig(path)
    figure.clf()
    _pyplot().close(figure)


def plot_pr(pr: dict[str, dict], path: str | Path, title: str = "Precision-recall") -> None:
    """Precision-recall curves per split; ``pr[split]`` as from ``metrics.pr_points``."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5, 5), dpi=120)
    for split, points in pr.items():
        name, colour = SPLIT_STYLE.get(split, (split, None))
        axes.step(points["recall"], points["precision"], where="post", color=colour, linewidth=1.8,
                  label=f"{name} (AP {points['average_precision']:.3f}, prevalence {points['prevalence']:.2f})")
    axes.set(xlabel="Recall (sensitivity)", ylabel="Precision (PPV)", xlim=(0, 1), ylim=(0, 1.01), title=title)
    axes.legend(loc="lower left", fontsize=8)
    _save(figure, path)


def plot_reliability(curves: dict[str, dict], path: str | Path, title: str = "Reliability") -> None:
    """Reliability diagram per split; ``curves[split]`` as from ``metrics.reliability_curve``."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5, 5), dpi=120)
    axes.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="Perfect calibration")
    for split, curve in curves.items():
        name, colour = SPLIT_STYLE.get(split, (split, None))
        axes.plot(curve["mean_probability"], curve["observed_frequency"], marker="o", color=colour, label=name,
                  linewidth=1.5, markersize=4)
    axes.set(xlabel="Mean predicted probability", ylabel="Observed frequency of positives", xlim=(0, 1),
             ylim=(0, 1.01), title=title)
    axes.set_aspect("equal")
    axes.legend(loc="upper left", fontsize=8)
    _save(figure, path)


def plot_confusion(counts: dict, class_names: list[str], path: str | Path, title: str = "Confusion matrix") -> None:
    """2x2 confusion matrix from counts ``tp, fp, tn, fn`` (rows: truth, columns: decision)."""
    plt = _pyplot()
    matrix = [[counts["tn"], counts["fp"]], [counts["fn"], counts["tp"]]]
    figure, axes = plt.subplots(figsize=(4.6, 3.8), dpi=120)
    image = axes.imshow(matrix, cmap="Blues")
    for row in range(2):
        for column in range(2):
            axes.text(column, row, str(matrix[row][column]), ha="center", va="center", fontsize=14,
                      color=cell_text_colour(image.norm(matrix[row][column])))
    axes.set_xticks([0, 1], list(class_names), fontsize=8)
    # y tick labels upright along the axis: horizontal ones as long as "truly not malignant" were cut off at the edge
    axes.set_yticks([0, 1], list(class_names), fontsize=8, rotation=90, va="center")
    axes.set_xlabel("decision at the threshold", fontsize=8)
    axes.set_ylabel("truth", fontsize=8)
    axes.set_title(title, fontsize=9)
    _save(figure, path)


def cell_text_colour(shade: float) -> str:
    """White on the darker half of a colour scale, black on the lighter, from the cell's place on the scale (0..1).

    The place comes from the image's own normalisation (``image.norm``), which runs from the smallest count
    to the largest: a threshold at half the largest count put white text on light cells when the smallest
    count was large.
    """
    return "white" if float(shade) > 0.5 else "black"


def plot_score_histograms(probability, target, threshold: float, path: str | Path, title: str = "Scores") -> None:
    """Histograms of the probability per true class, with the operating threshold."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    bins = [i / 20 for i in range(21)]
    axes.hist(probability[target == 0], bins=bins, alpha=0.6, color="tab:blue", label=f"negative (n={int((target == 0).sum())})")
    axes.hist(probability[target == 1], bins=bins, alpha=0.6, color="tab:red", label=f"positive (n={int((target == 1).sum())})")
    axes.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:.3f}")
    axes.set(xlabel="Predicted probability", ylabel="Images", xlim=(0, 1), title=title)
    axes.legend(fontsize=8)
    _save(figure, path)


def plot_training_curves(history, path: str | Path, title: str = "Training", best_epoch: int | None = None) -> None:
    """Loss and AUC per epoch for train and validation, from a run's ``history.csv`` (a DataFrame).

    ``best_epoch`` marks the epoch the run kept (its ``summary.json``); without it, the least validation loss (the
    same unless early stopping's ``min_delta`` passed over a smaller improvement).
    """
    if "stage" in history.columns:
        _plot_stage_curves(history, path, title)
        return
    plt = _pyplot()
    figure, (loss_axes, auc_axes) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    for split, name in (("train", "Train"), ("val", "Validation")):
        colour = SPLIT_STYLE[split][1]
        loss_axes.plot(history["epoch"], history[f"{split}_loss"], color=colour, label=name)
        auc_axes.plot(history["epoch"], history[f"{split}_auc"], color=colour, label=name)
    best = best_epoch if best_epoch is not None else history["epoch"][history["val_loss"].idxmin()]
    for axes in (loss_axes, auc_axes):
        axes.axvline(best, color="0.5", linestyle=":", linewidth=1, label=f"best epoch {best}")
        axes.set_xlabel("Epoch")
        axes.legend(fontsize=8)
    loss_axes.set(ylabel="BCE loss", title="Loss")
    auc_axes.set(ylabel="ROC AUC", ylim=(0, 1), title="AUC")
    figure.suptitle(title, fontsize=10)
    _save(figure, path)


def _plot_stage_curves(history, path: str | Path, title: str) -> None:
    """A staged run's history (nodule_net: lungs, detector, judge): the losses of each stage side by side."""
    plt = _pyplot()
    stages = list(dict.fromkeys(history["stage"]))
    figure, axes_row = plt.subplots(1, len(stages), figsize=(4 * len(stages), 3.4), dpi=120, squeeze=False)
    for axes, stage in zip(axes_row[0], stages, strict=True):
        rows = history[history["stage"] == stage]
        for split, name in (("train", "Train"), ("val", "Validation")):
            axes.plot(rows["epoch"], rows[f"{split}_loss"], color=SPLIT_STYLE[split][1], label=name)
        best = rows["epoch"][rows["val_loss"].idxmin()]
        axes.axvline(best, color="0.5", linestyle=":", linewidth=1, label=f"best epoch {best}")
        axes.set(xlabel="Epoch", ylabel="Loss", title=stage)
        axes.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    _save(figure, path)
