"""A short real training run on JSRT at 128 px (skipped without ../shared/data/jsrt)."""

import numpy as np
import pandas as pd
import torch
from conftest import tiny_config

from lungdx.checkpoint import load_checkpoint, model_from_checkpoint
from lungdx.data.split import check_leakage
from lungdx.predict import Predictor
from lungdx.train import fit


def test_short_jsrt_training_gives_a_checkpoint_that_reloads_identically(jsrt_dir, tmp_path):
    config = tiny_config(jsrt_dir, tmp_path / "cache", "preprocess.size=128", "train.epochs=1",
                         "model.kwargs={widths: [8, 16, 16, 32, 32], hidden: 32}")
    result = fit(config, tmp_path / "run")
    split = pd.read_csv(result.run_dir / "split.csv", dtype={"patient_id": str})
    check_leakage(split)
    assert len(split) == 247 and split["target"].sum() == 100
    payload = load_checkpoint(result.run_dir / "model.pt")
    first, second = model_from_checkpoint(payload), model_from_checkpoint(load_checkpoint(result.run_dir / "model.pt"))
    images = torch.randn(4, 1, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(first(images), second(images), rtol=0, atol=0)
    predictions = Predictor.from_path(result.run_dir).predict_files([jsrt_dir / "images" / "JPCLN001.png"])
    assert predictions[0].error is None and 0 <= predictions[0].probability <= 1
    assert predictions[0].meta["format"] == "png" and np.isfinite(predictions[0].threshold)
