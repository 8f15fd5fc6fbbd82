import json
import subprocess
import sys

import pandas as pd
import pytest

from lungdx.cli import main


def test_help_teaches(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for command in ("demo", "train", "evaluate", "predict"):
        assert command in text
    assert "examples:" in text


def test_output_cut_short_by_its_reader_ends_quietly():
    """`lungdx ... | head`: the reader closes the pipe before lungdx writes; no traceback, SIGPIPE's status."""
    process = subprocess.Popen([sys.executable, "-m", "lungdx", "models"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # before the interpreter has even imported lungdx
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141, stderr
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr


@pytest.mark.parametrize("command, hint", [("cv", "the same `lungdx cv` command"), ("train", "lungdx train --resume")])
def test_ctrl_c_says_how_that_command_goes_on(command, hint, monkeypatch, tmp_path, capsys):
    # `lungdx train --resume` on a CV's fold bypasses the fold claims: another worker may train it at the same time.
    from lungdx import cv, train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cv, "cross_validate", interrupted)
    monkeypatch.setattr(train, "fit", interrupted)
    extra = ["--folds", "3"] if command == "cv" else []
    assert main([command, "--data", str(tmp_path), "--out", str(tmp_path / "out"), *extra]) == 130
    said = capsys.readouterr().err
    assert hint in said and ("lungdx train" not in said or command == "train"), said


def test_the_patient_id_pattern_is_taken_as_given(monkeypatch, tmp_path):
    # A regular expression is not YAML: '[A-Z]+\\d+ #1' through --set would be refused or cut at ' #'.
    from lungdx import train

    seen = {}

    def record(config, *args, **kwargs):
        seen["config"] = config
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "fit", record)
    assert main(["train", "--data", str(tmp_path), "--patient-id-pattern", r"[A-Z]+\d+ #1", "--out", str(tmp_path / "o")]) == 130
    assert seen["config"].data.patient_id_pattern == r"[A-Z]+\d+ #1"
    assert seen["config"].data.path == str(tmp_path)  # the other shortcuts still land in their own keys
    assert seen["config"].model.name == "paper_cnn" and seen["config"].model.weights is None  # none given: defaults
    main(["train", "--data", str(tmp_path), "--task", "label=a #b", "--model", "resnet18", "--weights", "imagenet",
          "--out", str(tmp_path / "o")])
    assert (seen["config"].data.task, seen["config"].model.name, seen["config"].model.weights) == \
        ("label=a #b", "resnet18", "imagenet")
    assert seen["config"].data.patient_id_pattern is None


def test_models_lists_paper_cnn(capsys):
    assert main(["models"]) == 0
    assert "paper_cnn" in capsys.readouterr().out


def test_demo_then_predict(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--images", "48", "-q", "--set", "preprocess.size=64",
                 "--set", "train.epochs=1", "--set", "data.cache_dir=" + str(tmp_path / "cache"),
                 "--set", "model.kwargs={widths: [8, 8, 16, 16, 16], hidden: 16}"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "SYNTHETIC" in printed and str(out / "run" / "evaluation" / "table1.md") in printed
    assert (out / "run" / "evaluation" / "roc.png").is_file()
    image = sorted((out / "data" / "images").iterdir())[0]
    bad = tmp_path / "broken.png"
    bad.write_text("not an image")
    assert main(["predict", str(out / "run"), str(image), str(bad), "--json"]) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert 0 <= lines[0]["probability"] <= 1 and lines[0]["class_name"] in ("not malignant", "malignant")
    assert lines[1]["error"] and "broken.png" in lines[1]["error"]
    # A second demo into the same folder refuses to overwrite without --force.
    assert main(["demo", "--out", str(out), "--images", "48", "-q"]) == 2
    assert "--force" in capsys.readouterr().err
    # --force with other --images makes other phantoms (it trained on the first 48 again, unsaid)
    assert main(["demo", "--out", str(out), "--images", "40", "--force", "-q", "--set", "preprocess.size=64",
                 "--set", "train.epochs=1", "--set", "model.kwargs={widths: [8, 8, 16, 16, 16], hidden: 16}"]) == 0
    assert len(pd.read_csv(out / "data" / "labels.csv")) == 40


def test_report_of_a_mistyped_run_folder_leaves_no_folder(tmp_path, capsys):
    # It made RUN/report/ first, and a later `lungdx train --out RUN` refused the folder.
    assert main(["-q", "report", str(tmp_path / "typo-run")]) == 2
    assert "config.yaml" in capsys.readouterr().err and not (tmp_path / "typo-run").exists()


def test_train_without_data_explains(capsys, tmp_path):
    with pytest.raises(SystemExit, match="no data given"):
        main(["train", "--out", str(tmp_path / "x")])


def test_bad_override_is_a_clear_error(capsys, tmp_path):
    assert main(["train", "--data", ".", "--set", "train.learning_rate=1", "--out", str(tmp_path / "x")]) == 2
    assert "unknown key 'train.learning_rate'" in capsys.readouterr().err


def test_servers_cap_the_malloc_arenas_and_numpys_blas_threads(monkeypatch):
    """``serve`` and ``listen`` ask glibc for 2 arenas (runtime.tune_allocator); other commands leave the default.
    The servers and ``pacs-run`` run numpy's BLAS on one thread (runtime.limit_blas_threads)."""
    import lungdx.cli as cli
    import lungdx.runtime as runtime

    calls, blas = [], []
    monkeypatch.setattr(runtime, "tune_allocator", lambda max_arenas=None: calls.append(max_arenas) or True)
    monkeypatch.setattr(runtime, "limit_blas_threads", lambda threads=1: blas.append(threads) or True)
    cases = ((["models"], None, []), (["serve", "run"], cli.SERVER_ARENAS, [1]), (["listen", "run"], cli.SERVER_ARENAS, [1]),
             (["pacs-run", "--study", "1.2", "run"], None, [1]))
    for argv, expected, blas_threads in cases:
        parser = cli.build_parser()
        monkeypatch.setattr(cli, "build_parser", lambda parser=parser: _returning_zero(parser))
        blas.clear()
        assert cli.main(argv) == 0
        assert calls[-1] == expected and blas == blas_threads, argv


def _returning_zero(parser):
    real = parser.parse_args

    def parse_args(argv=None):
        args = real(argv)
        args.handler = lambda _args: 0
        return args

    parser.parse_args = parse_args
    return parser


def test_limit_blas_threads_leaves_numpys_blas_one_thread():
    import os
    import subprocess
    import sys

    code = ("from lungdx.runtime import limit_blas_threads; from threadpoolctl import threadpool_info; "
            "print(limit_blas_threads(1), sorted({p['num_threads'] for p in threadpool_info() if p['user_api'] == 'blas'}))")
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "2", "OMP_NUM_THREADS": "2"}  # two to start from, wherever the test runs
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert done.stdout.strip() == "True [1]", done.stderr


def test_tune_allocator_accepts_an_arena_cap():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "from lungdx.runtime import tune_allocator; print(tune_allocator(max_arenas=2))"],
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "True", done.stderr


def test_predict_and_serve_default_to_the_checkpoints_precision():
    from lungdx.cli import build_parser

    parser = build_parser()
    for argv in (["predict", "run", "image.png"], ["serve", "run"]):
        assert parser.parse_args(argv).precision == "checkpoint", argv
        assert parser.parse_args([*argv, "--precision", "auto"]).precision == "auto", argv


@pytest.mark.parametrize("given, used", [([], "checkpoint"), (["--precision", "auto"], "auto")])
def test_predict_hands_its_precision_to_the_predictor(given, used, monkeypatch):
    # The parser's default alone decides nothing: _cmd_predict must pass it on, or the Predictor's own default wins.
    from lungdx import predict

    seen = {}

    def record(run, **kwargs):
        seen.update(kwargs, run=run)
        raise KeyboardInterrupt

    monkeypatch.setattr(predict.Predictor, "from_path", record)
    assert main(["predict", "run", "image.png", *given]) == 130
    assert seen["run"] == "run" and seen["precision"] == used
