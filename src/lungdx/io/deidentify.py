"""De-identification for research exports: the PS3.15 Basic Application Level Confidentiality Profile.

The profile's action table (PS3.15 Annex E, Table E.1-1: D replace, Z empty, X remove, K keep,
U replace UID, and their combinations) comes from KitwareMedical's ``dicom-anonymizer`` (BSD-3,
released 2026, tables generated from the standard's own XML up to edition 2026c). It was chosen
over ``dicognito`` (randomises values by its own rules, not by Table E.1-1) and ``deid`` (a recipe
engine whose default recipe is not the profile's table). The table is applied here, not by the
library's ``anonymize_dataset``, whose output fails dciodvfy where its input did not: it writes
``00010101`` into DA (year 0001, which dciodvfy rejects), empties every attribute inside a
sequence it touches (Type 1 Referenced SOP Class UID, Code Value...) and gives every UID in one a
random replacement, standard SOP Class UIDs included. Here:

- The table holds at every level of nesting: K keeps a sequence but cleans its Items (E.1-1 legend).
  A sequence with Z becomes a sequence of zero Items. One with X/Z/U* keeps its Items with their
  instance UIDs replaced, so a Source Image Sequence still names its SOP Class and, consistently,
  its source instance. One with D (Content Sequence, Person Identification Code Sequence...) keeps
  its Items with every value in them replaced by a dummy, UIDs mapped as below. X/Z, X/D and
  X/Z/D sequences are removed: the choice needs the IOD, and in the radiograph IODs read here
  (CR, DX, SC) they are Type 3, where zero Items is an error (dciodvfy: "1-n Required by Module
  definition"). No Item keeps an emptied Type 1 attribute.
- Dates and times (DA, TM, DT) get the dummy values in ``DUMMY_VALUES`` (valid for the VR), or, as
  an option, dates are shifted by a fixed number of days (E.3.6 Retain Longitudinal Temporal
  Information With Modified Dates Option): intervals between a patient's dates survive.
- UIDs (action U) are remapped by a keyed hash into the 2.25 root (PS3.5 B.2): the same input UID
  gets the same new UID within an export, so studies and series stay together, and without the
  key the mapping cannot be reversed or recomputed. UIDs the standard itself defines (under
  ``1.2.840.10008.``: SOP classes, transfer syntaxes, coding schemes) identify nobody and are kept.
- What PS3.15 E.1.1 and E.2 ask of a de-identified instance: Patient Identity Removed (0012,0062)
  YES, De-identification Method (0012,0063) and its Code Sequence (0012,0064) with DCM 113100
  "Basic Application Confidentiality Profile", and Longitudinal Temporal Information Modified
  (0028,0303) REMOVED (MODIFIED, with DCM 113107, when dates are shifted).

- Overlay planes lose their Overlay Data (60xx,3000; X), so each goes whole: a plane without its
  data fails the Overlay Plane module (PS3.3 C.9.2, where it is Type 1).

Pixel data and the Image Pixel module (PS3.3 C.7.6.3) are untouched. Pixels may still show
burned-in text: Burned In Annotation (0028,0301) YES or absent gives a warning. Logs name files
by their position in the export, never by patient data.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, timedelta
from functools import cache
from pathlib import Path

import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

logger = logging.getLogger(__name__)

TABLE_EDITION = "dicomfields_2026c"
"""The edition of PS3.15 Table E.1-1 used (a module of ``dicomanonymizer.dicom_anonymization_databases``)."""

STANDARD_UID_ROOT = "1.2.840.10008."
"""The UID root of the DICOM standard's own UIDs (PS3.5 9.1; PS3.6 Annex A lists them)."""

DUMMY_VALUES = {"DA": "19000101", "TM": "000000", "DT": "19000101000000"}
"""Dummy dates and times: 1 January 1900, the conventional "unknown date" (day 1 of Excel and of
SQL Server's datetime), valid for DA/DT in pydicom and dciodvfy, and plainly not a digital image's date."""

# Patient's Birth Date keeps its Z when dates are shifted: it is a patient characteristic, not a
# longitudinal date, and with one shift per export a single known study date would reveal every birth date.
_NOT_SHIFTED = {0x00100030}
_REPLACE = {"replace", "empty_or_replace", "delete_or_replace", "delete_or_empty_or_replace"}
_EMPTY = {"empty", "delete_or_empty"}
_NEW_UID = {"replace_uid", "delete_or_empty_or_replace_uid"} | _REPLACE
_NO_ITEMS = {"empty", "empty_or_replace"}  # Z for a sequence: zero Items
_REMOVED_SEQUENCE = {"delete", "delete_or_replace", "delete_or_empty", "delete_or_empty_or_replace"}


def uid_digest(uid: object) -> str:
    """A short SHA-256 of a UID: the only way a log may name an instance or a study."""
    return hashlib.sha256(str(uid or "").encode()).hexdigest()[:16]


def is_standard_uid(uid: object) -> bool:
    """Whether ``uid`` is one the standard defines (a SOP Class, a Transfer Syntax, a coding scheme...)."""
    return str(uid).strip().startswith(STANDARD_UID_ROOT)


@dataclass
class UidMap:
    """Consistent, keyed UID replacement: ``2.25.<first 128 bits of HMAC-SHA256(key, uid)>``.

    The standard's own UIDs (``is_standard_uid``) come back unchanged.
    """

    key: bytes = field(default_factory=lambda: secrets.token_bytes(32))

    def __call__(self, uid: str) -> str:
        if is_standard_uid(uid):
            return str(uid).strip()
        digest = hmac.new(self.key, str(uid).strip().encode(), hashlib.sha256).digest()
        return f"2.25.{int.from_bytes(digest[:16], 'big')}"


@cache
def profile_actions() -> dict[tuple[int, ...], str]:
    """Table E.1-1 as ``{tag: action}`` with the action's name (``replace``, ``empty``, ``delete``...).

    A tag is ``(group, element)``, or ``(group, element, group_mask, element_mask)`` for a repeating group.
    """
    from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector

    tags = dicom_anonymization_database_selector(TABLE_EDITION)
    names = {"D_TAGS": "replace", "Z_TAGS": "empty", "X_TAGS": "delete", "U_TAGS": "replace_uid",
             "Z_D_TAGS": "empty_or_replace", "X_Z_TAGS": "delete_or_empty", "X_D_TAGS": "delete_or_replace",
             "X_Z_D_TAGS": "delete_or_empty_or_replace", "X_Z_U_STAR_TAGS": "delete_or_empty_or_replace_uid"}
    return {tuple(tag): action for category, action in names.items() for tag in tags[category]}


@cache
def _action_for(tag: int) -> str | None:
    """The profile's action for ``tag``, None for K (an attribute the table does not list)."""
    group, element = tag >> 16, tag & 0xFFFF
    actions = profile_actions()
    if (group, element) in actions:
        return actions[(group, element)]
    return next((action for rule, action in actions.items() if len(rule) == 4  # a repeating group, 50xx or 60xx
                 and group & rule[2] == rule[0] & rule[2] and element & rule[3] == rule[1] & rule[3]), None)


def deidentify_dataset(dataset: Dataset, uid_map: UidMap, *, date_shift_days: int | None = None) -> list[str]:
    """De-identify ``dataset`` in place; returns warnings (burned-in annotation), free of patient data.

    Args:
        date_shift_days: None replaces dates with dummy values; a number of days (not 0) instead
            shifts every date and date-time by it (birth date excepted), keeping times, so that
            intervals survive. Use one shift for a whole export, and keep it secret.
    """
    if date_shift_days == 0:
        raise ValueError("date_shift_days=0 would keep the real dates: give a non-zero number of days or None")
    warnings = _burned_in_warnings(dataset)
    dataset.remove_private_tags()  # E.1-1: private attributes X (no Retain Safe Private Option)
    shift = None if date_shift_days is None else timedelta(days=date_shift_days)
    _Cleaner(uid_map, shift).clean(dataset)
    _drop_overlays_without_data(dataset)
    if "MediaStorageSOPInstanceUID" in getattr(dataset, "file_meta", Dataset()):
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID  # PS3.10 7.1: must match
    _mark_deidentified(dataset, dates_shifted=shift is not None)
    return warnings


def _drop_overlays_without_data(dataset: Dataset) -> None:
    """Remove every overlay plane (groups 6000-601E) left without Overlay Data (60xx,3000).

    Table E.1-1 removes Overlay Data (it can hold burned-in text) but keeps the plane's other attributes;
    Overlay Data is Type 1 in the Overlay Plane module (PS3.3 C.9.2), so a plane without it is invalid.
    """
    groups = {tag.group for tag in dataset.keys() if 0x6000 <= tag.group <= 0x601E and tag.group % 2 == 0}
    for group in groups - {tag.group for tag in dataset.keys() if tag.element == 0x3000}:
        for tag in [tag for tag in dataset.keys() if tag.group == group]:
            del dataset[tag]


@dataclass(frozen=True)
class _Cleaner:
    """Table E.1-1 applied to a dataset and, recursively, to the Items of the sequences it keeps."""

    uid_map: UidMap
    date_shift: timedelta | None = None

    def clean(self, dataset: Dataset) -> None:
        for tag in list(dataset.keys()):
            element = dataset[tag]
            action = _action_for(element.tag)
            if action == "delete" or (element.VR == "SQ" and action in _REMOVED_SEQUENCE):
                del dataset[tag]  # X; X/Z, X/D, X/Z/D sequences are Type 3 in the image IODs read here
            elif element.VR == "SQ":
                self._clean_sequence(element, action)
            else:
                self._clean_value(element, action)

    def _clean_sequence(self, element: DataElement, action: str | None) -> None:
        if action in _NO_ITEMS:
            element.value = []  # Z: zero Items, never Items with emptied Type 1 attributes
            return
        for item in element.value:
            if action == "replace":  # D: every value replaced, so that no Type 1 attribute is emptied
                self._replace_all(item)
            else:  # K, X/Z/U*: the Items cleaned by the table, so their instance UIDs are replaced
                self.clean(item)

    def _replace_all(self, dataset: Dataset) -> None:
        """D for a sequence: every value of the Item (nested ones too) replaced, so none is left empty."""
        for element in dataset:
            if element.VR == "SQ":
                for item in element.value:
                    self._replace_all(item)
            else:
                self._clean_value(element, "replace")

    def _clean_value(self, element: DataElement, action: str | None) -> None:
        if element.VR in DUMMY_VALUES:
            self._clean_temporal(element, action)
        elif element.VR == "UI" and action in _NEW_UID:
            _change_values(element, self.uid_map)
        elif action in _EMPTY:
            _empty(element)
        elif action is not None:
            _replace(element)

    def _clean_temporal(self, element: DataElement, action: str | None) -> None:
        if self.date_shift is None or element.tag in _NOT_SHIFTED:
            if action is not None:
                _change_values(element, lambda _value: DUMMY_VALUES[element.VR])
        elif element.VR != "TM":  # a shift by whole days leaves the time of day as it was
            _change_values(element, lambda value: _shift_date(value, self.date_shift) or DUMMY_VALUES[element.VR])


def _change_values(element: DataElement, change: Callable[[str], str]) -> None:
    """Apply ``change`` to each value of ``element``; an empty element stays empty (nothing to hide)."""
    if element.is_empty:
        return
    if element.VM > 1:
        element.value = [change(str(value)) for value in element.value]
    else:
        element.value = change(str(element.value))


def _shift_date(value: str, shift: timedelta) -> str | None:
    """A DA ``YYYYMMDD`` or a DT starting with one, moved by ``shift``; None where it is not a full date."""
    text = value.strip()
    if len(text) < 8 or not text[:8].isdigit():
        return None
    try:
        moved = date(int(text[:4]), int(text[4:6]), int(text[6:8])) + shift
    except (ValueError, OverflowError):
        return None
    return f"{moved.year:04d}{moved.month:02d}{moved.day:02d}{text[8:]}"


def _empty(element: DataElement) -> None:
    """Z with dicom-anonymizer's VR-aware value; a VR it does not know gets a zero-length value."""
    from dicomanonymizer import simpledicomanonymizer as anonymizer

    try:
        anonymizer.empty_element(element)
    except NotImplementedError:
        element.value = element.empty_value


def _replace(element: DataElement) -> None:
    """D with dicom-anonymizer's VR-aware dummy ("ANONYMIZED", 0...); UIs, dates and sequences never come here."""
    from dicomanonymizer import simpledicomanonymizer as anonymizer

    try:
        anonymizer.replace_element(element)
    except NotImplementedError:  # no dummy for this VR (AT, OW...): a zero-length value hides it as well
        element.value = element.empty_value


def _burned_in_warnings(dataset: Dataset) -> list[str]:
    """PS3.15 E.1.1: the profile does not clean pixels, so burned-in text must be checked by a person."""
    value = str(dataset.get("BurnedInAnnotation", "")).strip().upper()  # (0028,0301)
    if value == "YES":
        return ["Burned In Annotation (0028,0301) is YES: the pixels may show identifying text"]
    if not value:
        return ["Burned In Annotation (0028,0301) is absent: check the pixels for identifying text"]
    return []


def _mark_deidentified(dataset: Dataset, dates_shifted: bool) -> None:
    """Patient Identity Removed, De-identification Method and its codes (PS3.15 E.1.1, E.2, E.3.6; PS3.16 CID 7050)."""
    dataset.PatientIdentityRemoved = "YES"
    methods = ["PS3.15 Basic Application Level Confidentiality Profile (lungdx)"]
    codes = [("113100", "Basic Application Confidentiality Profile")]
    if dates_shifted:  # never the number of days: it would undo the shift
        methods.append("Dates shifted by a fixed number of days")
        codes.append(("113107", "Retain Longitudinal Temporal Information Modified Dates Option"))
    dataset.DeidentificationMethod = methods if len(methods) > 1 else methods[0]
    dataset.DeidentificationMethodCodeSequence = [_code(value, meaning) for value, meaning in codes]
    dataset.LongitudinalTemporalInformationModified = "MODIFIED" if dates_shifted else "REMOVED"  # (0028,0303)


def _code(value: str, meaning: str) -> Dataset:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, "DCM", meaning
    return code


@dataclass
class ExportSummary:
    """What ``deidentify_folder`` did: files written, skipped (with reasons) and warnings."""

    written: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    warnings: list[tuple[Path, str]] = field(default_factory=list)


def deidentify_folder(in_dir: str | os.PathLike, out_dir: str | os.PathLike, uid_map: UidMap | None = None,
                      *, date_shift_days: int | None = None) -> ExportSummary:
    """De-identify every DICOM file under ``in_dir`` into ``out_dir``, one UID map for all of them.

    Output files are named by position (``000001.dcm``...), as input names may hold patient data.

    Args:
        date_shift_days: None for dummy dates; else the one shift in days for every file (see ``deidentify_dataset``).
    """
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not in_dir.is_dir():
        raise FileNotFoundError(f"{in_dir}: no such folder")
    if date_shift_days == 0:
        raise ValueError("date_shift_days=0 would keep the real dates: give a non-zero number of days or None")
    uid_map = uid_map or UidMap()
    summary = ExportSummary()
    out_dir.mkdir(parents=True, exist_ok=True)
    files = sorted(path for path in in_dir.rglob("*") if path.is_file())
    for number, path in enumerate(files, start=1):
        try:
            dataset = pydicom.dcmread(path)
        except Exception:  # not DICOM (a CSV, a README): left out of the export
            summary.skipped.append((path, "not a DICOM file"))
            continue
        target = out_dir / f"{number:06d}.dcm"
        try:
            warnings = deidentify_dataset(dataset, uid_map, date_shift_days=date_shift_days)
            dataset.save_as(target, enforce_file_format=False)
        except Exception as err:  # one malformed file never stops the export; the reason names no patient data
            target.unlink(missing_ok=True)
            logger.error("file %d of %d not exported: %s", number, len(files), type(err).__name__)
            summary.skipped.append((path, f"cannot de-identify: {type(err).__name__}"))
            continue
        for warning in warnings:
            logger.warning("file %d of %d: %s", number, len(files), warning)
            summary.warnings.append((target, warning))
        summary.written.append(target)
    logger.info("de-identified %d files, skipped %d", len(summary.written), len(summary.skipped))
    return summary
