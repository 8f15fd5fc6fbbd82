"""One wording of a result: the threshold band, the statement, and the same words at every door."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lungdx import metrics
from lungdx.checkpoint import load_checkpoint
from lungdx.report import NOT_FOR_CLINICAL_USE
from lungdx.wording import state_result

CHECKPOINT = {"threshold": 0.40, "threshold_method": "youden", "threshold_band": [0.35, 0.47],
              "class_names": ["not malignant", "malignant"]}


def test_threshold_band_is_the_bootstrap_of_the_choice_on_validation():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 80)
    p = np.clip(0.3 * y + 0.7 * rng.random(80), 0, 1)
    threshold = metrics.choose_threshold(y, p)
    low, high = metrics.threshold_band(y, p, groups=np.arange(80) // 2, n_resamples=300)
    assert low <= threshold <= high and high - low > 0
    assert (low, high) == metrics.threshold_band(y, p, groups=np.arange(80) // 2, n_resamples=300)  # seeded
    # more validation patients, a narrower band
    y_big, p_big = np.tile(y, 10), np.tile(p, 10)
    big_low, big_high = metrics.threshold_band(y_big, p_big, n_resamples=300)
    assert big_high - big_low < high - low


def test_one_class_resamples_are_skipped():
    y, p = np.array([0, 0, 0, 1]), np.array([0.1, 0.2, 0.3, 0.9])
    low, high = metrics.threshold_band(y, p, n_resamples=200)
    assert np.isfinite(low) and np.isfinite(high)


@pytest.mark.parametrize("probability, near, decision", [(0.3937, True, "not malignant"), (0.41, True, "malignant"),
                                                         (0.20, False, "not malignant"), (0.90, False, "malignant")])
def test_statement_decision_and_band(probability, near, decision):
    statement = state_result(probability, CHECKPOINT, ["input drift: intensity PSI 0.31 over the last 25 images"])
    assert statement.decision == decision and statement.near_threshold is near
    assert ("near the threshold" in statement.headline) is near
    assert "Youden's J on the validation patients" in statement.threshold_text
    assert ("could as well have gone the other way" in statement.uncertainty_text) is near
    assert statement.sentences[-1] == NOT_FOR_CLINICAL_USE
    assert "Monitoring alert: input drift" in " ".join(statement.sentences)


def test_statement_without_band_or_threshold_says_so():
    old = {key: value for key, value in CHECKPOINT.items() if key != "threshold_band"}
    assert "stores no uncertainty band" in state_result(0.4, old).uncertainty_text
    assert not state_result(0.4, old).near_threshold
    none = state_result(0.4, {**old, "threshold": None})
    assert none.decision is None and "no decision" in none.headline


def test_training_stores_the_band(trained_run):
    checkpoint = load_checkpoint(trained_run / "model.pt")
    low, high = checkpoint["threshold_band"]
    assert low <= checkpoint["threshold"] <= high


@pytest.fixture(scope="module")
def borderline_run(trained_run, tmp_path_factory) -> Path:
    """The trained run with a threshold band spanning [0, 1]: every probability is near the threshold."""
    run = tmp_path_factory.mktemp("borderline") / "run"
    shutil.copytree(trained_run, run)
    checkpoint = torch.load(run / "model.pt", weights_only=True)
    checkpoint["threshold_band"] = [0.0, 1.0]
    torch.save(checkpoint, run / "model.pt")
    return run


def test_every_door_words_a_borderline_result_the_same(borderline_run, dicom_dir, tmp_path, capsys):
    pytest.importorskip("highdicom", reason="the SR and FHIR doors need the pacs extra")
    pytest.importorskip("fastapi", reason="the service door needs the serve extra")
    from fastapi.testclient import TestClient

    from lungdx.cli import main
    from lungdx.integrations.pipeline import analyse_file
    from lungdx.predict import Predictor
    from lungdx.service.app import create_app
    from lungdx.service.settings import ServiceSettings

    path = dicom_dir / "nih_cxr14_dx_chest_nofinding.dcm"
    predictor = Predictor.from_path(borderline_run, precision="fp32")
    results = analyse_file(predictor, path)
    expected = state_result(results.prediction.probability, predictor.checkpoint)
    assert expected.near_threshold
    # SR: the sentences as Comment items; the coded "near the threshold" evaluation says yes
    comments = [item.TextValue for item in _items(results.sr) if item.ValueType == "TEXT"
                and item.ConceptNameCodeSequence[0].CodeMeaning == "Comment"]
    assert comments == [sentence for sentence in expected.sentences if sentence]
    near = [item for item in _items(results.sr) if item.ValueType == "CODE"
            and item.ConceptNameCodeSequence[0].CodeMeaning == "Probability near the operating threshold"]
    assert near[0].ConceptCodeSequence[0].CodeMeaning == "Yes"
    # FHIR: the conclusion is the statement; the band is a component
    observation, report = (entry["resource"] for entry in results.fhir_bundle["entry"])
    assert expected.headline in report["conclusion"] and expected.uncertainty_text in report["conclusion"]
    assert report["conclusion"].endswith(NOT_FOR_CLINICAL_USE)
    assert observation["interpretation"][0]["text"] == expected.headline
    assert any("valueRange" in component for component in observation["component"])
    # the service (what the page shows): the same statement
    with TestClient(create_app(ServiceSettings(run=borderline_run, db_url=None, precision="fp32"))) as client:
        body = client.post("/v1/predictions", files={"file": ("x", path.read_bytes())}).json()
    assert body["statement"]["headline"] == expected.headline and body["statement"]["near_threshold"] is True
    # the CLI
    assert main(["predict", str(borderline_run), str(path), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["statement"]["headline"] == expected.headline
    assert main(["predict", str(borderline_run), str(path)]) == 0
    out = capsys.readouterr().out
    assert "(near the threshold: uncertain)" in out and NOT_FOR_CLINICAL_USE in out


def _items(dataset):
    for item in dataset.get("ContentSequence", []):
        yield item
        yield from _items(item)


def test_the_page_shows_the_borderline_band(borderline_run, phantom_dir):
    """In a real browser: the decision says near the threshold, in the amber of uncertainty."""
    from urllib.parse import urlparse

    playwright = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright")
    from test_service_load import load_bench

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("the browser test needs Debian's chromium (apt-get install chromium); .ci/run installs it")
    bench = load_bench()
    port = bench.free_port()
    process = bench.start_server(borderline_run, port, max_batch=1, timeout_s=60, extra=["--db", "none"])
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page()
            page.route("**/*", lambda route: route.abort() if urlparse(route.request.url).hostname not in (None, "127.0.0.1")
                       and not route.request.url.startswith("data:") else route.continue_())
            page.goto(f"http://127.0.0.1:{port}/")
            page.set_input_files("#file", str(sorted((phantom_dir / "images").glob("*.png"))[0]))
            page.wait_for_selector("#result:not([hidden])")
            assert "near the threshold: uncertain" in page.text_content("#decision")
            assert page.get_attribute("#decision", "class") == "uncertain"
            assert "95% bootstrap interval" in page.text_content("#statement")
            assert NOT_FOR_CLINICAL_USE in page.text_content("#model-line")
            browser.close()
    finally:
        bench.stop_server(process)


def test_an_active_alert_appears_in_the_next_prediction(trained_run, tmp_path):
    """After shifted uploads raise the intensity drift alert, the next response carries it, in plain words."""
    pytest.importorskip("fastapi", reason="the service needs the serve extra")
    import io

    from fastapi.testclient import TestClient
    from PIL import Image
    from test_monitoring import phantoms

    from lungdx.service.app import create_app
    from lungdx.service.settings import ServiceSettings

    def png(pixels):
        buffer = io.BytesIO()
        Image.fromarray(np.round(pixels * 65535).astype(np.uint16)).save(buffer, format="PNG")
        return buffer.getvalue()

    settings = ServiceSettings(run=trained_run, db_url=f"sqlite:///{tmp_path / 'monitor.db'}", precision="fp32")
    with TestClient(create_app(settings)) as client:
        first = client.post("/v1/predictions", files={"file": ("x.png", png(phantoms(1, seed=300)[0]))}).json()
        assert first["alerts"] == [] and first["statement"]["alerts"] == []
        for pixels in phantoms(40, seed=200, shift=0.3):
            assert client.post("/v1/predictions", files={"file": ("x.png", png(pixels))}).status_code == 200
        client.get("/v1/monitor/summary")  # runs the checks now (else every 25 records)
        body = client.post("/v1/predictions", files={"file": ("x.png", png(phantoms(1, seed=301)[0]))}).json()
    checks = {alert["check"] for alert in body["alerts"]}
    assert "intensity_psi" in checks
    message = next(alert["message"] for alert in body["alerts"] if alert["check"] == "intensity_psi")
    assert message in body["statement"]["alerts"] and message.endswith(".")
