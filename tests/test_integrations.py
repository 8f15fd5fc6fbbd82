"""PACS integration against a real Orthanc (DICOMweb plugin) and a real modality (dcmtk's storescu).

Skipped with the reason where Orthanc, its DICOMweb plugin, storescu or the DICOM samples are absent.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pydicom
import pytest
from orthanc import Orthanc, free_port, require_orthanc

from lungdx.integrations import uid_digest

pytest.importorskip("pynetdicom", reason="the pacs extra (pynetdicom) is not installed")
pytest.importorskip("highdicom", reason="the pacs extra (highdicom) is not installed")

CHEST = "nema_wg04_RG1_J2KI_cr_chest_pa.dcm"
CHEST_DX = "nih_cxr14_dx_chest_nofinding.dcm"
NOT_CHEST = ("nema_wg04_RG3_J2KR_cr_tibia.dcm", "dicomlibrary_ot_abdomen.dcm")
STORESCU = Path("/usr/bin/storescu")


def _sample(dicom_dir: Path, name: str) -> Path:
    rows = {line.split(",")[0]: line for line in (dicom_dir / "files.csv").read_text().splitlines()[1:]}
    if name not in rows or not (dicom_dir / name).is_file():
        pytest.skip(f"DICOM sample {name} not in ../shared/data/dicom_samples")
    return dicom_dir / name


def _storescu(path: Path, port: int, aet: str = "LUNGDX") -> None:
    if not STORESCU.is_file():
        pytest.skip("dcmtk's storescu not found: apt-get install dcmtk")
    # storescu proposes uncompressed syntaxes unless told the file's own (it does not decode JPEG 2000).
    syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    propose = {"1.2.840.10008.1.2.4.90": ["-xv"], "1.2.840.10008.1.2.4.91": ["-xw"]}.get(str(syntax), [])
    command = [str(STORESCU), *propose, "-aet", "MODALITY", "-aec", aet, "127.0.0.1", str(port), str(path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"storescu failed: {done.stderr}"


def _wait(condition, timeout_s: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def _results_in(orthanc: Orthanc, study_uid: str) -> dict[str, list[dict]]:
    """lungdx's instances in Orthanc's copy of a study, by modality (SR, OT for the secondary capture)."""
    found: dict[str, list[dict]] = {}
    for instance in orthanc.study_instances(study_uid):
        files = orthanc.instance_file(instance["ID"])
        dataset = pydicom.dcmread(pydicom.filebase.DicomBytesIO(files))
        if dataset.get("Manufacturer") == "lungdx":
            found.setdefault(str(dataset.SOPClassUID.name), []).append(dataset)
    return found


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    require_orthanc()
    server = Orthanc(tmp_path_factory.mktemp("orthanc"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def predictor(trained_run):
    from lungdx.predict import Predictor

    return Predictor.from_path(trained_run, device="cpu")


def _processor(predictor, state: Path, orthanc: Orthanc, by: str = "stow"):
    from lungdx.integrations.outbox import RetryPolicy
    from lungdx.integrations.pipeline import Processor
    from lungdx.integrations.service import dicom_sender

    sender = dicom_sender(by, dicomweb=orthanc.dicomweb, host="127.0.0.1", port=orthanc.dicom_port,
                          called_aet=orthanc.aet)
    return Processor(predictor, state, send_dicom=sender, retry=RetryPolicy(base_s=0.5, max_s=2.0))


@pytest.fixture(scope="module")
def node(predictor, orthanc, tmp_path_factory):
    from lungdx.integrations.pipeline import Node

    state = tmp_path_factory.mktemp("node")
    running = Node(_processor(predictor, state, orthanc), aet="LUNGDX", host="127.0.0.1", port=free_port(),
                   poll_s=0.3)
    running.start()
    yield running
    running.stop()


def test_non_chest_instances_are_skipped_and_the_node_keeps_working(node, dicom_dir, caplog):
    from lungdx.integrations import uid_digest
    from lungdx.integrations.dimse import echo

    caplog.set_level("INFO", logger="lungdx")
    events = node.processor.state_dir / "events.jsonl"
    for name in NOT_CHEST:
        _storescu(_sample(dicom_dir, name), node.listener.port)
    digests = {uid_digest(pydicom.dcmread(_sample(dicom_dir, n), stop_before_pixels=True).SOPInstanceUID)
               for n in NOT_CHEST}

    def skipped():
        lines = [json.loads(line) for line in events.read_text().splitlines()] if events.exists() else []
        found = [event for event in lines if event["instance"] in digests and event["status"] == "skipped"]
        return found if len(found) == len(digests) else None

    lines = _wait(skipped, what="both skip events")
    reasons = {event["reason"] for event in lines if event["status"] == "skipped"}
    assert any("EXTREMITY (0018,0015) is not CHEST" in reason for reason in reasons), reasons
    assert any("modality OT (0008,0060) is not CR or DX" in reason for reason in reasons), reasons
    assert "skipped instance" in caplog.text
    assert echo("127.0.0.1", node.listener.port, "LUNGDX"), "the node stopped answering C-ECHO"
    assert not node.processor.outbox.pending(), "a skipped instance produced results"


def test_storescu_to_listener_puts_sr_and_heatmap_into_the_study(node, orthanc, predictor, dicom_dir, tmp_path):
    from lungdx.integrations.results import NOT_FOR_DIAGNOSIS, read_sr_probability

    path = _sample(dicom_dir, CHEST)
    source = pydicom.dcmread(path, stop_before_pixels=True)
    _storescu(path, node.listener.port)
    found = _wait(lambda: (lambda r: r if {"Comprehensive SR Storage", "Secondary Capture Image Storage"} <= r.keys()
                           else None)(_results_in(orthanc, source.StudyInstanceUID)), what="SR and SC in Orthanc")
    sr, capture = found["Comprehensive SR Storage"][0], found["Secondary Capture Image Storage"][0]
    for result in (sr, capture):
        assert result.StudyInstanceUID == source.StudyInstanceUID
        assert result.SeriesInstanceUID != source.SeriesInstanceUID
        assert result.SOPInstanceUID != source.SOPInstanceUID
    assert sr.SeriesInstanceUID != capture.SeriesInstanceUID
    expected = predictor.predict_files([path])[0].probability
    assert read_sr_probability(sr) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert NOT_FOR_DIAGNOSIS in capture.ImageComments and capture.BurnedInAnnotation == "YES"
    _check_structure(sr, tmp_path)
    assert _dciodvfy_errors(capture, tmp_path / "sc.dcm") == []


def _check_structure(sr, tmp_path: Path) -> None:
    import highdicom as hd

    report = hd.sr.ComprehensiveSR.from_dataset(sr, copy=True)
    groups = report.content.get_image_measurement_groups()
    assert len(groups) == 1 and groups[0].finding_type.value == "786838002"
    assert {item.name.meaning for item in groups[0].get_qualitative_evaluations()} == {
        "Likelihood of malignancy", "Probability near the operating threshold"}
    assert {item.name.meaning for item in groups[0].get_measurements()} == {"Probability of cancer", "Operating threshold"}
    texts = dict(_text_items(sr))  # TID 4019 Algorithm Identification, as IHE AIR asks
    assert texts["Algorithm Name"].startswith("lungdx ") and len(texts["Algorithm Version"]) == 12
    comments = [text for name, text in _text_items(sr) if name == "Comment"]  # the wording.state_result sentences
    assert any(text.startswith("Decision threshold ") for text in comments)
    assert comments[-1].startswith("Not for clinical use.")
    assert _dciodvfy_errors(sr, tmp_path / "sr.dcm") == []


def _dciodvfy_errors(dataset, file: Path) -> list[str]:
    """dicom3tools' IOD check of a dataset: its error lines. Called last in a test: where dciodvfy is not installed
    the test's other checks have run and it is reported as skipped, not as passed."""
    if not shutil.which("dciodvfy"):
        pytest.skip("dciodvfy (dicom3tools) is not installed: the DICOM IOD check was not made "
                    "(apt-get install dicom3tools; .ci/run installs it)")
    dataset.save_as(file, enforce_file_format=True)
    checked = subprocess.run(["dciodvfy", str(file)], capture_output=True, text=True, timeout=60)
    return [line for line in (checked.stdout + checked.stderr).splitlines() if line.startswith("Error")]


def _text_items(dataset):
    for item in dataset.get("ContentSequence", []):
        if item.ValueType == "TEXT":
            yield item.ConceptNameCodeSequence[0].CodeMeaning, item.TextValue
        yield from _text_items(item)


def test_results_wait_in_the_outbox_while_the_pacs_is_down(predictor, orthanc, dicom_dir, tmp_path):
    from lungdx.integrations.pipeline import Node

    path = _sample(dicom_dir, CHEST_DX)
    study_uid = pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID
    orthanc.stop()
    try:
        first = Node(_processor(predictor, tmp_path, orthanc), host="127.0.0.1", port=free_port(), poll_s=0.3)
        first.start()
        _storescu(path, first.listener.port)
        _wait(lambda: any(item.attempts >= 1 for item in first.processor.outbox.pending()), what="a failed attempt")
        first.stop()  # the listener restarts while the PACS is still down
        assert len(first.processor.outbox.pending()) == 2
    finally:
        orthanc.start()
    second = Node(_processor(predictor, tmp_path, orthanc), host="127.0.0.1", port=free_port(), poll_s=0.3)
    second.start()
    try:
        _wait(lambda: not second.processor.outbox.pending(), what="delivery after the restart")
    finally:
        second.stop()
    assert "Comprehensive SR Storage" in _results_in(orthanc, study_uid)


def test_pacs_run_pulls_by_dicomweb_and_pushes_back_by_cstore(predictor, orthanc, dicom_dir, tmp_path):
    from lungdx.integrations.dicomweb import DicomWebClient
    from lungdx.integrations.fhir import validate
    from lungdx.integrations.pipeline import pacs_run
    from lungdx.integrations.results import read_sr_probability

    path = _new_study_copy(_sample(dicom_dir, CHEST), tmp_path / "copy.dcm")
    study_uid = pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID
    orthanc.upload(path.read_bytes())
    processor = _processor(predictor, tmp_path, orthanc, by="cstore")
    run = pacs_run(processor, DicomWebClient(orthanc.dicomweb), study_uid)
    assert len(run.analysed) == 1 and run.already == 0
    assert processor.deliver() == 2 and not processor.outbox.pending()
    srs = _results_in(orthanc, study_uid)["Comprehensive SR Storage"]
    assert len(srs) == 1
    results = run.analysed
    assert read_sr_probability(srs[-1]) == pytest.approx(predictor.predict_files([path])[0].probability, rel=1e-9)
    bundle = json.loads(next((tmp_path / "fhir").glob("*.json")).read_text())
    validate(bundle)
    observation = bundle["entry"][0]["resource"]
    assert observation["valueQuantity"]["value"] == pytest.approx(results[0].prediction.probability)
    assert observation["derivedFrom"][0]["identifier"]["value"] == f"urn:oid:{study_uid}"


def _new_study_copy(path: Path, out: Path) -> Path:
    """A temporary copy of a sample in a study of its own (new study, series and instance UIDs)."""
    from pydicom.uid import generate_uid

    dataset = pydicom.dcmread(path)
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = generate_uid(), generate_uid()
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset.save_as(out)
    return out


def test_pacs_run_delivers_each_result_once(predictor, orthanc, dicom_dir, tmp_path):
    from lungdx.integrations.dicomweb import DicomWebClient
    from lungdx.integrations.pipeline import NothingToAnalyse, pacs_run

    path = _new_study_copy(_sample(dicom_dir, CHEST_DX), tmp_path / "copy.dcm")
    study_uid = pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID
    orthanc.upload(path.read_bytes())
    client = DicomWebClient(orthanc.dicomweb)
    processor = _processor(predictor, tmp_path / "state", orthanc)
    assert len(pacs_run(processor, client, study_uid).analysed) == 1 and processor.deliver() == 2
    counts = {kind: len(found) for kind, found in _results_in(orthanc, study_uid).items()}
    assert counts == {"Comprehensive SR Storage": 1, "Secondary Capture Image Storage": 1}
    # again with the same state folder (the local record), then with a fresh one (the PACS itself says so)
    for state in (tmp_path / "state", tmp_path / "other-state"):
        again = _processor(predictor, state, orthanc)
        run = pacs_run(again, client, study_uid)
        assert not run.analysed and run.already == 1 and again.deliver() == 0
    assert {kind: len(found) for kind, found in _results_in(orthanc, study_uid).items()} == counts
    with pytest.raises(NothingToAnalyse, match="is not in the PACS"):
        pacs_run(processor, client, "1.2.826.0.1.3680043.8.498.1")
    tibia = _new_study_copy(_sample(dicom_dir, NOT_CHEST[0]), tmp_path / "tibia.dcm")
    orthanc.upload(tibia.read_bytes())
    with pytest.raises(NothingToAnalyse, match="holds no chest radiograph lungdx analyses: .*EXTREMITY"):
        pacs_run(processor, client, str(pydicom.dcmread(tibia, stop_before_pixels=True).StudyInstanceUID))


def test_pacs_run_command_exits_non_zero_on_a_missing_study(trained_run, orthanc, dicom_dir, tmp_path, capsys):
    # ... and still delivers what an earlier run left waiting (it returned before delivering and pruning).
    from lungdx.cli import main
    from lungdx.integrations.outbox import Outbox

    waiting = _new_study_copy(_sample(dicom_dir, CHEST_DX), tmp_path / "waiting.dcm")
    Outbox(tmp_path / "state" / "outbox").put("dicom", waiting.read_bytes(), ".dcm", "left by an earlier run")
    code = main(["pacs-run", str(trained_run), "--study", "1.2.826.0.1.3680043.8.498.2", "--pacs", orthanc.dicomweb,
                 "--state", str(tmp_path / "state")])
    said = capsys.readouterr().err
    assert code == 1 and "is not in the PACS" in said and "delivered 1 earlier result(s), 0 waiting" in said
    assert not list((tmp_path / "state" / "outbox" / "pending").iterdir())
    assert len(orthanc.study_instances(pydicom.dcmread(waiting, stop_before_pixels=True).StudyInstanceUID)) == 1


def test_a_failed_instance_outside_the_inbox_is_copied_never_moved(predictor, dicom_dir, tmp_path, monkeypatch):
    # Processor.process on a caller's file that failed moved it into failed/: a test doing so on the shared sample
    # folder deleted ../shared/data/dicom_samples/nih_cxr14_dx_chest_nofinding.dcm (and touched its mtime).
    import lungdx.integrations.pipeline as pipeline
    from lungdx.integrations.pipeline import Processor

    def broken(*args, **kwargs):
        raise RuntimeError("a step that fails")

    monkeypatch.setattr(pipeline, "analyse_file", broken)
    source = tmp_path / "mine" / "IM0001"  # a PACS export's name, without an extension
    source.parent.mkdir()
    source.write_bytes(_sample(dicom_dir, CHEST_DX).read_bytes())
    os.utime(source, (1_000_000_000, 1_000_000_000))
    processor = Processor(predictor, tmp_path / "state", send_dicom=lambda _: None)
    assert processor.process(source) is None
    kept = list((tmp_path / "state" / "failed").iterdir())
    assert source.stat().st_mtime == 1_000_000_000 and len(kept) == 1 and kept[0].read_bytes() == source.read_bytes()
    assert kept[0].suffix == ".dcm"  # put back into inbox/, process_inbox takes only *.dcm
    inbox = processor.inbox / "received.dcm"  # the node's own inbox: moved, as before
    inbox.write_bytes(source.read_bytes())
    processor.process(inbox)
    assert not inbox.exists()


def test_an_instance_received_again_is_not_analysed_again(predictor, dicom_dir, tmp_path):
    """A listener that receives an instance again (a resend, a restart) queues its results once."""
    from lungdx.integrations.pipeline import Processor

    path = tmp_path / "received.dcm"  # a copy: the Processor is never given a file of ../shared/data
    path.write_bytes(_sample(dicom_dir, CHEST_DX).read_bytes())
    for attempt in range(2):  # a new Processor on the same state folder: as after a listener restart
        processor = Processor(predictor, tmp_path, send_dicom=lambda _: None)
        assert (processor.process(path) is not None) == (attempt == 0)
    assert len(processor.outbox.pending()) == 2
    statuses = [json.loads(line)["status"] for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert statuses == ["analysed", "already"]


def test_an_empty_heatmap_is_named_on_the_secondary_capture(predictor, dicom_dir, tmp_path, monkeypatch):
    import numpy as np

    import lungdx.explain as explain
    import lungdx.integrations.results as results
    from lungdx.integrations.pipeline import analyse_file

    monkeypatch.setattr(explain, "explain_levelled", lambda _p, levelled, _m, **_: np.zeros(levelled.shape, np.float32))
    drawn = {}
    real = results.overlay_rgb

    def keep(pixels, heatmap, caption, location=None):
        drawn.update(heatmap=heatmap, caption=caption)
        return real(pixels, heatmap, caption, location)

    monkeypatch.setattr(results, "overlay_rgb", keep)
    path = tmp_path / CHEST_DX  # a copy: the pipeline is never given a file of ../shared/data
    path.write_bytes(_sample(dicom_dir, CHEST_DX).read_bytes())
    analyse_file(predictor, path, method="gradcam")
    assert drawn["caption"][-1].startswith("Heatmap empty: the Grad-CAM heatmap is all zero")
    assert "no overlay to show" in drawn["caption"][-1] and not drawn["heatmap"].any()


def test_a_payload_that_fails_otherwise_does_not_hold_back_the_items_behind_it(tmp_path, caplog):
    """Any error of a sender (here pydicom's, on a payload that is not DICOM) is a failed attempt of that item alone."""
    from lungdx.integrations.outbox import Outbox

    outbox = Outbox(tmp_path)
    outbox.put("dicom", b"not DICOM at all", ".dcm", "SR first")
    outbox.put("dicom", _dataset_bytes(), ".dcm", "SC second")
    sent = []

    def send(path: Path) -> None:
        sent.append(pydicom.dcmread(path).SOPInstanceUID)  # as send_cstore reads its payloads

    with caplog.at_level("WARNING", logger="lungdx"):
        assert outbox.deliver({"dicom": send}) == 1
    [waiting] = outbox.pending()
    assert waiting.label == "SR first" and waiting.attempts == 1 and sent == ["1.2.3.4"]
    error = json.loads((waiting.folder / "state.json").read_text())["last_error"]
    assert error.startswith("InvalidDicomError") and "delivery of SR first failed" in caplog.text


def _retired(outbox, name: str, days_ago: float, *, refuse: bool = False) -> Path:
    """An item delivered (or refused for good) ``days_ago`` days ago, by its recorded ``moved_at``."""
    from lungdx.integrations.outbox import DAY_S

    item = outbox.put("dicom", _dataset_bytes(), ".dcm", name)
    before = time.time()
    kept = outbox.refused(item, "refused") if refuse else outbox.delivered(item)
    state = json.loads((kept / "state.json").read_text())
    assert before <= state["moved_at"] <= time.time(), "the move's time is recorded in state.json"
    state["moved_at"] -= days_ago * DAY_S
    (kept / "state.json").write_text(json.dumps(state))
    return kept


def test_retention_deletes_old_sent_items_keeps_young_ones_and_refused_ones_longer(tmp_path, caplog):
    from lungdx.integrations.outbox import Outbox, Retention

    outbox = Outbox(tmp_path, retention=Retention(sent_days=7, refused_days=30))
    old, young = _retired(outbox, "SR old", 8), _retired(outbox, "SR young", 6)
    refused, refused_old = _retired(outbox, "SR refused", 8, refuse=True), _retired(outbox, "SC refused", 31, refuse=True)
    with caplog.at_level("INFO", logger="lungdx"):
        assert outbox.prune() == 2
    assert not old.exists() and young.is_dir() and refused.is_dir() and not refused_old.exists()
    assert f"deleted 1 item(s) from {tmp_path / 'sent'}" in caplog.text
    assert f"deleted 1 item(s) from {tmp_path / 'refused'}" in caplog.text
    for private in ("Smith", "PID4711", "SR old", "SC refused", old.name):  # the count and the folder only
        assert private not in caplog.text
    assert outbox.prune(now=time.time() + 2 * 86400) == 1 and not young.exists() and refused.is_dir()


def test_a_refused_item_moved_back_to_pending_is_delivered_and_aged_from_its_delivery(tmp_path):
    from lungdx.integrations.outbox import Outbox

    outbox = Outbox(tmp_path)
    refused = _retired(outbox, "SR refused", 20, refuse=True)
    refused.rename(tmp_path / "pending" / refused.name)  # the cause fixed, a person puts it back
    assert outbox.deliver({"dicom": lambda _: None}) == 1
    assert outbox.prune() == 0 and (tmp_path / "sent" / refused.name).is_dir()


def test_retention_0_deletes_at_delivery_and_none_keeps_for_good(tmp_path):
    from lungdx.integrations.outbox import Outbox, Retention

    at_once = Outbox(tmp_path / "at-once", retention=Retention(sent_days=0, refused_days=0, every_s=3600))
    at_once.prune_when_due()  # the first round's prune is spent: what goes now goes at delivery
    at_once.put("dicom", _dataset_bytes(), ".dcm", "SR")
    assert at_once.deliver({"dicom": lambda _: None}) == 1
    assert list((at_once.folder / "sent").iterdir()) == [] and at_once.pending() == []
    assert at_once.refused(at_once.put("dicom", b"x", ".dcm", "SC"), "refused") is None
    assert list((at_once.folder / "refused").iterdir()) == []

    forever = Outbox(tmp_path / "forever", retention=Retention(sent_days=None, refused_days=None))
    kept = [_retired(forever, "SR", 3650), _retired(forever, "SC", 3650, refuse=True)]
    assert forever.prune() == 0 and all(folder.is_dir() for folder in kept)


def test_retention_ages_an_item_moved_by_an_older_lungdx_by_its_folder_mtime(tmp_path):
    from lungdx.integrations.outbox import DAY_S, Outbox

    outbox = Outbox(tmp_path)  # the defaults: sent/ kept 7 days
    now = time.time()
    folders = {}
    for name, age_days in (("old", 8), ("young", 6)):
        folder = folders[name] = tmp_path / "sent" / name
        folder.mkdir()
        (folder / "payload.dcm").write_bytes(_dataset_bytes())
        state = {"kind": "dicom", "attempts": 0, "next_attempt": 0.0, "label": name, "last_error": None}  # no moved_at
        (folder / "state.json").write_text(json.dumps(state))
        os.utime(folder, (now - age_days * DAY_S, now - age_days * DAY_S))
    recorded = _retired(outbox, "recorded today", 0)
    os.utime(recorded, (now - 30 * DAY_S, now - 30 * DAY_S))  # a recorded moved_at wins over the mtime
    assert outbox.prune(now=now) == 1
    assert not folders["old"].exists() and folders["young"].is_dir() and recorded.is_dir()


def test_prune_never_touches_pending_and_takes_from_tmp_only_a_crashs_leftovers(tmp_path):
    from lungdx.integrations.outbox import DAY_S, LEFTOVER_S, Outbox, Retention

    outbox = Outbox(tmp_path, retention=Retention(sent_days=0, refused_days=0))
    waiting = outbox.put("dicom", _dataset_bytes(), ".dcm", "SR waiting")
    outbox.failed(waiting, "PACS down")
    state = json.loads((waiting.folder / "state.json").read_text())
    (waiting.folder / "state.json").write_text(json.dumps({**state, "moved_at": 0.0}))  # even with a time recorded
    staging = tmp_path / "tmp" / "half-written"
    staging.mkdir()
    (staging / "payload.dcm").write_bytes(b"...")
    long_ago = time.time() - 3650 * DAY_S
    being_written = tmp_path / "tmp" / "being-written"  # a put in progress: its staging folder is young
    being_written.mkdir()
    (being_written / "payload.dcm").write_bytes(b"...")
    for folder in (waiting.folder, staging):
        os.utime(folder, (long_ago, long_ago))
    # Retention 0 deletes sent and refused items at once, but a staged item only once it is a crash's leftover.
    assert outbox.prune() == 1
    assert [item.label for item in outbox.pending()] == ["SR waiting"] and not staging.exists()
    assert (being_written / "payload.dcm").is_file()
    assert outbox.prune(now=time.time() + LEFTOVER_S + 60) == 1 and not being_written.exists()
    assert [item.label for item in outbox.pending()] == ["SR waiting"]


def test_a_prune_failure_on_one_item_does_not_stop_the_others_nor_delivery(tmp_path, monkeypatch, caplog):
    """An item whose payload cannot be deleted (permissions) and one gone mid-prune: the rest still goes."""
    import lungdx.integrations.outbox as outbox_module
    from lungdx.integrations.outbox import Outbox

    outbox = Outbox(tmp_path)
    blocked, vanishing, deleted = (_retired(outbox, name, 8) for name in ("SR blocked", "SR vanishing", "SC deleted"))
    unlink, moved_at = Path.unlink, outbox_module._moved_at

    def refuse_blocked(path, *args, **kwargs):
        if path.parent == blocked and path.name.startswith("payload"):
            raise PermissionError(13, "Permission denied", str(path))
        return unlink(path, *args, **kwargs)

    def vanish(item):  # another process deletes it between the listing and the deletion
        when = moved_at(item)
        if item == vanishing:
            shutil.rmtree(item)
        return when

    monkeypatch.setattr(Path, "unlink", refuse_blocked)
    monkeypatch.setattr(outbox_module, "_moved_at", vanish)
    outbox.put("dicom", _dataset_bytes(), ".dcm", "SR new")
    with caplog.at_level("INFO", logger="lungdx"):
        assert outbox.deliver({"dicom": lambda _: None}) == 1  # delivers, then prunes (its first round)
    assert blocked.is_dir() and not vanishing.exists() and not deleted.exists() and outbox.pending() == []
    assert (blocked / "state.json").is_file(), "state.json goes last: the item keeps its recorded time"
    assert "cannot delete an item of sent, tried again at the next prune: Permission denied" in caplog.text
    assert "deleted 2 item(s)" in caplog.text and "Smith" not in caplog.text
    monkeypatch.undo()
    assert outbox.prune() == 1 and not blocked.exists()


def test_deliver_prunes_at_most_once_per_interval(tmp_path):
    from lungdx.integrations.outbox import Outbox, Retention

    hourly = Outbox(tmp_path / "hourly", retention=Retention(every_s=3600))
    first = _retired(hourly, "SR first", 8)
    hourly.deliver({})
    second = _retired(hourly, "SR second", 8)
    hourly.deliver({})
    assert not first.exists() and second.is_dir(), "the second round, within the hour, does not prune"
    assert hourly.prune() == 1 and not second.exists()  # prune on its own always does

    every_round = Outbox(tmp_path / "every-round", retention=Retention(every_s=0))
    every_round.deliver({})
    third = _retired(every_round, "SR third", 8)
    every_round.deliver({})
    assert not third.exists()


@pytest.mark.parametrize("flags, sent_days, refused_days", [
    ([], 7.0, 30.0), (["--keep-sent", "0", "--keep-refused", "never"], 0.0, None), (["--keep-sent", "1.5"], 1.5, 30.0)])
def test_listen_and_pacs_run_take_the_retention(flags, sent_days, refused_days, monkeypatch):
    import lungdx.integrations.service as service
    from lungdx.cli import _pacs_processor, build_parser
    from lungdx.integrations.outbox import Retention

    made = {}
    monkeypatch.setattr(service, "make_processor", lambda *args, **kwargs: made.update(kwargs))
    for command in (["listen", "run"], ["pacs-run", "run", "--study", "1.2.3"]):
        made.clear()  # else the second command would pass on what the first one gave
        _pacs_processor(build_parser().parse_args([*command, "--pacs", "http://127.0.0.1:1/dicom-web", *flags]))
        assert made["retention"] == Retention(sent_days=sent_days, refused_days=refused_days)


@pytest.mark.parametrize("value", ["-1", "nan", "a week"])
def test_a_retention_that_is_not_days_is_refused(value, capsys):
    from lungdx.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["listen", "run", "--keep-sent", value])
    assert "expected a number of days (0 or more) or 'never'" in capsys.readouterr().err


def _state_processor(state: Path, **retention):
    """A ``Processor`` on ``state`` with a stand-in predictor: what is tested here never reaches a model."""
    from types import SimpleNamespace

    from lungdx.integrations.outbox import Retention
    from lungdx.integrations.pipeline import Processor

    predictor = SimpleNamespace(identity={**IDENTITY, "task": "malignant_vs_rest"})
    return Processor(predictor, state, send_dicom=lambda _: None, retention=Retention(**retention))


def _aged(path: Path, days_ago: float, now: float, data: bytes = b"{}") -> Path:
    from lungdx.integrations.outbox import DAY_S

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (now - days_ago * DAY_S, now - days_ago * DAY_S))
    return path


def test_retention_prunes_fhir_copies_as_sent_and_failed_and_unreadable_instances_as_refused(tmp_path, caplog):
    """fhir/ by --keep-sent, failed/ and unreadable/ by --keep-refused, pruned where the outbox prunes (deliver);
    the inbox, what is pending, a file being written and the logs of the state folder are never touched; a crash's
    half-written file goes once a day old."""
    processor = _state_processor(tmp_path, sent_days=7, refused_days=30)
    now = time.time()
    source = _dataset_bytes()
    fhir_old, fhir_young = _aged(tmp_path / "fhir" / "a1.json", 8, now), _aged(tmp_path / "fhir" / "a2.json", 6, now)
    failed_old, failed_young = (_aged(tmp_path / "failed" / f"b{days}.dcm", days, now, source) for days in (31, 8))
    unreadable_old, unreadable_young = (_aged(tmp_path / "unreadable" / f"c{days}.dcm", days, now, source) for days in (31, 29))
    partial_old = _aged(tmp_path / "fhir" / ".a4.json.4567.partial", 3650, now)  # a crash's, never renamed
    being_written = _aged(tmp_path / "fhir" / ".a3.json.0123.partial", 0, now)
    untouched = [_aged(processor.inbox / "received-long-ago.dcm", 3650, now, source),
                 _aged(tmp_path / "fhir" / ".keep", 3650, now),  # another dot file: not lungdx's to delete
                 _aged(tmp_path / "done.jsonl", 3650, now, b'{"instance": "b31"}\n'),
                 _aged(tmp_path / "events.jsonl", 3650, now, b'{"instance": "b31"}\n')]
    waiting = processor.outbox.put("dicom", source, ".dcm", "SR waiting")
    processor.outbox.failed(waiting, "PACS down")
    with caplog.at_level("INFO", logger="lungdx"):
        assert processor.deliver() == 0  # a round with nothing due still prunes (its first)
    assert not any(path.exists() for path in (fhir_old, failed_old, unreadable_old, partial_old))
    assert all(path.is_file() for path in (fhir_young, failed_young, unreadable_young, being_written, *untouched))
    assert [item.label for item in processor.outbox.pending()] == ["SR waiting"]
    assert f"retention: deleted 2 file(s) from {tmp_path / 'fhir'}" in caplog.text
    for folder in ("failed", "unreadable"):
        assert f"retention: deleted 1 file(s) from {tmp_path / folder}" in caplog.text
    for private in ("Smith", "PID4711", "a1", "b31", "c31"):  # the count and the folder only
        assert private not in caplog.text
    assert processor.outbox.prune(now=now + 2 * 86400) == 3 and not fhir_young.exists() and not unreadable_young.exists()
    assert not being_written.exists()  # two days old by then: a crash's
    assert failed_young.is_file()


def test_a_folder_kept_for_good_keeps_its_files_but_not_a_crashs_partial_files(tmp_path):
    from lungdx.integrations.outbox import Outbox

    now = time.time()
    kept = tmp_path / "kept"
    old_file, old_partial = _aged(kept / "b1.dcm", 3650, now), _aged(kept / ".b2.dcm.89ab.partial", 3650, now)
    young_partial = _aged(kept / ".b3.dcm.cdef.partial", 0, now)
    outbox = Outbox(tmp_path / "outbox", file_folders={kept: None})
    assert outbox.prune(now=now) == 1
    assert old_file.is_file() and young_partial.is_file() and not old_partial.exists()


@pytest.mark.parametrize("folder", ["failed", "unreadable"])
def test_retention_ages_an_instance_kept_for_a_person_from_when_it_was_kept(folder, tmp_path, monkeypatch):
    """Received 40 days ago (the node was down, a backlog): kept today, it gets --keep-refused's 30 days from today."""
    import lungdx.integrations.pipeline as pipeline
    from lungdx.integrations.outbox import DAY_S

    def analyse(*_args, **_kwargs):
        if folder == "unreadable":
            raise pipeline.Skipped("no decoder installed", unreadable=True)
        raise ValueError("analysis failed")

    monkeypatch.setattr(pipeline, "analyse_file", analyse)
    processor = _state_processor(tmp_path, refused_days=30)
    received = _aged(processor.inbox / "received.dcm", 40, time.time(), _dataset_bytes())
    before = time.time()
    assert processor.process_inbox() == 1 and not received.exists()
    [kept] = (tmp_path / folder).iterdir()
    assert kept.stat().st_mtime >= before - 1
    assert processor.outbox.prune() == 0 and kept.is_file()
    assert processor.outbox.prune(now=time.time() + 31 * DAY_S) == 1 and not kept.exists()


def test_retention_0_writes_no_fhir_copy_and_keeps_no_failed_instance_and_never_keeps_all(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from pydicom.filebase import DicomBytesIO

    import lungdx.integrations.pipeline as pipeline

    source = _dataset_bytes()
    result = pydicom.dcmread(DicomBytesIO(source))
    outcomes = iter([pipeline.Results(prediction=SimpleNamespace(probability=0.25), sr=result, secondary_capture=result,
                                      fhir_bundle={"resourceType": "Bundle"}),
                     ValueError("analysis failed")])

    def analyse(*_args, **_kwargs):
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(pipeline, "analyse_file", analyse)
    processor = _state_processor(tmp_path / "at-once", sent_days=0, refused_days=0)
    for name, uid in (("analysed", "1.2.3.4"), ("failing", "1.2.3.6")):
        (processor.inbox / f"{name}.dcm").write_bytes(_dataset_bytes(SOPInstanceUID=("UI", uid)))
        assert processor.process_inbox() == 1
    events = [json.loads(line)["status"] for line in (processor.state_dir / "events.jsonl").read_text().splitlines()]
    assert events == ["analysed", "failed"] and len(processor.outbox.pending()) == 2, "the results still wait for delivery"
    assert not (processor.state_dir / "fhir").exists() and not (processor.state_dir / "failed").exists()
    assert not any(processor.inbox.iterdir())

    forever = _state_processor(tmp_path / "forever", sent_days=None, refused_days=None)
    kept = [_aged(forever.state_dir / name, 3650, time.time()) for name in ("fhir/a.json", "failed/b.dcm", "unreadable/c.dcm")]
    assert forever.outbox.prune() == 0 and all(path.is_file() for path in kept)


def test_retention_tries_a_kept_file_that_cannot_be_deleted_again_and_the_rest_still_goes(tmp_path, monkeypatch, caplog):
    processor = _state_processor(tmp_path, sent_days=7, refused_days=30)
    now = time.time()
    blocked, deleted = _aged(tmp_path / "failed" / "b1.dcm", 31, now), _aged(tmp_path / "failed" / "b2.dcm", 31, now)
    copy = _aged(tmp_path / "fhir" / "a1.json", 8, now)
    unlink = os.unlink

    def refuse_blocked(path, *args, **kwargs):
        if Path(path) == blocked:
            raise PermissionError(13, "Permission denied", str(path))
        return unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", refuse_blocked)
    processor.outbox.put("dicom", _dataset_bytes(), ".dcm", "SR new")
    with caplog.at_level("INFO", logger="lungdx"):
        assert processor.deliver() == 1  # delivers, then prunes, without raising
    assert blocked.is_file() and not deleted.exists() and not copy.exists()
    assert f"cannot delete 1 file(s) of {tmp_path / 'failed'}, tried again at the next prune: Permission denied" in caplog.text
    assert f"deleted 1 file(s) from {tmp_path / 'failed'}" in caplog.text and "b1" not in caplog.text
    monkeypatch.undo()
    assert processor.outbox.prune() == 1 and not blocked.exists()


def test_the_retention_help_names_every_folder_it_prunes(capsys):
    from lungdx.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["listen", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for folder in ("STATE/outbox/sent/", "STATE/fhir/", "STATE/outbox/refused/", "STATE/failed/", "STATE/unreadable/"):
        assert folder in text


def _dataset_bytes(**values) -> bytes:
    """A small PS3.10 file (a CR image header and 8 x 8 pixels) with ``values`` set, invalid ones included."""
    import numpy as np
    from pydicom import config
    from pydicom.dataelem import DataElement
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.uid import ExplicitVRLittleEndian

    dataset = pydicom.Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = "1.2.3", "1.2.3.5"
    dataset.Modality, dataset.PatientName, dataset.PatientID = "CR", "Smith^John", "PID4711"
    dataset.Rows = dataset.Columns = 8
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 12, 11, 0
    dataset.PixelData = np.arange(64, dtype=np.uint16).tobytes()
    for tag, (vr, value) in values.items():
        dataset.add(DataElement(tag, vr, value, validation_mode=config.IGNORE))
    buffer = DicomBytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


IDENTITY = {"name": "lungdx nodule_net", "model": "nodule_net", "version": "0123456789ab", "software_version": "test"}


@pytest.mark.parametrize("task, meaning", [("malignant_vs_rest", "Probability of cancer"),
                                           ("nodule_vs_normal", "Probability of lung nodule")])
def test_results_say_what_the_probability_means_and_survive_a_malformed_date(task, meaning):
    """A nodule-presence model's probability is not sent as a cancer probability; a birth date that is not a DA
    (1961-02-03) is emptied in the result, not a failed analysis, and the source is left as it was."""
    import numpy as np
    from pydicom.filebase import DicomBytesIO

    from lungdx.integrations.fhir import make_bundle
    from lungdx.integrations.results import make_secondary_capture, make_sr, read_sr_probability
    from lungdx.wording import state_result

    source = pydicom.dcmread(DicomBytesIO(_dataset_bytes(PatientBirthDate=("DA", "1961-02-03"))))
    identity = {**IDENTITY, "task": task}
    statement = state_result(0.7, {"threshold": 0.5, "threshold_method": "youden", "class_names": ["a", "b"]})
    sr = make_sr(source, statement, identity)
    capture = make_secondary_capture(source, np.zeros((8, 8, 3), np.uint8), identity)
    assert all("PatientBirthDate" in result and not result.PatientBirthDate for result in (sr, capture))
    assert source.PatientBirthDate == "1961-02-03"
    assert sr.PatientName == "Smith^John" and read_sr_probability(sr) == pytest.approx(0.7)
    meanings = {str(element.value) for element in sr.iterall() if element.keyword == "CodeMeaning"}
    assert meaning in meanings and not {"Probability of cancer", "Probability of lung nodule"} - {meaning} & meanings
    assert ("High likelihood of malignancy" in meanings) == (task == "malignant_vs_rest")
    code = make_bundle(statement, identity, "1.2.3", instance_uid="1.2.3.4")["entry"][0]["resource"]["code"]
    assert code["coding"][0]["display"] == meaning
    with pytest.raises(ValueError, match="coded for lungdx's nodule tasks.*'label=pneumonia'"):
        make_sr(source, statement, {**identity, "task": "label=pneumonia"})


def _results_read_back(source):
    """The SR and the Secondary Capture of ``source``, written as PS3.10 files and read again."""
    import numpy as np
    from pydicom.filebase import DicomBytesIO

    from lungdx.integrations.pipeline import to_bytes
    from lungdx.integrations.results import make_secondary_capture, make_sr
    from lungdx.wording import state_result

    identity = {**IDENTITY, "task": "malignant_vs_rest"}
    statement = state_result(0.7, {"threshold": 0.5, "threshold_method": "youden", "class_names": ["a", "b"]})
    results = make_sr(source, statement, identity), make_secondary_capture(source, np.zeros((8, 8, 3), np.uint8), identity)
    return [pydicom.dcmread(DicomBytesIO(to_bytes(result))) for result in results]


@pytest.mark.parametrize("extension, name", [
    ("ISO 2022 IR 87", "Yamada^Tarou=山田^太郎=やまだ^たろう"),  # Japanese, PS3.5 H.3.1
    ("ISO 2022 IR 149", "Hong^Gildong=洪^吉洞=홍^길동")])  # Korean, PS3.5 I.2
def test_results_of_a_source_with_code_extensions_keep_the_patient_name(extension, name):
    """A Japanese or Korean site's Specific Character Set has an empty first value (ISO 2022 IR 6, PS3.3
    C.12.1.1.2), which highdicom refuses: the results name it, and the ideographic and phonetic names survive."""
    from pydicom.filebase import DicomBytesIO

    from lungdx.integrations.results import read_sr_probability

    source = pydicom.dcmread(DicomBytesIO(_dataset_bytes(SpecificCharacterSet=("CS", ["", extension]),
                                                         PatientName=("PN", name))))
    sr, capture = _results_read_back(source)
    for result in (sr, capture):
        assert result.SpecificCharacterSet == ["ISO 2022 IR 6", extension] and str(result.PatientName) == name
    assert read_sr_probability(sr) == pytest.approx(0.7) and source.SpecificCharacterSet == ["", extension]


@pytest.mark.parametrize("keyword, value, expected", [
    ("PatientSex", "U", ""), ("PatientSex", "m", "M"), ("PatientSex", " F", "F"), ("PatientSex", "MALE", "M"),
    ("PatientSex", "female", "F"), ("PatientSex", "O", "O"),
    ("PatientName", ["Doe^Jane", "Roe^Jane"], "Doe^Jane"), ("ReferringPhysicianName", ["A^B", "C^D"], "A^B"),
    ("StudyDate", ["20200101", "20200102"], "20200101"),
    ("PatientID", ["12345", "678"], None), ("AccessionNumber", ["A1001", "A1002"], None), ("StudyID", ["71", "72"], None)])
def test_results_survive_a_patient_sex_or_a_single_valued_attribute_highdicom_refuses(keyword, value, expected):
    """Patient's Sex is M, F or O (PS3.3 C.7.1.1) and a patient or study attribute has one value (PS3.6): anything
    else made highdicom raise and lost the image's results. The result gets the value it means, or none; an identifying
    attribute (expected None) is never cut to its first value, which could file the result under another patient: no
    result is made, and the error names the attribute, not its values."""
    from pydicom.datadict import dictionary_VR
    from pydicom.filebase import DicomBytesIO

    from lungdx.integrations.results import AmbiguousIdentifier

    source = pydicom.dcmread(DicomBytesIO(_dataset_bytes(**{keyword: (dictionary_VR(keyword), value)})))  # as received
    if expected is None:
        with pytest.raises(AmbiguousIdentifier, match=f"^{keyword} has 2 values") as raised:
            _results_read_back(source)
        assert not any(part in str(raised.value) for part in value)
    else:
        for result in _results_read_back(source):
            assert str(result.get(keyword)) == expected
    assert source.get(keyword) == value


def test_an_instance_with_two_patient_ids_is_kept_in_failed_naming_the_attribute(predictor, dicom_dir, tmp_path, caplog):
    """A Patient ID 12345\\678 became 12345 in the SR and ['12345', '678'] as the FHIR subject: the instance is kept in
    failed/ before the model runs, its reason naming the attribute and quoting no value, and nothing is queued."""
    from lungdx.integrations.pipeline import Processor

    source = pydicom.dcmread(_sample(dicom_dir, CHEST_DX))
    source.PatientID = "12345\\678"
    processor = Processor(predictor, tmp_path, send_dicom=lambda _: None)
    source.save_as(processor.inbox / "received.dcm")
    with caplog.at_level("INFO", logger="lungdx"):
        assert processor.process_inbox() == 1
    [event] = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert event["status"] == "failed" and event["reason"].startswith("AmbiguousIdentifier: PatientID has 2 values")
    assert "12345" not in event["reason"] + caplog.text and "678" not in event["reason"]
    assert [p.name for p in (tmp_path / "failed").iterdir()] == [f"{event['instance']}.dcm"]
    assert not processor.outbox.pending() and not (tmp_path / "fhir").exists()


def test_a_failed_result_names_the_step_without_the_value(predictor, dicom_dir, tmp_path, monkeypatch):
    """highdicom's message quotes the value it refuses: the event names the step, the error type and where."""
    import lungdx.integrations.results as results
    from lungdx.integrations.pipeline import Processor

    def refuse(*_args, **_kwargs):
        raise ValueError("'Doe^Jane' is not a valid PersonName")

    monkeypatch.setattr(results, "make_sr", refuse)
    processor = Processor(predictor, tmp_path, send_dicom=lambda _: None)
    shutil.copy(_sample(dicom_dir, CHEST_DX), processor.inbox / "received.dcm")
    assert processor.process_inbox() == 1
    [event] = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert event["status"] == "failed" and event["reason"].startswith("building the DICOM SR: ValueError at test_integ")
    assert "Doe" not in event["reason"] and not processor.outbox.pending()


def test_an_instance_whose_pixels_cannot_be_decoded_is_kept_and_a_refused_one_is_not(predictor, dicom_dir, tmp_path,
                                                                                        monkeypatch):
    """Its C-STORE was answered Success: an instance lungdx cannot decode yet (no JPEG 2000 plugin) waits in
    unreadable/ to be put back once the decoder is installed; one the policy refuses (not a chest) is deleted."""
    from pydicom.pixels import get_decoder

    from lungdx.integrations.pipeline import Processor

    chest = _sample(dicom_dir, CHEST)
    header = pydicom.dcmread(chest, stop_before_pixels=True)
    decoder = get_decoder(header.file_meta.TransferSyntaxUID)
    installed = decoder.is_available
    monkeypatch.setattr(decoder, "_available", {})  # as if no plugin were installed
    processor = Processor(predictor, tmp_path, send_dicom=lambda _: None)
    shutil.copy(chest, processor.inbox / "chest.dcm")
    shutil.copy(_sample(dicom_dir, NOT_CHEST[1]), processor.inbox / "abdomen.dcm")
    assert processor.process_inbox() == 2
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [event["status"] for event in events] == ["skipped", "skipped"]
    digest = uid_digest(header.SOPInstanceUID)
    assert "no decoder installed" in next(event["reason"] for event in events if event["instance"] == digest)
    kept = tmp_path / "unreadable" / f"{digest}.dcm"
    assert [p.name for p in (tmp_path / "unreadable").iterdir()] == [kept.name]
    assert not any(processor.inbox.iterdir()) and not (tmp_path / "failed").exists()
    if installed:  # the decoder back, the instance put back into the inbox: analysed
        monkeypatch.undo()
        shutil.move(kept, processor.inbox / kept.name)
        assert processor.process_inbox() == 1 and len(processor.outbox.pending()) == 2


def test_a_failed_instance_is_kept_and_its_reason_quotes_no_header_value(predictor, dicom_dir, tmp_path, monkeypatch,
                                                                         caplog):
    import lungdx.integrations.pipeline as pipeline

    def fail(*_args, **_kwargs):
        raise ValueError("Unable to convert '1961-02-03' to 'DA' object")

    monkeypatch.setattr(pipeline, "analyse_file", fail)
    processor = pipeline.Processor(predictor, tmp_path, send_dicom=lambda _: None)
    path = processor.inbox / "received.dcm"
    shutil.copy(_sample(dicom_dir, CHEST_DX), path)
    with caplog.at_level("INFO", logger="lungdx"):
        assert processor.process_inbox() == 1
    [event] = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert event["status"] == "failed" and event["reason"].startswith("ValueError at test_integrations.py:")
    assert "1961" not in caplog.text + event["reason"] and not path.exists()
    assert [p.name for p in (tmp_path / "failed").iterdir()] == [f"{event['instance']}.dcm"]


def test_pacs_run_goes_on_past_an_instance_the_pacs_will_not_give(predictor, dicom_dir, tmp_path, monkeypatch):
    import httpx

    from lungdx.integrations.dicomweb import SERIES_UID, SOP_UID, DicomWebClient
    from lungdx.integrations.pipeline import Processor, pacs_run

    chest = _sample(dicom_dir, CHEST_DX)
    header = pydicom.dcmread(chest, stop_before_pixels=True)
    gone_uid = "1.2.826.0.1.3680043.8.498.4711"

    def request(method, url, **_kwargs):
        if url.endswith("/instances"):
            return httpx.Response(200, json=[{SOP_UID: {"Value": [uid]}, SERIES_UID: {"Value": ["1.2.3.9"]}}
                                             for uid in (gone_uid, str(header.SOPInstanceUID))])
        if gone_uid in url:
            return httpx.Response(404)
        boundary = "b0"
        body = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + chest.read_bytes() + \
            f"\r\n--{boundary}--\r\n".encode()
        return httpx.Response(200, content=body, headers={"content-type": f"multipart/related; boundary={boundary}"})

    monkeypatch.setattr(httpx, "request", request)
    run = pacs_run(Processor(predictor, tmp_path, send_dicom=lambda _: None), DicomWebClient("http://pacs"), "1.2.3")
    assert len(run.analysed) == 1 and len(run.skipped) == 1
    assert gone_uid not in run.skipped[0] and uid_digest(gone_uid) in run.skipped[0] and "HTTP 404" in run.skipped[0]


def test_c_store_failures_that_every_retry_repeats_are_told_from_those_that_pass():
    """One classifier for C-STORE statuses and STOW-RS Failure Reasons (PS3.4 B.2.3, PS3.18 10.5.3)."""
    from lungdx.integrations.outbox import refused_for_good

    assert [refused_for_good(code) for code in (0xA900, 0xA9FF, 0xC000, 0xCFFF, 0x0122)] == [True] * 5
    assert [refused_for_good(code) for code in (0xA700, 0x0110, 0xB000, 0x0000, None)] == [False] * 5


class _HttpStub(BaseHTTPRequestHandler):
    """An HTTP server on loopback answering each request with the next of ``answers`` (status, headers, body), then
    200 with an empty Store Instances Response; it records each request's method and path."""

    answers: list[tuple[int, dict, bytes]] = []
    requests: list[tuple[str, str]] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._answer()

    def do_GET(self):  # noqa: N802
        self._answer()

    def _answer(self):
        _HttpStub.requests.append((self.command, self.path))
        status, headers, body = _HttpStub.answers.pop(0) if _HttpStub.answers else (200, {}, b"{}")
        self.send_response(status)
        for name, value in {"Content-Type": "application/dicom+json", **headers}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_stub():
    """The base URL of a fresh ``_HttpStub``."""
    _HttpStub.answers, _HttpStub.requests = [], []
    server = HTTPServer(("127.0.0.1", 0), _HttpStub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _stow_failures(*reasons: int | None) -> bytes:
    """A Store Instances Response (DICOM JSON, PS3.18 10.5.3) whose Failed SOP Sequence has one item per reason."""
    items = [{"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.88.33"]},
              "00081155": {"vr": "UI", "Value": [f"1.2.3.{number}"]},
              **({"00081197": {"vr": "US", "Value": [reason]}} if reason is not None else {})}
             for number, reason in enumerate(reasons)]
    return json.dumps({"00081198": {"vr": "SQ", "Value": items}}).encode()


@pytest.mark.parametrize("status, headers, body, kept, error", [
    (200, {}, _stow_failures(0x0110), "pending", "HTTP 200, 1 instance(s) not stored, failure reason 0x0110"),
    (202, {}, _stow_failures(0xA900), "refused", "HTTP 202, 1 instance(s) not stored, failure reason 0xA900"),
    (200, {}, _stow_failures(0xA900, 0x0110), "pending", "2 instance(s) not stored, failure reason 0xA900, 0x0110"),
    (200, {}, _stow_failures(0xC000, 0x0122), "refused", "failure reason 0xC000, 0x0122"),
    (200, {}, _stow_failures(None), "pending", "failure reason none"),
    (409, {}, _stow_failures(0xA700), "pending", "HTTP 409, 1 instance(s) not stored, failure reason 0xA700"),
    (409, {}, _stow_failures(0xA900), "refused", "HTTP 409, 1 instance(s) not stored, failure reason 0xA900"),
    (409, {}, b"", "refused", "/dicom-web/studies: HTTP 409"),
    (400, {"Content-Type": "text/plain"}, b"Doe^Jane: bad multipart", "refused", "/dicom-web/studies: HTTP 400"),
    (413, {"Content-Type": "text/plain"}, b"body too large", "pending", "/dicom-web/studies: HTTP 413"),
    (415, {}, b"", "pending", "/dicom-web/studies: HTTP 415"),
    (200, {"Content-Type": "text/html"}, b"<html>login</html>", "pending", "HTTP 200 with an answer that is not DICOM JSON"),
    (301, {"Location": "https://pacs.example.org:8443/dicom-web/studies?token=s3cret"}, b"", "pending",
     "HTTP 301, redirected to https://pacs.example.org:8443/dicom-web/studies: configure the final URL"),
    (308, {"Location": "/moved/dicom-web/studies?token=s3cret"}, b"", "pending",
     "/moved/dicom-web/studies: configure the final URL")],
    ids=["200-0110", "202-A900", "200-A900-0110", "200-C000-0122", "200-no-reason", "409-A700", "409-A900", "409-no-body",
         "400", "413", "415", "200-not-json", "301", "308-relative"])
def test_stow_answers_decide_whether_a_result_waits_or_is_refused_and_the_rest_goes_on(
        http_stub, tmp_path, caplog, status, headers, body, kept, error):
    """Through the real client over loopback: a Failed SOP Sequence is a refusal for good only where every Failure
    Reason is (Orthanc answers a full disk with 200 and 0110, which passes later); a 409 is read the same way; a
    misconfigured endpoint (413, 415) or a redirect, which is not followed, waits; the answer is kept in state.json
    (``detail``), never in the log; the result behind the first is delivered in the same round."""
    from lungdx.integrations.outbox import Outbox, RetryPolicy
    from lungdx.integrations.service import dicom_sender

    outbox = Outbox(tmp_path, RetryPolicy(base_s=0.0, max_s=0.0))
    outbox.put("dicom", _dataset_bytes(), ".dcm", "first")
    outbox.put("dicom", _dataset_bytes(), ".dcm", "second")
    _HttpStub.answers = [(status, headers, body)]
    with caplog.at_level("WARNING", logger="lungdx"):
        assert outbox.deliver({"dicom": dicom_sender("stow", dicomweb=f"{http_stub}/dicom-web")}) == 1
    assert _HttpStub.requests == [("POST", "/dicom-web/studies")] * 2, "a redirect was followed"
    [sent] = (tmp_path / "sent").iterdir()
    folders = {name: list((tmp_path / name).iterdir()) for name in ("pending", "refused")}
    assert json.loads((sent / "state.json").read_text())["label"] == "second"
    assert len(folders[kept]) == 1 and not folders[{"pending": "refused", "refused": "pending"}[kept]]
    state = json.loads((folders[kept][0] / "state.json").read_text())
    assert state["label"] == "first" and error in state["last_error"], state["last_error"]
    assert "s3cret" not in state["last_error"] + caplog.text
    assert state.get("detail") == (body.decode() or None)
    if body:
        assert body.decode() not in caplog.text, "a server's answer may quote patient data: state.json only"


def _result_files(folder: Path) -> tuple[Path, Path]:
    """A Comprehensive SR and a Secondary Capture made from a small CR, as PS3.10 files in ``folder``."""
    from pydicom.filebase import DicomBytesIO

    from lungdx.integrations.pipeline import to_bytes

    sr, capture = _results_read_back(pydicom.dcmread(DicomBytesIO(_dataset_bytes())))
    paths = folder / "sr.dcm", folder / "sc.dcm"
    for path, dataset in zip(paths, (sr, capture), strict=True):
        path.write_bytes(to_bytes(dataset))
    return paths


def test_a_sop_class_the_peer_does_not_accept_waits_for_its_configuration_and_the_rest_goes_on(tmp_path, caplog):
    """The peer (lungdx's own C-STORE SCP: radiographs and Secondary Capture, no SR) rejects Comprehensive SR at
    association. Sent alone (pynetdicom aborts an association with no context accepted) or with an SC (its
    send_c_store raises ValueError): the SR waits in pending/, an error names the SOP class and why, as one fix of the
    peer's configuration mends every result (refused, retention would delete them); the SC behind it is stored."""
    from lungdx.integrations.dimse import StoreListener, send_cstore
    from lungdx.integrations.outbox import DeliveryError, Outbox, RetryPolicy
    from lungdx.integrations.service import dicom_sender

    sr_path, sc_path = _result_files(tmp_path)
    peer = StoreListener(tmp_path / "peer", aet="PEER", host="127.0.0.1", port=free_port())
    peer.start()
    try:
        outbox = Outbox(tmp_path / "outbox", RetryPolicy(base_s=0.0, max_s=0.0))
        outbox.put("dicom", sr_path.read_bytes(), ".dcm", "SR")
        outbox.put("dicom", sc_path.read_bytes(), ".dcm", "SC")
        sender = dicom_sender("cstore", host="127.0.0.1", port=peer.port, called_aet="PEER")
        with caplog.at_level("WARNING", logger="lungdx"):
            assert outbox.deliver({"dicom": sender}) == 1
        assert not list((tmp_path / "outbox" / "refused").iterdir())
        [pending] = outbox.pending()
        state = json.loads((pending.folder / "state.json").read_text())
        assert state["label"] == "SR" and state["attempts"] == 1
        expected = ("PEER does not accept Comprehensive SR Storage (1.2.840.10008.5.1.4.1.1.88.33) in Explicit VR Little "
                    "Endian, Implicit VR Little Endian: abstract syntax not supported at association; retried until "
                    "PEER's configuration accepts it")
        assert state["last_error"] == expected
        assert [record.levelname for record in caplog.records if record.getMessage() == expected] == ["ERROR"]
        assert len(list((tmp_path / "peer").glob("*.dcm"))) == 1, "the SC behind the SR was not stored"
        with pytest.raises(DeliveryError, match="does not accept Comprehensive SR Storage") as raised:
            send_cstore([sc_path, sr_path], "127.0.0.1", peer.port, "PEER")
        assert not raised.value.permanent
        assert len(list((tmp_path / "peer").glob("*.dcm"))) == 1, "nothing is sent where a dataset has no context"
    finally:
        peer.stop()


@pytest.fixture
def store_peer():
    """``start(sop_classes, syntaxes)`` starts a C-STORE SCP on loopback (pynetdicom) that accepts each SOP class only in
    those transfer syntaxes (the first of them it supports, in its own order) and returns its port; ``received``
    fills with (transfer syntax, PS3.10 bytes) of each instance stored."""
    from pynetdicom import AE, evt

    received: list[tuple[str, bytes]] = []
    servers = []

    def store(event):
        received.append((event.context.transfer_syntax, event.encoded_dataset()))
        return 0x0000

    def start(sop_classes, syntaxes) -> int:
        ae = AE(ae_title="PEER")
        for sop_class in sop_classes:
            ae.add_supported_context(sop_class, list(syntaxes))
        servers.append(ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, store)]))
        return servers[-1].server_address[1]

    yield start, received
    for server in servers:
        server.shutdown()


@pytest.mark.parametrize("accepted, sent_in", [
    (["1.2.840.10008.1.2"], "1.2.840.10008.1.2"),
    (["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"], "1.2.840.10008.1.2.1"),
    (["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"], "1.2.840.10008.1.2")],
    ids=["implicit-only", "explicit-preferred", "implicit-preferred"])
def test_an_sr_goes_in_implicit_vr_little_endian_to_a_pacs_that_accepts_it_only_so(store_peer, tmp_path, accepted, sent_in):
    """Implicit VR Little Endian is the default every peer supports (PS3.5 10.1): a PACS accepting Comprehensive SR
    in it alone gets the SR (made in Explicit VR Little Endian) converted, with the same content; one accepting both
    picks one (a pynetdicom SCP, the first of its own list) and gets the SR in it."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.uid import ComprehensiveSRStorage

    from lungdx.integrations.outbox import Outbox
    from lungdx.integrations.results import read_sr_probability
    from lungdx.integrations.service import dicom_sender

    start, received = store_peer
    port = start([ComprehensiveSRStorage], accepted)
    sr_path, _ = _result_files(tmp_path)
    outbox = Outbox(tmp_path / "outbox")
    outbox.put("dicom", sr_path.read_bytes(), ".dcm", "SR")
    assert outbox.deliver({"dicom": dicom_sender("cstore", host="127.0.0.1", port=port, called_aet="PEER")}) == 1
    [(syntax, encoded)] = received
    stored, made = pydicom.dcmread(DicomBytesIO(encoded)), pydicom.dcmread(sr_path)
    assert syntax == sent_in and stored.file_meta.TransferSyntaxUID == sent_in
    assert stored == made, [element.keyword for element in made if stored.get(element.tag) != element]
    assert read_sr_probability(stored) == pytest.approx(0.7)


def test_a_big_endian_image_is_swapped_into_the_little_endian_syntax_the_peer_accepts(store_peer, tmp_path):
    """pydicom writes an OW value as it is: going from Explicit VR Big Endian to Implicit VR Little Endian, the pixel
    words are swapped, so the image decodes to the same values; a UN value, which cannot be swapped, stops it."""
    import numpy as np
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian

    from lungdx.integrations.dimse import send_cstore
    from lungdx.integrations.outbox import DeliveryError

    start, received = store_peer
    port = start(["1.2.840.10008.5.1.4.1.1.1"], [ImplicitVRLittleEndian])
    dataset = pydicom.dcmread(DicomBytesIO(_dataset_bytes()))
    dataset.file_meta = FileMetaDataset(dataset.file_meta)
    dataset.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    dataset.PixelData = np.arange(64, dtype=">u2").tobytes()
    dataset["PixelData"].VR = "OW"
    path = tmp_path / "big_endian.dcm"
    pydicom.dcmwrite(path, dataset, enforce_file_format=True)  # save_as refuses a change of byte order
    assert pydicom.dcmread(path).pixel_array.tolist() == np.arange(64).reshape(8, 8).tolist()
    send_cstore([path], "127.0.0.1", port, "PEER")
    [(syntax, encoded)] = received
    stored = pydicom.dcmread(DicomBytesIO(encoded))
    assert syntax == ImplicitVRLittleEndian and (stored.Rows, stored.BitsStored) == (8, 12)
    assert stored.pixel_array.tolist() == np.arange(64).reshape(8, 8).tolist()
    dataset.add_new(0x00091010, "UN", b"\x00\x01\x00\x02")  # a private value whose words' size nobody knows
    pydicom.dcmwrite(path, dataset, enforce_file_format=True)
    with pytest.raises(DeliveryError, match=r"to another byte order: \(0009,1010\) has VR UN") as raised:
        send_cstore([path], "127.0.0.1", port, "PEER")
    assert not raised.value.permanent and len(received) == 1


def test_a_pending_item_that_does_not_read_is_left_for_the_next_round(tmp_path, caplog):
    """An item copied back with cp -r has its state.json before its payload: the round goes on without it, with
    one warning naming its folder, and delivers it once it reads."""
    from lungdx.integrations.outbox import Outbox

    outbox = Outbox(tmp_path)
    item = outbox.put("dicom", _dataset_bytes(), ".dcm", "SR copied back")
    half = tmp_path / "pending" / "00000000000000000000-halfcopy"  # oldest first: tried before the good one
    half.mkdir()
    (half / "state.json").write_text(json.dumps({"kind": "dicom", "attempts": 1, "next_attempt": None,
                                                 "label": "SR half", "last_error": "refused"}))
    sent = []
    with caplog.at_level("WARNING", logger="lungdx"):
        for _ in range(2):
            outbox.deliver({"dicom": sent.append})
    assert sent == [item.payload]  # the good item, delivered in the first round
    assert caplog.text.count(f"pending item {half} does not read (no payload file)") == 1 and "SR half" not in caplog.text
    (half / "payload.dcm").write_bytes(_dataset_bytes())
    assert outbox.deliver({"dicom": sent.append}) == 1 and sent[-1] == half / "payload.dcm"
