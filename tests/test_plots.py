"""Figures: what is drawn is legible (text colour against its cell, labels inside the canvas)."""

import matplotlib

matplotlib.use("Agg")

from lungdx import plots  # noqa: E402


def _drawn_confusion(monkeypatch, counts):
    kept = {}

    def keep(figure, path):
        figure.canvas.draw()
        kept["figure"] = figure

    monkeypatch.setattr(plots, "_save", keep)
    plots.plot_confusion(counts, ["not malignant", "malignant"], "unused.png")
    return kept["figure"]


def test_confusion_counts_are_dark_on_light_cells_and_light_on_dark(monkeypatch):
    # the smallest count is more than half the largest: the old rule (count > max / 2) made every text white
    figure = _drawn_confusion(monkeypatch, {"tn": 40, "fp": 35, "fn": 30, "tp": 45})
    colours = {text.get_text(): text.get_color() for text in figure.axes[0].texts}
    assert colours == {"40": "white", "35": "black", "30": "black", "45": "white"}


def test_confusion_labels_lie_inside_the_figure(monkeypatch):
    figure = _drawn_confusion(monkeypatch, {"tn": 5, "fp": 1, "fn": 2, "tp": 9})
    figure.tight_layout()
    renderer = figure.canvas.get_renderer()
    canvas = figure.bbox
    axes = figure.axes[0]
    for label in [*axes.get_yticklabels(), *axes.get_xticklabels(), axes.yaxis.label, axes.xaxis.label]:
        box = label.get_window_extent(renderer)
        assert box.x0 >= canvas.x0 - 0.5 and box.x1 <= canvas.x1 + 0.5 and box.y0 >= canvas.y0 - 0.5, label.get_text()
