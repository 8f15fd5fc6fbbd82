"""Temperature scaling of a finished run, fitted on its validation split and stored in ``model.pt``.

One scalar T divides the logits (Guo et al. 2017, "On calibration of modern neural networks"):
probabilities become better calibrated and the ranking, hence every AUC, is unchanged. The
operating threshold is chosen again on the calibrated validation probabilities by the run's own
method; the map is monotone, so it picks the same validation case and every decision stays as it was.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lungdx import metrics
from lungdx.checkpoint import load_checkpoint, write_checkpoint
from lungdx.predict import Predictor, sigmoid

logger = logging.getLogger(__name__)


def calibrate_run(run_dir: str | Path, *, device: str = "auto", progress: bool = False) -> dict:
    """Fit T on the run's validation split, write it into ``model.pt``; returns T and the validation ECE/Brier.

    Rerunning refits from the raw logits, so calibrating twice gives the same T.
    """
    from lungdx.evaluate import load_run_data

    run_dir = Path(run_dir)
    run_config, data = load_run_data(run_dir, progress=progress)
    checkpoint = load_checkpoint(run_dir / "model.pt")
    predictor = Predictor(checkpoint, device=device, precision="checkpoint")
    val = data.rows("val")
    y_val = val["target"].to_numpy()
    logits = predictor.logits(data.cache.view(val["cache_index"].to_numpy()))
    temperature = metrics.fit_temperature(y_val, logits)
    before, after = sigmoid(logits), sigmoid(logits / temperature)
    report = {"temperature": temperature,
              "val_ece_before": metrics.expected_calibration_error(y_val, before),
              "val_ece_after": metrics.expected_calibration_error(y_val, after),
              "val_brier_before": metrics.brier_score(y_val, before),
              "val_brier_after": metrics.brier_score(y_val, after)}
    # The threshold below is chosen at this precision: recorded for an older checkpoint that lacked it
    checkpoint.update(temperature=temperature, calibration=metrics.json_safe(report),
                      numeric_precision=predictor.hardware.precision)
    if checkpoint.get("threshold") is not None:
        threshold = metrics.choose_threshold(y_val, after, run_config.train.threshold_method,
                                             run_config.train.threshold_target)
        band = metrics.threshold_band(y_val, after, run_config.train.threshold_method, run_config.train.threshold_target,
                                      groups=val["patient_id"].to_numpy(), seed=run_config.eval.seed)
        checkpoint.update(threshold=threshold, threshold_band=metrics.json_safe(list(band)),
                          threshold_uncalibrated=metrics.choose_threshold(
                              y_val, before, run_config.train.threshold_method, run_config.train.threshold_target))
    write_checkpoint(run_dir / "model.pt", checkpoint)
    logger.info("%s: temperature %.3f (validation ECE %.3f -> %.3f)", run_dir, temperature,
                report["val_ece_before"], report["val_ece_after"])
    return report
