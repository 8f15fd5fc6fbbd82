"""One wording of a result, for every place a reader sees it: the CLI, the web page, the SR, the SC caption, FHIR.

:func:`state_result` turns a ``Prediction`` and its checkpoint into a :class:`ResultStatement`; the
doors only lay its sentences out. What it says:

- the probability, the operating threshold, and how the threshold was chosen (the method, on the
  validation split, frozen before any test case was scored);
- the decision at the threshold, in the checkpoint's class names;
- whether the probability is **near the threshold**: inside the threshold's 95% patient-level
  bootstrap interval on validation (``metrics.threshold_band``, stored in the checkpoint as
  ``threshold_band``). There, another draw of validation patients would have put the threshold on
  the probability's other side about as easily, so the decision is called uncertain. A checkpoint
  from before the band was stored says that it has none;
- the monitoring alerts active when the result was made, in plain words;
- the not-for-clinical-use statement (``report.NOT_FOR_CLINICAL_USE``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from lungdx.report import NOT_FOR_CLINICAL_USE

METHOD_WORDS = {"youden": "Youden's J", "sensitivity": "a sensitivity target", "specificity": "a specificity target"}


@dataclass(frozen=True)
class ResultStatement:
    """A result in words. ``headline`` is one line; ``sentences`` the full statement, in reading order."""

    probability: float
    threshold: float | None
    threshold_method: str | None
    decision: str | None
    near_threshold: bool
    band: tuple[float, float] | None
    headline: str
    threshold_text: str
    uncertainty_text: str
    alerts: tuple[str, ...] = field(default_factory=tuple)
    disclaimer: str = NOT_FOR_CLINICAL_USE

    @property
    def sentences(self) -> list[str]:
        """Headline, threshold, uncertainty, alerts and the disclaimer, each a sentence."""
        alerts = [f"Monitoring alert: {alert}" for alert in self.alerts]
        return [self.headline, self.threshold_text, self.uncertainty_text, *alerts, self.disclaimer]

    def as_dict(self) -> dict:
        """Plain data for JSON (the service's ``statement``)."""
        body = asdict(self)
        body["band"] = list(self.band) if self.band else None
        body["alerts"] = list(self.alerts)
        return body


def state_result(probability: float, checkpoint: dict, alerts: Sequence[str] = ()) -> ResultStatement:
    """The statement of a probability under a checkpoint's frozen threshold, band and class names.

    Args:
        probability: the Predictor's probability (after temperature scaling, as the threshold was).
        checkpoint: the loaded checkpoint (``threshold``, ``threshold_method``, ``threshold_band``, ``class_names``).
        alerts: plain-sentence monitoring alerts active now.
    """
    threshold, method = checkpoint.get("threshold"), checkpoint.get("threshold_method")
    names = list(checkpoint["class_names"])
    band = _band(checkpoint.get("threshold_band"))
    if threshold is None:
        return ResultStatement(probability, None, method, None, False, None,
                               headline=f"Probability {probability:.3f}: no operating threshold, no decision.",
                               threshold_text="The model has no operating threshold (it was trained without validation cases).",
                               uncertainty_text="", alerts=tuple(alerts))
    decision = names[int(probability >= threshold)]
    near = band is not None and band[0] <= probability <= band[1]
    headline = f"{decision.capitalize()}{' (near the threshold: uncertain)' if near else ''}: probability {probability:.3f}."
    how = METHOD_WORDS.get(method or "", method or "an unrecorded method")
    threshold_text = (f"Decision threshold {threshold:.3f}, chosen by {how} on the validation patients and frozen "
                      "before any test case was scored.")
    if band is None:
        uncertainty = "This model stores no uncertainty band for its threshold (trained before lungdx kept one)."
    elif near:
        uncertainty = (f"The probability lies inside the threshold's 95% bootstrap interval on validation "
                       f"({band[0]:.3f} to {band[1]:.3f}): the decision could as well have gone the other way.")
    else:
        uncertainty = (f"The probability lies outside the threshold's 95% bootstrap interval on validation "
                       f"({band[0]:.3f} to {band[1]:.3f}).")
    return ResultStatement(probability, float(threshold), method, decision, near, band, headline, threshold_text,
                           uncertainty, tuple(alerts))


def _band(value) -> tuple[float, float] | None:
    if not value or len(value) != 2 or any(v is None for v in value):
        return None
    return float(value[0]), float(value[1])
