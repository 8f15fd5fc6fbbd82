"""Checks at the boundary: every bad upload becomes an ``UploadRejected`` with an HTTP status and a reason.

The type is sniffed from the bytes (never from the client's file name or Content-Type); then the
upload goes through the predictor's acceptance policy (``lungdx.io.acceptance``), the one every
entrance uses: the header is checked before anything is decoded (pixel limit, size, a DICOM header
that says the image is not a frontal chest radiograph), then the pixels (nearly constant, colour,
far outside the training reference). A refusal keeps the policy's reason word for word.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO

from lungdx.io import ImageReadError, Radiograph
from lungdx.io.acceptance import AcceptancePolicy, Refused
from lungdx.io.deidentify import uid_digest

_PNG, _JPEG = b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"


class UploadRejected(Exception):
    """An upload the service refuses; ``status`` is the HTTP status (4xx) and ``reason`` says why."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def read_upload(stream: BinaryIO, policy: AcceptancePolicy) -> Radiograph:
    """Check and decode one uploaded image (PNG, JPEG or DICOM) from a file-like object.

    Raises:
        UploadRejected: 415 unsupported type; 413 too many pixels; 422 empty, undecodable, or
            refused by the acceptance policy (the policy's reason).
    """
    with tempfile.TemporaryDirectory(prefix="lungdx-upload-") as folder:
        path = Path(folder) / "upload"
        with open(path, "wb") as file:
            shutil.copyfileobj(stream, file, length=1024 * 1024)
        kind = sniff_upload(path)
        try:
            radiograph = policy.read(path)
        except Refused as err:
            raise UploadRejected(err.status, _without_path(err.reason, path)) from err
        except ImageReadError as err:
            raise UploadRejected(422, f"undecodable {kind} file: {_without_path(err.reason, path)}") from err
        except Exception as err:  # a decoder's own error type: still the client's file, never a 500
            raise UploadRejected(422, f"undecodable {kind} file: {type(err).__name__}: {_without_path(str(err), path)}") from err
    radiograph.meta["source"] = "upload"  # the temporary path means nothing to anyone
    return radiograph


def _without_path(reason: str, path: Path) -> str:
    """A decoder's message may quote the file it read: the server's temporary path is no business of the client."""
    return reason.replace(str(path), "the upload").replace(str(path.parent), "the upload folder")


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


def case_hash(meta: dict) -> str:
    """What the logs may say about a case: ``uid_digest`` of its SOP Instance UID, or ``-`` without one."""
    uid = meta.get("sop_instance_uid")
    return uid_digest(uid) if uid else "-"
