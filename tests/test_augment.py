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


def test_affine_grid_matches_torch_on_non_square_batches():
    from lungdx.data.augment import affine_grid

    generator = torch.Generator().manual_seed(3)
    theta = torch.randn(5, 2, 3, generator=generator) * 0.2 + torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    size = [5, 1, 48, 80]
    ours = affine_grid(theta, size)
    reference = torch.nn.functional.affine_grid(theta, size, align_corners=False)
    assert ours.shape == reference.shape == (5, 48, 80, 2)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    # the identity is the pixel centres themselves; a shift moves every point by the same amount
    identity = affine_grid(torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]]), [1, 1, 4, 2])
    torch.testing.assert_close(identity[0, :, 0, 0], torch.full((4,), -0.5))
    torch.testing.assert_close(identity[0, :, 1, 0], torch.full((4,), 0.5))
    torch.testing.assert_close(identity[0, :, 0, 1], torch.tensor([-0.75, -0.25, 0.25, 0.75]))
    shifted = affine_grid(torch.tensor([[[1.0, 0.0, 0.25], [0.0, 1.0, -0.5]]]), [1, 1, 4, 2])
    torch.testing.assert_close(shifted - identity, torch.tensor([0.25, -0.5]).expand(1, 4, 2, 2))
