"""A pydicom decoder plugin for 12-bit JPEG Extended (1.2.840.10008.1.2.4.51) through GDCM.

pydicom 3.0's own GDCM plugin refuses 12-bit JPEG Extended ("GDCM does not support 'JPEG Extended'
for samples with 12-bit precision"), Pillow decodes 8-bit JPEG only, and the one other plugin that
decodes it, pylibjpeg-libjpeg, is GPL-3.0. GDCM 3 itself decodes it: the output equals dcmtk's
``dcmdjpeg`` on 12-bit phantoms (``tests/test_codecs.py``) and pydicom's reference values on its
``JPGExtended.dcm`` test file. This module hands the frame to GDCM the way pydicom's plugin does,
without the refusal, and is registered for that one transfer syntax by :func:`register`.
See docs/decoders.md.
"""

from __future__ import annotations

from importlib.util import find_spec

from pydicom import uid
from pydicom.pixels.decoders.base import DecodeRunner

DECODER_DEPENDENCIES = {uid.JPEGExtended12Bit: ("gdcm>=3.0.10",)}
LABEL = "lungdx-gdcm-12bit"


def is_available(syntax: str) -> bool:
    """True for 12-bit JPEG Extended when python-gdcm imports (pydicom's plugin interface)."""
    return syntax == uid.JPEGExtended12Bit and find_spec("gdcm") is not None  # found, not imported: import stays light


def decode_frame(src: bytes, runner: DecodeRunner) -> bytes:
    """One encoded frame -> its decoded bytes (pydicom's plugin interface)."""
    import gdcm

    fragment = gdcm.Fragment()
    fragment.SetByteStringValue(src)
    fragments = gdcm.SequenceOfFragments.New()
    fragments.AddFragment(fragment)
    element = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    element.SetValue(fragments.__ref__())
    image = gdcm.Image()
    image.SetNumberOfDimensions(2)
    image.SetDimensions((runner.columns, runner.rows, 1))
    image.SetDataElement(element)
    photometric = gdcm.PhotometricInterpretation.GetPIType(runner.photometric_interpretation)
    image.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(photometric))
    image.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(str.__str__(runner.transfer_syntax))))
    bits = runner.bits_stored
    image.SetPixelFormat(gdcm.PixelFormat(runner.samples_per_pixel, runner.bits_allocated, bits, bits - 1,
                                          runner.pixel_representation))
    return image.GetBuffer().encode("utf-8", "surrogateescape")  # GDCM's buffer comes back as a str of bytes


def register() -> None:
    """Add the plugin to pydicom's 12-bit JPEG Extended decoder, once."""
    from pydicom.pixels import get_decoder

    try:
        get_decoder(uid.JPEGExtended12Bit).add_plugin(LABEL, (__name__, "decode_frame"))
    except ValueError:  # already registered
        pass
