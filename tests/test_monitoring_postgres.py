"""The monitoring log on a real PostgreSQL server (a throw-away cluster on a loopback port), not only SQLite."""

import subprocess
import sys

import pytest

pytest.importorskip("sqlalchemy")
pytest.importorskip("psycopg", reason="PostgreSQL tests need psycopg (pip install -e '.[postgres]')")

from postgres import postgres_cluster  # noqa: E402
from test_monitoring import OVERSIZED_HEADER, WRITER, assert_oversized_header_keeps_its_row, fake_prediction, phantoms  # noqa: E402

from lungdx.checkpoint import load_checkpoint  # noqa: E402
from lungdx.monitoring import Monitor, MonitorSettings  # noqa: E402
from lungdx.predict import Predictor  # noqa: E402


@pytest.fixture(scope="module")
def postgres_server():
    """A fresh cluster (tests/postgres.py) with one database, ``monitor``, owned by its superuser."""
    with postgres_cluster() as server:
        server.client("createdb", "monitor")
        yield server


@pytest.fixture(scope="module")
def postgres_url(postgres_server):
    return postgres_server.url("monitor")


def test_log_feedback_drift_and_reopen_on_postgresql(postgres_url, trained_run):
    checkpoint = load_checkpoint(trained_run / "model.pt")
    predictor = Predictor(checkpoint, device="cpu")
    settings = MonitorSettings(min_samples=20, min_reference=5, n_bootstrap=200, min_feedback=10, check_every=1000)
    with Monitor.open(postgres_url, checkpoint, settings=settings) as monitor:
        ids = [monitor.record(predictor.predict_pixels(pixels), pixels) for pixels in phantoms(30, seed=3, shift=0.3)]
        for index, prediction_id in enumerate(ids[:12]):
            monitor.add_feedback(prediction_id, index % 2, "R1")
        status = monitor.check()
    assert {"intensity_psi", "intensity_ks"} <= {alert["check"] for alert in status["active_alerts"]}
    assert status["performance"]["n"] == 12
    with Monitor.open(postgres_url) as reader:  # a restart, read-only as `lungdx monitor` opens it
        summary = reader.summary(since="all")
    assert summary["volume"]["current_model_total"] == 30 and summary["volume"]["confirmed_total"] == 12


def test_two_processes_writing_at_once_lose_no_row_on_postgresql(postgres_url, trained_run, tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    Monitor.open(postgres_url, load_checkpoint(trained_run / "model.pt")).close()  # tables exist before the race
    with Monitor.open(postgres_url) as monitor:
        before = len(monitor.window(limit=10_000, all_versions=True)["id"])
    workers = [subprocess.Popen([sys.executable, str(script), postgres_url, str(trained_run / "model.pt"), "80"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [worker.communicate(timeout=120) for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs
    with Monitor.open(postgres_url) as monitor:
        ids = monitor.window(limit=10_000, all_versions=True)["id"]
    assert len(ids) == len(set(ids)) == before + 160


def test_oversized_header_values_keep_their_row_on_postgresql(postgres_server, trained_run):
    postgres_server.client("createdb", "headers")  # its own database: the tests above count their rows
    assert_oversized_header_keeps_its_row(postgres_server.url("headers"), load_checkpoint(trained_run / "model.pt"))


def test_a_row_postgresql_refuses_is_logged_by_its_id(postgres_server, trained_run, monkeypatch, caplog):
    import numpy as np

    from lungdx.monitoring import UnknownPrediction, store

    postgres_server.client("createdb", "refused")
    monkeypatch.setattr(store, "fit_text", lambda value, width: value)  # the values as the header had them
    with Monitor.open(postgres_server.url("refused"), load_checkpoint(trained_run / "model.pt")) as monitor:
        with caplog.at_level("ERROR", logger="lungdx.monitoring.monitor"):
            prediction_id = monitor.record(fake_prediction(0.7, meta=OVERSIZED_HEADER), np.zeros((16, 16), np.float32))
            assert monitor.flush(30)
        assert monitor.log_state()["dropped"] == 1
        with pytest.raises(UnknownPrediction):
            monitor.add_feedback(prediction_id, 1, "R1")
    assert f"prediction {prediction_id} was answered but its row cannot be stored and is dropped" in caplog.text
    assert "MMMM" not in caplog.text  # the reason, not the row's values
