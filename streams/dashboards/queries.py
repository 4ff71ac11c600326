"""PromQL shared by the dashboards and the alerting rules (written once, used by both)."""

from __future__ import annotations

from streams.settings import SETTINGS

JOB = "modelwatch"  # the scrape job name in dashboards/prometheus/prometheus.yml
DEFAULTS = {s.name: s.default for s in SETTINGS}
INFERENCE_TOPIC = DEFAULTS["topic_inference"]
STATS_TOPIC = DEFAULTS["topic_stats"]


def _series(metric: str, selector: str) -> str:
    return f"{metric}{{{selector}}}" if selector else metric


def rate(metric: str, selector: str = "", window: str = "$__rate_interval", by: str = "") -> str:
    """``sum [by (...)] (rate(metric{selector}[window]))``, summed over workers."""
    grouping = f" by ({by}) " if by else ""
    return f"sum{grouping}(rate({_series(metric, selector)}[{window}]))"


def increase(metric: str, selector: str = "", window: str = "$__interval", by: str = "") -> str:
    grouping = f" by ({by}) " if by else ""
    return f"sum{grouping}(increase({_series(metric, selector)}[{window}]))"


def quantile(q: float, histogram: str, selector: str = "", window: str = "$__rate_interval",
             by: str = "", func: str = "rate") -> str:
    """``histogram_quantile`` over a histogram's buckets, summed over workers."""
    grouping = ", ".join(["le", *([by] if by else [])])
    return (f"histogram_quantile({q}, sum by ({grouping}) "
            f"({func}({_series(histogram + '_bucket', selector)}[{window}])))")


def dead_letter_share(window: str = "$__rate_interval", by: str = "") -> str:
    """Share of events that went to the dead-letter topic: invalid / (invalid + valid)."""
    invalid = rate("modelwatch_invalid_records_total", window=window, by=by)
    valid = rate("modelwatch_records_consumed_total", window=window, by=by)
    return f"{invalid} / ({invalid} + {valid})"
