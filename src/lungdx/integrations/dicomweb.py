"""A small DICOMweb client (PS3.18): QIDO-RS to find, WADO-RS to retrieve, STOW-RS to store.

Written on httpx: the three transactions need a few requests and a multipart/related parser
(RFC 2387), less than a dependency on a full client.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Sequence

import httpx

from lungdx.integrations import uid_digest
from lungdx.integrations.outbox import PERMANENT_HTTP, DeliveryError

logger = logging.getLogger(__name__)

_DICOM = "application/dicom"
SERIES_UID, SOP_UID, SOP_CLASS, MODALITY = "0020000E", "00080018", "00080016", "00080060"
_UID = re.compile(r"[0-9]+(\.[0-9]+)+")


class DicomWebClient:
    """DICOMweb at ``base_url`` (Orthanc: ``http://host:8042/dicom-web``)."""

    def __init__(self, base_url: str, timeout_s: float = 30.0):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s

    def search_instances(self, study_uid: str, **filters: str) -> list[dict]:
        """QIDO-RS: the DICOM JSON (PS3.18 F.2) of a study's instances, filtered by attribute keyword/tag.

        An unknown study gives an empty list (servers answer it with 204 No Content, an empty array or 404).
        """
        response = self._request("GET", f"/studies/{study_uid}/instances", params=filters,
                                 headers={"Accept": "application/dicom+json"}, missing_ok=True)
        return response.json() if response.status_code != 404 and response.content else []

    def retrieve_instance(self, study_uid: str, series_uid: str, sop_uid: str) -> bytes:
        """WADO-RS: one instance as its PS3.10 file bytes."""
        response = self._request("GET", f"/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}",
                                 # transfer-syntax=* (PS3.18 8.7.3.5.2): as stored, no server-side transcoding
                                 headers={"Accept": f'multipart/related; type="{_DICOM}"; transfer-syntax=*'})
        parts = parse_multipart(response.headers.get("content-type", ""), response.content)
        if len(parts) != 1:
            raise DeliveryError(f"WADO-RS returned {len(parts)} parts for one instance")
        return parts[0]

    def store(self, files: Sequence[bytes]) -> None:
        """STOW-RS: store PS3.10 files; raises DeliveryError when the server is down or refuses any."""
        boundary = uuid.uuid4().hex
        body = b"".join(f"--{boundary}\r\nContent-Type: {_DICOM}\r\n\r\n".encode() + data + b"\r\n"
                        for data in files) + f"--{boundary}--\r\n".encode()
        headers = {"Content-Type": f'multipart/related; type="{_DICOM}"; boundary={boundary}',
                   "Accept": "application/dicom+json"}
        response = self._request("POST", "/studies", content=body, headers=headers)
        failed = response.json().get("00081198", {}).get("Value") if response.content else None
        if failed:  # Failed SOP Sequence (0008,1198), PS3.18 10.5.3
            raise DeliveryError(f"STOW-RS refused {len(failed)} instance(s)", permanent=True)

    def _request(self, method: str, path: str, missing_ok: bool = False, **kwargs) -> httpx.Response:
        try:
            response = httpx.request(method, self.base_url + path, timeout=self.timeout_s, **kwargs)
        except httpx.HTTPError as err:
            raise DeliveryError(f"{self.base_url} unreachable: {type(err).__name__}: {err}") from err
        if response.status_code >= 400 and not (missing_ok and response.status_code == 404):
            raise DeliveryError(f"{method} {self.base_url}{_digested(path)}: HTTP {response.status_code}",
                                permanent=response.status_code in PERMANENT_HTTP)
        return response


def _digested(path: str) -> str:
    """A DICOMweb path for a message: its UIDs (study, series, instance) as ``uid_digest``s, no query."""
    return "/".join(uid_digest(part) if _UID.fullmatch(part) else part for part in path.split("?")[0].split("/"))


def parse_multipart(content_type: str, body: bytes) -> list[bytes]:
    """The bodies of a multipart/related message (RFC 2387), in order."""
    params = dict(part.strip().split("=", 1) for part in content_type.split(";")[1:] if "=" in part)
    boundary = params.get("boundary", "").strip('"')
    if not boundary:
        raise DeliveryError(f"no multipart boundary in Content-Type {content_type!r}")
    delimiter = b"--" + boundary.encode()
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        head, separator, payload = chunk.partition(b"\r\n\r\n")
        if separator:
            parts.append(payload[:-2] if payload.endswith(b"\r\n") else payload)
    return parts


def value(instance: dict, tag: str) -> str | None:
    """The first value of ``tag`` (8 hex digits) in a DICOM JSON object, or None."""
    values = instance.get(tag, {}).get("Value") or [None]
    return values[0]
