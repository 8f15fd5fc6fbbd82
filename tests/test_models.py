import copy
import functools

import pytest
import torch

from lungdx.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from lungdx.models import create_model, list_models, load_weights, register_model
from lungdx.models.weights import head_prefixes, is_head, split_parameters
from lungdx.runtime import Hardware

SIZE = 64
BACKBONES = ["densenet121", "efficientnet_b0", "efficientnet_lite0", "resnet18", "resnet50", "vgg16_bn"]


@functools.cache
def _built(name, in_channels=1):
    torch.manual_seed(0)
    return create_model(name, input_size=SIZE, in_channels=in_channels)


def _build(name, in_channels=1):
    # VGG-16 and DenseNet-121 take seconds to initialise: build once, hand out copies.
    return copy.deepcopy(_built(name, in_channels))


@pytest.mark.parametrize("name", list_models())
def test_output_shape_finite_and_gradients_reach_input(name):
    model = _build(name).train()
    images = torch.randn(3, 1, SIZE, SIZE, requires_grad=True)
    logits = model(images)
    assert logits.shape == (3, 1) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


@pytest.mark.parametrize("name", list_models())
def test_gradcam_layer_is_declared_and_exists(name):
    model = _build(name)
    assert model.gradcam_layer in dict(model.named_modules())


def test_the_issue_backbones_are_registered():
    assert set(BACKBONES) < set(list_models())


@pytest.mark.parametrize("name", list_models())
def test_head_is_declared_and_ends_in_one_logit(name):
    model = _build(name)
    backbone, head = split_parameters(model)
    assert backbone and head and len(backbone) + len(head) == len(list(model.parameters()))
    linears = [m for n, m in model.named_modules() if is_head(n, head_prefixes(model)) and isinstance(m, torch.nn.Linear)]
    assert linears and linears[-1].out_features == 1  # paper_cnn's head holds both fully connected layers


@pytest.mark.parametrize("name", list_models())
def test_wrong_channel_count_raises_a_clear_error(name):
    with pytest.raises(ValueError, match=rf"{name} expects input of shape \(N, 1, "):
        _build(name)(torch.randn(2, 3, SIZE, SIZE))


# nodule_net has three one-channel stems (lungs, detector, judge) and no RGB weights to fold, nor has an
# ensemble of them: left out.
@pytest.mark.parametrize("name", [name for name in list_models() if name not in ("nodule_net", "nodule_ensemble")])
def test_rgb_weights_folded_into_the_gray_stem_keep_the_response_to_gray_images(name, tmp_path):
    """A gray image (R = G = B) through the RGB model gives the logit of the folded one-channel model."""
    rgb = _build(name, in_channels=3).eval()
    generator = torch.Generator().manual_seed(1)
    for module in rgb.modules():  # non-trivial statistics, so that evaluation mode matters
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
    torch.save(rgb.state_dict(), tmp_path / "rgb.pt")
    gray = _build(name).eval()
    loaded = load_weights(gray, tmp_path / "rgb.pt", keep_head=True)
    assert len(loaded.folded) == 1 and not loaded.fresh
    images = torch.rand(2, 1, SIZE, SIZE, generator=generator)
    with torch.no_grad():
        expected = rgb(images.expand(-1, 3, -1, -1))
        torch.testing.assert_close(gray(images), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list_models())
def test_channels_last_and_fp32_switches_give_the_same_logits(name):
    model = _build(name).eval()
    images = torch.randn(2, 1, SIZE, SIZE)
    plain = Hardware.resolve("cpu", "fp32", "off")
    fast = Hardware.resolve("cpu", "fp32", "auto")
    assert not plain.channels_last and plain.amp_dtype is None and fast.channels_last
    with torch.no_grad():
        expected = plain.prepare(model)(images)
        actual = fast.prepare(copy.deepcopy(model))(images.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_bf16_autocast_runs_the_backbones(name):
    """bf16 autocast (chosen on CPUs with native bf16 and on GPUs) gives finite logits near fp32's."""
    model = _build(name).eval()
    images = torch.randn(2, 1, SIZE, SIZE)
    hardware = Hardware(torch.device("cpu"), torch.bfloat16, True)
    with torch.no_grad():
        expected = model(images)
        with hardware.autocast():
            actual = hardware.prepare(model)(images.contiguous(memory_format=torch.channels_last))
    assert actual.dtype == torch.bfloat16
    torch.testing.assert_close(actual.float(), expected, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("name", list_models())
def test_checkpoint_round_trip_gives_identical_outputs(name, tmp_path):
    model = _build(name).eval()
    for module in model.modules():  # trained-looking statistics: a reload that dropped buffers would show
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
    images = torch.randn(2, 1, SIZE, SIZE)
    save_checkpoint(tmp_path / "m.pt", model, model_name=name, model_kwargs={"input_size": SIZE},
                    preprocess={"size": SIZE}, task="malignant_vs_rest", class_names=["no", "yes"], threshold=0.3)
    payload = load_checkpoint(tmp_path / "m.pt")
    reloaded = model_from_checkpoint(payload)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reloaded(images), rtol=0, atol=0)
    assert payload["threshold"] == 0.3 and payload["versions"]["torch"] == str(torch.__version__)


def test_paper_cnn_architecture():
    model = create_model("paper_cnn")  # the paper's defaults: 256 px, 32-64-128-256-256, FC 256
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128, 256, 256]
    assert all(c.kernel_size == (3, 3) and c.stride == (1, 1) for c in convs)
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in model.modules()) == 5
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(256 * 8 * 8, 256), (256, 1)]
    assert all(m.p == 0.5 for m in model.modules() if isinstance(m, torch.nn.Dropout))


def test_wrong_input_shape_raises_a_clear_error():
    with pytest.raises(ValueError, match=r"expects input of shape \(N, 1, 64, 64\)"):
        _build("paper_cnn")(torch.randn(2, 1, 32, 32))


def test_registry_rejects_duplicates_and_unknown_names():
    with pytest.raises(ValueError, match="already registered"):
        register_model(type("paper_cnn", (), {}))  # a callable named like a registered model
    with pytest.raises(ValueError, match="unknown model 'nope'.*paper_cnn"):
        create_model("nope")


def test_foreign_checkpoint_is_refused(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a lungdx checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "garbage.pt")


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_precision_on_a_gpu_takes_bf16_only_where_it_is_native(native, expected, monkeypatch):
    # torch counts emulated bf16 as supported by default: a T4 or V100 would run bf16 slowly, not fp16 with scaling.
    from lungdx.runtime import autocast_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    assert autocast_dtype(torch.device("cuda"), "auto") is expected
