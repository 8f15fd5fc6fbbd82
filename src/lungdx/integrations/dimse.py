"""DIMSE with pynetdicom: a C-STORE SCP (and C-ECHO) that persists what it receives, and a C-STORE SCU.

The SCP only writes each received instance into the inbox folder (atomically, named by a digest
of its SOP Instance UID) and answers Success: analysis happens in a worker, so a slow model never
holds an association open and nothing received is lost if the node stops.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from pydicom.uid import (
    UID,
    AllTransferSyntaxes,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)

from lungdx.integrations import uid_digest
from lungdx.integrations.outbox import DeliveryError, refused_for_good, truncated, write_atomic

logger = logging.getLogger(__name__)

ACCEPTED_SOP_CLASSES = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    # Chest radiographs converted from other formats often arrive as Secondary Capture with
    # Modality DX (the NIH ChestX-ray14 DICOMs); the worker checks the header and skips the rest.
    SecondaryCaptureImageStorage,
)
_SUCCESS, _OUT_OF_RESOURCES = 0x0000, 0xA700


class StoreListener:
    """A DICOM node: C-STORE SCP for radiographs into ``inbox``, and C-ECHO, on ``host:port`` as ``aet``."""

    def __init__(self, inbox: str | Path, aet: str = "LUNGDX", host: str = "0.0.0.0", port: int = 11112,
                 on_received=None):
        self.inbox = Path(inbox)
        self.inbox.mkdir(parents=True, exist_ok=True)
        self.aet, self.host, self.port = aet, host, port
        self.on_received = on_received
        self._server = None

    def start(self) -> None:
        """Listen in background threads (returns at once)."""
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.aet)
        for sop_class in ACCEPTED_SOP_CLASSES:
            ae.add_supported_context(sop_class, AllTransferSyntaxes)
        ae.add_supported_context(Verification)
        handlers = [(evt.EVT_C_STORE, self._handle_store), (evt.EVT_C_ECHO, lambda event: _SUCCESS)]
        self._server = ae.start_server((self.host, self.port), block=False, evt_handlers=handlers)
        logger.info("DICOM node %s listening on %s:%d", self.aet, self.host, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _handle_store(self, event) -> int:
        sop_uid = event.request.AffectedSOPInstanceUID
        digest = uid_digest(sop_uid)
        try:
            write_atomic(self.inbox / f"{digest}.dcm", event.encoded_dataset())
        except OSError as err:
            logger.error("cannot persist received instance %s: %s", digest, err.strerror or err)
            return _OUT_OF_RESOURCES
        logger.info("received instance %s from %s", digest, event.assoc.requestor.ae_title)
        if self.on_received is not None:
            self.on_received()
        return _SUCCESS


def send_cstore(files: Sequence[Path], host: str, port: int, called_aet: str, calling_aet: str = "LUNGDX",
                timeout_s: float = 30.0) -> None:
    """C-STORE PS3.10 files to a peer; raises DeliveryError when it is down or refuses any of them.

    An uncompressed file is proposed in its own transfer syntax and in Explicit and Implicit VR Little Endian, and sent
    in whichever the peer accepts (``_proposed_syntaxes``). A SOP class the peer accepts in none of them (PS3.8 9.3.3.2:
    a presentation context rejected) is a retried failure, logged as an error, before anything is sent.
    """
    import pydicom
    from pynetdicom import AE

    datasets = [pydicom.dcmread(file) for file in files]
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    for sop_class, syntaxes in {(ds.SOPClassUID, _proposed_syntaxes(ds.file_meta.TransferSyntaxUID)) for ds in datasets}:
        ae.add_requested_context(sop_class, list(syntaxes))
    assoc = ae.associate(host, port, ae_title=called_aet)
    try:
        # With every context rejected pynetdicom aborts the association it got (is_established False), so the
        # contexts are checked first; a rejected association or no answer negotiated none, and is retried.
        syntaxes = _chosen_syntaxes(assoc, datasets, called_aet)
        if not assoc.is_established:
            raise DeliveryError(f"no association with {called_aet} at {host}:{port}")
        for dataset, syntax in zip(datasets, syntaxes, strict=True):
            status = assoc.send_c_store(_in_syntax(dataset, syntax))
            code = getattr(status, "Status", None)
            # Success (0000) or a Warning (B000, B007, B006) stores the instance (PS3.4 B.2.3).
            if code is None or not (code == _SUCCESS or 0xB000 <= code <= 0xBFFF):
                raise DeliveryError(f"{called_aet} refused instance {uid_digest(dataset.SOPInstanceUID)}: "
                                    f"status {'none' if code is None else f'0x{code:04X}'}", permanent=refused_for_good(code),
                                    detail=truncated(str(getattr(status, "ErrorComment", "") or "")))
    finally:
        if assoc.is_established:
            assoc.release()


_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian)
_WORD_BYTES = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
"""Bytes per word of the VRs whose values pydicom keeps as bytes in the transfer syntax's byte order (PS3.5 7.3, 6.2)."""


def _proposed_syntaxes(syntax: UID) -> tuple[UID, ...]:
    """The transfer syntaxes proposed for a dataset in ``syntax``, its own first (the peer picks one, PS3.8 9.3.3.2).

    An uncompressed one adds Explicit and Implicit VR Little Endian: Implicit VR Little Endian is the default every
    peer supports (PS3.5 10.1), and a PACS may accept a SOP class in it alone. Any other (compressed, deflated) is
    proposed alone.
    """
    if syntax not in _UNCOMPRESSED:
        return (syntax,)
    return tuple(dict.fromkeys((syntax, ExplicitVRLittleEndian, ImplicitVRLittleEndian)))


def _accepted_syntax(assoc, dataset) -> UID | None:
    """The transfer syntax to send ``dataset`` in: the first of its proposed ones the peer accepted, None if none was."""
    accepted = {context.transfer_syntax[0] for context in assoc.accepted_contexts
                if context.abstract_syntax == dataset.SOPClassUID}
    return next((syntax for syntax in _proposed_syntaxes(dataset.file_meta.TransferSyntaxUID) if syntax in accepted), None)


def _in_syntax(dataset, syntax: UID):
    """``dataset`` encoded in the uncompressed ``syntax``, through bytes, so its file meta and its encoding agree.

    pynetdicom's ``send_c_store`` converts between the little endian syntaxes itself but never across byte orders,
    and pydicom writes OW, OF, OL, OD and OV values as they are: those are swapped here.
    """
    import pydicom
    from pydicom.filebase import DicomBytesIO

    if dataset.file_meta.TransferSyntaxUID == syntax:
        return dataset
    if dataset.file_meta.TransferSyntaxUID.is_little_endian != syntax.is_little_endian:
        _swap_words(dataset)
    dataset.file_meta.TransferSyntaxUID = syntax
    buffer = DicomBytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)  # save_as refuses a change of byte order
    return pydicom.dcmread(DicomBytesIO(buffer.getvalue()))


def _swap_words(dataset) -> None:
    """Reverse the byte order of every OW, OF, OL, OD and OV value of ``dataset``, in sequences too."""
    import numpy as np

    for element in dataset.iterall():
        if element.VR == "UN":  # its words' size is unknown, so its byte order cannot be changed
            raise DeliveryError(f"cannot convert instance {uid_digest(dataset.SOPInstanceUID)} to another byte order: "
                                f"{element.tag} has VR UN")
        if element.VR in _WORD_BYTES and element.value:
            element.value = np.frombuffer(element.value, f"u{_WORD_BYTES[element.VR]}").byteswap().tobytes()


_CONTEXT_RESULTS = {0x01: "rejected by the user", 0x02: "rejected, no reason given",
                    0x03: "abstract syntax not supported", 0x04: "transfer syntax not supported"}
"""A rejected presentation context's Result/Reason (PS3.8 Table 9-18)."""


def _chosen_syntaxes(assoc, datasets, called_aet: str) -> list[UID]:
    """The transfer syntax each dataset goes in (``_accepted_syntax``); empty where no association was negotiated.

    Raises a retried DeliveryError, logged as an error, where the peer accepted none of the contexts proposed for a
    dataset (pynetdicom's ``send_c_store`` would raise ValueError, and sending the rest would hide it).

    Not permanent, whatever the reason: the peer refuses the SOP class or the syntax, not this payload, and one change
    to its configuration (Comprehensive SR added, Implicit VR Little Endian only) mends every result waiting, where a
    refusal would send each to ``refused/``, which retention empties.
    """
    if not (assoc.accepted_contexts or assoc.rejected_contexts):
        return []  # no association was negotiated: nothing is known about the SOP classes
    chosen = []
    for dataset in datasets:
        syntax = _accepted_syntax(assoc, dataset)
        if syntax is None:
            message = _not_accepted(assoc, dataset, called_aet)
            logger.error("%s", message)
            raise DeliveryError(message)
        chosen.append(syntax)
    return chosen


def _not_accepted(assoc, dataset, called_aet: str) -> str:
    """Why the peer took none of the contexts proposed for ``dataset``: its SOP class, the syntaxes, the peer's reason."""
    sop_class = dataset.SOPClassUID
    results = sorted({_CONTEXT_RESULTS.get(context.result, f"result 0x{context.result:02X}")
                      for context in assoc.rejected_contexts if context.abstract_syntax == sop_class})
    proposed = ", ".join(uid.name for uid in _proposed_syntaxes(dataset.file_meta.TransferSyntaxUID))
    return (f"{called_aet} does not accept {sop_class.name} ({sop_class}) in {proposed}: "
            f"{', '.join(results) or 'not accepted'} at association; retried until {called_aet}'s configuration accepts it")


def echo(host: str, port: int, called_aet: str, calling_aet: str = "ECHOSCU") -> bool:
    """C-ECHO a peer: True when it answers Success."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=called_aet)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return getattr(status, "Status", None) == _SUCCESS
    finally:
        assoc.release()
