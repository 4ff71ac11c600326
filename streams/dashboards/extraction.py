"""Extraction: clients stealing the model through its queries."""

from __future__ import annotations

from streams.dashboards.family import family_dashboard
from streams.dashboards.panels import inference_topic, stat, timeseries
from streams.dashboards.queries import rate

UID = "modelwatch-extraction"


def inference_panels(detector: str) -> tuple[dict, list[dict], list[dict]]:
    """Tracked clients, inference traffic by model, and the topic variable (shared with
    the adversarial dashboard: both judge the same client streams)."""
    key_stat = stat("Clients tracked", 'sum(modelwatch_tracked_keys{kind="client"})',
                    description="clients with detector state")
    traffic = [
        timeseries("Inference events / s by model",
                   [(rate("modelwatch_records_consumed_total", 'topic="$inference_topic"',
                          by="model"), "{{model}}")]),
        timeseries("Alerts per million events",
                   [(f'1e6 * sum(rate(modelwatch_alerts_total{{detector="{detector}"}}'
                     f'[$__rate_interval])) / sum(rate(modelwatch_records_consumed_total'
                     f'{{topic="$inference_topic"}}[$__rate_interval]))', "alerts / 1e6 events")],
                   description="alert rate relative to traffic: a jump with flat traffic is an "
                               "attack or a threshold problem"),
    ]
    return key_stat, traffic, [inference_topic()]


def build() -> dict:
    return family_dashboard(
        "extraction", UID, "modelwatch / Extraction",
        "Model extraction (MITRE ATLAS AML.T0024.002): PRADA, synthetic and gradient-step "
        "queries, coverage, boundary probing, collusion behind one IP",
        *inference_panels("extraction"))
