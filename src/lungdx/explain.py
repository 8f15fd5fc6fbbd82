"""Explanations: Grad-CAM, Grad-CAM++ and occlusion heatmaps, overlays, a review gallery, the pointing game.

Heatmaps are computed once (``compute_heatmaps``, ``explain_levelled``, ``explain_file``) and plotted
separately (``plot_overlay``). Every heatmap is a float32 array in [0, 1] with the input's height and
width, computed in evaluation mode and fp32, so that it is deterministic and the same for a batch as
for its images one by one. One rule (``heatmap_problem``) says when a map is empty or near-empty, and
every place that shows one (``lungdx explain``, the review gallery, the service, the Secondary
Capture) writes its ``heatmap_notice`` beside it instead of a blank overlay.

- Grad-CAM (Selvaraju et al. 2017) and Grad-CAM++ (Chattopadhay et al. 2018) explain the model's
  single logit (before the sigmoid) at the module named by the model's ``gradcam_layer``.
- Occlusion sensitivity (Zeiler and Fergus 2014) is model-agnostic: the drop of the logit when a
  square patch of the model input is set to 0, the image mean under per-image normalisation.

Written here rather than taken from pytorch-grad-cam or captum: both fit a single-logit model
(target index 0), but pytorch-grad-cam's ``BaseCAM`` puts the model into evaluation mode for good and
converts activations to numpy (which fails on bf16 autocast), captum has no Grad-CAM++, and the
shared core is some 40 lines. Owning it lets the hook clone the layer's output, so a model that
modifies it in place afterwards (torchvision's DenseNet applies ``F.relu(inplace=True)`` to its
features) still gets the gradient of the layer's true output.

The pointing game (Zhang et al. 2018) asks whether a heatmap's maximum falls inside the ground-truth
nodule circle, enlarged by a stated tolerance; the energy share is the fraction of the heatmap's
sum inside that circle. A uniformly random heatmap scores the circle's area fraction on both,
over the image or over the lung field: that is the random baseline reported beside them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from lungdx.config import PreprocessConfig, load_config
from lungdx.data.nodules import JSRT_PIXEL_MM_2048, _finite, nodule_circle  # noqa: F401  (re-exported)
from lungdx.io import ImageReadError, read_image
from lungdx.metrics import bootstrap_means
from lungdx.predict import Predictor, model_input
from lungdx.preprocess import GridMap  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

METHODS = ("gradcam", "gradcampp", "occlusion")
MAP_METHODS = ("nodule_map",)  # a localising model's own output (nodule_net), not an explanation of any model
DEFAULT_TOLERANCE = 1 / 16
"""Pointing-game tolerance as a fraction of the model input's side: 16 px at 256 px, one cell of
paper_cnn's 16 x 16 Grad-CAM grid (about 22 mm on JSRT)."""
REVIEW_CATEGORIES = {  # name: (target, label, most confident first = highest probability first)
    "true_positive": (1, 1, False), "false_positive": (0, 1, False),
    "false_negative": (1, 0, True), "true_negative": (0, 0, True),
}


# --------------------------------------------------------------------------------------------
# Heatmaps from a model and a (N, C, H, W) model input
# --------------------------------------------------------------------------------------------


def find_layer(model: nn.Module, name: str | None = None) -> nn.Module:
    """The module explained by Grad-CAM: ``name``, or the model's declared ``gradcam_layer``."""
    name = name or getattr(model, "gradcam_layer", None)
    if not name:
        raise ValueError(f"{type(model).__name__} declares no gradcam_layer; pass the layer name explicitly")
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        raise ValueError(f"{type(model).__name__} has no module '{name}' (its gradcam_layer)") from err


@contextlib.contextmanager
def evaluation_mode(model: nn.Module):
    """Evaluation mode for the duration (batch norm uses running statistics, no dropout), then restore."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def gradcam(model: nn.Module, images: torch.Tensor, *, layer: str | None = None, plus_plus: bool = False,
            batch_size: int = 1) -> np.ndarray:
    """Grad-CAM (or Grad-CAM++) of the single logit: (N, H, W) float32 in [0, 1].

    Args:
        model: maps (N, C, H, W) to (N, 1) logits and declares ``gradcam_layer`` (or pass ``layer``).
        images: the model input, already normalised.
        layer: dotted module name overriding ``model.gradcam_layer``.
        plus_plus: Grad-CAM++ channel weights instead of mean gradients.
        batch_size: images per forward/backward pass. The default, one, makes an image's heatmap
            independent of its batch-mates: batched kernels differ in the last bits, and a max-pooling
            after the layer sends the gradient to one of two near-equal maxima, which those bits can
            flip (seen on vgg16_bn: 1e-3 differences in Grad-CAM++).
    """
    _check_images(images)
    module, captured = find_layer(model, layer), {}

    def keep_activation(_module, _inputs, output):
        if not isinstance(output, torch.Tensor) or output.ndim != 4:
            raise ValueError(f"Grad-CAM needs a (N, C, h, w) tensor from '{layer or model.gradcam_layer}'")
        captured["activation"] = output.detach().float().requires_grad_(True)
        # A copy goes on, so in-place operations after the layer cannot change what is explained.
        return captured["activation"].clone().to(output.dtype)

    handle = module.register_forward_hook(keep_activation)
    try:
        with evaluation_mode(model), torch.enable_grad():
            cams = [_cam(model, chunk, captured, plus_plus) for chunk in images.split(batch_size)]
    finally:
        handle.remove()
    return _to_input_size(torch.cat(cams), images.shape[-2:])


def _cam(model: nn.Module, images: torch.Tensor, captured: dict, plus_plus: bool) -> torch.Tensor:
    logits = model(images)
    if logits.numel() != len(images):
        raise ValueError(f"explanations need one logit per image; the model returned shape {tuple(logits.shape)}")
    activation = captured.pop("activation", None)
    if activation is None:
        raise ValueError(f"the Grad-CAM layer of {type(model).__name__} was not called in its forward pass")
    (grads,) = torch.autograd.grad(logits.float().sum(), activation)  # eval mode: images do not interact
    if plus_plus:
        # Chattopadhay et al. 2018, eq. 19 with an exponential of the logit as the score.
        grads_2, grads_3 = grads ** 2, grads ** 3
        denominator = 2 * grads_2 + activation.sum(dim=(2, 3), keepdim=True) * grads_3
        alpha = grads_2 / torch.where(denominator != 0, denominator, torch.ones_like(denominator))
        weights = (alpha * F.relu(grads)).sum(dim=(2, 3), keepdim=True)
    else:
        weights = grads.mean(dim=(2, 3), keepdim=True)
    cams = (weights * activation).sum(dim=1)
    if len(cams) == 2 * len(images):
        # The layer ran on the images and then on their mirror images (nodule_net's tta=hflip, alone or as an
        # ensemble member): each image's heatmap is its own pass plus its mirror's, mirrored back.
        cams = cams[: len(images)] + cams[len(images) :].flip(-1)
    elif len(cams) != len(images):
        raise ValueError(f"the Grad-CAM layer of {type(model).__name__} saw {len(cams)} rows for {len(images)} images")
    return F.relu(cams).detach()


def occlusion(model: nn.Module, images: torch.Tensor, *, patch: int | None = None, stride: int | None = None,
              batch_size: int = 64) -> np.ndarray:
    """Occlusion sensitivity: (N, H, W) float32 in [0, 1], the logit's drop when a patch is set to 0.

    Args:
        patch: side of the square patch in pixels; default an eighth of the shorter side.
        stride: step between patches, at most the patch; default half the patch. Every pixel is covered,
            and its value is the mean drop over the patches that cover it.

    Raises:
        ValueError: ``patch`` or ``stride`` under 1, or ``stride`` over ``patch``.
    """
    _check_images(images)
    height, width = images.shape[-2:]
    patch = max(1, min(height, width) // 8) if patch is None else patch
    stride = max(1, patch // 2) if stride is None else stride
    if patch < 1 or stride < 1 or stride > patch:
        # A stride over the patch leaves pixels no patch covers: their mean drop is 0/0, and the NaN peak
        # would blank the whole map, which then reads as "heatmap empty".
        raise ValueError(f"occlusion needs 1 <= stride <= patch (pixels), got patch {patch} and stride {stride}")
    windows = [(top, left) for top in _starts(height, patch, stride) for left in _starts(width, patch, stride)]
    maps = []
    with evaluation_mode(model), torch.no_grad():
        for image in images:
            reference = model(image[None]).float().reshape(())
            drop = torch.zeros((height, width), dtype=torch.float32, device=images.device)
            count = torch.zeros_like(drop)
            for start in range(0, len(windows), batch_size):
                chunk = windows[start : start + batch_size]
                occluded = image[None].repeat(len(chunk), 1, 1, 1)
                for index, (top, left) in enumerate(chunk):
                    occluded[index, :, top : top + patch, left : left + patch] = 0
                logits = model(occluded).float().reshape(-1)
                for (top, left), logit in zip(chunk, reference - logits, strict=True):
                    drop[top : top + patch, left : left + patch] += logit
                    count[top : top + patch, left : left + patch] += 1
            maps.append(F.relu(drop / count))
    return _normalise(torch.stack(maps))


def _starts(length: int, patch: int, stride: int) -> list[int]:
    patch = min(patch, length)
    starts = list(range(0, length - patch + 1, stride))
    return starts if starts[-1] == length - patch else starts + [length - patch]


def compute_heatmaps(model: nn.Module, images: torch.Tensor, method: str = "gradcam", **options) -> np.ndarray:
    """Heatmaps (N, H, W) float32 in [0, 1] by ``method`` (one of ``METHODS``) for a model input."""
    if method == "gradcam":
        return gradcam(model, images, **options)
    if method == "gradcampp":
        return gradcam(model, images, plus_plus=True, **options)
    if method == "occlusion":
        return occlusion(model, images, **options)
    if method == "nodule_map":
        return nodule_map(model, images)
    raise ValueError(f"unknown explanation method '{method}' (use {', '.join(METHODS + MAP_METHODS)})")


@torch.no_grad()
def nodule_map(model: nn.Module, images: torch.Tensor) -> np.ndarray:
    """A localising model's own nodule map: P(nodule) per cell, upsampled to the input (N, H, W), not rescaled.

    Unlike Grad-CAM this is what the model was trained to output (a target map around each nodule),
    so its peak is the model's location and its values are probabilities.
    """
    _check_images(images)
    if not hasattr(model, "analyse"):
        raise ValueError(f"{type(model).__name__} has no nodule map (only localising models such as nodule_net do)")
    with evaluation_mode(model):
        maps = torch.sigmoid(model.analyse(images).nodule_map.float())
    maps = F.interpolate(maps, size=tuple(images.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
    return maps.clamp(0.0, 1.0).cpu().numpy().astype(np.float32)


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] == 0:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected a non-empty (N, C, H, W) tensor, got {shape}")


def _to_input_size(cams: torch.Tensor, size: Sequence[int]) -> np.ndarray:
    cams = F.interpolate(cams[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    return _normalise(cams)


def _normalise(maps: torch.Tensor) -> np.ndarray:
    """Each map divided by its maximum; a map with no positive value stays all zero."""
    peak = maps.flatten(1).amax(dim=1).clamp_min(0)[:, None, None]
    scaled = torch.where(peak > 0, maps / torch.where(peak > 0, peak, 1.0), torch.zeros_like(maps))
    return scaled.clamp(0.0, 1.0).cpu().numpy().astype(np.float32)


# --------------------------------------------------------------------------------------------
# Empty maps: one rule for every place that shows a heatmap
# --------------------------------------------------------------------------------------------


VISIBLE_LEVEL = 0.05
"""Heat below this, on the [0, 1] scale every overlay draws, is all but invisible: ``plot_overlay`` and the
Secondary Capture blend with alpha 0.55 * heat ** 0.7 (under 7% here, in jet's darkest blue), the web
page with alpha = heat times its opacity slider (2.5% at the default 50%)."""
MIN_VISIBLE_SHARE = 1e-4
"""Share of a map's pixels below which "some pixels reach the level" still means "nothing to see".
One in 10 000 keeps the smallest honest maps on a 256 px grid: one 4 px cell of nodule_net's map (16 px,
2.4e-4) and the disc of a 5 mm JSRT nodule (about 10 px, 1.5e-4); a lone hot pixel (1.5e-5) counts as empty."""
NOTICE_COLOUR = "#b91c1c"  # the red of the web page's positive decision and warnings
METHOD_TITLES = {"gradcam": "Grad-CAM", "gradcampp": "Grad-CAM++", "occlusion": "occlusion", "nodule_map": "nodule map"}


def heatmap_problem(heatmap: np.ndarray) -> str | None:
    """Why a heatmap shows nothing a reader can use (a short phrase), or None when it does.

    Judged on the map as every overlay draws it, clipped to [0, 1], in this order:

    - ``not finite``: a NaN or infinite value (nothing downstream can draw it honestly);
    - ``all zero``: no pixel carries any weight (Grad-CAM of a weak model: its ReLUs pass no positive
      evidence; occlusion where no patch lowers the logit);
    - ``near-empty``: fewer than ``MIN_VISIBLE_SHARE`` of the pixels reach ``VISIBLE_LEVEL``, so the
      overlay is transparent to the eye (a nodule map of probabilities all under 5%);
    - ``flat``: fewer than ``MIN_VISIBLE_SHARE`` of the pixels lie ``VISIBLE_LEVEL`` or more below the
      peak, so the overlay is one even tint that points nowhere.

    Both shares are fractions of the pixels, not counts, so the verdict does not depend on the pixel
    order and hardly on the grid (upsampling by a whole factor, nearest-neighbour, keeps it exactly):
    the model's grid, the image's and the preview's agree. The last two rules mirror each other: a map
    with its peak at 1 is flat exactly when ``1 - map`` is all zero or near-empty.
    The levels are absolute because the overlays are: Grad-CAM and occlusion maps are scaled to a peak
    of 1, a nodule map's values are probabilities and a low one is honestly near-empty.
    """
    heatmap = np.asarray(heatmap, dtype=np.float64)
    if heatmap.size == 0:
        return "no pixels"
    finite = np.isfinite(heatmap)
    if not finite.all():
        return f"not finite ({heatmap.size - int(finite.sum())} of {heatmap.size} values NaN or infinite)"
    shown = np.clip(heatmap, 0.0, 1.0)
    peak = shown.max()
    if peak <= 0:
        return "all zero"
    visible = np.count_nonzero(shown >= VISIBLE_LEVEL)
    if visible < MIN_VISIBLE_SHARE * shown.size:
        share = f"only {100 * visible / shown.size:.2g}% of pixels reach" if visible else "no pixel reaches"
        return f"near-empty ({share} {VISIBLE_LEVEL:g})"
    below_peak = np.count_nonzero(shown <= peak - VISIBLE_LEVEL)
    if below_peak < MIN_VISIBLE_SHARE * shown.size:
        share = f"all but {100 * below_peak / shown.size:.2g}% of pixels" if below_peak else "every pixel"
        return f"flat ({share} within {VISIBLE_LEVEL:g} of its peak)"
    return None


def heatmap_notice(heatmap: np.ndarray, method: str | None = None) -> str | None:
    """The line to show beside an empty or near-empty heatmap (``heatmap_problem``), or None when it is fine.

    For example ``"heatmap empty (Grad-CAM): all zero"``: short enough to burn into an overlay.
    """
    problem = heatmap_problem(heatmap)
    if problem is None:
        return None
    return f"heatmap empty ({METHOD_TITLES.get(method, method)}): {problem}" if method else f"heatmap empty: {problem}"


def fallback_method(method: str, model: nn.Module) -> str | None:
    """The method to try when ``method``'s map is empty, or None when no other is left.

    The model's own nodule map where it has one, occlusion (model-agnostic) otherwise, Grad-CAM after an
    empty occlusion.
    """
    candidates = ("nodule_map",) if hasattr(model, "analyse") else ()
    candidates += ("occlusion",) + (("gradcam",) if getattr(model, "gradcam_layer", None) else ())
    return next((candidate for candidate in candidates if candidate != method), None)


@dataclass
class HonestHeatmap:
    """A heatmap chosen so that an empty one is never shown as if it were a map (:func:`choose_heatmap`)."""

    method: str
    heatmap: np.ndarray
    problem: str | None
    """``heatmap_problem`` of the map shown (None: it shows something)."""
    requested: str
    fallback: str | None
    """The method tried because ``requested``'s map was empty, or None."""
    notice: str | None
    """One sentence for the reader when the requested map was empty, else None."""


def choose_heatmap(compute: Callable[[str], np.ndarray], requested: str, model: nn.Module) -> HonestHeatmap:
    """The requested method's map, or one fallback's (``fallback_method``) when it is empty, with the notice to show.

    ``compute(method)`` returns the map on the grid it will be drawn on (emptiness is judged there).
    The service, the review page and the Secondary Capture all choose and word it through this.
    """
    method, heatmap = requested, compute(requested)
    first = problem = heatmap_problem(heatmap)
    fallback = None if first is None else fallback_method(requested, model)
    if fallback is not None:
        method, heatmap = fallback, compute(fallback)
        problem = heatmap_problem(heatmap)

    def named(name: str) -> str:
        return "the model's nodule map" if name == "nodule_map" else f"the {METHOD_TITLES[name]} heatmap"

    notice = None if first is None else f"Heatmap empty: {named(requested)} is {first}"
    if first is not None and fallback is not None:
        notice += f"; showing {named(fallback)} instead." if problem is None else f", and {named(fallback)} is {problem}"
    if problem is not None:
        notice += "; no overlay to show."
    return HonestHeatmap(method, heatmap, problem, requested, fallback, notice)


# --------------------------------------------------------------------------------------------
# With a Predictor: the same pixels the prediction sees
# --------------------------------------------------------------------------------------------


def resolve_method(method: str, model: nn.Module) -> str:
    """``auto``: the model's own nodule map for a localising model (one with ``analyse``), Grad-CAM otherwise."""
    if method == "auto":
        return "nodule_map" if hasattr(model, "analyse") else "gradcam"
    return method


def explain_levelled(predictor: Predictor, levelled: np.ndarray, method: str = "gradcam", **options) -> np.ndarray:
    """Heatmaps (N, size, size) for levelled images (N, size, size) in [0, 1], as ``Predictor`` sees them."""
    levelled = torch.from_numpy(np.asarray(levelled, dtype=np.float32))
    images = model_input(levelled, predictor.preprocess_config, predictor.hardware)
    return compute_heatmaps(predictor.model, images, method, **options)


@dataclass
class Explanation:
    """One image's explanation: the heatmap on the model's grid and on the image's own pixel grid."""

    source: str
    method: str
    pixels: np.ndarray = field(repr=False)
    levelled: np.ndarray = field(repr=False)
    heatmap: np.ndarray = field(repr=False)
    heatmap_original: np.ndarray = field(repr=False)
    probability: float
    threshold: float | None
    class_name: str | None
    warnings: list[str] = field(default_factory=list)
    notice: str | None = None  # ``heatmap_notice`` of the image-grid heatmap: set when it is empty or near-empty


def explain_file(predictor: Predictor, path: str | Path, method: str = "gradcam", **options) -> Explanation:
    """Read, level, predict and explain one image file (PNG, JPEG, TIFF, DICOM, JSRT ``.IMG``).

    The file goes through the predictor's acceptance policy, as in ``lungdx predict``.

    Raises:
        ImageReadError: the file cannot be read, or the policy refuses it (``Refused``).
    """
    image = predictor.read(path)
    levelled = predictor.level(image.pixels)
    heatmap = explain_levelled(predictor, levelled[None], method, **options)[0]
    probability = float(predictor.probabilities(levelled[None])[0])
    threshold = predictor.threshold
    class_name = None if threshold is None else predictor.class_names[int(probability >= threshold)]
    heatmap_original = to_original_grid(heatmap, image.pixels.shape, predictor.preprocess_config)
    return Explanation(
        source=str(path), method=method, pixels=image.pixels, levelled=levelled, heatmap=heatmap,
        heatmap_original=heatmap_original, probability=probability, threshold=threshold, class_name=class_name,
        warnings=list(image.meta.get("warnings", [])), notice=heatmap_notice(heatmap_original, method))


# --------------------------------------------------------------------------------------------
# Geometry between an image's pixels and the model's grid (undoing ``preprocess.level``)
# --------------------------------------------------------------------------------------------


def to_original_grid(heatmap: np.ndarray, shape: Sequence[int], config: PreprocessConfig) -> np.ndarray:
    """A (size, size) heatmap mapped back onto an image of ``shape`` (undoes the pad/resize or crop)."""
    return GridMap.of(shape, config).to_image(heatmap, shape)


# --------------------------------------------------------------------------------------------
# Figures (plotting only: everything shown is computed above)
# --------------------------------------------------------------------------------------------


def plot_overlay(image: np.ndarray, heatmap: np.ndarray, path: str | Path, *, probability: float | None = None,
                 threshold: float | None = None, class_name: str | None = None,
                 circle: tuple[float, float, float] | None = None, title: str = "", notice: str | None = None,
                 width_in: float = 3.6, dpi: int = 100) -> Path:
    """Heatmap over the radiograph with a colour bar, the probability and threshold, and the nodule circle.

    ``notice`` (``heatmap_notice``: the map is empty) is written in white on red across the foot of the
    image, where the heat would be, so an empty overlay never passes for a map that found nothing.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Circle

    height, width = image.shape
    figure = Figure(figsize=(width_in * 1.25, width_in * height / width + 0.55), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="antialiased")
    # Transparency grows with relevance, so low values leave the radiograph visible.
    shown = axes.imshow(heatmap, cmap="jet", vmin=0.0, vmax=1.0, alpha=0.55 * np.clip(heatmap, 0, 1) ** 0.7,
                        interpolation="antialiased")
    figure.colorbar(shown, ax=axes, fraction=0.046, pad=0.03).set_label("relevance", fontsize=8)
    if circle is not None:
        axes.add_patch(Circle(circle[:2], circle[2], fill=False, edgecolor="lime", linewidth=1.4))
    axes.set_axis_off()
    axes.set_title(title, fontsize=8)
    if notice:  # wrapped to the image's width: about 0.6 em a character at 7 pt, on some 80% of the figure
        lines = textwrap.fill(notice, max(20, round(width_in * 1.25 * 72 * 0.8 / (7 * 0.6))))
        axes.text(0.5, 0.03, lines, transform=axes.transAxes, ha="center", va="bottom", fontsize=7, color="white",
                  bbox={"boxstyle": "square,pad=0.4", "facecolor": NOTICE_COLOUR, "edgecolor": "none"})
    if probability is not None:
        caption = f"p = {probability:.3f}"
        caption += f"   threshold {threshold:.3f}" if threshold is not None else "   (no threshold)"
        caption += f"   -> {class_name}" if class_name else ""
        figure.text(0.5, 0.015, caption, ha="center", va="bottom", fontsize=8)
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def write_explanation(explanation: Explanation, path: str | Path) -> tuple[Path, Path]:
    """The overlay PNG at ``path`` (the image's own geometry) and the heatmap ``.npy`` beside it.

    ``path`` without a suffix gets ``.png`` (matplotlib would add it anyway, and the paths returned must be
    the files written); an existing folder gets ``IMAGE-STEM_METHOD.png``, as ``lungdx explain`` names it.

    Returns:
        The paths of the PNG and of the ``.npy`` as written.
    """
    path = Path(path)
    if path.is_dir():
        path = path / f"{Path(explanation.source).stem}_{explanation.method}.png"
    elif not path.suffix:
        path = path.with_suffix(".png")
    title = f"{Path(explanation.source).name}: {explanation.method}"
    plot_overlay(explanation.pixels, explanation.heatmap_original, path, probability=explanation.probability,
                 threshold=explanation.threshold, class_name=explanation.class_name, title=title,
                 notice=explanation.notice)
    npy = path.with_suffix(".npy")
    np.save(npy, explanation.heatmap_original)
    return path, npy


# --------------------------------------------------------------------------------------------
# Review gallery: the most confident TP, FP, FN and TN of the test split
# --------------------------------------------------------------------------------------------


def select_review_cases(predictions: pd.DataFrame, per_category: int = 3, split: str = "test") -> pd.DataFrame:
    """The ``per_category`` most confident cases of each category in ``REVIEW_CATEGORIES``.

    ``predictions`` has ``case_id``, ``split``, ``target``, ``probability`` and ``label`` (as in
    ``evaluation/predictions.csv``). Most confident: highest probability for predicted positives,
    lowest for predicted negatives; ties by ``case_id``.
    """
    rows = predictions[predictions["split"] == split] if "split" in predictions.columns else predictions
    chosen = []
    for category, (target, label, ascending) in REVIEW_CATEGORIES.items():
        members = rows[(rows["target"] == target) & (rows["label"] == label)]
        members = members.sort_values(["probability", "case_id"], ascending=[ascending, True], kind="mergesort")
        chosen.append(members.head(per_category).assign(category=category))
    return pd.concat(chosen, ignore_index=True)


def review_gallery(run_dir: str | Path, predictions: pd.DataFrame, out_dir: str | Path, *, per_category: int = 3,
                   method: str = "gradcam", device: str = "auto", split: str = "test", dpi: int = 100) -> list[dict]:
    """Overlays of the most confident true/false positives/negatives of a run's test split.

    Heatmaps are computed once for all chosen cases, then each overlay is drawn on the levelled image
    the model saw, with the ground-truth nodule circle where the dataset gives one.

    Args:
        run_dir: a run folder (``config.yaml``, ``model.pt``); its dataset gives paths and nodules.
        predictions: ``evaluation/predictions.csv`` of the run (``label`` is derived from the
            checkpoint's threshold when absent).
        out_dir: where the PNGs go.
        dpi: resolution of the PNGs (100: about 450 x 415 px).

    Returns:
        One dict per overlay, in category order: ``category``, ``case_id``, ``probability``,
        ``target``, ``label``, ``path`` (the PNG), ``nodule`` (whether a circle is drawn) and ``notice``
        (``heatmap_notice``, also written on the PNG; None when the map shows something).
    """
    from lungdx.data.manifest import load_configured_dataset

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    predictor = Predictor.from_path(run_dir, device=device)
    if "label" not in predictions.columns:
        predictions = predictions.assign(label=(predictions["probability"] >= predictor.threshold).astype(int))
    chosen = select_review_cases(predictions.astype({"case_id": str}), per_category, split)
    if chosen.empty:
        return []
    config = load_config(run_dir / "config.yaml")
    dataset = load_configured_dataset(config.data).set_index("case_id")
    missing = sorted(set(chosen["case_id"]) - set(dataset.index))
    if missing:
        raise ValueError(f"{config.data.path}: cases of the predictions are not in the dataset, e.g. {missing[0]}")
    images = [read_image(dataset.loc[case, "path"]).pixels for case in chosen["case_id"]]
    levelled = np.stack([predictor.level(pixels) for pixels in images])
    heatmaps = explain_levelled(predictor, levelled, method)
    return [_gallery_entry(row, levelled[index], heatmaps[index], images[index].shape, dataset.loc[row.case_id],
                           predictor, out_dir, method, dpi) for index, row in enumerate(chosen.itertuples())]


def _gallery_entry(row, levelled: np.ndarray, heatmap: np.ndarray, shape, case: pd.Series, predictor: Predictor,
                   out_dir: Path, method: str, dpi: int) -> dict:
    circle = nodule_circle(case, shape)
    if circle is not None:
        circle = GridMap.of(shape, predictor.preprocess_config).point_to_grid(*circle)
    label = int(row.label)
    title = f"{row.category.replace('_', ' ')}: {row.case_id} (target {int(row.target)}, {method})"
    notice = heatmap_notice(heatmap, method)
    path = plot_overlay(levelled, heatmap, out_dir / f"{row.category}_{row.case_id}_{method}.png",
                        probability=float(row.probability), threshold=predictor.threshold,
                        class_name=predictor.class_names[label], circle=circle, title=title, notice=notice, dpi=dpi)
    return {"category": row.category, "case_id": row.case_id, "probability": float(row.probability),
            "target": int(row.target), "label": label, "path": str(path), "nodule": circle is not None,
            "notice": notice}


# --------------------------------------------------------------------------------------------
# Localisation: the pointing game and the energy share, beside a random-heatmap baseline
# --------------------------------------------------------------------------------------------


PER_CASE_COLUMNS = ("hit", "energy_share", "flat", "random_image", "random_lung", "peak_x", "peak_y", "peak_distance_px",
                    "peak_in_lung")
_NO_PEAK = {"peak_x": np.nan, "peak_y": np.nan, "peak_distance_px": np.nan, "peak_in_lung": np.nan}


def pointing_game(heatmaps: np.ndarray, circles: np.ndarray, *, tolerance_px: float = 0.0,
                  regions: np.ndarray | None = None) -> pd.DataFrame:
    """Per case: ``hit``, ``energy_share`` and the random baselines, all on the heatmaps' grid.

    Args:
        heatmaps: (N, H, W) non-negative.
        circles: (N, 3) nodule (column, row, radius) in heatmap pixels.
        tolerance_px: added to each radius.
        regions: (N, H, W) boolean lung fields for the lung-field baseline (None: not reported).

    Returns:
        ``hit`` (the first maximum, in row-major order, lies in the enlarged circle; a flat
        heatmap has no maximum and misses), ``energy_share`` (heatmap sum inside the enlarged
        circle over its total; 0 for an all-zero heatmap), ``flat`` (one value everywhere: all zero,
        or constant), ``random_image``
        and ``random_lung`` (the enlarged circle's area fraction of the image / lung field: both
        the hit probability of a uniformly random maximum and the energy share of a uniform heatmap),
        ``peak_x``, ``peak_y`` (the maximum's column and row), ``peak_distance_px`` (from the nodule
        centre) and ``peak_in_lung`` (1 when the maximum lies in the lung field); the four are NaN for
        a flat heatmap, so that its made-up peak enters no mean.
    """
    heatmaps, circles = np.asarray(heatmaps, dtype=np.float64), np.asarray(circles, dtype=np.float64)
    if heatmaps.ndim != 3 or circles.shape != (len(heatmaps), 3):
        raise ValueError(f"expected heatmaps (N, H, W) and circles (N, 3); got {heatmaps.shape} and {circles.shape}")
    rows, columns = np.mgrid[0 : heatmaps.shape[1], 0 : heatmaps.shape[2]]
    records = []
    for index, (heatmap, (x, y, radius)) in enumerate(zip(heatmaps, circles, strict=True)):
        inside = (columns - x) ** 2 + (rows - y) ** 2 <= (radius + tolerance_px) ** 2
        # Flat: one value everywhere (all zero, or a constant map such as an occlusion patch as large as the image
        # gives), so no maximum; its argmax would be a made-up peak at the corner.
        total, flat = heatmap.sum(), not heatmap.max() > heatmap.min()
        peak = np.unravel_index(np.argmax(heatmap), heatmap.shape)
        region = None if regions is None else np.asarray(regions[index], dtype=bool)
        records.append({
            "hit": bool(inside[peak]) and not flat, "energy_share": float(heatmap[inside].sum() / total) if total > 0 else 0.0,
            "flat": flat, "random_image": float(inside.mean()),
            "random_lung": float((inside & region).sum() / region.sum()) if region is not None and region.any() else np.nan,
            **(_NO_PEAK if flat else {
                "peak_x": int(peak[1]), "peak_y": int(peak[0]), "peak_distance_px": float(math.hypot(peak[1] - x, peak[0] - y)),
                "peak_in_lung": float(region[peak]) if region is not None else np.nan}),
        })
    return pd.DataFrame.from_records(records, columns=PER_CASE_COLUMNS)



SUMMARY_MEASURES = ("hit", "energy_share", "random_image", "random_lung", "peak_in_lung")


def summarize_localization(cases: pd.DataFrame, *, by: str | None = "subtlety", n_bootstrap: int = 1000,
                           confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Means of ``SUMMARY_MEASURES`` with percentile-bootstrap CIs, overall and per ``by`` value.

    ``cases`` comes from ``pointing_game`` (plus ``patient_id`` and ``by`` columns where known;
    a ``tolerance_px`` column gives one block per tolerance). Patients are resampled, with the same
    resamples for the model and the baselines, so ``hit_minus_random_lung`` is a paired difference.
    """
    cases = cases.assign(**{measure: np.nan for measure in SUMMARY_MEASURES if measure not in cases.columns})
    cases = cases.assign(hit_minus_random_lung=cases["hit"].astype(float) - cases["random_lung"])
    measures = [*SUMMARY_MEASURES, "hit_minus_random_lung"]
    tolerances = cases["tolerance_px"] if "tolerance_px" in cases.columns else pd.Series(0.0, index=cases.index)
    rows = []
    for tolerance in sorted(tolerances.unique()):
        block = cases[tolerances == tolerance]
        groups = [("all", block)]
        if by and by in block.columns:
            groups += [(f"{by} {value:g}" if isinstance(value, float) else f"{by} {value}", part)
                       for value, part in block.groupby(by, sort=True)]
        for name, part in groups:
            patients = part["patient_id"] if "patient_id" in part.columns else pd.Series(np.arange(len(part)))
            means, lows, highs = bootstrap_means(part[measures].to_numpy(dtype=np.float64), patients.to_numpy(),
                                                 n_bootstrap, confidence, seed)
            row = {"tolerance_px": tolerance, "group": name, "n": len(part), "hits": int(part["hit"].sum()),
                   "flat": int(part["flat"].sum())}
            for measure, mean, low, high in zip(measures, means, lows, highs, strict=True):
                row.update({measure: mean, f"{measure}_low": low, f"{measure}_high": high})
            rows.append(row)
    return pd.DataFrame(rows)


@dataclass
class Localization:
    """The pointing game of one run: per-case rows, the summary, and how they were made."""

    cases: pd.DataFrame
    summary: pd.DataFrame
    info: dict

    def markdown(self) -> str:
        """The summary as a Markdown table: value [CI] per measure, one block per tolerance."""
        info, level = self.info, round(100 * self.info["confidence"])
        options = "".join(f", {key} {value}" for key, value in info.get("options", {}).items())
        lines = [f"Pointing game, {info['method']}{options} of `{info['run']}` ({info['model']}, {info['task']}), "
                 f"{info['split']} split, nodule cases with a known centre and radius. Heatmaps and circles on "
                 f"the {info['size']} px model grid. Brackets: {level}% percentile bootstrap over patients, "
                 f"{info['n_bootstrap']} resamples. Random: a uniformly random heatmap (the enlarged circle's area "
                 "fraction of the image / lung field)." + _skipped_sentence(info.get("skipped", [])), "",
                 "| Tolerance | Cases | Hits | Hit rate | Random (lung field) | Random (image) | Hit - random (lung) "
                 "| Energy share | Peak in lung field | Flat maps |", "|---|---|---|---|---|---|---|---|---|---|"]
        for row in self.summary.itertuples():
            cells = [_value_ci(row, measure) for measure in ("hit", "random_lung", "random_image", "hit_minus_random_lung",
                                                              "energy_share", "peak_in_lung")]
            lines.append(f"| r + {row.tolerance_px:g} px | {row.group} | {row.hits}/{row.n} | " + " | ".join(cells)
                         + f" | {row.flat} |")
        return "\n".join(lines) + "\n"


def _skipped_sentence(skipped: Sequence[str]) -> str:
    if not skipped:
        return ""
    names = ", ".join(Path(path).name for path in skipped[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
    return f" Skipped: {len(skipped)} case{'s' if len(skipped) > 1 else ''} whose image cannot be read ({names})."


def _value_ci(row, measure: str) -> str:
    value, low, high = (getattr(row, name) for name in (measure, f"{measure}_low", f"{measure}_high"))
    if not np.isfinite(value):
        return "n/a"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]" if np.isfinite(low) else f"{value:.3f}"


def localize_run(run_dir: str | Path, *, method: str = "gradcam", split: str = "test",
                 tolerances: Sequence[float] = (0.0, DEFAULT_TOLERANCE), by: str = "subtlety",
                 n_bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0, device: str = "auto",
                 batch_size: int = 16, options: Mapping | None = None) -> Localization:
    """The pointing game on a run's nodule cases (``split``: train, val, test or all).

    Args:
        tolerances: added to each nodule radius, as fractions of the model input's side.
        by: column to break the summary down by (JSRT's ``subtlety``, 1 = extremely subtle).
        options: keyword arguments of the method (occlusion's ``patch`` and ``stride``).

    Images are read and levelled like ``lungdx predict`` does; a case whose image cannot be read is left
    out, named in one warning and counted in ``info["skipped"]`` and the Markdown. Lung fields come from the
    dataset's ``lung_mask`` column (paths relative to its folder) where present.
    """
    run_dir = Path(run_dir)
    config = load_config(run_dir / "config.yaml")
    predictor = Predictor.from_path(run_dir, device=device)
    cases = _nodule_cases(run_dir, config, split)
    if cases.empty:
        raise ValueError(f"{run_dir}: no nodule case with a known centre and radius in the {split} split")
    levelled, circles, regions, readable = _localization_inputs(cases, predictor, Path(config.data.path))
    skipped = [str(path) for path in cases.loc[~readable, "path"]]
    if not readable.any():
        raise ValueError(f"{run_dir}: no image of the {split} split's {len(cases)} nodule cases can be read")
    cases = cases[readable].reset_index(drop=True)
    cases["probability"] = predictor.probabilities(levelled, batch_size)
    heatmaps = np.concatenate([explain_levelled(predictor, levelled[start : start + batch_size], method, **(options or {}))
                               for start in range(0, len(levelled), batch_size)])
    size = predictor.preprocess_config.size
    blocks = [pd.concat([cases.reset_index(drop=True), pointing_game(
        heatmaps, circles, tolerance_px=fraction * size, regions=regions)], axis=1).assign(tolerance_px=fraction * size)
        for fraction in tolerances]
    per_case = pd.concat(blocks, ignore_index=True)
    summary = summarize_localization(per_case, by=by, n_bootstrap=n_bootstrap, confidence=confidence, seed=seed)
    info = {"run": str(run_dir), "model": config.model.name, "task": config.data.task, "method": method,
            "split": split, "size": size, "tolerances": [fraction * size for fraction in tolerances],
            "n_bootstrap": n_bootstrap, "confidence": confidence, "seed": seed, "threshold": predictor.threshold,
            "options": dict(options or {}), "skipped": skipped}
    return Localization(cases=per_case, summary=summary, info=info)


def _nodule_cases(run_dir: Path, config, split: str) -> pd.DataFrame:
    from lungdx.data.manifest import load_configured_dataset

    frame = load_configured_dataset(config.data)
    split_file = run_dir / "split.csv"
    if split_file.is_file():
        saved = pd.read_csv(split_file, dtype={"case_id": str, "patient_id": str})
        assignment = dict(zip(saved["path"], saved["split"], strict=True))
        frame["split"] = frame["path"].map(assignment).fillna("unused")
    elif split != "all":
        raise ValueError(f"{run_dir}: no split.csv, so only split 'all' can be used")
    if split != "all":
        frame = frame[frame["split"] == split]
    elif "split" in frame.columns:
        # "all" is every split: images the run's training left out (unreadable, say) were never in one.
        frame = frame[frame["split"] != "unused"]
    if "has_nodule" in frame.columns:
        frame = frame[pd.to_numeric(frame["has_nodule"], errors="coerce") == 1]
    known = [any(_finite(row.get(k)) is not None for k in ("nodule_x", "nodule_x_2048")) for _, row in frame.iterrows()]
    return frame[np.asarray(known, dtype=bool)].reset_index(drop=True)


def _localization_inputs(cases: pd.DataFrame, predictor: Predictor, data_path: Path):
    """Levelled images, circles and lung fields of the readable cases, and which cases those are (a mask)."""
    root = data_path if data_path.is_dir() else data_path.parent
    levelled, circles, regions, unreadable = [], [], [], []
    readable = np.ones(len(cases), dtype=bool)
    for index, (_, row) in enumerate(cases.iterrows()):
        try:
            pixels = read_image(row["path"]).pixels
        except ImageReadError as err:  # one bad file should not cost the pointing game of all the others
            readable[index] = False
            unreadable.append(str(err))
            continue
        grid = GridMap.of(pixels.shape, predictor.preprocess_config)
        levelled.append(predictor.level(pixels))
        circles.append(grid.point_to_grid(*nodule_circle(row, pixels.shape)))
        regions.append(_lung_field(root, row.get("lung_mask"), grid))
    if unreadable:
        logger.warning("skipped %d of %d nodule cases, their image cannot be read: %s", len(unreadable), len(cases),
                       "; ".join(unreadable))
    if not levelled:
        return None, None, None, readable
    if any(region is None for region in regions):
        logger.warning("lung masks missing for %d of %d cases: no lung-field baseline",
                       sum(region is None for region in regions), len(regions))
        regions = None
    return np.stack(levelled), np.asarray(circles), None if regions is None else np.stack(regions), readable


def _lung_field(root: Path, mask: object, grid: GridMap) -> np.ndarray | None:
    """The dataset's lung mask (a path relative to its folder) on the model grid, or None (also for a mask that
    cannot be read, named in a warning: the case keeps its pointing game, the run loses its lung-field baseline)."""
    if not isinstance(mask, str) or not mask or not (root / mask).is_file():
        return None
    from PIL import Image

    try:
        with Image.open(root / mask) as image:
            return grid.to_grid(np.asarray(image) > 0) > 0.5
    except (OSError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
        logger.warning("%s: lung mask cannot be read (%s); left out", root / mask, err)
        return None


def write_localization(result: Localization, out_dir: str | Path) -> dict[str, Path]:
    """``cases.csv``, ``summary.csv`` and ``localization.md`` in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"cases": out_dir / "cases.csv", "summary": out_dir / "summary.csv", "markdown": out_dir / "localization.md"}
    result.cases.drop(columns=[c for c in ("path",) if c in result.cases.columns]).to_csv(paths["cases"], index=False)
    result.summary.to_csv(paths["summary"], index=False)
    paths["markdown"].write_text(result.markdown())
    return paths
