"""The monitoring log on a real PostgreSQL server (a throw-away cluster on a loopback port), not only SQLite."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("sqlalchemy")
pytest.importorskip("psycopg", reason="PostgreSQL tests need psycopg (pip install -e '.[postgres]')")

from test_monitoring import WRITER, phantoms  # noqa: E402

from lungdx.checkpoint import load_checkpoint  # noqa: E402
from lungdx.monitoring import Monitor, MonitorSettings  # noqa: E402
from lungdx.predict import Predictor  # noqa: E402


def _pg_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found and shutil.which("initdb") is None:
        pytest.skip("PostgreSQL server binaries not found: apt-get install postgresql (.ci/run installs it)")
    return found[-1].parent if found else Path(shutil.which("initdb")).parent


@pytest.fixture(scope="module")
def postgres_url():
    """A fresh cluster in a temporary folder; as root, its programs run as the postgres user (initdb refuses root)."""
    pg_bin = _pg_bin()
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    folder = Path(tempfile.mkdtemp(prefix="lungdx-pg-"))
    if as_postgres:
        shutil.chown(folder, "postgres")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data, options = folder / "data", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"

    def run(*command):
        subprocess.run([*as_postgres, *command], check=True, capture_output=True, text=True, timeout=120)

    run(str(pg_bin / "initdb"), "-D", str(data), "-A", "trust", "-U", "lungdx")
    run(str(pg_bin / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "start")
    try:
        run(str(pg_bin / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "lungdx", "monitor")
        yield f"postgresql+psycopg://lungdx@127.0.0.1:{port}/monitor"
    finally:
        run(str(pg_bin / "pg_ctl"), "-D", str(data), "-m", "fast", "stop")
        shutil.rmtree(folder, ignore_errors=True)


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
