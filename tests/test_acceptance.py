"""One acceptance policy at every entrance: each refused kind gets the same verdict and reason everywhere.

The corpus is made here (DICOM files written with pydicom, a PNG photograph), never shipped. Entrances:
``lungdx predict``, ``lungdx explain``, the service (``POST /v1/predictions``) and the PACS node's
``Processor.process``, which ``lungdx listen`` (each received instance) and ``lungdx pacs-run`` (each
pulled instance) both call.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    DigitalXRayImageStorageForProcessing,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from lungdx.cli import main
from lungdx.io import read_image
from lungdx.io.acceptance import (
    DEFAULT_MAX_PIXELS,
    AcceptancePolicy,
    Header,
    Refused,
    information_problem,
    polarity_contrast,
    read_header,
)
from lungdx.predict import Predictor
from lungdx.reference import build_reference

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def write_dicom(path: Path, stored: np.ndarray, *, modality="CR", sop_class=CR_STORAGE, body_part="CHEST", view="PA",
                window: tuple[float, float] | None = None, rows_columns: tuple[int, int] | None = None,
                photometric="MONOCHROME2") -> Path:
    """A PS3.10 file of 12-bit stored values (uint16, (H, W) or (H, W, 3) for RGB)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "ACC-1", modality, body_part, view
    ds.Rows, ds.Columns = rows_columns or stored.shape[:2]
    colour = stored.ndim == 3
    ds.SamplesPerPixel, ds.PhotometricInterpretation = (3, "RGB") if colour else (1, photometric)
    if colour:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (8, 8, 7, 0) if colour else (16, 12, 11, 0)
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = stored.astype(np.uint8 if colour else np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def to_stored(pixels: np.ndarray) -> np.ndarray:
    return np.round(np.clip(pixels, 0, 1) * 4095).astype(np.uint16)


@pytest.fixture(scope="module")
def chest(phantom_dir) -> np.ndarray:
    """A phantom chest radiograph in [0, 1] (the trained run's training distribution)."""
    return read_image(sorted((phantom_dir / "images").glob("*.png"))[0]).pixels


@pytest.fixture(scope="module")
def corpus(chest, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """kind -> (DICOM file, the refusal kind the policy must give)."""
    folder = tmp_path_factory.mktemp("acceptance")
    rng = np.random.default_rng(0)
    stored = to_stored(chest)
    files = {
        "ct": (write_dicom(folder / "ct.dcm", stored, modality="CT", sop_class=CTImageStorage, body_part="CHEST"), "modality"),
        "mr": (write_dicom(folder / "mr.dcm", stored, modality="MR", sop_class=MRImageStorage, body_part="HEAD"), "modality"),
        "lateral": (write_dicom(folder / "lateral.dcm", stored, view="LL"), "view"),
        "knee": (write_dicom(folder / "knee.dcm", stored, body_part="KNEE"), "body_part"),
        # raw detector data, before the processing every training image had: it was scored
        "for processing": (write_dicom(folder / "raw.dcm", stored, modality="DX",
                                       sop_class=DigitalXRayImageStorageForProcessing), "presentation"),
        "constant": (write_dicom(folder / "constant.dcm", np.full((128, 128), 1800)), "blank"),
        # 1800 +- 2 in a 4096-wide window: 0.1% of the scale
        "nearly constant": (write_dicom(folder / "flat.dcm", 1800 + rng.integers(-2, 3, (128, 128)), window=(2048, 4096)),
                            "blank"),
        "tiny": (write_dicom(folder / "tiny.dcm", stored[:2, :3]), "too_small"),
        # the header claims 20000 x 20000 pixels; the pixel data is tiny: refused before decoding
        "over the pixel limit": (write_dicom(folder / "huge.dcm", stored[:4, :4], rows_columns=(20000, 20000)), "too_large"),
        "colour": (write_dicom(folder / "colour.dcm", rng.integers(0, 255, (64, 64, 3))), "colour"),
        "inverted polarity": (write_dicom(folder / "inverted.dcm", 4095 - stored), "out_of_distribution"),
    }
    files["accepted"] = (write_dicom(folder / "chest.dcm", stored), None)
    return files


@pytest.fixture(scope="module")
def client(trained_run):
    pytest.importorskip("fastapi", reason="the service entrance needs the serve extra")
    pytest.importorskip("httpx2", reason="the TestClient needs httpx2 (the test extra)")
    from fastapi.testclient import TestClient

    from lungdx.service.app import create_app
    from lungdx.service.settings import ServiceSettings

    with TestClient(create_app(ServiceSettings(run=trained_run, db_url=None))) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def processor(trained_run, tmp_path_factory):
    pytest.importorskip("pynetdicom", reason="the PACS entrance needs the pacs extra")
    from lungdx.integrations.service import make_processor

    return make_processor(trained_run, tmp_path_factory.mktemp("pacs-state"), sender=lambda path: None)


def expected_refusal(trained_run, path: Path) -> Refused | None:
    try:
        Predictor.from_path(trained_run).read(path)
    except Refused as err:
        return err
    return None


def verdict_cli_predict(run, path, capsys, **_):
    code = main(["predict", str(run), str(path)])
    line = capsys.readouterr().out.strip()
    if "\tREFUSED\t" in line:
        assert code != 0 and line.count("\n") == 0 and line.startswith(str(path))
        return line.split("\tREFUSED\t", 1)[1]
    assert code == 0 and "p=" in line, line
    return None


def verdict_cli_explain(run, path, capsys, tmp_path, **_):
    code = main(["explain", str(run), str(path), "--out", str(tmp_path / "overlay.png")])
    captured = capsys.readouterr()
    if "\tREFUSED\t" in captured.err:
        assert code != 0 and not (tmp_path / "overlay.png").exists()
        return captured.err.strip().split("\tREFUSED\t", 1)[1]
    assert code == 0 and "p=" in captured.out, captured
    return None


def verdict_service(run, path, client, **_):
    response = client.post("/v1/predictions", files={"file": ("image", path.read_bytes())})
    if response.status_code == 200:
        return None
    assert response.status_code in (413, 422), response.text
    assert "probability" not in response.json()
    return response.json()["detail"]


def verdict_pacs_node(run, path, processor, **_):
    results = processor.process(path)
    event = json.loads((processor.state_dir / "events.jsonl").read_text().splitlines()[-1])
    if results is not None:
        assert event["status"] == "analysed"
        return None
    assert event["status"] == "skipped", event
    return event["reason"]


ENTRANCES = {"predict": verdict_cli_predict, "explain": verdict_cli_explain, "service": verdict_service,
             "pacs node (listen, pacs-run)": verdict_pacs_node}
KINDS = ["ct", "mr", "lateral", "knee", "for processing", "constant", "nearly constant", "tiny", "over the pixel limit", "colour",
         "inverted polarity", "accepted"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("entrance", list(ENTRANCES))
def test_every_entrance_gives_the_same_verdict_and_reason(entrance, kind, corpus, trained_run, request, capsys, tmp_path):
    path, refusal_kind = corpus[kind]
    expected = expected_refusal(trained_run, path)
    assert (expected.kind if expected else None) == refusal_kind
    fixtures = {"client": request.getfixturevalue("client")} if entrance == "service" else {}
    if entrance.startswith("pacs"):
        fixtures["processor"] = request.getfixturevalue("processor")
    reason = ENTRANCES[entrance](trained_run, path, capsys=capsys, tmp_path=tmp_path, **fixtures)
    assert reason == (expected.reason if expected else None)


def test_the_service_answers_413_for_size_and_422_for_the_rest(client, corpus):
    assert client.post("/v1/predictions", files={"file": ("x", corpus["over the pixel limit"][0].read_bytes())}).status_code == 413
    assert client.post("/v1/predictions", files={"file": ("x", corpus["ct"][0].read_bytes())}).status_code == 422


def test_allow_non_chest_scores_with_a_warning(corpus, trained_run, capsys):
    path = corpus["ct"][0]
    assert main(["predict", str(trained_run), str(path), "--allow-non-chest"]) == 0
    line = capsys.readouterr().out
    assert "p=" in line and "WARNING: scored although not a frontal chest radiograph (allow_non_chest): modality CT" in line
    # only the header checks are overridden: a blank image is still refused
    assert main(["predict", str(trained_run), str(corpus["constant"][0]), "--allow-non-chest"]) != 0
    assert "REFUSED\tconstant image" in capsys.readouterr().out


def test_the_pixel_limit_is_the_same_default_everywhere(trained_run):
    from lungdx.cli import build_parser
    from lungdx.service.settings import ServiceSettings

    assert ServiceSettings(run=trained_run).max_pixels == AcceptancePolicy().max_pixels == DEFAULT_MAX_PIXELS
    for command in (["predict", "run", "x.png"], ["explain", "run", "x.png"], ["serve", "run"],
                    ["pacs-run", "run", "--study", "1.2"], ["listen", "run"]):
        assert build_parser().parse_args(command).max_megapixels * 1e6 == DEFAULT_MAX_PIXELS


def test_over_the_limit_is_refused_from_the_header_without_decoding(corpus, monkeypatch):
    path = corpus["over the pixel limit"][0]
    import lungdx.io as io

    def no_decoding(_path):
        raise AssertionError("decoded an image the header already refuses")

    monkeypatch.setattr(io, "read_image", no_decoding)
    with pytest.raises(Refused, match="20000 x 20000 pixels is over the limit") as refused:
        AcceptancePolicy().read(path)
    assert refused.value.status == 413


def test_a_malformed_dicom_header_is_an_image_read_error_naming_the_file(tmp_path):
    """Not a TypeError or an AttributeError from deep in pydicom: a batch or the service carries on past it."""
    from pydicom import dcmread
    from pydicom.dataset import Dataset

    from lungdx.io import ImageReadError

    good = write_dicom(tmp_path / "good.dcm", np.random.default_rng(0).integers(0, 4096, (64, 64)))
    empty_rows, no_descriptor = dcmread(good), dcmread(good)
    empty_rows.Rows = None
    item = Dataset()
    item.add_new(0x00283006, "US", [0] * 16)  # LUT Data, in a VOI LUT item without its LUT Descriptor (0028,3002)
    no_descriptor.VOILUTSequence = [item]
    for dataset, name, problem in [(empty_rows, "empty_rows.dcm", "malformed image header: TypeError"),
                                   (no_descriptor, "no_descriptor.dcm", "malformed image description in the header")]:
        dataset.save_as(tmp_path / name, enforce_file_format=True)
        with pytest.raises(ImageReadError, match=problem) as refused:
            AcceptancePolicy().read(tmp_path / name)
        assert refused.value.path == str(tmp_path / name)


def test_pydicom_warnings_reach_the_log_without_the_value_they_quote(tmp_path, caplog, monkeypatch):
    """The command line's second line of defence, should pydicom's reading validation warn again (lungdx.io turns it off)."""
    import warnings

    from pydicom import config, dcmread
    from pydicom.dataelem import DataElement

    from lungdx.cli import withhold_header_values_in_library_logs

    monkeypatch.setattr(config.settings, "reading_validation_mode", config.WARN)

    path = write_dicom(tmp_path / "x.dcm", np.random.default_rng(0).integers(0, 4096, (64, 64)))
    dataset = dcmread(path)
    dataset.add(DataElement(0x00080018, "UI", "1.2.826.0.1.3680043.01.PATIENT4711", validation_mode=config.IGNORE))
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        dataset.save_as(path, enforce_file_format=True)  # pydicom warns here too, before lungdx is involved
        shown.clear()
        caplog.clear()
        withhold_header_values_in_library_logs()  # what lungdx's command line does first
        with caplog.at_level("WARNING", logger="pydicom"):
            AcceptancePolicy().read(path)
    assert "Invalid value for VR UI: '<withheld>'" in caplog.text and "PATIENT4711" not in caplog.text
    assert not [warning for warning in shown if "PATIENT4711" in str(warning.message)]


def test_an_invalid_uid_reaches_no_log_nor_stderr(tmp_path, caplog, capfd, monkeypatch):
    """A UID with a leading zero in a component, as old CR systems write: pydicom's reading validation would quote it."""
    import logging
    import warnings

    from pydicom import config, dcmread

    sop_uid, study_uid = "1.2.0840.0113619.2.55.3.604688119.969.1268071029.320", "1.2.0840.0113619.2.55.3.9999.42"
    monkeypatch.setattr(logging.getLogger("pydicom"), "filters", [])  # the command line's filter must not hide a leak
    path = write_dicom(tmp_path / "old-cr.dcm", np.random.default_rng(0).integers(0, 4096, (64, 64)))
    dataset = dcmread(path)
    with monkeypatch.context() as writing:
        writing.setattr(config.settings, "writing_validation_mode", config.IGNORE)  # pydicom would quote it here too
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = sop_uid
        dataset.StudyInstanceUID = study_uid
        dataset.save_as(path, enforce_file_format=True)
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as shown, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        image = AcceptancePolicy().read(path)
        header = read_header(path)
    assert (image.meta["sop_instance_uid"], image.meta["study_instance_uid"]) == (sop_uid, study_uid)
    assert header.rows == 64
    captured = capfd.readouterr()
    for text in (caplog.text, captured.out, captured.err, *(str(warning.message) for warning in shown)):
        assert "0840" not in text


def write_deflated(path: Path, stored: np.ndarray, *, filler_mib: int = 0) -> Path:
    """A Deflated Explicit VR Little Endian file (PS3.5 A.5) of 12-bit ``stored`` values; ``filler_mib`` MiB of zeros
    in a private OB element before the pixels make it a decompression bomb, deflated a MiB at a time (small in memory)."""
    import struct
    import zlib

    from pydicom.dataset import Dataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CR_STORAGE, generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CR_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "ACC-1", "CR", "CHEST", "PA"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    write_dataset(head, ds)
    creator = struct.pack("<HH2sH", 0x7FDF, 0x0010, b"LO", 4) + b"ACME"
    filler = struct.pack("<HH2sHI", 0x7FDF, 0x1000, b"OB", 0, filler_mib << 20) if filler_mib else b""
    pixels = stored.astype("<u2").tobytes()
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = [deflater.compress(head.getvalue() + creator + filler)]
    body += [deflater.compress(bytes(1 << 20)) for _ in range(filler_mib)]
    body += [deflater.compress(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, len(pixels)) + pixels), deflater.flush()]
    file_meta = DicomBytesIO()
    file_meta.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(file_meta, meta, enforce_standard=True)
    path.write_bytes(file_meta.getvalue() + b"".join(body))
    return path


def test_a_deflate_bomb_is_refused_before_it_is_inflated(chest, tmp_path, monkeypatch):
    """The limit is the policy's pixel limit at 4 bytes a pixel plus a header allowance (1 MiB here, 16 MiB by default)."""
    import tracemalloc

    from lungdx.io import dicom

    monkeypatch.setattr(dicom, "HEADER_ALLOWANCE_BYTES", 1 << 20)
    stored = to_stored(chest)
    policy = AcceptancePolicy(max_pixels=stored.size)
    bomb = write_deflated(tmp_path / "bomb.dcm", stored, filler_mib=24)
    assert bomb.stat().st_size < 200_000
    tracemalloc.start()
    try:
        with pytest.raises(Refused, match=r"Deflated Explicit VR Little Endian dataset \(1.2.840.10008.1.2.1.99\) inflates "
                                          r"to more than \d+ MiB") as refused:
            policy.read(bomb)
        peak_bytes = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (refused.value.kind, refused.value.status, refused.value.path) == ("too_large", 413, str(bomb))
    assert peak_bytes < policy.max_inflated_bytes + (4 << 20), peak_bytes  # never the 24 MiB of zeros
    plain = write_deflated(tmp_path / "plain.dcm", stored)  # the same image without the filler: an ordinary file
    twin = write_dicom(tmp_path / "twin.dcm", stored)
    np.testing.assert_array_equal(policy.read(plain).pixels, policy.read(twin).pixels)


def test_a_deflated_dicom_is_inflated_once_for_its_header_and_its_pixels(chest, tmp_path, monkeypatch):
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from lungdx.io import dicom

    inflated, inflate = [], dicom._inflate

    def counting(stream, max_bytes, file):
        inflated.append(file)
        return inflate(stream, max_bytes, file)

    monkeypatch.setattr(dicom, "_inflate", counting)
    path = write_deflated(tmp_path / "deflated.dcm", to_stored(chest))
    image = AcceptancePolicy().read(path)
    assert inflated == [path]
    assert (image.meta["transfer_syntax"], image.meta["source"]) == (DeflatedExplicitVRLittleEndian, str(path))


def test_a_transfer_syntax_uid_is_no_radiography_sop_class():
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from lungdx.io.dicom import chest_header_problem

    # 1.2.840.10008.1.2.1.99 says how a dataset is encoded, never what it is: a CT stays refused
    problem = chest_header_problem({"modality": "CT", "sop_class_uid": DeflatedExplicitVRLittleEndian})
    assert problem is not None and problem[0] == "modality"


def test_a_dicom_without_body_part_or_view_is_scored_with_a_warning(chest, tmp_path):
    stored = to_stored(chest)
    assert AcceptancePolicy().read(write_dicom(tmp_path / "full.dcm", stored)).meta["warnings"] == []
    for body_part, view, missing in [(None, "PA", "Body Part Examined (0018,0015) missing"),
                                     ("CHEST", None, "View Position (0018,5101) missing"),
                                     (None, None, "Body Part Examined (0018,0015) and View Position (0018,5101) missing")]:
        path = write_dicom(tmp_path / "x.dcm", stored, body_part=body_part, view=view)
        warnings = AcceptancePolicy().read(path).meta["warnings"]
        assert warnings == [f"the DICOM header could not confirm a frontal chest radiograph: {missing}"]


def test_png_header_is_read_without_decoding(tmp_path):
    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((40, 30), np.uint8)).save(path)
    assert read_header(path) == Header("png", 40, 30, {"mode": "L"})
    with pytest.raises(Refused, match="40 x 30 pixels is over the limit of 1000 pixels"):
        AcceptancePolicy(max_pixels=1000).read(path)


def test_colour_photograph_is_refused_but_gray_stored_as_rgb_passes(chest, tmp_path):
    gray = np.round(chest * 255).astype(np.uint8)
    Image.fromarray(np.dstack([gray] * 3)).save(tmp_path / "gray-rgb.png")
    assert AcceptancePolicy().read(tmp_path / "gray-rgb.png").meta["colour_spread"] == 0.0
    photo = np.dstack([gray, np.roll(gray, 20, axis=1), 255 - gray])
    Image.fromarray(photo).save(tmp_path / "photo.jpg", quality=90)
    with pytest.raises(Refused, match="colour image: the channels differ by") as refused:
        AcceptancePolicy().read(tmp_path / "photo.jpg")
    assert refused.value.kind == "colour"
    # a gray JPEG saved as RGB carries a little chroma noise; it must still pass
    Image.fromarray(np.dstack([gray] * 3)).save(tmp_path / "gray-rgb.jpg", quality=75)
    assert AcceptancePolicy().read(tmp_path / "gray-rgb.jpg").meta["colour_spread"] < 0.01


def test_information_rule():
    rng = np.random.default_rng(1)
    assert "constant image" in information_problem(np.full((64, 64), 0.3, np.float32))
    assert "nearly constant" in information_problem((0.5 + 0.005 * rng.random((64, 64))).astype(np.float32))
    mostly_black = np.zeros((100, 100), np.float32)
    mostly_black[:1, :50] = 1.0  # a burnt-in label line on an empty frame: 0.5% of the pixels
    assert "nearly constant" in information_problem(mostly_black)
    assert information_problem(rng.random((64, 64)).astype(np.float32)) is None


def test_blank_images_in_a_dataset_go_to_excluded_csv(phantom_dir, tmp_path):
    import shutil

    from conftest import tiny_config

    from lungdx.train import prepare_data

    data_dir = tmp_path / "data"
    shutil.copytree(phantom_dir, data_dir)
    blank = sorted((data_dir / "images").glob("*.png"))[3]
    Image.fromarray(np.full((128, 128), 90, np.uint8)).save(blank)
    data = prepare_data(tiny_config(data_dir, tmp_path / "cache"))
    assert len(data.excluded) == 1 and Path(data.excluded["path"].iloc[0]).name == blank.name
    assert "constant image" in data.excluded["reason"].iloc[0]
    assert blank.name not in set(data.frame["path"].map(lambda p: Path(p).name))


def test_polarity_rule_on_real_chest_radiographs(jsrt_dir, nih_dir):
    """Against a reference of other images of the same collection, real radiographs pass and their inversions do not."""
    for files, reference_size, max_false_refusals in ((sorted((jsrt_dir / "images").glob("*.png"))[::4], 24, 0),
                                                      (sorted((nih_dir / "images").glob("*.png"))[:400], 200, 2)):
        reference = build_reference([], files[:reference_size], source="test")["intensity"]
        policy = AcceptancePolicy(reference=reference)
        held_out = [read_image(path).pixels for path in files[reference_size:]]
        refused = [policy.reference_problem(pixels) is not None for pixels in held_out]
        inverted = [policy.reference_problem(1 - pixels) is not None for pixels in held_out]
        assert sum(refused) <= max_false_refusals, (files[0].parent, sum(refused))
        assert np.mean(inverted) >= 0.9, (files[0].parent, np.mean(inverted))
        assert all(polarity_contrast(1 - p) == pytest.approx(-polarity_contrast(p), abs=1e-6) for p in held_out[:5])


def test_real_dicom_samples_verdicts(dicom_dir):
    rows = {row["file"]: row for row in __import__("csv").DictReader(open(dicom_dir / "files.csv"))}
    policy = AcceptancePolicy()
    for name in ("nema_wg04_RG1_J2KI_cr_chest_pa.dcm", "nih_cxr14_dx_chest_nofinding.dcm"):
        assert policy.read(dicom_dir / name).pixels.ndim == 2
    for name, kind in (("nema_wg04_RG3_J2KR_cr_tibia.dcm", "body_part"), ("dicomlibrary_ot_abdomen.dcm", "modality")):
        with pytest.raises(Refused) as refused:
            policy.read(dicom_dir / name)
        assert refused.value.kind == kind, rows.get(name)
