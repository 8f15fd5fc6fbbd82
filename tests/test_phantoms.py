"""Synthetic chest phantoms: determinism, anatomy, nodules, and the JSRT-layout data set on disk."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lungdx.data import phantoms
from lungdx.data.phantoms import (
    LABEL_COLUMNS,
    generate_phantom,
    make_phantom,
    write_phantom_dataset,
)

KINDS = ("non_nodule", "benign", "malignant")
JSRT_LABELS = Path(__file__).resolve().parents[2] / "shared" / "data" / "jsrt" / "labels.csv"
BRIEF_COLUMNS = {"image", "case_id", "label", "has_nodule", "malignant", "subtlety", "size_mm", "age", "sex",
                 "nodule_x", "nodule_y", "nodule_radius_px", "patient_id", "synthetic"}


def _phantoms(kind: str, n: int, size: int = 128, seed: int = 0) -> list[phantoms.Phantom]:
    return [generate_phantom(np.random.default_rng([seed, i]), size, kind) for i in range(n)]


def _ring_contrast(image: np.ndarray, lung: np.ndarray, x: float, y: float, radius: float) -> float:
    """Mean of the nodule's core minus mean of a lung ring just outside it."""
    rows, cols = np.mgrid[: image.shape[0], : image.shape[1]]
    distance = np.hypot(cols - x, rows - y)
    core = distance <= max(0.7 * radius, 1.0)
    ring = (distance > 1.3 * radius + 1) & (distance <= 1.8 * radius + 2) & lung
    return float(image[core].mean() - image[ring].mean())


# ---------------------------------------------------------------------------------------------
# make_phantom
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", [64, 128, 201, 256])
def test_shape_dtype_range(kind, size):
    image, info = make_phantom(np.random.default_rng(1), size, kind)
    assert image.shape == (size, size)
    assert image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert image.std() > 0.1  # a picture, not a flat field
    assert info["kind"] == kind


def test_same_seed_same_pixels_other_seed_other_pixels():
    first, info_first = make_phantom(np.random.default_rng(7), 128, "malignant")
    again, info_again = make_phantom(np.random.default_rng(7), 128, "malignant")
    other, _ = make_phantom(np.random.default_rng(8), 128, "malignant")
    np.testing.assert_array_equal(first, again)
    assert info_first == info_again
    assert np.abs(first - other).mean() > 0.01


def test_unknown_kind_raises():
    with pytest.raises(ValueError, match="kind"):
        make_phantom(np.random.default_rng(0), 64, "nodule")


@pytest.mark.parametrize("kind", KINDS)
def test_info_is_json_and_complete(kind):
    _, info = make_phantom(np.random.default_rng(3), 128, kind)
    assert json.loads(json.dumps(info)) == info
    nodule_keys = ("nodule_x", "nodule_y", "nodule_radius_px", "size_mm", "subtlety", "calcified", "margin")
    if kind == "non_nodule":
        assert info["has_nodule"] is False and info["malignant"] is None
        assert all(info[key] is None for key in nodule_keys)
    else:
        assert info["has_nodule"] is True and info["malignant"] is (kind == "malignant")
        assert all(info[key] is not None for key in nodule_keys)
        assert info["subtlety"] in {1, 2, 3, 4, 5}
        assert info["margin"] in ({"smooth"} if kind == "benign" else {"lobulated", "spiculated"})


# ---------------------------------------------------------------------------------------------
# Anatomy and nodules
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [128, 256])
def test_nodule_centre_lies_in_a_lung_field(size):
    for kind in ("benign", "malignant"):
        for phantom in _phantoms(kind, 25, size):
            x, y = round(phantom.info["nodule_x"]), round(phantom.info["nodule_y"])
            assert phantom.lung_mask[y, x], phantom.info


def test_lung_fields_are_plausible():
    for phantom in _phantoms("non_nodule", 10):
        mask = phantom.lung_mask
        assert 0.15 < mask.mean() < 0.45  # JSRT lung masks cover about a quarter to a third
        assert mask[:, :54].sum() > 0 and mask[:, 74:].sum() > 0  # two lungs, one each side
        assert not mask[:, 62:66].any()  # the mediastinum separates them
        assert not mask[-8:].any() and not mask[:6].any()  # abdomen below, neck above


def test_radius_and_disc_match_size_mm():
    for kind in ("benign", "malignant"):
        for phantom in _phantoms(kind, 20, 256):
            info = phantom.info
            nominal_px = info["size_mm"] / info["pixel_spacing_mm"] / 2
            assert info["pixel_spacing_mm"] == pytest.approx(360.0 / 256)
            assert info["nodule_radius_px"] == pytest.approx(nominal_px, rel=0.06)  # view zoom is +-5 %
            disc_area = phantom.nodule_mask.sum()
            assert disc_area == pytest.approx(np.pi * info["nodule_radius_px"] ** 2, rel=0.3, abs=4)


def test_size_distributions_overlap_but_are_ordered():
    benign = np.array([phantoms.sample_anatomy(np.random.default_rng([1, i]), "benign").nodule.size_mm
                       for i in range(300)])
    malignant = np.array([phantoms.sample_anatomy(np.random.default_rng([2, i]), "malignant").nodule.size_mm
                          for i in range(300)])
    assert benign.min() >= 5 and benign.max() <= 15
    assert malignant.min() >= 10 and malignant.max() <= 35
    assert malignant.mean() > benign.mean() + 5
    assert (malignant < 15).mean() > 0.05 and (benign > 10).mean() > 0.2  # the classes overlap


def test_calcification_and_margins_by_class():
    benign = [phantoms.sample_anatomy(np.random.default_rng([3, i]), "benign").nodule for i in range(300)]
    malignant = [phantoms.sample_anatomy(np.random.default_rng([4, i]), "malignant").nodule for i in range(300)]
    assert 0.2 < np.mean([nodule.calcified for nodule in benign]) < 0.4
    assert not any(nodule.calcified for nodule in malignant)
    assert {nodule.margin for nodule in malignant} == {"lobulated", "spiculated"}


def test_nodule_adds_density_and_nothing_else():
    """The same patient, view and noise with and without the nodule differ only around the nodule."""
    for kind in ("benign", "malignant"):
        for seed in range(10):
            rng = np.random.default_rng([5, seed])
            anatomy, view = phantoms.sample_anatomy(rng, kind), phantoms.sample_view(rng)
            state = rng.bit_generator.state
            with_nodule = phantoms.render(anatomy, view, 128, rng)
            rng.bit_generator.state = state
            without = phantoms.render(dataclasses.replace(anatomy, nodule=None), view, 128, rng)
            difference = with_nodule.image - without.image
            assert difference.min() >= -1e-6
            assert difference[with_nodule.nodule_mask].mean() > 0.003
            info = with_nodule.info
            rows, cols = np.mgrid[:128, :128]
            far = np.hypot(cols - info["nodule_x"], rows - info["nodule_y"]) > 3 * info["nodule_radius_px"] + 4
            assert np.abs(difference[far]).max() < 1e-6


def test_nodule_stands_out_from_its_surroundings_and_lung_texture_does_not():
    contrasts = []
    for phantom in _phantoms("benign", 40, 256) + _phantoms("malignant", 40, 256):
        info = phantom.info
        contrasts.append(_ring_contrast(phantom.image, phantom.lung_mask, info["nodule_x"], info["nodule_y"],
                                        info["nodule_radius_px"]))
    background = []
    rng = np.random.default_rng(9)
    for phantom in _phantoms("non_nodule", 40, 256):
        rows, cols = np.nonzero(phantom.lung_mask)
        while True:  # a lung point whose 5-px disc lies inside the lung, as nodule centres do
            pick = rng.integers(len(rows))
            row, col = rows[pick], cols[pick]
            if phantom.lung_mask[row - 5: row + 6, col - 5: col + 6].all():
                break
        background.append(_ring_contrast(phantom.image, phantom.lung_mask, col, row, 5.0))
    assert np.mean(np.array(contrasts) > 0) > 0.85
    assert np.median(contrasts) > 0.03
    assert abs(np.mean(background)) < 0.015
    assert np.median(contrasts) > 3 * abs(np.mean(background))


def test_subtlety_follows_contrast():
    rows = []
    for seed in range(150):
        rng = np.random.default_rng([6, seed])
        kind = ("benign", "malignant")[seed % 2]
        anatomy, view = phantoms.sample_anatomy(rng, kind), phantoms.sample_view(rng)
        state = rng.bit_generator.state
        with_nodule = phantoms.render(anatomy, view, 128, rng)
        rng.bit_generator.state = state
        without = phantoms.render(dataclasses.replace(anatomy, nodule=None), view, 128, rng)
        contrast = (with_nodule.image - without.image)[with_nodule.nodule_mask].mean()
        rows.append((with_nodule.info["subtlety"], contrast))
    subtlety, contrast = np.array(rows).T
    assert set(subtlety) == {1, 2, 3, 4, 5}
    assert contrast[subtlety == 1].mean() < 0.5 * contrast[subtlety >= 4].mean()


def test_heart_shadow_is_on_the_image_right():
    """PA view: the patient's left, where the heart bulges, is displayed on the viewer's right."""
    differences = []
    for phantom in _phantoms("non_nodule", 30):
        lower = phantom.image[70:102]  # rows 0.55-0.8 of 128
        differences.append(lower[:, 70:92].mean() - lower[:, 36:58].mean())
    assert min(differences) > 0
    assert np.mean(differences) > 0.05


def test_second_view_shows_the_same_patient():
    rng = np.random.default_rng(11)
    anatomy = phantoms.sample_anatomy(rng, "malignant")
    first = phantoms.render(anatomy, phantoms.sample_view(rng), 128, rng)
    second = phantoms.render(anatomy, phantoms.sample_view(rng), 128, rng)
    assert first.info["size_mm"] == second.info["size_mm"] and first.info["margin"] == second.info["margin"]
    assert (first.info["nodule_x"], first.info["nodule_y"]) != (second.info["nodule_x"], second.info["nodule_y"])
    shift = np.hypot(first.info["nodule_x"] - second.info["nodule_x"], first.info["nodule_y"] - second.info["nodule_y"])
    assert shift < 0.15 * 128  # a slightly different view, not another patient
    assert second.lung_mask[round(second.info["nodule_y"]), round(second.info["nodule_x"])]


# ---------------------------------------------------------------------------------------------
# write_phantom_dataset
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("phantoms")
    calls = []
    labels = write_phantom_dataset(out_dir, 30, size=128, seed=3, progress=lambda i, n: calls.append((i, n)))
    with labels.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return out_dir, labels, rows, calls


def test_dataset_files_and_columns(dataset):
    out_dir, labels, rows, _ = dataset
    assert labels == out_dir / "labels.csv"
    assert tuple(rows[0].keys()) == LABEL_COLUMNS
    assert BRIEF_COLUMNS <= set(LABEL_COLUMNS)
    assert len(rows) == 30
    for row in rows:
        assert (out_dir / row["image"]).is_file() and (out_dir / row["lung_mask"]).is_file()
        assert row["image"] == f"images/{row['case_id']}.png" and row["synthetic"] == "1"


def test_dataset_counts_follow_fractions(dataset):
    _, _, rows, _ = dataset
    labels = [row["label"] for row in rows]
    assert (labels.count("malignant"), labels.count("benign"), labels.count("non_nodule")) == (12, 6, 12)


def test_dataset_label_fields(dataset):
    _, _, rows, _ = dataset
    for row in rows:
        if row["label"] == "non_nodule":
            assert row["has_nodule"] == "0"
            assert row["malignant"] == row["subtlety"] == row["size_mm"] == row["nodule_x"] == ""
        else:
            assert row["has_nodule"] == "1" and row["malignant"] == str(int(row["label"] == "malignant"))
            assert 1 <= int(row["subtlety"]) <= 5 and 5 <= float(row["size_mm"]) <= 35
            assert 0 <= float(row["nodule_x"]) < 128 and 0 <= float(row["nodule_y"]) < 128
            assert float(row["nodule_x_2048"]) == pytest.approx(float(row["nodule_x"]) * 16, abs=2)
            assert row["location"][:2] in {"r.", "l."}
        assert row["sex"] in {"male", "female"} and 20 <= int(row["age"]) <= 90


def test_dataset_16_bit_pngs_use_the_range(dataset):
    out_dir, _, rows, _ = dataset
    for row in rows[:5]:
        with Image.open(out_dir / row["image"]) as image:
            assert image.mode == "I;16" and image.size == (128, 128)
            pixels = np.array(image)
        assert pixels.max() > 45000 and pixels.min() < 25000
        assert len(np.unique(pixels)) > 2000  # really 16-bit, not 8-bit values scaled up
        with Image.open(out_dir / row["lung_mask"]) as mask:
            assert set(np.unique(np.array(mask))) == {0, 1}


def test_dataset_has_patients_with_two_images(dataset):
    _, _, rows, _ = dataset
    by_patient = {}
    for row in rows:
        by_patient.setdefault(row["patient_id"], []).append(row)
    twins = [group for group in by_patient.values() if len(group) == 2]
    assert len(twins) >= 2 and max(len(group) for group in by_patient.values()) == 2
    assert all(patient_id.startswith("SYN") and len(patient_id) == 8 for patient_id in by_patient)
    for first, second in twins:
        assert first["label"] == second["label"] and first["size_mm"] == second["size_mm"]
        assert (first["age"], first["sex"]) == (second["age"], second["sex"])


def test_dataset_readme_says_synthetic(dataset):
    out_dir, _, _, _ = dataset
    readme = (out_dir / "README.md").read_text(encoding="utf-8")
    assert "SYNTHETIC" in readme and "seed: 3" in readme
    assert "says anything about real chest radiographs" in readme


def test_dataset_progress_reports_every_image(dataset):
    _, _, _, calls = dataset
    assert calls == [(i, 30) for i in range(1, 31)]


def _digests(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def test_dataset_is_byte_identical_for_a_seed(tmp_path):
    write_phantom_dataset(tmp_path / "a", 8, size=64, seed=5)
    write_phantom_dataset(tmp_path / "b", 8, size=64, seed=5)
    write_phantom_dataset(tmp_path / "c", 8, size=64, seed=6)
    first, again, other = _digests(tmp_path / "a"), _digests(tmp_path / "b"), _digests(tmp_path / "c")
    assert first == again
    assert first["images/PHANT0001.png"] != other["images/PHANT0001.png"]


def test_dataset_8_bit(tmp_path):
    labels = write_phantom_dataset(tmp_path, 3, size=64, bits=8, fractions=(0.0, 0.0, 1.0))
    with labels.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["label"] for row in rows] == ["non_nodule"] * 3
    with Image.open(tmp_path / rows[0]["image"]) as image:
        assert image.mode == "L"


@pytest.mark.parametrize("kwargs", [{"fractions": (0.5, 0.5, 0.5)}, {"fractions": (0.5, 0.5)}, {"bits": 12},
                                    {"fractions": (-0.1, 0.6, 0.5)}])
def test_dataset_rejects_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        write_phantom_dataset(tmp_path, 4, size=64, **kwargs)


@pytest.mark.skipif(not JSRT_LABELS.is_file(), reason="real JSRT labels not present in ../shared/data/jsrt")
def test_columns_follow_the_real_jsrt_layout():
    with JSRT_LABELS.open(newline="") as handle:
        header = next(csv.reader(handle))
    assert list(LABEL_COLUMNS[: len(header)]) == header
