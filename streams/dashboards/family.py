"""The layout the three detector families share: alert counts, rules, severities, scores."""

from __future__ import annotations

from streams.alerts import severity_band
from streams.dashboards.panels import (
    bargauge,
    dashboard,
    heatmap,
    row,
    severity_colors,
    severity_description,
    stat,
    timeseries,
)
from streams.dashboards.queries import increase, quantile

ALERTS = "modelwatch_alerts_total"
RATIO = "modelwatch_detector_score_ratio"


def family_dashboard(detector: str, uid: str, title: str, description: str,
                     key_stat: dict, traffic: list[dict], variables: list[dict]) -> dict:
    """``key_stat``: the family's tracked-keys stat; ``traffic``: its input panels."""
    sel = f'detector="{detector}"'
    top = severity_band(100)
    panels = [
        stat("Alerts in range", increase(ALERTS, sel, "$__range"),
             description=f"{detector} alerts raised in the dashboard's time range",
             thresholds=[(None, "green"), (1, "orange")]),
        stat(f"{top.ocsf_name} alerts in range",
             increase(ALERTS, f'{sel},severity="{top.name}"', "$__range"),
             description=f"alerts of ECS severity {top.floor} or more (band {top.name})",
             thresholds=[(None, "green"), (1, top.color)]),
        stat("Median score / threshold", quantile(0.5, RATIO, sel, "$__range", func="increase"),
             description="how far past the threshold the alerts were; 1 is at the threshold"),
        key_stat,
        row("Alerts"),
        timeseries("Alerts by rule", [(increase(ALERTS, sel, by="rule"), "{{rule}}")],
                   bars=True, stack=True, description="alerts per minute, by rule"),
        timeseries("Alerts by severity", [(increase(ALERTS, sel, by="severity"), "{{severity}}")],
                   bars=True, stack=True, description=severity_description(),
                   overrides=severity_colors()),
        bargauge("Alerts by rule in range", [(f"sort_desc({increase(ALERTS, sel, '$__range', 'rule')})",
                                              "{{rule}}")]),
        heatmap("Score / threshold at alert time",
                f"sum by (le) (increase({RATIO}_bucket{{{sel}}}[$__interval]))",
                description="distribution of score/threshold of the alerts: mass near 1 means "
                            "borderline alerts, worth a look at the thresholds"),
        bargauge("Median score / threshold by rule in range",
                 [(quantile(0.5, RATIO, sel, "$__range", "rule", "increase"), "{{rule}}")],
                 width=24),
        row("Traffic"),
        *traffic,
    ]
    return dashboard(uid, title, description, panels, variables)
