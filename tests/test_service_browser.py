"""The radiologist's web page in a real browser (Debian's chromium driven by Playwright) against a real server."""

import json
import re
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


def find_chromium() -> str:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("the browser test needs Debian's chromium (apt-get install chromium); .ci/run installs it")
    return chromium


def monitor_volume(server: str) -> dict:
    import httpx

    return httpx.get(f"{server}/v1/monitor/summary", headers={"X-API-Key": KEY}).json()["volume"]


def test_upload_shows_the_probability_and_toggles_the_heatmap(server, phantom_dir, tmp_path):
    import httpx

    chromium = find_chromium()
    before = monitor_volume(server)  # other tests of this module predict too
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
    assert decision.startswith(expected["label"])  # "(near the threshold: uncertain)" may follow (lungdx.wording)
    assert heatmap_loaded and visible_before and hidden_after and opacity == "0.2"
    assert elsewhere == [] and (tmp_path / "service.png").stat().st_size > 10_000
    volume = monitor_volume(server)
    assert volume["confirmed_total"] == before["confirmed_total"] + 1
    assert volume["in_period"] == before["in_period"] + 2  # API call + page
    assert "monitor" in monitoring_title.lower()
    assert {"/v1/predictions", "/v1/model", "/v1/predictions/{prediction_id}/feedback"} <= set(docs_operations)


EMPTY_NOTICE = "Heatmap empty: the occlusion heatmap is all zero, and the Grad-CAM heatmap is all zero; no overlay to show."


def test_an_empty_heatmap_shows_its_notice_and_the_page_loads_without_console_errors(server, phantom_dir):
    """The notice where the overlay would be, gone again with the next result's map; no console error, favicon included.

    The service's first answer is changed as the service gives it when every map tried is empty
    (test_service checks that the service does); the second is the service's own.
    """
    import httpx

    from lungdx.service.app import HEATMAP_CAVEAT, HEATMAP_NOTES

    chromium = find_chromium()
    images = sorted((phantom_dir / "images").glob("*.png"))[4:6]
    errors, statuses, answers = [], {}, []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("response", lambda response: statuses.setdefault(urlparse(response.url).path, response.status))
        # The key as the page keeps it, so loading it asks no 401 (the top frame only: the monitor frame is sandboxed).
        page.add_init_script(f"if (window === window.top) sessionStorage.setItem('lungdx-api-key', {json.dumps(KEY)})")

        def first_map_empty(route):
            # Sent again from here: Chromium does not hand an intercepted upload's file to route.fetch.
            upload = images[len(answers)].read_bytes()
            body = httpx.post(route.request.url, files={"file": upload}, headers={"X-API-Key": KEY}, timeout=60).json()
            if not answers:  # the server's --heatmap-method occlusion, then its fallback, both empty
                body["heatmap"] = {"method": "gradcam", "png": None, "note": HEATMAP_NOTES["gradcam"] + HEATMAP_CAVEAT,
                                   "empty": True, "fallback_from": "occlusion", "notice": EMPTY_NOTICE}
            answers.append(body["heatmap"])
            route.fulfill(json=body)

        page.route(re.compile(r"/v1/predictions\?"), first_map_empty)
        page.goto(server + "/")
        page.wait_for_selector("#card-list dt")
        page.wait_for_load_state("networkidle")
        icon_status = page.evaluate("fetch(document.querySelector('link[rel=icon]').href).then(r => r.status)")
        page.set_input_files("#file", str(images[0]))
        page.wait_for_selector("#heatmap-notice:not([hidden])")
        notice, overlay_hidden = page.text_content("#heatmap-notice"), page.locator("#heatmap").is_hidden()
        note = page.text_content("#heatmap-note")
        notice_box, image_box = page.locator("#heatmap-notice").bounding_box(), page.locator("#radiograph").bounding_box()
        page.set_input_files("#file", str(images[1]))
        page.wait_for_selector("#heatmap-notice", state="hidden")
        page.wait_for_function("document.getElementById('heatmap').complete")
        overlay_after = page.locator("#heatmap").is_visible()
        browser.close()
    assert notice == EMPTY_NOTICE and overlay_hidden and note.startswith("Grad-CAM:")
    # over the radiograph, where the overlay would be
    assert image_box["x"] <= notice_box["x"] and notice_box["x"] + notice_box["width"] <= image_box["x"] + image_box["width"] + 1
    assert image_box["y"] <= notice_box["y"] and notice_box["y"] + notice_box["height"] <= image_box["y"] + image_box["height"] + 1
    assert answers[1]["notice"] is None and answers[1]["png"] and overlay_after
    assert icon_status == 200 and statuses.get("/static/favicon.svg", 200) == 200
    assert errors == []
