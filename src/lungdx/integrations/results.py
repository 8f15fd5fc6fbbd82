"""Results put back into the original study: a TID 1500 Comprehensive SR and a heatmap Secondary Capture.

Both share the source's Study Instance UID (0020,000D) and patient module, each gets its own series
(``highdicom`` copies the patient and study modules from the evidence). Their UIDs are derived from
the source's SOP Instance UID and the model version (:func:`result_uid`), so the result of one
model version for one image is one instance, whatever the number of runs: a PACS that receives it
again stores nothing new, and ``pacs_run`` finds it in the study and skips the image.

The SR follows TID 1500 (Measurement Report) with one TID 1501 group: finding type "lung nodule",
a qualitative evaluation of the malignancy likelihood (high or low at the model's operating
threshold), the probability as a numeric value (DCM 111047 "Probability of cancer", UCUM "1"; a
``nodule_vs_normal`` model's is "Probability of lung nodule" and its likelihood that of a nodule,
:func:`task_concepts`), and TID 4019 Algorithm Identification with the model's name and version, as
IHE AI Results (AIR) asks. Concepts with no DICOM or SNOMED code are in the private coding scheme
``99LUNGDX`` (PS3.16 8.2 allows a "99" prefixed local scheme).
"""

from __future__ import annotations

import contextlib
import copy
import re
import uuid
import warnings
from collections.abc import Sequence

import cv2
import numpy as np
from pydicom import valuerep
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from lungdx.wording import ResultStatement

MANUFACTURER = "lungdx"
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
NOT_FOR_DIAGNOSIS = "NOT FOR DIAGNOSTIC USE"
SC_MAX_SIDE_PX = 1024
"""The overlay is downscaled to this side: it is a pointer for the reader, not a diagnostic image."""

_PRIVATE = "99LUNGDX"
_UID_NAMESPACE = uuid.UUID("6f1c2b5e-8d0a-5b7e-9a43-1c2d3e4f5a6b")
"""lungdx's namespace for name-based (version 5) UUIDs."""


def result_uid(source_uid: str, model_version: str, role: str) -> str:
    """A UID for one role (``sr``, ``sr_series``, ``sc``, ...) of the result of ``model_version`` on one source image.

    A UUID-derived UID (PS3.5 B.2, root 2.25) from a name-based UUID (RFC 4122 version 5) of the three,
    so the same inputs always give the same UID and different inputs practically never collide.
    """
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, f'{source_uid}/{model_version}/{role}').int}"


_MALIGNANCY = {"probability": ("111047", "DCM", "Probability of cancer"),
               "likelihood": ("LD-0001", _PRIVATE, "Likelihood of malignancy"),
               "high": ("LD-0002", _PRIVATE, "High likelihood of malignancy"),
               "low": ("LD-0003", _PRIVATE, "Low likelihood of malignancy"),
               "text": "Lung nodule malignancy probability"}
_PRESENCE = {"probability": ("LD-0006", _PRIVATE, "Probability of lung nodule"),
             "likelihood": ("LD-0007", _PRIVATE, "Likelihood of lung nodule"),
             "high": ("LD-0008", _PRIVATE, "High likelihood of lung nodule"),
             "low": ("LD-0009", _PRIVATE, "Low likelihood of lung nodule"),
             "text": "Lung nodule presence probability"}
_TASK_CONCEPTS = {"malignant_vs_rest": _MALIGNANCY, "malignant_vs_benign": _MALIGNANCY, "nodule_vs_normal": _PRESENCE}


def task_concepts(task: str) -> dict:
    """What a model's probability means, as the SR and the FHIR Observation code it: (code, scheme, meaning) per
    concept, and ``text`` for FHIR. A malignancy model's probability is DCM 111047 "Probability of cancer"; a
    nodule-presence model's is not a cancer probability and gets lungdx's private codes.

    Raises:
        ValueError: any other task (a column task such as ``label=pneumonia``): its results are not coded for a
            PACS or an EHR, rather than sent under a nodule or cancer code they do not measure.
    """
    if task not in _TASK_CONCEPTS:
        raise ValueError(f"results for a PACS or an EHR are coded for lungdx's nodule tasks ({', '.join(_TASK_CONCEPTS)}); "
                         f"this model's task is {task!r}")
    return _TASK_CONCEPTS[task]


def _codes(task: str):
    """The coded concepts of the report (highdicom imported here: it is an optional dependency)."""
    from highdicom.sr import CodedConcept

    meaning = {key: CodedConcept(*value) for key, value in task_concepts(task).items() if key != "text"}
    return {
        "finding": CodedConcept("786838002", "SCT", "Nodule of lung"),
        "site": CodedConcept("39607008", "SCT", "Lung"),
        **meaning,
        "unit": CodedConcept("1", "UCUM", "no units"),
        "procedure": CodedConcept("399208008", "SCT", "Plain chest X-ray"),
        "threshold": CodedConcept("LD-0004", _PRIVATE, "Operating threshold"),
        "near": CodedConcept("LD-0005", _PRIVATE, "Probability near the operating threshold"),
        "yes": CodedConcept("373066001", "SCT", "Yes"),
        "no": CodedConcept("373067005", "SCT", "No"),
        "evaluations": CodedConcept("C0034375", "UMLS", "Qualitative Evaluations"),
        "comment": CodedConcept("121106", "DCM", "Comment"),
    }


def make_sr(source: Dataset, statement: ResultStatement, identity: dict, location: dict | None = None) -> Dataset:
    """A Comprehensive SR (TID 1500) holding one image's result, in the source's study.

    The measurement group holds the probability and the operating threshold (numeric), the likelihood
    (high or low at the threshold) and whether the probability is near the threshold (coded); the
    report's Qualitative Evaluations container (TID 1500 row 12) holds the statement's sentences
    (``lungdx.wording``): threshold and how it was chosen, uncertainty, active alerts, not for clinical use.

    Args:
        source: the analysed instance (its patient, study and SOP references are copied).
        statement: ``wording.state_result`` of the prediction.
        identity: ``checkpoint.model_identity`` of the model.
        location: a localising model's ``Prediction.location``: added as a second measurement group
            (TID 1410 planar ROI) whose image region is a SCOORD CIRCLE on the source image.
    """
    import highdicom as hd

    codes = _codes(identity["task"])

    def uid(role: str) -> str:
        return result_uid(str(source.SOPInstanceUID), identity["version"], role)

    algorithm = hd.sr.AlgorithmIdentification(name=identity["name"], version=identity["version"],
                                              manufacturer=MANUFACTURER)
    measurements = [hd.sr.Measurement(name=codes["probability"], value=float(statement.probability), unit=codes["unit"],
                                      algorithm_id=algorithm)]
    evaluations = []
    if statement.threshold is not None:
        high = statement.probability >= statement.threshold
        measurements.append(hd.sr.Measurement(name=codes["threshold"], value=statement.threshold, unit=codes["unit"],
                                              algorithm_id=algorithm))
        evaluations = [hd.sr.QualitativeEvaluation(name=codes["likelihood"], value=codes["high" if high else "low"]),
                       hd.sr.QualitativeEvaluation(name=codes["near"], value=codes["yes" if statement.near_threshold else "no"])]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uid("finding"), identifier="lungdx finding 1"),
        finding_type=codes["finding"], algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(codes["site"])], measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)])
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=result_uid("", identity["version"], "device"), name=identity["name"], manufacturer_name=MANUFACTURER,
        model_name=f"{identity['model']} {identity['version']}")
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"), observer_identifying_attributes=device))
    groups = [group] if location is None else [group, _location_group(source, location, algorithm, codes, uid("location"))]
    report = hd.sr.MeasurementReport(observation_context=context, procedure_reported=codes["procedure"],
                                     imaging_measurements=groups)
    statements = hd.sr.ContainerContentItem(name=codes["evaluations"], relationship_type="CONTAINS")
    statements.ContentSequence = [hd.sr.TextContentItem(name=codes["comment"], value=sentence, relationship_type="CONTAINS")
                                  for sentence in statement.sentences if sentence]
    report[0].ContentSequence.append(statements)
    header = evidence_header(source)
    with _quiet_names():
        sr = hd.sr.ComprehensiveSR(
            evidence=[header], content=report, series_instance_uid=uid("sr_series"), series_number=SR_SERIES_NUMBER,
            sop_instance_uid=uid("sr"), instance_number=1, manufacturer=MANUFACTURER, is_complete=True,
            series_description=f"lungdx AI result ({identity['model']} {identity['version']})",
            software_versions=identity["software_version"], manufacturer_model_name=identity["model"],
            specific_character_set=None)
    return _with_character_set(sr, header)


def _location_group(source: Dataset, location: dict, algorithm, codes, tracking_uid: str):
    """TID 1410: the nodule map's peak as a circle (centre, a point on the circumference) on the source image.

    SCOORD pixel coordinates put (0, 0) at the top-left corner of the top-left pixel (PS3.3 C.18.6.1.1),
    so a pixel centre at integer (column, row) is (column + 0.5, row + 0.5).
    """
    import highdicom as hd

    x, y, radius = location["x"] + 0.5, location["y"] + 0.5, max(float(location["radius"]), 1.0)
    columns, rows = int(source.Columns), int(source.Rows)
    x, y = min(max(x, 0.0), columns), min(max(y, 0.0), rows)
    edge = x + radius if x + radius <= columns else max(x - radius, 0.0)  # the point on the circle inside the image
    region = hd.sr.ImageRegion(graphic_type=hd.sr.GraphicTypeValues.CIRCLE,
                               graphic_data=np.array([[x, y], [edge, y]], dtype=float),
                               source_image=hd.sr.SourceImageForRegion.from_source_image(source))
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier="lungdx nodule location 1"),
        referenced_region=region, finding_type=codes["finding"], algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(codes["site"])])


def read_sr_location(sr: Dataset) -> tuple[float, float, float] | None:
    """(column, row, radius) in source-image pixels (centres at integers) of ``make_sr``'s circle, or None."""
    import highdicom as hd

    report = hd.sr.ComprehensiveSR.from_dataset(sr, copy=True)
    for group in report.content.get_planar_roi_measurement_groups():
        region = group.roi
        if region is not None and region.graphic_type == hd.sr.GraphicTypeValues.CIRCLE:
            (x, y), (edge_x, edge_y) = region.value
            return float(x) - 0.5, float(y) - 0.5, float(np.hypot(edge_x - x, edge_y - y))
    return None


IDENTIFYING = ("PatientID", "IssuerOfPatientID", "StudyID", "AccessionNumber")
"""Attributes the PACS and the EHR file a result under (all VM 1, PS3.6), copied into the results: never cut to one value."""


class AmbiguousIdentifier(ValueError):
    """An identifying attribute (``IDENTIFYING``) with more than one value: a result filed under one of them could go to
    another patient's record or order, so none is made. The text names the attribute, never its values."""

    def __init__(self, keyword: str, count: int):
        super().__init__(f"{keyword} has {count} values where the standard allows one (PS3.6): a result filed under one "
                         "of them could go to another patient's record, so none is made")
        self.keyword = keyword


def check_identifiers(source: Dataset) -> None:
    """Raise ``AmbiguousIdentifier`` for the first identifying attribute of ``source`` with more than one value."""
    for keyword in IDENTIFYING:
        if keyword in source and source[keyword].VM > 1:
            raise AmbiguousIdentifier(keyword, source[keyword].VM)


def evidence_header(source: Dataset) -> Dataset:
    """The source's header without pixels, with the Type 2 patient and study attributes highdicom copies.

    Patient (PS3.3 C.7.1.1) and General Study (C.7.2.1) Type 2 attributes may be absent in a
    received file; they are added empty, as the standard allows, never invented. Values highdicom refuses,
    one of which would otherwise fail the whole result, are rewritten in the header only (the source is not
    touched): dates and times that do not parse (DA, TM, DT; PS3.5 6.2) are emptied, a malformed Patient's
    Age is dropped, a multi-valued patient or study attribute keeps its first value, a Patient's Sex is made
    one of M, F, O or empty, and an empty first value of Specific Character Set is named (ISO 2022 IR 6).

    Raises:
        AmbiguousIdentifier: a multi-valued Patient ID, Issuer of Patient ID, Study ID or Accession Number, which
            is never cut to its first value.
    """
    check_identifiers(source)
    header = Dataset()
    header.file_meta = getattr(source, "file_meta", Dataset())
    for element in source:
        if element.tag != 0x7FE00010:  # Pixel Data is not needed by a reference
            header.add(element)
    age = str(header.get("PatientAge", ""))
    if "PatientAge" in header and not re.fullmatch(r"\d{3}[DWMY]", age):
        del header.PatientAge  # PS3.5 6.2 AS is nnnD/W/M/Y; a malformed value would make the result invalid
    for keyword in _TYPE2_COPIED:
        if keyword in header and header[keyword].VM > 1:
            # All are VM 1 (PS3.6); highdicom refuses a list (a PN list raises TypeError): the first is kept, as
            # none of these files the result (the identifying ones were refused above)
            _replace(header, keyword, header[keyword].value[0])
    for element in list(header):
        if element.VR in _PARSED_VRS and element.value not in (None, "") and not _parses(element):
            # e.g. a birth date 1961-02-03 (DA is YYYYMMDD): emptied, never guessed
            _replace(header, element.tag, "")
    if "PatientSex" in header:
        # PS3.3 C.7.1.1: M, F or O. 'U' (a common "unknown") or 'm' is not guessed into one: emptied, as Type 2 allows
        _replace(header, "PatientSex", _SEXES.get(str(header.PatientSex or "").strip().upper(), ""))
    _name_default_repertoire(header)
    for keyword in _TYPE2_COPIED:
        if keyword not in header:
            setattr(header, keyword, "")
    return header


def _replace(header: Dataset, tag: str | int, value) -> None:
    """Set a value in a new element: the header's elements are the source's own objects, which are never changed."""
    element = header[tag]
    header[element.tag] = DataElement(element.tag, element.VR, value)


def _name_default_repertoire(header: Dataset) -> None:
    """Name the default repertoire where Specific Character Set (0008,0005) leaves it empty.

    With code extensions its first value is the character set before any escape sequence, and an empty one means
    ISO 2022 IR 6 (PS3.3 C.12.1.1.2; PS3.5 H.3.1 for Japanese, I.2 for Korean). highdicom refuses the empty
    value; pydicom decodes and encodes both forms the same way. A single empty value is the default repertoire
    without extensions, which is what an absent attribute says.
    """
    if "SpecificCharacterSet" not in header:
        return
    values = list(header["SpecificCharacterSet"].value) if header["SpecificCharacterSet"].VM > 1 else []
    if values and not values[0].strip():
        _replace(header, "SpecificCharacterSet", ["ISO 2022 IR 6", *values[1:]])
    elif not values and not str(header.SpecificCharacterSet or "").strip():
        del header.SpecificCharacterSet


def _with_character_set(result: Dataset, header: Dataset) -> Dataset:
    """Give ``result`` the header's Specific Character Set (0008,0005), which highdicom is told to leave out.

    highdicom 0.28 checks the value against an enumeration that has no Korean ISO 2022 IR 149 (it lists IR 159
    under that name) and counts no ISO 2022 IR 58 (Chinese) among code extensions, so it would fail a Korean
    patient's result. The names are decoded from the source's set and pydicom encodes them in it when the result
    is written, so the same set is right here.
    """
    if "SpecificCharacterSet" in header:
        result.add(copy.deepcopy(header["SpecificCharacterSet"]))
    return result


_PARSED_VRS = {"DA": valuerep.DA, "TM": valuerep.TM, "DT": valuerep.DT}
"""Value representations highdicom parses when it copies the header: one malformed value fails the whole result."""


def _parses(element) -> bool:
    values = element.value if element.VM > 1 else [element.value]
    try:
        for value in values:
            _PARSED_VRS[element.VR](value)
    except (ValueError, TypeError):
        return False
    return True


_TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                 "ReferringPhysicianName", "StudyID", "AccessionNumber")
_SEXES = {"M": "M", "F": "F", "O": "O", "MALE": "M", "FEMALE": "F"}
"""Patient's Sex (0010,0040) as received, stripped and upper-cased, to its enumerated value (PS3.3 C.7.1.1)."""


def read_sr_probability(sr: Dataset) -> float:
    """The probability stored by ``make_sr``, read back through highdicom's TID 1500 parser.

    Raises:
        ValueError: the SR holds no such measurement.
    """
    import highdicom as hd

    report = hd.sr.ComprehensiveSR.from_dataset(sr, copy=True)
    names = [hd.sr.CodedConcept(*concepts["probability"]) for concepts in (_MALIGNANCY, _PRESENCE)]
    for group in report.content.get_image_measurement_groups():
        for name in names:
            for measurement in group.get_measurements(name=name):
                return float(measurement.value)
    raise ValueError("the SR holds no 'Probability of cancer' or 'Probability of lung nodule' measurement")


def overlay_rgb(pixels: np.ndarray, heatmap: np.ndarray, caption: Sequence[str], location: dict | None = None) -> np.ndarray:
    """The radiograph (H, W) in [0, 1] with the heatmap blended over it and the caption burnt in: uint8 RGB.

    The caption (``NOT_FOR_DIAGNOSIS``, then each line of ``caption``, wrapped to the image's width) is
    drawn once, in yellow on an opaque black band across the top, so no outline has to line up with its
    text and no line overlaps the next. ``location`` (a localising model's ``Prediction.location``) is
    drawn as a yellow circle.
    """
    scale = min(1.0, SC_MAX_SIDE_PX / max(pixels.shape))
    size = (max(1, round(pixels.shape[1] * scale)), max(1, round(pixels.shape[0] * scale)))
    gray = cv2.resize(np.clip(pixels, 0, 1).astype(np.float32), size, interpolation=cv2.INTER_AREA)
    heat = cv2.resize(np.clip(heatmap, 0, 1).astype(np.float32), size, interpolation=cv2.INTER_LINEAR)
    colour = cv2.cvtColor(cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    # Transparency grows with relevance, as in ``explain.plot_overlay``.
    alpha = (0.55 * heat ** 0.7)[..., None]
    base = np.repeat(gray[..., None], 3, axis=2) * 255
    image = np.clip(base * (1 - alpha) + colour * alpha, 0, 255).astype(np.uint8)
    if location is not None:
        centre = (round((location["x"] + 0.5) * scale - 0.5), round((location["y"] + 0.5) * scale - 0.5))
        radius = max(3, round(location["radius"] * scale))
        cv2.circle(image, centre, radius, (0, 0, 0), 4, cv2.LINE_AA)
        cv2.circle(image, centre, radius, (255, 255, 0), 2, cv2.LINE_AA)
    _caption_band(image, [NOT_FOR_DIAGNOSIS, *caption])
    return np.ascontiguousarray(image)


def _caption_band(image: np.ndarray, lines: Sequence[str]) -> None:
    """Draw ``lines`` (word-wrapped to the width) in yellow on a black band across the top of ``image``, in place."""
    width = image.shape[1]
    font, font_scale = cv2.FONT_HERSHEY_SIMPLEX, max(0.35, width / 1600)
    thickness = max(1, round(font_scale * 1.5))
    (_, height), baseline = cv2.getTextSize("Ag", font, font_scale, thickness)
    step, margin = height + baseline + 4, 6
    wrapped = [piece for line in lines for piece in _wrap(line, font, font_scale, thickness, width - 2 * margin)]
    bottom = min(image.shape[0], margin + step * len(wrapped))
    image[:bottom] = 0
    for row, text in enumerate(wrapped):
        origin = (margin, margin + height + row * step)
        if origin[1] + baseline > image.shape[0]:
            break
        cv2.putText(image, text, origin, font, font_scale, (255, 255, 0), thickness, cv2.LINE_AA)


def _wrap(text: str, font, font_scale: float, thickness: int, width: int) -> list[str]:
    """Greedy word wrap of one line so each piece is at most ``width`` pixels wide (a long word stays whole)."""
    pieces, current = [], ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if current and cv2.getTextSize(candidate, font, font_scale, thickness)[0][0] > width:
            pieces.append(current)
            candidate = word
        current = candidate
    return [*pieces, current] if current else pieces


def make_secondary_capture(source: Dataset, overlay: np.ndarray, identity: dict) -> Dataset:
    """A Secondary Capture (RGB) of the heatmap overlay in the source's study, marked not for diagnostic use.

    The mark is burnt into the pixels, and stated in Image Comments (0020,4000), Series Description
    (0008,103E) and Burned In Annotation (0028,0301) YES.
    """
    import highdicom as hd

    source_uid, version = str(source.SOPInstanceUID), identity["version"]
    header = evidence_header(source)
    with _quiet_names():
        image = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=header, pixel_array=overlay, photometric_interpretation="RGB",
            bits_allocated=8, coordinate_system="PATIENT", series_instance_uid=result_uid(source_uid, version, "sc_series"),
            series_number=SC_SERIES_NUMBER, sop_instance_uid=result_uid(source_uid, version, "sc"),
            instance_number=1,
            manufacturer=MANUFACTURER, patient_orientation=_orientation(source),
            transfer_syntax_uid=ExplicitVRLittleEndian, specific_character_set=None)
    _with_character_set(image, header)
    image.SeriesDescription = f"lungdx heatmap - {NOT_FOR_DIAGNOSIS}"
    image.ImageComments = f"{NOT_FOR_DIAGNOSIS}: explanation heatmap of {identity['name']} {identity['version']}"
    image.BurnedInAnnotation = "YES"
    image.SoftwareVersions = identity["software_version"]
    # Image Laterality (0020,0062) U, unpaired: a chest. With it sent, Laterality (0020,0060), Type 2C
    # in General Series (PS3.3 C.7.3.1), is not required (dciodvfy reports it missing otherwise).
    image.ImageLaterality = "U"
    return image


def _orientation(source: Dataset) -> tuple[str, str]:
    """Patient Orientation (0020,0020) of the source, or the usual PA chest view (L, F)."""
    value = source.get("PatientOrientation")
    if value is not None and len(value) == 2 and all(str(v).strip() for v in value):
        return str(value[0]), str(value[1])
    return "L", "F"



@contextlib.contextmanager
def _quiet_names():
    """Silence highdicom's person-name warnings: their text quotes the patient's name, which no log may hold."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name.*")
        yield
