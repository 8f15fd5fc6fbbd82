"""The PACS commands as a user runs them: ``lungdx listen`` in its own process, ``lungdx deidentify``."""

import shutil
import signal
import subprocess
import sys

import pydicom
import pytest

pytest.importorskip("pynetdicom", reason="the PACS tests need the pacs extra (pip install -e '.[pacs]')")

from test_integrations import _wait  # noqa: E402

ECHOSCU, STORESCU = shutil.which("echoscu"), shutil.which("storescu")
CHEST_DX = "nih_cxr14_dx_chest_nofinding.dcm"


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_listen_answers_echo_and_keeps_results_while_the_pacs_is_unreachable(trained_run, dicom_dir, tmp_path):
    if ECHOSCU is None or STORESCU is None:
        pytest.skip("dcmtk's echoscu/storescu not found: apt-get install dcmtk (.ci/run installs it)")
    sample = dicom_dir / CHEST_DX
    port, closed = _free_port(), _free_port()  # nothing listens on `closed`: the PACS is down
    state = tmp_path / "state"
    node = subprocess.Popen([sys.executable, "-m", "lungdx.cli", "listen", str(trained_run), "--host", "127.0.0.1",
                             "--port", str(port), "--pacs", f"http://127.0.0.1:{closed}/dicom-web", "--state", str(state)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "listening" in node.stdout.readline()
        echo = subprocess.run([ECHOSCU, "-aec", "LUNGDX", "127.0.0.1", str(port)], capture_output=True, text=True, timeout=30)
        assert echo.returncode == 0, echo.stderr
        sent = subprocess.run([STORESCU, "-aec", "LUNGDX", "127.0.0.1", str(port), str(sample)],
                              capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
        pending = state / "outbox" / "pending"
        _wait(lambda: pending.is_dir() and len(list(pending.iterdir())) >= 2, timeout_s=90,
              what="the SR and the heatmap in the outbox")
        node.send_signal(signal.SIGTERM)
        assert node.wait(timeout=60) == 0
    finally:
        if node.poll() is None:
            node.kill()
    kinds = {pydicom.dcmread(next(item.glob("payload*")), stop_before_pixels=True).Modality for item in pending.iterdir()}
    assert {"SR", "OT"} <= kinds
    log = node.stderr.read()
    source = pydicom.dcmread(sample, stop_before_pixels=True)
    assert "lungdx" in log  # the node does log its work ...
    for private in (source.SOPInstanceUID, source.StudyInstanceUID, source.PatientID, source.PatientName):
        assert str(private) not in log  # ... but no UID, patient ID or name


def test_deidentify_command(dicom_dir, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(dicom_dir / CHEST_DX, inputs / CHEST_DX)  # a temporary copy, removed with tmp_path
    done = subprocess.run([sys.executable, "-m", "lungdx.cli", "deidentify", str(inputs), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    written = [path for path in (tmp_path / "out").rglob("*") if path.is_file()]
    assert len(written) == 1 and "wrote 1 de-identified file" in done.stdout
    before, after = pydicom.dcmread(inputs / CHEST_DX), pydicom.dcmread(written[0])
    assert after.SOPInstanceUID != before.SOPInstanceUID and after.PatientIdentityRemoved == "YES"
    assert after.PixelData == before.PixelData
    assert str(before.SOPInstanceUID) not in done.stdout + done.stderr


def test_deidentify_command_shifts_dates(dicom_dir, tmp_path):
    from datetime import date, timedelta

    inputs = tmp_path / "in"
    inputs.mkdir()
    name = "nema_wg04_RG1_cr_chest_pa_uncompressed.dcm"  # it has study, series and content dates
    if not (dicom_dir / name).is_file():
        pytest.skip(f"DICOM sample {name} not in ../shared/data/dicom_samples")
    shutil.copy(dicom_dir / name, inputs / name)  # a temporary copy, removed with tmp_path
    done = subprocess.run([sys.executable, "-m", "lungdx.cli", "deidentify", str(inputs), str(tmp_path / "out"),
                           "--shift-dates", "-100"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    before = pydicom.dcmread(inputs / name)
    after = pydicom.dcmread(next(path for path in (tmp_path / "out").rglob("*") if path.is_file()))

    def parsed(text):
        return date(int(text[:4]), int(text[4:6]), int(text[6:8]))

    for keyword in ("StudyDate", "SeriesDate", "ContentDate"):  # every date moves by the shift: intervals are kept
        assert parsed(after[keyword].value) == parsed(before[keyword].value) + timedelta(days=-100), keyword
    assert after.LongitudinalTemporalInformationModified == "MODIFIED"
