"""DICOM radiographs read with pydicom into [0, 1] float32, MONOCHROME2 polarity.

``read_dicom`` chains pure steps, each one the DICOM grayscale pipeline of PS3.4 N.2.1 and each
citing the tags that decide it:

1. ``decode_pixels``: stored values from Pixel Data (7FE0,0010). Only a single frame
   (Number of Frames (0028,0008) absent or 1) of a single sample (Samples per Pixel (0028,0002)
   = 1), MONOCHROME1 or MONOCHROME2 (0028,0004), is accepted. A multi-frame object is refused
   rather than cut to its first frame: a CR/DX radiograph is one frame, so several frames mean
   something else (fluoroscopy, tomosynthesis) that the models were not trained on.
   Compressed transfer syntaxes go through pydicom's decoder plugins (python-gdcm,
   pylibjpeg-openjpeg, Pillow, pydicom's own RLE): which decodes what is in docs/decoders.md.
2. ``padding_mask``: the pixels that Pixel Padding Value (0028,0120), alone or up to Pixel Padding
   Range Limit (0028,0121), marks as padding (the area outside a collimated or shuttered CR/DX
   field). Compared with the stored values, before the Modality LUT (PS3.3 C.7.5.1.1.2), in the
   signed or unsigned form of Pixel Representation (0028,0103). Malformed padding tags are ignored
   with a logged warning, not refused: the image then reads as it would without them.
3. ``apply_modality``: Modality LUT Sequence (0028,3000) or Rescale Slope/Intercept
   (0028,1053)/(0028,1052), through ``pydicom.pixels.apply_modality_lut``.
4. ``apply_window``: VOI LUT Sequence (0028,3010) when present, else Window Center/Width
   (0028,1050)/(0028,1051) (first of several, VOI LUT Function (0028,1056) honoured), through
   pydicom. It returns the output range that the VOI transform maps onto. Without a VOI
   transform, or with an invalid one, the range is the minimum and maximum of the
   modality values of the pixels that are not padding (min-max): raw CR/DX detector data rarely
   spans its Bits Stored (0028,0101) range, so that range would give faint, low-contrast images,
   and a padding value of 0 or 65535 would do the same.
5. ``scale_to_unit``: map that range onto [0, 1], clipped, float32.
6. ``to_monochrome2``: MONOCHROME1 (0028,0004) means the minimum is displayed white after the
   VOI transform (PS3.3 C.7.6.3.1.2), so it is inverted there with ``invert_polarity``
   (x -> 1 - x). Presentation LUT Shape (2050,0020) is not applied on top: in DX it only
   restates the photometric interpretation (INVERSE for MONOCHROME1).
7. ``black_out_padding``: padding pixels become 0 (black) whatever the VOI transform and the
   polarity made of them, since padding is not anatomy; a model never sees a white or grey
   frame around the field.
"""

from __future__ import annotations

import logging
import math
import os
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom import config
from pydicom.dataset import Dataset, FileDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing, get_decoder
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from lungdx.io import codecs, codestream
from lungdx.io.errors import ImageReadError, require_file
from lungdx.io.raster import Radiograph

logger = logging.getLogger(__name__)

codecs.register()  # 12-bit JPEG Extended through GDCM, which pydicom's own GDCM plugin refuses (docs/decoders.md)
# pydicom's reading validation only warns, and its warning quotes the value it finds invalid, a UID with a leading
# zero ('1.2.0840...', as old CR systems write) or a name, to its logger and to stderr: no patient data may reach a
# log (README), and lungdx acts on no such warning. Global to pydicom, as its settings are; writing validation (the
# SR and secondary capture lungdx sends) is a separate setting and stays as it was.
config.settings.reading_validation_mode = config.IGNORE

MAX_INFLATED_BYTES = 512 * 2**20
"""Bytes a Deflated Explicit VR Little Endian dataset (PS3.5 A.5) may inflate to when no pixel limit is given."""
MAX_BYTES_PER_PIXEL = 4
"""Bytes of one grayscale stored value at most (Bits Allocated (0028,0100) up to 32), for :func:`inflation_limit`."""
HEADER_ALLOWANCE_BYTES = 16 * 2**20
"""Bytes a deflated dataset may hold besides its pixels: the header, overlays, an icon image, private tags."""

_GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
_RADIOGRAPHY_MODALITIES = {"CR", "DX"}
_RADIOGRAPHY_SOP_CLASSES = {
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
}
_CHEST_BODY_PARTS = {"CHEST", "THORAX"}
_FRONTAL_VIEWS = {"PA", "AP"}
# The pydicom plugin package to install when no decoder for a family of transfer syntaxes (PS3.5 A.4)
# is: only licences that fit Apache-2.0, so never the GPL-3.0 pylibjpeg-libjpeg (docs/decoders.md).
# RLE Lossless (1.2.840.10008.1.2.5) needs none: pydicom decodes it itself.
_DECODER_HINTS = {
    "1.2.840.10008.1.2.4.5": "python-gdcm",  # JPEG baseline, extended, lossless process 14
    "1.2.840.10008.1.2.4.7": "python-gdcm",  # JPEG lossless process 14 SV1
    "1.2.840.10008.1.2.4.8": "python-gdcm or pyjpegls",  # JPEG-LS
    "1.2.840.10008.1.2.4.9": "pylibjpeg-openjpeg or python-gdcm",  # JPEG 2000
    "1.2.840.10008.1.2.4.20": "pylibjpeg-openjpeg",  # HTJ2K
}


def read_dicom(path: str | os.PathLike, *, max_inflated_bytes: int = MAX_INFLATED_BYTES) -> Radiograph:
    """Read a single-frame grayscale DICOM radiograph as a Radiograph in MONOCHROME2 polarity.

    Args:
        max_inflated_bytes: what a Deflated Explicit VR Little Endian dataset may inflate to (:func:`read_deflated`).

    Raises:
        ImageReadError: Not DICOM, no pixel data, not single-frame grayscale, or pixels that
            cannot be decoded (the reason names the transfer syntax and the plugin to install).
    """
    file = require_file(path)
    return to_radiograph(read_dataset(file, max_inflated_bytes=max_inflated_bytes), file)


def to_radiograph(ds: Dataset, file: Path) -> Radiograph:
    """Run the module's steps on a parsed dataset; ``file`` is the source named in the meta and in errors.

    Raises:
        ImageReadError: as :func:`read_dicom`, for the pixels and the header fields that describe them.
    """
    try:
        stored = decode_pixels(ds, file)
        padding = padding_mask(stored, ds)
        values = apply_modality(stored, ds)
        windowed, (low, high), voi = apply_window(values, ds, padding)
        pixels = black_out_padding(to_monochrome2(scale_to_unit(windowed, low, high), ds), padding)
        meta = dicom_meta(ds, file, voi, padding)
    except ImageReadError:
        raise
    except Exception as exc:  # an empty Rows, a VOI LUT item without its descriptor...: pydicom raises many types
        raise ImageReadError(file, f"malformed image description in the header: {type(exc).__name__}: {exc}") from exc
    logger.debug("read %s: %s %s, VOI %s", file, ds.get("Modality"), pixels.shape, voi)
    return Radiograph(pixels=pixels, meta=meta)


def read_dataset(file: Path, *, max_inflated_bytes: int = MAX_INFLATED_BYTES) -> Dataset:
    """Parse a DICOM file, tolerating a missing preamble (PS3.10 7.1) when it parses as DICOM.

    A deflated dataset is inflated by :func:`read_deflated`, under ``max_inflated_bytes``, never by pydicom.
    """
    deflated = read_deflated(file, max_inflated_bytes)
    if deflated is not None:
        return deflated
    try:
        return pydicom.dcmread(file)
    except InvalidDicomError:
        pass  # no 'DICM' prefix: retried below, as some old files omit the preamble
    except Exception as exc:  # pydicom raises many types for corrupt files
        raise ImageReadError(file, f"not a readable DICOM file: {exc}") from exc
    try:
        ds = pydicom.dcmread(file, force=True)
    except Exception as exc:
        raise ImageReadError(file, f"not a DICOM file: {exc}") from exc
    if "PixelData" not in ds or "Rows" not in ds:
        raise ImageReadError(file, "not a DICOM file (no 'DICM' prefix and no image found)")
    _set_transfer_syntax_from_encoding(ds)
    return ds


class InflationLimitError(ImageReadError):
    """A Deflated Explicit VR Little Endian dataset that inflates to more than its limit (a decompression bomb)."""


def inflation_limit(max_pixels: int) -> int:
    """What a deflated dataset of at most ``max_pixels`` pixels may inflate to: its largest pixels plus the header."""
    return max_pixels * MAX_BYTES_PER_PIXEL + HEADER_ALLOWANCE_BYTES


def read_deflated(file: Path, max_inflated_bytes: int) -> FileDataset | None:
    """The dataset of a Deflated Explicit VR Little Endian file (1.2.840.10008.1.2.1.99, PS3.5 A.5), else None.

    pydicom inflates such a dataset whole, in memory, before anything can be checked, and does so even for
    ``stop_before_pixels``: 435 KB of zeros inflate to 400 MB, 64 MB to 65 GB. Here the File Meta Information
    (group 0002, never deflated: PS3.10 7.1) is read first, and only a deflated dataset is inflated, by zlib with
    a bound on its output, then parsed as Explicit VR Little Endian. The whole dataset is returned, pixels
    included, so that a caller wanting the header and then the pixels (``lungdx.io.acceptance``) inflates once.

    Raises:
        InflationLimitError: the dataset inflates to more than ``max_inflated_bytes``.
        ImageReadError: a deflated stream that is corrupt or cut short.
    """
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset as read_elements
    from pydicom.filereader import read_preamble

    with open(file, "rb") as stream:
        try:
            preamble = read_preamble(stream, True)  # without 'DICM' at 128: rewound, the meta may start at 0
            file_meta = read_elements(stream, False, True, stop_when=lambda tag, vr, length: tag.group != 0x0002)
            syntax = str(file_meta.get("TransferSyntaxUID", "") or "").strip()
        except Exception:  # no readable meta: not deflated, and read_dataset says what is wrong
            return None
        if syntax != DeflatedExplicitVRLittleEndian:
            return None
        inflated = _inflate(stream, max_inflated_bytes, file)
    try:
        dataset = read_elements(DicomBytesIO(inflated), False, True)
    except Exception as exc:  # pydicom raises many types for corrupt files
        raise ImageReadError(file, f"not a readable DICOM file: the inflated dataset does not parse: {exc}") from exc
    return FileDataset(str(file), dataset, preamble, pydicom.dataset.FileMetaDataset(file_meta), False, True)


def _inflate(stream: BinaryIO, max_bytes: int, file: Path) -> bytes:
    """Raw deflate (RFC 1951, no zlib header: PS3.5 A.5) from the stream's position, stopping past ``max_bytes``."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    parts, size = [], 0
    try:
        while not inflater.eof and (block := stream.read(1 << 20)):
            while block:
                # At most 1 MiB a call, never more than one byte past the limit: zlib's output buffer grows by doubling
                part = inflater.decompress(block, min(1 << 20, max_bytes + 1 - size))
                size += len(part)
                if size > max_bytes:
                    raise InflationLimitError(file, f"Deflated Explicit VR Little Endian dataset (1.2.840.10008.1.2.1.99) "
                                                    f"inflates to more than {max_bytes / 2**20:.0f} MiB, the limit for an image "
                                                    "within the pixel limit: refused as a decompression bomb")
                parts.append(part)
                block = inflater.unconsumed_tail
    except zlib.error as exc:
        raise ImageReadError(file, f"corrupt Deflated Explicit VR Little Endian dataset: {exc}") from exc
    if not inflater.eof:
        raise ImageReadError(file, "Deflated Explicit VR Little Endian dataset cut short: the deflate stream does not end")
    return b"".join(parts)


def _set_transfer_syntax_from_encoding(ds: Dataset) -> None:
    """Give a file without meta header the Transfer Syntax UID (0002,0010) it was parsed with."""
    if ds.file_meta.get("TransferSyntaxUID") is not None:
        return
    implicit, little = ds.original_encoding
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    else:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def decode_pixels(ds: Dataset, file: Path) -> np.ndarray:
    """Return the stored values of Pixel Data (7FE0,0010) after checking the frame layout.

    A compressed frame must declare the size of Rows (0028,0010) x Columns (0028,0011) in its own codestream
    (:func:`lungdx.io.codestream.check_frame_size`): the pixel limit is checked against the header, and a decoder
    decodes what the codestream says.
    """
    _check_layout(ds, file)
    codestream.check_frame_size(ds, file)
    try:
        return ds.pixel_array
    except Exception as exc:  # missing plugin, corrupt codestream, wrong lengths
        syntax = ds.file_meta.get("TransferSyntaxUID")
        raise ImageReadError(file, _decode_failure_reason(syntax, exc)) from exc


def _check_layout(ds: Dataset, file: Path) -> None:
    """Refuse what is not one frame (0028,0008) of one grayscale sample (0028,0002)/(0028,0004)."""
    if "PixelData" not in ds:
        floats = "FloatPixelData" in ds or "DoubleFloatPixelData" in ds
        suffix = " (float pixel data is not supported)" if floats else ""
        raise ImageReadError(file, f"no pixel data (7FE0,0010){suffix}")
    samples = int(ds.get("SamplesPerPixel", 1))
    if samples != 1:
        raise ImageReadError(file, f"Samples per Pixel (0028,0002) is {samples}: not grayscale")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in _GRAYSCALE:
        raise ImageReadError(
            file, f"Photometric Interpretation (0028,0004) {photometric!r} is not MONOCHROME1/2"
        )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise ImageReadError(
            file, f"multi-frame image ({frames} frames, (0028,0008)): a radiograph has one"
        )


def _decode_failure_reason(syntax: UID | None, exc: Exception) -> str:
    """Say which transfer syntax failed and why: the package to install when no decoder is, else each decoder's error."""
    if syntax is None:
        return f"cannot decode pixel data without a Transfer Syntax UID (0002,0010): {exc}"
    try:
        installed = get_decoder(syntax).is_available
    except NotImplementedError:  # a syntax pydicom has no decoder for at all
        installed = False
    hint = next((pkg for prefix, pkg in _DECODER_HINTS.items() if syntax.startswith(prefix)), None)
    if hint and not installed:
        # pydicom's own message lists every plugin it knows, the GPL one included: name ours instead.
        return f"cannot decode transfer syntax {syntax.name} ({syntax}): no decoder installed, install {hint}"
    # pydicom puts a summary first and each plugin's error on a line of its own: keep them all.
    detail = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    return f"cannot decode transfer syntax {syntax.name} ({syntax}): {detail}"


def padding_mask(stored: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """Mark the stored values that Pixel Padding Value (0028,0120) and Range Limit (0028,0121) call padding.

    A pixel is padding when its stored value, before the Modality LUT (PS3.3 C.7.5.1.1.2), equals the
    Pixel Padding Value or, with a Range Limit, lies between the two inclusive (in either order).

    Returns:
        A boolean mask of ``stored``'s shape, or None when the image declares no padding, or declares it
        with malformed tags: those are ignored with a warning rather than refused, because padding only
        decides how non-anatomy is displayed and the image without it is what lungdx read before.
    """
    try:
        limits = padding_limits(ds)
    except ValueError as exc:
        logger.warning("%s: ignoring pixel padding (0028,0120)/(0028,0121): %s", getattr(ds, "filename", None) or "a dataset",
                       exc)
        return None
    if limits is None:
        return None
    low, high = limits
    return (stored >= low) & (stored <= high)


def padding_limits(ds: Dataset) -> tuple[int, int] | None:
    """(lowest, highest) stored value that is padding, or None without Pixel Padding Value (0028,0120).

    Raises:
        ValueError: A tag that is not one integer within the stored range, or a Pixel Padding Range Limit
            (0028,0121) without the Pixel Padding Value it is paired with (PS3.3 C.7.5.1.1.2).
    """
    value = _stored_padding_value(ds, "PixelPaddingValue")
    limit = _stored_padding_value(ds, "PixelPaddingRangeLimit")
    if value is None:
        if limit is not None:
            raise ValueError("Pixel Padding Range Limit (0028,0121) without Pixel Padding Value (0028,0120)")
        return None
    limit = value if limit is None else limit
    return min(value, limit), max(value, limit)


def _stored_padding_value(ds: Dataset, keyword: str) -> int | None:
    """A padding tag as a stored value of Pixel Representation (0028,0103) and Bits Stored (0028,0101), as decoded.

    Both tags take the VR of the pixels, SS when Pixel Representation is 1 and US otherwise. pydicom resolves
    that "US or SS" from Pixel Representation when it writes a tag and when it reads Implicit VR, but keeps an
    Explicit VR file's own VR: a signed image's -2048 written as US reads 63488, an unsigned image's 65535
    written as SS reads -1. Such a value is read back as the same 16 bits in the image's representation.
    """
    try:
        value = ds.get(keyword)
    except Exception as exc:  # a value of the wrong length: pydicom raises several types
        raise ValueError(f"{keyword} cannot be read: {exc}") from exc
    if value is None:  # absent, or present without a value
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{keyword} {value!r} is not one integer")
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    if bits <= 16 and signed and value >= 2**15:
        value -= 2**16
    elif bits <= 16 and not signed and value < 0:
        value += 2**16
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    if not low <= value <= high:
        kind = "signed" if signed else "unsigned"
        raise ValueError(f"{keyword} {value} is outside the {bits}-bit {kind} stored range [{low}, {high}]")
    return value


def apply_modality(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """Apply the Modality LUT (0028,3000) or Rescale Slope/Intercept (0028,1053)/(0028,1052)."""
    return apply_modality_lut(stored, ds)


def apply_window(
    values: np.ndarray, ds: Dataset, padding: np.ndarray | None = None
) -> tuple[np.ndarray, tuple[float, float], str]:
    """Apply the VOI transform and return (values, (value shown black, value shown white), method).

    The VOI LUT Sequence (0028,3010) wins over Window Center/Width (0028,1050)/(0028,1051), as in
    ``pydicom.pixels.apply_voi_lut``. Without a usable VOI transform, ``method`` is "minmax" and
    the range is the data's own minimum and maximum over the pixels that are not padding.

    Args:
        padding: ``padding_mask``'s mask, used by "minmax" only. When every pixel is padding there is no
            anatomy to range over, and all pixels are used as without padding.
    """
    if ds.get("VOILUTSequence"):
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])  # PS3.3 C.11.2.1.1: bits per entry
        return apply_voi(values, ds, index=0), (0.0, float(2**bits - 1)), "voi_lut"
    if "WindowCenter" in ds and "WindowWidth" in ds:
        try:
            windowed = apply_windowing(values, ds, index=0)
            # The extremes of the window's output are what pydicom maps -inf and +inf onto.
            low, high = apply_windowing(np.array([-np.inf, np.inf]), ds, index=0)
        except (ValueError, TypeError, IndexError) as exc:
            logger.warning("ignoring unusable window (0028,1050)/(0028,1051): %s", exc)
        else:
            if low != high:
                return windowed, (float(low), float(high)), "window"
    anatomy = values if padding is None or padding.all() else values[~padding]
    return values, (float(np.min(anatomy)), float(np.max(anatomy))), "minmax"


def scale_to_unit(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map ``low`` to 0 and ``high`` to 1, clip to [0, 1], as float32 (zeros when low == high)."""
    if high == low:
        logger.warning("constant image: every pixel maps to 0")
        return np.zeros(values.shape, dtype=np.float32)
    unit = (np.asarray(values, dtype=np.float64) - low) / (high - low)
    return np.clip(unit, 0.0, 1.0).astype(np.float32)


def invert_polarity(pixels: np.ndarray) -> np.ndarray:
    """Swap black and white of [0, 1] pixels: x -> 1 - x (float32).

    An involution: exact for values on the float32 grid of multiples of 2**-24 (every 8- to
    16-bit level divided by its maximum is within one rounding of it), and within one float32
    rounding otherwise.
    """
    return (np.float32(1.0) - np.asarray(pixels, dtype=np.float32)).astype(np.float32)


def to_monochrome2(pixels: np.ndarray, ds: Dataset) -> np.ndarray:
    """Invert MONOCHROME1 (0028,0004) pixels, whose minimum is shown white, to MONOCHROME2."""
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        return invert_polarity(pixels)
    return pixels


def black_out_padding(pixels: np.ndarray, padding: np.ndarray | None) -> np.ndarray:
    """Set padding pixels (0028,0120)/(0028,0121) to 0, black: padding is not anatomy, whatever the VOI made of it."""
    if padding is None:
        return pixels
    return np.where(padding, np.float32(0.0), pixels).astype(np.float32)


def dicom_meta(ds: Dataset, file: Path, voi: str, padding: np.ndarray | None = None) -> dict:
    """Collect the JSON-serialisable header facts that later stages and audits need.

    Args:
        padding: ``padding_mask``'s mask; its count is ``padding_pixels`` (0 without one).
    """
    return {
        "source": str(file),
        "format": "dicom",
        "bits": int(ds.get("BitsStored", ds.get("BitsAllocated", 0))),  # (0028,0101)
        "original_shape": [int(ds.Rows), int(ds.Columns)],  # (0028,0010), (0028,0011)
        "modality": _text(ds, "Modality"),  # (0008,0060)
        "sop_class_uid": _text(ds, "SOPClassUID"),  # (0008,0016)
        "photometric_interpretation": _text(ds, "PhotometricInterpretation"),  # (0028,0004)
        "presentation_intent": _text(ds, "PresentationIntentType"),  # (0008,0068)
        "body_part": _text(ds, "BodyPartExamined"),  # (0018,0015)
        "view_position": _text(ds, "ViewPosition"),  # (0018,5101)
        "transfer_syntax": _text(ds.file_meta, "TransferSyntaxUID"),  # (0002,0010)
        "pixel_spacing_mm": spacing_mm(ds.get("PixelSpacing")),  # (0028,0030)
        "imager_pixel_spacing_mm": spacing_mm(ds.get("ImagerPixelSpacing")),  # (0018,1164)
        "sop_instance_uid": _text(ds, "SOPInstanceUID"),  # (0008,0018)
        "study_instance_uid": _text(ds, "StudyInstanceUID"),  # (0020,000D)
        "manufacturer": _text(ds, "Manufacturer"),  # (0008,0070)
        "voi": voi,
        "burned_in_annotation": _text(ds, "BurnedInAnnotation"),  # (0028,0301): monitoring's archive skips YES
        "padding_pixels": 0 if padding is None else int(np.count_nonzero(padding)),  # (0028,0120), (0028,0121)
    }


def _text(ds: Dataset, keyword: str) -> str | None:
    """Return an element's value as a plain stripped string, None when absent or empty."""
    value = ds.get(keyword)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def spacing_mm(value) -> list[float] | None:
    """Return a [row, column] spacing in mm, or None when missing or degenerate.

    PS3.3 10.7.1.3 defines the spacing as positive; files with ``[0, 0]`` exist (the NEMA WG04
    RG1 samples) and must never reach a division.
    """
    if value is None:
        return None
    try:
        spacing = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    if len(spacing) != 2 or not all(math.isfinite(v) and v > 0 for v in spacing):
        return None
    return spacing


def is_chest_radiograph(meta: dict) -> tuple[bool, str]:
    """Say whether header fields allow a frontal chest radiograph, and why not when they do not.

    The rule is :func:`chest_header_problem`; images that are not DICOM carry no such fields and pass.

    Args:
        meta: ``Radiograph.meta`` (or the same dict read back from JSON).
    """
    if meta.get("format") != "dicom":
        return True, f"{meta.get('format', 'unknown')} image: no DICOM header fields to check"
    problem = chest_header_problem(meta)
    if problem is not None:
        return False, problem[1]
    modality, body_part, view = ((meta.get(key) or "").upper() for key in ("modality", "body_part", "view_position"))
    return True, f"{modality or 'CR/DX SOP class'} radiograph, body part {body_part or 'missing'}, view {view or 'missing'}"


def chest_header_problem(fields: dict) -> tuple[str, str] | None:
    """(kind, reason) when DICOM header fields say the image is not a frontal chest radiograph, else None.

    Requires Modality (0008,0060) CR or DX, or a CR/DX SOP Class (0008,0016); not a 'For Processing' image
    (DX For Processing SOP class, or Presentation Intent Type (0008,0068) FOR PROCESSING); Body Part Examined
    (0018,0015) CHEST or THORAX, or missing; View Position (0018,5101) PA or AP, or missing. ``kind`` is
    ``modality``, ``presentation``, ``body_part`` or ``view``.

    Args:
        fields: ``modality``, ``sop_class_uid``, ``presentation_intent``, ``body_part`` and ``view_position``
            (as in ``dicom_meta``).
    """
    modality, sop_class = (fields.get("modality") or "").upper(), fields.get("sop_class_uid") or ""
    if modality not in _RADIOGRAPHY_MODALITIES and sop_class not in _RADIOGRAPHY_SOP_CLASSES:
        name = UID(sop_class).name if sop_class else "missing"
        return "modality", (f"modality {modality or 'missing'} (0008,0060) is not CR or DX and SOP class {name} "
                            "(0008,0016) is not a radiography class")
    intent = (fields.get("presentation_intent") or "").upper()
    if sop_class == DigitalXRayImageStorageForProcessing or intent == "FOR PROCESSING":
        # The detector's raw signal, before the vendor's processing a reader (and every training image) sees
        return "presentation", ("a 'For Processing' image (SOP class (0008,0016) / Presentation Intent Type "
                                "(0008,0068)): raw detector data, not the image a reader sees; send the 'For "
                                "Presentation' image")
    body_part = (fields.get("body_part") or "").upper()
    if body_part and body_part not in _CHEST_BODY_PARTS:
        return "body_part", f"body part {body_part} (0018,0015) is not CHEST or THORAX"
    view = (fields.get("view_position") or "").upper()
    if view and view not in _FRONTAL_VIEWS:
        return "view", f"view position {view} (0018,5101) is not PA or AP"
    return None
