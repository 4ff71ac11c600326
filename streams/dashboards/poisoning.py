"""Poisoning: training-data batches that carry flipped labels, triggers or outliers."""

from __future__ import annotations

from streams.dashboards.family import family_dashboard
from streams.dashboards.panels import stat, stats_topic, timeseries
from streams.dashboards.queries import increase

UID = "modelwatch-poisoning"
STATS = 'topic="$stats_topic"'


def build() -> dict:
    key_stat = stat("Sources tracked", 'sum(modelwatch_tracked_keys{kind="source"})',
                    description="dataset sources with detector state")
    traffic = [
        timeseries("Training batches by dataset",
                   [(increase("modelwatch_records_consumed_total", STATS, by="model"), "{{model}}")],
                   bars=True, stack=True, description="training-stats batches judged per minute"),
        timeseries("Rejected training-stats records by reason",
                   [(increase("modelwatch_invalid_records_total", STATS, by="reason"), "{{reason}}")],
                   bars=True, stack=True,
                   description="batches sent to the dead-letter topic, by the field at fault"),
    ]
    return family_dashboard(
        "poisoning", UID, "modelwatch / Poisoning",
        "Training-data poisoning (MITRE ATLAS AML.T0020): label flips, trigger spikes, "
        "out-of-bounds values, duplicate flooding",
        key_stat, traffic, [stats_topic()])
