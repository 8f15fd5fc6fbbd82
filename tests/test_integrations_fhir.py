"""FHIR out: the Bundle is POSTed to a FHIR base URL, kept in the outbox while the server refuses it."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

pytest.importorskip("fhir.resources", reason="the FHIR tests need the pacs extra (pip install -e '.[pacs]')")

from lungdx.integrations.outbox import RetryPolicy  # noqa: E402
from lungdx.integrations.service import make_processor  # noqa: E402
from lungdx.predict import Predictor  # noqa: E402

CHEST_DX = "nih_cxr14_dx_chest_nofinding.dcm"


class FhirServer(BaseHTTPRequestHandler):
    """A FHIR base URL on loopback that records what it is sent and answers with ``status``."""

    status = 503
    received: list[tuple[str, str, dict]] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if FhirServer.status < 400:
            FhirServer.received.append((self.path, self.headers["Content-Type"], body))
        self.send_response(FhirServer.status)
        self.send_header("Content-Type", "application/fhir+json")
        self.end_headers()
        self.wfile.write(b'{"resourceType": "Bundle", "type": "transaction-response"}')

    def log_message(self, *args):
        pass


@pytest.fixture
def fhir_url():
    FhirServer.status, FhirServer.received = 503, []
    server = HTTPServer(("127.0.0.1", 0), FhirServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/fhir"
    server.shutdown()


def test_bundle_waits_while_the_fhir_server_refuses_and_is_posted_when_it_accepts(trained_run, dicom_dir, tmp_path,
                                                                                  fhir_url):
    from fhir.resources.R4B.bundle import Bundle

    sample = dicom_dir / CHEST_DX
    stored_dicom = []
    processor = make_processor(trained_run, tmp_path / "state", stored_dicom.append, fhir_url=fhir_url,
                               retry=RetryPolicy(base_s=0.01, max_s=0.05))
    assert processor.process(sample) is not None
    processor.deliver()
    assert FhirServer.received == [] and [item.kind for item in processor.outbox.pending()] == ["fhir"]
    FhirServer.status = 200
    time.sleep(0.1)  # past the backoff
    assert processor.deliver() == 1 and processor.outbox.pending() == []
    (path, content_type, body), = FhirServer.received
    assert path == "/fhir" and content_type == "application/fhir+json"
    bundle = Bundle.model_validate(body)
    observation = next(entry.resource for entry in bundle.entry if entry.resource.get_resource_type() == "Observation")
    expected = Predictor.from_path(trained_run, device="cpu").predict_files([sample])[0].probability
    assert float(observation.valueQuantity.value) == pytest.approx(expected, rel=1e-9)
    assert len(stored_dicom) == 2  # the SR and the secondary capture went their own way
