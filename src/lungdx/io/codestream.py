"""The size a compressed DICOM frame declares in its own codestream, checked against Rows and Columns before decoding.

The pixel limit (``lungdx.io.acceptance``) is checked against Rows (0028,0010) x Columns (0028,0011), but a decoder
decodes what the codestream says: a frame that declares 4096 x 4096 under Rows = Columns = 128 would be decoded
whole before anything noticed. Each family's frame header says its size in its first bytes:

- JPEG 2000 and HTJ2K (PS3.5 A.4.4, A.4.11): the SIZ marker (ISO/IEC 15444-1 A.5.1), width Xsiz - XOsiz, height
  Ysiz - YOsiz, Csiz components;
- JPEG (PS3.5 A.4.1): the SOFn frame header (ISO/IEC 10918-1 B.2.2), lines Y, samples per line X, Nf components;
- JPEG-LS (PS3.5 A.4.3): SOF55 (ISO/IEC 14495-1 C.2.2), laid out as a JPEG frame header.

RLE Lossless and Deflated Image Frame Compression decode into a buffer of the header's size, so need no check.
"""

from __future__ import annotations

import struct
from pathlib import Path

from pydicom.dataset import Dataset

from lungdx.io.errors import ImageReadError

HEAD_BYTES = 64 * 1024
"""How much of a frame is searched for its size: the SIZ or SOF marker follows a few tables at most."""

_J2K_PREFIXES = ("1.2.840.10008.1.2.4.9", "1.2.840.10008.1.2.4.20")  # JPEG 2000 (.90-.93), HTJ2K (.201-.203)
_JPEG_PREFIXES = ("1.2.840.10008.1.2.4.5", "1.2.840.10008.1.2.4.6", "1.2.840.10008.1.2.4.7")  # .50, .51, .57, .70
_JPEG_LS_PREFIX = "1.2.840.10008.1.2.4.8"  # .80, .81
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # not DHT C4, JPG C8, DAC CC
_SOF55 = 0xF7
_UNSIZED = {0x01, *range(0xD0, 0xDA)}  # TEM, RSTn, SOI, EOI: markers without a length


def check_frame_size(ds: Dataset, file: Path) -> None:
    """Refuse a compressed frame whose codestream declares another size than Rows x Columns, or other components.

    Raises:
        ImageReadError: the sizes differ, or the frame's header cannot be found.
    """
    syntax = str(ds.file_meta.get("TransferSyntaxUID", "") or "")
    family = _family(syntax)
    if family is None or "PixelData" not in ds:
        return
    head = frame_head(ds.PixelData)
    size = j2k_size(head) if family == "JPEG 2000" else jpeg_size(head, sof55=family == "JPEG-LS")
    if size is None:
        raise ImageReadError(file, f"the {family} frame ({syntax}) holds no readable frame header giving its size")
    rows, columns, components = size
    expected = (int(ds.Rows), int(ds.Columns), int(ds.get("SamplesPerPixel", 1) or 1))
    if (rows, columns, components) != expected:
        raise ImageReadError(file, f"the {family} frame ({syntax}) declares {rows} x {columns} pixels of {components} "
                                   f"component(s), but Rows (0028,0010) x Columns (0028,0011) say {expected[0]} x "
                                   f"{expected[1]} of {expected[2]}: refused before decoding")


def _family(syntax: str) -> str | None:
    if syntax.startswith(_J2K_PREFIXES):
        return "JPEG 2000"
    if syntax.startswith(_JPEG_LS_PREFIX):
        return "JPEG-LS"
    if syntax.startswith(_JPEG_PREFIXES):
        return "JPEG"
    return None


def frame_head(pixel_data: bytes) -> bytes:
    """The first :data:`HEAD_BYTES` of the first frame of encapsulated Pixel Data (PS3.5 A.4), joined over fragments."""
    from pydicom.encaps import generate_fragments

    head = b""
    try:
        fragments = generate_fragments(pixel_data)
        next(fragments, None)  # the Basic Offset Table item (empty or not) comes first
        for fragment in fragments:
            head += fragment
            if len(head) >= HEAD_BYTES:
                break
    except Exception:  # malformed items: what was read is all there is
        pass
    return head[:HEAD_BYTES]


def j2k_size(head: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) from a JPEG 2000 codestream's SIZ marker (a JP2 wrapper is looked through)."""
    at = head.find(b"\xff\x4f\xff\x51")  # SOC then SIZ: SIZ is the first marker segment (ISO/IEC 15444-1 A.5)
    if at < 0 or len(head) < at + 42:
        return None
    xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">4I", head, at + 8)  # after SOC, SIZ, Lsiz, Rsiz
    (csiz,) = struct.unpack_from(">H", head, at + 40)
    if xosiz > xsiz or yosiz > ysiz:
        return None
    return ysiz - yosiz, xsiz - xosiz, csiz


def jpeg_size(head: bytes, sof55: bool = False) -> tuple[int, int, int] | None:
    """(rows, columns, components) from a JPEG frame header (SOFn), or JPEG-LS's SOF55 when ``sof55``."""
    frame = jpeg_frame_header(head, sof55)
    return None if frame is None else frame[1:]


def jpeg_frame_header(head: bytes, sof55: bool = False) -> tuple[int, int, int, int] | None:
    """(sample precision, rows, columns, components) from the first JPEG frame header (SOFn, ISO/IEC 10918-1
    B.2.2), or JPEG-LS's SOF55 when ``sof55``; None when ``head`` is no JPEG or no frame header comes before the
    first scan."""
    if not head.startswith(b"\xff\xd8"):
        return None
    frame_markers = {_SOF55} if sof55 else _SOF
    at = 2
    while at + 4 <= len(head):
        if head[at] != 0xFF:
            return None
        marker = head[at + 1]
        if marker == 0xFF:  # fill byte (ISO/IEC 10918-1 B.1.1.2)
            at += 1
            continue
        if marker in _UNSIZED:
            at += 2
            continue
        if marker in frame_markers:
            if len(head) < at + 10:
                return None
            return struct.unpack_from(">BHHB", head, at + 4)  # P, Y (lines), X (samples per line), Nf: after marker, Lf
        if marker == 0xDA:  # SOS: the scan starts and no frame header came before it
            return None
        (length,) = struct.unpack_from(">H", head, at + 2)
        at += 2 + length
    return None
