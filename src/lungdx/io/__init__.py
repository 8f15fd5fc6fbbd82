"""Pixels in: DICOM, PNG/JPEG (8- and 16-bit) and JSRT raw radiographs as [0, 1] float32.

Every reader returns a :class:`Radiograph` whose pixels are float32 (H, W) in [0, 1] with
MONOCHROME2 polarity (bone bright, air dark), and raises :class:`ImageReadError` naming the file
and the reason when it cannot.
"""

from __future__ import annotations

import os

from lungdx.io.dicom import invert_polarity, is_chest_radiograph, read_dicom
from lungdx.io.errors import ImageReadError, require_file
from lungdx.io.jsrt import read_jsrt_raw, write_jsrt_raw
from lungdx.io.raster import Radiograph, read_raster

__all__ = [
    "ImageReadError",
    "Radiograph",
    "invert_polarity",
    "is_chest_radiograph",
    "read_dicom",
    "read_image",
    "read_jsrt_raw",
    "read_raster",
    "sniff_format",
    "write_jsrt_raw",
]

_RASTER_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*")
_EXTENSIONS = {
    ".png": "raster",
    ".jpg": "raster",
    ".jpeg": "raster",
    ".tif": "raster",
    ".tiff": "raster",
    ".dcm": "dicom",
    ".dicom": "dicom",
    ".dic": "dicom",
    ".img": "jsrt_raw",
}
_READERS = {"raster": read_raster, "dicom": read_dicom, "jsrt_raw": read_jsrt_raw}


def sniff_format(path: str | os.PathLike) -> str | None:
    """Return "raster", "dicom" or "jsrt_raw" for a file, or None when unrecognised.

    Content decides first (the DICOM 'DICM' prefix at byte 128 of PS3.10 7.1, then PNG, JPEG
    and TIFF signatures), so extension-less PACS exports work; the extension decides otherwise.
    DICOM is checked first because its 128-byte preamble may hold a TIFF header (PS3.10 7.1).
    No signature can match a JSRT raw file, whose big-endian 12-bit words start below 0x10.
    """
    file = require_file(path)
    try:
        with open(file, "rb") as stream:
            head = stream.read(132)
    except OSError as exc:
        raise ImageReadError(file, f"cannot open: {exc.strerror or exc}") from exc
    if head[128:132] == b"DICM":  # first: a DICOM preamble may itself be a TIFF header
        return "dicom"
    if head.startswith(_RASTER_SIGNATURES):
        return "raster"
    return _EXTENSIONS.get(file.suffix.lower())


def read_image(path: str | os.PathLike) -> Radiograph:
    """Read any supported radiograph file, choosing the reader by content, then extension.

    JSRT ``.IMG`` files are read with the official 2048 x 2048, 12-bit layout; call
    :func:`read_jsrt_raw` directly for other layouts.

    Raises:
        ImageReadError: The file is missing, of an unrecognised format, or unreadable.
    """
    kind = sniff_format(path)
    if kind is None:
        raise ImageReadError(
            path, "unrecognised image format: expected PNG, JPEG, TIFF, DICOM or JSRT .IMG"
        )
    return _READERS[kind](path)
