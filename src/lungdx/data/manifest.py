"""Datasets as manifests: one row per image with ``path``, ``case_id``, ``patient_id`` and labels.

Adapters turn each on-disk layout into that table:

- ``manifest``: a CSV with an image column (``image``, ``path`` or ``file``, relative to the CSV),
  ``patient_id`` (recommended; without it a DICOM file's PatientID, else one patient per image) and
  any label columns.
- ``jsrt``: a folder with ``labels.csv`` (the layout of ``shared/data/jsrt`` and of lungdx's
  synthetic phantoms) or with the official ``CLNDAT_EN.txt`` / ``CNNDAT_EN.TXT`` and ``.IMG`` files.
- ``nih``: an NIH ChestX-ray14 folder: ``Data_Entry_2017*.csv`` (one 0/1 column is derived per
  finding) or a ``labels.csv`` that already has them, images under ``images/``.
- ``folders``: one sub-folder per class (``normal/``, ``nodule/``).
- ``dicom``: a folder of DICOM files; patient from PatientID (0010,0020), class from the
  sub-folder name, or from a ``labels.csv`` with ``file`` and ``label`` columns.

Where a layout gives no patient ID (class folders, a manifest without ``patient_id``, a DICOM file without
PatientID) each image is its own patient, unless ``patient_id_pattern`` reads one from the file name
(``patient_ids_from_names``). A task (``apply_task``) then picks the rows and the 0/1 ``target``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from lungdx.io import ImageReadError, sniff_format

if TYPE_CHECKING:
    from lungdx.config import DataConfig

logger = logging.getLogger(__name__)

RASTER_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".img"}
"""Suffixes taken at their word when only a DICOM file is looked for (the content of such files is not sniffed)."""
NEGATIVE_CLASS_NAMES = {"normal", "negative", "non_nodule", "no_finding", "0", "0_normal", "healthy"}
NAMED_TASKS = ("nodule_vs_normal", "malignant_vs_benign", "malignant_vs_rest")


class DatasetError(ValueError):
    """A dataset cannot be read; the message names the file or folder and the problem."""


def load_configured_dataset(data: DataConfig) -> pd.DataFrame:
    """:func:`load_dataset` with a run's data settings, so that every step of a run reads the same patient IDs (and
    so draws the same patient-level split)."""
    return load_dataset(data.path, data.format, data.patient_id_pattern)


def load_dataset(path: str | Path, format: str = "auto", patient_id_pattern: str | None = None) -> pd.DataFrame:
    """Read any supported layout into a manifest with ``path``, ``case_id`` and ``patient_id``.

    Images whose layout gives no patient ID take one from their file name by ``patient_id_pattern`` (see
    ``patient_ids_from_names``), else each is its own patient, said in a warning. IDs are stripped of
    surrounding spaces. Raises DatasetError for an image without a case or patient ID, an image or case ID
    listed twice, patient IDs that differ only in upper/lower case, and a pattern that does not match a file name.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DatasetError(f"{path}: no such file or folder")
    # Compiled before the layout is read: a typo fails at once, not after every DICOM header of a large folder.
    pattern = _patient_id_regex(patient_id_pattern, path) if patient_id_pattern else None
    format = detect_format(path) if format == "auto" else format
    readers = {"manifest": read_manifest, "jsrt": read_jsrt, "nih": read_nih,
               "folders": read_class_folders, "dicom": read_dicom_folder}
    if format not in readers:
        raise DatasetError(f"{path}: unknown dataset format '{format}' (use one of {', '.join(readers)})")
    frame = readers[format](path)
    if frame.empty:
        raise DatasetError(f"{path}: the dataset has no images")
    # Readers flag the images whose patient_id is only their case_id (``no_patient_id``); an unflagged ID was given.
    flags = frame.pop("no_patient_id") if "no_patient_id" in frame.columns else pd.Series(False, index=frame.index)
    without = flags.fillna(False).astype(bool)
    if pattern is not None:
        frame = patient_ids_from_names(frame, pattern, without, path)
    elif without.any():
        logger.warning("%s: %d of %d images have no patient ID (%s); each is treated as its own patient, so two "
                       "images of one patient could land in different splits. If the file names carry one, give "
                       "--patient-id-pattern (data.patient_id_pattern)", path, int(without.sum()), len(frame),
                       _WITHOUT_ID.get(format, "none given"))
    for column in ("case_id", "patient_id"):
        # Patient-level splits group by these: a blank one would leave its image out of every split unnoticed, and
        # "P00" beside "P00 " would put one patient's images in different splits.
        blank = frame[column].isna() | (frame[column].astype(str).str.strip() == "")
        if blank.any():
            raise DatasetError(f"{path}: {int(blank.sum())} images have no {column}, e.g. {frame['path'][blank].iloc[0]}")
        frame[column] = frame[column].astype(str).str.strip()
    for column, what in (("path", "images are listed twice"), ("case_id", "images share a case_id")):
        duplicated = frame[column].duplicated()
        if duplicated.any():
            raise DatasetError(f"{path}: {int(duplicated.sum())} {what}, e.g. {frame[column][duplicated].iloc[0]}")
    spellings = frame.groupby(frame["patient_id"].str.upper())["patient_id"].unique()
    clashing = spellings[spellings.map(len) > 1]
    if len(clashing):
        raise DatasetError(f"{path}: {len(clashing)} patient IDs are written in different upper/lower case, e.g. "
                           f"{', '.join(map(repr, clashing.iloc[0]))}: one patient's images could land in different "
                           "splits; write each patient's ID one way")
    return frame.reset_index(drop=True)


_WITHOUT_ID = {"manifest": "no patient_id column, no DICOM PatientID", "nih": "no patient_id column",
               "folders": "class folders carry none",
               "dicom": "no PatientID (0010,0020) in their headers"}


def patient_ids_from_names(frame: pd.DataFrame, pattern: str | re.Pattern, without: pd.Series,
                           source: Path) -> pd.DataFrame:
    """Give the images without a patient ID (``without``, a boolean per row) the ID in their file name.

    ``pattern`` is a regular expression searched (``re.search``) in each file name, its extension included;
    the ID is the first of its groups that took part in the match, else the whole match. Kermany's pediatric
    set, say (``person1946_bacteria_4874.jpeg``, ``NORMAL2-IM-1427-0001.jpeg``): ``(person\\d+)_|(IM-\\d+)-``.
    An ID the layout gives (a ``patient_id`` column, a DICOM PatientID) is kept, and the two kinds are joined:
    an image without one whose file name names the same patient as images with one (``s01_b.dcm`` beside
    ``s01_a.dcm`` of PatientID ``P1``) takes theirs, so one patient is never split under two IDs.

    Raises:
        DatasetError: the pattern is not a regular expression; a file name it should read does not match (its
            image would silently become a patient of its own); or a file-name patient whose images have
            several given IDs has images without one (which of them is theirs cannot be told).
    """
    compiled = _patient_id_regex(pattern, source)
    pattern = compiled.pattern
    if not without.any():
        logger.warning("%s: every image has a patient ID from its layout; the patient ID pattern %r is not used",
                       source, pattern)
        return frame
    named = frame["path"].map(lambda p: _id_in_name(compiled, Path(p).name))
    missed = without & named.isna()
    if missed.any():
        raise DatasetError(f"{source}: the patient ID pattern {pattern!r} matches no patient ID in {int(missed.sum())} "
                           f"of {int(without.sum())} file names, e.g. {frame.loc[missed[missed].index[0], 'path']}")
    frame = frame.copy()
    with_id = ~without & named.notna()
    given = frame.loc[with_id, "patient_id"].groupby(named[with_id]).unique()  # file-name patient -> given IDs
    for name_id, rows in frame.loc[without].groupby(named[without]).groups.items():
        ids = list(given.get(name_id, []))
        if len(ids) > 1:
            files = ", ".join(Path(p).name for p in frame.loc[named == name_id, "path"].head(4))
            raise DatasetError(f"{source}: the file names {files} name one patient ({name_id!r}) by the pattern "
                               f"{pattern!r}, but their images carry {len(ids)} patient IDs and {len(rows)} carry none: "
                               "give every image its patient ID, or a pattern that tells the patients apart")
        frame.loc[rows, "patient_id"] = ids[0] if ids else name_id
    joined = int((without & named.isin(given.index)).sum())
    logger.info("%s: %d images take their patient ID from their file name (%d of them the ID of their patient's other "
                "images)", source, int(without.sum()), joined)
    return frame


def _patient_id_regex(pattern: str | re.Pattern, source: Path) -> re.Pattern:
    try:
        return re.compile(pattern)  # a compiled one is returned as it is
    except re.error as err:
        raise DatasetError(f"{source}: the patient ID pattern {pattern!r} is not a regular expression: {err}") from err


def _id_in_name(pattern: re.Pattern, name: str) -> str | None:
    """The first group of ``pattern`` that took part in its match in ``name`` (else the whole match); None when none."""
    match = pattern.search(name)
    if match is None:
        return None
    found = next((group for group in match.groups() if group is not None), match.group(0))
    return found.strip() or None


def detect_format(path: Path) -> str:
    """Guess the layout of ``path`` from the files in it."""
    if path.is_file():
        return "manifest"
    names = {child.name.lower() for child in path.iterdir()}
    if "clndat_en.txt" in names or _has_jsrt_labels(path / "labels.csv"):
        return "jsrt"
    if any(name.startswith("data_entry_2017") for name in names) or _has_nih_labels(path / "labels.csv"):
        return "nih"
    if "labels.csv" in names:
        return "manifest"
    if any(_is_dicom(p) for p in path.rglob("*") if p.is_file()):  # extension-less PACS exports too
        return "dicom"
    return "folders"


def _csv_columns(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    try:
        return set(pd.read_csv(path, nrows=0).columns)
    except pd.errors.EmptyDataError as err:
        raise DatasetError(f"{path}: empty CSV, no header row") from err


def _has_jsrt_labels(path: Path) -> bool:
    return {"image", "case_id", "label", "has_nodule", "malignant"} <= _csv_columns(path)


def _has_nih_labels(path: Path) -> bool:
    return {"image", "finding_labels", "patient_id"} <= _csv_columns(path)


def read_manifest(csv_path: Path, one_image_per_patient: bool = False) -> pd.DataFrame:
    """A CSV with an image column (relative to the CSV's folder), labels and ``patient_id``.

    Without a ``patient_id`` column every image is its own patient: said in a warning, unless the
    dataset is known to be so (``one_image_per_patient``, as in JSRT).
    """
    csv_path = csv_path / "labels.csv" if csv_path.is_dir() else csv_path
    frame = _read_csv(csv_path)
    image_column = next((c for c in ("image", "path", "file", "filename") if c in frame.columns), None)
    if image_column is None:
        raise DatasetError(f"{csv_path}: no image column (expected one of image, path, file, filename)")
    frame["path"] = [str((csv_path.parent / str(p)).resolve()) for p in frame[image_column]]
    if "lung_mask" in frame.columns:  # lung-field masks (JSRT, phantoms): relative to the CSV too
        frame["lung_mask"] = [str((csv_path.parent / str(p)).resolve()) if isinstance(p, str) and p else None
                              for p in frame["lung_mask"]]
    if "case_id" not in frame.columns:
        frame["case_id"] = [Path(p).stem for p in frame["path"]]
    if "patient_id" not in frame.columns:
        # A DICOM file names its patient (0010,0020): two images of one patient must not land in two splits.
        frame["patient_id"] = [None if one_image_per_patient else _dicom_patient_id(Path(p)) for p in frame["path"]]
        own = frame["patient_id"].isna()
        frame.loc[own, "patient_id"] = frame.loc[own, "case_id"]
        frame["no_patient_id"] = own & (not one_image_per_patient)  # said, or read from the names, by load_dataset
    return frame


def _dicom_patient_id(path: Path) -> str | None:
    """The PatientID of a DICOM file; None for other files, unreadable ones and a blank ID."""
    import pydicom

    try:
        if not _is_dicom(path):
            return None
        patient = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"]).get("PatientID", "")
    except Exception:  # an unreadable file is reported, naming it, when the cache reads its pixels
        return None
    return str(patient or "").strip() or None


def _is_dicom(path: Path) -> bool:
    """True for a DICOM file (by content, else extension); files named as rasters or JSRT raw are not opened."""
    return path.suffix.lower() not in RASTER_SUFFIXES and _sniffed(path) == "dicom"


def _sniffed(path: Path) -> str | None:
    """``lungdx.io.sniff_format``, None for a file it cannot open."""
    try:
        return sniff_format(path)
    except ImageReadError:
        return None


def _image_files(folder: Path, kind: str | None = None) -> list[Path]:
    """Files under ``folder`` that lungdx reads (content first, then extension: ``lungdx.io.sniff_format``), or only
    those of ``kind``; the others are named in a warning, never dropped unsaid."""
    taken, skipped = [], []
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "labels.csv"):
        found = _sniffed(file)
        if found is not None and kind in (None, found):
            taken.append(file)
        elif not file.name.startswith("."):
            skipped.append(file)
    if skipped:
        logger.warning("%s: %d files skipped, not %s lungdx reads (e.g. %s)", folder, len(skipped),
                       "images" if kind is None else f"{kind} files", skipped[0])
    return taken


def _read_csv(csv_path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(csv_path)
    except pd.errors.EmptyDataError as err:
        raise DatasetError(f"{csv_path}: empty CSV, no header row") from err
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DatasetError(f"{csv_path}: cannot read CSV: {err}") from err


def read_jsrt(folder: Path) -> pd.DataFrame:
    """JSRT in the ``labels.csv`` layout, or the official text files beside ``.IMG`` images."""
    if (folder / "labels.csv").is_file():
        return read_manifest(folder / "labels.csv", one_image_per_patient=True)  # JSRT: one image per patient
    return read_jsrt_official(folder)


def read_jsrt_official(folder: Path) -> pd.DataFrame:
    """The official JSRT layout: ``CLNDAT_EN.txt`` (154 nodule cases), ``CNNDAT_EN.TXT`` (93).

    The files use classic-Mac CR line endings and tabs, with stray tabs splitting the location
    and diagnosis text, so the fixed leading fields are taken by position and the rest joined.
    Every JSRT image is a different patient.
    """
    nodule_file = _find_case_insensitive(folder, "CLNDAT_EN.txt")
    normal_file = _find_case_insensitive(folder, "CNNDAT_EN.TXT")
    images = {p.name.upper(): p for p in folder.rglob("*") if p.suffix.upper() == ".IMG"}
    rows = [_jsrt_nodule_row(line, nodule_file) for line in _text_lines(nodule_file)]
    rows += [_jsrt_normal_row(line, normal_file) for line in _text_lines(normal_file)]
    missing = [row["case_id"] for row in rows if row["case_id"] + ".IMG" not in images]
    if missing:
        raise DatasetError(f"{folder}: {len(missing)} .IMG files listed in the JSRT label files are missing, e.g. {missing[0]}.IMG")
    for row in rows:
        row["path"] = str(images[row["case_id"] + ".IMG"].resolve())
        row["patient_id"] = row["case_id"]
    return pd.DataFrame(rows)


def _find_case_insensitive(folder: Path, name: str) -> Path:
    for child in folder.rglob("*"):
        if child.name.lower() == name.lower():
            return child
    raise DatasetError(f"{folder}: {name} not found")


def _text_lines(path: Path) -> list[str]:
    text = path.read_bytes().decode("latin-1").replace("\r\n", "\n").replace("\r", "\n")
    return [line for line in text.split("\n") if line.strip().upper().startswith("JPC")]


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("nan")  # JSRT marks an unknown age with '?'


def _jsrt_nodule_row(line: str, source: Path) -> dict:
    fields = line.split()
    if len(fields) < 8:
        raise DatasetError(f"{source}: cannot parse line {line!r}")
    name, subtlety, size_mm, age, sex, x, y, diagnosis_class = fields[:8]
    malignant = {"malignant": 1, "benign": 0}.get(diagnosis_class.lower())
    if malignant is None:
        raise DatasetError(f"{source}: unknown class {diagnosis_class!r} in line {line!r}")
    return {"case_id": Path(name).stem.upper(), "label": diagnosis_class.lower(), "has_nodule": 1,
            "malignant": malignant, "subtlety": int(subtlety), "size_mm": float(size_mm),
            "age": _number(age), "sex": sex.lower(), "nodule_x_2048": float(x), "nodule_y_2048": float(y),
            "remarks": " ".join(line.split("\t")[8:]).strip()}


def _jsrt_normal_row(line: str, source: Path) -> dict:
    fields = line.split()
    if len(fields) < 3:
        raise DatasetError(f"{source}: cannot parse line {line!r}")
    return {"case_id": Path(fields[0]).stem.upper(), "label": "non_nodule", "has_nodule": 0,
            "malignant": np.nan, "age": _number(fields[1]), "sex": fields[2].lower()}


NIH_FINDINGS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema",
                "Fibrosis", "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening",
                "Pneumonia", "Pneumothorax")


def read_nih(folder: Path) -> pd.DataFrame:
    """NIH ChestX-ray14: ``Data_Entry_2017*.csv`` or a ``labels.csv`` with 0/1 finding columns."""
    entries = sorted(folder.glob("Data_Entry_2017*.csv"))
    if not entries:
        frame = read_manifest(folder / "labels.csv")
    else:
        frame = _read_csv(entries[0])
        missing = {"Image Index", "Finding Labels", "Patient ID"} - set(frame.columns)
        if missing:
            raise DatasetError(f"{entries[0]}: missing columns {sorted(missing)}")
        findings = frame["Finding Labels"].fillna("").str.split("|")
        for finding in NIH_FINDINGS:
            frame[finding.lower()] = findings.map(lambda labels, f=finding: int(f in labels))
        frame["no_finding"] = findings.map(lambda labels: int("No Finding" in labels))
        frame["path"] = [str((folder / "images" / name).resolve()) for name in frame["Image Index"]]
        frame["case_id"] = frame["Image Index"].map(lambda n: Path(n).stem)
        frame["patient_id"] = frame["Patient ID"]
    if "nodule_or_mass" not in frame.columns and {"nodule", "mass"} <= set(frame.columns):
        frame["nodule_or_mass"] = (frame["nodule"] + frame["mass"] > 0).astype(int)
    if "abnormal" not in frame.columns and "no_finding" in frame.columns:
        frame["abnormal"] = 1 - frame["no_finding"]
    return frame


def read_class_folders(folder: Path) -> pd.DataFrame:
    """One sub-folder per class; every image is its own patient unless a manifest says otherwise."""
    rows = []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        for image in _image_files(class_dir):
            rows.append({"path": str(image.resolve()), "case_id": image.stem, "label": class_dir.name,
                         "relative": image.relative_to(folder).with_suffix("").as_posix()})
    if not rows:
        raise DatasetError(f"{folder}: no class sub-folders with images (PNG, JPEG, TIFF, DICOM or JSRT .IMG)")
    frame = pd.DataFrame(rows)
    # The same file name in two folders (normal/001.png, nodule/001.png) is two cases: named by their relative paths.
    clash = frame["case_id"].duplicated(keep=False)
    frame.loc[clash, "case_id"] = frame.loc[clash, "relative"]
    frame = frame.drop(columns="relative")
    frame["patient_id"] = frame["case_id"]
    frame["no_patient_id"] = True  # said, or read from the names, by load_dataset
    return frame


def read_dicom_folder(folder: Path) -> pd.DataFrame:
    """DICOM files under ``folder``: patient from PatientID (0010,0020), class from folder or CSV."""
    import pydicom

    rows = []
    for file in _image_files(folder, "dicom"):  # extension-less PACS exports too
        try:
            header = pydicom.dcmread(file, stop_before_pixels=True)
        except Exception as err:  # pydicom raises many types for bad files
            logger.warning("%s: skipped, not a readable DICOM file (%s)", file, err)
            continue
        patient = str(header.get("PatientID", "") or "").strip()
        rows.append({"path": str(file.resolve()), "case_id": str(header.get("SOPInstanceUID", file.stem)),
                     "patient_id": patient or file.stem, "no_patient_id": not patient,
                     "label": file.parent.name if file.parent != folder else np.nan})
    if not rows:
        raise DatasetError(f"{folder}: no readable DICOM files")
    frame = pd.DataFrame(rows)
    labels_csv = folder / "labels.csv"
    if labels_csv.is_file():
        labels = _read_csv(labels_csv)
        key = next((c for c in ("file", "image", "path") if c in labels.columns), None)
        if key is None:
            raise DatasetError(f"{labels_csv}: needs a file column (file, image or path)")
        labels["path"] = [str((folder / str(p)).resolve()) for p in labels.pop(key)]
        # The CSV's own columns (a label, and patient_id or case_id where it gives them) win over the headers'.
        frame = frame.drop(columns=[c for c in labels.columns if c != "path" and c in frame.columns] + ["label"],
                           errors="ignore").merge(labels, on="path", how="left")
        if "patient_id" in labels.columns:  # given IDs: a blank one is an error of load_dataset, not a patient's own
            frame["no_patient_id"] = False
    return frame  # a file without PatientID is said, or read from its name, by load_dataset


def apply_task(frame: pd.DataFrame, task: str) -> pd.DataFrame:
    """Rows that take part in ``task`` and their 0/1 ``target`` column.

    Tasks: ``nodule_vs_normal`` (all images), ``malignant_vs_benign`` (nodule cases only),
    ``malignant_vs_rest`` (all images; non-nodule counts as negative), a binary column name, or
    ``COLUMN=VALUE`` (target is 1 where the column equals VALUE).
    """
    frame = frame.copy()
    if task == "nodule_vs_normal":
        target = _column(frame, "has_nodule", task)
    elif task == "malignant_vs_benign":
        frame = frame[_column(frame, "has_nodule", task) == 1].copy()
        target = _column(frame, "malignant", task)
    elif task == "malignant_vs_rest":  # an image without a nodule is negative; a nodule of unknown malignancy is left out
        malignant = _column(frame, "malignant", task)
        target = malignant.where(_column(frame, "has_nodule", task) == 1, 0) if "has_nodule" in frame.columns \
            else malignant.fillna(0)
    elif "=" in task:
        column, value = task.split("=", 1)
        values = _column(frame, column, task)
        number = pd.to_numeric(pd.Series([value]), errors="coerce").iloc[0]
        if pd.api.types.is_numeric_dtype(values) and pd.notna(number):  # subtlety=5 on a column read as 5.0
            target = (values == number).astype(float).where(values.notna())
        else:
            target = (values.astype(str) == value).astype(float).where(values.notna())
    else:
        target = _binary_column(frame, task)
    frame["target"] = target
    dropped = int(frame["target"].isna().sum())
    if dropped:
        logger.info("task %s: %d images without a label are left out", task, dropped)
    frame = frame[frame["target"].notna()].copy()
    frame["target"] = frame["target"].astype(int)
    classes = sorted(frame["target"].unique())
    if classes != [0, 1]:
        raise DatasetError(f"task '{task}' needs both classes 0 and 1 in the data; found {classes}")
    return frame.reset_index(drop=True)


def _column(frame: pd.DataFrame, column: str, task: str) -> pd.Series:
    if column not in frame.columns:
        raise DatasetError(f"task '{task}' needs a '{column}' column; the dataset has: {', '.join(map(str, frame.columns))}")
    return pd.to_numeric(frame[column], errors="coerce") if column in {"has_nodule", "malignant"} else frame[column]


def _binary_column(frame: pd.DataFrame, task: str) -> pd.Series:
    if task not in frame.columns:
        raise DatasetError(f"unknown task '{task}': not one of {', '.join(NAMED_TASKS)}, not a column of the dataset, "
                           f"and not COLUMN=VALUE (columns: {', '.join(map(str, frame.columns))})")
    values = frame[task]
    mapping = {"1": 1.0, "0": 0.0, "true": 1.0, "false": 0.0, "1.0": 1.0, "0.0": 0.0, "yes": 1.0, "no": 0.0}
    as_text = values.dropna().astype(str).str.strip().str.lower()
    if not set(as_text.unique()) <= set(mapping):
        distinct = sorted(set(as_text.unique()))[:6]
        raise DatasetError(f"column '{task}' is not binary (values {distinct}); use '{task}=VALUE' to pick the positive class")
    return values.map(lambda v: mapping[str(v).strip().lower()] if pd.notna(v) else np.nan)


def class_names(task: str) -> tuple[str, str]:
    """(negative, positive) class names of a task, for reports and predictions."""
    names = {"nodule_vs_normal": ("normal", "nodule"), "malignant_vs_benign": ("benign", "malignant"),
             "malignant_vs_rest": ("not malignant", "malignant")}
    if task in names:
        return names[task]
    if "=" in task:
        column, value = task.split("=", 1)
        return (f"not {value}", value)
    return (f"no {task}", task)


def describe_classes(frame: pd.DataFrame) -> str:
    """'n images (p positive, q negative) from k patients', for logs and reports."""
    positives = int(frame["target"].sum())
    return (f"{len(frame)} images ({positives} positive, {len(frame) - positives} negative) "
            f"from {frame['patient_id'].nunique()} patients")
