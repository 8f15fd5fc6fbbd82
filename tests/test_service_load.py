"""A bounded load test over loopback: a real ``lungdx serve`` process, concurrent clients, no failure, stable memory.

With ``--db none`` and with monitoring on (SQLite), the default configuration.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the service tests need the serve extra (pip install -e '.[serve]')")
pytest.importorskip("httpx", reason="the load client uses httpx")

BENCH = Path(__file__).resolve().parents[1] / "bench" / "serve_load.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("serve_load", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("monitoring", [False, True], ids=["db-none", "db-sqlite"])
def test_concurrent_load_has_no_failures_and_stable_memory(trained_run, phantom_dir, tmp_path, monitoring):
    bench = load_bench()
    images = [path.read_bytes() for path in sorted((phantom_dir / "images").glob("*.png"))[:8]]
    images.append(b"not an image" * 10)  # one bad upload in the mix: a 415 for it, nothing else disturbed
    port = bench.free_port()
    database = tmp_path / "monitor.db"
    server = bench.start_server(trained_run, port, max_batch=8, timeout_s=60,
                                extra=["--db", f"sqlite:///{database}"] if monitoring else [])
    url = f"http://127.0.0.1:{port}/v1/predictions"
    try:
        warm = bench.run_load(url, images, clients=6, requests=90, pid=server.pid, timeout_s=30)
        measured = bench.run_load(url, images, clients=6, requests=180, pid=server.pid, timeout_s=30)
        assert server.poll() is None, "the server died under load"
    finally:
        bench.stop_server(server)
    for result in (warm, measured):
        assert result.statuses == {200: result.requests - result.requests // len(images), 415: result.requests // len(images)}
    assert measured.rss_end_mb is None or measured.rss_end_mb - measured.rss_warm_mb < 25, \
        f"resident memory grew from {measured.rss_warm_mb:.0f} to {measured.rss_end_mb:.0f} MB"
    if monitoring:  # every answered prediction is in the log after a clean stop (SIGTERM)
        import contextlib
        import sqlite3

        with contextlib.closing(sqlite3.connect(database)) as connection:
            logged = connection.execute("SELECT count(*) FROM lungdx_monitor_predictions").fetchone()[0]
        assert logged == warm.statuses[200] + measured.statuses[200]
