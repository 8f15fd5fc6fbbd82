"""Wiring for the command line: senders by configuration, and the listen / pacs-run entry points."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

from lungdx.integrations.outbox import Retention, RetryPolicy

logger = logging.getLogger(__name__)


def dicom_sender(by: str, *, dicomweb: str | None = None, host: str | None = None, port: int | None = None,
                 called_aet: str = "ORTHANC", calling_aet: str = "LUNGDX") -> Callable[[Path], None]:
    """A function sending one result file to the PACS, by DICOMweb STOW-RS (``stow``) or C-STORE (``cstore``)."""
    if by == "stow":
        if not dicomweb:
            raise ValueError("sending by STOW-RS needs the PACS's DICOMweb URL (--pacs)")
        from lungdx.integrations.dicomweb import DicomWebClient

        client = DicomWebClient(dicomweb)
        return lambda path: client.store([Path(path).read_bytes()])
    if by == "cstore":
        if not host or not port:
            raise ValueError("sending by C-STORE needs the PACS's host and DICOM port (--pacs-host, --pacs-port)")
        from lungdx.integrations.dimse import send_cstore

        return lambda path: send_cstore([Path(path)], host, port, called_aet, calling_aet)
    raise ValueError(f"unknown way to send results '{by}' (use stow or cstore)")


def make_processor(run: str | Path, state_dir: str | Path, sender: Callable[[Path], None], *,
                   fhir_url: str | None = None, device: str = "cpu", retry: RetryPolicy | None = None, policy=None,
                   retention: Retention | None = None, patient_system: str | None = None,
                   patient_issuer: str | None = None):
    """The ``Processor`` of a run folder (or model.pt) with its result senders.

    ``policy``: the ``lungdx.io.acceptance.AcceptancePolicy`` received instances are read through (default: the default one).
    ``patient_system``, ``patient_issuer``: the FHIR identifier system of the site's Patient IDs and the Issuer of
    Patient ID (0010,0021) that marks them (see ``Processor``).
    ``retention``: how long the outbox keeps delivered and refused results, and the state folder its FHIR copies
    and its failed and unreadable instances (default: ``Retention()``; see ``Processor``).
    """
    from lungdx.integrations.fhir import post_bundle
    from lungdx.integrations.pipeline import Processor
    from lungdx.predict import Predictor

    predictor = Predictor.from_path(run, device=device, policy=policy)
    send_fhir = partial(post_bundle, base_url=fhir_url) if fhir_url else None
    return Processor(predictor, state_dir, send_dicom=sender, send_fhir=send_fhir, retry=retry, retention=retention,
                     patient_system=patient_system, patient_issuer=patient_issuer)
