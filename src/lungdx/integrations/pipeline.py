"""From a received instance to delivered results: analyse, make SR + Secondary Capture + FHIR, queue, deliver.

``analyse_file`` is the one path from a DICOM file to results; the DICOM node (``Node``) and the
DICOMweb pull (``pacs_run``) both use it, and it predicts through the one ``Predictor`` exactly as
``lungdx predict`` does (``read_image``, the checkpoint's levelling, its threshold).

State folder layout (``Node`` and ``pacs_run``): ``inbox/`` received instances not yet analysed,
``outbox/`` results not yet delivered (see ``outbox.Outbox``), ``fhir/`` every FHIR Bundle
written, ``events.jsonl`` one line per instance (digest of the SOP Instance UID, status, reason:
never patient data), ``done.jsonl`` one line per result queued (the digest and the model version),
``failed/`` instances whose analysis failed and ``unreadable/`` instances whose pixels could not be read
(a decoder not installed, say): both kept, named by the digest, to be put back into ``inbox/``.

``fhir/``, ``failed/`` and ``unreadable/`` hold patient data (the Bundle carries the patient's ID, a kept instance
is the received image and its header), so the outbox's ``Retention`` prunes them with its own folders: ``fhir/``
as ``sent/``, from when the copy was written; ``failed/`` and ``unreadable/`` as ``refused/``, from when the
instance was kept there. ``inbox/``, ``events.jsonl`` and ``done.jsonl`` (digests, statuses, reasons,
probabilities, model versions and times: no name, ID or date of the patient) are never pruned.

Delivery is idempotent: a result for one source instance and one model version is queued once, by
``done.jsonl`` across listener restarts and ``pacs-run`` runs, and ``pacs_run`` also finds results
already in the study (their UIDs are derived from the source's, ``results.result_uid``), so a second
run with another state folder sends nothing either.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from lungdx.integrations import uid_digest
from lungdx.integrations.outbox import DeliveryError, Outbox, Retention, RetryPolicy, write_atomic
from lungdx.io import ImageReadError, sniff_format
from lungdx.io.acceptance import Refused
from lungdx.predict import Prediction, Predictor
from lungdx.wording import state_result

logger = logging.getLogger(__name__)


class Skipped(ValueError):
    """An instance that is not analysed (not a frontal chest radiograph, unreadable pixels).

    ``unreadable`` is True where it could be analysed once the cause is fixed (pixels not decoded, a decoder
    not installed), False for a refusal by the acceptance policy, which a second try gives again.
    """

    def __init__(self, reason: str, *, unreadable: bool = False):
        super().__init__(reason)
        self.unreadable = unreadable


class StepFailed(RuntimeError):
    """A step of ``analyse_file`` failed: ``step`` says which, the error is the ``__cause__``."""

    def __init__(self, step: str):
        super().__init__(step)
        self.step = step


class NothingToAnalyse(RuntimeError):
    """``pacs_run`` on a study that does not exist, or holds no image lungdx analyses (the reason says which)."""


@dataclass
class StudyRun:
    """What ``pacs_run`` did with a study's instances."""

    analysed: list[Results]
    already: int = 0
    """Instances whose result for this model version was queued before or is in the study already."""
    skipped: list[str] = field(default_factory=list)
    """The reason for each instance that was not analysed."""


@dataclass
class Results:
    """What one analysed instance gives: the prediction and the three result objects."""

    prediction: Prediction
    sr: Dataset
    secondary_capture: Dataset
    fhir_bundle: dict
    subject_system: str | None = None
    """The identifier system the FHIR subject's Patient ID went under (``site_patient_system``); None: the value alone."""


def analyse_file(predictor: Predictor, path: str | Path, method: str = "auto", alerts: Sequence[str] = (),
                 patient_system: str | None = None, patient_issuer: str | None = None) -> Results:
    """Predict and explain one DICOM file and make its SR, Secondary Capture and FHIR Bundle.

    All three word the result as ``wording.state_result`` does (``alerts``: monitoring alerts active now).

    The file goes through the predictor's acceptance policy (``lungdx.io.acceptance``), as in
    ``lungdx predict`` and the service, so it gets the verdict and the reason it gets there.

    Raises:
        Skipped: not a DICOM file, refused by the acceptance policy, or pixels that cannot be read (the
            reason says which).
        results.AmbiguousIdentifier: a Patient ID, Accession Number, Study ID or Issuer of Patient ID with more than
            one value (the text names it, never its values).
        StepFailed: any other error, with the step it happened in.
    """
    from lungdx.explain import choose_heatmap, explain_levelled, resolve_method, to_original_grid
    from lungdx.integrations.fhir import make_bundle
    from lungdx.integrations.results import check_identifiers, make_secondary_capture, make_sr, overlay_rgb

    try:
        if sniff_format(path) != "dicom":
            raise Skipped("not a DICOM file: results go back to the PACS as DICOM objects that reference it")
        image = predictor.read(path)
    except Refused as err:
        raise Skipped(err.reason) from err
    except ImageReadError as err:
        raise Skipped(err.reason, unreadable=True) from err
    with _step("reading the DICOM header"):
        source = pydicom.dcmread(path, stop_before_pixels=True)
    check_identifiers(source)  # before the model runs: a result it could not file safely is not made
    with _step("predicting"):
        levelled = predictor.level(image.pixels)  # once, for the prediction and the heatmap
        prediction = predictor.predict_levelled(levelled, image.pixels.shape[:2], str(path), image.meta)
    with _step("explaining"):
        chosen = choose_heatmap(lambda name: to_original_grid(explain_levelled(predictor, levelled[None], name)[0],
                                                              image.pixels.shape, predictor.preprocess_config),
                                resolve_method(method, predictor.model), predictor.model)
    identity = predictor.identity
    statement = state_result(prediction.probability, predictor.checkpoint, alerts)
    caption = [f"{identity['name']} {identity['version']}: {statement.headline}", statement.threshold_text,
               *([statement.uncertainty_text] if statement.near_threshold else []), *([chosen.notice] if chosen.notice else [])]
    heat = chosen.heatmap if chosen.problem is None else np.zeros(image.pixels.shape, np.float32)
    with _step("drawing the heatmap overlay"):
        overlay = overlay_rgb(image.pixels, heat, caption, prediction.location)
    with _step("building the DICOM SR"):
        sr = make_sr(source, statement, identity, prediction.location)
    with _step("building the DICOM Secondary Capture"):
        capture = make_secondary_capture(source, overlay, identity)
    with _step("building the FHIR Bundle"):
        patient_id = str(source.get("PatientID", "")) or None
        system = site_patient_system(source, patient_system, patient_issuer)
        bundle = make_bundle(statement, identity, str(source.StudyInstanceUID), patient_id,
                             instance_uid=str(source.SOPInstanceUID), patient_system=system)
    return Results(prediction=prediction, sr=sr, secondary_capture=capture, fhir_bundle=bundle, subject_system=system)


def site_patient_system(source: Dataset, system: str | None, issuer: str | None) -> str | None:
    """The FHIR identifier system for the source's Patient ID (0010,0020): the site's (``system``) where the ID is
    the site's own, that is where Issuer of Patient ID (0010,0021) is absent or is the site's (``issuer``); None
    where it names another assigner (a study imported from another hospital), whose ID under the site's system
    could match another patient in the EHR, so it goes without a system. Says nothing: it runs once per instance, and
    ``Processor`` tells the log once."""
    if not system:
        return None
    given = str(source.get("IssuerOfPatientID", "") or "").strip()
    return None if given and given != (issuer or "") else system


@contextlib.contextmanager
def _step(step: str):
    """Raise an error of the block as ``StepFailed(step)``: a failure's reason says what failed, not only where."""
    try:
        yield
    except Exception as err:
        raise StepFailed(step) from err


def to_bytes(dataset: Dataset) -> bytes:
    """A dataset as PS3.10 file bytes."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class Processor:
    """Analyses files and queues their results in a state folder; delivery is separate (``deliver``).

    An instance whose analysis fails is moved to ``failed/`` in the state folder (named by its UID's digest),
    not deleted, and so is one whose pixels cannot be read, to ``unreadable/`` (its C-STORE was answered Success:
    after the decoder is installed, say, put it back into ``inbox/`` to analyse it). An instance the acceptance
    policy refuses (not a chest radiograph) is refused again on a second try, and is deleted.

    ``patient_system``: the FHIR identifier system of the site's Patient IDs, given to the Bundles' subject where the
    instance's Issuer of Patient ID (0010,0021) is absent or ``patient_issuer`` (``site_patient_system``).

    ``retention`` (default ``Retention()``) limits the outbox and, on the same schedule, ``fhir/`` (by
    ``sent_days``: a copy of a result, kept no longer than the delivered result) and ``failed/`` and
    ``unreadable/`` (by ``refused_days``: waiting for a person, as a refused result is). A limit of 0 keeps
    nothing there: no FHIR copy is written, and a failed or unreadable instance is not kept (the inbox deletes it).

    Raises:
        ValueError: the model's task has no coded result for a PACS or an EHR (``results.task_concepts``).
    """

    def __init__(self, predictor: Predictor, state_dir: str | Path, *, send_dicom: Callable[[Path], None] | None,
                 send_fhir: Callable[[Path], None] | None = None, retry: RetryPolicy | None = None,
                 method: str = "auto", retention: Retention | None = None, patient_system: str | None = None,
                 patient_issuer: str | None = None):
        from lungdx.integrations.results import task_concepts

        task_concepts(predictor.identity["task"])  # refused at start-up, not on every instance
        self.predictor, self.method = predictor, method
        self.patient_system, self.patient_issuer = patient_system, patient_issuer
        self._said_foreign_issuer = False
        self.retention = retention or Retention()
        if send_fhir is None and self.retention.sent_days == 0:
            logger.warning("no FHIR destination (--fhir) and sent results kept 0 days (--keep-sent 0): no FHIR Bundle is "
                           "written anywhere, not even to STATE/fhir/")
        if send_fhir is not None and not patient_system:
            logger.warning("FHIR results name their patient by Patient ID (0010,0020) without an identifier system: an "
                           "EHR that holds several ID namespaces cannot match it; give the site's with "
                           "--fhir-patient-system URI")
        self.state_dir = Path(state_dir)
        self.inbox = self.state_dir / "inbox"
        self.inbox.mkdir(parents=True, exist_ok=True)
        self.outbox = Outbox(self.state_dir / "outbox", retry, self.retention, file_folders={
            self.state_dir / "fhir": self.retention.sent_days,
            self.state_dir / "failed": self.retention.refused_days,
            self.state_dir / "unreadable": self.retention.refused_days})
        self.senders = {kind: sender for kind, sender in (("dicom", send_dicom), ("fhir", send_fhir)) if sender}
        self._events = threading.Lock()
        self.version = predictor.identity["version"]
        self._done_file = self.state_dir / "done.jsonl"
        self._done = {(row["instance"], row["model_version"]) for row in _read_jsonl(self._done_file)}
        self._reasons: dict[str, str] = {}

    def done(self, digest: str) -> bool:
        """True when this model version's result for the instance (``uid_digest`` of its UID) was queued before."""
        return (digest, self.version) in self._done

    def process(self, path: Path) -> Results | None:
        """Analyse one file and queue its results; never raises for a bad instance (it is logged).

        An instance that fails, or whose pixels do not decode, is kept for a person (``failed/``, ``unreadable/``):
        moved there from ``inbox/``, copied from anywhere else, so a caller's own file is never moved or changed.
        """
        digest = _digest_of(path)
        if self.done(digest):
            logger.info("instance %s: result of model %s already queued; not analysed again", digest, self.version)
            self._event(digest, "already", f"result of model version {self.version} already queued")
            return None
        try:
            results = analyse_file(self.predictor, path, self.method, patient_system=self.patient_system,
                                   patient_issuer=self.patient_issuer)
        except Skipped as err:
            logger.warning("skipped instance %s: %s", digest, err)
            self._event(digest, "skipped", str(err))
            if err.unreadable:
                self._keep(path, "unreadable", digest)
            return None
        except Exception as err:  # one bad instance must never stop the node
            # Its text may quote the header's values (a malformed birth date, a name): the log and the event
            # get the step, the error's type and where it was raised only.
            reason = _failure(err)
            logger.error("analysis of instance %s failed: %s", digest, reason)
            self._event(digest, "failed", reason)
            self._keep(path, "failed", digest)
            return None
        self._note_foreign_issuer(results)
        fhir_json = json.dumps(results.fhir_bundle, indent=2).encode()
        if self.retention.sent_days != 0:  # a copy kept 0 days is not written
            write_atomic(self.state_dir / "fhir" / f"{uid_digest(results.sr.SOPInstanceUID)}.json", fhir_json)
        for kind, dataset in (("SR", results.sr), ("SC", results.secondary_capture)):
            self.outbox.put("dicom", to_bytes(dataset), ".dcm", f"{kind} {uid_digest(dataset.SOPInstanceUID)}")
        if "fhir" in self.senders:
            self.outbox.put("fhir", fhir_json, ".json", f"FHIR bundle for {digest}")
        self._mark_done(digest)
        logger.info("analysed instance %s: probability %.4f", digest, results.prediction.probability)
        self._event(digest, "analysed", f"probability {results.prediction.probability:.6f}")
        return results

    def _note_foreign_issuer(self, results: Results) -> None:
        """Say once per processor, not per instance, that a Patient ID went without the site's system (another
        Issuer of Patient ID): a backlog of imported studies would otherwise fill the log with one line each. Neither
        the issuer nor the ID is logged: both are header values that lead back to the patient (PS3.15 E.1-1)."""
        if self.patient_system and results.subject_system is None and not self._said_foreign_issuer:
            self._said_foreign_issuer = True
            logger.info("an instance's Issuer of Patient ID (0010,0021) is not the site's (--fhir-patient-issuer): its "
                        "FHIR subject, and that of every such instance after it, goes without the site's system "
                        "(said once)")

    def _keep(self, path: Path, folder: str, digest: str) -> None:
        """Keep an instance that was not analysed in ``folder`` of the state folder, named by its UID's digest: moved
        from the node's own ``inbox/``, copied from anywhere else (``process`` on a file of the caller's, which is
        never moved or touched); not kept where ``Retention.refused_days`` is 0 (the inbox deletes its file)."""
        if self.retention.refused_days == 0:
            return
        path = Path(path)
        kept = self.state_dir / folder / f"{digest}.dcm"  # .dcm, which process_inbox takes when it is put back
        kept.parent.mkdir(exist_ok=True)
        if path.resolve().parent == self.inbox.resolve():
            # Retention ages a kept instance by its modification time, its reception until now: set before the move,
            # so that no prune ever sees an instance received long ago (a backlog) in failed/ as kept long ago.
            with contextlib.suppress(OSError):  # refused by the system: then it is aged from its reception
                os.utime(path)
            shutil.move(path, kept)
        else:
            shutil.copyfile(path, kept)  # a new file, written now

    def _mark_done(self, digest: str) -> None:
        line = json.dumps({"instance": digest, "model_version": self.version, "time": time.time()})
        with self._events, open(self._done_file, "a", encoding="utf-8") as stream:
            stream.write(line + "\n")
            stream.flush()
            os.fsync(stream.fileno())  # queued results and this line survive a crash together
        self._done.add((digest, self.version))

    def process_inbox(self) -> int:
        """Analyse every file in the inbox (oldest first), removing each once its results are queued."""
        files = sorted(self.inbox.glob("*.dcm"), key=lambda p: p.stat().st_mtime)
        for path in files:
            self.process(path)
            path.unlink(missing_ok=True)
        return len(files)

    def deliver(self) -> int:
        """Try to deliver every due result (the rest stays in the outbox); prunes it as ``Outbox.deliver`` does."""
        return self.outbox.deliver(self.senders)

    def last_event_reason(self, digest: str) -> str:
        """The reason of this process's last event for an instance (why it was skipped, say)."""
        return self._reasons.get(digest, "")

    def _event(self, digest: str, status: str, reason: str) -> None:
        line = json.dumps({"time": time.time(), "instance": digest, "status": status, "reason": reason})
        with self._events, open(self.state_dir / "events.jsonl", "a", encoding="utf-8") as stream:
            stream.write(line + "\n")
        self._reasons[digest] = reason


def _failure(err: BaseException) -> str:
    """An error without its message: the step it failed (``StepFailed``), its type and the last frame it passed.

    The message is left out because it may quote the header's values (highdicom's quotes the refused value), except
    lungdx's own refusal of an ambiguous identifier, which names the attribute and never its values.
    """
    from lungdx.integrations.results import AmbiguousIdentifier

    if isinstance(err, AmbiguousIdentifier):
        return f"{type(err).__name__}: {err}"
    if isinstance(err, StepFailed) and err.__cause__ is not None:
        return f"{err.step}: {_failure(err.__cause__)}"
    frames = traceback.extract_tb(err.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return f"{type(err).__name__}{where}"


def _digest_of(path: Path) -> str:
    try:
        return uid_digest(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
                          .get("SOPInstanceUID"))
    except Exception:  # unreadable header: name it by its file, which is a digest in the inbox already
        return path.stem


class Node:
    """The DICOM node: a C-STORE SCP into the inbox, one analysis worker, one delivery worker.

    Whatever is in the inbox or outbox when it starts (left by an earlier run) is processed first.
    """

    def __init__(self, processor: Processor, *, aet: str = "LUNGDX", host: str = "0.0.0.0", port: int = 11112,
                 poll_s: float = 1.0):
        from lungdx.integrations.dimse import StoreListener

        self.processor, self.poll_s = processor, poll_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.listener = StoreListener(processor.inbox, aet=aet, host=host, port=port, on_received=self._wake.set)
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self._stop.clear()
        self.listener.start()
        for target, name in ((self._analyse_loop, "lungdx-analysis"), (self._deliver_loop, "lungdx-delivery")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self.listener.stop()
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout=60)
        self._threads.clear()

    def _analyse_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self.processor.process_inbox()
            except Exception as err:  # a full disk, a file gone mid-listing: the node keeps analysing after it
                logger.error("analysis loop error: %s", _failure(err))
            self._wake.wait(self.poll_s)

    def _deliver_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.processor.deliver()
            except Exception:  # a sender bug must not end delivery for good
                logger.exception("delivery loop error")
            self._stop.wait(self.poll_s)


def pacs_run(processor: Processor, client, study_uid: str) -> StudyRun:
    """Pull a study's instances by DICOMweb (QIDO-RS, WADO-RS), analyse them and queue their results.

    lungdx's own results (Manufacturer lungdx) are never analysed. An instance whose result for this
    model version was queued before (``Processor.done``) or is in the study already (its SR's UID,
    ``results.result_uid``) is not retrieved again. Other SOP classes are skipped by the acceptance policy.

    Raises:
        NothingToAnalyse: the study is not in the PACS, or nothing in it is analysed or analysed already.
    """
    from lungdx.integrations.dicomweb import SERIES_UID, SOP_UID, value
    from lungdx.integrations.results import MANUFACTURER, result_uid

    instances = client.search_instances(study_uid, includefield="00080070")
    if not instances:
        raise NothingToAnalyse(f"study {uid_digest(study_uid)} (digest of its Study Instance UID) is not in the PACS")
    present = {value(instance, SOP_UID) for instance in instances}
    run = StudyRun(analysed=[])
    for instance in instances:
        sop_uid = value(instance, SOP_UID)
        if value(instance, "00080070") == MANUFACTURER:  # our own results: never analyse them again
            continue
        if processor.done(uid_digest(sop_uid)) or result_uid(sop_uid, processor.version, "sr") in present:
            run.already += 1
            continue
        try:
            data = client.retrieve_instance(study_uid, value(instance, SERIES_UID), sop_uid)
        except DeliveryError as err:  # one instance the PACS will not give: the rest of the study still runs
            logger.warning("instance %s not retrieved: %s", uid_digest(sop_uid), err)
            run.skipped.append(f"instance {uid_digest(sop_uid)} not retrieved: {err}")
            continue
        path = write_atomic(processor.inbox / f"{uid_digest(sop_uid)}.dcm", data)
        result = processor.process(path)
        path.unlink(missing_ok=True)
        if result is not None:
            run.analysed.append(result)
        else:
            run.skipped.append(processor.last_event_reason(uid_digest(sop_uid)))
    if not run.analysed and not run.already:
        raise NothingToAnalyse(f"study {uid_digest(study_uid)} holds no chest radiograph lungdx analyses: "
                               + "; ".join(run.skipped or ["only lungdx results"]))
    return run


def _read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file; a torn last line (a crash mid-write) is ignored."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("%s: ignoring a torn line", path)
    return rows
