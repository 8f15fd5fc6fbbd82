import pytest
import torch

from lungdx.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from lungdx.models import create_model, list_models, register_model

SIZE = 64


def _build(name):
    torch.manual_seed(0)
    return create_model(name, input_size=SIZE)


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


@pytest.mark.parametrize("name", list_models())
def test_checkpoint_round_trip_gives_identical_outputs(name, tmp_path):
    model = _build(name).eval()
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
