"""`lungdx tune` on a real PostgreSQL server: the multi-machine recipe of docs/tuning.md, end to end.

Two "machines" share one throw-away PostgreSQL cluster on loopback (tests/postgres.py), set up
as the recipe says: a login role whose password lives in a password file, not in the URL, and
a database it owns. Each machine has its own copy of the data, its own cache, search-space file
and ``--out``, and runs the same ``lungdx tune`` command line in its own process.
"""

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

optuna = pytest.importorskip("optuna", reason="lungdx tune needs the optional Optuna dependency")
pytest.importorskip("psycopg", reason="PostgreSQL tests need psycopg (pip install -e '.[postgres]')")

from postgres import postgres_cluster  # noqa: E402

from lungdx.config import load_config  # noqa: E402

COMPLETE = optuna.trial.TrialState.COMPLETE
SPACE = "train.lr: [1.0e-3, 1.0e-4]\ntrain.batch_size: [8, 16]\n"
GRID = sorted((lr, batch) for lr in (1e-3, 1e-4) for batch in (8, 16))
PASSWORD = "tune-secret"
OPTUNA_CLI = "import sys; from optuna.cli import main; sys.exit(main())"  # what the `optuna` script runs


@pytest.fixture(scope="module")
def tune_database(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """Step 1 of the recipe: role ``lungdx`` with a password, database ``lungdx_tune`` it owns; a password file."""
    with postgres_cluster(superuser="postgres", host_auth="scram-sha-256") as server:
        # What `createuser --pwprompt lungdx` does, without a terminal to type the password into.
        server.client("psql", "-c", f"CREATE ROLE lungdx LOGIN PASSWORD '{PASSWORD}'")
        server.client("createdb", "--owner", "lungdx", "lungdx_tune")
        passfile = tmp_path_factory.mktemp("pgpass") / "pgpass"
        passfile.write_text(f"127.0.0.1:{server.port}:lungdx_tune:lungdx:{PASSWORD}\n")
        passfile.chmod(0o600)  # libpq ignores a password file others can read
        yield server.url("lungdx_tune", user="lungdx"), passfile


def machine(root: Path, phantom_dir: Path) -> Path:
    """A worker's own folder: its copy of the images and of the search space; cache and ``out`` come later."""
    shutil.copytree(phantom_dir, root / "data")
    (root / "space.yaml").write_text(SPACE)
    return root


def lungdx_tune(root: Path, storage: str, *extra: str) -> list[str]:
    """The command every machine runs; only its own paths differ."""
    return [sys.executable, "-m", "lungdx", "-q", "tune", "--data", str(root / "data"), "--task", "malignant_vs_rest",
            "--space", str(root / "space.yaml"), "--storage", storage, "--out", str(root / "out"),
            "--set", f"data.cache_dir={root / 'cache'}", "--set", "preprocess.size=64", "--set", "train.epochs=1",
            "--set", "model.kwargs={widths: [8, 8, 16, 16, 16], hidden: 16}", *extra]


def run_together(commands: list[list[str]], env: dict[str, str]) -> list[str]:
    """Start the commands at once (as on separate machines); all must succeed."""
    workers = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
               for command in commands]
    outputs = [worker.communicate(timeout=600)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0] * len(workers), outputs
    return outputs


def trial_folders(root: Path) -> list[str]:
    return sorted(path.name for path in (root / "out" / "trials").iterdir())


def test_two_machines_share_one_study_and_resume_on_postgresql(tune_database, phantom_dir, tmp_path, monkeypatch):
    storage, passfile = tune_database
    monkeypatch.setenv("PGPASSFILE", str(passfile))  # this process reads the study too
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two "machines" share this one's cores
    a, b = machine(tmp_path / "a", phantom_dir), machine(tmp_path / "b", phantom_dir)

    # Both machines at once, each a batch job allowed one trial: the study holds two, one from each.
    run_together([lungdx_tune(a, storage, "--worker-trials", "1"), lungdx_tune(b, storage, "--worker-trials", "1")], env)
    records = [json.loads((root / "out" / "study.json").read_text()) for root in (a, b)]
    assert records[0] == records[1] == {"study_name": records[0]["study_name"], "storage": storage}  # one study
    name = records[0]["study_name"]
    study = optuna.load_study(study_name=name, storage=storage)
    assert [t.state for t in study.get_trials()] == [COMPLETE] * 2
    assert len(trial_folders(a)) == len(trial_folders(b)) == 1 and trial_folders(a) != trial_folders(b)
    # Progress, from any machine: Optuna's own CLI on the shared storage.
    progress = subprocess.run([sys.executable, "-c", OPTUNA_CLI, "trials", "--storage", storage, "--study-name", name,
                               "-f", "json"], capture_output=True, text=True, env=env, timeout=120, check=True)
    assert [row["state"] for row in json.loads(progress.stdout)] == ["COMPLETE"] * 2
    kept = {path: path.stat().st_mtime_ns for root in (a, b) for path in (root / "out" / "trials").glob("*/model.pt")}

    # Resume: machine a reruns the same command without a cap and runs only the two missing grid points.
    [output] = run_together([lungdx_tune(a, storage)], env)
    trials = study.get_trials()
    assert [t.state for t in trials] == [COMPLETE] * 4 and "4 complete" in output
    assert sorted((t.params["train.lr"], t.params["train.batch_size"]) for t in trials) == GRID  # each point once
    assert {path: path.stat().st_mtime_ns for path in kept} == kept  # no trial ran again
    folders = {str(root / "out" / "trials" / folder) for root in (a, b) for folder in trial_folders(root)}
    assert len(folders) == len(trials) and {t.user_attrs["run_dir"] for t in trials} == folders  # disjoint, summing up
    assert len(trial_folders(a)) == 3 and len(trial_folders(b)) == 1

    # Machine a's outputs cover every machine's trials; best.yaml is the study's best, with a's data folder.
    table = pd.read_csv(a / "out" / "trials.csv")
    assert table["number"].tolist() == [0, 1, 2, 3] and table["worker"].nunique() == 3  # b, a's first run, a's rerun
    best = load_config(a / "out" / "best.yaml")
    assert (best.train.lr, best.train.batch_size) == (study.best_params["train.lr"], study.best_params["train.batch_size"])
    assert best.data.path == str(a / "data") and (b / "out" / "best.yaml").is_file()
