"""The inference service through FastAPI's TestClient: each route, each rejection, the API key, batching."""

import asyncio
import base64
import hashlib
import io
import logging
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the service tests need the serve extra (pip install -e '.[serve]')")
pytest.importorskip("httpx2", reason="the TestClient needs httpx2 (the test extra)")
from fastapi.testclient import TestClient  # noqa: E402
from pydicom.dataset import FileMetaDataset  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid  # noqa: E402

from lungdx.checkpoint import load_checkpoint, model_version  # noqa: E402
from lungdx.io import ImageReadError  # noqa: E402
from lungdx.io.acceptance import Refused  # noqa: E402
from lungdx.predict import Predictor  # noqa: E402
from lungdx.service.app import create_app  # noqa: E402
from lungdx.service.batching import Busy, MicroBatcher  # noqa: E402
from lungdx.service.security import keys_match  # noqa: E402
from lungdx.service.settings import ServiceSettings  # noqa: E402

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
KEY = "k3y-for-tests-0123456789"


@pytest.fixture(scope="module")
def png_path(phantom_dir):
    return sorted((phantom_dir / "images").glob("*.png"))[0]


@pytest.fixture(scope="module")
def client(trained_run):
    with TestClient(create_app(ServiceSettings(run=trained_run, db_url=None))) as test_client:
        yield test_client


def write_dicom(path, pixels: np.ndarray, *, modality="CR", sop_class=CR_STORAGE, body_part="CHEST", view="PA",
                patient=("Doe^Jane", "PID-12345", "19570312")):
    """A small, valid PS3.10 file holding ``pixels`` (float in [0, 1]) as 12-bit MONOCHROME2."""
    from pydicom.dataset import FileDataset

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = modality, body_part, view
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = patient
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.round(np.clip(pixels, 0, 1) * 4095).astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds


def read_png_uri(uri: str) -> np.ndarray:
    assert uri.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))


def post(client, path, name="image", **params):
    with open(path, "rb") as file:
        return client.post("/v1/predictions", params=params, files={"file": (name, file)})


def test_health_ready_and_model_card(client, trained_run):
    checkpoint = load_checkpoint(trained_run / "model.pt")
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["model_version"] == model_version(checkpoint)
    card = client.get("/v1/model").json()
    assert card["identity"]["version"] == model_version(checkpoint)
    assert card["threshold"] == pytest.approx(checkpoint["threshold"]) and card["class_names"] == checkpoint["class_names"]
    assert card["validation_metrics"]["roc_auc"] == pytest.approx(checkpoint["val_metrics"]["roc_auc"])
    assert "Not for clinical use" in card["not_for_clinical_use"]
    assert "/v1/predictions" in client.get("/openapi.json").json()["paths"]


def test_not_ready_before_the_model_is_loaded(trained_run):
    app = create_app(ServiceSettings(run=trained_run, db_url=None))
    unstarted = TestClient(app)  # no `with`: the lifespan never runs
    assert unstarted.get("/readyz").status_code == 503
    assert unstarted.get("/v1/model").status_code == 503
    assert unstarted.get("/healthz").status_code == 200


def test_png_prediction_equals_the_predictor(trained_run, png_path):
    from lungdx.explain import explain_file

    # Occlusion: the two-epoch test model's Grad-CAM is zero everywhere (its ReLUs pass no positive evidence).
    predictor = Predictor.from_path(trained_run)
    explanation = explain_file(predictor, png_path, "occlusion")
    assert explanation.heatmap_original.max() > 0.5
    with TestClient(create_app(ServiceSettings(run=trained_run, db_url=None, heatmap_method="occlusion"))) as client:
        response = post(client, png_path, heatmap="true", preview="true")
    assert response.status_code == 200, response.text
    body = response.json()
    expected = predictor.predict_files([png_path])[0]
    assert body["probability"] == pytest.approx(expected.probability, abs=1e-6)
    assert body["label"] == expected.class_name and body["threshold"] == pytest.approx(expected.threshold)
    assert body["label_index"] == int(body["probability"] >= body["threshold"])
    preview, heat = read_png_uri(body["preview"]), read_png_uri(body["heatmap"]["png"])
    rows, columns = Image.open(png_path).size[::-1]
    assert preview.shape == (rows, columns) and heat.shape == (rows, columns, 4)
    expected_alpha = np.round(explanation.heatmap_original * 255)
    assert np.abs(heat[..., 3].astype(float) - expected_alpha).max() <= 1 and body["heatmap"]["method"] == "occlusion"
    assert {key: body["heatmap"][key] for key in ("empty", "fallback_from", "notice")} == {
        "empty": False, "fallback_from": None, "notice": None}  # a map with something to show: no word about it
    assert body["input"]["format"] == "png" and body["id"] is None


def _zeros_for(*methods):
    """``explain_levelled`` whose maps are all zero for ``methods`` (a weak model's Grad-CAM), real for the others."""
    from lungdx import explain

    real = explain.explain_levelled

    def explain_levelled(predictor, levelled, method="gradcam", **options):
        return np.zeros(np.shape(levelled), np.float32) if method in methods else real(predictor, levelled, method, **options)

    return explain_levelled


def test_an_empty_heatmap_falls_back_to_occlusion_and_says_so(client, png_path, monkeypatch):
    monkeypatch.setattr("lungdx.explain.explain_levelled", _zeros_for("gradcam"))
    response = post(client, png_path, heatmap="true")
    assert response.status_code == 200, response.text
    heatmap = response.json()["heatmap"]
    assert heatmap["method"] == "occlusion" and heatmap["fallback_from"] == "gradcam" and heatmap["empty"] is False
    assert heatmap["notice"] == ("Heatmap empty: the Grad-CAM heatmap is all zero; showing the occlusion heatmap instead.")
    assert heatmap["note"].startswith("Occlusion:") and read_png_uri(heatmap["png"])[..., 3].max() > 200


def test_when_the_fallback_is_empty_too_only_the_notice_comes(client, png_path, monkeypatch):
    monkeypatch.setattr("lungdx.explain.explain_levelled", _zeros_for("gradcam", "occlusion"))
    heatmap = post(client, png_path, heatmap="true").json()["heatmap"]
    assert heatmap["png"] is None and heatmap["empty"] is True
    assert heatmap["method"] == "occlusion" and heatmap["fallback_from"] == "gradcam"
    assert heatmap["notice"] == ("Heatmap empty: the Grad-CAM heatmap is all zero, and the occlusion heatmap is all zero; "
                                 "no overlay to show.")


def test_without_heatmap_the_response_is_light(client, png_path):
    body = post(client, png_path).json()
    assert body["heatmap"] is None and body["preview"] is None


def test_dicom_prediction_equals_the_predictor(client, trained_run, png_path, tmp_path):
    pixels = np.asarray(Image.open(png_path), dtype=np.float32)
    path = tmp_path / "chest.dcm"
    write_dicom(path, pixels / pixels.max())
    body = post(client, path).json()
    expected = Predictor.from_path(trained_run).predict_files([path])[0]
    assert body["probability"] == pytest.approx(expected.probability, abs=1e-6)
    assert body["input"]["modality"] == "CR" and body["input"]["view_position"] == "PA"


@pytest.mark.parametrize("kwargs, reason", [
    (dict(modality="OT", sop_class="1.2.840.10008.5.1.4.1.1.7"), "modality OT"),
    (dict(modality="CT", sop_class=CTImageStorage), "modality CT"),
    (dict(body_part="KNEE"), "body part KNEE"),
    (dict(view="LL"), "view position LL"),
])
def test_dicom_that_is_not_a_frontal_chest_radiograph_is_refused(client, tmp_path, kwargs, reason):
    path = tmp_path / "other.dcm"
    write_dicom(path, np.random.default_rng(0).random((64, 64)), **kwargs)
    response = post(client, path)
    assert response.status_code == 422 and reason in response.json()["detail"]


def test_real_dicom_samples(client, dicom_dir):
    assert post(client, dicom_dir / "nih_cxr14_dx_chest_nofinding.dcm").status_code == 200
    tibia = post(client, dicom_dir / "nema_wg04_RG3_J2KR_cr_tibia.dcm")
    assert tibia.status_code == 422 and "EXTREMITY" in tibia.json()["detail"]


def test_a_rejected_upload_never_names_the_servers_temporary_file():
    """Pillow's 'cannot identify image file '/tmp/lungdx-upload-.../upload'' must not reach the client."""
    from lungdx.io.acceptance import AcceptancePolicy
    from lungdx.service.inputs import UploadRejected, read_upload

    for junk in (b"\xff\xd8\xff" + b"\x00junk" * 50, b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 50):
        with pytest.raises(UploadRejected) as rejected:
            read_upload(io.BytesIO(junk), AcceptancePolicy())
        assert rejected.value.status == 422 and "undecodable" in rejected.value.reason
        assert "lungdx-upload" not in rejected.value.reason and "/tmp" not in rejected.value.reason, rejected.value.reason


@pytest.mark.parametrize("error", [lambda path: OSError(f"cannot identify image file '{path}'"),
                                   lambda path: ImageReadError(path, f"cannot open {path}"),
                                   lambda path: Refused(path, "colour", f"{path} is in colour; see {path.parent}")],
                         ids=["decoder", "read_error", "refused"])
def test_a_decoders_message_quoting_the_temporary_file_reaches_the_client_without_it(error):
    """The inputs above no longer quote the path (io.acceptance names no file); a decoder that does must not leak it."""
    from lungdx.service.inputs import UploadRejected, read_upload

    class QuotingPolicy:  # stands in for a decoder whose message names the file it read
        def read(self, path):
            raise error(path)

    with pytest.raises(UploadRejected) as rejected:
        read_upload(io.BytesIO(b"\x89PNG\r\n\x1a\n" + bytes(64)), QuotingPolicy())
    reason = rejected.value.reason
    assert rejected.value.status == 422 and "the upload" in reason, reason
    assert "lungdx-upload" not in reason and tempfile.gettempdir() not in reason, reason


def test_bad_uploads_get_a_clear_4xx_and_the_service_carries_on(client, png_path, tmp_path):
    data = png_path.read_bytes()
    cases = {
        "text": (b"patient list\n" * 40, 415, "unsupported file type"),
        "empty": (b"", 422, "empty"),
        "truncated png": (data[: len(data) // 3], 422, "undecodable png"),
        "gif": (b"GIF89a" + b"\0" * 200, 415, "unsupported file type"),
        "dicom without pixels": (_dicom_without_pixels(tmp_path), 422, "DICOM"),
        "tiny png": (_png_bytes(np.zeros((8, 8), np.uint8)), 422, "too small"),
    }
    for name, (content, status, reason) in cases.items():
        response = client.post("/v1/predictions", files={"file": ("x", content)})
        assert response.status_code == status, (name, response.text)
        assert reason.lower() in response.json()["detail"].lower(), name
    assert client.post("/v1/predictions").status_code == 422  # no file field at all
    assert post(client, png_path).status_code == 200


def test_size_limits(trained_run, png_path):
    settings = ServiceSettings(run=trained_run, db_url=None, max_upload_bytes=4096, max_pixels=100 * 100)
    with TestClient(create_app(settings)) as small:
        too_big = small.post("/v1/predictions", files={"file": ("x.png", png_path.read_bytes())})
        assert too_big.status_code == 413

        def chunks():  # no Content-Length: the limit must hold while the body streams in
            yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
            for _ in range(20):
                yield b"\0" * 1024

        streamed = small.post("/v1/predictions", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
        assert streamed.status_code == 413
        many_pixels = small.post("/v1/predictions", files={"file": ("x.png", _png_bytes(np.zeros((101, 101), np.uint8)))})
        assert many_pixels.status_code == 413 and "101 x 101" in many_pixels.json()["detail"]
        assert small.get("/healthz").status_code == 200


def test_api_key(trained_run, png_path):
    with TestClient(create_app(ServiceSettings(run=trained_run, db_url=None, api_key=KEY))) as keyed:
        assert keyed.get("/v1/model").status_code == 401
        assert keyed.get("/v1/model", headers={"X-API-Key": KEY[:-1] + "x"}).status_code == 401
        assert keyed.get("/v1/model", headers={"X-API-Key": KEY}).status_code == 200
        with open(png_path, "rb") as file:
            assert keyed.post("/v1/predictions", files={"file": file}).status_code == 401
        with open(png_path, "rb") as file:
            assert keyed.post("/v1/predictions", files={"file": file}, headers={"X-API-Key": KEY}).status_code == 200
        assert keyed.get("/healthz").status_code == 200 and keyed.get("/readyz").status_code == 200
        assert keyed.get("/").status_code == 200  # the page itself holds no data; it asks for the key
    assert keys_match(KEY, KEY) and not keys_match(None, KEY) and not keys_match("", KEY)
    with pytest.raises(ValueError, match="at least 16"):
        ServiceSettings(run=trained_run, api_key="short")


def test_logs_hold_no_patient_data(client, png_path, tmp_path, caplog):
    pixels = np.asarray(Image.open(png_path), dtype=np.float32)
    path = tmp_path / "Doe_Jane_PID-12345.dcm"
    ds = write_dicom(path, pixels / pixels.max())
    # every logger at DEBUG, lungdx's too (a CLI test earlier in the session may have set it to WARNING)
    with caplog.at_level(logging.DEBUG), caplog.at_level(logging.DEBUG, logger="lungdx"):
        assert post(client, path, name=path.name, heatmap="true").status_code == 200
        assert post(client, tmp_path / "Doe_Jane_PID-12345.dcm", name=path.name).status_code == 200
    text = caplog.text
    for secret in ("Doe", "Jane", "PID-12345", "19570312", str(ds.SOPInstanceUID), str(ds.StudyInstanceUID)):
        assert secret not in text
    assert hashlib.sha256(str(ds.SOPInstanceUID).encode()).hexdigest()[:16] in text


def test_metrics_count_requests_by_route(client, png_path):
    post(client, png_path)
    text = client.get("/metrics").text
    assert 'lungdx_requests_total{route="/v1/predictions",status="200"}' in text
    assert "lungdx_request_seconds_bucket" in text and "lungdx_batch_size_bucket" in text


def test_the_web_page_and_its_files_are_served_locally(client):
    page = client.get("/")
    assert page.status_code == 200 and "lungdx" in page.text
    for asset in ("/static/app.js", "/static/style.css", "/static/favicon.svg"):
        assert client.get(asset).status_code == 200
    everything = page.text + client.get("/static/app.js").text + client.get("/static/style.css").text
    assert "http://" not in everything and "https://" not in everything  # no CDN: works without internet
    assert '<link rel="icon" href="/static/favicon.svg"' in page.text
    icon = client.get("/favicon.ico")  # where a browser looks without the link
    assert icon.status_code == 200 and icon.headers["content-type"] == "image/svg+xml"
    assert icon.content == client.get("/static/favicon.svg").content and icon.text.startswith("<svg")
    assert "/favicon.ico" not in client.get("/openapi.json").json()["paths"]


# ---- micro-batching ----------------------------------------------------------------------------


def _batched(max_batch, n_items, fail_on=None):
    sizes = []

    def run_batch(items):
        if fail_on is not None and fail_on in items:
            raise RuntimeError("model failure")
        return [item * 10 for item in items]

    async def scenario():
        batcher = MicroBatcher(run_batch, max_batch=max_batch, max_wait_s=0.02, on_batch=sizes.append)
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(i) for i in range(n_items)), return_exceptions=True), \
                await batcher.submit(1000)
        finally:
            await batcher.stop()

    results, after = asyncio.run(scenario())
    return results, after, sizes


def test_concurrent_requests_share_batches_and_keep_their_own_answers():
    results, _, sizes = _batched(max_batch=8, n_items=20)
    assert results == [i * 10 for i in range(20)]
    assert max(sizes) == 8 and sum(sizes) == 21 and len(sizes) < 21


def test_batching_off_runs_one_image_per_pass():
    results, _, sizes = _batched(max_batch=1, n_items=6)
    assert results == [i * 10 for i in range(6)] and sizes == [1] * 7


def test_a_failed_batch_fails_the_request_that_fails_alone_only():
    results, after, sizes = _batched(max_batch=4, n_items=4, fail_on=2)
    assert results[:2] == [0, 10] and isinstance(results[2], RuntimeError) and results[3] == 30
    assert sizes == [1, 1, 1, 1] and after == 10000  # the three good items alone, then the worker carries on


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _dicom_without_pixels(tmp_path) -> bytes:
    path = tmp_path / "nopixels.dcm"
    ds = write_dicom(path, np.zeros((32, 32)))
    del ds.PixelData, ds.Rows, ds.Columns
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


def test_serve_command_refuses_a_missing_model_or_key_file_before_starting(trained_run, tmp_path, capsys):
    from lungdx.cli import main

    assert main(["serve", str(tmp_path / "nothing"), "--db", "none"]) == 2
    assert "nothing: no such checkpoint file" in capsys.readouterr().err
    assert main(["serve", str(trained_run), "--db", "none", "--api-key-file", str(tmp_path / "key.txt")]) == 2
    assert "key.txt: no such API key file" in capsys.readouterr().err
    (tmp_path / "short.txt").write_text("abc\n")
    assert main(["serve", str(trained_run), "--db", "none", "--api-key-file", str(tmp_path / "short.txt")]) == 2
    assert "at least 16 characters" in capsys.readouterr().err
    assert main(["serve", str(trained_run), "--db", f"sqlite:///{tmp_path}/missing/monitor.db"]) == 2
    assert "missing: no such folder for the SQLite database" in capsys.readouterr().err
    assert main(["serve", str(trained_run), "--db", "not a url"]) == 2
    assert "cannot read the database URL" in capsys.readouterr().err
    assert main(["serve", str(trained_run), "--db", "postgresql//lungdx:s3cret@db/monitor"]) == 2
    error = capsys.readouterr().err
    assert "cannot read the database URL 'postgresql//***@db/monitor'" in error and "s3cret" not in error


def test_an_app_can_start_twice(trained_run):
    app = create_app(ServiceSettings(run=trained_run, db_url=None))
    for _ in range(2):  # metrics live with the app, not with one start of it
        with TestClient(app) as client:
            assert client.get("/readyz").status_code == 200


# ---- bounds: decoding slots, the model's queue ---------------------------------------------------


def wait_until(condition, timeout_s=60.0):
    """Poll ``condition`` until it holds; the deadline only catches a hang, it decides nothing."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.005)


def test_a_request_without_a_decoding_slot_gets_503_while_other_routes_answer(trained_run, png_path, tmp_path, monkeypatch):
    from lungdx.service import app as app_module

    real, started, release, threads = app_module._read_and_level, threading.Event(), threading.Event(), []

    def held(predictor, stream):  # the first upload decodes until the test lets it go
        threads.append(threading.current_thread().name)
        started.set()
        assert release.wait(60)
        return real(predictor, stream)

    settings = ServiceSettings(run=trained_run, db_url=f"sqlite:///{tmp_path}/monitor.db", max_decodes=1, decode_wait_s=0.05)
    with TestClient(create_app(settings)) as client, ThreadPoolExecutor(1) as pool:
        prediction_id = post(client, png_path).json()["id"]
        monkeypatch.setattr(app_module, "_read_and_level", held)
        first = pool.submit(post, client, png_path)
        try:
            assert started.wait(60)
            second = post(client, png_path)  # the one slot stays taken: no waiting past decode_wait_s
            metrics = client.get("/metrics")
            feedback = client.post(f"/v1/predictions/{prediction_id}/feedback", json={"label": 1, "reader": "R1"})
        finally:
            release.set()
        assert first.result(60).status_code == 200
        monkeypatch.setattr(app_module, "_read_and_level", real)
        assert post(client, png_path).status_code == 200  # the slot came back
    assert second.status_code == 503 and second.headers["Retry-After"] == "1"
    assert second.json() == {"detail": "the service is busy: all 1 image decoding slots stayed busy for 0.05 s; retry in 1 s",
                             "status": 503, "errors": None}
    assert metrics.status_code == 200 and feedback.status_code == 200, feedback.text
    assert threads == ["lungdx-decode_0"]  # its own pool, not the threads that feedback and /metrics share


def test_a_full_model_queue_answers_503(trained_run, png_path):
    settings = ServiceSettings(run=trained_run, db_url=None, max_batch=1, max_queue=1)
    started, release = threading.Event(), threading.Event()
    with TestClient(create_app(settings)) as client, ThreadPoolExecutor(2) as pool:
        batcher = client.app.state.services.batcher
        real = batcher.run_batch

        def held(items):
            started.set()
            assert release.wait(60)
            return real(items)

        batcher.run_batch = held
        try:
            first = pool.submit(post, client, png_path)
            assert started.wait(60)  # the model is busy with the first image
            second = pool.submit(post, client, png_path)
            wait_until(lambda: batcher._queue.qsize() == 1)  # the second waits in the queue
            third = post(client, png_path)
        finally:
            release.set()
        assert first.result(60).status_code == 200 and second.result(60).status_code == 200
        assert post(client, png_path).status_code == 200
    assert third.status_code == 503 and third.headers["Retry-After"] == "5"
    assert third.json()["detail"] == "the service is busy: 1 images are already waiting for the model; retry in 5 s"


def test_the_batcher_refuses_past_max_queue_and_carries_on():
    started, release = threading.Event(), threading.Event()

    def run_batch(items):
        started.set()
        assert release.wait(60)
        return [item * 10 for item in items]

    async def scenario():
        batcher = MicroBatcher(run_batch, max_batch=1, max_wait_s=0, max_queue=1)
        await batcher.start()
        try:
            running = asyncio.create_task(batcher.submit(1))
            await asyncio.to_thread(started.wait, 60)  # the worker took item 1: the queue is empty
            waiting = asyncio.create_task(batcher.submit(2))
            await asyncio.sleep(0)  # item 2 is queued
            assert batcher._queue.qsize() == 1 and not waiting.done()
            with pytest.raises(Busy, match="1 images are already waiting"):
                await batcher.submit(3)
            release.set()
            return await running, await waiting, await batcher.submit(4)
        finally:
            release.set()
            await batcher.stop()

    assert asyncio.run(scenario()) == (10, 20, 40)


def test_settings_bounds_and_defaults(trained_run):
    import os

    settings = ServiceSettings(run=trained_run)
    assert settings.max_decodes == len(os.sched_getaffinity(0)) and settings.max_queue >= 1
    for bad in ({"max_decodes": 0}, {"max_queue": 0}, {"decode_wait_s": -1}, {"decode_wait_s": float("nan")}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ServiceSettings(run=trained_run, **bad)


# ---- precision ---------------------------------------------------------------------------------


def _checkpoint_copy(trained_run, tmp_path, **changes):
    from lungdx.checkpoint import write_checkpoint

    checkpoint = load_checkpoint(trained_run / "model.pt")
    for key, value in changes.items():
        if value is None:
            checkpoint.pop(key, None)
        else:
            checkpoint[key] = value
    write_checkpoint(tmp_path / "model.pt", checkpoint)
    return tmp_path / "model.pt"


def test_the_service_predicts_in_the_precision_the_threshold_was_chosen_in(trained_run, png_path, tmp_path):
    from lungdx.runtime import Hardware

    # The precision this machine's auto would not pick, so that a default of auto would show here
    recorded = "bf16" if Hardware.resolve("cpu", "auto").precision == "fp32" else "fp32"
    path = _checkpoint_copy(trained_run, tmp_path, numeric_precision=recorded)
    settings = ServiceSettings(run=path, db_url=None, device="cpu")
    assert settings.precision == "checkpoint" and Predictor(load_checkpoint(path), device="cpu").hardware.precision == recorded
    with TestClient(create_app(settings)) as client:
        assert client.app.state.services.predictor.hardware.precision == recorded
        body = post(client, png_path).json()
    expected = Predictor.from_path(path, device="cpu", precision=recorded).predict_files([png_path])[0]
    assert body["probability"] == pytest.approx(expected.probability, abs=1e-6)


def test_a_checkpoint_without_numeric_precision_still_serves(trained_run, png_path, tmp_path, caplog):
    from lungdx.runtime import Hardware

    path = _checkpoint_copy(trained_run, tmp_path, numeric_precision=None)
    assert "numeric_precision" not in load_checkpoint(path)
    with caplog.at_level(logging.INFO, logger="lungdx"), TestClient(create_app(ServiceSettings(run=path, db_url=None))) as client:
        assert client.app.state.services.predictor.hardware.precision == Hardware.resolve("auto", "auto").precision
        assert post(client, png_path).status_code == 200
    assert "does not record the precision its threshold was chosen in; predicting in auto" in caplog.text


def test_the_settings_repr_holds_no_api_key(trained_run):
    settings = ServiceSettings(run=trained_run, db_url=None, api_key=KEY)
    assert settings.api_key == KEY
    assert KEY not in repr(settings) and KEY not in str(settings) and "api_key" not in repr(settings)
