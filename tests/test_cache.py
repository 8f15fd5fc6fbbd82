import numpy as np
import pandas as pd

from lungdx.config import PreprocessConfig
from lungdx.data.cache import build_cache, cache_key
from lungdx.io import read_image
from lungdx.preprocess import level


def _paths(phantom_dir):
    labels = pd.read_csv(phantom_dir / "labels.csv")
    return [str(phantom_dir / image) for image in labels["image"][:6]]


def test_cache_holds_the_levelled_images_and_is_reused(phantom_dir, tmp_path):
    paths, config = _paths(phantom_dir), PreprocessConfig(size=64)
    cache = build_cache(paths, config, tmp_path)
    assert cache.valid.all() and cache.images.shape == (6, 64, 64)
    expected = level(read_image(paths[2]).pixels, config)
    np.testing.assert_allclose(cache.batch([2])[0], expected, atol=1e-3)  # float16 storage
    again = build_cache(paths, config, tmp_path)
    assert again.folder == cache.folder
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 1


def test_key_changes_with_settings_and_files(phantom_dir, tmp_path):
    paths = _paths(phantom_dir)
    base = cache_key(paths, PreprocessConfig(size=64))
    assert cache_key(paths, PreprocessConfig(size=64, equalization="clahe")) != base
    assert cache_key(paths[:5], PreprocessConfig(size=64)) != base
    # Normalisation is applied per batch, not cached: it must not invalidate the cache.
    assert cache_key(paths, PreprocessConfig(size=64, normalization="fixed")) == base
    copy = tmp_path / "copy.png"
    copy.write_bytes(open(paths[0], "rb").read())
    before = cache_key([str(copy)], PreprocessConfig(size=64))
    copy.write_bytes(open(paths[1], "rb").read())
    assert cache_key([str(copy)], PreprocessConfig(size=64)) != before


def test_unreadable_file_is_marked_with_its_reason(phantom_dir, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    cache = build_cache(_paths(phantom_dir)[:2] + [str(broken)], PreprocessConfig(size=32), tmp_path / "cache")
    assert cache.valid.tolist() == [True, True, False]
    assert "broken.png" in cache.errors[str(broken)]


def test_an_image_that_reads_but_cannot_be_levelled_is_named_in_its_reason(phantom_dir, tmp_path):
    from PIL import Image

    sliver = tmp_path / "sliver.png"  # one row of 900 pixels: read, then refused by the levelling
    Image.fromarray(np.linspace(0, 255, 900).astype(np.uint8)[None, :]).save(sliver)
    cache = build_cache(_paths(phantom_dir)[:1] + [str(sliver)], PreprocessConfig(size=32), tmp_path / "cache")
    assert cache.valid.tolist() == [True, False]
    assert str(sliver) in cache.errors[str(sliver)], cache.errors


def test_view_reads_the_same_rows_lazily(phantom_dir, tmp_path):
    cache = build_cache(_paths(phantom_dir), PreprocessConfig(size=32), tmp_path)
    view = cache.view([4, 1, 3])
    assert len(view) == 3
    np.testing.assert_array_equal(view[1:3], cache.batch([1, 3]))
