"""Explanations: heatmap invariants over every registered model, hand-checked values, geometry,
the pointing game, the review gallery, ``lungdx explain``, and a model that must point at nodules."""

import dataclasses
import functools
import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn

from lungdx.cli import main
from lungdx.config import PreprocessConfig
from lungdx.explain import (
    METHODS,
    Explanation,
    GridMap,
    bootstrap_means,
    compute_heatmaps,
    explain_file,
    fallback_method,
    find_layer,
    gradcam,
    heatmap_notice,
    heatmap_problem,
    localize_run,
    nodule_circle,
    occlusion,
    plot_overlay,
    pointing_game,
    review_gallery,
    select_review_cases,
    summarize_localization,
    to_original_grid,
    write_explanation,
)
from lungdx.models import create_model, list_models
from lungdx.preprocess import level

FAST = {"occlusion": {"patch": 32, "stride": 32}}  # 4 windows: keeps the big backbones quick at 64 px
PROPERTY = settings(max_examples=2, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these tensors are small, and on a busy machine OpenMP threads spinning
    against each other made the backbones' explanations 100 times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def registered(name: str) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, input_size=64)


def random_images(seed: int, n: int, height: int = 64, width: int = 64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((n, 1, height, width), generator=generator)


def check_invariants(model: nn.Module, images: torch.Tensor, method: str, **options) -> np.ndarray:
    """Shape, range, scaling, determinism, and a batch giving exactly its images' heatmaps one by one."""
    heatmaps = compute_heatmaps(model, images, method, **options)
    assert heatmaps.shape == (len(images), *images.shape[-2:]) and heatmaps.dtype == np.float32
    assert np.isfinite(heatmaps).all() and heatmaps.min() >= 0.0 and heatmaps.max() <= 1.0
    assert all(h.max() in (0.0, 1.0) for h in heatmaps)  # scaled to its maximum, or all zero
    np.testing.assert_array_equal(compute_heatmaps(model, images, method, **options), heatmaps)
    singles = [compute_heatmaps(model, images[i : i + 1], method, **options) for i in range(len(images))]
    np.testing.assert_array_equal(np.concatenate(singles), heatmaps)
    return heatmaps


# --------------------------------------------------------------------------------------------
# Invariants over every registered model and method
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list_models())
@PROPERTY
@given(seed=st.integers(0, 2**16), n=st.integers(1, 2), scale=st.floats(0.1, 10.0))
def test_heatmap_invariants_on_every_registered_model(name, method, seed, n, scale):
    check_invariants(registered(name), random_images(seed, n) * scale, method, **FAST.get(method, {}))


@pytest.mark.parametrize("method", ["gradcam", "gradcampp"])
def test_a_model_with_mirrored_test_time_passes_gets_one_heatmap_per_image(method):
    # nodule_net with tta=hflip runs its detector on the images and their mirror images in one batch: the layer's
    # rows are twice the images, and each image's heatmap must come from its own two rows (the report's gallery
    # showed other cases' heatmaps, `explain --localization` failed).
    torch.manual_seed(0)
    model = create_model("nodule_net", input_size=64, tta="hflip")
    with torch.no_grad():  # the U-Net finds lungs everywhere: the map is not masked away, and mirroring commutes
        model.lungs.head.weight.zero_()
        model.lungs.head.bias.fill_(10.0)
    images = random_images(3, 3)
    heatmaps = check_invariants(model, images, method)
    assert all(heatmap.max() == 1.0 for heatmap in heatmaps) and not np.array_equal(heatmaps[0], heatmaps[1])
    # Each image's heatmap is its own: the same image in another batch, beside other images, gets the same one.
    np.testing.assert_array_equal(compute_heatmaps(model, images[[2, 0]], method)[1], heatmaps[0])
    # Both passes count, each in its place: the mirror image's heatmap is the image's, mirrored.
    np.testing.assert_allclose(compute_heatmaps(model, images.flip(-1), method), heatmaps[..., ::-1], atol=1e-4)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 4), method=st.sampled_from(METHODS))
def test_heatmap_invariants_on_a_small_paper_cnn(seed, n, method):
    torch.manual_seed(seed)
    model = create_model("paper_cnn", input_size=64, widths=[4, 4, 8, 8, 8], hidden=8, batch_norm=True)
    check_invariants(model, random_images(seed, n), method, **FAST.get(method, {}))


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_declares_a_layer_that_explains(name):
    model = registered(name)
    assert isinstance(find_layer(model), nn.Module)
    heatmap = gradcam(model, random_images(1, 1))
    assert heatmap.shape == (1, 64, 64)


class FullyConvolutional(nn.Module):
    """Any input size; batch norm and dropout so that evaluation mode matters."""

    gradcam_layer = "features.3"

    def __init__(self, inplace_after: bool = False):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2),
                                      nn.BatchNorm2d(8))
        self.dropout, self.head, self.inplace_after = nn.Dropout(0.5), nn.Linear(8, 1), inplace_after

    def forward(self, images):
        features = self.features(images)
        # An in-place ReLU after the explained layer, like torchvision's DenseNet.
        features = torch.relu_(features) if self.inplace_after else torch.relu(features)
        return self.head(self.dropout(features.mean(dim=(2, 3))))


@settings(max_examples=15, deadline=None, derandomize=True)
@given(height=st.integers(9, 70), width=st.integers(9, 70), method=st.sampled_from(METHODS))
def test_heatmap_has_the_input_height_and_width_for_any_size(height, width, method):
    torch.manual_seed(0)
    check_invariants(FullyConvolutional(), random_images(0, 2, height, width), method)


def test_model_state_is_restored_and_nothing_is_left_behind():
    torch.manual_seed(0)
    model = FullyConvolutional().train()
    model.features[0].weight.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    images = random_images(2, 3)
    with torch.no_grad():  # give batch norm running statistics that differ from one batch's
        for _ in range(3):
            model(random_images(9, 8) * 2 + 1)
    running = model.features[1].running_mean.clone()
    heatmaps = {method: compute_heatmaps(model, images, method) for method in METHODS}
    assert model.training and model.features[1].training and model.dropout.training
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert not find_layer(model)._forward_hooks
    torch.testing.assert_close(model.features[1].running_mean, running)  # evaluation mode: no update
    for method in METHODS:
        np.testing.assert_array_equal(compute_heatmaps(model.eval(), images, method), heatmaps[method])
        model.train()


def test_inplace_operation_after_the_layer_changes_nothing():
    torch.manual_seed(0)
    plain, inplace = FullyConvolutional(), FullyConvolutional(inplace_after=True)
    inplace.load_state_dict(plain.state_dict())
    images = random_images(3, 2)
    for plus_plus in (False, True):
        np.testing.assert_allclose(gradcam(inplace, images, plus_plus=plus_plus), gradcam(plain, images, plus_plus=plus_plus),
                                   atol=1e-6)


class LinearCam(nn.Module):
    """1x1 convolution, global average pooling, linear head: Grad-CAM is the class activation map."""

    gradcam_layer = "conv"

    def __init__(self, conv_weight, head_weight):
        super().__init__()
        self.conv = nn.Conv2d(1, len(conv_weight), 1, bias=False)
        self.head = nn.Linear(len(conv_weight), 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor(conv_weight, dtype=torch.float32).reshape(-1, 1, 1, 1))
            self.head.weight.copy_(torch.tensor([head_weight], dtype=torch.float32))

    def forward(self, images):
        return self.head(self.conv(images).mean(dim=(2, 3)))


def test_gradcam_and_gradcampp_match_hand_computation():
    conv, head = [1.0, -2.0, 0.5], [0.7, 0.3, -1.2]
    image = np.linspace(-1, 2, 36, dtype=np.float32).reshape(6, 6)
    activations = np.asarray(conv)[:, None, None] * image  # (3, 6, 6)
    grads = np.asarray(head) / 36.0  # d logit / d activation, the same at every position
    expected = np.maximum((grads[:, None, None] * activations).sum(axis=0), 0)
    model = LinearCam(conv, head)
    got = gradcam(model, torch.from_numpy(image)[None, None])[0]
    np.testing.assert_allclose(got, expected / expected.max(), atol=1e-6)
    alpha = grads ** 2 / (2 * grads ** 2 + activations.sum(axis=(1, 2)) * grads ** 3)
    weights = alpha * np.maximum(grads, 0) * 36
    expected_pp = np.maximum((weights[:, None, None] * activations).sum(axis=0), 0)
    got_pp = gradcam(model, torch.from_numpy(image)[None, None], plus_plus=True)[0]
    np.testing.assert_allclose(got_pp, expected_pp / expected_pp.max(), atol=1e-6)


class RegionSum(nn.Module):
    """The logit is the sum of rows 20-29, columns 40-49: only that region matters."""

    def forward(self, images):
        return images[:, :, 20:30, 40:50].sum(dim=(1, 2, 3))[:, None]


def test_occlusion_lights_up_only_where_the_logit_looks():
    heatmap = occlusion(RegionSum(), torch.ones(1, 1, 64, 64), patch=8, stride=4)[0]
    rows, columns = np.nonzero(heatmap)
    assert rows.min() >= 20 - 8 and rows.max() < 30 + 8 and columns.min() >= 40 - 8 and columns.max() < 50 + 8
    assert heatmap[25, 45] == 1.0 and heatmap[5, 5] == 0.0


def test_errors_are_clear():
    with pytest.raises(ValueError, match="gradcam_layer"):
        gradcam(RegionSum(), torch.ones(1, 1, 8, 8))
    with pytest.raises(ValueError, match="no module 'nope'"):
        gradcam(LinearCam([1.0], [1.0]), torch.ones(1, 1, 8, 8), layer="nope")
    with pytest.raises(ValueError, match="unknown explanation method"):
        compute_heatmaps(RegionSum(), torch.ones(1, 1, 8, 8), "lime")
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        compute_heatmaps(RegionSum(), torch.ones(8, 8))


@pytest.mark.parametrize(("patch", "stride"), [(4, 8), (-3, None), (0, 0), (8, 0)])
def test_occlusion_refuses_a_patch_and_stride_that_leave_pixels_uncovered(patch, stride):
    # A stride over the patch left pixels no patch covers (0/0 = NaN), and the NaN blanked the whole map into
    # "heatmap empty"; a negative patch did the same, and 0 fell back to the defaults without a word.
    with pytest.raises(ValueError, match="1 <= stride <= patch"):
        occlusion(RegionSum(), torch.ones(1, 1, 64, 64), patch=patch, stride=stride)


# --------------------------------------------------------------------------------------------
# Empty maps: one rule, said wherever a map is shown
# --------------------------------------------------------------------------------------------


def _one_cell(side: int, cell: int) -> np.ndarray:
    heatmap = np.zeros((side, side))
    heatmap[:cell, :cell] = 1.0
    return heatmap


@pytest.mark.parametrize(("heatmap", "expected"), [
    (np.zeros((64, 64)), "all zero"),
    (np.full((64, 64), -0.3), "all zero"),  # drawn clipped to [0, 1]
    (np.full((64, 64), 0.04), "near-empty"),  # a nodule map of probabilities under 5%
    (_one_cell(256, 1), "near-empty"),  # a lone hot pixel at 256 px: 1.5e-5 of the map
    (np.ones((64, 64)), "flat"),
    (np.full((64, 64), 0.5), "flat"),
    (np.where(np.eye(64) > 0, np.nan, 0.5), "not finite"),
    (np.full((64, 64), np.inf), "not finite"),
    (np.zeros((0, 64)), "no pixels"),
    (_one_cell(64, 1), None),  # one pixel of a 64 px map: 2.4e-4, a speck but a visible one
    (_one_cell(256, 4), None),  # one 4 px cell of a 256 px nodule map
    (_one_cell(256, 16), None),  # one cell of paper_cnn's 16 x 16 Grad-CAM grid
    (np.tile(np.linspace(0, 1, 64), (64, 1)), None),
])
def test_heatmap_problem_names_each_kind_of_empty_map(heatmap, expected):
    problem = heatmap_problem(heatmap)
    assert problem is None if expected is None else problem.startswith(expected), problem


EXACT = st.integers(-8, 40).map(lambda k: k / 32)  # binary fractions in [-0.25, 1.25]: exact in float32 and in 1 - x


@st.composite
def level_maps(draw, max_side: int = 12) -> np.ndarray:
    """A level everywhere and a few pixels elsewhere: reaches every verdict (all zero, near-empty, flat, fine)."""
    height, width = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    heatmap = np.full((height, width), draw(EXACT))
    for _ in range(draw(st.integers(0, 4))):
        heatmap[draw(st.integers(0, height - 1)), draw(st.integers(0, width - 1))] = draw(EXACT)
    return heatmap


@settings(max_examples=300, deadline=None, derandomize=True)
@given(heatmap=level_maps(), factor=st.integers(2, 4), seed=st.integers(0, 2**16))
def test_the_empty_map_verdict_depends_on_what_is_drawn_not_on_grid_or_pixel_order(heatmap, factor, seed):
    verdict = heatmap_problem(heatmap)
    rng = np.random.default_rng(seed)
    assert heatmap_problem(rng.permutation(heatmap.ravel()).reshape(heatmap.shape)) == verdict
    assert heatmap_problem(heatmap.T) == verdict
    assert heatmap_problem(np.kron(heatmap, np.ones((factor, factor)))) == verdict  # model grid or image grid
    assert heatmap_problem(np.clip(heatmap, 0, 1).astype(np.float32)) == verdict  # as an overlay draws it
    poisoned = heatmap.copy()
    poisoned[rng.integers(heatmap.shape[0]), rng.integers(heatmap.shape[1])] = rng.choice([np.nan, np.inf, -np.inf])
    assert heatmap_problem(poisoned).startswith("not finite")
    notice = heatmap_notice(heatmap, "gradcam")
    assert notice == (None if verdict is None else f"heatmap empty (Grad-CAM): {verdict}")


@settings(max_examples=300, deadline=None, derandomize=True)
@given(heatmap=level_maps())
def test_a_flat_map_is_an_empty_map_upside_down(heatmap):
    heatmap = np.clip(heatmap, 0, 1)
    heatmap[0, 0] = 1.0  # scaled to a peak of 1, as Grad-CAM and occlusion maps are
    problem = heatmap_problem(heatmap)
    assert problem is None or problem.startswith("flat")  # with a peak of 1 a map is never zero or near-empty
    assert (problem is not None) == str(heatmap_problem(1.0 - heatmap)).startswith(("all zero", "near-empty"))


class Localising(nn.Module):
    def analyse(self, images):
        raise NotImplementedError


def test_the_fallback_is_the_nodule_map_where_there_is_one_then_occlusion():
    classifier = create_model("paper_cnn", input_size=64, widths=[4, 4, 8, 8, 8], hidden=8)
    assert [fallback_method(method, classifier) for method in ("gradcam", "gradcampp", "occlusion")] == [
        "occlusion", "occlusion", "gradcam"]
    assert [fallback_method(method, Localising()) for method in ("gradcam", "nodule_map", "occlusion")] == [
        "nodule_map", "occlusion", "nodule_map"]
    assert fallback_method("occlusion", RegionSum()) is None  # nothing else explains a model without a Grad-CAM layer


def _notice_pixels(path) -> int:
    """Pixels of the notice's red box (``explain.NOTICE_COLOUR``, #b91c1c) in a PNG."""
    with Image.open(path) as png:
        rgb = np.asarray(png.convert("RGB")).astype(int)
    return int((np.abs(rgb - [0xB9, 0x1C, 0x1C]).sum(axis=2) < 12).sum())


def test_an_empty_overlay_carries_its_notice(tmp_path):
    image, empty = np.tile(np.linspace(0, 1, 64), (64, 1)), np.zeros((64, 64), np.float32)
    notice = heatmap_notice(empty, "gradcam")
    plain = plot_overlay(image, empty, tmp_path / "plain.png", probability=0.3, threshold=0.5)
    marked = plot_overlay(image, empty, tmp_path / "marked.png", probability=0.3, threshold=0.5, notice=notice)
    assert notice == "heatmap empty (Grad-CAM): all zero"
    assert _notice_pixels(plain) == 0 and _notice_pixels(marked) > 500  # a box a reader cannot miss


def _zeros(predictor, levelled, method="gradcam", **options):
    """``explain_levelled`` of a model with nothing to show (a weak model's Grad-CAM)."""
    return np.zeros(np.shape(levelled), np.float32)


# --------------------------------------------------------------------------------------------
# Geometry: undoing preprocess.level
# --------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None, derandomize=True)
@given(height=st.integers(40, 300), width=st.integers(40, 300), aspect=st.sampled_from(["pad", "stretch", "crop"]),
       fx=st.floats(0.3, 0.7), fy=st.floats(0.3, 0.7))
def test_a_point_and_a_heatmap_map_between_image_and_model_grid(height, width, aspect, fx, fy):
    config = PreprocessConfig(size=64, aspect=aspect, window_percentiles=(0.0, 100.0))
    grid = GridMap.of((height, width), config)
    top, left, box_h, box_w = grid.image_box  # the part of the image the model sees
    x, y = left + fx * (box_w - 1), top + fy * (box_h - 1)
    rows, columns = np.mgrid[0:height, 0:width]
    sigma = 0.08 * max(box_h, box_w)
    blob = np.exp(-((columns - x) ** 2 + (rows - y) ** 2) / (2 * sigma ** 2)).astype(np.float32)
    levelled = level(blob, config)
    gx, gy, _ = grid.point_to_grid(x, y)
    peak = np.unravel_index(np.argmax(levelled), levelled.shape)
    assert abs(peak[0] - gy) <= 1.5 and abs(peak[1] - gx) <= 1.5
    back = to_original_grid(levelled, (height, width), config)
    assert back.shape == (height, width)
    peak_back = np.unravel_index(np.argmax(back), back.shape)
    assert abs(peak_back[0] - y) <= 1.5 * height / 64 + 1 and abs(peak_back[1] - x) <= 1.5 * width / 64 + 1
    inner = np.s_[top + box_h // 4 : top + 3 * box_h // 4, left + box_w // 4 : left + 3 * box_w // 4]
    seen = blob[top : top + box_h, left : left + box_w]  # levelling windows what the model sees
    np.testing.assert_allclose(back[inner], (blob[inner] - seen.min()) / (seen.max() - seen.min()), atol=0.08)


def test_nodule_circle_from_either_jsrt_layout():
    assert nodule_circle({"nodule_x": 817.0, "nodule_y": 346.0, "nodule_radius_px": 21.43}, (1024, 1024)) == (817.0, 346.0, 21.43)
    x, y, radius = nodule_circle({"nodule_x_2048": 1634, "nodule_y_2048": 692, "size_mm": 15.0, "nodule_x": ""}, (1024, 1024))
    assert (x, y) == (817.0, 346.0) and radius == pytest.approx(15.0 / 2 / 0.35)
    assert nodule_circle({"nodule_x": np.nan, "size_mm": None}, (10, 10)) is None


# --------------------------------------------------------------------------------------------
# Pointing game and its summary
# --------------------------------------------------------------------------------------------


def test_pointing_game_matches_hand_computation():
    heatmaps = np.zeros((3, 10, 10))
    heatmaps[0, 2, 3] = 1.0  # maximum at column 3, row 2: inside the circle (3, 2, 1)
    heatmaps[0, 8, 8] = 0.5
    heatmaps[1, 9, 9] = 1.0  # maximum far from the circle
    heatmaps[1, 2, 2] = 0.25
    circles = np.array([[3, 2, 1], [3, 2, 1], [3, 2, 1]], dtype=float)
    regions = np.zeros((3, 10, 10), dtype=bool)
    regions[:, :5, :] = True  # top half: 50 pixels
    cases = pointing_game(heatmaps, circles, regions=regions)
    assert cases["hit"].tolist() == [True, False, False]
    assert cases["flat"].tolist() == [False, False, True]  # all zero: no maximum, a miss
    np.testing.assert_allclose(cases["energy_share"], [1 / 1.5, 0.25 / 1.25, 0.0])
    np.testing.assert_allclose(cases["random_image"], 5 / 100)  # the disc of radius 1 holds 5 pixel centres
    np.testing.assert_allclose(cases["random_lung"], 5 / 50)
    assert cases[["peak_x", "peak_y"]].values.tolist()[:2] == [[3, 2], [9, 9]]
    np.testing.assert_allclose(cases["peak_distance_px"][:2], [0.0, np.hypot(6, 7)])
    assert cases["peak_in_lung"].tolist()[:2] == [1.0, 0.0]
    wide = pointing_game(heatmaps, circles, tolerance_px=10)
    assert wide["hit"].tolist() == [True, True, False] and np.isnan(wide["random_lung"]).all()


def test_a_flat_map_has_no_peak_and_no_say_in_the_peak_in_lung_mean():
    heatmaps = np.zeros((2, 10, 10))
    heatmaps[0, 2, 3] = 1.0
    circles = np.array([[3, 2, 1], [8, 8, 1]], dtype=float)
    regions = np.zeros((2, 10, 10), dtype=bool)
    regions[:, 1:5, :] = True  # pixel (0, 0), where argmax of an all-zero map lands, is outside the lung field
    cases = pointing_game(heatmaps, circles, regions=regions)
    peaks = ["peak_x", "peak_y", "peak_distance_px", "peak_in_lung"]
    assert cases.loc[0, peaks].tolist() == [3, 2, 0.0, 1.0] and cases.loc[1, peaks].isna().all()
    assert cases["hit"].tolist() == [True, False] and cases["flat"].tolist() == [False, True]  # a flat map misses
    summary = summarize_localization(cases, by=None, n_bootstrap=50).iloc[0]
    assert (summary["hits"], summary["n"], summary["flat"], summary["hit"]) == (1, 2, 1, 0.5)
    assert summary["peak_in_lung"] == 1.0  # the one map with a peak


def test_a_constant_map_is_flat_too():
    # An occlusion patch as large as the image gives one value everywhere: its argmax at (0, 0) was a made-up peak.
    heatmaps = np.full((1, 10, 10), 0.4)
    circles = np.array([[0, 0, 1]], dtype=float)  # the made-up peak would have hit this nodule
    cases = pointing_game(heatmaps, circles)
    assert cases.loc[0, "flat"] and not cases.loc[0, "hit"] and np.isnan(cases.loc[0, "peak_x"])
    assert cases.loc[0, "energy_share"] == pytest.approx(cases.loc[0, "random_image"])  # a uniform map's share


def test_an_unreadable_lung_mask_is_named_and_left_out(tmp_path, caplog):
    from lungdx.explain import _lung_field

    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "bad.png").write_bytes(b"not a PNG")
    grid = GridMap.of((64, 64), PreprocessConfig(size=32))
    with caplog.at_level(logging.WARNING, logger="lungdx.explain"):
        assert _lung_field(tmp_path, "masks/bad.png", grid) is None
    assert "masks/bad.png: lung mask cannot be read" in caplog.text


def test_bootstrap_means_and_summary():
    values = np.array([[1.0, 0.2], [0.0, np.nan], [1.0, 0.4], [1.0, 0.6]])
    means, lows, highs = bootstrap_means(values, np.arange(4), 500, 0.9, seed=1)
    np.testing.assert_allclose(means, [0.75, 0.4])
    assert (lows <= means).all() and (means <= highs).all() and lows[0] < 0.75 < highs[0]
    same, low_same, high_same = bootstrap_means(np.ones((5, 1)), np.arange(5), 100)
    assert same[0] == low_same[0] == high_same[0] == 1.0
    cases = pd.DataFrame({"hit": [True, False, True, True], "energy_share": [0.5, 0.1, 0.4, 0.3], "flat": False,
                          "random_image": 0.05, "random_lung": 0.1, "subtlety": [1, 1, 2, 2], "patient_id": list("abcd")})
    summary = summarize_localization(cases, n_bootstrap=200).set_index("group")
    assert list(summary.index) == ["all", "subtlety 1", "subtlety 2"]
    assert summary.loc["all", "hit"] == 0.75 and summary.loc["subtlety 1", "hit"] == 0.5 and summary.loc["subtlety 2", "n"] == 2
    assert summary.loc["all", "hit_minus_random_lung"] == pytest.approx(0.65)


def test_review_cases_are_the_most_confident_of_each_category():
    predictions = pd.DataFrame({
        "case_id": list("abcdefghij"), "split": ["test"] * 9 + ["train"],
        "target": [1, 1, 1, 0, 0, 0, 1, 0, 0, 1], "probability": [0.9, 0.8, 0.3, 0.7, 0.2, 0.1, 0.1, 0.95, 0.6, 0.99]})
    predictions["label"] = (predictions["probability"] >= 0.5).astype(int)
    chosen = select_review_cases(predictions, per_category=2)
    assert chosen.groupby("category", sort=False)["case_id"].apply(list).to_dict() == {
        "true_positive": ["a", "b"], "false_positive": ["h", "d"], "false_negative": ["g", "c"], "true_negative": ["f", "e"]}


# --------------------------------------------------------------------------------------------
# With a trained run: lungdx explain, the gallery, the localisation runner
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(phantom_dir, tmp_path_factory):
    from lungdx.evaluate import evaluate_run
    from lungdx.train import fit

    folder = tmp_path_factory.mktemp("explain")
    result = fit(tiny_config(phantom_dir, folder / "cache", "train.epochs=1"), folder / "run")
    evaluate_run(result.run_dir, dataclasses.replace(tiny_config(phantom_dir, folder / "cache").eval, n_bootstrap=20))
    return result.run_dir


def test_cli_writes_overlay_and_heatmap_in_the_image_geometry(run, phantom_dir, tmp_path, capsys):
    out = tmp_path / "overlay.png"
    image = phantom_dir / "images" / "PHANT0001.png"
    assert main(["explain", str(run), str(image), "--method", "gradcampp", "--out", str(out)]) == 0
    assert "p=" in capsys.readouterr().out
    heatmap = np.load(out.with_suffix(".npy"))
    assert heatmap.shape == (128, 128) and 0 <= heatmap.min() and heatmap.max() <= 1
    with Image.open(out) as png:
        assert png.format == "PNG" and png.width > 200
    occluded = tmp_path / "occlusion.png"
    assert main(["explain", str(run), str(image), "--method", "occlusion", "--patch", "16", "--stride", "16",
                 "--out", str(occluded)]) == 0
    assert np.load(occluded.with_suffix(".npy")).shape == (128, 128)
    # A folder not made yet, said by its trailing slash: written inside it (it wrote newdir.png beside)
    assert main(["explain", str(run), str(image), "--out", f"{tmp_path / 'newdir'}/"]) == 0
    assert {path.name for path in (tmp_path / "newdir").iterdir()} == {"PHANT0001_gradcam.png", "PHANT0001_gradcam.npy"}


def test_written_paths_are_the_files_written_for_a_bare_name_or_a_folder(tmp_path):
    # `--out overlay` printed "overlay" while matplotlib wrote overlay.png; `--out folder` wrote folder.png beside it.
    pixels = np.tile(np.linspace(0, 1, 32, dtype=np.float32), (32, 1))
    explanation = Explanation(source="scans/PHANT0001.png", method="occlusion", pixels=pixels, levelled=pixels,
                              heatmap=pixels, heatmap_original=pixels, probability=0.3, threshold=0.5, class_name="benign")
    assert write_explanation(explanation, tmp_path / "overlay") == (tmp_path / "overlay.png", tmp_path / "overlay.npy")
    folder = tmp_path / "out"
    folder.mkdir()
    png, npy = write_explanation(explanation, folder)
    assert (png, npy) == (folder / "PHANT0001_occlusion.png", folder / "PHANT0001_occlusion.npy")
    assert {path.name for path in tmp_path.iterdir()} == {"overlay.png", "overlay.npy", "out"}  # nothing beside the folder
    assert {path.name for path in folder.iterdir()} == {png.name, npy.name}
    with Image.open(png) as image:
        assert image.format == "PNG"


def test_dicom_explanation_keeps_the_image_rows_and_columns(run, dicom_dir):
    from lungdx.predict import Predictor

    predictor = Predictor.from_path(run)
    explanation = explain_file(predictor, dicom_dir / "nema_wg04_RG1_cr_chest_pa_uncompressed.dcm")
    assert explanation.pixels.shape == explanation.heatmap_original.shape == (1955, 1841)
    grid = GridMap.of((1955, 1841), predictor.preprocess_config)
    top, left, height, width = grid.grid_box
    assert (top, height) == (0, 64) and left > 0 and width < 64  # taller than wide: padded left and right
    # Shrunk back onto the model grid, the image-sized heatmap is the model-grid one again.
    shrunk = grid.to_grid(explanation.heatmap_original, cv2.INTER_AREA)
    np.testing.assert_allclose(shrunk[:, left + 1 : left + width - 1], explanation.heatmap[:, left + 1 : left + width - 1], atol=0.06)


def test_cli_unreadable_image_is_a_clear_error(run, tmp_path, capsys):
    bogus = tmp_path / "notes.png"
    bogus.write_text("not an image")
    assert main(["explain", str(run), str(bogus)]) == 2
    assert "notes.png" in capsys.readouterr().err
    assert main(["explain", str(run)]) == 2  # neither an image nor --localization
    assert main(["explain", str(run), str(bogus), "--patch", "8"]) == 2  # occlusion options without occlusion
    assert "--patch" in capsys.readouterr().err
    assert main(["explain", str(run), str(bogus), "--split", "train"]) == 2  # pointing-game options with an image
    assert "apply to --localization only" in capsys.readouterr().err


def test_cli_occlusion_stride_over_the_patch_is_a_clear_error(run, phantom_dir, tmp_path, capsys):
    image = phantom_dir / "images" / "PHANT0001.png"
    assert main(["explain", str(run), str(image), "--method", "occlusion", "--patch", "4", "--stride", "8",
                 "--out", str(tmp_path / "overlay.png")]) == 2
    assert "lungdx explain: error: occlusion needs 1 <= stride <= patch" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # no overlay of a map blanked by NaN


def test_review_gallery_draws_the_confident_cases(run, tmp_path):
    predictions = pd.read_csv(run / "evaluation" / "predictions.csv")
    entries = review_gallery(run, predictions, tmp_path / "gallery", per_category=1, device="cpu")
    test = predictions[predictions["split"] == "test"]
    expected = select_review_cases(predictions, per_category=1)
    expected_pairs = list(zip(expected["category"], expected["case_id"].astype(str), strict=True))
    assert [(entry["category"], entry["case_id"]) for entry in entries] == expected_pairs
    assert len(entries) >= 2 and all(entry["case_id"] in set(test["case_id"]) for entry in entries)
    for entry in entries:
        with Image.open(entry["path"]) as png:
            assert png.format == "PNG"
        assert entry["nodule"] == (entry["target"] == 1 or entry["case_id"] in _nodule_cases(run))


def test_an_empty_map_says_so_in_explain_and_in_the_gallery(run, phantom_dir, tmp_path, capsys, monkeypatch):
    from lungdx.report import _gallery_html

    monkeypatch.setattr("lungdx.explain.explain_levelled", _zeros)
    out = tmp_path / "overlay.png"
    assert main(["explain", str(run), str(phantom_dir / "images" / "PHANT0001.png"), "--out", str(out)]) == 0
    assert "\tWARNING: heatmap empty (Grad-CAM): all zero; try --method occlusion" in capsys.readouterr().out
    assert _notice_pixels(out) > 500
    predictions = pd.read_csv(run / "evaluation" / "predictions.csv")
    entries = review_gallery(run, predictions, tmp_path / "gallery", per_category=1, device="cpu")
    assert entries and all(entry["notice"] == "heatmap empty (Grad-CAM): all zero" for entry in entries)
    assert all(_notice_pixels(entry["path"]) > 500 for entry in entries)
    assert _gallery_html(entries).count('<p class="notice">heatmap empty (Grad-CAM): all zero</p>') == len(entries)


def _nodule_cases(run) -> set:
    from lungdx.config import load_config

    frame = pd.read_csv(load_config(run / "config.yaml").data.path + "/labels.csv")
    return set(frame.loc[frame["has_nodule"] == 1, "case_id"])


def test_localization_cli_and_library(run, tmp_path, capsys):
    result = localize_run(run, split="all", n_bootstrap=50, device="cpu")
    nodules = len(_nodule_cases(run))
    assert len(result.cases) == 2 * nodules  # two tolerances
    assert set(result.summary["group"]) >= {"all"} and (result.summary["n"] <= nodules).all()
    assert result.cases["random_lung"].between(0, 1).all() and (result.cases["random_lung"] >= result.cases["random_image"]).all()
    out = tmp_path / "loc"
    assert main(["explain", str(run), "--localization", "--split", "all", "--bootstrap", "20", "--out", str(out)]) == 0
    assert "| r + 0 px | all |" in capsys.readouterr().out
    assert {path.name for path in out.iterdir()} == {"cases.csv", "summary.csv", "localization.md"}


def test_localization_leaves_out_images_training_left_out_and_skips_unreadable_ones(run, tmp_path, monkeypatch, caplog):
    # A corrupt image that training left out of split.csv was still in `--split all`, and the pointing game died on it.
    from lungdx.io import ImageReadError, read_image

    copy = shutil.copytree(run, tmp_path / "run")
    split = pd.read_csv(copy / "split.csv", dtype={"case_id": str})
    nodules = sorted(_nodule_cases(run))
    unused, unreadable = nodules[:2]
    split[split["case_id"] != unused].to_csv(copy / "split.csv", index=False)
    bad = split.loc[split["case_id"] == unreadable, "path"].item()

    def read(path, *args, **kwargs):  # an image that went bad after training
        if str(path) == bad:
            raise ImageReadError(path, "not a PNG/JPEG/TIFF image (Pillow cannot identify it)")
        return read_image(path, *args, **kwargs)

    monkeypatch.setattr("lungdx.explain.read_image", read)
    with caplog.at_level(logging.WARNING, logger="lungdx.explain"):
        result = localize_run(copy, split="all", tolerances=(0.0,), n_bootstrap=20, device="cpu")
    assert set(result.cases["case_id"]) == set(nodules) - {unused, unreadable}
    assert result.info["skipped"] == [bad] and result.summary.loc[0, "n"] == len(nodules) - 2
    assert f"Skipped: 1 case whose image cannot be read ({Path(bad).name})." in result.markdown()
    warnings = [record.getMessage() for record in caplog.records if "cannot be read" in record.getMessage()]
    assert len(warnings) == 1 and bad in warnings[0]


# --------------------------------------------------------------------------------------------
# Sanity: a model whose only signal is the nodule must point at it
# --------------------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    """Batch norm and global max pooling: learns the phantoms' (enlarged) nodules in seconds."""

    gradcam_layer = "features.9"

    def __init__(self):
        super().__init__()

        def block(inputs, outputs):
            return [nn.Conv2d(inputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU()]

        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                      *block(16, 32), nn.MaxPool2d(2), *block(32, 32))
        self.head = nn.Linear(32, 1)

    def forward(self, images):
        return self.head(self.features(images).amax(dim=(2, 3)))


def nodule_phantoms(n: int, seed: int, size: int = 64):
    """Half with one large, high-contrast nodule, half without; nothing else differs between them."""
    from lungdx.data.phantoms import render, sample_anatomy, sample_view
    from lungdx.preprocess import preprocess

    rng, config = np.random.default_rng(seed), PreprocessConfig(size=size)
    images, circles, masks = [], [], []
    for index in range(n):
        anatomy = sample_anatomy(rng, "malignant" if index % 2 == 0 else "non_nodule")
        if anatomy.nodule is not None:
            nodule = dataclasses.replace(anatomy.nodule, size_mm=float(rng.uniform(35, 50)),
                                         contrast=float(rng.uniform(0.5, 0.8)), spicules=())
            anatomy = dataclasses.replace(anatomy, nodule=nodule)
        phantom = render(anatomy, sample_view(rng), size, rng)
        images.append(preprocess(phantom.image, config))
        masks.append(phantom.lung_mask)
        info = phantom.info
        circles.append((info["nodule_x"], info["nodule_y"], info["nodule_radius_px"]) if info["has_nodule"] else (np.nan,) * 3)
    targets = torch.tensor([1.0 - index % 2 for index in range(n)])
    return torch.from_numpy(np.stack(images)), targets, np.asarray(circles), np.stack(masks)


def test_a_model_that_learned_the_nodule_points_at_it():
    from sklearn.metrics import roc_auc_score

    torch.manual_seed(0)
    images, targets, _, _ = nodule_phantoms(200, seed=0)
    test_images, test_targets, circles, masks = nodule_phantoms(60, seed=1)
    model = SmallCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        model.train()
        for batch in torch.randperm(len(images), generator=generator).split(16):
            loss = nn.functional.binary_cross_entropy_with_logits(model(images[batch])[:, 0], targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        assert roc_auc_score(test_targets.numpy(), model(test_images)[:, 0].numpy()) > 0.8, "the model did not learn"
    positive = test_targets.numpy() == 1
    for method, options in (("gradcam", {}), ("gradcampp", {}), ("occlusion", {"patch": 12, "stride": 6})):
        heatmaps = compute_heatmaps(model, test_images[positive], method, **options)
        cases = pointing_game(heatmaps, circles[positive], tolerance_px=64 / 16, regions=masks[positive])
        assert cases["hit"].mean() > cases["random_lung"].mean() + 0.4, method
        assert not cases["flat"].any() and all(heatmap_problem(heatmap) is None for heatmap in heatmaps), method
