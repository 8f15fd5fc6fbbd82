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
from lungdx.integrations.outbox import DeliveryError, http_failure, refused_for_good, truncated

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
        """STOW-RS: store PS3.10 files; raises DeliveryError when the server is down or refuses any.

        A Failed SOP Sequence (0008,1198), which a server may send with 200 or 202 (Orthanc answers a full disk so) or
        with 409, is a refusal for good only where every failed instance's Failure Reason (0008,1197) is
        (``outbox.refused_for_good``, the C-STORE statuses): a processing failure (0110) or out of resources (A7xx) is
        retried. A 409 whose body names no failed instance is decided by its status (``outbox.PERMANENT_HTTP``).
        """
        boundary = uuid.uuid4().hex
        body = b"".join(f"--{boundary}\r\nContent-Type: {_DICOM}\r\n\r\n".encode() + data + b"\r\n"
                        for data in files) + f"--{boundary}--\r\n".encode()
        headers = {"Content-Type": f'multipart/related; type="{_DICOM}"; boundary={boundary}',
                   "Accept": "application/dicom+json"}
        response = self._send("POST", "/studies", content=body, headers=headers)
        where = f"STOW-RS to {self.base_url}/studies"
        if response.is_success or response.status_code == 409:  # PS3.18 10.5.3: 409 stored none, its body says why
            try:
                reasons = _failure_reasons(response)
            except ValueError as err:  # a 2xx that is not the Store Instances Response Module (a proxy's page, say)
                if response.is_success:
                    raise DeliveryError(f"{where}: HTTP {response.status_code} with an answer that is not DICOM JSON",
                                        detail=truncated(response.text)) from err
                reasons = []
            if reasons:
                codes = ", ".join("none" if code is None else f"0x{code:04X}" for code in reasons)
                raise DeliveryError(f"{where}: HTTP {response.status_code}, {len(reasons)} instance(s) not stored, "
                                    f"failure reason {codes}", permanent=all(map(refused_for_good, reasons)),
                                    detail=truncated(response.text))
        self._check(response, "POST", "/studies")

    def _request(self, method: str, path: str, missing_ok: bool = False, **kwargs) -> httpx.Response:
        response = self._send(method, path, **kwargs)
        if not (missing_ok and response.status_code == 404):
            self._check(response, method, path)
        return response

    def _send(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            # Redirects are not followed (httpx's default, said here): a 301 or 302 turns a POST into a GET.
            return httpx.request(method, self.base_url + path, timeout=self.timeout_s, follow_redirects=False, **kwargs)
        except httpx.HTTPError as err:
            raise DeliveryError(f"{self.base_url} unreachable: {type(err).__name__}: {err}") from err

    def _check(self, response: httpx.Response, method: str, path: str) -> None:
        """Raise the DeliveryError an answer other than 2xx is (``outbox.http_failure``)."""
        failure = http_failure(response, f"{method} {self.base_url}{_digested(path)}", self.base_url + path, _digested)
        if failure is not None:
            raise failure


def _failure_reasons(response: httpx.Response) -> list[int | None]:
    """The Failure Reason (0008,1197) of each item of a STOW-RS answer's Failed SOP Sequence (0008,1198), None where
    an item gives none; empty for no body or no failure. Raises ValueError for a body that is not DICOM JSON."""
    if not response.content:
        return []
    answer = response.json()
    if not isinstance(answer, dict):
        raise ValueError("not a DICOM JSON object")
    sequence = answer.get("00081198")
    items = (sequence.get("Value") if isinstance(sequence, dict) else None) or []
    return [_status(value(item, "00081197")) if isinstance(item, dict) else None for item in items]


def _status(reason) -> int | None:
    """A Failure Reason's value: US, a JSON number (PS3.18 F.2.3); a string of decimal digits read the same."""
    if isinstance(reason, int) and not isinstance(reason, bool):
        return reason
    return int(reason) if isinstance(reason, str) and reason.strip().isdigit() else None


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
