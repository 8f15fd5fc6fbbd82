"""Monitoring: the prediction and feedback log, drift, rolling performance, alerts and upgrades."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("sqlalchemy")
pytest.importorskip("prometheus_client")

from prometheus_client import CollectorRegistry  # noqa: E402

from lungdx.checkpoint import load_checkpoint  # noqa: E402
from lungdx.data.phantoms import make_phantom  # noqa: E402
from lungdx.monitoring import Monitor, MonitorSettings, UnknownPrediction, check_reader, parse_since  # noqa: E402
from lungdx.monitoring.drift import population_stability_index, score_psi  # noqa: E402
from lungdx.predict import Prediction, Predictor  # noqa: E402

TEST_SETTINGS = dict(min_samples=20, min_reference=5, n_bootstrap=200, min_feedback=10)


@pytest.fixture(scope="module")
def checkpoint(trained_run) -> dict:
    return load_checkpoint(trained_run / "model.pt")


@pytest.fixture(scope="module")
def predictor(checkpoint) -> Predictor:
    # fp32, as the shared trained_run was trained (conftest.tiny_config): the reference scores saved at
    # training time and these must come from the same arithmetic on every CPU (bf16 differs by ~1e-3).
    return Predictor(checkpoint, device="cpu", precision="fp32")


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def phantoms(n: int, seed: int, shift: float = 0.0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    kinds = ("non_nodule", "benign", "malignant")
    return [np.clip(make_phantom(rng, 128, kinds[i % 3])[0] + shift, 0.0, 1.0).astype(np.float32) for i in range(n)]


def fake_prediction(probability: float, threshold: float = 0.5, meta: dict | None = None) -> Prediction:
    label = int(probability >= threshold)
    return Prediction(source="/secret/path/image.dcm", probability=probability, label=label,
                      class_name=("not malignant", "malignant")[label], threshold=threshold, meta=meta or {})


class Webhook(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Webhook.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def webhook_url():
    Webhook.received = []
    server = HTTPServer(("127.0.0.1", 0), Webhook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/alerts"
    server.shutdown()


# ------------------------------------------------------------------------------------- reference


def test_training_saves_the_validation_reference(trained_run, checkpoint, predictor):
    from lungdx.io import read_image

    reference = checkpoint["val_reference"]
    split = pd.read_csv(trained_run / "split.csv")
    val_paths = split.loc[split["split"] == "val", "path"].tolist()
    assert reference["intensity"]["n_images"] == len(val_paths) == len(reference["probabilities"])
    assert sum(reference["intensity"]["histogram"]) == pytest.approx(1.0)
    # The reference scores are what the served model gives the validation images read from disk.
    levelled = np.stack([predictor.level(read_image(path).pixels) for path in val_paths])
    assert np.allclose(predictor.probabilities(levelled), reference["probabilities"], atol=1e-5)
    means = [float(read_image(path).pixels[::1, ::1].mean()) for path in val_paths]
    assert np.allclose(means, reference["intensity"]["mean"], atol=1e-6)


def test_old_checkpoint_falls_back_to_the_run_folder(tmp_path, trained_run, checkpoint):
    old = {key: value for key, value in checkpoint.items() if key != "val_reference"}
    with Monitor.open(sqlite_url(tmp_path / "m.db"), old, run_dir=trained_run) as monitor:
        assert "rebuilt from" in monitor.reference["source"]
        assert monitor.reference["intensity"]["n_images"] == checkpoint["val_reference"]["intensity"]["n_images"]
    with Monitor.open(sqlite_url(tmp_path / "n.db"), old) as monitor:
        assert monitor.reference is None
        checks = {c["name"]: c for c in monitor.drift()}
        assert checks["score_psi"]["status"] == "no validation scores in the reference"


# ----------------------------------------------------------------------------------------- drift


def test_psi_by_hand():
    expected, actual = [0.5, 0.3, 0.2], [0.3, 0.3, 0.4]
    by_hand = (0.3 - 0.5) * np.log(0.3 / 0.5) + 0 + (0.4 - 0.2) * np.log(0.4 / 0.2)
    assert population_stability_index(expected, actual) == pytest.approx(by_hand)
    assert population_stability_index([3, 3, 4], [30, 30, 40]) == pytest.approx(0.0)
    scores = np.random.default_rng(0).uniform(size=200)
    assert score_psi(scores, scores) == pytest.approx(0.0)
    assert score_psi(scores, scores * 0.3) > 1.0
    assert score_psi(scores[:19], scores) is None  # fewer than two bins of 10 reference cases


def _feed(monitor: Monitor, predictor: Predictor, images: list[np.ndarray]) -> list[str]:
    return [monitor.record(predictor.predict_pixels(pixels), pixels) for pixels in images]


def test_shifted_intensity_raises_the_drift_alert_and_unshifted_does_not(tmp_path, checkpoint, predictor, webhook_url,
                                                                         caplog):
    settings = MonitorSettings(**TEST_SETTINGS, webhook_url=webhook_url, check_every=1000)
    with Monitor.open(sqlite_url(tmp_path / "plain.db"), checkpoint, settings=settings) as monitor:
        _feed(monitor, predictor, phantoms(40, seed=100))
        status = monitor.check()
        statuses = {c["name"]: c["status"] for c in status["drift"]}
        # 13 validation cases: too few for two PSI bins of 10; the KS test still decides on the scores.
        assert statuses.pop("score_psi") == "insufficient reference"
        assert {name for name, state in statuses.items() if state not in ("ok", "no reference")} == set()
        assert status["active_alerts"] == [] and monitor.active_alerts() == []
        assert monitor.registry.get_sample_value("lungdx_monitor_alert", {"check": "intensity_psi"}) == 0.0
    assert Webhook.received == []

    registry = CollectorRegistry()
    with Monitor.open(sqlite_url(tmp_path / "shifted.db"), checkpoint, settings=settings, registry=registry) as monitor:
        _feed(monitor, predictor, phantoms(40, seed=100, shift=0.3))
        status = monitor.check()
        raised = {alert["check"] for alert in status["active_alerts"]}
        assert {"intensity_psi", "intensity_ks"} <= raised
        assert registry.get_sample_value("lungdx_monitor_alert", {"check": "intensity_psi"}) == 1.0
        assert registry.get_sample_value("lungdx_monitor_alerts_active") == len(raised)
        assert registry.get_sample_value("lungdx_prediction_probability_count", {"model_version": monitor.version}) == 40
        # A second check does not raise the same alert again.
        monitor.check()
        assert [e["check_name"] for e in monitor.alert_events()].count("intensity_psi") == 1
        plain = {alert["check"]: alert for alert in monitor.active_alerts()}
        assert set(plain) == raised
        assert plain["intensity_psi"]["message"].startswith("Recent images differ in brightness or contrast")
        assert {name: alert["since"] for name, alert in plain.items()} == {a["check"]: a["since"] for a in status["active_alerts"]}
    with Monitor.open(sqlite_url(tmp_path / "shifted.db"), checkpoint, settings=settings) as restarted:
        assert {alert["check"] for alert in restarted.active_alerts()} == raised  # from the log, before any check
    for _ in range(50):
        if {"intensity_psi", "intensity_ks"} <= {event["check"] for event in Webhook.received}:
            break
        threading.Event().wait(0.05)
    assert {"intensity_psi", "intensity_ks"} <= {event["check"] for event in Webhook.received}
    assert all(event["event"] == "raised" for event in Webhook.received)
    assert any("monitoring alert raised: intensity_psi" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("check, value, limit, detail, words", [
    ("score_ks", 1e-9, 0.001, "KS statistic 0.800, p = 1e-09 (alert below 0.001)", "scores differ"),
    ("intensity_psi", 0.9, 0.25, "PSI 0.900 (limit 0.25)", "brightness or contrast"),
    ("manufacturer", 0.5, 0.2, "50% of the window unseen in the reference (OTHER, ACME2)", "Of recent images, 50% have a "
     "manufacturer the model was not validated on (OTHER, ACME2)"),
    ("performance_sensitivity", 0.61, 0.85, "sensitivity 0.610, CI upper bound 0.700 below the validation value 0.850",
     "sensitivity (0.61) is below its validation value (0.85), so the model may be missing more positive cases"),
    ("performance_auc", 0.6, 0.8, "auc 0.600, ...", "AUC (0.60)"),
])
def test_alerts_read_as_one_plain_sentence(check, value, limit, detail, words):
    from lungdx.monitoring.alerts import plain_message

    message = plain_message(check, value, limit, detail)
    assert words in message and message[0].isupper() and message.endswith(".") and ". " not in message
    assert "PSI" not in message and "KS" not in message


def test_acquisition_drift_on_an_unseen_manufacturer(tmp_path, checkpoint):
    reference = {"source": "test", "probabilities": [], "intensity": {"n_images": 0},
                 "acquisition": {"manufacturer": {"ACME": 10}}}
    custom = {**checkpoint, "val_reference": reference}
    settings = MonitorSettings(**TEST_SETTINGS)
    pixels = np.full((64, 64), 0.5, np.float32)
    with Monitor.open(sqlite_url(tmp_path / "m.db"), custom, settings=settings) as monitor:
        for i in range(20):
            monitor.record(fake_prediction(0.3, meta={"manufacturer": "ACME" if i < 10 else "OTHER"}), pixels)
        checks = {c["name"]: c for c in monitor.check()["drift"]}
    assert checks["manufacturer"]["value"] == pytest.approx(0.5)
    assert checks["manufacturer"]["alert"] and "OTHER" in checks["manufacturer"]["detail"]
    assert checks["view_position"]["status"] == "no reference"


# ----------------------------------------------------------------------------------- performance


def test_rolling_metrics_equal_hand_computed_values(tmp_path, checkpoint):
    rng = np.random.default_rng(3)
    probability = rng.uniform(size=30).round(3)
    truth = (rng.uniform(size=30) < 0.25 + 0.5 * probability).astype(int)
    pixels = np.full((32, 32), 0.4, np.float32)
    validation = {**checkpoint["val_metrics"], "sensitivity": 0.99}
    settings = MonitorSettings(**TEST_SETTINGS)
    with Monitor.open(sqlite_url(tmp_path / "p.db"), {**checkpoint, "val_metrics": validation}, settings=settings) as monitor:
        ids = [monitor.record(fake_prediction(float(p)), pixels) for p in probability]
        for prediction_id, target in zip(ids, truth, strict=True):
            monitor.add_feedback(prediction_id, 1 - int(target), "R1")  # a mistake, corrected next
            monitor.add_feedback(prediction_id, ["not malignant", "malignant"][target], "R2")
        performance = monitor.performance()
        status = monitor.check()
    label = (probability >= 0.5).astype(int)
    tp, fp = np.sum((label == 1) & (truth == 1)), np.sum((label == 1) & (truth == 0))
    tn, fn = np.sum((label == 0) & (truth == 0)), np.sum((label == 0) & (truth == 1))
    positives, negatives = probability[truth == 1], probability[truth == 0]
    auc = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p in positives for n in negatives])
    values = performance["metrics"]
    assert values["sensitivity"]["value"] == pytest.approx(tp / (tp + fn))
    assert values["specificity"]["value"] == pytest.approx(tn / (tn + fp))
    assert values["ppv"]["value"] == pytest.approx(tp / (tp + fp))
    assert values["auc"]["value"] == pytest.approx(auc)
    assert performance["n"] == 30 and performance["n_positive"] == truth.sum()
    for entry in values.values():
        assert entry["ci_low"] <= entry["value"] <= entry["ci_high"]
    assert performance["validation"]["sensitivity"] == 0.99
    below = values["sensitivity"]["ci_high"] < 0.99
    assert ("performance_sensitivity" in {a["check"] for a in status["active_alerts"]}) == below


def test_feedback_is_validated(tmp_path, checkpoint):
    with Monitor.open(sqlite_url(tmp_path / "f.db"), checkpoint) as monitor:
        prediction_id = monitor.record(fake_prediction(0.7), np.zeros((16, 16), np.float32))
        with pytest.raises(UnknownPrediction, match="no prediction"):
            monitor.add_feedback("0" * 32, "malignant", "R1")
        for label in ("cancer", 2, True):
            with pytest.raises(ValueError, match="not a class|boolean"):
                monitor.add_feedback(prediction_id, label, "R1")
        with pytest.raises(ValueError, match="never a name"):
            monitor.add_feedback(prediction_id, 1, "John Smith")
        stored = monitor.add_feedback(prediction_id, 1, "RAD-07")
    assert stored["class_name"] == "malignant" and stored["reader"] == "RAD-07"
    assert [check_reader(code) for code in ("R1", "JS2", "rad_12", "7")] == ["R1", "JS2", "rad_12", "7"]
    for name in ("Smith", "John Smith", "", "R1; drop", "Bob", "ANNA", "JS"):  # no digit: could be a name
        with pytest.raises(ValueError):
            check_reader(name)
    assert parse_since("30d").days == 30 and parse_since("all") is None
    with pytest.raises(ValueError, match="30d"):
        parse_since("a month")
    for endless in ("999999d", "99999999999w", "9" * 400 + "h"):  # utc_now() - period overflowed: a 500, not a 422
        with pytest.raises(ValueError, match="longer than 36500 days: use all"):
            parse_since(endless)


# Header values PostgreSQL refused for the log's columns (String(64), String(16), String(32)): the row was dropped.
OVERSIZED_HEADER = {"manufacturer": "M" * 80, "manufacturer_model": "\u00dc" * 70, "view_position": "POSTERO-ANTERIOR-ERECT",
                    "photometric_interpretation": "MONOCHROME2\x00", "pixel_spacing_mm": [1e30, 1e30],
                    "imager_pixel_spacing_mm": [float("nan"), 0.1]}


def assert_oversized_header_keeps_its_row(url: str, checkpoint: dict) -> None:
    """An oversized header is cut to fit, an absurd spacing is NULL, the row is kept and feedback on its id works."""
    with Monitor.open(url, checkpoint, settings=MonitorSettings(**TEST_SETTINGS)) as monitor:
        prediction_id = monitor.record(fake_prediction(0.7, meta=OVERSIZED_HEADER), np.zeros((16, 16), np.float32))
        assert monitor.add_feedback(prediction_id, "malignant", "R1")["prediction_id"] == prediction_id
        assert monitor.log_state()["dropped"] == 0
        columns = ["id", "manufacturer", "manufacturer_model", "view_position", "photometric_interpretation", "pixel_spacing"]
        window = monitor.window(limit=1000, columns=columns)
        assert [case["id"] for case in monitor.confirmed()] == [prediction_id]
    row = {name: values[window["id"].index(prediction_id)] for name, values in window.items()}
    assert row["manufacturer"] == "M" * 63 + "~"
    assert row["manufacturer_model"] == "\u00dc" * 31 + "~"  # 2 bytes each: 31 fit in 63 bytes, the marker makes 64
    assert row["view_position"] == "POSTERO-ANTERIO~" and row["photometric_interpretation"] == "MONOCHROME2"
    assert row["pixel_spacing"] is None  # 1e30 mm is no spacing, nor is a NaN imager spacing


def test_oversized_header_values_keep_their_row(tmp_path, checkpoint):
    assert_oversized_header_keeps_its_row(sqlite_url(tmp_path / "h.db"), checkpoint)


def test_logged_pixel_spacing(tmp_path):
    from lungdx.monitoring.monitor import logged_acquisition

    spacing = {"pixel_spacing_mm": [0.143, 0.143], "imager_pixel_spacing_mm": [0.15, 0.15]}
    assert logged_acquisition(spacing, (2048, 2048))["pixel_spacing"] == "0.14x0.14"
    bad = {"pixel_spacing_mm": [1e30, 1e30], "imager_pixel_spacing_mm": [0.15, 0.15]}
    assert logged_acquisition(bad, (2048, 2048))["pixel_spacing"] == "0.15x0.15"  # Imager Pixel Spacing stands in
    for absurd in ([0.0, 0.1], [-0.1, 0.1], [0.1], ["a", "b"], [float("inf"), 0.1], [10.5, 10.5], 7):
        assert logged_acquisition({"pixel_spacing_mm": absurd}, (64, 64))["pixel_spacing"] is None


def test_burned_in_annotation_is_not_archived(tmp_path, checkpoint, caplog):
    archive = tmp_path / "archive"
    pixels = np.full((32, 32), 0.4, np.float32)
    with Monitor.open(sqlite_url(tmp_path / "b.db"), checkpoint, settings=MonitorSettings(archive_dir=archive)) as monitor:
        with caplog.at_level("INFO", logger="lungdx.monitoring.monitor"):
            burned = monitor.record(fake_prediction(0.7, meta={"burned_in_annotation": "YES ", "patient_name": "Doe^Jane",
                                                               "manufacturer": "Acme"}), pixels)
        clean = monitor.record(fake_prediction(0.7, meta={"burned_in_annotation": "NO"}), pixels)
        plain = monitor.record(fake_prediction(0.7), pixels)  # PNG: no such attribute
        window = monitor.window(limit=10, columns=["id", "archived"])
    archived = dict(zip(window["id"], window["archived"], strict=True))
    assert archived == {burned: False, clean: True, plain: True}
    assert sorted(path.stem for path in archive.glob("*.png")) == sorted([clean, plain])
    assert f"prediction {burned} not archived: Burned In Annotation (0028,0301) is YES" in caplog.text
    assert "Doe" not in caplog.text and "Acme" not in caplog.text


def test_a_failing_webhook_is_logged_without_its_secret_path(caplog):
    from lungdx.monitoring.monitor import _post_json

    with caplog.at_level("WARNING"):
        _post_json("http://127.0.0.1:9/services/T000/B000/XXXXsecretTOKEN?key=abc", {"alert": "drift"}, 2.0)
    assert "alert webhook http://127.0.0.1:9/... failed" in caplog.text
    assert "secret" not in caplog.text and "key=abc" not in caplog.text


# ------------------------------------------------------------------------- storage and privacy


def test_the_log_survives_a_restart_and_stores_no_patient_data(tmp_path, checkpoint):
    url = sqlite_url(tmp_path / "r.db")
    meta = {"source": "/data/Doe_John/IM0001.dcm", "format": "dicom", "patient_name": "Doe^John",
            "patient_id": "PID-4711", "patient_birth_date": "19500101", "sop_instance_uid": "1.2.3.4.5.6789",
            "manufacturer": "ACME", "view_position": "PA", "photometric_interpretation": "MONOCHROME1",
            "pixel_spacing_mm": [0.175, 0.175]}
    with Monitor.open(url, checkpoint) as monitor:
        first = monitor.record(fake_prediction(0.8, meta=meta), np.full((40, 30), 0.25, np.float32))
        monitor.record(fake_prediction(0.2), np.full((40, 30), 0.75, np.float32))
        monitor.add_feedback(first, "malignant", "R1")
        key = monitor.case_key("1.2.3.4.5.6789")
    with Monitor.open(url, checkpoint) as monitor:  # the service restarts
        window = monitor.window()
        assert sorted(window["probability"]) == [0.2, 0.8]
        assert [case["id"] for case in monitor.confirmed()] == [first]
        assert monitor.case_key("1.2.3.4.5.6789") == key
    with Monitor.open(url) as monitor:  # read-only, as the CLI opens it
        assert monitor.version == window["model_version"][0]
        row = monitor.confirmed()[0]
        assert row["case_key"] == key and row["manufacturer"] == "ACME" and row["pixel_spacing"] == "0.17x0.17"
        assert row["photometric_interpretation"] == "MONOCHROME1" and row["image_size"] == "40x30"
        with pytest.raises(RuntimeError, match="read-only"):
            monitor.record(fake_prediction(0.5), np.zeros((8, 8), np.float32))
    import sqlite3

    dump = "\n".join(sqlite3.connect(tmp_path / "r.db").iterdump())
    for secret in ("Doe", "PID-4711", "19500101", "1.2.3.4.5.6789", "/data/", "/secret/path"):
        assert secret not in dump
    assert "journal_mode" and sqlite3.connect(tmp_path / "r.db").execute("PRAGMA journal_mode").fetchone()[0] == "wal"


WRITER = """
import sys, threading
import numpy as np
from lungdx.checkpoint import load_checkpoint
from lungdx.monitoring import Monitor, MonitorSettings
from lungdx.predict import Prediction

url, model, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
monitor = Monitor.open(url, load_checkpoint(model), settings=MonitorSettings(check_every=40, min_samples=10))
pixels = np.random.default_rng(0).uniform(size=(48, 48)).astype(np.float32)
def write(count):
    for i in range(count):
        monitor.record(Prediction(source="x", probability=float(i % 10) / 10, label=0, threshold=0.5), pixels)
threads = [threading.Thread(target=write, args=(n // 4,)) for _ in range(4)]
for thread in threads: thread.start()
for thread in threads: thread.join()
monitor.close()
print("done")
"""


def test_two_processes_writing_at_once_lose_no_row(tmp_path, trained_run):
    url = sqlite_url(tmp_path / "shared.db")
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    workers = [subprocess.Popen([sys.executable, str(script), url, str(trained_run / "model.pt"), "120"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [worker.communicate(timeout=120) for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs
    with Monitor.open(url) as monitor:
        ids = monitor.window(limit=1000)["id"]
    assert len(ids) == len(set(ids)) == 240


# -------------------------------------------------------------------------------- write-behind log


@contextlib.contextmanager
def database_held(path: Path):
    """Hold SQLite's write lock from another connection, as a slow or busy database would: the log writer waits."""
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield connection
    finally:
        connection.execute("ROLLBACK")
        connection.close()


def rows_in(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as connection:
        return connection.execute("SELECT count(*) FROM lungdx_monitor_predictions").fetchone()[0]


def test_records_are_queued_and_inserted_in_batches(tmp_path, checkpoint):
    from sqlalchemy import event

    pixels = np.full((64, 64), 0.4, np.float32)
    with Monitor.open(sqlite_url(tmp_path / "q.db"), checkpoint) as monitor:
        inserts = []
        event.listen(monitor.engine, "before_cursor_execute",
                     lambda conn, cursor, statement, parameters, context, many: inserts.append(len(parameters) if many else 1)
                     if statement.startswith("INSERT INTO lungdx_monitor_predictions") else None)
        with database_held(tmp_path / "q.db"):
            ids = [monitor.record(fake_prediction(0.1 + i / 100), pixels) for i in range(40)]
            assert rows_in(tmp_path / "q.db") == 0 and monitor.log_state()["pending"] == 40  # answered, not yet written
        assert monitor.flush(timeout_s=30)
        assert sorted(monitor.window(limit=100)["id"]) == sorted(ids)
    assert sum(inserts) == 40 and len(inserts) <= 2 and max(inserts) >= 20  # what waited went as one batch
    assert monitor.log_state() == {"pending": 0, "written": 40, "dropped": 0, "refused": 0, "batches": len(inserts)}


def test_a_clean_stop_writes_every_queued_record(tmp_path, checkpoint):
    pixels = np.full((64, 64), 0.6, np.float32)
    monitor = Monitor.open(sqlite_url(tmp_path / "c.db"), checkpoint, settings=MonitorSettings(archive_dir=tmp_path / "a"))
    with database_held(tmp_path / "c.db"):
        ids = [monitor.record(fake_prediction(0.3), pixels) for _ in range(200)]
        closing = threading.Thread(target=monitor.close)
        closing.start()  # close() waits for the writer while the database is still busy
        closing.join(0.3)
        assert closing.is_alive() and rows_in(tmp_path / "c.db") == 0
    closing.join(60)
    assert not closing.is_alive()
    with Monitor.open(sqlite_url(tmp_path / "c.db")) as reader:
        assert sorted(reader.window(limit=1000)["id"]) == sorted(ids)
    assert sorted(path.stem for path in (tmp_path / "a").glob("*.png")) == sorted(ids)
    with pytest.raises(RuntimeError, match="closed"):
        monitor.record(fake_prediction(0.3), pixels)


CRASH = """
import os, sys, time
import numpy as np
from lungdx.checkpoint import load_checkpoint
from lungdx.monitoring import LogQueueFull, Monitor, MonitorSettings
from lungdx.predict import Prediction

monitor = Monitor.open(sys.argv[1], load_checkpoint(sys.argv[2]), settings=MonitorSettings(log_queue_size=8, log_block_s=0.2))
os.close(os.open(sys.argv[3], os.O_CREAT))  # tell the test the tables exist, so it can take the write lock
while os.path.exists(sys.argv[3]):
    time.sleep(0.02)
accepted = refused = 0
for i in range(20):
    try:
        monitor.record(Prediction(source="x", probability=0.5, label=1, threshold=0.5), np.zeros((32, 32), np.float32))
        accepted += 1
    except LogQueueFull:
        refused += 1
print(accepted, refused, flush=True)
os._exit(0)  # a crash: no close(), no atexit, the queue is never written
"""


def test_a_crash_loses_at_most_the_queue_bound(tmp_path, trained_run):
    database, flag = tmp_path / "crash.db", tmp_path / "ready"
    (tmp_path / "crash.py").write_text(CRASH)
    worker = subprocess.Popen([sys.executable, str(tmp_path / "crash.py"), sqlite_url(database), str(trained_run / "model.pt"),
                               str(flag)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(600):
        if flag.exists() or worker.poll() is not None:
            break
        threading.Event().wait(0.1)
    with database_held(database):
        flag.unlink()
        out, err = worker.communicate(timeout=120)
    assert worker.returncode == 0, err
    accepted, refused = map(int, out.split())
    # Back-pressure: with 8 records unwritten, record() waits, then refuses; the crash loses those 8, no more.
    assert (accepted, refused) == (8, 12)
    assert rows_in(database) == 0
    assert "monitoring log behind (8 records waiting)" in err


def test_record_waits_while_the_oldest_unwritten_record_is_older_than_the_delay_bound(tmp_path, checkpoint):
    from lungdx.monitoring import LogQueueFull

    pixels = np.zeros((16, 16), np.float32)
    settings = MonitorSettings(log_max_delay_s=0.3, log_block_s=0.2)
    with Monitor.open(sqlite_url(tmp_path / "t.db"), checkpoint, settings=settings) as monitor:
        with database_held(tmp_path / "t.db"):
            monitor.record(fake_prediction(0.2), pixels)
            threading.Event().wait(0.35)
            with pytest.raises(LogQueueFull, match="oldest record has waited"):
                monitor.record(fake_prediction(0.2), pixels)
        assert monitor.flush(30)
        monitor.record(fake_prediction(0.2), pixels)  # written again: accepted at once
        assert monitor.log_state()["refused"] == 1 and len(monitor.window()["id"]) == 2
        assert monitor.registry.get_sample_value("lungdx_monitor_log_records", {"state": "refused"}) == 1.0


def test_feedback_on_a_prediction_still_queued(tmp_path, checkpoint):
    with Monitor.open(sqlite_url(tmp_path / "fq.db"), checkpoint) as monitor:
        with database_held(tmp_path / "fq.db"):
            prediction_id = monitor.record(fake_prediction(0.8), np.full((16, 16), 0.5, np.float32))
            assert rows_in(tmp_path / "fq.db") == 0
            feedback = {}
            writer = threading.Thread(target=lambda: feedback.update(monitor.add_feedback(prediction_id, "malignant", "R1")))
            writer.start()  # waits for the queued row; the lock is released below
            writer.join(0.2)
            assert writer.is_alive()
        writer.join(30)
        assert feedback["prediction_id"] == prediction_id and feedback["label"] == 1
        assert [case["id"] for case in monitor.confirmed()] == [prediction_id]


def test_a_row_the_database_refuses_is_dropped_alone(tmp_path, checkpoint, monkeypatch, caplog):
    import uuid

    from lungdx.monitoring import monitor as monitor_module

    ids = iter(["a" * 32, "b" * 32, "a" * 32, "c" * 32])  # the third repeats the first: an IntegrityError in its batch
    monkeypatch.setattr(monitor_module.uuid, "uuid4", lambda: uuid.UUID(next(ids)))
    pixels = np.full((16, 16), 0.5, np.float32)
    with Monitor.open(sqlite_url(tmp_path / "d.db"), checkpoint) as monitor:
        with database_held(tmp_path / "d.db"):
            for _ in range(4):
                monitor.record(fake_prediction(0.4), pixels)
        assert monitor.flush(30)
        assert sorted(monitor.window()["id"]) == ["a" * 32, "b" * 32, "c" * 32]
        assert monitor.log_state()["dropped"] == 1 and monitor.log_state()["written"] == 3
    # The answered id, the database's reason (not the statement with every parameter), and what it means.
    assert (f"prediction {'a' * 32} was answered but its row cannot be stored and is dropped (IntegrityError: UNIQUE "
            "constraint failed: lungdx_monitor_predictions.id); feedback on it will answer 404") in caplog.text
    assert "[parameters:" not in caplog.text


@pytest.mark.parametrize("hook", [None, "failing"])
def test_a_dropped_record_is_logged_without_a_hook_or_with_a_failing_one(hook, caplog):
    from lungdx.monitoring.writer import WriteBehind

    def write(batch):
        if "bad" in batch:
            raise ValueError("refused for good")

    def failing(payload, err):
        raise RuntimeError("the hook broke")

    writer = WriteBehind(write, on_drop=failing if hook else None, max_pending=10, max_delay_s=5, block_s=5,
                         batch_size=10, max_bytes=2**20)
    with caplog.at_level("ERROR", logger="lungdx.monitoring.writer"):
        for payload in ("good", "bad", "good"):
            writer.put(payload)
        assert writer.flush(10)
    assert writer.close(10)
    assert (writer.written, writer.dropped) == (2, 1)
    [record] = [entry for entry in caplog.records if "a record cannot be written and is dropped" in entry.getMessage()]
    assert "refused for good" in caplog.text and ("the hook broke" in caplog.text) == bool(hook)
    assert record.exc_info is not None  # the traceback, for an error nobody described


def test_image_statistics_equal_the_reference_statistics():
    from lungdx.monitoring.monitor import image_statistics
    from lungdx.reference import intensity_statistics

    rng = np.random.default_rng(5)
    images = phantoms(3, seed=1) + [rng.uniform(-0.2, 1.2, size=(1100, 700)), rng.uniform(size=(513, 1030)).astype(np.float32),
                                    np.full((5, 7), 0.25, np.float32), (rng.integers(0, 4096, (600, 480)) / 4095).astype(np.float32),
                                    rng.integers(0, 2, (40, 30)).astype(np.uint8)]
    for pixels in images:
        expected, fast = intensity_statistics(pixels), image_statistics(pixels)
        assert set(fast) == set(expected) - {"polarity"}
        for key, value in fast.items():
            assert np.allclose(value, expected[key], rtol=1e-12, atol=1e-15), (pixels.shape, key)
    broken = np.zeros((8, 8), np.float32)
    broken[3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        image_statistics(broken)


def test_pixel_keys_are_stable_per_image(tmp_path, checkpoint):
    first, second = phantoms(2, seed=9)
    url = sqlite_url(tmp_path / "k.db")
    with Monitor.open(url, checkpoint) as monitor:
        for pixels in (first, first.copy(), second, first[:-1], first):
            monitor.record(fake_prediction(0.5), pixels)
    with Monitor.open(url) as reader:
        keys = list(reversed(reader.window()["case_key"]))  # newest first
    assert keys[0] == keys[1] == keys[4] and len(set(keys)) == 3 and len(keys[0]) == 32


# --------------------------------------------------------------------------------------- router


@pytest.fixture
def client(tmp_path, checkpoint):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from types import SimpleNamespace

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lungdx.service.monitor_routes import router

    app = FastAPI()
    app.include_router(router)
    app.state.settings = SimpleNamespace(api_key="k" * 16)
    monitor = Monitor.open(sqlite_url(tmp_path / "api.db"), checkpoint, settings=MonitorSettings(**TEST_SETTINGS))
    app.state.monitor = monitor
    with TestClient(app, headers={"X-API-Key": "k" * 16}) as test_client:
        yield test_client, monitor
    monitor.close()


def test_router_feedback_report_and_summary(client):
    test_client, monitor = client
    prediction_id = monitor.record(fake_prediction(0.9), np.full((32, 32), 0.5, np.float32))
    unknown = test_client.post("/v1/predictions/nope/feedback", json={"label": "malignant", "reader": "R1"})
    assert unknown.status_code == 404 and "no prediction with id 'nope'" in unknown.json()["detail"]
    assert test_client.post(f"/v1/predictions/{prediction_id}/feedback", json={"label": "cancer", "reader": "R1"}).status_code == 422
    assert test_client.post(f"/v1/predictions/{prediction_id}/feedback", json={"label": 1, "reader": "Jane Doe"}).status_code == 422
    stored = test_client.post(f"/v1/predictions/{prediction_id}/feedback", json={"label": "malignant", "reader": "R1"})
    assert stored.status_code == 200
    assert stored.json()["label"] == 1 and stored.json()["prediction_id"] == prediction_id
    no_key = test_client.post(f"/v1/predictions/{prediction_id}/feedback", json={"label": 1, "reader": "R1"},
                              headers={"X-API-Key": "wrong"})
    assert no_key.status_code == 401
    summary = test_client.get("/v1/monitor/summary", params={"since": "7d"})
    assert summary.status_code == 200 and summary.json()["volume"]["confirmed_total"] == 1
    assert {c["name"] for c in summary.json()["drift"]} >= {"score_psi", "intensity_psi", "manufacturer"}
    report = test_client.get("/v1/monitor/report", params={"since": "all"})
    assert report.status_code == 200 and report.headers["content-type"].startswith("text/html")
    assert "data:image/png;base64," in report.text and "<script" not in report.text and "http" not in report.text
    assert test_client.get("/v1/monitor/summary", params={"since": "soon"}).status_code == 422
    test_client.app.state.monitor = None
    disabled = test_client.post(f"/v1/predictions/{prediction_id}/feedback", json={"label": 1, "reader": "R1"})
    assert disabled.status_code == 503 and "monitoring is disabled" in disabled.json()["detail"]


# ------------------------------------------------------------------------------------------ CLI


def test_cli_report_export_challenge(tmp_path, trained_run, phantom_dir, checkpoint, predictor, capsys):
    from lungdx.cli import main
    from lungdx.data.manifest import apply_task, load_dataset
    from lungdx.io import read_image

    labels = pd.read_csv(phantom_dir / "labels.csv")
    chosen = pd.concat([labels[labels["malignant"] == 1].head(12), labels[labels["malignant"] != 1].head(12)])
    url = sqlite_url(tmp_path / "cli.db")
    settings = MonitorSettings(**TEST_SETTINGS, archive_dir=tmp_path / "archive")
    with Monitor.open(url, checkpoint, settings=settings) as monitor:
        for image, malignant in zip(chosen["image"], chosen["malignant"], strict=True):
            radiograph = read_image(phantom_dir / image)
            prediction = predictor.predict_pixels(radiograph.pixels, meta=radiograph.meta)
            prediction_id = monitor.record(prediction, radiograph.pixels)
            monitor.add_feedback(prediction_id, int(malignant == 1), "R1")
        monitor.record(prediction, radiograph.pixels)  # one case nobody confirmed

    assert main(["monitor", "report", "--db", url, "--since", "30d", "--out", str(tmp_path / "report.html")]) == 0
    page = (tmp_path / "report.html").read_text()
    assert "Drift" in page and "Rolling performance" in page and "data:image/png;base64," in page

    assert main(["monitor", "export", "--db", url, "--out", str(tmp_path / "feedback.csv")]) == 0
    frame = apply_task(load_dataset(tmp_path / "feedback.csv"), checkpoint["task"])
    assert len(frame) == 24 and frame["target"].sum() == 12 and all(Path(p).is_file() for p in frame["path"])
    assert not frame["path"].str.contains("phantoms").any()  # archive copies, not the source files

    out = tmp_path / "challenge"
    assert main(["monitor", "challenge", str(trained_run), "--db", url, "--current", str(trained_run),
                 "--bootstrap", "200", "--device", "cpu", "--out", str(out)]) == 0
    result = json.loads((out / "comparison.json").read_text())
    assert result["n_cases"] == 24 and result["delong"]["difference"] == pytest.approx(0.0)
    assert result["mcnemar"]["method"] == "none discordant"
    capsys.readouterr()
    # Against the logged predictions: the same model on the archived 16-bit copies gives the same scores.
    assert main(["monitor", "challenge", str(trained_run), "--db", url, "--bootstrap", "200", "--device", "cpu"]) == 0
    assert "24 shared test cases" in capsys.readouterr().out
    assert main(["monitor", "report", "--db", sqlite_url(tmp_path / "empty.db"), "--out", str(tmp_path / "x.html")]) == 2


def test_reading_a_database_that_is_not_there_says_so_and_creates_nothing(tmp_path):
    missing = tmp_path / "typo.db"
    with pytest.raises(FileNotFoundError, match="typo.db: no such monitoring database"):
        Monitor.open(sqlite_url(missing))
    assert not missing.exists()


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_an_in_memory_database_is_refused_at_once(url):
    # Each thread would get its own empty database: the background writer would retry for ever.
    from lungdx.service.settings import _check_database_url

    for check in (Monitor.open, _check_database_url):
        with pytest.raises(ValueError, match="in-memory SQLite database cannot hold the monitoring log"):
            check(url)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread niceness is a Linux feature (threads are tasks)")
def test_the_log_writer_thread_runs_at_a_lower_priority_than_the_requests():
    import os

    from lungdx.monitoring.writer import WriteBehind

    seen = []
    writer = WriteBehind(lambda batch: seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id())),
                         max_pending=10, max_delay_s=5, block_s=5, batch_size=10, max_bytes=2**20, nice=5)
    writer.put("row")
    assert writer.flush(10)
    assert writer.close(10)
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert seen == [min(19, base + 5)]
