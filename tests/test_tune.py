import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from conftest import tiny_config

optuna = pytest.importorskip("optuna", reason="lungdx tune needs the optional Optuna dependency")

from lungdx import tune as tune_module  # noqa: E402
from lungdx.config import ConfigError, load_config  # noqa: E402
from lungdx.tune import Param, TuneSettings, load_space, paper_space, parse_param, tune, write_folds  # noqa: E402

TrialState = optuna.trial.TrialState
LRS = (1e-2, 1e-3, 1e-4)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tune-cache")


def lr_grid(*lrs, batch_sizes=(16,)) -> list[Param]:
    """A grid of learning rates x batch sizes x one dropout."""
    return [Param("train.lr", choices=tuple(lrs)), Param("train.batch_size", choices=tuple(batch_sizes)),
            Param("model.kwargs.dropout", choices=(0.5,))]


def load_study(out: Path) -> optuna.Study:
    record = json.loads((out / "study.json").read_text())
    return optuna.load_study(study_name=record["study_name"], storage=record["storage"])


def test_grid_3x1x1_runs_exactly_three_trials_and_writes_outputs(phantom_dir, cache_dir, tmp_path):
    config = tiny_config(phantom_dir, cache_dir, "train.epochs=1")
    result = tune(config, tmp_path, TuneSettings(), space=lr_grid(*LRS))
    trials = load_study(tmp_path).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert sorted(t.params["train.lr"] for t in trials) == sorted(LRS)
    assert result.counts["complete"] == 3 and result.best_value == min(t.value for t in trials)
    for trial in trials:
        run = tmp_path / "trials" / f"{trial.number:04d}"
        assert (run / "model.pt").is_file()
        history = pd.read_csv(run / "history.csv")
        assert trial.value == pytest.approx(history["val_loss"].min())  # val_loss at the kept (best) epoch
    table = pd.read_csv(tmp_path / "trials.csv")
    assert table["number"].tolist() == [0, 1, 2] and (table["epochs"] == 1).all()
    assert {"state", "train.lr", "val_loss", "seconds", "worker"} <= set(table.columns)
    assert "| number | state |" in (tmp_path / "trials.md").read_text()
    best = load_config(tmp_path / "best.yaml")  # a full config that `lungdx train --config` accepts
    assert best.train.lr == result.best_params["train.lr"] and best.model.kwargs["dropout"] == 0.5
    assert best.train.epochs == 1 and best.model.kwargs["widths"] == [8, 8, 16, 16, 16]
    assert (tmp_path / "history.png").is_file() and (tmp_path / "importances.png").is_file()
    # The same search again: the study is complete, nothing reruns.
    again = tune(config, tmp_path, TuneSettings(), space=lr_grid(*LRS))
    assert len(load_study(tmp_path).get_trials()) == 3 and again.best_number == result.best_number
    # A changed search is another study: it may not share this folder's trial numbers.
    with pytest.raises(ValueError, match="new --out"):
        tune(config, tmp_path, TuneSettings(), space=lr_grid(1e-3, 1e-4))


def test_interrupted_grid_resumes_without_rerunning(phantom_dir, cache_dir, tmp_path, monkeypatch):
    config = tiny_config(phantom_dir, cache_dir, "train.epochs=1")
    tune(config, tmp_path, TuneSettings(worker_trials=1), space=lr_grid(*LRS))  # stopped after one trial
    first = load_study(tmp_path).get_trials()
    assert [t.state for t in first] == [TrialState.COMPLETE]
    kept = (tmp_path / "trials" / "0000" / "model.pt").stat().st_mtime_ns
    real_fit, calls = tune_module.fit, []

    def interrupted_fit(run_config, run_dir, **kwargs):  # Ctrl-C during the first epoch
        def stop(row):
            raise KeyboardInterrupt
        calls.append(run_dir)
        return real_fit(run_config, run_dir, on_epoch=stop)

    monkeypatch.setattr(tune_module, "fit", interrupted_fit)
    with pytest.raises(KeyboardInterrupt):
        tune(config, tmp_path, TuneSettings(), space=lr_grid(*LRS))
    assert [t.state for t in load_study(tmp_path).get_trials()] == [TrialState.COMPLETE, TrialState.FAIL]

    def counting_fit(run_config, run_dir, **kwargs):
        calls.append(run_dir)
        return real_fit(run_config, run_dir, **kwargs)

    monkeypatch.setattr(tune_module, "fit", counting_fit)
    calls.clear()
    tune(config, tmp_path, TuneSettings(), space=lr_grid(*LRS))
    assert len(calls) == 2  # the interrupted point and the one never started; trial 0 is not rerun
    complete = load_study(tmp_path).get_trials(states=(TrialState.COMPLETE,))
    assert sorted(t.params["train.lr"] for t in complete) == sorted(LRS)
    assert (tmp_path / "trials" / "0000" / "model.pt").stat().st_mtime_ns == kept
    table = pd.read_csv(tmp_path / "trials.csv")
    assert table["note"].fillna("").str.startswith("retry of trial 1").sum() == 1


def test_pruned_trial_is_recorded_as_pruned(phantom_dir, cache_dir, tmp_path):
    config = tiny_config(phantom_dir, cache_dir)
    always = optuna.pruners.ThresholdPruner(upper=0.0)  # any validation loss is above 0: prune at epoch 1
    result = tune(config, tmp_path, TuneSettings(), space=lr_grid(1e-3, 1e-4), pruner=always)
    trials = load_study(tmp_path).get_trials()
    assert [t.state for t in trials] == [TrialState.PRUNED] * 2
    assert [len(t.intermediate_values) for t in trials] == [1, 1]
    table = pd.read_csv(tmp_path / "trials.csv")
    assert table["state"].tolist() == ["PRUNED", "PRUNED"] and table["epochs"].tolist() == [1, 1]
    assert table["note"].str.startswith("pruned").all()
    assert not (tmp_path / "trials" / "0000" / "model.pt").exists()
    assert result.best_number is None and not (tmp_path / "best.yaml").exists()  # no completed trial: no best.yaml
    assert result.counts["pruned"] == 2 and "importances_png" not in result.files


def test_two_workers_share_one_study_and_run_disjoint_trials(phantom_dir, cache_dir, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("train.lr: [1.0e-3, 1.0e-4]\ntrain.batch_size: [8, 16]\n")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "lungdx.cli", "-q", "tune", "--data", str(phantom_dir), "--task", "malignant_vs_rest",
               "--space", str(space), "--worker-trials", "2", "--out", str(out),
               "--set", f"data.cache_dir={cache_dir}", "--set", "preprocess.size=64", "--set", "train.epochs=1",
               "--set", "model.kwargs={widths: [8, 8, 16, 16, 16], hidden: 16}"]
    workers = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [worker.communicate(timeout=900)[0] for worker in workers]
    # The whole output of each worker, not pytest's shortened repr of the list: a traceback must be readable in CI.
    report = "\n".join(f"--- worker {index} (exit {worker.returncode}) ---\n{text}"
                       for index, (worker, text) in enumerate(zip(workers, outputs, strict=True)))
    assert [worker.returncode for worker in workers] == [0, 0], report
    trials = load_study(out).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4, outputs
    points = [(t.params["train.lr"], t.params["train.batch_size"]) for t in trials]
    assert sorted(points) == sorted((lr, batch) for lr in (1e-3, 1e-4) for batch in (8, 16))  # each point once
    assert sorted(Counter(t.user_attrs["worker"] for t in trials).values()) == [2, 2]
    assert sorted(path.name for path in (out / "trials").iterdir()) == ["0000", "0001", "0002", "0003"]


def test_bayes_resume_draws_new_points(phantom_dir, cache_dir, tmp_path):
    config = tiny_config(phantom_dir, cache_dir, "train.epochs=1")
    space = [parse_param("train.lr", {"low": 1e-4, "high": 1e-2, "log": True})]
    tune(config, tmp_path, TuneSettings(method="bayes", n_trials=1), space=space)
    result = tune(config, tmp_path, TuneSettings(method="bayes", n_trials=2), space=space)
    lrs = [t.params["train.lr"] for t in load_study(tmp_path).get_trials()]
    assert len(lrs) == 2 and len(set(lrs)) == 2  # a resumed sampler does not repeat the first run's draw
    assert all(1e-4 <= lr <= 1e-2 for lr in lrs) and result.counts["complete"] == 2


def test_cross_validated_objective_never_uses_test_rows(phantom_dir, cache_dir, tmp_path):
    config = tiny_config(phantom_dir, cache_dir, "train.epochs=1")
    folds = [pd.read_csv(path, dtype={"patient_id": str}) for path in write_folds(config, tmp_path / "folds", 3)]
    reference = tune_module.prepare_data(config).frame
    test_paths = set(reference.loc[reference["split"] == "test", "path"])
    development = set(reference.loc[reference["split"] != "test", "path"])
    for fold in folds:
        assert set(fold.loc[fold["split"] == "test", "path"]) == test_paths
        assert set(fold.loc[fold["split"] != "test", "path"]) == development
        assert fold.groupby("patient_id")["split"].nunique().max() == 1
    validation = [set(fold.loc[fold["split"] == "val", "path"]) for fold in folds]
    assert set.union(*validation) == development and sum(map(len, validation)) == len(development)
    settings = TuneSettings(cv_folds=2, objective="val_auc")
    result = tune(tiny_config(phantom_dir, cache_dir), tmp_path / "out", settings, space=lr_grid(1e-3))
    study = load_study(tmp_path / "out")
    fold_values = study.get_trials()[0].user_attrs["fold_values"]
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    assert len(fold_values) == 2 and result.best_value == pytest.approx(sum(fold_values) / 2)
    for fold in (0, 1):
        run = tmp_path / "out" / "trials" / "0000" / f"fold{fold}"
        split = pd.read_csv(run / "split.csv")
        assert set(split.loc[split["split"] == "test", "path"]) == test_paths
        history = pd.read_csv(run / "history.csv")  # AUC of the epoch fit keeps (lowest validation loss)
        assert fold_values[fold] == pytest.approx(history.loc[history["val_loss"].idxmin(), "val_auc"])
    assert "history_png" in result.files and "importances_png" not in result.files  # one trial: no importances


def test_search_space_yaml(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("train.lr: {low: 1e-5, high: 1e-2, log: true}\n"
                    "train.batch_size: {low: 16, high: 64, step: 16}\n"
                    "model.kwargs.dropout: {low: 0.3, high: 0.7, step: 0.2}\n"
                    "model.kwargs.widths: [[8, 8, 16, 16, 16], [16, 16, 32, 32, 32]]\n"
                    "train.weight_decay: [0, 1e-4]\n")
    lr, batch, dropout, widths, decay = load_space(path)
    assert (lr.low, lr.high, lr.log, lr.integer) == (1e-5, 1e-2, True, False)
    assert batch.integer and batch.grid_values() == [16, 32, 48, 64]
    assert dropout.grid_values() == [0.3, 0.5, 0.7] and decay.choices == (0, 1e-4)
    with pytest.raises(ConfigError, match="train.lr.*grid needs"):
        lr.grid_values()
    # A list-valued choice travels through Optuna as text and comes back as the list.
    encoded = widths.grid_values()[1]
    assert isinstance(encoded, str) and widths.decode(encoded) == [16, 16, 32, 32, 32]
    config = tune_module.apply_overrides(load_config(), [widths.override(widths.decode(encoded))])
    assert config.model.kwargs["widths"] == [16, 16, 32, 32, 32]
    with pytest.raises(ConfigError, match="train.learning_rate"):
        tune_module.check_space(load_config(), [Param("train.learning_rate", choices=(1e-3,))], "grid")
    with pytest.raises(ConfigError, match="low < high"):
        parse_param("train.lr", {"low": 1e-2, "high": 1e-3})


def test_default_space_is_the_papers_grid():
    space = paper_space(load_config())
    assert {param.key: param.choices for param in space} == {
        "train.lr": (1e-2, 1e-3, 1e-4), "train.batch_size": (32, 64, 128), "model.kwargs.dropout": (0.3, 0.5, 0.7)}
    assert tune_module._target(space, TuneSettings()) == 27
    assert tune_module._target(space, TuneSettings(method="random")) == tune_module.DEFAULT_TRIALS
    name = tune_module.study_name(load_config(), space, TuneSettings())
    moved = load_config(overrides=["data.path=/elsewhere/jsrt"])  # same search, data in another folder
    assert tune_module.study_name(moved, space, TuneSettings()) == name
    assert tune_module.study_name(load_config(), space, TuneSettings(objective="val_auc")) != name


def test_cli_tune_needs_data(tmp_path):
    from lungdx.cli import main

    with pytest.raises(SystemExit, match="no data given"):
        main(["tune", "--out", str(tmp_path / "x")])


def test_a_staged_models_trial_is_scored_and_reported_on_its_detector():
    """nodule_net's history holds every stage, each counting epochs from 1: the trial took the lung stage's row
    of the detector's kept epoch, and val_auc failed on the lung rows (they have none) and stopped the study."""
    from lungdx.train import FitResult

    history = ([{"stage": "lungs", "epoch": epoch, "val_loss": 0.2, "val_dice": 0.9} for epoch in (1, 2, 3)]
               + [{"stage": "detector", "epoch": epoch, "val_loss": loss, "val_auc": auc}
                  for epoch, loss, auc in ((1, 0.9, 0.6), (2, 0.7, 0.8), (3, 0.8, 0.7))]
               + [{"stage": "judge", "epoch": 2, "val_loss": 0.5, "val_auc": 0.55}])
    result = FitResult(Path("run"), best_epoch=2, threshold=0.5, history=history, stopped_early=False)
    assert tune_module.objective_value(result, "val_loss") == 0.7
    assert tune_module.objective_value(result, "val_auc") == 0.8

    class Trial:
        reported: list = []

        def report(self, value, step):
            self.reported.append((step, value))

        def should_prune(self):
            return False

    objective = tune_module._Objective(load_config(), [], Path("out"), TuneSettings(objective="val_auc"), [])
    on_epoch = objective._reporter(Trial(), 100)
    for row in history:
        on_epoch(row)
    assert Trial.reported == [(101, 0.6), (102, 0.8), (103, 0.7)]
