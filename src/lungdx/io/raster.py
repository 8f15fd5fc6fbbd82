"""PNG, JPEG and TIFF radiographs read with Pillow into [0, 1] float32.

Scaling follows the true bit depth of the file:

* 1-bit, 8-bit gray, palette and 8-bit colour images are divided by 255.
* 16-bit gray images (Pillow modes ``I;16``, ``I;16B``, and ``I`` when its values fit in
  0..65535) are divided by 65535. The PNG specification (section 12.3, sample depth scaling)
  requires an encoder to scale samples of lower precision up to the full 16-bit range and to
  record the original precision in the ``sBIT`` chunk. When a 16-bit PNG has an ``sBIT`` value
  ``s < 16`` the original samples are recovered exactly with ``value >> (16 - s)`` and divided by
  ``2**s - 1``; ``meta["bits"]`` is then ``s``. Files that break the specification by storing,
  say, 12-bit values unscaled in a 16-bit PNG without ``sBIT`` (the maximum below 4096) are read as
  samples of the fewest bits (8 to 12) that hold their maximum, with a debug message: at 16 bits
  they read dark, and 10-bit data were refused as nearly blank.
* Colour images whose channels are identical become that channel exactly; other colour images
  are reduced to luma with Pillow's ``convert("L")`` (ITU-R 601-2), with a debug message.
  16-bit RGB and gray+alpha PNGs, which Pillow decodes at 8 bits, are read with OpenCV at 16.
* A 16-bit TIFF with PhotometricInterpretation 0 (MinIsWhite) is inverted (Pillow inverts only
  1- and 8-bit ones).

JPEG EXIF orientation is applied, so pixels come out as a viewer shows them.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from lungdx.io.errors import ImageReadError, require_file

logger = logging.getLogger(__name__)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_FORMATS = {"PNG": "png", "JPEG": "jpeg", "MPO": "jpeg", "TIFF": "tiff"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
_COLOUR_MODES = {"RGB", "RGBA", "RGBX", "RGBa", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"}


@dataclass(frozen=True, eq=False)
class Radiograph:
    """One grayscale radiograph with its provenance.

    ``eq=False`` because comparing two arrays with ``==`` has no single truth value; compare
    ``pixels`` with ``np.array_equal`` instead.

    Attributes:
        pixels: float32 array of shape (H, W), values in [0, 1], MONOCHROME2 polarity
            (bone bright, air dark).
        meta: JSON-serialisable facts about the source: at least ``source`` (path),
            ``format`` ("png", "jpeg", "tiff", "dicom" or "jsrt_raw"), ``bits`` (original bit
            depth) and ``original_shape`` ([H, W]).
    """

    pixels: np.ndarray
    meta: dict

    def __post_init__(self):
        if not isinstance(self.pixels, np.ndarray) or self.pixels.ndim != 2:
            raise ValueError("Radiograph.pixels must be a 2-D numpy array")
        if self.pixels.dtype != np.float32:
            raise ValueError(f"Radiograph.pixels must be float32, got {self.pixels.dtype}")


def read_raster(path: str | os.PathLike) -> Radiograph:
    """Read a PNG, JPEG or TIFF radiograph (8- or 16-bit, gray or colour) as a Radiograph.

    Raises:
        ImageReadError: The file is missing, not an image Pillow can decode, truncated,
            multi-frame, or in an unsupported pixel mode.
    """
    file = require_file(path)
    image, file_format, min_is_white = _load_image(file)
    levels, max_level, bits, colour_spread = _gray_levels(image, file)
    if file_format == "png" and bits == 8 and _png_header(file) in _SIXTEEN_BIT_COLOUR_PNG:
        levels, max_level, bits, colour_spread = _sixteen_bit_colour_png(file, levels.shape, levels, colour_spread)
    if min_is_white and bits == 16:  # Pillow inverts 1- and 8-bit MinIsWhite TIFFs itself, not 16-bit ones
        levels = max_level - levels
    if file_format == "png" and bits == 16:
        levels, max_level, bits = _apply_significant_bits(levels, _png_significant_bits(file))
    # Levels up to 16 bits are exact in float32, so float32 division is correctly rounded.
    pixels = levels.astype(np.float32) / np.float32(max_level)
    meta = {
        "source": str(file),
        "format": file_format,
        "bits": bits,
        "original_shape": [int(pixels.shape[0]), int(pixels.shape[1])],
        "mode": image.mode,
    }
    if colour_spread is not None:
        meta["colour_spread"] = colour_spread
    logger.debug("read %s: %s %s-bit %s", file, file_format, bits, pixels.shape)
    return Radiograph(pixels=pixels, meta=meta)


def _load_image(file: Path) -> tuple[Image.Image, str, bool]:
    """Open, fully decode and orient one image; map every decoder failure to ImageReadError.

    Also says whether it is a TIFF whose PhotometricInterpretation (262) is 0, MinIsWhite: 0 means white."""
    try:
        with Image.open(file) as opened:
            file_format = _FORMATS.get(opened.format or "")
            if file_format is None:
                raise ImageReadError(file, f"unsupported image format {opened.format}")
            frames = getattr(opened, "n_frames", 1)
            if frames > 1 and opened.format != "MPO":
                raise ImageReadError(file, f"multi-frame image ({frames} frames) not supported")
            opened.load()
            min_is_white = file_format == "tiff" and getattr(opened, "tag_v2", {}).get(262) == 0
            image = ImageOps.exif_transpose(opened)
    except ImageReadError:
        raise
    except Image.UnidentifiedImageError as exc:
        precision = _jpeg_precision(file)
        if precision not in (None, 8):
            raise ImageReadError(file, f"{precision}-bit JPEG is not supported (Pillow reads 8-bit JPEG only); "
                                       "convert it to 16-bit PNG or DICOM") from exc
        raise ImageReadError(file, "not a PNG/JPEG/TIFF image (Pillow cannot identify it)") from exc
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise ImageReadError(file, f"cannot decode image: {exc}") from exc
    return image, file_format, min_is_white


def _jpeg_precision(file: Path) -> int | None:
    """The sample precision of a JPEG's frame header (SOF0-SOF15), or None when it is not a JPEG or has none."""
    from lungdx.io.codestream import HEAD_BYTES, jpeg_frame_header

    with open(file, "rb") as stream:
        frame = jpeg_frame_header(stream.read(HEAD_BYTES))
    return None if frame is None else frame[0]


def _gray_levels(image: Image.Image, file: Path) -> tuple[np.ndarray, int, int, float | None]:
    """(integer gray levels, the level that means white, bit depth, colour spread or None) of a Pillow image."""
    mode = image.mode
    if mode == "1":
        return np.asarray(image.convert("L")), 255, 1, None
    if mode == "L":
        return np.asarray(image), 255, 8, None
    if mode in ("LA", "La"):
        return np.asarray(image.getchannel("L")), 255, 8, None
    if mode in _SIXTEEN_BIT_MODES:
        return np.asarray(image).astype(np.uint16), 65535, 16, None
    if mode == "I":
        return _int32_as_16bit(np.asarray(image), file), 65535, 16, None
    if mode in _COLOUR_MODES:
        gray, spread = _colour_to_gray(image, file)
        return gray, 255, 8, spread
    raise ImageReadError(file, f"unsupported pixel mode {mode!r}")


def _int32_as_16bit(levels: np.ndarray, file: Path) -> np.ndarray:
    """Accept Pillow's 32-bit integer mode only when the values are really 16-bit."""
    if levels.size and (levels.min() < 0 or levels.max() > 65535):
        raise ImageReadError(file, "32-bit integer pixels outside 0..65535 are not supported")
    return levels.astype(np.uint16)


def _colour_to_gray(image: Image.Image, file: Path) -> tuple[np.ndarray, float]:
    """Take the one channel of a gray image stored as colour, else reduce colour to luma.

    Also returns how much the channels differ: the mean of (max - min) over R, G, B as a share of
    255, on every k-th pixel (0 for a gray image stored as colour). ``lungdx.io.acceptance`` refuses
    images where it is material.
    """
    rgb_image = image.convert("RGB")
    rgb = np.asarray(rgb_image)
    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
        return np.ascontiguousarray(rgb[..., 0]), 0.0
    stride = max(1, max(rgb.shape[:2]) // 512)
    sample = rgb[::stride, ::stride].astype(np.int16)
    spread = float((sample.max(axis=2) - sample.min(axis=2)).mean() / 255)
    logger.debug("%s: colour image (mode %s, channel spread %.3f) reduced to luma", file, image.mode, spread)
    return np.asarray(rgb_image.convert("L")), spread


_SIXTEEN_BIT_COLOUR_PNG = {(16, 2), (16, 4), (16, 6)}
"""(bit depth, colour type) of 16-bit RGB, gray+alpha and RGBA PNGs, which Pillow decodes at 8 bits."""


def _png_header(file: Path) -> tuple[int, int] | None:
    """(bit depth, colour type) from a PNG's IHDR chunk; None when it is not there."""
    with open(file, "rb") as stream:
        head = stream.read(26)
    if len(head) < 26 or not head.startswith(_PNG_SIGNATURE) or head[12:16] != b"IHDR":
        return None
    return head[24], head[25]


def _sixteen_bit_colour_png(file: Path, shape, levels8: np.ndarray, spread8: float | None):
    """The 16-bit levels of a 16-bit RGB or gray+alpha PNG (OpenCV keeps all 16 bits; Pillow gives 8): one channel
    when the colour channels are equal, else luma (ITU-R 601-2, as Pillow's), alpha dropped. Falls back to Pillow's 8
    bits, with a warning, where OpenCV cannot decode it or sees it in another orientation."""
    import cv2

    decoded = cv2.imread(str(file), cv2.IMREAD_UNCHANGED)
    if decoded is None or decoded.dtype != np.uint16 or decoded.ndim != 3 or decoded.shape[:2] != tuple(shape):
        logger.warning("%s: 16-bit colour PNG read at 8 bits (256 gray levels)", file)
        return levels8, 255, 8, spread8
    blue, green, red = (decoded[..., channel] for channel in range(3))
    if np.array_equal(red, green) and np.array_equal(red, blue):
        return np.ascontiguousarray(red), 65535, 16, 0.0
    luma = 0.299 * red.astype(np.float64) + 0.587 * green + 0.114 * blue
    stride = max(1, max(shape) // 512)
    sample = decoded[::stride, ::stride, :3].astype(np.int32)
    spread = float((sample.max(axis=2) - sample.min(axis=2)).mean() / 65535)
    return np.clip(np.rint(luma), 0, 65535).astype(np.uint16), 65535, 16, spread


def _png_significant_bits(file: Path) -> int | None:
    """Return the gray significant bits from the PNG sBIT chunk, or None when it is absent."""
    with open(file, "rb") as stream:
        if stream.read(8) != _PNG_SIGNATURE:
            return None
        while True:
            header = stream.read(8)
            if len(header) < 8:
                return None
            length, kind = struct.unpack(">I4s", header)
            if kind == b"sBIT":
                data = stream.read(length)
                return data[0] if data else None
            if kind in (b"IDAT", b"IEND"):  # sBIT must precede the image data
                return None
            stream.seek(length + 4, os.SEEK_CUR)  # chunk data and CRC


def _apply_significant_bits(levels: np.ndarray, bits: int | None) -> tuple[np.ndarray, int, int]:
    """Undo PNG sample depth scaling (PNG spec 12.3) when sBIT records fewer than 16 bits."""
    if bits is None and levels.size and 0 < levels.max() < 4096:
        # No encoder following section 12.3 writes this: 12-bit (or fewer) samples stored unscaled. Read at 16 bits,
        # 10-bit data lie within 1.6% of the scale and are refused as nearly blank.
        bits = max(8, int(levels.max()).bit_length())
        logger.debug("16-bit PNG without sBIT uses only its %d low bits: read as %d-bit samples", bits, bits)
        return levels, 2**bits - 1, bits
    if bits is None or bits == 16:
        return levels, 65535, 16
    if not 1 <= bits < 16:
        logger.warning("ignoring invalid PNG sBIT value %d for a 16-bit image", bits)
        return levels, 65535, 16
    return levels >> (16 - bits), 2**bits - 1, bits
