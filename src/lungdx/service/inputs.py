"""Checks at the boundary: every bad upload becomes an ``UploadRejected`` with an HTTP status and a reason.

The order matters: the type is sniffed from the bytes (never from the client's file name or
Content-Type), the pixel count is read from the header before anything is decoded (so a
decompression bomb is refused cheaply), a DICOM header that says the image is not a frontal chest
radiograph is refused before decoding, and only then are the pixels decoded.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO

from lungdx.io import ImageReadError, Radiograph, is_chest_radiograph, read_image
from lungdx.io.deidentify import uid_digest
from lungdx.io.dicom import dicom_meta

MIN_SIDE_PX = 16
_PNG, _JPEG = b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"


class UploadRejected(Exception):
    """An upload the service refuses; ``status`` is the HTTP status (4xx) and ``reason`` says why."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def read_upload(stream: BinaryIO, *, max_pixels: int) -> Radiograph:
    """Check and decode one uploaded image (PNG, JPEG or DICOM) from a file-like object.

    Raises:
        UploadRejected: 415 unsupported type, 413 too many pixels, 422 empty, undecodable, too
            small, or a DICOM header that is not a frontal chest radiograph.
    """
    with tempfile.TemporaryDirectory(prefix="lungdx-upload-") as folder:
        path = Path(folder) / "upload"
        with open(path, "wb") as file:
            shutil.copyfileobj(stream, file, length=1024 * 1024)
        kind = sniff_upload(path)
        check_header(path, kind, max_pixels)
        try:
            radiograph = read_image(path)
        except ImageReadError as err:
            raise UploadRejected(422, f"undecodable {kind} file: {err.reason}") from err
        except Exception as err:  # a decoder's own error type: still the client's file, never a 500
            raise UploadRejected(422, f"undecodable {kind} file: {type(err).__name__}: {err}") from err
    radiograph.meta["source"] = "upload"  # the temporary path means nothing to anyone
    return radiograph


def sniff_upload(path: Path) -> str:
    """``dicom``, ``png`` or ``jpeg`` from the file's first bytes; 415 or 422 otherwise."""
    with open(path, "rb") as file:
        head = file.read(132)
    if not head:
        raise UploadRejected(422, "the uploaded file is empty")
    if head[128:132] == b"DICM":  # PS3.10 7.1: 128-byte preamble, then the DICM prefix
        return "dicom"
    if head.startswith(_PNG):
        return "png"
    if head.startswith(_JPEG):
        return "jpeg"
    raise UploadRejected(415, "unsupported file type: expected a PNG, a JPEG or a DICOM file (PS3.10, with the DICM prefix)")


def check_header(path: Path, kind: str, max_pixels: int) -> None:
    """Read the header once, without decoding pixels: the pixel count and, for DICOM, the chest check."""
    try:
        if kind == "dicom":
            import pydicom

            ds = pydicom.dcmread(path, stop_before_pixels=True)
        else:
            from PIL import Image

            with Image.open(path) as image:  # reads the header only
                width, height = image.size
    except Exception as err:
        raise UploadRejected(422, f"undecodable {kind} file: cannot read its header ({type(err).__name__})") from err
    if kind != "dicom":
        return check_shape(height, width, max_pixels)
    if "Rows" not in ds or "Columns" not in ds:
        raise UploadRejected(422, "the DICOM file holds no image (no Rows (0028,0010) / Columns (0028,0011))")
    check_shape(int(ds.Rows), int(ds.Columns), max_pixels)
    # The same header facts and the same rule as every other DICOM reader in lungdx.
    chest, reason = is_chest_radiograph(dicom_meta(ds, path, voi=""))
    if not chest:
        raise UploadRejected(422, f"not a frontal chest radiograph: {reason}")


def check_shape(rows: int, columns: int, max_pixels: int) -> None:
    """413 above the pixel limit, 422 below a size that can hold a radiograph."""
    if rows * columns > max_pixels:
        raise UploadRejected(413, f"image of {rows} x {columns} pixels is over the limit of {max_pixels} pixels")
    if min(rows, columns) < MIN_SIDE_PX:
        raise UploadRejected(422, f"image of {rows} x {columns} pixels is too small to be a radiograph")


def case_hash(meta: dict) -> str:
    """What the logs may say about a case: ``uid_digest`` of its SOP Instance UID, or ``-`` without one."""
    uid = meta.get("sop_instance_uid")
    return uid_digest(uid) if uid else "-"
