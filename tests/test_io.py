"""Tests for lungdx.io: real JSRT and DICOM files first, pydicom's own files, then synthetic ones.

Shared data is read in place; every generated file lives under pytest's tmp_path.
"""

import csv
import json
import pickle
import struct
import zlib
from dataclasses import FrozenInstanceError
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder

from lungdx.io import (
    ImageReadError,
    Radiograph,
    invert_polarity,
    is_chest_radiograph,
    read_dicom,
    read_image,
    read_jsrt_raw,
    read_raster,
    sniff_format,
    write_jsrt_raw,
)
from lungdx.io.codestream import jpeg_size
from lungdx.io.dicom import InflationLimitError, padding_mask, scale_to_unit, spacing_mm

RG1_J2KI = "nema_wg04_RG1_J2KI_cr_chest_pa.dcm"
RG1_RAW = "nema_wg04_RG1_cr_chest_pa_uncompressed.dcm"
RG3_TIBIA = "nema_wg04_RG3_J2KR_cr_tibia.dcm"
NIH_DX = "nih_cxr14_dx_chest_nofinding.dcm"
OT_ABDOMEN = "dicomlibrary_ot_abdomen.dcm"


@pytest.fixture(scope="session")
def dicom_rows(dicom_dir: Path) -> dict:
    with open(dicom_dir / "files.csv", newline="") as stream:
        return {row["file"]: row for row in csv.DictReader(stream)}


@pytest.fixture(scope="session")
def jsrt_png(jsrt_dir: Path) -> Path:
    return jsrt_dir / "images" / "JPCLN001.png"


def _pydicom_file(name: str) -> str:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not bundled with this pydicom")
    return path


def _lungs_minus_mediastinum(pixels: np.ndarray) -> float:
    """Mediastinum brightness minus the brighter lung field, upper half of a frontal chest.

    Positive in MONOCHROME2 polarity (spine and heart bright, aerated lungs dark).
    """
    height, width = pixels.shape
    rows = slice(int(0.25 * height), int(0.5 * height))
    right_lung = pixels[rows, int(0.2 * width) : int(0.35 * width)].mean()
    left_lung = pixels[rows, int(0.65 * width) : int(0.8 * width)].mean()
    mediastinum = pixels[rows, int(0.45 * width) : int(0.55 * width)].mean()
    return float(mediastinum - max(right_lung, left_lung))


# --- JSRT PNGs and raw .IMG -------------------------------------------------------------------


def test_every_jsrt_png_reads_as_unit_float32(jsrt_dir):
    files = sorted((jsrt_dir / "images").glob("*.png"))
    assert len(files) == 247
    for file in files:
        image = read_image(file)
        assert image.pixels.dtype == np.float32 and image.pixels.shape == (1024, 1024), file
        assert 0.0 <= image.pixels.min() and image.pixels.max() <= 1.0, file
        assert image.meta["format"] == "png" and image.meta["bits"] == 8


def test_jsrt_png_values_are_levels_over_255(jsrt_png):
    levels = np.asarray(Image.open(jsrt_png))
    np.testing.assert_array_equal(read_raster(jsrt_png).pixels, (levels / 255).astype(np.float32))


def test_jsrt_raw_round_trip_at_own_shape(jsrt_png, tmp_path):
    pixels = read_image(jsrt_png).pixels
    raw = tmp_path / "JPCLN001.IMG"
    write_jsrt_raw(raw, pixels)
    back = read_jsrt_raw(raw, shape=pixels.shape)
    expected = (np.rint(pixels.astype(np.float64) * 4095) / 4095).astype(np.float32)
    np.testing.assert_array_equal(back.pixels, expected)
    assert np.abs(back.pixels - pixels).max() <= 0.5 / 4095 + 1e-7
    again = tmp_path / "again.IMG"
    write_jsrt_raw(again, back.pixels)
    assert again.read_bytes() == raw.read_bytes()
    assert back.meta["pixel_spacing_mm"] is None  # known only for the official 2048 layout


def test_jsrt_raw_official_layout_via_read_image(jsrt_png, tmp_path):
    pixels = read_image(jsrt_png).pixels
    upsampled = np.repeat(np.repeat(pixels, 2, axis=0), 2, axis=1)
    raw = tmp_path / "JPCLN001.IMG"
    write_jsrt_raw(raw, upsampled)
    assert raw.stat().st_size == 2048 * 2048 * 2
    image = read_image(raw)
    assert image.meta["format"] == "jsrt_raw" and image.meta["bits"] == 12
    assert image.meta["original_shape"] == [2048, 2048]
    assert image.meta["pixel_spacing_mm"] == [0.175, 0.175]
    np.testing.assert_array_equal(image.pixels[::2, ::2], read_jsrt_raw(raw).pixels[::2, ::2])
    assert np.abs(image.pixels[::2, ::2] - pixels).max() <= 0.5 / 4095 + 1e-7


def test_jsrt_raw_is_stored_with_high_values_dark(tmp_path):
    raw = tmp_path / "tiny.IMG"
    write_jsrt_raw(raw, np.array([[0.0, 1.0, 0.5]], dtype=np.float32))
    assert struct.unpack(">3H", raw.read_bytes()) == (4095, 0, 2047)  # black -> 4095, big-endian
    as_stored = read_jsrt_raw(raw, shape=(1, 3), invert=False).pixels
    np.testing.assert_allclose(as_stored, [[1.0, 0.0, 2047 / 4095]], rtol=0, atol=1e-7)


def test_jsrt_raw_without_inversion_round_trips(tmp_path):
    raw = tmp_path / "plain.IMG"
    write_jsrt_raw(raw, np.array([[0.0, 1.0]]), invert=False)
    assert struct.unpack(">2H", raw.read_bytes()) == (0, 4095)
    np.testing.assert_array_equal(read_jsrt_raw(raw, shape=(1, 2), invert=False).pixels, [[0, 1]])


def test_jsrt_raw_wrong_size_is_refused(tmp_path):
    raw = tmp_path / "short.IMG"
    raw.write_bytes(b"\x00" * 1000)
    with pytest.raises(ImageReadError) as info:
        read_image(raw)
    assert "short.IMG" in str(info.value) and "8388608 bytes" in info.value.reason


def test_jsrt_raw_values_above_bit_range_are_clipped(tmp_path):
    raw = tmp_path / "hot.IMG"
    raw.write_bytes(struct.pack(">2H", 5000, 4095))
    pixels = read_jsrt_raw(raw, shape=(1, 2), invert=False).pixels
    np.testing.assert_array_equal(pixels, [[1.0, 1.0]])


@pytest.mark.parametrize(
    "pixels",
    [np.array([[1.5]]), np.array([[-0.1]]), np.array([[np.nan]]), np.zeros((2, 2, 2))],
    ids=["above-one", "negative", "nan", "three-d"],
)
def test_write_jsrt_raw_refuses_invalid_pixels(pixels, tmp_path):
    with pytest.raises(ValueError):
        write_jsrt_raw(tmp_path / "bad.IMG", pixels)


@settings(max_examples=60, deadline=None)
@given(
    pixels=hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, max_side=8),
                      elements=st.floats(0, 1, width=32)),
    bits=st.integers(1, 16),
    invert=st.booleans(),
)
def test_jsrt_raw_round_trip_is_exact_after_quantisation(pixels, bits, invert, tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw") / "x.IMG"
    write_jsrt_raw(raw, pixels, bits=bits, invert=invert)
    back = read_jsrt_raw(raw, shape=pixels.shape, bits=bits, invert=invert).pixels
    levels = 2**bits - 1
    expected = (np.rint(pixels.astype(np.float64) * levels) / levels).astype(np.float32)
    np.testing.assert_array_equal(back, expected)


# --- DICOM samples ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [NIH_DX, RG1_J2KI, RG1_RAW, RG3_TIBIA, OT_ABDOMEN])
def test_dicom_sample_reads_with_its_header_facts(name, dicom_dir, dicom_rows):
    row = dicom_rows[name]
    image = read_image(dicom_dir / name)
    assert image.pixels.dtype == np.float32
    assert image.pixels.shape == (int(row["rows"]), int(row["columns"]))
    assert 0.0 <= image.pixels.min() and image.pixels.max() <= 1.0
    assert image.pixels.max() > image.pixels.min()
    meta = image.meta
    assert meta["format"] == "dicom" and meta["bits"] == int(row["bits_stored"])
    assert meta["modality"] == row["modality"]
    assert meta["photometric_interpretation"] == row["photometric"]
    assert meta["body_part"] == (row["body_part"] or None)
    assert meta["view_position"] == (row["view_position"] or None)
    assert pydicom.uid.UID(meta["transfer_syntax"]).name == row["transfer_syntax"]
    assert meta["source"] == str(dicom_dir / name)
    assert meta["padding_pixels"] == 0  # no sample carries Pixel Padding Value (0028,0120)
    assert json.loads(json.dumps(meta)) == meta


@pytest.mark.parametrize("name", [NIH_DX, RG1_J2KI, RG1_RAW, RG3_TIBIA, OT_ABDOMEN])
def test_is_chest_radiograph_agrees_with_files_csv(name, dicom_dir, dicom_rows):
    accepted, reason = is_chest_radiograph(read_image(dicom_dir / name).meta)
    assert accepted == (dicom_rows[name]["is_chest"] == "1"), reason
    assert reason


def test_jpeg2000_and_uncompressed_rg1_give_identical_pixels(dicom_dir):
    compressed = read_dicom(dicom_dir / RG1_J2KI)
    uncompressed = read_dicom(dicom_dir / RG1_RAW)
    np.testing.assert_array_equal(compressed.pixels, uncompressed.pixels)


def test_monochrome1_chest_is_inverted_to_dark_lungs(dicom_dir):
    file = dicom_dir / RG1_RAW
    stored = pydicom.dcmread(file).pixel_array.astype(np.float64)
    # The criterion can fail: on stored MONOCHROME1 values the lungs are the bright part.
    assert _lungs_minus_mediastinum(stored / stored.max()) < -0.1
    assert _lungs_minus_mediastinum(read_dicom(file).pixels) > 0.1


def test_monochrome1_pixels_are_the_window_inverted(dicom_dir):
    file = dicom_dir / RG1_RAW
    stored = pydicom.dcmread(file).pixel_array.astype(np.float64)
    # Window Center 15000 / Width 30000 (LINEAR, PS3.3 C.11.2.1.2.1) over the 15-bit range.
    windowed = np.clip((stored - 14999.5) / 29999 + 0.5, 0, 1)
    np.testing.assert_allclose(read_dicom(file).pixels, 1 - windowed, rtol=0, atol=1e-6)
    assert read_dicom(file).meta["voi"] == "window"


def test_monochrome2_chest_keeps_its_polarity(dicom_dir):
    image = read_dicom(dicom_dir / NIH_DX)
    assert _lungs_minus_mediastinum(image.pixels) > 0.1
    stored = pydicom.dcmread(dicom_dir / NIH_DX).pixel_array.astype(np.float64)
    expected = (stored - stored.min()) / (stored.max() - stored.min())  # min-max: no VOI tags
    np.testing.assert_allclose(image.pixels, expected, rtol=0, atol=1e-6)


def test_degenerate_pixel_spacing_is_recorded_as_none(dicom_dir):
    assert pydicom.dcmread(dicom_dir / RG1_RAW, stop_before_pixels=True).PixelSpacing == [0, 0]
    assert read_dicom(dicom_dir / RG1_RAW).meta["pixel_spacing_mm"] is None


def test_nih_dx_with_missing_tags_is_accepted(dicom_dir):
    meta = read_dicom(dicom_dir / NIH_DX).meta
    assert meta["body_part"] is None and meta["view_position"] is None
    assert meta["pixel_spacing_mm"] is None and meta["manufacturer"] is None
    accepted, reason = is_chest_radiograph(meta)
    assert accepted and "DX" in reason


def test_non_chest_samples_are_rejected_with_the_reason(dicom_dir):
    accepted, reason = is_chest_radiograph(read_dicom(dicom_dir / RG3_TIBIA).meta)
    assert not accepted and "EXTREMITY" in reason and "(0018,0015)" in reason
    accepted, reason = is_chest_radiograph(read_dicom(dicom_dir / OT_ABDOMEN).meta)
    assert not accepted and "OT" in reason and "Secondary Capture" in reason


def test_dicom_without_preamble_or_extension_reads(dicom_dir, tmp_path):
    ds = pydicom.dcmread(dicom_dir / NIH_DX)
    plain = tmp_path / "series1"  # extension-less export: found by its 'DICM' prefix
    ds.save_as(plain)
    ds.preamble = None
    del ds.file_meta
    bare = tmp_path / "bare.dcm"  # no preamble, no meta header: found by its extension
    ds.save_as(bare, enforce_file_format=False, implicit_vr=True, little_endian=True)
    assert bare.read_bytes()[128:132] != b"DICM"
    reference = read_dicom(dicom_dir / NIH_DX).pixels
    for file in (plain, bare):
        assert sniff_format(file) == "dicom"
        np.testing.assert_array_equal(read_image(file).pixels, reference)
    assert read_image(bare).meta["transfer_syntax"] == pydicom.uid.ImplicitVRLittleEndian


# --- pydicom's own test files -------------------------------------------------------------------


def test_dicom_tiff_dual_file_is_read_as_dicom():
    file = _pydicom_file("CT_small.dcm")
    assert Path(file).read_bytes()[:4] == b"II*\x00"  # its preamble is a TIFF header
    assert read_image(file).meta["format"] == "dicom"


def test_rescale_is_applied_before_the_window(tmp_path):
    ds = pydicom.dcmread(_pydicom_file("CT_small.dcm"))
    assert (ds.RescaleSlope, ds.RescaleIntercept) == (1, -1024)
    ds.WindowCenter, ds.WindowWidth = 40, 400  # in rescaled (HU) units
    file = tmp_path / "ct_window.dcm"
    ds.save_as(file)
    hounsfield = ds.pixel_array.astype(np.float64) - 1024
    expected = np.clip((hounsfield - 39.5) / 399 + 0.5, 0, 1)
    np.testing.assert_allclose(read_dicom(file).pixels, expected, rtol=0, atol=1e-6)


def test_voi_lut_sequence_wins_over_the_window(tmp_path):
    ds = pydicom.dcmread(_pydicom_file("CT_small.dcm"))
    del ds.RescaleSlope, ds.RescaleIntercept
    lut = np.round(65535 * np.sqrt(np.arange(4096) / 4095)).astype(np.uint16)
    item = Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 16])  # LUT Descriptor: entries, first, bits
    item.add_new(0x00283006, "US", lut.tolist())  # LUT Data
    ds.VOILUTSequence = [item]
    ds.WindowCenter, ds.WindowWidth = 40, 400
    file = tmp_path / "ct_voi_lut.dcm"
    ds.save_as(file)
    image = read_dicom(file)
    assert image.meta["voi"] == "voi_lut"
    expected = lut[ds.pixel_array] / 65535
    np.testing.assert_allclose(image.pixels, expected, rtol=0, atol=1e-6)


def test_undecodable_transfer_syntax_names_it_and_the_plugin():
    file = _pydicom_file("MR_small_jpeg_ls_lossless.dcm")
    if get_decoder(pydicom.uid.JPEGLSLossless).is_available:
        assert read_dicom(file).pixels.shape == (64, 64)
        return
    with pytest.raises(ImageReadError) as info:
        read_dicom(file)
    reason = info.value.reason
    assert "JPEG-LS Lossless" in reason and "1.2.840.10008.1.2.4.80" in reason
    assert "install" in reason


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("rtplan.dcm", "no pixel data (7FE0,0010)"),
        ("SC_rgb_small_odd.dcm", "Samples per Pixel (0028,0002) is 3"),
        ("rtdose.dcm", "multi-frame image (15 frames"),
    ],
)
def test_dicom_objects_that_are_not_one_grayscale_frame_are_refused(name, words):
    file = _pydicom_file(name)
    with pytest.raises(ImageReadError) as info:
        read_dicom(file)
    assert words in info.value.reason and info.value.path == file


# --- pixel padding (0028,0120)/(0028,0121) --------------------------------------------------------

_BORDER = np.ones((32, 32), dtype=bool)
_BORDER[4:28, 4:28] = False  # a 4-pixel frame around a 24x24 collimated field
_ANATOMY = np.linspace(1000, 3000, 24 * 24).round().reshape(24, 24)  # stored values 1000..3000


def _padded(border, anatomy=_ANATOMY) -> np.ndarray:
    """A 32x32 image: ``anatomy`` in the field, ``border`` (a value or a 32x32 array) in the frame."""
    stored = np.broadcast_to(np.asarray(border, dtype=np.int64), (32, 32)).copy()
    stored[4:28, 4:28] = anatomy
    return stored


def _dx_file(path: Path, stored: np.ndarray, photometric: str = "MONOCHROME2", signed: bool = False, **tags) -> Path:
    """A 12-bit single-frame DX For Presentation file, Explicit VR Little Endian, with extra ``tags`` by keyword."""
    ds = Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = _DX_FOR_PRESENTATION
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.Modality, ds.PhotometricInterpretation = "DX", photometric
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 16, 12, 11
    ds.PixelRepresentation = int(signed)
    ds.PixelData = stored.astype("<i2" if signed else "<u2").tobytes()
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_minmax_ranges_over_the_anatomy_and_padding_reads_black(tmp_path):
    image = read_dicom(_dx_file(tmp_path / "padded.dcm", _padded(0), PixelPaddingValue=0))
    field = image.pixels[4:28, 4:28]
    np.testing.assert_allclose(field, (_ANATOMY - 1000) / 2000, rtol=0, atol=1e-6)  # not (x - 0) / 3000
    assert (field.min(), field.max()) == (0.0, 1.0)
    assert not image.pixels[_BORDER].any()
    assert image.meta["voi"] == "minmax"
    assert image.meta["padding_pixels"] == 32 * 32 - 24 * 24 and type(image.meta["padding_pixels"]) is int


@pytest.mark.parametrize("padding", [4095, 0], ids=["at-maximum", "at-minimum"])
def test_monochrome1_padding_reads_black_after_inversion(padding, tmp_path):
    # Stored 0 is shown white in MONOCHROME1: that border read 1 before, and 4095 squeezed the anatomy.
    file = _dx_file(tmp_path / "mono1.dcm", _padded(padding), "MONOCHROME1", PixelPaddingValue=padding)
    image = read_dicom(file)
    np.testing.assert_allclose(image.pixels[4:28, 4:28], 1 - (_ANATOMY - 1000) / 2000, rtol=0, atol=1e-6)
    assert not image.pixels[_BORDER].any()


@pytest.mark.parametrize(("value", "limit"), [(4000, 4095), (4095, 4000)], ids=["ascending", "descending"])
def test_padding_range_limit_marks_every_value_between_inclusive(value, limit, tmp_path):
    border = np.resize([4000, 4050, 4095], (32, 32))
    file = _dx_file(tmp_path / "range.dcm", _padded(border), "MONOCHROME1",
                    PixelPaddingValue=value, PixelPaddingRangeLimit=limit)
    image = read_dicom(file)
    np.testing.assert_allclose(image.pixels[4:28, 4:28], 1 - (_ANATOMY - 1000) / 2000, rtol=0, atol=1e-6)
    assert not image.pixels[_BORDER].any()
    assert image.meta["padding_pixels"] == int(_BORDER.sum())


def test_padding_mask_bounds_are_inclusive_and_absent_tags_give_none():
    ds = Dataset()
    ds.PixelRepresentation, ds.BitsStored = 0, 12
    stored = np.array([3999, 4000, 4050, 4095, 0], dtype=np.uint16)
    assert padding_mask(stored, ds) is None
    ds.PixelPaddingValue = 4000
    np.testing.assert_array_equal(padding_mask(stored, ds), [False, True, False, False, False])
    ds.PixelPaddingRangeLimit = 4095
    np.testing.assert_array_equal(padding_mask(stored, ds), [False, True, True, True, False])


@pytest.mark.parametrize("encoded_as", ["SS", "US"])
def test_signed_padding_is_compared_as_a_signed_stored_value(encoded_as, tmp_path):
    # pydicom writes SS from Pixel Representation 1; an Explicit VR file may say US, read as the 16-bit pattern.
    anatomy = _ANATOMY - 2000  # -1000..1000
    ds_tags = {"PixelPaddingValue": -2048} if encoded_as == "SS" else {}
    file = _dx_file(tmp_path / "signed.dcm", _padded(-2048, anatomy), signed=True, **ds_tags)
    if encoded_as == "US":
        ds = pydicom.dcmread(file)
        ds.add_new(0x00280120, "US", 0xF800)
        ds.save_as(file)
    element = pydicom.dcmread(file)["PixelPaddingValue"]
    assert (element.VR, element.value) == (encoded_as, -2048 if encoded_as == "SS" else 63488)
    image = read_dicom(file)
    np.testing.assert_allclose(image.pixels[4:28, 4:28], (anatomy + 1000) / 2000, rtol=0, atol=1e-6)
    assert not image.pixels[_BORDER].any() and image.meta["padding_pixels"] == int(_BORDER.sum())


def _voi_lut_item() -> Dataset:
    item = Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 16])  # LUT Descriptor: entries, first, bits
    item.add_new(0x00283006, "US", np.round(65535 * np.sqrt(np.arange(4096) / 4095)).astype(int).tolist())
    return item


@pytest.mark.parametrize(
    ("voi", "tags"),
    [("window", {"WindowCenter": 2000, "WindowWidth": 2000}), ("voi_lut", {"VOILUTSequence": [_voi_lut_item()]})],
)
def test_voi_transform_is_untouched_and_its_padding_reads_black(voi, tags, tmp_path):
    stored = _padded(4095)  # the window and the LUT both show 4095 white
    unpadded = read_dicom(_dx_file(tmp_path / "plain.dcm", stored, **tags))
    padded = read_dicom(_dx_file(tmp_path / "padded.dcm", stored, PixelPaddingValue=4095, **tags))
    assert padded.meta["voi"] == unpadded.meta["voi"] == voi
    assert unpadded.pixels[_BORDER].min() == 1.0 and not padded.pixels[_BORDER].any()
    np.testing.assert_array_equal(padded.pixels[~_BORDER], unpadded.pixels[~_BORDER])


def test_without_padding_tags_the_output_is_the_old_min_max(tmp_path):
    stored = _padded(0)
    image = read_dicom(_dx_file(tmp_path / "untagged.dcm", stored))
    np.testing.assert_allclose(image.pixels, stored / 3000, rtol=0, atol=1e-6)  # the border takes part, as before
    assert image.meta["padding_pixels"] == 0


@pytest.mark.parametrize(
    "tags",
    [{"PixelPaddingRangeLimit": 0}, {"PixelPaddingValue": 5000}, {"PixelPaddingValue": [0, 1]}],
    ids=["limit-without-value", "outside-12-bits", "two-values"],
)
def test_malformed_padding_tags_are_ignored_with_a_warning(tags, tmp_path, caplog):
    stored = _padded(0)
    image = read_dicom(_dx_file(tmp_path / "malformed.dcm", stored, **tags))
    np.testing.assert_allclose(image.pixels, stored / 3000, rtol=0, atol=1e-6)
    assert image.meta["padding_pixels"] == 0
    assert f"{tmp_path / 'malformed.dcm'}: ignoring pixel padding" in caplog.text


def test_image_that_is_all_padding_reads_black(tmp_path):
    image = read_dicom(_dx_file(tmp_path / "blank.dcm", np.full((8, 8), 4095), PixelPaddingValue=4095))
    assert not image.pixels.any() and image.meta["padding_pixels"] == 64


def test_real_dx_padded_at_an_unused_value_keeps_its_anatomy_range(dicom_dir, tmp_path):
    ds = pydicom.dcmread(dicom_dir / NIH_DX)
    stored = ds.pixel_array.copy()
    assert stored.max() < 255  # the padding value is no anatomy value
    stored[:64], stored[-64:], stored[:, :64], stored[:, -64:] = 255, 255, 255, 255
    field = stored[64:-64, 64:-64].astype(np.float64)
    ds.PixelData = stored.tobytes()
    ds.add_new(0x00280120, "US", 255)  # Pixel Padding Value, VR of Pixel Representation 0
    ds.save_as(tmp_path / "nih_padded.dcm")
    pixels = read_dicom(tmp_path / "nih_padded.dcm").pixels
    expected = (field - field.min()) / (field.max() - field.min())
    np.testing.assert_allclose(pixels[64:-64, 64:-64], expected, rtol=0, atol=1e-6)
    assert not pixels[:64].any() and not pixels[:, -64:].any()


def test_real_monochrome1_cr_padding_reads_black_not_white(dicom_dir, tmp_path):
    ds = pydicom.dcmread(dicom_dir / RG1_RAW)
    stored = ds.pixel_array.copy()
    assert stored.min() > 0  # 0 is no anatomy value
    stored[:, :100] = 0
    ds.PixelData = stored.tobytes()
    ds.add_new(0x00280120, "US", 0)  # Pixel Padding Value, VR of Pixel Representation 0
    ds.save_as(tmp_path / "rg1_padded.dcm")
    pixels = read_dicom(tmp_path / "rg1_padded.dcm").pixels
    windowed = np.clip((stored[:, 100:].astype(np.float64) - 14999.5) / 29999 + 0.5, 0, 1)  # as in the unpadded test
    np.testing.assert_allclose(pixels[:, 100:], 1 - windowed, rtol=0, atol=1e-6)
    assert not pixels[:, :100].any()  # stored 0 is shown white in MONOCHROME1: 1.0 before


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["x.dcm", "x.png", "x.jpg", "x.IMG"])
def test_text_file_gives_image_read_error_naming_file_and_reason(name, tmp_path):
    file = tmp_path / name
    file.write_text("this is not an image\n")
    with pytest.raises(ImageReadError) as info:
        read_image(file)
    error = info.value
    assert error.path == str(file) and name in str(error)
    assert error.reason and str(error) == f"{file}: {error.reason}"


def test_text_file_reasons_say_what_is_wrong(tmp_path):
    dcm, png = tmp_path / "x.dcm", tmp_path / "x.png"
    dcm.write_text("this is not an image\n")
    png.write_text("this is not an image\n")
    with pytest.raises(ImageReadError, match="not a DICOM file"):
        read_image(dcm)
    with pytest.raises(ImageReadError, match="Pillow cannot identify"):
        read_image(png)


def test_truncated_png_gives_image_read_error(jsrt_png, tmp_path):
    data = jsrt_png.read_bytes()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated.png: cannot decode image"):
        read_image(truncated)


def test_missing_and_unknown_files_give_image_read_error(tmp_path):
    with pytest.raises(ImageReadError, match="nowhere.png: file not found"):
        read_image(tmp_path / "nowhere.png")
    unknown = tmp_path / "notes.xyz"
    unknown.write_bytes(b"\x00" * 200)
    with pytest.raises(ImageReadError, match="notes.xyz: unrecognised image format"):
        read_image(unknown)
    with pytest.raises(ImageReadError, match="not a regular file"):
        read_image(tmp_path)


def test_image_read_error_survives_pickling():
    error = pickle.loads(pickle.dumps(ImageReadError(Path("/a/b.png"), "broken")))
    assert (error.path, error.reason, str(error)) == ("/a/b.png", "broken", "/a/b.png: broken")


# --- PNG / JPEG ---------------------------------------------------------------------------------


def _with_sbit(png: bytes, bits: int) -> bytes:
    """Insert an sBIT chunk right after IHDR (8-byte signature + 25-byte IHDR chunk)."""
    body = b"sBIT" + bytes([bits])
    chunk = struct.pack(">I", 1) + body + struct.pack(">I", zlib.crc32(body))
    return png[:33] + chunk + png[33:]


def test_16bit_png_round_trips_over_65535(tmp_path):
    levels = np.arange(0, 65536, 257, dtype=np.uint16).reshape(16, 16)
    levels[0, 0], levels[-1, -1] = 1, 65534
    file = tmp_path / "ramp16.png"
    Image.fromarray(levels).save(file)  # uint16 -> mode I;16
    assert Image.open(file).mode == "I;16"
    image = read_image(file)
    assert image.meta["bits"] == 16 and image.pixels.dtype == np.float32
    np.testing.assert_array_equal(image.pixels, (levels / 65535).astype(np.float32))


def test_16bit_png_big_endian_source_reads_the_same(tmp_path):
    levels = np.array([[0, 1000, 40000, 65535]], dtype=np.uint16)
    file = tmp_path / "big_endian.png"
    Image.frombytes("I;16B", (4, 1), levels.astype(">u2").tobytes()).save(file)
    np.testing.assert_array_equal(read_raster(file).pixels, (levels / 65535).astype(np.float32))


def test_16bit_png_with_sbit_recovers_the_original_levels(tmp_path):
    original = np.array([[0, 1, 2048, 4095]], dtype=np.uint16)
    scaled = (original << 4) | (original >> 8)  # PNG spec 12.3: left bit replication
    plain = tmp_path / "plain.png"
    Image.fromarray(scaled).save(plain)
    file = tmp_path / "sbit12.png"
    file.write_bytes(_with_sbit(plain.read_bytes(), 12))
    image = read_raster(file)
    assert image.meta["bits"] == 12
    np.testing.assert_array_equal(image.pixels, (original / 4095).astype(np.float32))


def test_16bit_png_of_unscaled_low_bit_samples_reads_at_their_depth(tmp_path):
    # No sBIT and nothing above 4095: 10-bit samples stored unscaled read within 1.6% of the scale at 16 bits, and
    # the blank check (lungdx.io.acceptance) refused them as nearly constant.
    from lungdx.io.acceptance import information_problem

    original = np.tile(np.arange(0, 1024, 4, dtype=np.uint16), (16, 1))
    Image.fromarray(original).save(tmp_path / "unscaled10.png")
    image = read_raster(tmp_path / "unscaled10.png")
    assert image.meta["bits"] == 10
    np.testing.assert_array_equal(image.pixels, (original / 1023).astype(np.float32))
    assert information_problem(image.pixels) is None


def test_12bit_jpeg_is_named_as_such(tmp_path):
    # It was "not a PNG/JPEG/TIFF image": the file is a JPEG, of a precision Pillow does not decode.
    from pydicom.encaps import generate_frames

    dataset = pydicom.dcmread(_pydicom_file("JPGExtended.dcm"))  # 12-bit extended JPEG (process 4)
    frame = next(generate_frames(dataset.PixelData, number_of_frames=1))
    (tmp_path / "x12.jpg").write_bytes(frame)
    with pytest.raises(ImageReadError, match=r"x12.jpg: 12-bit JPEG is not supported"):
        read_image(tmp_path / "x12.jpg")


def _png16(path: Path, samples: np.ndarray, colour_type: int) -> None:
    """A 16-bit PNG of colour type 2 (RGB), 4 (gray+alpha) or 6 (RGBA) from (H, W, channels) samples."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width = samples.shape[:2]
    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in samples)
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_16bit_colour_and_gray_alpha_pngs_keep_their_16_bits(tmp_path):
    # Pillow decodes them at 8 bits: 4096 gray levels became 256, unsaid.
    gray = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    opaque = np.full_like(gray, 65535)
    for name, samples, colour_type in (("ga16.png", np.stack([gray, opaque], -1), 4),
                                       ("rgb16.png", np.stack([gray] * 3, -1), 2),
                                       ("rgba16.png", np.stack([gray] * 3 + [opaque], -1), 6)):
        _png16(tmp_path / name, samples, colour_type)
        image = read_raster(tmp_path / name)
        assert image.meta["bits"] == 16, name
        np.testing.assert_array_equal(image.pixels, (gray / 65535).astype(np.float32))
    tinted = np.stack([gray, gray // 2, gray // 4], -1)
    _png16(tmp_path / "tinted16.png", tinted, 2)
    image = read_raster(tmp_path / "tinted16.png")
    luma = 0.299 * tinted[..., 0] + 0.587 * tinted[..., 1] + 0.114 * tinted[..., 2]
    np.testing.assert_allclose(image.pixels, luma / 65535, atol=1 / 65535)
    assert image.meta["colour_spread"] > 0.1


def _tiff(path: Path, samples: np.ndarray, photometric: int) -> None:
    """An uncompressed one-strip little-endian gray TIFF with the given PhotometricInterpretation (tag 262)."""
    height, width = samples.shape
    data = samples.astype(f"<u{samples.dtype.itemsize}").tobytes()
    tags = [(256, width), (257, height), (258, 8 * samples.dtype.itemsize), (259, 1), (262, photometric), (273, None),
            (277, 1), (278, height), (279, len(data))]
    data_offset = 8 + 2 + 12 * len(tags) + 4
    ifd = b"".join(struct.pack("<HHI", tag, 4, 1) + struct.pack("<I", data_offset if value is None else value)
                   for tag, value in tags)
    path.write_bytes(b"II*\x00" + struct.pack("<IH", 8, len(tags)) + ifd + struct.pack("<I", 0) + data)


def test_min_is_white_tiffs_read_with_bone_bright_at_8_and_16_bits(tmp_path):
    # Pillow inverts 8-bit MinIsWhite TIFFs but not 16-bit ones: those were read with lungs bright.
    stored = np.zeros((8, 8), np.uint8)
    stored[:, 4:] = 255  # left: stored 0, which MinIsWhite shows white
    for name, samples in (("white8.tif", stored), ("white16.tif", stored.astype(np.uint16) * 257)):
        _tiff(tmp_path / name, samples, photometric=0)
        pixels = read_image(tmp_path / name).pixels
        assert (pixels[0, 0], pixels[0, 7]) == (1.0, 0.0), name
        _tiff(tmp_path / f"black-{name}", samples, photometric=1)
        pixels = read_image(tmp_path / f"black-{name}").pixels
        assert (pixels[0, 0], pixels[0, 7]) == (0.0, 1.0), name


def test_8bit_jpeg_reads_close_to_its_png(jsrt_png, tmp_path):
    file = tmp_path / "jsrt.jpg"
    Image.open(jsrt_png).save(file, quality=95)
    image = read_image(file)
    assert image.meta["format"] == "jpeg" and image.meta["bits"] == 8
    assert image.pixels.shape == (1024, 1024) and image.pixels.dtype == np.float32
    assert np.abs(image.pixels - read_image(jsrt_png).pixels).mean() < 0.01


def test_rgb_png_with_identical_channels_reads_as_its_gray(jsrt_png, tmp_path):
    gray = Image.open(jsrt_png)
    for mode in ("RGB", "RGBA"):
        file = tmp_path / f"gray_as_{mode}.png"
        gray.convert(mode).save(file)
        np.testing.assert_array_equal(read_image(file).pixels, read_image(jsrt_png).pixels)


def test_colour_png_is_reduced_to_luma(tmp_path):
    colour = Image.fromarray(np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]]], dtype=np.uint8))
    file = tmp_path / "colour.png"
    colour.save(file)
    expected = np.asarray(colour.convert("L")) / 255
    np.testing.assert_array_equal(read_image(file).pixels, expected.astype(np.float32))


def test_jpeg_exif_orientation_is_applied(tmp_path):
    image = Image.fromarray(np.zeros((16, 32), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    file = tmp_path / "rotated.jpg"
    image.save(file, exif=exif)
    assert read_image(file).pixels.shape == (32, 16)


def test_png_content_wins_over_a_wrong_extension(jsrt_png, tmp_path):
    file = tmp_path / "image.dat"
    file.write_bytes(jsrt_png.read_bytes())
    assert sniff_format(file) == "raster"
    assert read_image(file).meta["format"] == "png"


# --- pure steps and invariants ------------------------------------------------------------------

unit_arrays = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=2, max_dims=2, max_side=16),
    elements=st.floats(0, 1, width=32),
)


@settings(max_examples=200, deadline=None)
@given(levels=hnp.arrays(np.int64, st.integers(1, 64), elements=st.integers(0, 2**24)))
def test_inversion_is_an_exact_involution_on_the_level_grid(levels):
    pixels = (levels / 2**24).astype(np.float32)
    np.testing.assert_array_equal(invert_polarity(invert_polarity(pixels)), pixels)


@settings(max_examples=200, deadline=None)
@given(pixels=unit_arrays)
def test_inversion_is_an_involution_within_one_rounding_and_stays_in_unit_range(pixels):
    inverted = invert_polarity(pixels)
    assert inverted.dtype == np.float32 and inverted.shape == pixels.shape
    assert inverted.min() >= 0 and inverted.max() <= 1
    np.testing.assert_allclose(invert_polarity(inverted), pixels, rtol=0, atol=2**-24)


@settings(max_examples=200, deadline=None)
@given(
    values=hnp.arrays(np.float64, st.integers(1, 64), elements=st.floats(-1e6, 1e6)),
    low=st.floats(-1e6, 1e6),
    width=st.floats(1e-3, 1e6),
)
def test_scaled_output_always_lies_in_unit_range(values, low, width):
    for high_low in ((low, low + width), (low + width, low)):  # negative slopes flip the range
        unit = scale_to_unit(values, *high_low)
        assert unit.dtype == np.float32 and unit.min() >= 0 and unit.max() <= 1


def test_constant_image_scales_to_zeros_without_dividing():
    assert not scale_to_unit(np.full((3, 3), 7.0), 7.0, 7.0).any()


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), ([0, 0], None), ([0.2, 0], None), ([-1, 1], None), ([0.14, 0.15], [0.14, 0.15]),
     (["nan", 1], None), ([0.2], None)],
)
def test_spacing_mm_refuses_degenerate_values(value, expected):
    assert spacing_mm(value) == expected


_DICOM = {"format": "dicom"}
_DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"


@pytest.mark.parametrize(
    ("meta", "accepted", "words"),
    [
        ({"format": "dicom", "modality": "DX", "view_position": "LL"}, False, "LL"),
        (_DICOM | {"modality": "CR", "body_part": "chest", "view_position": "ap"}, True, "CHEST"),
        (_DICOM | {"modality": None, "sop_class_uid": _DX_FOR_PRESENTATION}, True, "SOP"),
        (_DICOM | {"modality": "CT", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2"}, False, "CT"),
        ({"format": "png"}, True, "no DICOM header"),
    ],
)
def test_is_chest_radiograph_rules(meta, accepted, words):
    verdict, reason = is_chest_radiograph(meta)
    assert verdict == accepted and words in reason


def test_radiograph_is_frozen_and_checks_its_pixels():
    image = Radiograph(pixels=np.zeros((2, 2), dtype=np.float32), meta={})
    with pytest.raises(FrozenInstanceError):
        image.meta = {}
    with pytest.raises(ValueError, match="float32"):
        Radiograph(pixels=np.zeros((2, 2)), meta={})
    with pytest.raises(ValueError, match="2-D"):
        Radiograph(pixels=np.zeros((1, 2, 2), dtype=np.float32), meta={})


# --- hostile files: a deflated dataset past its limit, a codestream larger than its header -------------------------

def test_deflated_dicom_reads_like_its_twin_and_stops_inflating_at_its_limit(tmp_path):
    twin = _dx_file(tmp_path / "evrle.dcm", _padded(0))
    dataset = pydicom.dcmread(twin)
    dataset.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    deflated = tmp_path / "deflated.dcm"
    dataset.save_as(deflated, enforce_file_format=True)
    image = read_dicom(deflated)
    np.testing.assert_array_equal(image.pixels, read_dicom(twin).pixels)
    assert image.meta["transfer_syntax"] == pydicom.uid.DeflatedExplicitVRLittleEndian
    with pytest.raises(InflationLimitError, match="inflates to more than 0 MiB") as info:
        read_dicom(deflated, max_inflated_bytes=1000)  # the pixels alone are 2 KB
    assert info.value.path == str(deflated)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(deflated.read_bytes()[:-200])
    with pytest.raises(ImageReadError, match="cut short"):
        read_dicom(cut)


def _encapsulated(path: Path, frame: bytes, syntax: str, rows: int, columns: int, bits: int) -> Path:
    """A DX file whose one frame is ``frame``, encapsulated (PS3.5 A.4) under the Rows and Columns given."""
    from pydicom.encaps import encapsulate

    ds = Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = _DX_FOR_PRESENTATION
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.Modality, ds.PhotometricInterpretation, ds.SamplesPerPixel = "DX", "MONOCHROME2", 1
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (16, 12, 11, 0) if bits == 12 else (8, 8, 7, 0)
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def _j2k_frame(stored: np.ndarray) -> bytes:
    openjpeg = pytest.importorskip("openjpeg", reason="pylibjpeg-openjpeg encodes the JPEG 2000 frame")
    return bytes(openjpeg.encode(stored.astype(np.uint16), bits_stored=12, photometric_interpretation=2, use_mct=False))


def _jpeg_frame(stored: np.ndarray) -> bytes:
    stream = __import__("io").BytesIO()
    Image.fromarray(stored.astype(np.uint8)).save(stream, format="JPEG", quality=95)  # JFIF: APP0 and DQT before SOF0
    return stream.getvalue()


@pytest.mark.parametrize(("family", "syntax", "encode", "bits"), [
    ("JPEG 2000", pydicom.uid.JPEG2000Lossless, _j2k_frame, 12),
    ("JPEG", pydicom.uid.JPEGBaseline8Bit, _jpeg_frame, 8),
])
def test_a_frame_larger_than_rows_and_columns_is_refused_before_decoding(family, syntax, encode, bits, tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    small = np.round(np.linspace(0, 2**bits - 1, 64 * 64)).reshape(64, 64)
    large = rng.integers(0, 2**bits, (256, 192))
    ok = _encapsulated(tmp_path / "ok.dcm", encode(small), syntax, 64, 64, bits)
    assert read_dicom(ok).pixels.shape == (64, 64)  # a frame of its header's size decodes as before
    bomb = _encapsulated(tmp_path / "bomb.dcm", encode(large), syntax, 64, 64, bits)

    def no_decoding(self):
        raise AssertionError("decoded before the codestream's size was checked")

    monkeypatch.setattr(Dataset, "pixel_array", property(no_decoding))
    with pytest.raises(ImageReadError) as info:
        read_dicom(bomb)
    assert f"the {family} frame ({syntax}) declares 256 x 192 pixels" in info.value.reason
    assert "say 64 x 64" in info.value.reason and info.value.path == str(bomb)


def test_jpeg_ls_size_is_read_from_sof55():
    sof55 = b"\xff\xf7" + struct.pack(">HBHHB", 11, 12, 300, 200, 1) + bytes([1, 0x11, 0])
    lse = b"\xff\xf8" + struct.pack(">H", 13) + bytes(11)  # a JPEG-LS preset parameters segment before the frame
    assert jpeg_size(b"\xff\xd8" + lse + sof55, sof55=True) == (300, 200, 1)
    assert jpeg_size(b"\xff\xd8" + lse + sof55) is None  # SOF55 is no JPEG frame header
    assert jpeg_size(b"\xff\xd8\xff\xda" + bytes(20), sof55=True) is None  # a scan before any frame header


def test_burned_in_annotation_is_in_the_meta(tmp_path):
    # Monitoring's --archive skips an image whose pixels may show names: it reads this value.
    said = read_dicom(_dx_file(tmp_path / "burned.dcm", _padded(0), BurnedInAnnotation="YES")).meta
    unsaid = read_dicom(_dx_file(tmp_path / "plain.dcm", _padded(0))).meta
    assert (said["burned_in_annotation"], unsaid["burned_in_annotation"]) == ("YES", None)
