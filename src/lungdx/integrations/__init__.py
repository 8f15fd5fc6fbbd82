"""PACS and EHR integration: DICOM in (DIMSE, DICOMweb), DICOM SR and Secondary Capture out, FHIR out.

Floor 3: built on ``Predictor`` and the explanations. pynetdicom, highdicom, httpx and fhir.resources
(the ``pacs`` extra) are imported by the modules that use them, so ``import lungdx.integrations``
stays light.

Logs never carry names, patient IDs or dates: an instance is named by ``uid_digest`` of its SOP
Instance UID.
"""

from __future__ import annotations

from lungdx.io.deidentify import uid_digest

__all__ = ["uid_digest"]
