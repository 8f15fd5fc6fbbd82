import torch

from lungdx.config import AugmentConfig
from lungdx.data.augment import augment


def _batch():
    images = torch.zeros(4, 1, 64, 64)
    images[:, :, 20:44, 40:60] = 0.8  # a bright block on the image's right, like the heart in a PA view
    return images + 0.1


def test_range_shape_and_seeded():
    config = AugmentConfig()
    first = augment(_batch(), config, torch.Generator().manual_seed(1))
    again = augment(_batch(), config, torch.Generator().manual_seed(1))
    other = augment(_batch(), config, torch.Generator().manual_seed(2))
    assert first.shape == (4, 1, 64, 64) and first.min() >= 0 and first.max() <= 1
    torch.testing.assert_close(first, again)
    assert not torch.allclose(first, other)
    assert not torch.allclose(first, _batch())


def test_disabled_is_identity():
    batch = _batch()
    assert augment(batch, AugmentConfig(enabled=False), torch.Generator()) is batch


def test_no_horizontal_flip_by_default_keeps_laterality():
    config = AugmentConfig(noise_std=0.0)
    for seed in range(20):
        augmented = augment(_batch(), config, torch.Generator().manual_seed(seed))
        right, left = augmented[..., 32:].mean(), augmented[..., :32].mean()
        assert right > left + 0.1


def test_hflip_when_asked_flips_some_images():
    config = AugmentConfig(hflip=True, rotation_deg=0, scale=0, translate=0, brightness=0, contrast=0, gamma=0,
                           noise_std=0)
    augmented = augment(_batch(), config, torch.Generator().manual_seed(0))
    flipped = [bool(image[..., :32].mean() > image[..., 32:].mean()) for image in augmented]
    assert any(flipped) and not all(flipped)
