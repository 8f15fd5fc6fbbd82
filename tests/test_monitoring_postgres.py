"""The monitoring log on a real PostgreSQL server (a throw-away cluster on a loopback port), not only SQLite."""

import subprocess
import sys

import pytest

pytest.importorskip("sqlalchemy")
pytest.importorskip("psycopg", reason="PostgreSQL tests need psycopg (pip install -e '.[postgres]')")

from postgres import postgres_cluster  # noqa: E402
from test_monitoring import WRITER, phantoms  # noqa: E402

from lungdx.checkpoint import load_checkpoint  # noqa: E402
from lungdx.monitoring import Monitor, MonitorSettings  # noqa: E402
from lungdx.predict import Predictor  # noqa: E402


@pytest.fixture(scope="module")
def postgres_url():
    """A fresh cluster (tests/postgres.py) with one database, ``monitor``, owned by its superuser."""
    with postgres_cluster() as server:
        server.client("createdb", "monitor")
        yield server.url("monitor")


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
