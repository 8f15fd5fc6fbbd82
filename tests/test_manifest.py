"""Dataset adapters and tasks, on the real JSRT and NIH folders (skipped without ../shared/data)."""

import numpy as np
import pandas as pd
import pytest

from lungdx.data.manifest import DatasetError, apply_task, detect_format, load_dataset
from lungdx.io import write_jsrt_raw


def test_jsrt_labels_give_the_published_counts(jsrt_dir):
    frame = load_dataset(jsrt_dir)
    assert detect_format(jsrt_dir) == "jsrt"
    assert len(frame) == 247
    assert frame["label"].value_counts().to_dict() == {"malignant": 100, "non_nodule": 93, "benign": 54}
    assert frame["patient_id"].nunique() == 247  # every JSRT image is a different patient
    assert all(pd.io.common.file_exists(p) for p in frame["path"])


@pytest.mark.parametrize("task, n, n_pos", [("nodule_vs_normal", 247, 154), ("malignant_vs_benign", 154, 100),
                                            ("malignant_vs_rest", 247, 100)])
def test_jsrt_tasks(jsrt_dir, task, n, n_pos):
    frame = apply_task(load_dataset(jsrt_dir), task)
    assert (len(frame), int(frame["target"].sum())) == (n, n_pos)


def test_official_jsrt_layout_matches_labels_csv(jsrt_dir, tmp_path):
    """The official CLNDAT_EN.txt / CNNDAT_EN.TXT parser agrees with labels.csv (with fake .IMG files)."""
    for name in (jsrt_dir / "raw_labels").iterdir():
        (tmp_path / name.name).write_bytes(name.read_bytes())
    reference = load_dataset(jsrt_dir).set_index("case_id")
    blank = np.zeros((4, 4), dtype=np.float32)
    for case_id in reference.index:
        write_jsrt_raw(tmp_path / f"{case_id}.IMG", blank)
    official = load_dataset(tmp_path).set_index("case_id")
    assert detect_format(tmp_path) == "jsrt"
    assert len(official) == 247
    joined = official.merge(reference, left_index=True, right_index=True, suffixes=("", "_ref"))
    assert (joined["label"] == joined["label_ref"]).all()
    nodules = joined[joined["has_nodule"] == 1]
    np.testing.assert_array_equal(nodules["size_mm"], nodules["size_mm_ref"])
    np.testing.assert_array_equal(nodules["nodule_x_2048"], nodules["nodule_x_2048_ref"])
    assert official["age"].isna().sum() == 2  # JPCLN106 and JPCLN117 are '?'


def test_official_jsrt_missing_image_is_named(jsrt_dir, tmp_path):
    for name in (jsrt_dir / "raw_labels").iterdir():
        (tmp_path / name.name).write_bytes(name.read_bytes())
    with pytest.raises(DatasetError, match=r"JPC.*\.IMG"):
        load_dataset(tmp_path)


def test_nih_subset(nih_dir):
    folder = nih_dir
    frame = load_dataset(folder)
    assert detect_format(folder) == "nih" and len(frame) == 1000
    assert frame["patient_id"].nunique() == 264
    nodule = apply_task(frame, "nodule")
    assert int(nodule["target"].sum()) == 39
    assert int(apply_task(frame, "nodule_or_mass")["target"].sum()) == 70


def test_nih_data_entry_layout(tmp_path):
    (tmp_path / "images").mkdir()
    pd.DataFrame({"Image Index": ["00000001_000.png", "00000001_001.png", "00000002_000.png"],
                  "Finding Labels": ["Nodule|Effusion", "No Finding", "Mass"],
                  "Patient ID": [1, 1, 2]}).to_csv(tmp_path / "Data_Entry_2017_v2020.csv", index=False)
    frame = load_dataset(tmp_path)
    assert frame["nodule"].tolist() == [1, 0, 0]
    assert frame["nodule_or_mass"].tolist() == [1, 0, 1]
    assert frame["patient_id"].tolist() == ["1", "1", "2"]


def test_generic_manifest_and_value_task(tmp_path):
    pd.DataFrame({"image": ["a.png", "b.png", "c.png", "d.png"], "label": ["normal", "pneumonia", "normal", "pneumonia"],
                  "patient_id": ["p1", "p1", "p2", "p3"]}).to_csv(tmp_path / "m.csv", index=False)
    frame = apply_task(load_dataset(tmp_path / "m.csv"), "label=pneumonia")
    assert frame["target"].tolist() == [0, 1, 0, 1]
    assert frame["path"].iloc[0] == str((tmp_path / "a.png").resolve())
    with pytest.raises(DatasetError, match="not binary"):
        apply_task(load_dataset(tmp_path / "m.csv"), "label")
    with pytest.raises(DatasetError, match="unknown task 'nodule'"):
        apply_task(load_dataset(tmp_path / "m.csv"), "nodule")


def test_class_folders(tmp_path):
    for name in ("normal", "nodule"):
        (tmp_path / name).mkdir()
        for index in range(2):
            (tmp_path / name / f"{name}{index}.png").write_bytes(b"")
    frame = apply_task(load_dataset(tmp_path), "label=nodule")
    assert detect_format(tmp_path) == "folders"
    assert sorted(frame["target"]) == [0, 0, 1, 1]


def test_dicom_folder(dicom_dir):
    frame = load_dataset(dicom_dir, "dicom")
    assert len(frame) == 5 and frame["patient_id"].notna().all()
    assert frame["case_id"].str.match(r"^[0-9.]+$").all()  # SOP Instance UIDs


def test_missing_path_is_named(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        load_dataset(tmp_path / "nothing")


def _manifest(tmp_path, **columns):
    count = len(next(iter(columns.values())))
    frame = pd.DataFrame({"image": [f"{index}.png" for index in range(count)], **columns})
    frame.to_csv(tmp_path / "m.csv", index=False)
    return tmp_path / "m.csv"


def test_patient_ids_that_would_split_one_patient_are_refused_or_mended(tmp_path):
    """A blank ID would leave its image out of every split; 'P1 ' beside 'P1' or 'p1' would split one patient."""
    with pytest.raises(DatasetError, match="m.csv: 1 images have no patient_id"):
        load_dataset(_manifest(tmp_path, label=[0, 1, 0], patient_id=["p1", None, "p2"]))
    frame = load_dataset(_manifest(tmp_path, label=[0, 1, 0, 1], patient_id=["P1", " P1 ", "P2", "P2"]))
    assert frame["patient_id"].tolist() == ["P1", "P1", "P2", "P2"]
    with pytest.raises(DatasetError, match="1 patient IDs are written in different upper/lower case, e.g. 'P1', 'p1'"):
        load_dataset(_manifest(tmp_path, label=[0, 1, 0], patient_id=["P1", "p1", "P2"]))
    with pytest.raises(DatasetError, match="1 images share a case_id, e.g. c1"):
        load_dataset(_manifest(tmp_path, label=[0, 1], patient_id=["P1", "P2"], case_id=["c1", "c1"]))


def test_one_file_name_in_two_class_folders_is_two_cases(tmp_path):
    for name in ("normal", "nodule"):
        (tmp_path / name).mkdir()
        for stem in ("001", name):
            (tmp_path / name / f"{stem}.png").write_bytes(b"")
    frame = load_dataset(tmp_path)
    assert sorted(frame["case_id"]) == ["nodule", "nodule/001", "normal", "normal/001"]
    assert frame["patient_id"].nunique() == 4


def test_a_value_task_on_a_number_column_with_blanks(tmp_path):
    # A blank makes pandas read the column as float (5.0): subtlety=5 still picks the fives.
    frame = apply_task(load_dataset(_manifest(tmp_path, subtlety=[5, 3, None, 5])), "subtlety=5")
    assert frame["target"].tolist() == [1, 0, 1]


def test_a_dicom_folders_labels_csv_may_give_the_patient_ids(dicom_dir, tmp_path):
    for file in sorted(dicom_dir.glob("*.dcm"))[:2]:
        (tmp_path / file.name).symlink_to(file)
    names = sorted(p.name for p in tmp_path.glob("*.dcm"))
    pd.DataFrame({"file": names, "label": [0, 1], "patient_id": ["A", "B"]}).to_csv(tmp_path / "labels.csv", index=False)
    frame = load_dataset(tmp_path, "dicom")
    assert sorted(frame["patient_id"]) == ["A", "B"] and sorted(frame["label"]) == [0, 1]


def _write_dicom(path, patient: str) -> None:
    """A minimal PS3.10 file (header only: the dataset readers never decode pixels)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID, dataset.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    dataset.PatientID = patient
    dataset.save_as(path, enforce_file_format=True)


def test_a_labels_csv_beside_dicom_files_takes_the_patients_from_their_headers(tmp_path):
    # The README's layout (DICOM files and a labels.csv of file,label) is detected as a manifest; without a
    # patient_id column each image was its own patient, so one patient's two images could land in two splits.
    names = [f"{patient}_{view}.dcm" for patient in ("p1", "p2") for view in ("a", "b")]
    for name in names:
        _write_dicom(tmp_path / name, patient=name.split("_")[0].upper())
    pd.DataFrame({"file": names, "label": [0, 0, 1, 1]}).to_csv(tmp_path / "labels.csv", index=False)
    frame = load_dataset(tmp_path)
    assert detect_format(tmp_path) == "manifest"
    assert frame.set_index("file")["patient_id"].to_dict() == {name: name.split("_")[0].upper() for name in names}


def test_extension_less_dicom_files_are_read_and_other_files_named(tmp_path, caplog):
    for index, patient in enumerate(("A", "A", "B")):
        _write_dicom(tmp_path / f"IM{index:04d}", patient)
    (tmp_path / "README.txt").write_text("exported from the PACS")
    assert detect_format(tmp_path) == "dicom"
    with caplog.at_level("WARNING"):
        frame = load_dataset(tmp_path)
    assert sorted(frame["patient_id"]) == ["A", "A", "B"]
    assert "1 files skipped, not dicom files lungdx reads (e.g. " in caplog.text and "README.txt" in caplog.text


def test_class_folders_take_tiff_and_name_what_they_skip(tmp_path, caplog):
    for name in ("normal", "nodule"):
        (tmp_path / name).mkdir()
        (tmp_path / name / f"{name}.tif").write_bytes(b"II*\x00")
    (tmp_path / "nodule" / "notes.txt").write_text("two cases to review")
    with caplog.at_level("WARNING"):
        frame = load_dataset(tmp_path)
    assert sorted(frame["case_id"]) == ["nodule", "normal"]
    assert "notes.txt" in caplog.text


def test_an_empty_labels_csv_is_named(tmp_path):
    (tmp_path / "labels.csv").write_text("")
    with pytest.raises(DatasetError, match=r"labels.csv: empty CSV"):
        load_dataset(tmp_path)


KERMANY_PATTERN = r"(person\d+)_|(IM-\d+)-"


def test_kermany_file_names_give_the_patient_ids(shared_data):
    # Kermany's pediatric set names each patient in its file names and has no patient_id column: without the
    # pattern each image is its own patient, so a patient's two films could land in train and test.
    folder = shared_data / "kermany_pediatric_cxr_val16"
    if not (folder / "labels.csv").is_file():
        pytest.skip("../shared/data/kermany_pediatric_cxr_val16 not found: the Kermany test needs it")
    alone = load_dataset(folder)
    frame = load_dataset(folder, patient_id_pattern=KERMANY_PATTERN).set_index("case_id")
    assert alone["patient_id"].nunique() == len(alone) == 16
    assert frame.loc["person1946_bacteria_4874", "patient_id"] == frame.loc["person1946_bacteria_4875", "patient_id"] \
        == "person1946"
    assert frame.loc["NORMAL2-IM-1427-0001", "patient_id"] == "IM-1427"
    assert frame["patient_id"].nunique() == 15  # 16 films, one patient with two


def test_a_patient_id_pattern_fills_only_the_missing_ids(tmp_path, caplog):
    names = ["s01_a.dcm", "s01_b.dcm", "x9_a.dcm"]
    for name, patient in zip(names, ("P1", "", "P2"), strict=True):
        _write_dicom(tmp_path / name, patient=patient)
    with caplog.at_level("WARNING"):
        plain = load_dataset(tmp_path, "dicom").set_index(pd.Index(names))
    assert plain["patient_id"].tolist() == ["P1", "s01_b", "P2"]
    assert "1 of 3 images have no patient ID (no PatientID (0010,0020) in their headers)" in caplog.text
    assert "--patient-id-pattern" in caplog.text
    read = load_dataset(tmp_path, "dicom", patient_id_pattern=r"^(s\d+)_").set_index(pd.Index(names))
    # x9_a.dcm does not match, but its header gives P2: the pattern reads only the IDs the layout lacks. s01_b.dcm
    # names the patient of s01_a.dcm, whose header says P1: it takes P1, not 's01' (one patient, two IDs, two splits).
    assert read["patient_id"].tolist() == ["P1", "P1", "P2"]
    _write_dicom(tmp_path / "s01_c.dcm", patient="P9")  # s01 now has two given IDs: whose is s01_b's?
    with pytest.raises(DatasetError, match=r"name one patient \('s01'\) .* carry 2 patient IDs and 1 carry none"):
        load_dataset(tmp_path, "dicom", patient_id_pattern=r"^(s\d+)_")


def test_class_folders_with_a_patient_id_pattern(tmp_path, caplog):
    for name, files in (("normal", ["pat7-1.png", "pat8-1.png"]), ("nodule", ["pat7-2.png", "pat9-1.png"])):
        (tmp_path / name).mkdir()
        for file in files:
            (tmp_path / name / file).write_bytes(b"")
    frame = load_dataset(tmp_path, patient_id_pattern=r"pat\d+").set_index("case_id")
    assert frame["patient_id"].to_dict() == {"pat7-1": "pat7", "pat8-1": "pat8", "pat7-2": "pat7", "pat9-1": "pat9"}
    assert "own patient" not in caplog.text  # read from the names: nothing to warn about
    (tmp_path / "normal" / "anonymous.png").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"matches no patient ID in 1 of 5 file names, e\.g\. .*anonymous\.png"):
        load_dataset(tmp_path, patient_id_pattern=r"pat\d+")
    with pytest.raises(DatasetError, match="is not a regular expression") as raised:
        load_dataset(tmp_path, patient_id_pattern=r"(pat\d+")
    assert str(raised.value).startswith(f"{tmp_path}: "), raised.value  # which dataset's pattern
    # Checked before the layout is read: an empty folder would otherwise fail first, for want of images.
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="is not a regular expression"):
        load_dataset(tmp_path / "empty", patient_id_pattern=r"(pat\d+")


def test_a_runs_data_settings_reach_the_loader(tmp_path):
    # Training and the explanation steps load through load_configured_dataset: the pattern must reach it, or the
    # run's split and its explanations would see other patients.
    from lungdx.config import DataConfig
    from lungdx.data.manifest import load_configured_dataset

    for name, file in (("normal", "pat7-1.png"), ("nodule", "pat7-2.png")):
        (tmp_path / name).mkdir()
        (tmp_path / name / file).write_bytes(b"")
    frame = load_configured_dataset(DataConfig(path=str(tmp_path), format="folders", patient_id_pattern=r"pat\d+"))
    assert frame["patient_id"].tolist() == ["pat7", "pat7"]


def test_a_patient_id_pattern_leaves_given_ids_alone(tmp_path, caplog):
    pd.DataFrame({"image": ["p1_a.png", "p1_b.png"], "label": ["normal", "nodule"],
                  "patient_id": ["A", "B"]}).to_csv(tmp_path / "m.csv", index=False)
    with caplog.at_level("WARNING"):
        frame = load_dataset(tmp_path / "m.csv", patient_id_pattern=r"^(p\d+)_")
    assert frame["patient_id"].tolist() == ["A", "B"]
    assert "every image has a patient ID from its layout; the patient ID pattern" in caplog.text
