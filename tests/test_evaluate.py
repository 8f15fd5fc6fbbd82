import json

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_config

from lungdx import metrics
from lungdx.config import EvalConfig
from lungdx.evaluate import evaluate_run
from lungdx.predict import Predictor
from lungdx.train import fit


@pytest.fixture(scope="module")
def evaluated(phantom_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval")
    result = fit(tiny_config(phantom_dir, folder / "cache"), folder / "run")
    results = evaluate_run(result.run_dir, EvalConfig(n_bootstrap=200))
    return result.run_dir, results


def test_outputs_written(evaluated):
    run, results = evaluated
    out = run / "evaluation"
    for name in ("table1.md", "table1.json", "predictions.csv", "roc.png"):
        assert (out / name).is_file(), name
    table = (out / "table1.md").read_text()
    assert "| Metric | Train | Validation | Test |" in table and "SYNTHETIC" in table
    assert json.loads((out / "table1.json").read_text())["splits"]["test"]["roc_auc"]["value"] == pytest.approx(
        results["splits"]["test"]["roc_auc"]["value"])


def test_metrics_match_predictions_at_the_frozen_threshold(evaluated):
    run, results = evaluated
    predictions = pd.read_csv(run / "evaluation" / "predictions.csv")
    threshold = Predictor.from_path(run).threshold
    assert results["threshold"] == threshold
    split = pd.read_csv(run / "split.csv")
    assert len(predictions) == len(split)
    for name in ("train", "val", "test"):
        rows = predictions[predictions["split"] == name]
        expected = metrics.binary_metrics(rows["target"], rows["probability"], threshold)
        got = results["splits"][name]
        for metric in ("accuracy", "sensitivity", "specificity", "roc_auc"):
            value = got[metric]["value"]
            assert value == pytest.approx(expected[metric], nan_ok=True)
        assert got["counts"]["n"] == len(rows)
        assert (rows["label"] == (rows["probability"] >= threshold)).all()


def test_subgroups_by_label_are_the_datasets_labels_not_the_decisions(evaluated, phantom_dir, tmp_path):
    run, _ = evaluated
    results = evaluate_run(run, EvalConfig(n_bootstrap=20), out_dir=tmp_path, by=("label",))
    test_cases = pd.read_csv(run / "split.csv").query("split == 'test'")["case_id"]
    labels = pd.read_csv(phantom_dir / "labels.csv").set_index("case_id").loc[test_cases, "label"].value_counts()
    strata = {row["stratum"]: row["counts"]["n"] for row in results["subgroups"]}
    assert strata == labels.to_dict() and len(strata) > 1


def test_an_evaluation_stopped_before_its_end_leaves_no_table1_json(evaluated, tmp_path, monkeypatch):
    """lungdx cv takes table1.json for a finished evaluation: it is written last, and an older one goes first."""
    from lungdx import plots
    from lungdx.evaluate import write_outputs

    run, results = evaluated
    frame = pd.read_csv(run / "evaluation" / "predictions.csv").rename(columns={"label": "decision"})
    (tmp_path / "table1.json").write_text("{}")

    def stopped(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(plots, "plot_roc", stopped)
    with pytest.raises(KeyboardInterrupt):
        write_outputs(results, frame, tmp_path)
    assert not (tmp_path / "table1.json").exists() and (tmp_path / "predictions.csv").is_file()


def test_the_training_curves_mark_the_epoch_the_run_kept(evaluated, tmp_path, monkeypatch):
    # With early stopping's min_delta the kept epoch need not have the least validation loss.
    from lungdx import plots

    run, _ = evaluated
    marked = {}
    monkeypatch.setattr(plots, "plot_training_curves", lambda history, path, title="", best_epoch=None:
                        marked.setdefault("best", best_epoch))
    evaluate_run(run, EvalConfig(n_bootstrap=20), out_dir=tmp_path)
    assert marked["best"] == json.loads((run / "summary.json").read_text())["best_epoch"]
    monkeypatch.undo()
    history = pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [0.7, 0.6, 0.5], "val_loss": [0.7, 0.6, 0.5999],
                            "train_auc": [0.5, 0.6, 0.7], "val_auc": [0.5, 0.6, 0.6]})
    drawn = {}
    monkeypatch.setattr(plots, "_save", lambda figure, path: drawn.setdefault("figure", figure))
    plots.plot_training_curves(history, tmp_path / "curves.png", best_epoch=2)
    assert "best epoch 2" in [text.get_text() for text in drawn["figure"].axes[0].get_legend().get_texts()]


def test_cis_bracket_the_estimate(evaluated):
    _, results = evaluated
    auc = results["splits"]["train"]["roc_auc"]
    assert auc["ci_low"] <= auc["value"] <= auc["ci_high"]


def test_predictor_matches_evaluation_probabilities(evaluated, phantom_dir):
    """The same Predictor from image files gives the probabilities the evaluation saved."""
    run, _ = evaluated
    predictions = pd.read_csv(run / "evaluation" / "predictions.csv").set_index("case_id")
    labels = pd.read_csv(phantom_dir / "labels.csv").set_index("case_id")
    cases = predictions.index[:4]
    files = [phantom_dir / labels.loc[case, "image"] for case in cases]
    predicted = Predictor.from_path(run).predict_files(files + [phantom_dir / "README.md"])
    # The cache stores float16 levelled images; files are levelled in float32: tiny differences only.
    np.testing.assert_allclose([p.probability for p in predicted[:4]], predictions.loc[cases, "probability"], atol=2e-3)
    assert predicted[-1].error is not None and "README.md" in predicted[-1].error


def test_predictor_refuses_dicom_that_is_not_a_chest_radiograph(evaluated, dicom_dir):
    from lungdx.io.acceptance import AcceptancePolicy

    run, _ = evaluated
    files = [dicom_dir / "nema_wg04_RG1_J2KI_cr_chest_pa.dcm", dicom_dir / "nema_wg04_RG3_J2KR_cr_tibia.dcm"]
    chest, tibia = Predictor.from_path(run).predict_files(files)
    assert chest.warnings == [] and chest.error is None
    assert tibia.probability is None and tibia.refusal == "body_part" and "EXTREMITY" in tibia.error
    # allow_non_chest overrides the header only: the tibia's pixels are still far from a chest radiograph's
    tibia = Predictor.from_path(run, policy=AcceptancePolicy(allow_non_chest=True)).predict_files(files[1:])[0]
    assert tibia.probability is None and tibia.refusal == "out_of_distribution" and "looks inverted" in tibia.error


def test_predict_pixels_matches_predict_files(evaluated, phantom_dir):
    from lungdx.io import read_image

    run, _ = evaluated
    predictor = Predictor.from_path(run)
    image = sorted((phantom_dir / "images").iterdir())[0]
    from_file = predictor.predict_files([image])[0]
    from_pixels = predictor.predict_pixels(read_image(image).pixels, source=str(image))
    assert from_pixels.probability == pytest.approx(from_file.probability, abs=1e-6)
    assert from_pixels.label == from_file.label and from_pixels.threshold == predictor.threshold
