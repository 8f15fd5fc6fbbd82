"""FHIR out: the Bundle is POSTed to a FHIR base URL, kept in the outbox while the server refuses it."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pydicom
import pytest

pytest.importorskip("fhir.resources", reason="the FHIR tests need the pacs extra (pip install -e '.[pacs]')")

from lungdx.integrations.fhir import make_bundle, post_bundle  # noqa: E402
from lungdx.integrations.outbox import Outbox, Retention, RetryPolicy  # noqa: E402
from lungdx.integrations.service import make_processor  # noqa: E402
from lungdx.predict import Predictor  # noqa: E402
from lungdx.wording import state_result  # noqa: E402

CHEST_DX = "nih_cxr14_dx_chest_nofinding.dcm"


TRANSACTION_RESPONSE = b'{"resourceType": "Bundle", "type": "transaction-response"}'


class FhirServer(BaseHTTPRequestHandler):
    """A FHIR base URL on loopback that records what it is sent and answers with ``status``.

    It stores the resources of each transaction it accepts (``stored``), as a FHIR server's conditional create
    does: an entry whose ``ifNoneExist`` identifier a stored resource of its type has creates nothing.
    ``commits`` makes it store them even when it answers an error: a transaction committed whose answer was lost.
    """

    status = 503
    commits = False
    location: str | None = None
    """A Location header to answer with (a redirect)."""
    answer = TRANSACTION_RESPONSE
    received: list[tuple[str, str, dict]] = []
    stored: list[dict] = []
    requests: list[tuple[str, str]] = []

    def do_GET(self):  # noqa: N802 (http.server's name): a redirected POST would come back as a GET
        FhirServer.requests.append(("GET", self.path))
        self.send_response(200)
        self.end_headers()

    def do_POST(self):  # noqa: N802
        FhirServer.requests.append(("POST", self.path))
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        accepted = 200 <= FhirServer.status < 300
        if accepted:
            FhirServer.received.append((self.path, self.headers["Content-Type"], body))
        if accepted or FhirServer.commits:
            for entry in body["entry"]:
                if not _exists(entry["resource"]["resourceType"], entry["request"].get("ifNoneExist")):
                    FhirServer.stored.append(entry["resource"])
        self.send_response(FhirServer.status)
        self.send_header("Content-Type", "application/fhir+json")
        if FhirServer.location:
            self.send_header("Location", FhirServer.location)
        self.end_headers()
        self.wfile.write(FhirServer.answer)

    def log_message(self, *args):
        pass


def _exists(resource_type: str, condition: str | None) -> bool:
    """Whether a stored resource matches an ``ifNoneExist`` of the form ``identifier=system|value``."""
    if condition is None:
        return False
    system, value = condition.removeprefix("identifier=").split("|", 1)
    identifier = {"system": system, "value": value}
    return any(resource["resourceType"] == resource_type and identifier in resource.get("identifier", [])
               for resource in FhirServer.stored)


@pytest.fixture
def fhir_url():
    FhirServer.status, FhirServer.commits, FhirServer.received, FhirServer.stored = 503, False, [], []
    FhirServer.location, FhirServer.answer, FhirServer.requests = None, TRANSACTION_RESPONSE, []
    server = HTTPServer(("127.0.0.1", 0), FhirServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/fhir"
    server.shutdown()


def test_bundle_waits_while_the_fhir_server_refuses_and_is_posted_when_it_accepts(trained_run, dicom_dir, tmp_path,
                                                                                  fhir_url):
    from fhir.resources.R4B.bundle import Bundle

    sample = tmp_path / CHEST_DX  # a copy: the Processor is never given a file of ../shared/data
    sample.write_bytes((dicom_dir / CHEST_DX).read_bytes())
    stored_dicom = []
    processor = make_processor(trained_run, tmp_path / "state", stored_dicom.append, fhir_url=fhir_url,
                               retry=RetryPolicy(base_s=0.01, max_s=0.05), patient_system="urn:oid:1.2.3.4.5")
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
    patient = str(pydicom.dcmread(sample, stop_before_pixels=True).PatientID)
    for entry in bundle.entry:  # the EHR matches the patient by system and value, not by a bare value
        assert (entry.resource.subject.identifier.system, entry.resource.subject.identifier.value) == (
            "urn:oid:1.2.3.4.5", patient)
    assert len(stored_dicom) == 2  # the SR and the secondary capture went their own way


def test_a_patient_without_an_identifier_system_is_said_once(trained_run, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="lungdx.integrations.pipeline"):
        make_processor(trained_run, tmp_path / "a", lambda path: None, fhir_url="http://127.0.0.1:9/fhir")
        make_processor(trained_run, tmp_path / "b", lambda path: None)  # no FHIR: nothing to say
    warnings = [record.getMessage() for record in caplog.records if "--fhir-patient-system" in record.getMessage()]
    assert len(warnings) == 1
    with caplog.at_level("WARNING", logger="lungdx.integrations.pipeline"):
        make_processor(trained_run, tmp_path / "c", lambda path: None, retention=Retention(sent_days=0))
    assert "no FHIR Bundle is written anywhere" in caplog.text
    statement = state_result(0.7, {"threshold": 0.5, "threshold_method": "youden", "class_names": ["a", "b"]})
    identity = {"name": "n", "model": "m", "version": "0123456789ab", "software_version": "t", "task": "nodule_vs_normal"}
    bare = make_bundle(statement, identity, "1.2.3", "PID4711", instance_uid="1.2.3.4")
    assert all(entry["resource"]["subject"]["identifier"] == {"value": "PID4711"} for entry in bare["entry"])


def test_a_bundle_delivered_again_stores_one_report(fhir_url, tmp_path):
    """A transaction committed whose answer was lost is posted again by the outbox, and an instance analysed again
    (a crash before it was marked done) gives a second Bundle: the server keeps one report per instance."""
    identity = {"name": "lungdx nodule_net", "model": "nodule_net", "version": "0123456789ab",
                "software_version": "test", "task": "nodule_vs_normal"}
    statement = state_result(0.7, {"threshold": 0.5, "threshold_method": "youden", "class_names": ["a", "b"]})
    outbox = Outbox(tmp_path, RetryPolicy(base_s=0.0, max_s=0.0))
    senders = {"fhir": lambda path: post_bundle(path, fhir_url)}
    FhirServer.status, FhirServer.commits = 504, True  # a gateway's timeout after the server committed
    bundle = make_bundle(statement, identity, "1.2.3", "PID4711", instance_uid="1.2.3.4")
    outbox.put("fhir", json.dumps(bundle).encode(), ".json", "first")
    assert outbox.deliver(senders) == 0 and len(FhirServer.stored) == 2
    FhirServer.status = 200
    assert outbox.deliver(senders) == 1
    for instance_uid in ("1.2.3.4", "1.2.3.5"):  # the first instance analysed again, then another one
        bundle = make_bundle(statement, identity, "1.2.3", "PID4711", instance_uid=instance_uid)
        outbox.put("fhir", json.dumps(bundle).encode(), ".json", instance_uid)
    assert outbox.deliver(senders) == 2
    stored = sorted(resource["resourceType"] for resource in FhirServer.stored)
    assert stored == ["DiagnosticReport", "DiagnosticReport", "Observation", "Observation"]  # one each per instance


def _bundle(instance_uid: str = "1.2.3.4") -> bytes:
    identity = {"name": "lungdx nodule_net", "model": "nodule_net", "version": "0123456789ab",
                "software_version": "test", "task": "nodule_vs_normal"}
    statement = state_result(0.7, {"threshold": 0.5, "threshold_method": "youden", "class_names": ["a", "b"]})
    return json.dumps(make_bundle(statement, identity, "1.2.3", "PID4711", instance_uid=instance_uid)).encode()


OUTCOME = (b'{"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "processing", '
           b'"diagnostics": "Patient PID4711 not found"}]}')


def test_a_bundle_the_server_refuses_for_what_it_is_goes_to_refused_and_the_rest_goes_on(fhir_url, tmp_path, caplog):
    """An HTTP 422 answers the payload itself: it was retried every 5 minutes for ever. A 503 and a 413 (a proxy's
    body size limit: every Bundle would be refused) are retried. The server's OperationOutcome is kept in the refused
    item's state.json (truncated), never in the log: it may quote the patient."""
    outbox = Outbox(tmp_path, RetryPolicy(base_s=0.0, max_s=0.0))
    senders = {"fhir": lambda path: post_bundle(path, fhir_url)}
    outbox.put("fhir", _bundle(), ".json", "down")
    assert outbox.deliver(senders) == 0 and [item.label for item in outbox.pending()] == ["down"]  # 503: waits
    FhirServer.status = 413
    assert outbox.deliver(senders) == 0 and [item.label for item in outbox.pending()] == ["down"]  # 413: waits
    FhirServer.status, FhirServer.answer = 422, OUTCOME + b" " * 3000
    outbox.put("fhir", _bundle("1.2.3.5"), ".json", "behind")
    with caplog.at_level("INFO", logger="lungdx"):
        assert outbox.deliver(senders) == 0
    assert outbox.pending() == [] and "refused for good" in caplog.text and "PID4711" not in caplog.text
    kept = {json.loads((item / "state.json").read_text())["label"]: item for item in (tmp_path / "refused").iterdir()}
    assert sorted(kept) == ["behind", "down"], "the item behind the refused one was not tried"
    state = json.loads((kept["down"] / "state.json").read_text())
    assert state["attempts"] == 3 and state["last_error"].endswith("HTTP 422") and (kept["down"] / "payload.json").is_file()
    assert state["detail"].startswith(OUTCOME.decode()) and state["detail"].endswith("characters, cut)")
    assert len(state["detail"]) < 2100


def test_a_redirect_is_not_followed_and_the_bundle_waits_naming_where_it_points(fhir_url, tmp_path, caplog):
    """httpx follows no redirect: a 301 (http to https, say) counted as delivered and the Bundle went to sent/ while
    nothing arrived. It waits, and the message names the new place (no query string) to configure instead."""
    outbox = Outbox(tmp_path, RetryPolicy(base_s=0.0, max_s=0.0))
    senders = {"fhir": lambda path: post_bundle(path, fhir_url)}
    FhirServer.status, FhirServer.location = 301, "https://ehr.example.org/fhir?_token=s3cret"
    outbox.put("fhir", _bundle(), ".json", "moved")
    with caplog.at_level("WARNING", logger="lungdx"):
        assert outbox.deliver(senders) == 0
    [item] = outbox.pending()
    error = json.loads((item.folder / "state.json").read_text())["last_error"]
    assert "HTTP 301, redirected to https://ehr.example.org/fhir: configure the final URL" in error
    assert "s3cret" not in error + caplog.text
    assert FhirServer.requests == [("POST", "/fhir")] and not list((tmp_path / "sent").iterdir())



def test_the_site_system_goes_only_to_the_sites_own_patient_ids():
    # A study imported from another hospital keeps its Patient ID under its own Issuer of Patient ID (0010,0021):
    # under the site's system it could match another patient in the EHR.
    from pydicom.dataset import Dataset

    from lungdx.integrations.pipeline import site_patient_system

    def source(issuer=None):
        dataset = Dataset()
        dataset.PatientID = "12345"
        if issuer is not None:
            dataset.IssuerOfPatientID = issuer
        return dataset

    site = "urn:oid:1.2.3.4.5"
    assert site_patient_system(source(), site, None) == site
    assert site_patient_system(source("HOSP_B"), site, None) is None
    assert site_patient_system(source("HOSP_A"), site, "HOSP_A") == site
    assert site_patient_system(source(" HOSP_A "), site, "HOSP_A") == site  # padding is not another issuer
    assert site_patient_system(source("HOSP_B"), site, "HOSP_A") is None
    assert site_patient_system(source(), None, "HOSP_A") is None


def test_a_foreign_issuer_is_said_once_per_processor_naming_neither_issuer_nor_patient(trained_run, dicom_dir, tmp_path,
                                                                                         caplog):
    """A backlog of imported studies logged one line per instance; the log says it once, with no header value, and
    each Bundle still goes without the site's system."""
    from pydicom.uid import generate_uid

    processor = make_processor(trained_run, tmp_path / "state", lambda path: None, patient_system="urn:oid:1.2.3.4.5",
                               patient_issuer="HOSP_A")
    source = pydicom.dcmread(dicom_dir / CHEST_DX)
    source.IssuerOfPatientID = "HOSP_B"
    for name in ("first", "second"):
        source.SOPInstanceUID = source.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        source.save_as(processor.inbox / f"{name}.dcm")
    with caplog.at_level("INFO", logger="lungdx"):
        assert processor.process_inbox() == 2
    said = [record for record in caplog.records if "Issuer of Patient ID" in record.getMessage()]
    assert len(said) == 1 and said[0].levelname == "INFO"
    assert "HOSP_B" not in caplog.text and str(source.PatientID) not in caplog.text
    bundles = [json.loads(path.read_text()) for path in (tmp_path / "state" / "fhir").glob("*.json")]
    assert len(bundles) == 2
    for entry in (entry for bundle in bundles for entry in bundle["entry"]):
        assert entry["resource"]["subject"]["identifier"] == {"value": str(source.PatientID)}


@pytest.mark.parametrize("system", ["my mrn system", "https://x y", "mrn"])
def test_a_patient_system_that_is_no_uri_is_refused_at_the_command_line(system, capsys):
    from lungdx.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["listen", "run", "--fhir-patient-system", system])
    assert exit_info.value.code == 2 and "expected an absolute URI" in capsys.readouterr().err
