from pathlib import Path

import pytest

from lungdx.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    load_config,
    save_config,
    to_dict,
)


def test_defaults_follow_the_paper():
    config = RunConfig()
    assert (config.train.lr, config.train.batch_size, config.train.epochs) == (1e-3, 64, 50)
    assert config.preprocess.size == 256
    assert config.model.name == "paper_cnn"
    assert config.augment.hflip is False


def test_overrides_parse_yaml_values():
    config = apply_overrides(RunConfig(), ["train.lr=3e-4", "data.split=[0.6, 0.2, 0.2]", "model.kwargs.hidden=64"])
    assert config.train.lr == pytest.approx(3e-4)
    assert config.data.split == (0.6, 0.2, 0.2)
    assert config.model.kwargs == {"hidden": 64}


@pytest.mark.parametrize("override", ["train.learning_rate=1", "nosection.x=1", "train.lr"])
def test_bad_overrides_name_the_key(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].split(".")[-1] if "=" in override else "form"):
        apply_overrides(RunConfig(), [override])


def test_yaml_round_trip(tmp_path):
    config = apply_overrides(RunConfig(), ["preprocess.size=128", "data.task=nodule_vs_normal"])
    save_config(config, tmp_path / "config.yaml")
    assert to_dict(load_config(tmp_path / "config.yaml")) == to_dict(config)


def test_yaml_file_only_overrides(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  epochs: 3\n")
    config = load_config(tmp_path / "c.yaml", ["train.seed=7"])
    assert (config.train.epochs, config.train.seed, config.train.lr) == (3, 7, 1e-3)


def test_unknown_yaml_key(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match="train.epoch"):
        load_config(tmp_path / "c.yaml")


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_shipped_configs_load():
    for path in sorted(CONFIGS.glob("*.yaml")):
        config = load_config(path)
        expected = "nodule_net" if path.name.startswith("nodule") else "paper_cnn"
        assert config.model.name == expected, path


def test_the_blackout_config_is_the_recipe_of_the_blackout_cvs():
    """configs/nodule-blackout.yaml must stay the black-out CVs' command in docs/results.md with the long-detector CV's
    100 detector epochs."""
    command = ["nodule.hard_negatives=0.5", "nodule.det_repeats=3", "nodule.hflip=true", "nodule.det_epochs=100",
               "nodule.det_patience=100", "nodule.det_schedule=cosine", "nodule.seg_black_out=0.5",
               "model.kwargs.verifier=cnn", "model.kwargs.tta=hflip", "nodule.det_black_out=0.5"]
    assert to_dict(load_config(CONFIGS / "nodule-blackout.yaml")) == to_dict(load_config(CONFIGS / "nodule.yaml", command))


def test_nodule_settings_out_of_range_are_refused_when_the_config_is_read():
    for override, named in (("nodule.det_schedule=linear", "nodule.det_schedule"), ("nodule.det_repeats=0", "nodule.det_repeats"),
                            ("nodule.seg_black_out=1.5", "nodule.seg_black_out"),
                            ("nodule.det_black_out=-0.1", "nodule.det_black_out"),
                            ("nodule.judge_keep=worst", "nodule.judge_keep"),
                            ("nodule.insert_contrast=0", "nodule.insert_contrast"),
                            ("nodule.insert_contrast=1.2", "nodule.insert_contrast"),
                            ("nodule.synthetic=1.5", "nodule.synthetic")):
        with pytest.raises(ConfigError, match=named):
            load_config(None, [override])
    assert load_config(None, ["nodule.det_schedule=cosine", "nodule.det_repeats=3"]).nodule.det_repeats == 3


def test_shortcut_flags_are_taken_as_given_and_a_set_value_that_is_not_yaml_is_text():
    from lungdx.cli import _run_config, build_parser

    args = build_parser().parse_args(["train", "--data", "/data/scan #2", "--task", "no", "--weights", "2024",
                                      "--set", "data.cache_dir=[2024] jsrt", "--out", "runs/x"])
    config = _run_config(args)
    assert (config.data.path, config.data.task, config.model.weights) == ("/data/scan #2", "no", "2024")
    assert config.data.cache_dir == "[2024] jsrt"


def test_a_second_command_in_one_process_logs_to_its_own_run_folder_only(tmp_path):
    import logging

    from lungdx.cli import _log_to_file

    lungdx_logger = logging.getLogger("lungdx")
    before = list(lungdx_logger.handlers)
    try:
        for name in ("first", "second"):
            _log_to_file(tmp_path / name / "train.log")
            lungdx_logger.warning("in the %s run", name)
        for handler in lungdx_logger.handlers:
            handler.flush()
        assert (tmp_path / "first" / "train.log").read_text().count("run") == 1
        assert "in the second run" in (tmp_path / "second" / "train.log").read_text()
    finally:
        for handler in [h for h in lungdx_logger.handlers if h not in before]:
            lungdx_logger.removeHandler(handler)
            handler.close()
