"""Every transfer syntax a chest archive commonly uses decodes to the values it encoded (PS3.5 A.4).

A seeded chest phantom is written as an uncompressed CR DICOM, encoded in each syntax and read back
through ``lungdx.io``. Encoder and decoder are different implementations where the tools allow:
dcmtk's dcmcjpeg (IJG libjpeg) writes the JPEG processes and pydicom's encoders the rest (its own
or GDCM's RLE, CharLS through pyjpegls, OpenJPEG); GDCM, OpenJPEG, Pillow and pydicom's RLE decode.

Lossless syntaxes must give the stored values back exactly. JPEG-LS near-lossless must stay within
its NEAR bound (ISO/IEC 14495-1: every sample within NEAR of the original). Lossy syntaxes must stay
within a mean absolute error of 1 % of the Bits Stored range (and of [0, 1] after ``read_dicom``):
these codecs at these settings lose 0.3-0.5 % on the phantom, while a wrong decode (bit depth,
byte order, polarity, a shifted frame) is off by tens of per cent.
"""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import uid
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import get_decoder, get_encoder, pixel_array

from lungdx.data.phantoms import make_phantom
from lungdx.io import ImageReadError, read_dicom, read_image

SIZE = 512
NEAR = 2
"""JPEG-LS near-lossless bound used for encoding (the NEAR parameter of ISO/IEC 14495-1)."""
LOSSY_MAE = 0.01
"""Mean absolute error allowed for lossy syntaxes, as a fraction of the value range (see the module docstring)."""
SOURCES = {
    "8-bit MONOCHROME2": (8, "MONOCHROME2"),
    "12-bit MONOCHROME2": (12, "MONOCHROME2"),
    "16-bit MONOCHROME1": (16, "MONOCHROME1"),
}
# How each syntax is written: ("dcmcjpeg", options) or ("pydicom", Dataset.compress keyword arguments).
# dcmcjpeg's +sr scales lossy input over the Bits Stored range instead of the pixels' own min-max, so
# the stored values keep their meaning; lossless (+e1, +el) ignores it. +el uses selection value 6.
ENCODINGS = {
    uid.JPEGBaseline8Bit: ("dcmcjpeg", ("+eb", "+sr")),
    uid.JPEGExtended12Bit: ("dcmcjpeg", ("+ee", "+sr")),
    uid.JPEGLossless: ("dcmcjpeg", ("+el",)),
    uid.JPEGLosslessSV1: ("dcmcjpeg", ("+e1",)),
    uid.JPEGLSLossless: ("pydicom", {}),
    uid.JPEGLSNearLossless: ("pydicom", {"jls_error": NEAR}),
    uid.RLELossless: ("pydicom", {}),
    uid.JPEG2000Lossless: ("pydicom", {}),
    uid.JPEG2000: ("pydicom", {"j2k_cr": [10]}),  # 10:1, a usual ratio for lossy CR archives
}
LOSSY = {uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEG2000}
# JPEG baseline is 8-bit only, extended 8- or 12-bit (PS3.5 A.4.1); the others take both test depths.
CASES = [
    pytest.param(uid.JPEGBaseline8Bit, "8-bit MONOCHROME2", id="jpeg_baseline-8bit"),
    pytest.param(uid.JPEGExtended12Bit, "8-bit MONOCHROME2", id="jpeg_extended-8bit"),
    pytest.param(uid.JPEGExtended12Bit, "12-bit MONOCHROME2", id="jpeg_extended-12bit"),
] + [
    pytest.param(syntax, source, id=f"{syntax.keyword}-{source.split()[0]}")
    for syntax in ENCODINGS
    if syntax not in (uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit)
    for source in ("12-bit MONOCHROME2", "16-bit MONOCHROME1")
]


def _chest_dicom(bits: int, photometric: str) -> Dataset:
    """An uncompressed CR chest PA phantom with ``bits`` stored bits, MONOCHROME1 stored inverted."""
    image, _ = make_phantom(np.random.default_rng(15), SIZE)
    top = 2**bits - 1
    stored = np.round(image * top).astype(np.uint8 if bits <= 8 else np.uint16)
    if photometric == "MONOCHROME1":  # PS3.3 C.7.6.3.1.2: minimum shown white
        stored = top - stored
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = uid.ComputedRadiographyImageStorage
    meta.MediaStorageSOPInstanceUID = uid.generate_uid()
    meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid.generate_uid(), uid.generate_uid()
    ds.PatientName, ds.PatientID = "Phantom^Chest", "PHANTOM15"
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, photometric, 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = stored.itemsize * 8, bits, bits - 1
    # A window over the whole Bits Stored range, as CR/DX files carry one (0028,1050)/(0028,1051):
    # read_dicom then maps stored values linearly, so its error is the stored error, not one scaled up
    # by a min-max range that lossy decoding moves.
    ds.WindowCenter, ds.WindowWidth = 2 ** (bits - 1), 2**bits
    ds.PixelData = stored.tobytes()
    return ds


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, Path]:
    """The uncompressed phantom files, one per entry of SOURCES."""
    folder = tmp_path_factory.mktemp("codec_originals")
    files = {}
    for name, (bits, photometric) in SOURCES.items():
        files[name] = folder / f"{bits}bit_{photometric}.dcm"
        _chest_dicom(bits, photometric).save_as(files[name], enforce_file_format=True)
    return files


def _encode(original: Path, syntax: uid.UID, out: Path) -> Path:
    """Write ``original`` in ``syntax`` with the tool ENCODINGS names; skip when it is missing."""
    tool, options = ENCODINGS[syntax]
    if tool == "dcmcjpeg":
        if shutil.which("dcmcjpeg") is None:
            pytest.skip("dcmtk's dcmcjpeg not found: apt-get install dcmtk (.ci/run installs it)")
        subprocess.run(["dcmcjpeg", *options, str(original), str(out)], check=True, capture_output=True, timeout=60)
        return out
    encoder = get_encoder(syntax)
    if not encoder.is_available:
        pytest.skip(f"no pydicom encoder for {syntax.name}: {'; '.join(encoder.missing_dependencies)}")
    ds = pydicom.dcmread(original)
    ds.compress(syntax, **options)
    ds.save_as(out, enforce_file_format=True)
    return out


def _kind(syntax: uid.UID) -> str:
    """How close a decode must come: "exact", "near" (JPEG-LS NEAR bound) or "lossy"."""
    return "lossy" if syntax in LOSSY else "near" if syntax == uid.JPEGLSNearLossless else "exact"


def _assert_close(actual: np.ndarray, expected: np.ndarray, value_range: float, kind: str) -> None:
    """Equal for "exact", every value within NEAR for "near", mean error under LOSSY_MAE of the range for "lossy"."""
    assert actual.shape == expected.shape
    error = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    if kind == "exact":
        np.testing.assert_array_equal(actual, expected)
    elif kind == "near":
        assert error.max() <= NEAR, f"largest error {error.max()} exceeds NEAR={NEAR}"
    else:
        assert error.mean() < LOSSY_MAE * value_range, f"mean error {error.mean():.4g} of a range of {value_range}"


def _decodes(ds: Dataset) -> dict[str, np.ndarray]:
    """Stored values from each installed decoder plugin that decodes the data; at least one must.

    Every one is asked, not only the first pydicom tries, as which one answers depends on what is
    installed. One that raises (Pillow declines 12-bit JPEG, say) is harmless, since pydicom then
    tries the next; one that returns wrong values is not, and the caller's comparison catches it.
    """
    syntax = ds.file_meta.TransferSyntaxUID
    decoded = {}
    for plugin in get_decoder(syntax).available_plugins:
        try:
            decoded[plugin] = pixel_array(ds, decoding_plugin=plugin)
        except RuntimeError:  # pydicom's wrapper around the plugin's own refusal
            continue
    assert decoded, f"no installed decoder accepts this {syntax.name} data"
    return decoded


def _pydicom_file(name: str) -> str:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not bundled with this pydicom")
    return path


@pytest.mark.parametrize(("syntax", "source"), CASES)
def test_each_syntax_decodes_to_the_values_it_encoded(syntax, source, originals, tmp_path):
    original = originals[source]
    encoded = _encode(original, syntax, tmp_path / "encoded.dcm")
    ds = pydicom.dcmread(encoded)
    assert ds.file_meta.TransferSyntaxUID == syntax

    image, reference = read_dicom(encoded), read_dicom(original)
    assert image.meta["transfer_syntax"] == syntax and image.meta["bits"] == SOURCES[source][0]
    np.testing.assert_array_equal(read_image(encoded).pixels, image.pixels)
    assert image.meta["voi"] == "window"
    # Near-lossless: NEAR in stored values is a tiny fraction of [0, 1], so the pixels get the lossy bound.
    _assert_close(image.pixels, reference.pixels, 1.0, "exact" if _kind(syntax) == "exact" else "lossy")

    stored, value_range = pydicom.dcmread(original).pixel_array, 2 ** SOURCES[source][0] - 1
    _assert_close(ds.pixel_array, stored, value_range, _kind(syntax))
    for decoded in _decodes(ds).values():
        _assert_close(decoded, stored, value_range, _kind(syntax))


def test_a_missing_decoder_names_a_package_whose_licence_fits(originals, tmp_path, monkeypatch):
    encoded = _encode(originals["12-bit MONOCHROME2"], uid.JPEGLosslessSV1, tmp_path / "sv1.dcm")
    monkeypatch.setattr(get_decoder(uid.JPEGLosslessSV1), "_available", {})  # as if no plugin were installed
    with pytest.raises(ImageReadError) as info:
        read_dicom(encoded)
    reason = info.value.reason
    assert "1.2.840.10008.1.2.4.70" in reason and "install python-gdcm" in reason
    assert "libjpeg" not in reason  # pylibjpeg-libjpeg, the one other decoder pydicom knows, is GPL-3.0


def test_a_corrupt_codestream_reports_each_decoders_error(originals, tmp_path):
    ds = pydicom.dcmread(_encode(originals["12-bit MONOCHROME2"], uid.JPEGLosslessSV1, tmp_path / "sv1.dcm"))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[: len(frame) // 2]])  # its headers whole, its scan cut short
    ds.save_as(tmp_path / "corrupt.dcm")
    with pytest.raises(ImageReadError) as info:
        read_dicom(tmp_path / "corrupt.dcm")
    reason = info.value.reason
    assert "1.2.840.10008.1.2.4.70" in reason and "install" not in reason  # a decoder is installed: the data is bad
    assert all(f"{plugin}:" in reason for plugin in get_decoder(uid.JPEGLosslessSV1).available_plugins)
    ds.PixelData = encapsulate([b"\xff\xd8" + bytes(254)])  # a JPEG start-of-image marker, then nothing JPEG
    ds.save_as(tmp_path / "headless.dcm")
    with pytest.raises(ImageReadError, match=r"JPEG frame \(1\.2\.840\.10008\.1\.2\.4\.70\) holds no readable frame header"):
        read_dicom(tmp_path / "headless.dcm")  # refused before any decoder: its size cannot be checked


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"])
def test_pydicoms_lossless_files_decode_to_their_uncompressed_twin(name):
    """Encoded by other tools, signed 16-bit: every installed decoder gives MR_small.dcm's values."""
    compressed, original = _pydicom_file(name), _pydicom_file("MR_small.dcm")
    ds, expected = pydicom.dcmread(compressed), pydicom.dcmread(original).pixel_array
    for decoded in _decodes(ds).values():
        np.testing.assert_array_equal(decoded, expected)
    np.testing.assert_array_equal(read_dicom(compressed).pixels, read_dicom(original).pixels)


def test_pydicoms_12_bit_jpeg_extended_file_gives_its_reference_values():
    # The values pydicom's own pixel reference holds for JPGExtended.dcm (JPGE_16_12_1_0_1F_M2).
    ds = pydicom.dcmread(_pydicom_file("JPGExtended.dcm"))
    image = read_dicom(ds.filename)
    stored = ds.pixel_array
    assert image.pixels.shape == (1024, 256) and stored[420, 140] == 244 and stored[230, 120] == 95


def test_real_compressed_samples_decode(dicom_dir):
    """Every shared sample in a syntax of ENCODINGS decodes, to the same values through every installed decoder."""
    samples = [(file, pydicom.dcmread(file)) for file in sorted(dicom_dir.glob("*.dcm"))]
    samples = [(file, ds) for file, ds in samples if ds.file_meta.TransferSyntaxUID in ENCODINGS]
    if not samples:
        pytest.skip("no shared DICOM sample is in a compressed syntax of ENCODINGS")
    for file, ds in samples:
        syntax = ds.file_meta.TransferSyntaxUID
        image = read_dicom(file)
        assert image.pixels.shape == (ds.Rows, ds.Columns) and image.meta["transfer_syntax"] == syntax
        stored = ds.pixel_array
        for decoded in _decodes(ds).values():
            _assert_close(decoded, stored, 2**ds.BitsStored - 1, _kind(syntax))
