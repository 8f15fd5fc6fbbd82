"""Patient-level cross-validation: fold plans, inner validation splits, resume, summary."""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
import pytest
import torch
import yaml
from conftest import tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from lungdx.claims import Claims
from lungdx.config import save_config
from lungdx.cv import CVPlan, cross_validate, fold_split, plan_folds, time_left


def _frame(patients_images, positive_every=3):
    rows = []
    for patient, n_images in enumerate(patients_images):
        for image in range(n_images):
            rows.append({"case_id": f"P{patient}-{image}", "patient_id": f"P{patient}", "path": f"/x/{patient}-{image}.png",
                         "target": int(patient % positive_every == 0)})
    return pd.DataFrame(rows)


@settings(max_examples=25, deadline=None)
@given(images=st.lists(st.integers(1, 4), min_size=30, max_size=60), folds=st.integers(2, 6), seed=st.integers(0, 99))
def test_a_patient_never_lands_in_two_folds(images, folds, seed):
    plan = plan_folds(_frame(images), CVPlan(folds=folds, repeats=2, seed=seed))
    for _, rows in plan.groupby("repeat"):
        assert (rows.groupby("patient_id")["fold"].nunique() == 1).all()
        assert set(rows["fold"]) == set(range(folds))
        assert len(rows) == sum(images)


def test_inner_validation_comes_from_the_training_folds_only():
    plan = plan_folds(_frame([2] * 40), CVPlan(folds=5, repeats=1, seed=0))
    for fold in range(5):
        split = fold_split(plan, fold, val_fraction=0.2, seed=fold)
        test_patients = set(plan.loc[plan["fold"] == fold, "patient_id"])
        assert set(split.loc[split["split"] == "test", "patient_id"]) == test_patients
        assert not test_patients & set(split.loc[split["split"] != "test", "patient_id"])
        assert (split.groupby("patient_id")["split"].nunique() == 1).all()
        assert {"train", "val", "test"} == set(split["split"])


def test_repeats_draw_different_folds_and_bad_plans_are_refused():
    plan = plan_folds(_frame([1] * 40), CVPlan(folds=4, repeats=2, seed=0))
    first = plan[plan["repeat"] == 0].set_index("case_id")["fold"]
    second = plan[plan["repeat"] == 1].set_index("case_id")["fold"]
    assert (first != second.loc[first.index]).any()
    with pytest.raises(ValueError, match="folds >= 2"):
        plan_folds(_frame([1] * 10), CVPlan(folds=1))
    with pytest.raises(ValueError, match="only 10 patients"):
        plan_folds(_frame([1] * 10), CVPlan(folds=20))


@pytest.fixture(scope="module")
def cv_run(phantom_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cv")
    config = tiny_config(phantom_dir, folder / "cache", "train.epochs=1", "eval.n_bootstrap=100")
    results = cross_validate(config, folder / "cv", CVPlan(folds=3, repeats=1, seed=0), by=("subtlety",))
    return config, folder / "cv", results


def test_cv_writes_per_fold_runs_and_a_summary(cv_run):
    _, out, results = cv_run
    for name in ("cv.md", "cv.json", "oof_predictions.csv", "roc_pooled.png", "folds.csv", "plan.yaml"):
        assert (out / name).is_file(), name
    assert len(results["per_fold"]) == 3
    for fold in range(3):
        assert (out / "runs" / f"r0-f{fold:02d}" / "evaluation" / "table1.json").is_file()
    text = (out / "cv.md").read_text()
    assert "mean +/- SD" in text and "Pooled out-of-fold" in text and "SYNTHETIC" in text
    summary = json.loads((out / "cv.json").read_text())
    assert summary["mean_sd"]["roc_auc"]["n_folds"] == 3
    assert "By subtlety" in text
    assert sum(row["counts"]["n"] for row in summary["subgroups"]) == summary["pooled"][0]["counts"]["n"]


def test_out_of_fold_predictions_cover_every_case_once(cv_run, phantom_dir):
    _, out, results = cv_run
    oof = pd.read_csv(out / "oof_predictions.csv", dtype={"case_id": str})
    folds = pd.read_csv(out / "folds.csv", dtype={"case_id": str})
    assert oof["case_id"].is_unique and set(oof["case_id"]) == set(folds["case_id"])
    # Each case was predicted by the fold model that held it out.
    merged = oof.merge(folds[["case_id", "fold"]], on="case_id", suffixes=("", "_planned"))
    assert (merged["fold"] == merged["fold_planned"]).all()
    assert results["pooled"][0]["counts"]["n"] == len(folds)


def test_cv_resumes_without_refitting_and_refuses_other_settings(cv_run):
    config, out, _ = cv_run
    model = out / "runs" / "r0-f01" / "model.pt"
    before = model.stat().st_mtime_ns
    (out / "runs" / "r0-f02" / "evaluation" / "table1.json").unlink()  # as if stopped before its evaluation
    cross_validate(config, out, CVPlan(folds=3, repeats=1, seed=0))
    assert model.stat().st_mtime_ns == before
    assert (out / "runs" / "r0-f02" / "evaluation" / "table1.json").is_file()
    with pytest.raises(FileExistsError, match="other settings"):
        cross_validate(config, out, CVPlan(folds=4, repeats=1, seed=0))
    # A plan written by an older lungdx lacks fields added since (at their defaults): still resumable.
    saved = yaml.safe_load((out / "plan.yaml").read_text())
    del saved["config"]["train"]["scheduler"]
    (out / "plan.yaml").write_text(yaml.safe_dump(saved))
    cross_validate(config, out, CVPlan(folds=3, repeats=1, seed=0))
    assert model.stat().st_mtime_ns == before


def test_a_fold_is_trained_once_model_pt_is_written_last(tmp_path):
    """_fold_step reads the files a run leaves: model.pt (written last) means trained. A nodule_net run's model.pt
    beside last.pt without summary.json (written by lungdx before 2026-12-06, stopped in between) is resumed from
    last.pt; a paper CNN's, whose best.pt was gone by then, is kept."""
    from lungdx.config import load_config
    from lungdx.cv import _fold_step

    run = tmp_path / "r0-f00"
    run.mkdir()
    save_config(load_config(None, ["model.name=nodule_net"]), run / "config.yaml")
    assert _fold_step(run, clean=False) == "new" and run.is_dir()
    (run / "last.pt").write_bytes(b"state")
    assert _fold_step(run) == "resume"
    (run / "model.pt").write_bytes(b"model")
    assert _fold_step(run, clean=False) == "resume" and (run / "model.pt").is_file()  # a worker's look: nothing moved
    assert _fold_step(run) == "resume" and not (run / "model.pt").exists()  # under the claim: made again from last.pt
    (run / "model.pt").write_bytes(b"model")
    save_config(load_config(None, ["model.name=paper_cnn"]), run / "config.yaml")
    assert _fold_step(run) == "evaluate" and (run / "model.pt").is_file()
    save_config(load_config(None, ["model.name=nodule_net"]), run / "config.yaml")
    (run / "summary.json").write_text("{}")
    assert _fold_step(run) == "evaluate" and (run / "model.pt").is_file() and (run / "last.pt").is_file()
    (run / "evaluation").mkdir()
    (run / "evaluation" / "table1.json").write_text("{}")
    assert _fold_step(run) == "done"
    shutil.rmtree(run / "evaluation")
    for name in ("model.pt", "last.pt"):
        (run / name).unlink()
    assert _fold_step(run) == "new" and not run.exists()


def _claim_records(folder):
    return {path.name: json.loads(path.read_text()) for path in sorted(folder.glob("*.*")) if not path.name.startswith(".")}


def test_two_workers_share_the_folds_and_write_the_summary_of_one_process(cv_run, tmp_path):
    config, single, _ = cv_run
    save_config(config, tmp_path / "config.yaml")
    out = tmp_path / "cv"
    command = [sys.executable, "-m", "lungdx", "--quiet", "cv", "--config", str(tmp_path / "config.yaml"),
               "--folds", "3", "--seed", "0", "--by", "subtlety", "--out", str(out)]
    workers = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [worker.communicate(timeout=300) for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs
    claims = _claim_records(out / "claims")
    worker_ids = {f"{socket.gethostname()}:{worker.pid}" for worker in workers}
    for fold in range(3):  # each fold claimed once, by one of the two, and trained once
        name = f"r0-f{fold:02d}"
        assert f"{name}.0" in claims and f"{name}.1" not in claims
        assert claims[f"{name}.0"]["state"] == "released" and claims[f"{name}.0"]["worker"] in worker_ids
        assert len(pd.read_csv(out / "runs" / name / "history.csv")) == config.train.epochs
    # Exactly one worker wrote (and printed) the summary; the other said where it would come from.
    assert sum("# 3-fold patient-level cross-validation" in stdout for stdout, _ in outputs) == 1
    # The same out-of-fold cases, each from the same fold, as the single-process CV of the same plan.
    shared = pd.read_csv(out / "oof_predictions.csv", dtype={"case_id": str}).sort_values("case_id", ignore_index=True)
    alone = pd.read_csv(single / "oof_predictions.csv", dtype={"case_id": str}).sort_values("case_id", ignore_index=True)
    assert shared["case_id"].tolist() == alone["case_id"].tolist() and shared["fold"].tolist() == alone["fold"].tolist()
    assert shared["probability"].to_numpy() == pytest.approx(alone["probability"].to_numpy(), abs=1e-5)
    summary, summary_alone = (json.loads((folder / "cv.json").read_text()) for folder in (out, single))
    pd.testing.assert_frame_equal(pd.DataFrame(summary["per_fold"]), pd.DataFrame(summary_alone["per_fold"]), atol=1e-5)
    assert summary["pooled"][0]["roc_auc"]["value"] == pytest.approx(summary_alone["pooled"][0]["roc_auc"]["value"])


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _plant_claim(folder, name, worker, heartbeat):
    folder.mkdir(parents=True, exist_ok=True)
    record = {"worker": worker, "pid_ns": os.readlink("/proc/self/ns/pid") if os.path.exists("/proc/self/ns/pid") else "",
              "state": "held", "heartbeat": heartbeat}
    (folder / f"{name}.0").write_text(json.dumps(record))


def test_cv_status_shows_each_folds_state_and_progress_without_a_metric(cv_run, tmp_path, capsys):
    from lungdx.cli import main
    from lungdx.cv import fold_states

    _, single, _ = cv_run
    out = tmp_path / "cv"
    shutil.copytree(single, out)
    shutil.rmtree(out / "claims")
    (out / "cv.md").unlink()
    (out / "runs" / "r0-f01" / "evaluation" / "table1.json").unlink()  # trained, its evaluation still to come
    stopped = out / "runs" / "r0-f02"
    for name in ("evaluation/table1.json", "model.pt", "summary.json"):
        (stopped / name).unlink()  # stopped after epoch 1, resumable from last.pt
    before = {path: path.stat().st_mtime_ns for path in out.rglob("*") if path.is_file()}
    states = fold_states(out)
    assert states[["fold", "state", "progress", "worker"]].values.tolist() == [
        ["r0-f00", "evaluated", "finished", ""], ["r0-f01", "trained", "finished", ""], ["r0-f02", "stopped", "epoch 1 of 1", ""]]
    # The paper CNN's epochs time everything, finished or not (a nodule_net run's last.pt and summary count seconds).
    finished = [pd.read_csv(out / "runs" / f"r0-f0{fold}" / "history.csv")["seconds"].sum() for fold in (0, 1)]
    so_far = pd.read_csv(stopped / "history.csv")["seconds"].sum()
    assert states["trained_s"].tolist() == pytest.approx([*finished, so_far])
    assert time_left(states)["seconds"] == pytest.approx(max(sum(finished) / 2 - so_far, 0.0))
    _plant_claim(out / "claims", "r0-f02", "elsewhere:1", time.time())  # a live worker has taken it up
    assert fold_states(out).loc[2, ["state", "worker"]].tolist() == ["training", "elsewhere:1"]
    assert main(["cv-status", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "3 folds: 1 evaluated, 1 trained, 1 training; no cv.md yet" in printed
    assert printed.splitlines()[1].split()[:4] == ["fold", "state", "progress", "trained"]
    assert "time left: about" in printed and "with 1 worker(s), at the 2 finished fold(s)' mean of" in printed
    assert "auc" not in printed.lower() and "loss" not in printed.lower()  # progress, never a figure
    assert {path: path.stat().st_mtime_ns for path in out.rglob("*") if path.is_file() and "claims" not in path.parts} \
        == before  # reads only: nothing moved, nothing rewritten
    with pytest.raises(SystemExit, match="not a CV folder"):
        main(["cv-status", str(tmp_path)])


def test_time_left_gives_each_live_worker_its_fold_and_the_rest_in_turn(tmp_path):
    from lungdx.cv import _trained_seconds

    def states(rows):
        return pd.DataFrame(rows, columns=["fold", "state", "progress", "worker", "trained_s"])

    minute = 60.0
    nothing_finished = states([["r0-f00", "training", "detector epoch 3 of 100", "a:1", 5 * minute]])
    assert time_left(nothing_finished) is None
    folds = states([["r0-f00", "evaluated", "finished", "", 100 * minute],
                    ["r0-f01", "evaluated", "finished", "", 120 * minute],
                    ["r0-f02", "training", "detector epoch 90 of 100", "a:1", 100 * minute],  # 10 min left
                    ["r0-f03", "training", "lungs epoch 3 of 30", "b:2", 20 * minute],  # 90 min left
                    ["r0-f04", "stopped", "judge epoch 2 of 60", "", 80 * minute],  # 30 min left
                    ["r0-f05", "not started", "", "", float("nan")],
                    ["r0-f06", "not started", "", "", float("nan")]])
    # Two live workers with 10 and 90 min to go; the stopped fold (30) goes to the first free, then 110 min each
    # to whichever is free first: [10, 90] -> [40, 90] -> [90, 150] -> [150, 200].
    estimate = time_left(folds)
    assert estimate == {"seconds": pytest.approx(200 * minute), "workers": 2, "fold_seconds": pytest.approx(110 * minute),
                        "finished": 2}
    alone = folds.assign(state=folds["state"].replace("training", "stopped"))  # nobody running: one worker's time
    assert time_left(alone)["seconds"] == pytest.approx((10 + 90 + 30 + 110 + 110) * minute)
    assert time_left(alone)["workers"] == 1
    # A staged (nodule_net) run's last.pt counts its seconds over every session; unreadable files give NaN.
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"format": "lungdx-localiser-state", "current": None, "seconds": 1234.5}, run / "last.pt")
    assert _trained_seconds(run, finished=False) == 1234.5
    (run / "last.pt").write_bytes(b"not a checkpoint")
    assert math.isnan(_trained_seconds(run, finished=False))
    (run / "summary.json").write_text(json.dumps({"train_seconds": 2500.0}))  # and its summary once finished
    assert _trained_seconds(run, finished=True) == 2500.0


def test_a_stale_claim_is_taken_over_and_a_live_one_left_alone(cv_run, tmp_path):
    config, single, _ = cv_run
    out = tmp_path / "cv"
    shutil.copytree(single, out)
    shutil.rmtree(out / "claims")  # as a CV from before claims; then two interrupted folds
    for fold in (1, 2):
        (out / "runs" / f"r0-f{fold:02d}" / "evaluation" / "table1.json").unlink()
    # Fold 1: a live worker on another machine (fresh heartbeat). Fold 2: a crashed one here (dead pid, old heartbeat).
    _plant_claim(out / "claims", "r0-f01", "elsewhere.example.org:4242", time.time())
    _plant_claim(out / "claims", "r0-f02", f"{socket.gethostname()}:{_dead_pid()}", time.time() - 3600)
    assert cross_validate(config, out, CVPlan(folds=3, repeats=1, seed=0)) is None  # fold 1 is in other hands
    assert (out / "runs" / "r0-f02" / "evaluation" / "table1.json").is_file()
    assert not (out / "runs" / "r0-f01" / "evaluation" / "table1.json").exists()
    claims = _claim_records(out / "claims")
    assert claims["r0-f02.1"]["worker"] == f"{socket.gethostname()}:{os.getpid()}"
    assert claims["r0-f02.1"]["state"] == "released" and "r0-f01.1" not in claims
    # Once that worker's heartbeat is older than the timeout, its fold is taken over and the summary written.
    results = cross_validate(config, out, CVPlan(folds=3, repeats=1, seed=0), stale_after_s=0.5)
    assert results is not None and len(results["per_fold"]) == 3
    assert (out / "runs" / "r0-f01" / "evaluation" / "table1.json").is_file()


def test_of_workers_racing_for_a_fold_exactly_one_claims_it(tmp_path):
    boards = [Claims(tmp_path / "claims") for _ in range(8)]
    start = threading.Barrier(len(boards))

    def race(board):
        start.wait()
        return board.acquire("r0-f00")

    with ThreadPoolExecutor(len(boards)) as pool:
        won = [claim is not None for claim in pool.map(race, boards)]
    assert sum(won) == 1
    winner = boards[won.index(True)]
    assert boards[0].holder("r0-f00") == winner.worker
    winner.release("r0-f00")
    assert boards[0].holder("r0-f00") is None and boards[1].acquire("r0-f00") is not None
    assert sorted(path.name for path in (tmp_path / "claims").iterdir()) == ["r0-f00.0", "r0-f00.1"]
    boards[1].release("r0-f00")
