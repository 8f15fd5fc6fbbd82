"""Report, model card, compare and calibrate on a tiny phantom run; the report opened in a real browser."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_config

from lungdx.calibrate import calibrate_run
from lungdx.cli import main
from lungdx.compare import DifferentTestSets, compare_runs
from lungdx.evaluate import FIGURES, evaluate_run
from lungdx.report import write_report
from lungdx.train import fit


@pytest.fixture(scope="module")
def runs(phantom_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    first = fit(tiny_config(phantom_dir, folder / "cache", "eval.n_bootstrap=100"), folder / "a").run_dir
    second = fit(tiny_config(phantom_dir, folder / "cache", "eval.n_bootstrap=100", "train.seed=1",
                             f"data.split_file={first / 'split.csv'}"), folder / "b").run_dir
    other = fit(tiny_config(phantom_dir, folder / "cache", "eval.n_bootstrap=100", "data.split_seed=5"),
                folder / "c").run_dir
    return first, second, other


@pytest.fixture(scope="module")
def report(runs):
    return write_report(runs[0], by=("sex", "size_mm:0,10,20,30,60"), gallery=False)


def test_report_files_and_every_figure_embedded(report, runs):
    page = report.html.read_text()
    for name in FIGURES:
        assert (runs[0] / "evaluation" / FIGURES[name]).is_file(), name
    assert page.count('src="data:image/png;base64,') == len(FIGURES)
    assert "http://" not in page and "https://" not in page  # nothing to fetch: opens offline
    assert "Not for clinical use" in page and "By sex" in page
    card = report.model_card.read_text()
    for heading in ("## Intended use", "## Data and splits", "## Performance", "## Calibration", "## Subgroups",
                    "## Limitations"):
        assert heading in card, heading
    assert "SYNTHETIC" in card
    payload = json.loads(report.json.read_text())
    assert payload["evaluation"]["splits"]["test"]["roc_auc"]["value"] is not None
    assert {row["column"] for row in payload["evaluation"]["subgroups"]} == {"sex", "size_mm"}


def test_report_gallery_embeds_the_review_cases(runs, tmp_path):
    files = write_report(runs[0], out_dir=tmp_path / "report", gallery=True)
    items = json.loads(files.json.read_text())["gallery"]
    assert items and {item["category"] for item in items} <= {"true_positive", "false_positive", "false_negative",
                                                              "true_negative"}
    page = files.html.read_text()
    assert "Review gallery (test split)" in page
    assert page.count('src="data:image/png;base64,') == len(FIGURES) + len(items)


def _browser():
    playwright = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (pip install playwright)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("the browser test needs Debian's chromium (apt-get install chromium); .ci/run installs it")
    return playwright, chromium


def test_report_opens_in_a_real_browser_without_network(report, tmp_path):
    playwright, chromium = _browser()
    requested = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        context = browser.new_context(offline=True)
        page = context.new_page()
        page.on("request", lambda request: requested.append(request.url))
        page.goto(report.html.as_uri())
        page.wait_for_load_state("load")
        loaded = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete && i.naturalWidth > 0)")
        title = page.title()
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert loaded and all(loaded) and len(loaded) == len(FIGURES)
    assert [url for url in requested if not url.startswith(("file:", "data:"))] == []
    assert "lungdx report" in title and (tmp_path / "report.png").stat().st_size > 10_000


def test_compare_pairs_cases_and_refuses_different_test_sets(runs):
    first, second, other = runs
    result = compare_runs(first, second, n_resamples=200)
    a = pd.read_csv(first / "evaluation" / "predictions.csv")
    assert result["n_cases"] == int((a["split"] == "test").sum())
    same = compare_runs(first, first, n_resamples=100)
    assert same["delong"]["difference"] == 0 and same["mcnemar"]["p_value"] == 1.0
    with pytest.raises(DifferentTestSets, match="test sets differ"):
        compare_runs(first, other)


def test_different_test_sets_name_dicom_instances_by_their_digest_only():
    from lungdx.compare import paired_test_cases
    from lungdx.io.deidentify import uid_digest

    def predictions(case_ids):
        return pd.DataFrame({"case_id": case_ids, "patient_id": "p", "target": 0, "probability": 0.5,
                             "label": 0}).set_index("case_id")

    uid = "1.2.826.0.1.3680043.8.498.12345"
    with pytest.raises(DifferentTestSets) as refused:
        paired_test_cases(predictions([uid, "JPCLN001"]), predictions(["JPCLN001"]))
    assert uid not in str(refused.value) and f"instance {uid_digest(uid)}" in str(refused.value)
    with pytest.raises(DifferentTestSets, match=r"e.g. JPCLN002\)"):
        paired_test_cases(predictions(["JPCLN001"]), predictions(["JPCLN001", "JPCLN002"]))


def test_with_several_images_per_patient_the_verdict_is_the_patient_level_bootstrap():
    import numpy as np

    from lungdx import metrics
    from lungdx.compare import comparison_markdown

    rng = np.random.default_rng(0)
    y_true = np.repeat(rng.integers(0, 2, 120), 4)  # 120 patients, 4 images each
    score_a = np.repeat(rng.normal(y_true[::4], 1.0), 4)
    score_b = np.repeat(rng.normal(y_true[::4] * 1.4, 1.0), 4)
    patients = np.repeat(np.arange(120), 4)
    labels = (score_a > 0.5).astype(int), (score_b > 0.5).astype(int)
    result = {"run_a": "a", "run_b": "b", "n_cases": 480, "n_positive": int(y_true.sum()), "n_patients": 120,
              "confidence": 0.95, "delong": metrics.delong_test(y_true, score_a, score_b),
              "paired_bootstrap": metrics.paired_bootstrap_auc_difference(y_true, score_a, score_b, groups=patients,
                                                                          n_resamples=300),
              "mcnemar": metrics.mcnemar_test(y_true, *labels), "accuracy_a": 0.5, "accuracy_b": 0.5}
    text = comparison_markdown(result)
    assert "(paired patient-level bootstrap)" in text and "480 images of 120 patients" in text
    bootstrap_says = result["paired_bootstrap"]["p_value"] < 0.05
    assert ("B's AUC differs" in text) == bootstrap_says
    assert "(DeLong)" in comparison_markdown({**result, "n_patients": 480})


def test_calibrate_keeps_auc_and_decisions(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs[1], run)
    before = evaluate_run(run, out_dir=tmp_path / "before")
    report = calibrate_run(run)
    after = evaluate_run(run, out_dir=tmp_path / "after")
    assert report["temperature"] > 0 and report["val_ece_after"] <= report["val_ece_before"] + 1e-9
    assert after["temperature"] == pytest.approx(report["temperature"])
    for split in ("train", "val", "test"):
        assert after["splits"][split]["roc_auc"]["value"] == pytest.approx(before["splits"][split]["roc_auc"]["value"])
    labels_before = pd.read_csv(tmp_path / "before" / "predictions.csv")["label"]
    labels_after = pd.read_csv(tmp_path / "after" / "predictions.csv")["label"]
    assert np.array_equal(labels_before, labels_after)
    assert calibrate_run(run)["temperature"] == pytest.approx(report["temperature"])  # refits from raw logits


def test_cli_evaluate_by_report_and_compare(runs, capsys, tmp_path):
    first, second, other = runs
    assert main(["-q", "evaluate", str(first), "--bootstrap", "50", "--by", "sex"]) == 0
    assert "By sex" in capsys.readouterr().out
    assert main(["-q", "compare", str(first), str(second), "--bootstrap", "100", "--out", str(tmp_path / "cmp")]) == 0
    assert "DeLong" in capsys.readouterr().out and (tmp_path / "cmp" / "comparison.json").is_file()
    assert main(["-q", "compare", str(first), str(other)]) == 2
    assert "test sets differ" in capsys.readouterr().err
    assert main(["-q", "evaluate", str(first), "--by", "no_such_column"]) == 2
    assert "no such column" in capsys.readouterr().err


def test_the_model_card_gives_a_staged_models_own_training_settings():
    # It gave nodule_net's train.epochs and train.patience, which its staged training ignores.
    from lungdx.config import load_config, to_dict
    from lungdx.report import _training_line

    config = to_dict(load_config(Path(__file__).parents[1] / "configs" / "nodule-blackout.yaml"))
    line = _training_line(config, {"epoch": 57}, {"best_epochs": {"lungs": 21, "detector": 57, "judge": 60}})
    assert "detector up to 100 (patience 100)" in line and "epochs kept: lungs 21, detector 57, judge 60" in line
    assert f"{config['train']['epochs']} epochs at most" not in line
    members = _training_line(config, {}, {"best_epochs": {"detector": "57/60"}, "members": ["runs/a", "runs/b"]})
    assert members.startswith("- Assembled from 2 finished runs")
    plain = _training_line(to_dict(load_config()), {"epoch": 7}, {"epochs_run": 12})
    assert "50 epochs at most" in plain and "best epoch 7 of 12" in plain
