"""FHIR out: a ``DiagnosticReport`` with its ``Observation`` (probability, label, model, study), as JSON.

Validated with fhir.resources. fhir.resources 8 ships FHIR R5 (default), R4B (4.3.0) and STU3
models, no R4 (4.0.1); R4B is used: ``DiagnosticReport``, ``Observation`` and ``Bundle`` did not
change between R4 and R4B (R4B only touched medication-definition, evidence and subscription
resources), so a resource valid here is valid R4 and every element written exists in R4.

The two resources travel in a ``transaction`` Bundle, the usual way to POST related resources to
a FHIR base URL: the report refers to the observation by its ``urn:uuid`` full URL. Each has an
identifier derived from the source instance and the model version (``results.result_uid``, as the
SR's UID is) and is created only if none has it (``ifNoneExist``, FHIR conditional create), so a
Bundle delivered twice (an answer lost after the server committed, a crash before the outbox marked
it sent, the same instance analysed again) stores one report.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx

from lungdx.integrations.outbox import DeliveryError, http_failure
from lungdx.integrations.results import result_uid, task_concepts
from lungdx.wording import ResultStatement

_LOINC_RADIOLOGY = {"system": "http://loinc.org", "code": "18748-4", "display": "Diagnostic imaging study"}
_DICOM_UID = "urn:dicom:uid"
_URI = "urn:ietf:rfc:3986"
"""FHIR's identifier system for a value that is a URI: lungdx's own UIDs, as ``urn:oid:``, are not DICOM objects'."""
_UCUM = "http://unitsofmeasure.org"
_PRIVATE_SYSTEM = "urn:lungdx:codes"
"""The FHIR system of the SR's private coding scheme 99LUNGDX (concepts with no standard code)."""


def make_bundle(statement: ResultStatement, identity: dict, study_uid: str, patient_id: str | None = None, *,
                instance_uid: str, patient_system: str | None = None) -> dict:
    """A transaction Bundle (dict) holding the Observation and the DiagnosticReport, validated as FHIR.

    The statement (``lungdx.wording``) gives the report's conclusion word for word (decision, threshold and
    how it was chosen, near-threshold uncertainty, active alerts, not for clinical use); the Observation
    carries the probability, the threshold and its bootstrap band as components, the decision as its
    interpretation and the disclaimer as a note.

    Args:
        statement: ``wording.state_result`` of the prediction.
        identity: ``checkpoint.model_identity`` of the model.
        study_uid: the Study Instance UID (0020,000D): the ImagingStudy is referred to by identifier.
        patient_id: Patient ID (0010,0020) for ``subject``, when the EHR is to link the result.
        patient_system: the FHIR identifier system (a URI) of the site's Patient IDs, which an EHR needs to match
            the subject to its patient (FHIR R4 Identifier.system); None gives the value alone.
        instance_uid: the analysed instance's SOP Instance UID (0008,0018): with the model version, it gives the
            resources' identifiers, the same for every Bundle of this result.
    """
    now = datetime.now(UTC).isoformat(timespec="seconds")
    observation_url, report_url = f"urn:uuid:{uuid.uuid4()}", f"urn:uuid:{uuid.uuid4()}"
    study = {"type": "ImagingStudy", "identifier": {"system": _DICOM_UID, "value": f"urn:oid:{study_uid}"}}
    system = {"system": patient_system} if patient_system else {}
    subject = {"subject": {"identifier": {**system, "value": patient_id}}} if patient_id else {}
    device = f"{identity['name']} version {identity['version']} (lungdx {identity['software_version']})"
    observation_id, report_id = (_identifier(result_uid(instance_uid, identity["version"], role))
                                 for role in ("fhir_observation", "fhir_report"))
    observation = {
        "resourceType": "Observation", "identifier": [observation_id], "status": "preliminary", **subject,
        "issued": now,
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "imaging"}]}],
        "code": _probability_code(identity["task"]),
        "valueQuantity": _unitless(statement.probability),
        "method": {"text": device},
        "device": {"display": device, "identifier": {"system": "urn:lungdx:model-version",
                                                     "value": identity["version"]}},
        "derivedFrom": [study],
        "note": [{"text": f"Computed by an AI model; not a diagnosis. {statement.disclaimer}"},
                 *({"text": f"Monitoring alert: {alert}"} for alert in statement.alerts)],
    }
    if statement.threshold is not None:
        observation["interpretation"] = [{"text": statement.headline}]
        observation["component"] = [_quantity("operating threshold", statement.threshold)]
        if statement.band is not None:
            observation["component"].append({"code": {"text": "operating threshold, 95% bootstrap interval on validation"},
                                             "valueRange": {"low": _unitless(statement.band[0]),
                                                            "high": _unitless(statement.band[1])}})
    report = {
        "resourceType": "DiagnosticReport", "identifier": [report_id], "status": "preliminary", **subject,
        "issued": now,
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD"}]}],
        "code": {"coding": [_LOINC_RADIOLOGY], "text": "lungdx chest radiograph lung nodule analysis"},
        "result": [{"reference": observation_url}], "imagingStudy": [study],
        "conclusion": " ".join([*statement.sentences[:-1], f"Model: {device}.", statement.disclaimer]),
    }
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": observation_url, "resource": observation, "request": _create_once("Observation", observation_id)},
        {"fullUrl": report_url, "resource": report, "request": _create_once("DiagnosticReport", report_id)}]}
    validate(bundle)
    return bundle


def _identifier(uid: str) -> dict:
    return {"system": _URI, "value": f"urn:oid:{uid}"}


def _create_once(resource_type: str, identifier: dict) -> dict:
    """A transaction entry's request: create unless a resource has ``identifier`` (FHIR R4 conditional create,
    http.html#ccreate). Where one has, the entry's full URL stands for that one, so the report still refers to it."""
    return {"method": "POST", "url": resource_type,
            "ifNoneExist": f"identifier={identifier['system']}|{identifier['value']}"}


def _probability_code(task: str) -> dict:
    """The Observation's code: what the probability means for the model's task (``results.task_concepts``)."""
    concepts = task_concepts(task)
    code, scheme, meaning = concepts["probability"]
    system = "http://dicom.nema.org/resources/ontology/DCM" if scheme == "DCM" else _PRIVATE_SYSTEM
    return {"coding": [{"system": system, "code": code, "display": meaning}], "text": concepts["text"]}


def _unitless(value: float) -> dict:
    return {"value": float(value), "unit": "1", "system": _UCUM, "code": "1"}


def _quantity(text: str, value: float) -> dict:
    return {"code": {"text": text}, "valueQuantity": _unitless(value)}


def validate(bundle: dict) -> None:
    """Validate a Bundle and each resource in it with fhir.resources' R4B models (raises ValueError)."""
    from fhir.resources.R4B.bundle import Bundle
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport
    from fhir.resources.R4B.observation import Observation

    models = {"Observation": Observation, "DiagnosticReport": DiagnosticReport}
    Bundle.model_validate(bundle)  # pydantic's ValidationError is a ValueError
    for entry in bundle.get("entry", []):
        models[entry["resource"]["resourceType"]].model_validate(entry["resource"])


def post_bundle(path, base_url: str, timeout_s: float = 30.0) -> None:
    """POST a Bundle JSON file to a FHIR server's base URL; raises DeliveryError on failure.

    Only a 2xx delivers it. A redirect is not followed (a 301 or 302 turns the POST into a GET) and is retried, naming
    where it points; a refusal keeps the server's answer (an OperationOutcome, truncated) as the error's ``detail``.
    A 409 stays a refusal for good (``outbox.PERMANENT_HTTP``): a conflict of this Bundle's conditional creates.
    """
    body = json.loads(Path(path).read_text(encoding="utf-8"))
    url = base_url.rstrip("/")
    try:
        response = httpx.post(url, json=body, timeout=timeout_s, follow_redirects=False,
                              headers={"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"})
    except httpx.HTTPError as err:
        raise DeliveryError(f"FHIR server {base_url} unreachable: {type(err).__name__}") from err
    failure = http_failure(response, f"FHIR bundle to {base_url}", url)
    if failure is not None:
        raise failure
