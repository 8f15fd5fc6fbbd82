"""Figures from results computed elsewhere (no metric arithmetic here)."""

from __future__ import annotations

from pathlib import Path

SPLIT_STYLE = {"train": ("Train", "tab:blue"), "val": ("Validation", "tab:orange"), "test": ("Test", "tab:green")}


def plot_roc(roc: dict[str, dict], path: str | Path, title: str = "ROC") -> None:
    """One ROC figure with a curve per split; ``roc[split]`` as from ``metrics.roc_points``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
