"""One acceptance policy for every entrance: which images get a probability, and why the others do not.

``lungdx predict``, ``lungdx explain``, the service, ``lungdx listen`` and ``lungdx pacs-run`` all read
an image through :meth:`AcceptancePolicy.read`, so one file gets one verdict and one reason wherever
it comes in. The checks run cheapest first:

1. **Header, before any pixel is decoded** (:func:`read_header`): the pixel count against
   ``max_pixels`` (a decompression bomb is refused for the price of its header), a minimum side,
   and for DICOM the modality (0008,0060) CR/DX or a CR/DX SOP class (0008,0016), not a 'For
   Processing' image (raw detector data), the body part (0018,0015) CHEST/THORAX or missing, the view
   (0018,5101) PA/AP or missing, and one grayscale sample (0028,0002)/(0028,0004). ``allow_non_chest``
   turns the modality, For Processing, body-part and view checks into warnings, for research; the
   result then says so. A missing body part or view is scored with a warning that the header could not
   confirm a frontal chest film. A Deflated Explicit VR Little Endian dataset is inflated only up to
   :func:`lungdx.io.dicom.inflation_limit` of ``max_pixels`` (the header is inside the deflated stream),
   and once: its pixels are decoded from the dataset its header was read from.
   When decoding, a compressed frame must declare Rows x Columns in its own codestream
   (``lungdx.io.codestream``).
2. **Pixels**: too little information (constant, or a 1st-99th percentile range under
   :data:`MIN_CONTRAST` of the full scale) and colour (channels that differ by more than
   :data:`MAX_COLOUR_SPREAD` on average; a gray image stored as RGB passes).
3. **Against the training reference** (a checkpoint's ``val_reference["intensity"]``, see
   ``lungdx.reference``): an image that looks like an inverted validation image (by
   :func:`polarity_contrast`). Brightness and contrast are not judged here: the per-image levelling
   removes them, and the drift monitor reports gradual shifts. Without a reference
   (a checkpoint older than the ``polarity`` statistic, or none) this check is skipped.

A refusal is a :class:`Refused` (an ``ImageReadError``, so a dataset build lists it in
``excluded.csv`` and a batch carries on) with a ``kind`` (a short code), a ``reason`` (words a user
can act on) and the HTTP ``status`` the service answers with (413 for size, else 422).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from lungdx.io.dicom import (
    MAX_INFLATED_BYTES,
    InflationLimitError,
    chest_header_problem,
    inflation_limit,
    read_deflated,
    to_radiograph,
)
from lungdx.io.errors import ImageReadError, require_file
from lungdx.io.raster import Radiograph

DEFAULT_MAX_PIXELS = 50_000_000
"""Rows x columns above which an image is refused from its header (a 43 x 43 cm detector at 0.1 mm is 18.5 M)."""
MIN_SIDE_PX = 16
"""Shorter side below which an image cannot hold a radiograph (PneumoniaMNIST's 28 px still passes)."""
MIN_CONTRAST = 0.02
"""1st-99th percentile range, as a share of the full intensity scale, below which an image is nearly constant."""
MAX_COLOUR_SPREAD = 0.04
"""Mean (max - min) over the RGB channels, as a share of full scale, above which an image is a colour image."""
POLARITY_MARGIN = 0.02
"""How far below the reference's 1st percentile the polarity contrast must lie to count as inverted."""
MIN_REFERENCE_IMAGES = 8

HEADER_KINDS = ("modality", "presentation", "body_part", "view")
"""Refusal kinds that ``allow_non_chest`` turns into warnings."""


class Refused(ImageReadError):
    """An image the policy does not score: ``kind`` names the check, ``reason`` says why."""

    def __init__(self, path: str | os.PathLike, kind: str, reason: str):
        super().__init__(path, reason)
        self.kind = kind

    @property
    def status(self) -> int:
        """The HTTP status the service answers with: 413 for an image over the pixel limit, else 422."""
        return 413 if self.kind == "too_large" else 422

    def __reduce__(self):
        return (type(self), (self.path, self.kind, self.reason))


@dataclass(frozen=True)
class Header:
    """What a file's header says, read without decoding pixels."""

    format: str
    rows: int
    columns: int
    fields: dict = field(default_factory=dict)
    """For DICOM: modality, sop_class_uid, body_part, view_position, samples, photometric_interpretation."""


def read_header(path: str | os.PathLike, *, max_inflated_bytes: int = MAX_INFLATED_BYTES) -> Header:
    """The format, size and (for DICOM) the acquisition fields of an image file, without decoding it.

    Args:
        max_inflated_bytes: what a Deflated Explicit VR Little Endian dataset may inflate to (its header is inside).

    Raises:
        Refused: a deflated dataset that inflates past ``max_inflated_bytes`` (kind ``too_large``).
        ImageReadError: not a recognised image, or a header that cannot be read.
    """
    return _read_header(path, max_inflated_bytes)[0]


def _read_header(path: str | os.PathLike, max_inflated_bytes: int) -> tuple[Header, Dataset | None]:
    """:func:`read_header`, and a deflated DICOM's whole dataset: its pixels come from the same inflation."""
    from lungdx.io import sniff_format

    file = require_file(path)
    kind = sniff_format(file)
    if kind is None:
        raise ImageReadError(file, "unrecognised image format: expected PNG, JPEG, TIFF, DICOM or JSRT .IMG")
    if kind == "jsrt_raw":
        from lungdx.io.jsrt import JSRT_SHAPE

        return Header("jsrt_raw", *JSRT_SHAPE), None
    if kind == "raster":
        return _raster_header(file), None
    return _dicom_header(file, max_inflated_bytes)


def _raster_header(file: Path) -> Header:
    from PIL import Image

    try:
        with Image.open(file) as image:  # parses the header only; pixels are decoded on load()
            return _pillow_header(image)
    except Image.DecompressionBombError:
        return _oversized_raster_header(file)
    except Image.UnidentifiedImageError as err:  # its message quotes the path, a server's temporary one for an upload
        raise ImageReadError(file, "cannot read the image header (UnidentifiedImageError: not an image Pillow "
                                   "can identify)") from err
    except Exception as err:  # Pillow raises many types for a corrupt header
        raise ImageReadError(file, f"cannot read the image header ({type(err).__name__}: {err})") from err


def _pillow_header(image) -> Header:
    width, height = image.size
    return Header((image.format or "raster").lower(), int(height), int(width), {"mode": image.mode})


def _oversized_raster_header(file: Path) -> Header:
    """The header of an image Pillow's ``Image.open`` refuses as a decompression bomb (over 2 x MAX_IMAGE_PIXELS).

    ``Image.open`` raises before it says the size; each format's own class reads the header without that
    check, so the refusal can still name rows x columns (and give the service's 413, not a 422).
    """
    from PIL import JpegImagePlugin, PngImagePlugin, TiffImagePlugin

    for reader in (PngImagePlugin.PngImageFile, JpegImagePlugin.JpegImageFile, TiffImagePlugin.TiffImageFile):
        try:
            with reader(file) as image:
                return _pillow_header(image)
        except Exception:  # not this format (SyntaxError) or unreadable: try the next
            continue
    raise ImageReadError(file, "cannot read the image header (Pillow refuses it as a decompression bomb)")


def _dicom_header(file: Path, max_inflated_bytes: int) -> tuple[Header, Dataset | None]:
    import pydicom

    try:
        deflated = read_deflated(file, max_inflated_bytes)
    except InflationLimitError as err:
        raise Refused(file, "too_large", err.reason) from err
    try:
        ds = deflated if deflated is not None else pydicom.dcmread(file, stop_before_pixels=True, force=True)
    except Exception as err:
        raise ImageReadError(file, f"not a readable DICOM file: {err}") from err
    if "Rows" not in ds or "Columns" not in ds:
        raise ImageReadError(file, "the DICOM file holds no image (no Rows (0028,0010) / Columns (0028,0011))")

    def text(keyword: str) -> str:
        return str(ds.get(keyword, "") or "").strip().upper()

    try:
        fields = {"modality": text("Modality"), "sop_class_uid": str(ds.get("SOPClassUID", "") or "").strip(),
                  "presentation_intent": text("PresentationIntentType"),
                  "body_part": text("BodyPartExamined"), "view_position": text("ViewPosition"),
                  "samples": int(ds.get("SamplesPerPixel", 1) or 1),
                  "photometric_interpretation": text("PhotometricInterpretation")}
        return Header("dicom", int(ds.Rows), int(ds.Columns), fields), deflated
    except (TypeError, ValueError) as err:  # an empty Rows (0028,0010), a Samples per Pixel that is not a number
        raise ImageReadError(file, f"malformed image header: {type(err).__name__}: {err}") from err


def _unconfirmed_chest_warning(fields: dict) -> list[str]:
    """A warning when Body Part Examined (0018,0015) or View Position (0018,5101) is missing: accepted, not confirmed."""
    missing = [name for key, name in (("body_part", "Body Part Examined (0018,0015)"), ("view_position", "View Position (0018,5101)"))
               if not fields.get(key)]
    if not missing:
        return []
    return [f"the DICOM header could not confirm a frontal chest radiograph: {' and '.join(missing)} missing"]


def polarity_contrast(pixels: np.ndarray) -> float:
    """Median of the central (mediastinal) strip minus the median of the two lateral (lung) strips.

    Rows 25-75% of the height; columns 42-58% against 15-30% and 70-85%. Positive on a frontal chest
    radiograph in MONOCHROME2 polarity (spine and heart bright, aerated lungs dark): from 0.035 up on
    JSRT, above 0.1 on the Kermany images, negative for 0.5% of the NIH 64 px subset; an inverted
    image gives the negative of its value.
    """
    pixels = _strided(pixels)
    height, width = pixels.shape
    rows = slice(int(0.25 * height), max(int(0.75 * height), int(0.25 * height) + 1))

    def strip(low: float, high: float) -> np.ndarray:
        return pixels[rows, int(low * width) : max(int(high * width), int(low * width) + 1)].ravel()

    sides = np.concatenate([strip(0.15, 0.30), strip(0.70, 0.85)])
    return float(np.median(strip(0.42, 0.58)) - np.median(sides))


def _strided(pixels: np.ndarray, side: int = 512) -> np.ndarray:
    """Every k-th pixel, so a statistic of a 3000 px radiograph costs what one of 512 px does."""
    stride = max(1, int(np.ceil(max(pixels.shape) / side)))
    return np.asarray(pixels[::stride, ::stride], dtype=np.float32)


def information_problem(pixels: np.ndarray) -> str | None:
    """Why an (H, W) image in [0, 1] holds too little to read (constant or nearly so), else None."""
    sample = _strided(pixels)
    low, high = float(sample.min()), float(sample.max())
    if high - low == 0.0:
        return f"constant image (every pixel is {low:.3g})"
    p01, p99 = np.percentile(sample, [1, 99])
    if p99 - p01 < MIN_CONTRAST:
        return (f"nearly constant image: 98% of the pixels lie within {100 * (p99 - p01):.2f}% of the intensity scale "
                f"(at least {100 * MIN_CONTRAST:.0f}% needed)")
    return None


@dataclass(frozen=True)
class AcceptancePolicy:
    """Which images get a probability. See the module docstring for the checks and their order.

    Args:
        max_pixels: rows x columns above which an image is refused from its header.
        min_side_px: shorter side below which an image is refused.
        allow_non_chest: header checks (modality, For Processing, body part, view) warn instead of refusing.
        reference: a checkpoint's ``val_reference["intensity"]`` (``lungdx.reference.summarize_intensity``).
    """

    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side_px: int = MIN_SIDE_PX
    allow_non_chest: bool = False
    reference: dict | None = None

    @property
    def max_inflated_bytes(self) -> int:
        """What a Deflated Explicit VR Little Endian dataset may inflate to: ``max_pixels`` of 4 bytes and a header."""
        return inflation_limit(self.max_pixels)

    def read(self, path: str | os.PathLike) -> Radiograph:
        """Check the header, decode, check the pixels; the Radiograph's ``meta["warnings"]`` lists any override.

        Raises:
            Refused: the image is not one this policy scores (``kind``, ``reason``).
            ImageReadError: the file cannot be read at all.
        """
        header, deflated = _read_header(path, self.max_inflated_bytes)
        warnings = self.check_header(path, header)
        image = self._decode(path, header, deflated)
        self.check_pixels(path, image)
        image.meta["warnings"] = warnings + image.meta.get("warnings", [])
        return image

    def _decode(self, path: str | os.PathLike, header: Header, deflated: Dataset | None) -> Radiograph:
        """The pixels; a deflated DICOM's from the dataset its header came from, so it is inflated once."""
        from lungdx.io import read_dicom, read_image

        if deflated is not None:
            return to_radiograph(deflated, Path(path))
        if header.format != "dicom":
            return read_image(path)
        try:
            return read_dicom(path, max_inflated_bytes=self.max_inflated_bytes)
        except InflationLimitError as err:  # not deflated when its header was read: only a file changed since gets here
            raise Refused(path, "too_large", err.reason) from err

    def check_header(self, path: str | os.PathLike, header: Header) -> list[str]:
        """Refuse from the header alone; returns the warnings of overridden header checks."""
        rows, columns = header.rows, header.columns
        if rows * columns > self.max_pixels:
            raise Refused(path, "too_large", f"image of {rows} x {columns} pixels is over the limit of {self.max_pixels} pixels")
        if min(rows, columns) < self.min_side_px:
            raise Refused(path, "too_small", f"image of {rows} x {columns} pixels is too small to be a radiograph "
                                              f"(shorter side under {self.min_side_px} px)")
        if header.format != "dicom":
            return []
        fields = header.fields
        photometric = fields["photometric_interpretation"] or "missing"
        if fields["samples"] != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
            raise Refused(path, "colour", f"colour image: Samples per Pixel (0028,0002) {fields['samples']}, "
                                          f"Photometric Interpretation (0028,0004) {photometric}")
        problem = chest_header_problem(fields)
        if problem is None:
            return _unconfirmed_chest_warning(fields)
        kind, reason = problem
        if not self.allow_non_chest:
            raise Refused(path, kind, f"not a frontal chest radiograph: {reason}")
        return [f"scored although not a frontal chest radiograph (allow_non_chest): {reason}"]

    def check_pixels(self, path: str | os.PathLike, image: Radiograph) -> None:
        """Refuse colour and nearly constant images, and images far outside the training reference."""
        spread = image.meta.get("colour_spread")
        if spread is not None and spread > MAX_COLOUR_SPREAD:
            raise Refused(path, "colour", f"colour image: the channels differ by {100 * spread:.1f}% of full scale on average "
                                          f"(at most {100 * MAX_COLOUR_SPREAD:.0f}% for a gray image stored as colour)")
        problem = information_problem(image.pixels)
        if problem is not None:
            raise Refused(path, "blank", problem)
        problem = self.reference_problem(image.pixels)
        if problem is not None:
            raise Refused(path, "out_of_distribution", problem)

    def reference_problem(self, pixels: np.ndarray) -> str | None:
        """Why an image looks like an inverted training image, else None (also without a reference).

        Refused when the image's mediastinum-minus-lungs contrast lies below the 1st percentile of the
        validation images' (less :data:`POLARITY_MARGIN`) while its negative, the value the inverted
        image would have, is at or above their 5th percentile. An image with a weak but unambiguous
        contrast passes. Brightness and contrast are not judged: the per-image levelling
        (``preprocess.level``) removes them, and gradual shifts are the drift monitor's to report.
        """
        polarity = np.asarray((self.reference or {}).get("polarity") or [], dtype=np.float64)
        if len(polarity) < MIN_REFERENCE_IMAGES:
            return None
        value = polarity_contrast(pixels)
        p01, p05 = np.quantile(polarity, [0.01, 0.05])
        if value < p01 - POLARITY_MARGIN and -value >= p05:
            return (f"intensity far outside the training reference: the image looks inverted. Its mediastinum-minus-lungs "
                    f"contrast is {value:.3f}, below the model's {len(polarity)} validation images (1st percentile "
                    f"{p01:.3f}), while the inverted image's {-value:.3f} would be typical of them (MONOCHROME1 shown as "
                    "MONOCHROME2, or not a frontal chest radiograph?)")
        return None
