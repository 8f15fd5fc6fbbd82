"""Continuous monitoring: the prediction and feedback log, drift, rolling performance, alerts, upgrades.

``Monitor.open(url, checkpoint)`` in the service; ``lungdx monitor report|export|challenge`` on the
same database. See ``docs/monitoring.md``.
"""

from lungdx.monitoring.monitor import Monitor, UnknownPrediction, check_reader, parse_since
from lungdx.monitoring.report import render_report
from lungdx.monitoring.settings import MonitorSettings
from lungdx.monitoring.upgrade import challenge, export_feedback
from lungdx.monitoring.writer import LogQueueFull

__all__ = ["LogQueueFull", "Monitor", "MonitorSettings", "UnknownPrediction", "challenge", "check_reader", "export_feedback",
           "parse_since", "render_report"]
