"""De-identification for research exports: the PS3.15 Basic Application Level Confidentiality Profile.

The profile's action table (PS3.15 Annex E, Table E.1-1: D replace, Z empty, X remove, K keep,
U replace UID, and their combinations) comes from KitwareMedical's ``dicom-anonymizer`` (BSD-3,
released 2026, tables generated from the standard's own XML up to edition 2026c). It was chosen
over ``dicognito`` (randomises values by its own rules, not by Table E.1-1) and ``deid`` (a recipe
engine whose default recipe is not the profile's table). Two parts are done here instead:

- UIDs (action U) are remapped by a keyed hash into the 2.25 root (PS3.5 B.2): the same input UID
  gets the same new UID within an export, so studies and series stay together, and without the
  key the mapping cannot be reversed or recomputed. The library's own mapping is a process-global
  table of random UIDs.
- What PS3.15 E.1.1 asks of a de-identified instance: Patient Identity Removed (0012,0062) YES,
  De-identification Method (0012,0063) and its Code Sequence (0012,0064) with DCM 113100
  "Basic Application Confidentiality Profile".

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
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

logger = logging.getLogger(__name__)

TABLE_EDITION = "dicomfields_2026c"
"""The edition of PS3.15 Table E.1-1 used (a module of ``dicomanonymizer.dicom_anonymization_databases``)."""


def uid_digest(uid: object) -> str:
    """A short SHA-256 of a UID: the only way a log may name an instance or a study."""
    return hashlib.sha256(str(uid or "").encode()).hexdigest()[:16]


@dataclass
class UidMap:
    """Consistent, keyed UID replacement: ``2.25.<first 128 bits of HMAC-SHA256(key, uid)>``."""

    key: bytes = field(default_factory=lambda: secrets.token_bytes(32))

    def __call__(self, uid: str) -> str:
        digest = hmac.new(self.key, str(uid).strip().encode(), hashlib.sha256).digest()
        return f"2.25.{int.from_bytes(digest[:16], 'big')}"


@cache
def profile_actions() -> dict[tuple[int, ...], str]:
    """Table E.1-1 as ``{tag: action}`` with the action's name (``replace``, ``empty``, ``delete``...)."""
    from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector

    tags = dicom_anonymization_database_selector(TABLE_EDITION)
    names = {"D_TAGS": "replace", "Z_TAGS": "empty", "X_TAGS": "delete", "U_TAGS": "replace_uid",
             "Z_D_TAGS": "empty_or_replace", "X_Z_TAGS": "delete_or_empty", "X_D_TAGS": "delete_or_replace",
             "X_Z_D_TAGS": "delete_or_empty_or_replace", "X_Z_U_STAR_TAGS": "delete_or_empty_or_replace_uid"}
    return {tuple(tag): action for category, action in names.items() for tag in tags[category]}


def deidentify_dataset(dataset: Dataset, uid_map: UidMap) -> list[str]:
    """De-identify ``dataset`` in place; returns warnings (burned-in annotation), free of patient data."""
    from dicomanonymizer import simpledicomanonymizer as anonymizer

    warnings = _burned_in_warnings(dataset)

    def replace_uid(ds: Dataset, tag) -> None:
        element = ds.get(tag)
        if element is not None and element.value:
            values = element.value if element.VM > 1 else [element.value]
            mapped = [uid_map(value) for value in values]
            element.value = mapped if element.VM > 1 else mapped[0]

    uid_tags = [tag for tag, action in profile_actions().items() if action == "replace_uid" and len(tag) == 2]
    anonymizer.anonymize_dataset(
        dataset, extra_anonymization_rules={tag: replace_uid for tag in uid_tags},
        base_rules_gen=lambda: anonymizer.initialize_actions(TABLE_EDITION), delete_private_tags=True)
    if "MediaStorageSOPInstanceUID" in getattr(dataset, "file_meta", Dataset()):
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID  # PS3.10 7.1: must match
    _mark_deidentified(dataset)
    return warnings


def _burned_in_warnings(dataset: Dataset) -> list[str]:
    """PS3.15 E.1.1: the profile does not clean pixels, so burned-in text must be checked by a person."""
    value = str(dataset.get("BurnedInAnnotation", "")).strip().upper()  # (0028,0301)
    if value == "YES":
        return ["Burned In Annotation (0028,0301) is YES: the pixels may show identifying text"]
    if not value:
        return ["Burned In Annotation (0028,0301) is absent: check the pixels for identifying text"]
    return []


def _mark_deidentified(dataset: Dataset) -> None:
    """Patient Identity Removed, De-identification Method and its code (PS3.15 E.1.1, PS3.16 CID 7050)."""
    dataset.PatientIdentityRemoved = "YES"
    dataset.DeidentificationMethod = "PS3.15 Basic Application Level Confidentiality Profile (lungdx)"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = (
        "113100", "DCM", "Basic Application Confidentiality Profile")
    dataset.DeidentificationMethodCodeSequence = [code]


@dataclass
class ExportSummary:
    """What ``deidentify_folder`` did: files written, skipped (with reasons) and warnings."""

    written: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    warnings: list[tuple[Path, str]] = field(default_factory=list)


def deidentify_folder(in_dir: str | os.PathLike, out_dir: str | os.PathLike, uid_map: UidMap | None = None
                      ) -> ExportSummary:
    """De-identify every DICOM file under ``in_dir`` into ``out_dir``, one UID map for all of them.

    Output files are named by position (``000001.dcm``...), as input names may hold patient data.
    """
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not in_dir.is_dir():
        raise FileNotFoundError(f"{in_dir}: no such folder")
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
            warnings = deidentify_dataset(dataset, uid_map)
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
