"""nodule_ensemble: nodule_nets averaged stage by stage, assembled from finished runs and CVs (``lungdx ensemble``)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from lungdx.config import load_config
from lungdx.models import create_model
from lungdx.models.nodule_net import map_peak

SIZE = 128


def _member(seed: int, **kwargs):
    """A randomly initialised nodule_net whose lung U-Net calls most of the image lung (so the map has candidates)."""
    torch.manual_seed(seed)
    net = create_model("nodule_net", input_size=SIZE, task="malignant_vs_rest", **kwargs)
    with torch.no_grad():
        net.lungs.head.bias.fill_(4.0)
        if net.verifies:
            net.verify_coef.copy_(torch.tensor([0.5 + seed, 1.5, -0.25 * seed]))
    return net.eval()


def _ensemble(nets, kwargs):
    ensemble = create_model("nodule_ensemble", members=kwargs, input_size=SIZE, task="malignant_vs_rest")
    ensemble.load_state_dict({f"members.{index}.{key}": value for index, net in enumerate(nets)
                              for key, value in net.state_dict().items()})
    return ensemble.eval()


@torch.no_grad()
def test_an_ensemble_of_copies_of_one_net_gives_that_nets_analysis():
    kwargs = {"verifier": "cnn", "tta": "hflip", "candidates": 4}
    net = _member(1, **kwargs)
    ensemble = _ensemble([net, net, net], [kwargs] * 3)
    images = torch.randn(3, 1, SIZE, SIZE)
    alone, together = net.analyse(images), ensemble.analyse(images)
    for field in ("lung_logits", "nodule_map", "peak", "presence", "malignancy", "lung_fraction"):
        torch.testing.assert_close(getattr(together, field).float(), getattr(alone, field).float(), atol=1e-5, rtol=1e-5)
    assert sum(len(found) for found in alone.candidates) > 0
    for mine, theirs in zip(together.candidates, alone.candidates, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ensemble(images), net(images), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_each_stage_is_the_members_mean_and_a_member_without_verifier_scores_candidates_by_the_map():
    kwargs = [{"verifier": "cnn", "candidates": 3}, {}]
    nets = [_member(1, **kwargs[0]), _member(2)]
    ensemble = _ensemble(nets, kwargs)
    images = torch.randn(2, 1, SIZE, SIZE)
    found = ensemble.analyse(images)
    lung_logits = (nets[0].segment(images) + nets[1].segment(images)) / 2
    torch.testing.assert_close(found.lung_logits, lung_logits, atol=1e-5, rtol=1e-5)
    masked, _ = nets[0].mask_image(images, lung_logits)
    nodule_map = (nets[0].detect(masked, lung_logits) + nets[1].detect(masked, lung_logits)) / 2
    torch.testing.assert_close(found.nodule_map, nodule_map, atol=1e-5, rtol=1e-5)
    judged = (nets[0].judge_at(masked, nodule_map, found.peak, masked.dtype) +
              nets[1].judge_at(masked, nodule_map, found.peak, masked.dtype)) / 2
    torch.testing.assert_close(found.malignancy, judged, atol=1e-5, rtol=1e-5)
    for image, candidates in enumerate(found.candidates):
        assert len(candidates) and (candidates[:-1, 2] >= candidates[1:, 2]).all()  # best first
        crops = nets[0].crops(masked[image : image + 1].expand(len(candidates), -1, -1, -1), candidates[:, :2],
                              torch.arange(len(candidates)))
        map_logits = torch.stack([nodule_map_at(nodule_map[image], point) for point in candidates[:, :2]])
        expected = (nets[0].candidate_score(map_logits, crops) + map_logits) / 2
        torch.testing.assert_close(candidates[:, 2], expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(found.presence, torch.stack([c[0, 2] for c in found.candidates]))
    assert not torch.allclose(found.presence, map_peak(nodule_map, SIZE)[0])  # the verifier changed the ranking's scores


def nodule_map_at(nodule_map: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
    """The 3x3-smoothed map logit (as candidates are read) at a point in input pixels."""
    from lungdx.models.nodule_net import smooth_map

    stride = SIZE / nodule_map.shape[-1]
    column, row = (int(round((float(v) + 0.5) / stride - 0.5)) for v in point)
    return smooth_map(nodule_map[None])[0, 0, row, column]


def test_members_must_share_the_crop_and_the_task_and_the_ensemble_is_not_trained(tmp_path):
    with pytest.raises(ValueError, match="crop_size"):
        create_model("nodule_ensemble", members=[{}, {"crop_size": 32}], input_size=SIZE)
    with pytest.raises(ValueError, match="task"):
        create_model("nodule_ensemble", members=[{"task": "nodule_vs_normal"}], input_size=SIZE, task="malignant_vs_rest")
    from lungdx.train import fit

    config = load_config(None, ["data.path=unused", "model.name=nodule_ensemble"])
    with pytest.raises(ValueError, match="assembled from finished runs"):
        fit(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def phantom_cv(tmp_path_factory):
    """A 2-fold nodule_net CV on phantoms (a few epochs: a member, not a good model)."""
    from lungdx.cv import CVPlan, cross_validate
    from lungdx.data.phantoms import write_phantom_dataset

    folder = tmp_path_factory.mktemp("ensemble-cv")
    write_phantom_dataset(folder / "data", 60, size=256, seed=5)
    config = load_config(None, [f"data.path={folder / 'data'}", "data.task=nodule_vs_normal",
                                f"data.cache_dir={folder / 'cache'}", "model.name=nodule_net", f"preprocess.size={SIZE}",
                                "train.precision=fp32", "nodule.seg_epochs=16", "nodule.det_epochs=2",
                                "nodule.judge_epochs=1", "nodule.crop=64", "eval.n_bootstrap=50"])
    cross_validate(config, folder / "cv", CVPlan(folds=2))
    # The members must find the lungs, or their maps are empty and every image's presence the same constant, and
    # the ensemble's tests would compare constants (so it was with 2 lung epochs; 8 found them in one fold of two).
    for fold in ("r0-f00", "r0-f01"):
        outputs = pd.read_csv(folder / "cv" / "runs" / fold / "nodule_outputs.csv")
        assert outputs["lung_ok"].all() and outputs["presence_logit"].nunique() > len(outputs) // 2, fold
    return folder / "cv"


def test_a_cv_ensemble_of_one_cv_with_itself_reproduces_its_out_of_fold_outputs(phantom_cv, tmp_path, capsys):
    from lungdx.cli import main

    twin = tmp_path / "twin"
    shutil.copytree(phantom_cv, twin)
    out = tmp_path / "ens"
    assert main(["ensemble", str(phantom_cv), str(twin), "--out", str(out), "-q"]) == 0
    assert "2-fold patient-level cross-validation: nodule_ensemble" in capsys.readouterr().out
    for name in ("r0-f00", "r0-f01"):
        mine = pd.read_csv(out / "runs" / name / "nodule_outputs.csv", dtype={"case_id": str}).set_index("case_id")
        theirs = pd.read_csv(phantom_cv / "runs" / name / "nodule_outputs.csv", dtype={"case_id": str}).set_index("case_id")
        assert list(mine.index) == list(theirs.index) and (mine["split"] == theirs["split"]).all()
        for column in ("presence_logit", "malignancy_logit", "task_logit", "peak_x", "peak_y", "shortcut_presence_logit"):
            np.testing.assert_allclose(mine[column], theirs[column], atol=1e-4, err_msg=f"{name} {column}")
        summary = json.loads((out / "runs" / name / "summary.json").read_text())
        assert summary["members"] == [str(phantom_cv / "runs" / name), str(twin / "runs" / name)]
    oof = pd.read_csv(out / "oof_predictions.csv", dtype={"case_id": str}).set_index("case_id")
    reference = pd.read_csv(phantom_cv / "oof_predictions.csv", dtype={"case_id": str}).set_index("case_id")
    np.testing.assert_allclose(oof.loc[reference.index, "probability"], reference["probability"], atol=1e-5)
    assert json.loads((out / "cv.json").read_text())["model"] == "nodule_ensemble"
    assert (out / "oof_nodule_outputs.csv").is_file()
    before = (out / "runs" / "r0-f00" / "model.pt").stat().st_mtime_ns
    assert main(["ensemble", str(phantom_cv), str(twin), "--out", str(out), "-q"]) == 0  # a rerun keeps finished folds
    assert (out / "runs" / "r0-f00" / "model.pt").stat().st_mtime_ns == before


def test_an_assembled_run_holds_each_members_weights_and_is_served_by_the_predictor_with_its_location(phantom_cv,
                                                                                                      tmp_path):
    from lungdx.checkpoint import load_checkpoint, write_checkpoint
    from lungdx.ensemble import assemble_run
    from lungdx.predict import Predictor

    fold, other = phantom_cv / "runs" / "r0-f00", tmp_path / "other"
    shutil.copytree(fold, other)  # a second member on the same rows whose map differs (a copy with a raised head)
    payload = load_checkpoint(other / "model.pt")
    payload["state_dict"]["detector.head.bias"] = payload["state_dict"]["detector.head.bias"] + 1.0
    write_checkpoint(other / "model.pt", payload)
    run = assemble_run([fold, other], tmp_path / "ens", member_kwargs={"tta": "hflip"})
    checkpoint = load_checkpoint(run / "model.pt")
    assert checkpoint["model"]["name"] == "nodule_ensemble"
    for index, member in enumerate((fold, other)):
        for key, value in load_checkpoint(member / "model.pt")["state_dict"].items():
            torch.testing.assert_close(checkpoint["state_dict"][f"members.{index}.{key}"], value, rtol=0, atol=0)
    assert [member["tta"] for member in checkpoint["model"]["kwargs"]["members"]] == ["hflip", "hflip"]
    split = pd.read_csv(run / "split.csv")
    path = split.loc[split["split"] == "test", "path"].iloc[0]
    prediction = Predictor.from_path(run, precision="fp32").predict_files([path])[0]
    assert prediction.error is None and prediction.location is not None
    case_id = split.set_index("path").loc[path, "case_id"]
    outputs = pd.read_csv(run / "nodule_outputs.csv", dtype={"case_id": str}).set_index("case_id")
    assert prediction.location["grid_x"] == pytest.approx(outputs.loc[case_id, "peak_x"], abs=0.01)
    assert (run / "evaluation" / "table1.json").is_file()


def test_members_from_different_folds_are_refused_by_name(phantom_cv, tmp_path):
    from lungdx.cli import main
    from lungdx.ensemble import assemble_run

    with pytest.raises(ValueError, match="r0-f01.*differs"):
        assemble_run([phantom_cv / "runs" / "r0-f00", phantom_cv / "runs" / "r0-f01"], tmp_path / "ens")
    assert not (tmp_path / "ens").exists()
    with pytest.raises(ValueError, match="at least two"):
        assemble_run([phantom_cv / "runs" / "r0-f00"], tmp_path / "ens")
    assert main(["ensemble", str(phantom_cv), str(phantom_cv / "runs" / "r0-f00"), "--out", str(tmp_path / "x")]) == 2


def test_an_out_folder_holding_something_else_is_refused_and_kept(phantom_cv, tmp_path):
    from lungdx.ensemble import assemble_cv, assemble_run

    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("not an ensemble")
    fold = phantom_cv / "runs" / "r0-f00"
    with pytest.raises(FileExistsError, match="not an ensemble run"):
        assemble_run([fold, fold], keep)
    with pytest.raises(FileExistsError, match="something else"):
        assemble_cv([phantom_cv, phantom_cv], keep)
    assert [path.name for path in keep.iterdir()] == ["notes.txt"]


def test_a_fold_another_worker_holds_is_left_to_it_and_the_last_worker_writes_the_summary(phantom_cv, tmp_path,
                                                                                            monkeypatch):
    from lungdx.claims import Claims
    from lungdx.ensemble import assemble_cv

    out = tmp_path / "ens"
    acquire, other = Claims.acquire, Claims(out / "claims")  # another live worker (this process) takes fold 1 first
    taken = []

    def first_fold_one_to_the_other(self, name):
        if name == "r0-f01" and not taken:
            taken.append(acquire(other, name))
        return acquire(self, name)

    monkeypatch.setattr(Claims, "acquire", first_fold_one_to_the_other)
    assert assemble_cv([phantom_cv, phantom_cv], out) is None
    assert (out / "runs" / "r0-f00" / "evaluation" / "table1.json").is_file()
    assert not (out / "runs" / "r0-f01").exists() and not (out / "cv.json").exists()
    assert taken[0] is not None
    other.release("r0-f01")
    results = assemble_cv([phantom_cv, phantom_cv], out)  # the worker that finds every fold evaluated summarises
    assert results["model"] == "nodule_ensemble" and len(results["per_fold"]) == 2
    assert (out / "cv.json").is_file() and (out / "runs" / "r0-f01" / "evaluation" / "table1.json").is_file()


def test_the_cli_says_when_other_workers_still_hold_folds(phantom_cv, tmp_path, monkeypatch, capsys):
    from lungdx import ensemble
    from lungdx.cli import main

    monkeypatch.setattr(ensemble, "assemble_cv", lambda *args, **kwargs: None)
    assert main(["ensemble", str(phantom_cv), str(phantom_cv), "--out", str(tmp_path / "ens"), "-q"]) == 0
    assert "other workers are still assembling folds" in capsys.readouterr().out
