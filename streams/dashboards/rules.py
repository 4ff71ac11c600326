"""Prometheus alerting rules for pipeline health (``dashboards/prometheus/rules.yml``).

Thresholds are operational, not statistical: each says what it stands for.
"""

from __future__ import annotations

from streams.dashboards.queries import JOB, dead_letter_share

RUNBOOK = "Dashboard: modelwatch / Pipeline health (uid modelwatch-pipeline)."
LAG_RECORDS = 50_000        # a record holds up to 500 events: minutes of traffic behind
DEAD_LETTER_SHARE = 0.01    # producers that break the contract, not the odd bad line


def _rule(name: str, expr: str, for_: str, severity: str, summary: str, description: str) -> dict:
    return {"alert": name, "expr": expr, "for": for_, "labels": {"severity": severity},
            "annotations": {"summary": summary, "description": f"{description} {RUNBOOK}"}}


def rules() -> dict:
    return {"groups": [{"name": "modelwatch-pipeline", "rules": [
        _rule("ModelwatchWorkerDown",
              f'up{{job="{JOB}"}} == 0 or absent(up{{job="{JOB}"}})', "2m", "critical",
              "modelwatch worker {{ $labels.instance }} is down",
              "Prometheus cannot scrape the worker: no detection is running on its partitions."),
        _rule("ModelwatchConsumerLagHigh",
              f"sum by (topic) (modelwatch_consumer_lag_records) > {LAG_RECORDS}", "10m", "warning",
              "modelwatch is {{ $value | humanize }} records behind on {{ $labels.topic }}",
              "The worker does not keep up: alerts arrive late. Add partitions and workers, "
              "or look at batch processing time."),
        _rule("ModelwatchDeadLetterRate",
              f"{dead_letter_share('5m', 'topic')} > {DEAD_LETTER_SHARE}", "10m", "warning",
              "{{ $value | humanizePercentage }} of {{ $labels.topic }} goes to the dead-letter "
              "topic",
              "A producer breaks the wire contract; the dead-letter records carry the reason."),
        _rule("ModelwatchSinkFailing",
              "sum by (sink) (rate(modelwatch_sink_failures_total[5m])) > 0", "5m", "warning",
              "alert output {{ $labels.sink }} keeps failing",
              "Deliveries are retried with backoff; the security-alerts topic still has every "
              "alert (modelwatch alerts forward re-feeds the output)."),
        _rule("ModelwatchSinkDropping",
              "sum by (sink) (increase(modelwatch_sink_dropped_total[15m])) > 0", "0m", "critical",
              "alert output {{ $labels.sink }} dropped alerts",
              "Retries were exhausted: re-feed the output from the security-alerts topic with "
              "modelwatch alerts forward."),
    ]}]}
