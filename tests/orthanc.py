"""A real Orthanc with the DICOMweb plugin on free loopback ports, for the integration tests.

Started from the Debian binary with a generated JSON configuration and its own storage folder
(never the system service). Tests skip with the reason when the binary or plugin is absent.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

ORTHANC_BINARY = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def require_orthanc() -> None:
    if not Path(ORTHANC_BINARY).is_file():
        pytest.skip("Orthanc binary not found: apt-get install orthanc orthanc-dicomweb")
    if not DICOMWEB_PLUGIN.is_file():
        pytest.skip(f"Orthanc DICOMweb plugin not found at {DICOMWEB_PLUGIN}: apt-get install orthanc-dicomweb")


class Orthanc:
    """One Orthanc process; ``stop`` and ``start`` keep its ports and storage (a PACS going down and back)."""

    def __init__(self, folder: Path, aet: str = "ORTHANC"):
        self.folder, self.aet = folder, aet
        self.http_port, self.dicom_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb = f"{self.url}/dicom-web"
        config = {
            "Name": "lungdx-test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": aet,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "HttpServerEnabled": True,
            "DicomServerEnabled": True, "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "StableAge": 1,
        }
        folder.mkdir(parents=True, exist_ok=True)
        self.config = folder / "orthanc.json"
        self.config.write_text(json.dumps(config))
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 30.0) -> None:
        log = open(self.folder / "orthanc.log", "ab")  # noqa: SIM115 - lives as long as the process
        self.process = subprocess.Popen([ORTHANC_BINARY, str(self.config)], stdout=log, stderr=log)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}; see {self.folder / 'orthanc.log'}")
            try:
                if httpx.get(f"{self.url}/system", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout_s} s; see {self.folder / 'orthanc.log'}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def study_instances(self, study_uid: str) -> list[dict]:
        """Orthanc's own view of a study: one dict of main tags per instance (REST /tools/find)."""
        response = httpx.post(f"{self.url}/tools/find", json={
            "Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": True}, timeout=10)
        response.raise_for_status()
        return response.json()

    def instance_file(self, orthanc_id: str) -> bytes:
        return httpx.get(f"{self.url}/instances/{orthanc_id}/file", timeout=30).content

    def upload(self, data: bytes) -> None:
        httpx.post(f"{self.url}/instances", content=data, timeout=30).raise_for_status()
