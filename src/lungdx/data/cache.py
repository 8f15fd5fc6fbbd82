"""Decode and level every image once into a memory-mapped array; epochs never decode again.

The cache folder is keyed by a hash of the files (path, size, modification time) and of the
levelling settings, so a changed file or setting gives a new cache. A file that cannot be read is
recorded with its reason and marked invalid; it never stops the build.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lungdx import distributed
from lungdx.config import PreprocessConfig
from lungdx.io import ImageReadError, read_image
from lungdx.io.acceptance import Refused, information_problem
from lungdx.preprocess import level

logger = logging.getLogger(__name__)

CACHE_VERSION = 3
"""Bumped when a reader's pixels change: 3 since DICOM pixel padding (0028,0120) is black and out of min-max."""
# Only the levelling stage is cached; normalisation runs per batch.
_LEVEL_FIELDS = ("size", "aspect", "window_percentiles", "equalization", "clahe_clip", "clahe_tiles", "denoise")


@dataclass
class ImageCache:
    """Levelled images in [0, 1], one row per input path.

    Attributes:
        images: (N, size, size) float16 array, memory-mapped from disk.
        valid: (N,) bool, False where the file could not be read.
        errors: path -> reason for every invalid row.
        folder: where the cache lives.
    """

    images: np.ndarray
    valid: np.ndarray
    errors: dict[str, str]
    folder: Path

    def batch(self, indices: Sequence[int]) -> np.ndarray:
        """(len(indices), size, size) float32 images."""
        order = np.asarray(indices)
        return np.asarray(self.images[order], dtype=np.float32)

    def view(self, indices: Sequence[int]) -> CacheView:
        """The images at ``indices``, read from disk only when sliced (for batch-by-batch inference)."""
        return CacheView(self, np.asarray(indices))


@dataclass
class CacheView:
    """A lazy sequence of cached images: ``view[a:b]`` reads just those rows as float32."""

    cache: ImageCache
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, rows: slice) -> np.ndarray:
        return self.cache.batch(self.indices[rows])


def default_cache_dir() -> Path:
    """``~/.cache/lungdx``, used when the config names no ``data.cache_dir``."""
    return Path.home() / ".cache" / "lungdx"


def cache_key(paths: Sequence[str], config: PreprocessConfig) -> str:
    """Hash of the file list (path, size, mtime) and the levelling settings."""
    digest = hashlib.blake2b(digest_size=16)
    settings = {name: getattr(config, name) for name in _LEVEL_FIELDS}
    digest.update(json.dumps({"version": CACHE_VERSION, **settings}, sort_keys=True, default=list).encode())
    for path in paths:
        try:
            stat = os.stat(path)
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}\0missing\n".encode())
    return digest.hexdigest()


def build_cache(paths: Sequence[str], config: PreprocessConfig, cache_dir: str | Path | None = None, *,
                workers: int | None = None, progress: Callable[[int], None] | None = None) -> ImageCache:
    """Load the cache for ``paths`` or build it (in parallel threads) when missing.

    Under torch.distributed, rank 0 builds it while the other ranks wait, then every rank opens it.

    Args:
        paths: image files, in the order of the manifest rows.
        config: preprocessing settings (only the levelling stage is cached).
        cache_dir: root folder of caches; None uses ``default_cache_dir()``.
        workers: decoding threads; None uses the CPU count.
        progress: called with the number of images finished since the last call.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / cache_key(paths, config)
    if not distributed.active():
        return _open_or_build(folder, paths, config, workers, progress)
    # Under torchrun the ranks must not decode N times into the same folder: rank 0 builds (with all
    # of its machine's cores) while the others wait; then each other machine's first process opens
    # that cache on a shared disk or builds its own; then every rank opens it.
    distributed.run_where(distributed.is_main(), _open_or_build, folder, paths, config, workers, progress)
    distributed.run_where(distributed.is_local_main() and not distributed.is_main(), _open_or_build, folder, paths,
                          config, workers, progress)
    return open_cache(folder)


def _open_or_build(folder: Path, paths: Sequence[str], config: PreprocessConfig, workers: int | None,
                   progress: Callable[[int], None] | None) -> ImageCache:
    root = folder.parent
    if (folder / "index.json").is_file():
        logger.info("using cached images in %s", folder)
        return open_cache(folder)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        _fill(staging, paths, config, workers or os.cpu_count() or 1, progress)
        try:
            staging.rename(folder)
        except OSError:  # another process finished the same cache first
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return open_cache(folder)


def _fill(folder: Path, paths: Sequence[str], config: PreprocessConfig, workers: int, progress) -> None:
    size = config.size
    images = np.lib.format.open_memmap(folder / "images.npy", mode="w+", dtype=np.float16, shape=(len(paths), size, size))
    valid = np.zeros(len(paths), dtype=bool)
    errors: dict[str, str] = {}

    def load(index: int) -> tuple[int, str | None]:
        try:
            pixels = read_image(paths[index]).pixels
            blank = information_problem(pixels)  # the acceptance policy's rule: listed in excluded.csv, never trained on
            if blank is not None:
                raise Refused(paths[index], "blank", blank)
            images[index] = level(pixels, config)
            return index, None
        except (ImageReadError, ValueError, OSError) as err:
            message = str(err)  # readers name the file; levelling (a 1 x 900 image, say) does not
            return index, message if str(paths[index]) in message else f"{paths[index]}: {message}"

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for index, error in pool.map(load, range(len(paths))):
            if error is None:
                valid[index] = True
            else:
                errors[paths[index]] = error
                logger.warning("left out: %s", error)
            if progress is not None:
                progress(1)
    images.flush()
    index_data = {"version": CACHE_VERSION, "paths": list(paths), "valid": valid.tolist(), "errors": errors,
                  "preprocess": {name: getattr(config, name) for name in _LEVEL_FIELDS}}
    (folder / "index.json").write_text(json.dumps(index_data, default=list))


def open_cache(folder: str | Path) -> ImageCache:
    """Open a finished cache folder read-only."""
    folder = Path(folder)
    index_data = json.loads((folder / "index.json").read_text())
    images = np.load(folder / "images.npy", mmap_mode="r")
    return ImageCache(images=images, valid=np.asarray(index_data["valid"], dtype=bool),
                      errors=dict(index_data["errors"]), folder=folder)
