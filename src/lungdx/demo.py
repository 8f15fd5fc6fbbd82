"""``lungdx demo``: the whole chain on built-in synthetic chest phantoms.

Makes phantoms (written as 16-bit PNGs with a JSRT-style ``labels.csv``), reads them back through
the same readers and dataset adapter as real data, splits by patient, trains the paper's CNN,
chooses the threshold on validation and writes Table 1 and the ROC figure. Sized to finish in a
few minutes on a 2-core CPU.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lungdx.config import RunConfig, apply_overrides, load_config
from lungdx.data.phantoms import write_phantom_dataset
from lungdx.evaluate import evaluate_run
from lungdx.train import fit

logger = logging.getLogger(__name__)

# 128 px and 15 epochs keep the demo within minutes on 2 cores; the paper's 256 px works too.
DEMO_OVERRIDES = ["preprocess.size=128", "train.epochs=15", "train.patience=5", "data.task=malignant_vs_rest",
                  "train.pos_weight=auto"]


@dataclass
class DemoResult:
    """Where the demo wrote its outputs."""

    data_dir: Path
    run_dir: Path
    table_markdown: Path
    roc_figure: Path
    results: dict


def demo_config(data_dir: Path, cache_dir: Path, overrides: list[str] | None = None) -> RunConfig:
    """The demo's configuration: defaults, ``DEMO_OVERRIDES``, then the caller's overrides."""
    config = apply_overrides(load_config(), DEMO_OVERRIDES)
    config = apply_overrides(config, [f"data.path={data_dir}", "data.format=jsrt", f"data.cache_dir={cache_dir}"])
    return apply_overrides(config, overrides or [])


def run_demo(out_dir: str | Path, *, n_images: int = 600, seed: int = 0, overrides: list[str] | None = None,
             overwrite: bool = False, progress: bool = False,
             phantom_progress: Callable[[int, int], None] | None = None) -> DemoResult:
    """Make phantoms under ``out_dir/data``, train into ``out_dir/run``, evaluate into ``out_dir/run/evaluation``.

    The phantoms are reused when ``out_dir/data`` already holds them, made with the same ``n_images`` and
    ``seed`` (``data/phantoms.json`` says), and made again otherwise; an existing run is replaced only with
    ``overwrite``.
    """
    out_dir = Path(out_dir)
    if (out_dir / "run").exists():
        if not overwrite:
            raise FileExistsError(f"{out_dir / 'run'}: an earlier demo run is there (use --force to replace it, "
                                  "or --out for a new folder)")
        shutil.rmtree(out_dir / "run")
    data_dir = out_dir / "data"
    made_with = {"n_images": n_images, "seed": seed, "size": 256}
    stamp = data_dir / "phantoms.json"
    if not (data_dir / "labels.csv").is_file() or not stamp.is_file() or json.loads(stamp.read_text()) != made_with:
        if data_dir.exists():  # other phantoms (or a demo from before the stamp): --images and --seed must hold
            logger.info("%s: making the phantoms again (%d images, seed %d)", data_dir, n_images, seed)
            shutil.rmtree(data_dir)
            shutil.rmtree(out_dir / "cache", ignore_errors=True)
        write_phantom_dataset(data_dir, n_images, size=256, seed=seed, progress=phantom_progress)
        stamp.write_text(json.dumps(made_with))
    config = demo_config(data_dir.resolve(), (out_dir / "cache").resolve(), overrides)
    run_dir = out_dir / "run"
    fit(config, run_dir, progress=progress)
    results = evaluate_run(run_dir, progress=progress)
    evaluation = run_dir / "evaluation"
    return DemoResult(data_dir, run_dir, evaluation / "table1.md", evaluation / "roc.png", results)
