"""PS3.15 Basic Profile de-identification on the real DICOM samples, checked by dciodvfy where installed."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom import config, valuerep
from pydicom.dataset import Dataset

pytest.importorskip("dicomanonymizer", reason="dicom-anonymizer (the pacs extra) is not installed")

from lungdx.io.deidentify import (  # noqa: E402
    STANDARD_UID_ROOT,
    UidMap,
    deidentify_dataset,
    deidentify_folder,
    profile_actions,
)

KEY = b"k" * 32
SHIFT_DAYS = -1234
DCIODVFY = shutil.which("dciodvfy")
needs_dciodvfy = pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy not found (Debian/Ubuntu package dicom3tools)")
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


@dataclass
class Export:
    """One ``deidentify_folder`` run: (input file, output file) pairs and both read back."""

    summary: object
    pairs: list[tuple[Path, Path]]
    inputs: list[Dataset]
    outputs: list[Dataset]


def _export(dicom_dir: Path, out: Path, **options) -> Export:
    summary = deidentify_folder(dicom_dir, out, UidMap(key=KEY), **options)
    skipped = {path for path, _ in summary.skipped}
    sources = [path for path in sorted(dicom_dir.rglob("*")) if path.is_file() and path not in skipped]
    pairs = list(zip(sources, summary.written, strict=True))
    return Export(summary, pairs, [pydicom.dcmread(source) for source, _ in pairs],
                  [pydicom.dcmread(target) for _, target in pairs])


@pytest.fixture(scope="module")
def export(dicom_dir, tmp_path_factory) -> Export:
    """The samples with dummy dates (the default)."""
    return _export(dicom_dir, tmp_path_factory.mktemp("deid"))


@pytest.fixture(scope="module")
def shifted(dicom_dir, tmp_path_factory) -> Export:
    """The samples with dates shifted by ``SHIFT_DAYS``."""
    return _export(dicom_dir, tmp_path_factory.mktemp("deid_shifted"), date_shift_days=SHIFT_DAYS)


def _dciodvfy_errors(path: Path) -> set[str]:
    """dciodvfy's "Error" lines, each reduced to its kind and attribute: values (`` = <...>``, `` = 2``) removed."""
    done = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    lines = (done.stdout + done.stderr).splitlines()
    return {" ".join(re.sub(r"\[\d+\]", "", re.sub(r" = .*?(?= - |$)", "", line)).split())
            for line in lines if line.startswith("Error")}


def _new_errors(source: Path, target: Path) -> list[str]:
    return sorted(_dciodvfy_errors(target) - _dciodvfy_errors(source))


@needs_dciodvfy
@pytest.mark.parametrize("which", ["export", "shifted"])
def test_dciodvfy_finds_no_error_that_the_input_did_not_have(which, request):
    result: Export = request.getfixturevalue(which)
    assert len(result.pairs) >= 5, "every sample should be exported"
    new = {source.name: _new_errors(source, target) for source, target in result.pairs}
    assert not {name: errors for name, errors in new.items() if errors}


@needs_dciodvfy
def test_the_dciodvfy_comparison_sees_what_the_old_export_did(dicom_dir, tmp_path):
    # What dicom-anonymizer's own actions wrote: DA 00010101 and a Source Image Sequence item emptied.
    source = dicom_dir / "nema_wg04_RG3_J2KR_cr_tibia.dcm"
    broken = pydicom.dcmread(source)
    broken.StudyDate = "00010101"
    broken.SourceImageSequence[0].ReferencedSOPClassUID = ""
    broken.save_as(tmp_path / "broken.dcm")
    new = _new_errors(source, tmp_path / "broken.dcm")
    assert any("Value invalid for this VR - (0x0008,0x0020)" in error for error in new), new
    assert any("Type 1 Required Element=<ReferencedSOPClassUID>" in error for error in new), new
    assert _dciodvfy_errors(dicom_dir / "nema_wg04_RG1_cr_chest_pa_uncompressed.dcm"), "the input's own errors are seen"


def _reference(sop_class: str, sop_instance: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop_instance
    return item


@needs_dciodvfy
def test_referencing_sequences_keep_no_empty_type1_attribute(dicom_dir, tmp_path):
    source = pydicom.dcmread(dicom_dir / "nema_wg04_RG3_J2KR_cr_tibia.dcm")
    source.ReferencedStudySequence = [_reference("1.2.840.10008.3.1.2.3.1", "1.2.3.4.5.6.1")]  # (0008,1110) X/Z
    source.ReferencedPatientSequence = [_reference("1.2.840.10008.3.1.2.1.1", "1.2.3.4.5.6.2")]  # (0008,1120) X
    source.ReferencedImageSequence = [_reference(CR_IMAGE_STORAGE, "1.2.3.4.5.6.3")]  # (0008,1140) X/Z/U*
    source.save_as(tmp_path / "in.dcm")
    dataset = pydicom.dcmread(tmp_path / "in.dcm")
    deidentify_dataset(dataset, UidMap(key=KEY))
    dataset.save_as(tmp_path / "out.dcm")
    # X and X/Z: removed, as Type 3 in General Study and Patient modules (zero Items would fail as "1-n Required").
    assert "ReferencedPatientSequence" not in dataset and "ReferencedStudySequence" not in dataset
    reference = dataset.ReferencedImageSequence[0]
    assert reference.ReferencedSOPClassUID == CR_IMAGE_STORAGE
    assert reference.ReferencedSOPInstanceUID == UidMap(key=KEY)("1.2.3.4.5.6.3")
    assert _new_errors(tmp_path / "in.dcm", tmp_path / "out.dcm") == []


def test_a_replaced_sequence_keeps_its_items_with_dummy_values_and_standard_uids():
    # (0040,A730) Content Sequence is D: dicom-anonymizer replaced every UID inside, SOP Class UIDs too.
    content = Dataset()
    content.ValueType, content.TextValue = "TEXT", "Mr Smith's chest"  # Text Value is not in Table E.1-1
    content.ObservationDateTime = "20040826120000"
    content.ReferencedSOPSequence = [_reference(CR_IMAGE_STORAGE, "1.2.3.4.5.6.7")]
    dataset = Dataset()
    dataset.ContentSequence = [content]
    deidentify_dataset(dataset, UidMap(key=KEY))
    item = dataset.ContentSequence[0]
    assert "Smith" not in str(item.TextValue) and item.ObservationDateTime == "19000101000000"
    assert item.ReferencedSOPSequence[0].ReferencedSOPClassUID == CR_IMAGE_STORAGE
    assert item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == UidMap(key=KEY)("1.2.3.4.5.6.7")
    assert not [element.keyword for element in item.iterall() if element.is_empty]


def test_an_overlay_plane_goes_whole_with_its_data():
    # Table E.1-1 removes Overlay Data (60xx,3000), Type 1 in the Overlay Plane module: a plane without it is invalid.
    dataset = Dataset()
    dataset.PatientName = "Smith^John"
    for group in (0x6000, 0x6002):
        dataset.add_new((group, 0x0010), "US", 4)  # Overlay Rows
        dataset.add_new((group, 0x0011), "US", 8)  # Overlay Columns
        dataset.add_new((group, 0x0040), "CS", "G")  # Overlay Type
        dataset.add_new((group, 0x0050), "SS", [1, 1])  # Overlay Origin
        dataset.add_new((group, 0x0100), "US", 1)  # Overlay Bits Allocated
        dataset.add_new((group, 0x0102), "US", 0)  # Overlay Bit Position
        dataset.add_new((group, 0x3000), "OW", b"\xff" * 4)  # Overlay Data
    dataset.add_new((0x6002, 0x4000), "LT", "Smith")  # Overlay Comments
    deidentify_dataset(dataset, UidMap(key=KEY))
    assert not [tag for tag in dataset.keys() if 0x6000 <= tag.group <= 0x601E]
    assert "PatientIdentityRemoved" in dataset


def _temporal_problem(vr: str, value: str) -> str | None:
    """Why ``value`` is not a valid DA/TM/DT (PS3.5 6.2: a Gregorian calendar date), or None."""
    try:
        valuerep.validate_value(vr, value, config.RAISE)
        parsed = {"DA": valuerep.DA, "DT": valuerep.DT, "TM": valuerep.TM}[vr](value)
    except ValueError as err:
        return str(err)
    if vr != "TM" and parsed.year < 1583:  # before the Gregorian calendar; dciodvfy rejects year 0001
        return f"year {parsed.year}"
    return None


def test_the_vr_check_rejects_the_old_dummies():
    assert _temporal_problem("DA", "00010101") and _temporal_problem("DT", "00010101010101.000000+0000")
    assert _temporal_problem("DA", "19000230") and _temporal_problem("TM", "256000")
    assert not any(_temporal_problem(vr, value) for vr, value in [("DA", "19000101"), ("TM", "000000"),
                                                                   ("DT", "19000101000000")])


@pytest.mark.parametrize("which", ["export", "shifted"])
def test_no_date_or_time_is_invalid_for_its_vr(which, request):
    result: Export = request.getfixturevalue(which)
    checked, problems = 0, []
    for output in result.outputs:
        for element in output.iterall():
            if element.VR in ("DA", "TM", "DT") and not element.is_empty:
                values = element.value if element.VM > 1 else [element.value]
                checked += len(values)
                problems += [f"{element.keyword} {value}: {why}" for value in values
                             if (why := _temporal_problem(element.VR, str(value)))]
    assert checked >= 20 and not problems


def _standard_uids(dataset: Dataset) -> Counter:
    elements = [*dataset.file_meta, *dataset.iterall()] if hasattr(dataset, "file_meta") else dataset.iterall()
    return Counter((element.tag, str(element.value)) for element in elements
                   if element.VR == "UI" and str(element.value).startswith(STANDARD_UID_ROOT))


@pytest.mark.parametrize("which", ["export", "shifted"])
def test_no_standard_uid_changes(which, request):
    result: Export = request.getfixturevalue(which)
    found = Counter()
    for before, after in zip(result.inputs, result.outputs, strict=True):
        kept = _standard_uids(before)
        assert _standard_uids(after) >= kept, "a UID under 1.2.840.10008. was replaced or removed"
        found += kept
    assert {keyword for keyword in ("SOPClassUID", "TransferSyntaxUID", "ReferencedSOPClassUID")
            if any(tag == pydicom.datadict.tag_for_keyword(keyword) for tag, _ in found)} == \
        {"SOPClassUID", "TransferSyntaxUID", "ReferencedSOPClassUID"}


def test_uid_map_keeps_standard_uids_and_replaces_the_rest():
    uid_map = UidMap(key=KEY)
    for standard in (CR_IMAGE_STORAGE, "1.2.840.10008.1.2.4.90", "1.2.840.10008.2.16.4"):  # class, syntax, DCM
        assert uid_map(standard) == standard
    assert uid_map("1.2.3.4") == uid_map("1.2.3.4 ") != "1.2.3.4" and uid_map("1.2.3.4").startswith("2.25.")


def test_a_date_shift_keeps_the_intervals_between_a_patients_dates(shifted):
    moved = 0
    for before, after in zip(shifted.inputs, shifted.outputs, strict=True):
        for element in before:
            if element.VR != "DA" or element.is_empty or element.tag not in after or element.keyword == "PatientBirthDate":
                continue
            assert valuerep.DA(after[element.tag].value) - valuerep.DA(element.value) == timedelta(days=SHIFT_DAYS)
            moved += 1
        for keyword in ("StudyTime", "SeriesTime", "ContentTime"):  # whole days: the time of day is kept
            assert after.get(keyword) == before.get(keyword)
        assert after.LongitudinalTemporalInformationModified == "MODIFIED"
        assert [code.CodeValue for code in after.DeidentificationMethodCodeSequence] == ["113100", "113107"]
        assert str(SHIFT_DAYS).strip("-") not in str(after.DeidentificationMethod)
    rg1 = [(before, after) for before, after in zip(shifted.inputs, shifted.outputs, strict=True)
           if before.get("SeriesDate") and before.get("StudyDate")]
    for before, after in rg1:  # 2004-08-26 study of a 1995-09-26 series: 3257 days apart, before and after
        assert valuerep.DA(after.StudyDate) - valuerep.DA(after.SeriesDate) == \
            valuerep.DA(before.StudyDate) - valuerep.DA(before.SeriesDate) != timedelta(0)
    assert moved >= 8 and rg1


def test_a_date_shift_moves_date_times_and_replaces_what_it_cannot_read():
    dataset = Dataset()
    dataset.StudyDate, dataset.PatientBirthDate = "20040826", "19400305"
    dataset.AcquisitionDateTime = "20040826185059.000000-0400"  # (0008,002A) X/Z/D
    dataset.FrameReferenceDateTime = "2004"  # (0018,9151) D: a year alone cannot be moved by days
    deidentify_dataset(dataset, UidMap(key=KEY), date_shift_days=-10)
    assert dataset.StudyDate == "20040816" and dataset.AcquisitionDateTime == "20040816185059.000000-0400"
    assert dataset.PatientBirthDate == "19000101" and dataset.FrameReferenceDateTime == "19000101000000"
    with pytest.raises(ValueError, match="real dates"):
        deidentify_dataset(Dataset(), UidMap(), date_shift_days=0)


def test_every_profile_attribute_present_is_gone_or_replaced(export):
    actions = {tag: action for tag, action in profile_actions().items() if len(tag) == 2}
    checked = 0
    for before, after in zip(export.inputs, export.outputs, strict=True):
        for tag, action in actions.items():
            if tag[0] == 0x0002 or tag not in before or before[tag].is_empty:
                continue
            checked += 1
            if tag not in after or after[tag].is_empty:
                continue
            # Z allows "a zero length value, or a non-zero length value that may be a dummy value" (E.1-1).
            assert action != "delete", f"{before[tag].keyword} still present"
            assert after[tag].value != before[tag].value or before[tag].VR == "SQ", f"{before[tag].keyword} kept"
        assert not any(element.tag.is_private for element in after.iterall())
        assert after.PatientIdentityRemoved == "YES" and after.LongitudinalTemporalInformationModified == "REMOVED"
        assert [code.CodeValue for code in after.DeidentificationMethodCodeSequence] == ["113100"]
    assert checked >= 20, "the samples should exercise the profile"


def test_uids_are_remapped_consistently_and_pixels_unchanged(export):
    mapping: dict[str, str] = {}
    for before, after in zip(export.inputs, export.outputs, strict=True):
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            old, new = str(before[keyword].value), str(after[keyword].value)
            assert new != old and new.startswith("2.25.")
            assert mapping.setdefault(old, new) == new, f"{keyword} remapped inconsistently"
        assert after.file_meta.MediaStorageSOPInstanceUID == after.SOPInstanceUID
        assert after.PixelData == before.PixelData
        for keyword in ("Rows", "Columns", "BitsStored", "PhotometricInterpretation", "PixelRepresentation"):
            assert after.get(keyword) == before.get(keyword)
        for source, reference in zip(before.get("SourceImageSequence", []), after.get("SourceImageSequence", []),
                                     strict=True):  # X/Z/U*: the Item kept, its instance UID mapped like the rest
            assert reference.ReferencedSOPClassUID == source.ReferencedSOPClassUID
            assert reference.ReferencedSOPInstanceUID == UidMap(key=KEY)(source.ReferencedSOPInstanceUID)
            assert reference.PurposeOfReferenceCodeSequence[0].CodeValue == "121320"
    # The two RG1 files are one study (one derived from the other): still one study after export.
    rg1 = [after.StudyInstanceUID for before, after in zip(export.inputs, export.outputs, strict=True)
           if before.StudyInstanceUID == export.inputs[1].StudyInstanceUID]
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

    def failing(dataset, uid_map, **options):
        if Path(dataset.filename).name == broken:
            raise RuntimeError("simulated failure")
        return real(dataset, uid_map, **options)

    monkeypatch.setattr(deidentify, "deidentify_dataset", failing)
    summary = deidentify.deidentify_folder(dicom_dir, tmp_path / "out")
    assert [(path.name, reason) for path, reason in summary.skipped if path.suffix == ".dcm"] == \
        [(broken, "cannot de-identify: RuntimeError")]
    dicoms = [p for p in dicom_dir.iterdir() if p.suffix == ".dcm"]
    assert len(summary.written) == len(dicoms) - 1 == len(list((tmp_path / "out").iterdir()))
