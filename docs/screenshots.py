"""Make the README's screenshots of the web page and its monitoring tab from synthetic phantoms.

It serves a run with ``lungdx serve`` on loopback (a fresh SQLite log in a temporary folder),
posts the run's test-split phantoms through the API with their known labels as reader feedback
(so that the monitoring tab has rolling performance to show), then drives Debian's chromium with
Playwright: one phantom uploaded on the page, then the monitoring tab.

Usage (after ``lungdx demo --out runs/demo``)::

    python docs/screenshots.py runs/demo/run --data runs/demo/data --out docs/images
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("serve_load", ROOT / "bench" / "serve_load.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def post_with_feedback(url: str, cases: pd.DataFrame, data: Path, class_names: list[str]) -> int:
    import httpx

    done = 0
    with httpx.Client(timeout=60) as client:
        for case in cases.itertuples():
            answer = client.post(f"{url}/v1/predictions", files={"file": (data / case.image).read_bytes()})
            answer.raise_for_status()
            label = class_names[int(case.malignant == 1)]
            client.post(f"{url}/v1/predictions/{answer.json()['id']}/feedback", json={"label": label, "reader": "R1"}
                        ).raise_for_status()
            done += 1
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--data", type=Path, required=True, help="the phantom folder the run was trained on")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    from lungdx.checkpoint import load_checkpoint

    class_names = load_checkpoint(args.run / "model.pt")["class_names"]
    labels = pd.read_csv(args.data / "labels.csv")
    split = pd.read_csv(args.run / "split.csv")
    test = labels[labels["case_id"].isin(split.loc[split["split"] == "test", "case_id"])]
    test = test.assign(malignant=test["malignant"].fillna(0))
    bench = load_bench()
    with tempfile.TemporaryDirectory() as scratch:
        port = bench.free_port()
        server = bench.start_server(args.run, port, max_batch=8, extra=["--db", f"sqlite:///{scratch}/monitor.db"])
        url = f"http://127.0.0.1:{port}"
        try:
            print(f"posted {post_with_feedback(url, test, args.data, class_names)} test phantoms with feedback")
            shown = test[test["malignant"] == 1].iloc[0]
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1280, "height": 860})
                page.goto(url + "/")
                page.wait_for_selector("#card-list dt")
                page.set_input_files("#file", str(args.data / shown["image"]))
                page.wait_for_selector("#result:not([hidden])")
                page.fill("#opacity", "45")
                page.evaluate("window.scrollTo(0, 0)")
                page.screenshot(path=str(args.out / "service.png"))
                page.click("#tab-monitor")
                page.frame_locator("#monitor-frame").locator("h1").first.wait_for()
                page.screenshot(path=str(args.out / "monitoring.png"))
                browser.close()
        finally:
            bench.stop_server(server)
    print(f"written: {args.out / 'service.png'}, {args.out / 'monitoring.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
