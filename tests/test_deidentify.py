"""PS3.15 Basic Profile de-identification on the real DICOM samples."""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
import pytest

pytest.importorskip("dicomanonymizer", reason="dicom-anonymizer (the pacs extra) is not installed")

from lungdx.io.deidentify import UidMap, deidentify_folder, profile_actions  # noqa: E402


@pytest.fixture(scope="module")
def export(dicom_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("deid")
    summary = deidentify_folder(dicom_dir, out, UidMap(key=b"k" * 32))
    originals = {}
    for path in sorted(p for p in dicom_dir.iterdir() if p.suffix == ".dcm"):
        originals[path.name] = pydicom.dcmread(path)
    return summary, [pydicom.dcmread(path) for path in summary.written], list(originals.values())


def test_every_profile_attribute_present_is_gone_or_replaced(export):
    _, outputs, inputs = export
    actions = {tag: action for tag, action in profile_actions().items() if len(tag) == 2}
    checked = 0
    for before, after in zip(inputs, outputs, strict=True):
        for tag, action in actions.items():
            if tag[0] == 0x0002 or tag not in before or before[tag].is_empty:
                continue
            checked += 1
            if tag not in after or after[tag].is_empty:
                continue
            # Z allows "a zero length value, or a non-zero length value that may be a dummy value" (E.1-1).
            assert action != "delete", f"{before[tag].keyword} still present"
            assert after[tag].value != before[tag].value or before[tag].VR == "SQ", f"{before[tag].keyword} kept"
        assert not any(element.tag.is_private for element in after)
        assert after.PatientIdentityRemoved == "YES"
        assert after.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert checked >= 20, "the samples should exercise the profile"


def test_uids_are_remapped_consistently_and_pixels_unchanged(export):
    _, outputs, inputs = export
    mapping: dict[str, str] = {}
    for before, after in zip(inputs, outputs, strict=True):
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            old, new = str(before[keyword].value), str(after[keyword].value)
            assert new != old and new.startswith("2.25.")
            assert mapping.setdefault(old, new) == new, f"{keyword} remapped inconsistently"
        assert after.file_meta.MediaStorageSOPInstanceUID == after.SOPInstanceUID
        assert after.PixelData == before.PixelData
        for keyword in ("Rows", "Columns", "BitsStored", "PhotometricInterpretation", "PixelRepresentation"):
            assert after.get(keyword) == before.get(keyword)
    # The two RG1 files are one study (one derived from the other): still one study after export.
    rg1 = [after.StudyInstanceUID for before, after in zip(inputs, outputs, strict=True)
           if before.StudyInstanceUID == inputs[1].StudyInstanceUID]
    assert len(rg1) >= 2 and len(set(rg1)) == 1
    assert len(set(mapping.values())) == len(mapping), "two UIDs mapped onto one"


def test_warns_on_burned_in_annotation_without_patient_data(dicom_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lungdx")
    summary = deidentify_folder(dicom_dir, tmp_path)
    assert summary.warnings and all("Burned In Annotation" in text for _, text in summary.warnings)
    for path in sorted(p for p in dicom_dir.iterdir() if p.suffix == ".dcm"):
        source = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in ("PatientName", "PatientID", "StudyDate", "PatientBirthDate"):
            value = str(source.get(keyword, "") or "").strip()
            if len(value) > 3:
                assert value not in caplog.text, f"{keyword} leaked into the log"
        assert path.name not in caplog.text


def test_a_file_that_cannot_be_deidentified_is_skipped_and_the_export_goes_on(dicom_dir, tmp_path, monkeypatch):
    from lungdx.io import deidentify

    real = deidentify.deidentify_dataset
    broken = "nema_wg04_RG1_J2KI_cr_chest_pa.dcm"

    def failing(dataset, uid_map):
        if Path(dataset.filename).name == broken:
            raise RuntimeError("simulated failure")
        return real(dataset, uid_map)

    monkeypatch.setattr(deidentify, "deidentify_dataset", failing)
    summary = deidentify.deidentify_folder(dicom_dir, tmp_path / "out")
    assert [(path.name, reason) for path, reason in summary.skipped if path.suffix == ".dcm"] == \
        [(broken, "cannot de-identify: RuntimeError")]
    dicoms = [p for p in dicom_dir.iterdir() if p.suffix == ".dcm"]
    assert len(summary.written) == len(dicoms) - 1 == len(list((tmp_path / "out").iterdir()))
