"""Monitoring through the service: uploads are logged, drift shows on /metrics, the log outlives a restart."""

import io

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the service tests need the serve extra (pip install -e '.[serve]')")
pytest.importorskip("httpx2", reason="the TestClient needs httpx2 (the test extra)")
from fastapi.testclient import TestClient  # noqa: E402
from test_monitoring import phantoms  # noqa: E402

from lungdx.service.app import create_app  # noqa: E402
from lungdx.service.settings import ServiceSettings  # noqa: E402


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.round(pixels * 65535).astype(np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


def upload_all(client, images) -> list[str]:
    ids = []
    for pixels in images:
        response = client.post("/v1/predictions", files={"file": ("x.png", png(pixels))})
        assert response.status_code == 200, response.text
        ids.append(response.json()["id"])
    return ids


def alert(client, check: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f'lungdx_monitor_alert{{check="{check}"}}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no lungdx_monitor_alert for {check} on /metrics")


@pytest.mark.parametrize("shift, raised", [(0.0, 0.0), (0.3, 1.0)])
def test_shifted_uploads_raise_the_intensity_drift_alert(trained_run, tmp_path, shift, raised):
    settings = ServiceSettings(run=trained_run, db_url=f"sqlite:///{tmp_path / 'monitor.db'}")
    with TestClient(create_app(settings)) as client:
        upload_all(client, phantoms(40, seed=200, shift=shift))
        summary = client.get("/v1/monitor/summary").json()  # runs the checks now (else every 25 records)
        assert summary["volume"]["in_period"] == 40
        assert ("intensity_psi" in {active["check"] for active in summary["alerts"]["active"]}) == bool(raised)
        assert alert(client, "intensity_psi") == raised
        # What a prediction response carries: the same alerts, in plain words, with no database read.
        active = {entry["check"]: entry for entry in client.app.state.monitor.active_alerts()}
        assert active.keys() == {entry["check"] for entry in summary["alerts"]["active"]}
        if raised:
            psi = active["intensity_psi"]
            assert psi["message"].startswith("Recent images differ in brightness or contrast") and psi["since"].endswith("Z")


def test_a_log_that_is_behind_refuses_with_503_and_retry_after(trained_run, tmp_path, monkeypatch):
    from lungdx.monitoring import LogQueueFull

    settings = ServiceSettings(run=trained_run, db_url=f"sqlite:///{tmp_path / 'monitor.db'}")
    with TestClient(create_app(settings)) as client:
        [prediction_id] = upload_all(client, phantoms(1, seed=3))

        def behind(*_args, **_kwargs):
            raise LogQueueFull("the database has taken no write for 10 s")

        monitor = client.app.state.monitor
        monkeypatch.setattr(monitor, "record", behind)
        monkeypatch.setattr(monitor, "add_feedback", behind)
        refused = [client.post("/v1/predictions", files={"file": ("x.png", png(phantoms(1, seed=4)[0]))}),
                   client.post(f"/v1/predictions/{prediction_id}/feedback", json={"label": 1, "reader": "R1"})]
        for response in refused:
            assert response.status_code == 503 and response.headers["retry-after"] == "10", response.text
            assert "monitoring log is behind" in response.json()["detail"]


def test_the_log_outlives_a_service_restart(trained_run, tmp_path, phantom_dir):
    settings = ServiceSettings(run=trained_run, db_url=f"sqlite:///{tmp_path / 'monitor.db'}")
    with TestClient(create_app(settings)) as first:
        ids = upload_all(first, phantoms(3, seed=7))
    with TestClient(create_app(settings)) as second:
        feedback = second.post(f"/v1/predictions/{ids[1]}/feedback", json={"label": 1, "reader": "R1"})
        assert feedback.status_code == 200 and feedback.json()["prediction_id"] == ids[1]
        assert second.get("/v1/monitor/summary").json()["volume"]["confirmed_total"] == 1
        unknown = second.post("/v1/predictions/not-an-id/feedback", json={"label": 1, "reader": "R1"})
        assert unknown.status_code == 404
    assert len(set(ids)) == 3


def test_feedback_types_are_strict_and_reader_codes_need_a_digit(trained_run, tmp_path):
    settings = ServiceSettings(run=trained_run, db_url=f"sqlite:///{tmp_path / 'monitor.db'}")
    with TestClient(create_app(settings)) as client:
        [prediction_id] = upload_all(client, phantoms(1, seed=11))
        url = f"/v1/predictions/{prediction_id}/feedback"
        # Lax mode turned true into 1 ("malignant") and took 1.0 for 1; a name is not a reader code.
        for body in ({"label": True, "reader": "R1"}, {"label": 1.0, "reader": "R1"}, {"label": False, "reader": "R1"},
                     {"label": "malignant", "reader": 12}, {"label": "malignant", "reader": "Bob"},
                     {"label": "malignant", "reader": "ANNA"}, {"label": 2, "reader": "R1"}):
            response = client.post(url, json=body)
            assert response.status_code == 422, (body, response.text)
        assert client.get("/v1/monitor/summary").json()["volume"]["confirmed_total"] == 0
        for body, class_name in (({"label": 0, "reader": "R1"}, "not malignant"), ({"label": "malignant", "reader": "RAD-07"},
                                                                                    "malignant")):
            response = client.post(url, json=body)
            assert response.status_code == 200 and response.json()["class_name"] == class_name, response.text


def test_two_service_processes_share_one_log_and_lose_no_row(trained_run, tmp_path, phantom_dir):
    import threading

    import httpx
    from test_service_load import load_bench

    bench = load_bench()
    database = f"sqlite:///{tmp_path / 'monitor.db'}"
    images = [path.read_bytes() for path in sorted((phantom_dir / "images").glob("*.png"))[:6]]
    ports = [bench.free_port(), bench.free_port()]
    servers = [bench.start_server(trained_run, port, max_batch=4, extra=["--db", database], timeout_s=60) for port in ports]
    try:
        results = {}
        workers = [threading.Thread(target=lambda port=port: results.setdefault(port, bench.run_load(
            f"http://127.0.0.1:{port}/v1/predictions", images, clients=3, requests=40, timeout_s=30))) for port in ports]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        summary = httpx.get(f"http://127.0.0.1:{ports[0]}/v1/monitor/summary", timeout=30).json()
    finally:
        for server in servers:
            bench.stop_server(server)  # SIGTERM: a clean stop, the lifespan writes what is still queued
    assert [result.statuses for result in results.values()] == [{200: 40}, {200: 40}]
    assert summary["volume"]["current_model_total"] >= 40  # this process's rows at least (it waits for its own queue)
    from lungdx.monitoring import Monitor

    with Monitor.open(database) as reader:
        assert len(reader.window(limit=1000)["id"]) == 80
