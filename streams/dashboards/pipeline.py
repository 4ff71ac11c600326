"""Pipeline health: the worker process, throughput, lag, dead letters, alert outputs."""

from __future__ import annotations

from streams.dashboards.panels import dashboard, heatmap, inference_topic, row, stat, timeseries
from streams.dashboards.queries import JOB, dead_letter_share, increase, quantile, rate

UID = "modelwatch-pipeline"
LAG = "modelwatch_event_time_lag_seconds"
BATCH = "modelwatch_batch_processing_seconds"


def _quantiles(histogram: str, by: str) -> list[tuple[str, str]]:
    return [(quantile(q, histogram, by=by), f"p{round(q * 100)} {{{{{by}}}}}")
            for q in (0.5, 0.95, 0.99)]


def build() -> dict:
    panels = [
        row("Worker"),
        stat("Workers up", f'sum(up{{job="{JOB}"}})', thresholds=[(None, "red"), (1, "green")]),
        stat("Versions running", [("count by (version) (modelwatch_worker_info)", "{{version}}")]),
        stat("Detector state", "sum(modelwatch_state_bytes)", unit="bytes",
             description="serialized size of all detector state"),
        stat("Firing pipeline alerts", 'count(ALERTS{alertname=~"Modelwatch.*",'
             'alertstate="firing"}) or vector(0)',
             description="Prometheus alerting rules of dashboards/prometheus/rules.yml",
             thresholds=[(None, "green"), (1, "red")]),
        timeseries("Resident memory", [(f'process_resident_memory_bytes{{job="{JOB}"}}',
                                        "{{instance}}")], unit="bytes", width=6),
        timeseries("CPU", [(f'rate(process_cpu_seconds_total{{job="{JOB}"}}[$__rate_interval])',
                            "{{instance}}")], unit="percentunit", width=6),
        timeseries("Keys tracked", [("sum by (kind) (modelwatch_tracked_keys)", "{{kind}}")],
                   width=6),
        timeseries("Keys evicted / s", [(rate("modelwatch_state_evictions_total", by="reason"),
                                         "{{reason}}")], width=6,
                   description="client keys dropped at the state caps, the longest idle first "
                               "(README, Bounded state)"),
        row("Throughput"),
        timeseries("Kafka records / s", [(rate("modelwatch_kafka_records_total", by="topic"),
                                          "{{topic}}")], width=8),
        timeseries("Events judged / s", [(rate("modelwatch_records_consumed_total", by="topic"),
                                          "{{topic}}")], width=8),
        timeseries("Events per Kafka record",
                   [(f'{rate("modelwatch_records_consumed_total", by="topic")} / '
                     f'{rate("modelwatch_kafka_records_total", by="topic")}', "{{topic}}")],
                   width=8, description="how well the shipper batches (JSON arrays)"),
        timeseries("Batch processing time", _quantiles(BATCH, "topic"), unit="s"),
        timeseries("Batches / s", [(f"sum by (topic) (rate({BATCH}_count[$__rate_interval]))",
                                    "{{topic}}")]),
        row("Lag"),
        timeseries("Consumer lag by partition",
                   [("sum by (topic, partition) (modelwatch_consumer_lag_records)",
                     "{{topic}}/{{partition}}")], description="records behind the partition's end"),
        timeseries("Event-time lag", _quantiles(LAG, "topic"), unit="s",
                   description="wall clock minus event time when judged"),
        heatmap("Event-time lag distribution",
                f'sum by (le) (increase({LAG}_bucket{{topic="$inference_topic"}}[$__interval]))',
                unit="s", width=24),
        row("Dead letters"),
        timeseries("Dead letters / s by reason",
                   [(rate("modelwatch_invalid_records_total", by="topic, reason"),
                     "{{topic}}: {{reason}}")], stack=True),
        timeseries("Dead-letter share", [(dead_letter_share(by="topic"), "{{topic}}")],
                   unit="percentunit"),
        row("Alert outputs"),
        timeseries("Deliveries / s", [(rate("modelwatch_sink_deliveries_total", by="sink"),
                                       "{{sink}}")], width=8),
        timeseries("Failed attempts / s", [(rate("modelwatch_sink_failures_total", by="sink"),
                                            "{{sink}}")], width=8,
                   description="retried with backoff; alerts are lost only when dropped"),
        stat("Dropped in range", [(increase("modelwatch_sink_dropped_total", window="$__range",
                                            by="sink"), "{{sink}}")], width=8, height=8,
             thresholds=[(None, "green"), (1, "red")]),
    ]
    return dashboard(UID, "modelwatch / Pipeline health",
                     "The worker process, throughput, consumer and event-time lag, dead letters "
                     "and alert outputs", panels, [inference_topic()])
