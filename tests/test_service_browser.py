"""The radiologist's web page in a real browser (Debian's chromium driven by Playwright) against a real server."""

import shutil
from urllib.parse import urlparse

import pytest
from test_service_load import load_bench

pytest.importorskip("fastapi", reason="the service tests need the serve extra (pip install -e '.[serve]')")
playwright = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (pip install playwright)")

KEY = "browser-test-key-0123456789"


@pytest.fixture(scope="module")
def server(trained_run, tmp_path_factory):
    """``lungdx serve`` with an API key, a monitoring database and occlusion heatmaps.

    Occlusion because the two-epoch test model's Grad-CAM is zero everywhere.
    """
    bench = load_bench()
    port = bench.free_port()
    database = tmp_path_factory.mktemp("monitor") / "monitor.db"
    process = bench.start_server(trained_run, port, max_batch=4, timeout_s=60, env={"LUNGDX_API_KEY": KEY},
                                 extra=["--heatmap-method", "occlusion", "--db", f"sqlite:///{database}"])
    yield f"http://127.0.0.1:{port}"
    bench.stop_server(process)


def test_upload_shows_the_probability_and_toggles_the_heatmap(server, phantom_dir, tmp_path):
    import httpx

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("the browser test needs Debian's chromium (apt-get install chromium); .ci/run installs it")
    image = sorted((phantom_dir / "images").glob("*.png"))[3]
    expected = httpx.post(f"{server}/v1/predictions", files={"file": image.read_bytes()}, headers={"X-API-Key": KEY}).json()
    elsewhere = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})

        def only_loopback(route):  # a hospital network has no internet: the page must not need it
            if urlparse(route.request.url).hostname != "127.0.0.1" and not route.request.url.startswith("data:"):
                elsewhere.append(route.request.url)
                return route.abort()
            return route.continue_()

        page.route("**/*", only_loopback)
        page.goto(server + "/")
        page.wait_for_selector("#status.error")  # no key yet: the page says so instead of failing silently
        assert "API key" in page.text_content("#status")
        page.fill("#api-key", KEY)
        page.press("#api-key", "Enter")
        page.dispatch_event("#api-key", "change")
        page.wait_for_selector("#card-list dt")
        page.set_input_files("#file", str(image))
        page.wait_for_selector("#result:not([hidden])")
        shown = page.text_content("#probability")
        heatmap = page.locator("#heatmap")
        heatmap_loaded = page.eval_on_selector("#heatmap", "img => img.complete && img.naturalWidth > 0")
        visible_before = heatmap.is_visible()
        page.uncheck("#show-heatmap")
        hidden_after = heatmap.is_hidden()
        page.check("#show-heatmap")
        page.fill("#opacity", "20")
        opacity = page.eval_on_selector("#heatmap", "img => img.style.opacity")
        page.screenshot(path=str(tmp_path / "service.png"), full_page=True)
        decision = page.text_content("#decision")
        page.fill("#reader", "R1")
        page.click(f"#feedback-buttons button[data-label='{expected['label']}']")
        page.wait_for_selector("#feedback-status:has-text('Recorded')")
        page.click("#tab-monitor")
        frame = page.frame_locator("#monitor-frame")
        frame.locator("h1").first.wait_for()
        monitoring_title = frame.locator("h1").first.text_content()
        page.screenshot(path=str(tmp_path / "monitoring.png"), full_page=True)
        page.goto(server + "/docs")  # the API docs too render without internet
        page.wait_for_selector(".opblock-summary-path")
        docs_operations = page.locator(".opblock-summary-path").all_text_contents()
        browser.close()
    assert shown == f"{100 * expected['probability']:.1f}%"
    assert decision == expected["label"]
    assert heatmap_loaded and visible_before and hidden_after and opacity == "0.2"
    assert elsewhere == [] and (tmp_path / "service.png").stat().st_size > 10_000
    summary = httpx.get(f"{server}/v1/monitor/summary", headers={"X-API-Key": KEY}).json()
    assert summary["volume"]["confirmed_total"] == 1 and summary["volume"]["in_period"] == 2  # API call + page
    assert "monitor" in monitoring_title.lower()
    assert {"/v1/predictions", "/v1/model", "/v1/predictions/{prediction_id}/feedback"} <= set(docs_operations)
