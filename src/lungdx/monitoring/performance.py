"""Rolling performance on the cases a reader confirmed, beside the validation figures of the checkpoint."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lungdx import metrics
from lungdx.monitoring.settings import MonitorSettings

PERFORMANCE_METRICS = {"sensitivity": "sensitivity", "specificity": "specificity", "ppv": "precision", "auc": "roc_auc"}
"""Monitored name -> name in ``lungdx.metrics`` (PPV is the precision)."""
ALERTING_METRICS = ("sensitivity", "specificity", "auc")
"""PPV moves with the prevalence, so it is shown but never alerts."""


def rolling_performance(y_true: Sequence[int], probability: Sequence[float], label: Sequence[int],
                        val_metrics: dict | None, settings: MonitorSettings, *, seed: int = 0) -> dict:
    """Sensitivity, specificity, PPV and AUC with bootstrap CIs on confirmed cases, and their alerts.

    Each case is counted with the label the model gave it at its own threshold. Cases are resampled
    one by one: the log holds no patient identity, so a patient with several images counts several
    times (said in the report). A metric alerts when its whole CI lies below the validation value.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    n = len(y_true)
    base = {"n": n, "n_positive": int(y_true.sum()) if n else 0, "confidence": settings.confidence,
            "validation": {name: (val_metrics or {}).get(source) for name, source in PERFORMANCE_METRICS.items()}}
    if n < settings.min_feedback:
        return {**base, "status": "insufficient data", "metrics": {}, "alerts": [],
                "detail": f"{n} confirmed cases; {settings.min_feedback} needed"}
    computed = metrics.labelled_metrics_with_ci(y_true, np.asarray(probability, dtype=np.float64),
                                                np.asarray(label, dtype=np.int64), n_resamples=settings.n_bootstrap,
                                                confidence=settings.confidence, seed=seed)
    values = {name: computed[source] for name, source in PERFORMANCE_METRICS.items()}
    alerts = []
    for name in ALERTING_METRICS:
        reference, high = base["validation"][name], values[name]["ci_high"]
        if reference is not None and high is not None and np.isfinite(high) and high < reference:
            alerts.append({"name": f"performance_{name}", "value": values[name]["value"], "limit": reference,
                           "detail": f"{name} {values[name]['value']:.3f}, CI upper bound {high:.3f} below the "
                                     f"validation value {reference:.3f}"})
    return {**base, "status": "alert" if alerts else "ok", "metrics": values, "alerts": alerts,
            "counts": computed["counts"], "detail": f"{n} confirmed cases"}
