import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lungdx.config import PreprocessConfig
from lungdx.preprocess import level, normalize, preprocess


def _image(height=300, width=200, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((height, width)).astype(np.float32)


@pytest.mark.parametrize("aspect", ["pad", "stretch", "crop"])
def test_level_output_shape_and_range(aspect):
    levelled = level(_image(), PreprocessConfig(size=64, aspect=aspect))
    assert levelled.shape == (64, 64) and levelled.dtype == np.float32
    assert levelled.min() >= 0 and levelled.max() <= 1


def test_pad_keeps_aspect_and_pads_with_zeros():
    image = np.ones((200, 100), dtype=np.float32)
    image[:, :50] = 0.5  # two intensity levels so the window does not collapse
    levelled = level(image, PreprocessConfig(size=64, aspect="pad", window_percentiles=(0, 100)))
    assert np.all(levelled[:, :16] == 0) and np.all(levelled[:, -16:] == 0)
    assert levelled[:, 16:48].max() == 1.0


def test_percentile_window_clips_outliers():
    image = np.full((100, 100), 0.5, dtype=np.float32)
    image[:50] = 0.4
    image[0, 0] = 1.0  # a single hot pixel must not set the top of the window
    levelled = level(image, PreprocessConfig(size=100, window_percentiles=(1, 99)))
    assert levelled[60, 60] == pytest.approx(1.0)
    assert levelled[10, 10] == pytest.approx(0.0)


@pytest.mark.parametrize("equalization", ["hist", "clahe"])
def test_equalization_spreads_a_narrow_histogram(equalization):
    rng = np.random.default_rng(1)
    image = (0.45 + 0.1 * rng.random((128, 128))).astype(np.float32)
    config = PreprocessConfig(size=128, window_percentiles=(0, 100), equalization=equalization)
    plain = level(image, PreprocessConfig(size=128, window_percentiles=(0, 100)))
    equalised = level(image, config)
    # Uniform noise already fills [0, 1] after the window; equalisation must keep it spread, in range.
    assert equalised.min() >= 0 and equalised.max() <= 1
    assert equalised.std() > 0.2 and not np.allclose(equalised, plain)


@pytest.mark.parametrize("method", ["median", "gaussian", "nlmeans"])
def test_denoise_reduces_noise(method):
    rng = np.random.default_rng(2)
    clean = np.tile(np.linspace(0.2, 0.8, 128, dtype=np.float32), (128, 1))
    noisy = np.clip(clean + rng.normal(0, 0.05, clean.shape), 0, 1).astype(np.float32)
    base = PreprocessConfig(size=128, window_percentiles=(0, 100))
    error_before = np.abs(level(noisy, base) - clean).mean()
    error_after = np.abs(level(noisy, PreprocessConfig(size=128, window_percentiles=(0, 100), denoise=method)) - clean).mean()
    assert error_after < error_before


def test_unknown_settings_raise():
    with pytest.raises(ValueError, match="aspect"):
        level(_image(), PreprocessConfig(aspect="squash"))
    with pytest.raises(ValueError, match="2-D"):
        level(np.zeros((3, 10, 10)), PreprocessConfig())


def test_normalize_numpy_and_torch_agree():
    levelled = np.stack([level(_image(seed=s), PreprocessConfig(size=32)) for s in range(3)])
    as_numpy = normalize(levelled, PreprocessConfig())
    as_torch = normalize(torch.from_numpy(levelled), PreprocessConfig()).numpy()
    np.testing.assert_allclose(as_numpy, as_torch, atol=1e-5)
    np.testing.assert_allclose(as_numpy.mean(axis=(1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(as_numpy.std(axis=(1, 2)), 1, atol=1e-3)


@settings(max_examples=25, deadline=None)
@given(height=st.integers(8, 120), width=st.integers(8, 120), seed=st.integers(0, 10_000))
def test_preprocess_shape_and_finite(height, width, seed):
    result = preprocess(_image(height, width, seed), PreprocessConfig(size=32))
    assert result.shape == (1, 32, 32) and result.dtype == np.float32 and np.isfinite(result).all()


def test_constant_image_does_not_divide_by_zero():
    result = preprocess(np.full((50, 50), 0.3, dtype=np.float32), PreprocessConfig(size=32))
    assert np.isfinite(result).all()
