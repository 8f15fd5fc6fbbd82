"""Alerts in plain words: one sentence a clinician can read for each raised monitoring check."""

from __future__ import annotations

import re

FIELD_WORDS = {"manufacturer": "manufacturer", "manufacturer_model": "scanner model", "view_position": "view position",
               "photometric_interpretation": "photometric interpretation (grey-scale polarity)",
               "pixel_spacing": "pixel spacing", "image_size": "image size"}
PERFORMANCE_CONSEQUENCES = {
    "sensitivity": "the model may be missing more positive cases than it did in validation",
    "specificity": "the model may be flagging more negative cases than it did in validation",
    "auc": "the model may be separating positive from negative cases less well than in validation",
}
_VALUES = re.compile(r"\(([^()]*)\)\s*$")


def plain_message(check: str, value: float | None, limit: float | None, detail: str) -> str:
    """The sentence for a raised check (drift or performance), from its logged value, limit and detail."""
    if check.startswith("score_"):
        return ("The model's recent scores differ from those it gave its validation images (score drift), so its "
                "threshold may not behave as it did in validation.")
    if check.startswith("intensity_"):
        return ("Recent images differ in brightness or contrast from the validation images (input drift), so results "
                "may be less reliable than in validation.")
    if check in FIELD_WORDS:
        share = f"{value:.0%}" if value is not None else "some"
        found = _VALUES.search(detail or "")
        values = f" ({found.group(1)})" if found else ""
        return (f"Of recent images, {share} have a {FIELD_WORDS[check]} the model was not validated on{values}, so its "
                f"results on them are untested.")
    metric = check.removeprefix("performance_")
    if metric in PERFORMANCE_CONSEQUENCES:
        measured = f" ({value:.2f})" if value is not None else ""
        validated = f" ({limit:.2f})" if limit is not None else ""
        name = "AUC" if metric == "auc" else metric
        return (f"On cases readers confirmed, {name}{measured} is below its validation value{validated}, so "
                f"{PERFORMANCE_CONSEQUENCES[metric]}.")
    return f"The monitoring check {check} is raised: {detail}."
