"""Overview: is the worker up, how much it judges, what it alerts on."""

from __future__ import annotations

from streams.dashboards.panels import (
    bargauge,
    dashboard,
    inference_topic,
    row,
    severity_colors,
    severity_description,
    stat,
    timeseries,
)
from streams.dashboards.queries import (
    JOB,
    dead_letter_share,
    increase,
    quantile,
    rate,
)

UID = "modelwatch-overview"
ALERTS = "modelwatch_alerts_total"
INFERENCE = 'topic="$inference_topic"'


def build() -> dict:
    panels = [
        stat("Workers up", f'sum(up{{job="{JOB}"}})', description="worker processes Prometheus reaches",
             thresholds=[(None, "red"), (1, "green")]),
        stat("Inference events / s", rate("modelwatch_records_consumed_total", INFERENCE),
             description="valid inference events judged per second"),
        stat("Alerts in range", increase(ALERTS, window="$__range"),
             thresholds=[(None, "green"), (1, "orange")]),
        stat("Dead-letter share", dead_letter_share(), unit="percentunit",
             description="events that broke the contract and went to the dead-letter topic",
             thresholds=[(None, "green"), (0.01, "orange"), (0.1, "red")]),
        row("Alerts"),
        timeseries("Alerts by detector", [(increase(ALERTS, by="detector"), "{{detector}}")],
                   bars=True, stack=True, description="alerts per minute, by detector family"),
        timeseries("Alerts by severity", [(increase(ALERTS, by="severity"), "{{severity}}")],
                   bars=True, stack=True, description=severity_description(),
                   overrides=severity_colors()),
        bargauge("Rules that fired in range",
                 [(f"sort_desc({increase(ALERTS, window='$__range', by='rule')} > 0)", "{{rule}}")],
                 width=24),
        row("Pipeline"),
        timeseries("Events judged / s by topic",
                   [(rate("modelwatch_records_consumed_total", by="topic"), "{{topic}}")], width=8),
        stat("Largest consumer lag", "max(modelwatch_consumer_lag_records)", width=8, height=8,
             description="records behind on the worst partition",
             thresholds=[(None, "green"), (10000, "orange"), (50000, "red")]),
        stat("Event-time lag p95",
             quantile(0.95, "modelwatch_event_time_lag_seconds", INFERENCE), unit="s",
             width=8, height=8, description="how long after an event's time it is judged"),
    ]
    return dashboard(UID, "modelwatch / Overview",
                     "modelwatch at a glance: worker health, volume, alerts by detector and severity",
                     panels, [inference_topic()])
