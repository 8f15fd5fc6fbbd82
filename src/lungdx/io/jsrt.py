"""The official JSRT database ``.IMG`` format: headerless big-endian 16-bit words.

Each official file holds 2048 x 2048 pixels of 0.175 mm, 12 bits stored in big-endian unsigned
16-bit words, with no header (JSRT Database User's Guide). The stored values run the way film
density does: **higher values are darker** (more exposure). Every widely used converter
inverts them before display or training (``1 - v / 4096`` in the lung segmentation
preprocessing of imlab-uiip and ngaggion, ``4095 - v`` in Idiap's mednet loader), and the
display-ready JSRT PNGs have dark lungs. So ``invert=True`` is the default, giving MONOCHROME2
polarity (bone bright, air dark) like every other reader in ``lungdx.io``.

The inversion is done on integer levels, ``(2**bits - 1) - v``, so with matching ``bits`` and
``invert`` a file written by ``write_jsrt_raw`` reads back to exactly ``level / (2**bits - 1)``
and writing those pixels again reproduces the same bytes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from lungdx.io.errors import ImageReadError, require_file
from lungdx.io.raster import Radiograph

logger = logging.getLogger(__name__)

JSRT_SHAPE = (2048, 2048)
JSRT_BITS = 12
JSRT_PIXEL_SPACING_MM = 0.175
_WORD = np.dtype(">u2")


def read_jsrt_raw(
    path: str | os.PathLike,
    shape: tuple[int, int] = JSRT_SHAPE,
    bits: int = JSRT_BITS,
    invert: bool = True,
) -> Radiograph:
    """Read a headerless JSRT ``.IMG`` file as a Radiograph.

    Args:
        path: The ``.IMG`` file.
        shape: (rows, columns) of the image; the file must hold exactly that many 16-bit words.
        bits: Bits stored in each word; values above ``2**bits - 1`` are clipped with a warning.
        invert: Map high stored values to dark pixels, as the official files need (see the
            module docstring). False keeps stored values as brightness.

    Raises:
        ImageReadError: The file is missing or its size is not ``rows * columns * 2`` bytes.
    """
    file = require_file(path)
    max_level = _max_level(bits)
    expected = int(shape[0]) * int(shape[1]) * _WORD.itemsize
    size = file.stat().st_size
    if size != expected:
        raise ImageReadError(
            file, f"size {size} bytes is not {shape[0]}x{shape[1]} 16-bit pixels ({expected} bytes)"
        )
    try:
        levels = np.fromfile(file, dtype=_WORD).reshape(shape).astype(np.int32)
    except OSError as exc:
        raise ImageReadError(file, f"cannot read: {exc.strerror or exc}") from exc
    if levels.max(initial=0) > max_level:
        logger.warning("%s: values above %d-bit range clipped to %d", file, bits, max_level)
        levels = np.minimum(levels, max_level)
    if invert:
        levels = max_level - levels
    pixels = (levels / max_level).astype(np.float32)
    return Radiograph(pixels=pixels, meta=_jsrt_meta(file, shape, bits, invert))


def write_jsrt_raw(
    path: str | os.PathLike, pixels: np.ndarray, bits: int = JSRT_BITS, invert: bool = True
) -> None:
    """Write [0, 1] pixels as a headerless JSRT ``.IMG`` file: inverse of ``read_jsrt_raw``.

    Pixels are rounded to ``bits``-bit levels (``round(x * (2**bits - 1))``), inverted when
    ``invert`` is true, and written as big-endian unsigned 16-bit words. Any 2-D shape is
    accepted; pass the same shape to ``read_jsrt_raw``.

    Raises:
        ValueError: ``pixels`` is not 2-D or holds values outside [0, 1] (or NaN).
    """
    max_level = _max_level(bits)
    unit = np.asarray(pixels, dtype=np.float64)
    if unit.ndim != 2:
        raise ValueError(f"pixels must be 2-D, got shape {unit.shape}")
    if not np.all((unit >= 0.0) & (unit <= 1.0)):  # also rejects NaN
        raise ValueError("pixels must lie in [0, 1]")
    levels = np.rint(unit * max_level).astype(np.int32)
    if invert:
        levels = max_level - levels
    Path(path).write_bytes(levels.astype(_WORD).tobytes())


def _max_level(bits: int) -> int:
    """Return the white level of ``bits``-bit data stored in 16-bit words."""
    if not 1 <= int(bits) <= 16:
        raise ValueError(f"bits must be between 1 and 16, got {bits}")
    return 2 ** int(bits) - 1


def _jsrt_meta(file: Path, shape: tuple[int, int], bits: int, invert: bool) -> dict:
    """Describe a JSRT raw image; the pixel spacing is known only for the official 2048 size."""
    official = tuple(shape) == JSRT_SHAPE
    spacing = [JSRT_PIXEL_SPACING_MM, JSRT_PIXEL_SPACING_MM] if official else None
    return {
        "source": str(file),
        "format": "jsrt_raw",
        "bits": int(bits),
        "original_shape": [int(shape[0]), int(shape[1])],
        "inverted": bool(invert),
        "pixel_spacing_mm": spacing,
    }
