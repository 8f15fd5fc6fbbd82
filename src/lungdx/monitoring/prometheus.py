"""Prometheus metrics of the monitor: a score histogram, and gauges computed at scrape time.

The histogram counts this process's predictions. The gauges (drift values and limits, alert state,
rolling performance and the validation figures) come from ``Monitor.status``, i.e. from the shared
database, at most ``cache_seconds`` old, so every worker reports the same values.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily

logger = logging.getLogger(__name__)

SCORE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 20)) + (1.0,)


@dataclass
class MonitorMetrics:
    """What ``register_metrics`` put on a registry, so that ``close`` can take it off again."""

    scores: Histogram
    collector: MonitorCollector

    def observe(self, version: str, probability: float) -> None:
        self.scores.labels(model_version=version).observe(probability)


class MonitorCollector:
    """Gauges computed from the monitor's last check when Prometheus scrapes."""

    def __init__(self, monitor):
        self.monitor = monitor

    def describe(self):
        # Declared without samples so registering does not run a check.
        return [family for family in self._families()]

    def _families(self):
        return {
            "up": GaugeMetricFamily("lungdx_monitor_up", "1 when the monitoring checks ran at this scrape, 0 when they failed"),
            "drift": GaugeMetricFamily("lungdx_monitor_drift_value", "drift measure of the current window (PSI, KS "
                                       "p-value or unseen share)", labels=["check", "kind"]),
            "limit": GaugeMetricFamily("lungdx_monitor_drift_limit", "alert limit of each drift check", labels=["check"]),
            "alert": GaugeMetricFamily("lungdx_monitor_alert", "1 while the check's alert is raised", labels=["check"]),
            "active": GaugeMetricFamily("lungdx_monitor_alerts_active", "number of raised alerts"),
            "performance": GaugeMetricFamily("lungdx_monitor_performance", "rolling performance on confirmed cases",
                                             labels=["metric", "bound"]),
            "validation": GaugeMetricFamily("lungdx_monitor_validation_performance",
                                            "the checkpoint's validation figures", labels=["metric"]),
            "confirmed": GaugeMetricFamily("lungdx_monitor_confirmed_cases", "confirmed cases in the performance window"),
            "log": GaugeMetricFamily("lungdx_monitor_log_records", "this process's prediction log queue: records pending "
                                     "(not yet committed), written, dropped (a row the database refused) and refused "
                                     "(the queue stayed full; the prediction failed), since start", labels=["state"]),
        }.values()

    def collect(self):
        families = dict(zip(("up", "drift", "limit", "alert", "active", "performance", "validation", "confirmed", "log"),
                            self._families(), strict=True))
        for state, count in self.monitor.log_state().items():  # memory only: reported even when the database fails
            if state != "batches":
                families["log"].add_metric([state], float(count))
        try:
            status = self.monitor.status()
        except Exception:  # a broken database must not break /metrics
            logger.exception("monitoring status failed at scrape time")
            families["up"].add_metric([], 0.0)
            yield families["up"]
            yield families["log"]
            return
        families["up"].add_metric([], 1.0)
        raised = {alert["check"] for alert in status["active_alerts"]}
        for check in status["drift"]:
            if check["value"] is not None:
                families["drift"].add_metric([check["name"], check["kind"]], float(check["value"]))
            families["limit"].add_metric([check["name"]], float(check["limit"]))
        performance = status["performance"]
        names = {c["name"] for c in status["drift"]} | raised | {f"performance_{m}" for m in performance["validation"]
                                                                 if m != "ppv"}
        for name in sorted(names):
            families["alert"].add_metric([name], 1.0 if name in raised else 0.0)
        families["active"].add_metric([], float(len(raised)))
        for metric, entry in performance["metrics"].items():
            for bound in ("value", "ci_low", "ci_high"):
                if entry.get(bound) is not None:
                    families["performance"].add_metric([metric, bound], float(entry[bound]))
        for metric, value in performance["validation"].items():
            if value is not None:
                families["validation"].add_metric([metric], float(value))
        families["confirmed"].add_metric([], float(performance["n"]))
        yield from families.values()


def register_metrics(monitor, registry: CollectorRegistry | None) -> tuple[CollectorRegistry, MonitorMetrics]:
    """Put the score histogram and the gauge collector on ``registry`` (a new one when None)."""
    registry = registry if registry is not None else CollectorRegistry()
    scores = Histogram("lungdx_prediction_probability", "predicted probabilities logged by this process",
                       labelnames=["model_version"], buckets=SCORE_BUCKETS, registry=registry)
    collector = MonitorCollector(monitor)
    registry.register(collector)
    return registry, MonitorMetrics(scores, collector)


def unregister_metrics(registry: CollectorRegistry, metrics: MonitorMetrics) -> None:
    for item in (metrics.scores, metrics.collector):
        try:
            registry.unregister(item)
        except KeyError:
            pass
