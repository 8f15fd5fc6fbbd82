"""The monitoring report: one offline HTML page (figures as data URIs, CSS inline, no CDN).

Numbers come from ``Monitor.summary`` and ``Monitor.window``; the plots only draw them.
Used by ``lungdx monitor report`` and the service's ``/v1/monitor/report``.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from datetime import timedelta

import numpy as np

from lungdx.metrics import format_ci
from lungdx.monitoring.monitor import Monitor, parse_since, utc_now

logger = logging.getLogger(__name__)



def render_report(monitor: Monitor, *, since: str | timedelta | None = "30d") -> str:
    """The monitoring report of the current model over ``since`` (``30d``, ``12h``, ``all``) as HTML."""
    from lungdx.report import NOT_FOR_CLINICAL_USE, REPORT_CSS

    period = parse_since(since)
    summary = monitor.summary(since=since)
    window = monitor.window(since=period if period is not None else "all")
    reference = monitor.reference or {}
    figures = [("Predictions per day", _volume_figure(summary["volume"]["per_day"])),
               ("Scores in the period against the validation reference",
                _score_figure(window["probability"], reference.get("probabilities") or [])),
               ("Mean raw-pixel intensity histogram against the validation reference",
                _intensity_figure(window["intensity_histogram"], (reference.get("intensity") or {}).get("histogram") or []))]
    performance = summary["performance"]
    if performance["metrics"]:
        figures.append(("Rolling performance (CI) and validation figures", _performance_figure(performance)))
    model = summary["model"]
    title = f"Monitoring: {model['name']} {model['version']}"
    body = [f"<div class=banner>{html.escape(NOT_FOR_CLINICAL_USE)}</div><main><h1>{html.escape(title)}</h1>",
            f"<p>Period: {html.escape('all' if period is None else str(since))}, generated {utc_now():%Y-%m-%d %H:%M} UTC. "
            f"Drift reference: {html.escape(summary['reference_source'])}.</p>",
            _volume_section(summary), _alerts_section(summary["alerts"]), _drift_section(summary["drift"]),
            _performance_section(performance), "<h2>Figures</h2><div class=figures>"]
    body += [f"<figure><img alt=\"{html.escape(caption)}\" src=\"{uri}\"><figcaption>{html.escape(caption)}</figcaption></figure>"
             for caption, uri in figures if uri]
    body.append("</div><p>Cases are known by pseudonymous keys only; no name, patient ID or file path is logged. "
                "Confidence intervals resample cases, not patients (the log holds no patient identity).</p></main>")
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><style>{REPORT_CSS}</style></head>"
            f"<body>{''.join(body)}</body></html>")


def _table(header: list[str], rows: list[list], classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    lines = []
    for index, row in enumerate(rows):
        css = f" class={classes[index]}" if classes and classes[index] else ""
        lines.append(f"<tr{css}>" + "".join(f"<td>{html.escape(_text(cell))}</td>" for cell in row) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(lines)}</table>"


def _text(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _volume_section(summary: dict) -> str:
    volume = summary["volume"]
    return (f"<h2>Volume</h2><p>{volume['in_period']} predictions in the period (all models); "
            f"{volume['current_model_total']} by this model in all; {volume['confirmed_total']} cases confirmed by a reader.</p>")


def _alerts_section(alerts: dict) -> str:
    active = alerts["active"]
    text = "<h2>Alerts</h2>"
    text += (_table(["check", "since", "value", "limit", "message"],
                    [[a["check"], a["since"], a["value"], a["limit"], a["message"]] for a in active], ["alert"] * len(active))
             if active else "<p class=ok>No alert is raised.</p>")
    events = alerts["events"][:50]
    if events:
        text += "<h3>Alert events in the period</h3>" + _table(
            ["time", "check", "state", "value", "limit", "message"],
            [[e["created_at"], e["check_name"], e["state"], e["value"], e["limit_value"], e["message"]] for e in events])
    return text


def _drift_section(drift: list[dict]) -> str:
    rows = [[c["name"], c["kind"], c["status"], c["value"], c["limit"], c["detail"]] for c in drift]
    classes = ["alert" if c["alert"] else "ok" if c["status"] == "ok" else "" for c in drift]
    n = drift[0]["n"] if drift else 0
    return (f"<h2>Drift (latest {n} predictions of this model)</h2>"
            + _table(["check", "kind", "status", "value", "limit", "detail"], rows, classes))


def _performance_section(performance: dict) -> str:
    text = f"<h2>Rolling performance on confirmed cases</h2><p>{html.escape(performance['detail'])}.</p>"
    if not performance["metrics"]:
        return text
    level = round(100 * performance["confidence"])
    rows = [[name, format_ci(entry), performance["validation"].get(name)] for name, entry in performance["metrics"].items()]
    return text + _table(["metric", f"value [{level}% CI]", "validation (checkpoint)"], rows)


def _figure_uri(draw) -> str | None:
    # A Figure of its own, not pyplot's: the service renders reports on its thread pool, and pyplot's figure
    # registry and current figure are one global state that two requests at once would share.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.2, 3.4), dpi=100)
    axes = figure.subplots()
    if draw(axes) is False:
        return None
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _volume_figure(per_day: list[dict]) -> str | None:
    def draw(axes):
        if not per_day:
            return False
        axes.bar(range(len(per_day)), [d["count"] for d in per_day], color="#3b6ea5")
        step = max(1, len(per_day) // 8)
        axes.set_xticks(range(0, len(per_day), step), [d["date"] for d in per_day][::step], rotation=30, fontsize=7)
        axes.set(ylabel="predictions", title="Volume per day (UTC)")

    return _figure_uri(draw)


def _score_figure(scores: list[float], reference: list[float]) -> str | None:
    def draw(axes):
        if not scores and not reference:
            return False
        bins = np.linspace(0, 1, 21)
        if reference:
            axes.hist(reference, bins=bins, density=True, alpha=0.5, color="#888", label=f"validation (n={len(reference)})")
        if scores:
            axes.hist(scores, bins=bins, density=True, histtype="step", linewidth=2, color="#c0392b",
                      label=f"period (n={len(scores)})")
        axes.set(xlabel="probability", ylabel="density", title="Score distribution")
        axes.legend(fontsize=8)

    return _figure_uri(draw)


def _intensity_figure(histograms: list[list[float]], reference: list[float]) -> str | None:
    def draw(axes):
        if not histograms and not reference:
            return False
        if reference:
            centres = (np.arange(len(reference)) + 0.5) / len(reference)
            axes.plot(centres, reference, color="#888", linewidth=2, label="validation")
        if histograms:
            mean = np.mean(histograms, axis=0)
            axes.plot((np.arange(len(mean)) + 0.5) / len(mean), mean, color="#c0392b", label=f"period (n={len(histograms)})")
        axes.set(xlabel="raw pixel intensity (MONOCHROME2)", ylabel="fraction of pixels", title="Intensity histogram")
        axes.legend(fontsize=8)

    return _figure_uri(draw)


def _performance_figure(performance: dict) -> str | None:
    def draw(axes):
        names = list(performance["metrics"])
        values = [performance["metrics"][n]["value"] for n in names]
        low = [performance["metrics"][n]["ci_low"] for n in names]
        high = [performance["metrics"][n]["ci_high"] for n in names]
        x = np.arange(len(names))
        errors = np.array([[v - lo if _finite(v, lo) else 0 for v, lo in zip(values, low, strict=True)],
                           [hi - v if _finite(v, hi) else 0 for v, hi in zip(values, high, strict=True)]])
        axes.errorbar(x, [v if v is not None else np.nan for v in values], yerr=errors, fmt="o", color="#c0392b",
                      capsize=4, label="rolling (CI)")
        validation = [performance["validation"].get(n) for n in names]
        axes.scatter(x, [v if v is not None else np.nan for v in validation], marker="_", s=400, color="#333",
                     label="validation")
        axes.set_xticks(x, names)
        axes.set(ylim=(0, 1.05), title="Rolling performance")
        axes.legend(fontsize=8)

    return _figure_uri(draw)


def _finite(*values) -> bool:
    return all(v is not None and np.isfinite(v) for v in values)
