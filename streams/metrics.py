"""The worker's Prometheus metrics, all defined here (STYLE habit 7).

Names follow the Prometheus conventions: ``modelwatch_`` prefix, base units,
``_total`` for counters. Labels come only from small fixed sets (topic,
model, detector, rule, severity, reason, sink, partition, kind): never a
client id or request id. The worker calls one :class:`WorkerMetrics` method
per fact; every metric lives in the instance's own registry, so tests and
several workers in one process do not collide.

>>> m = WorkerMetrics()
>>> m.consumed("inference-logs", "fraud-v3", 500)
>>> m.invalid("inference-logs", "features: expected 64 values for model digits, got 3")
>>> m.value("modelwatch_invalid_records_total", topic="inference-logs", reason="features")
1.0
>>> m.alert({"rule": {"name": "extraction.prada"}, "event": {"severity": 73},
...          "modelwatch": {"detector": "extraction", "score": 0.97, "threshold": 0.9}})
>>> m.value("modelwatch_alerts_total", detector="extraction", rule="extraction.prada",
...         severity="high")
1.0
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Iterable, Mapping

import msgspec
import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.metrics_core import HistogramMetricFamily

from detectors.rules import RULES as RULE_REGISTRY
from streams.alerts import SEVERITY_BANDS, severity_band
from streams.records import InferenceEvent, TrainingStatsEvent

# No *_created series: they double the series count and no query here needs them
# (process-wide, but this is the worker's process).
disable_created_metrics()

DETECTORS = ("extraction", "adversarial", "poisoning")
# The rules the detectors can fire, from their registry. Anything else is counted as
# "other" so a bug cannot blow up the labels.
RULES = tuple(RULE_REGISTRY)
#: Distinct model (or dataset) names labelled before new ones count as "other".
MAX_MODEL_LABELS = 64
SEVERITIES = tuple(band.name for band in SEVERITY_BANDS)
TRACKED_KINDS = ("client", "source")
#: Why a tracked client key was dropped: its model's cap, the cap over all models, or its
#: unprofiled model was evicted (more than MAX_MODEL_LABELS unprofiled names).
EVICTION_REASONS = ("model_cap", "total_cap", "model_evicted")
# Event fields of the contract: an invalid-record reason is labelled by its field.
FIELDS = frozenset(InferenceEvent.__struct_fields__) | frozenset(TrainingStatsEvent.__struct_fields__)

# score/threshold at alert time: 1 is "just at the threshold".
SCORE_RATIO_BUCKETS = (1.0, 1.05, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0, math.inf)
# wall clock minus event time: live traffic sits in the first buckets, a replayed
# backlog in the last.
LAG_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
               21600.0, 86400.0, math.inf)
PROCESSING_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                      10.0, math.inf)

_AT_PATH = re.compile(r" - at \$\.([A-Za-z_]+)")
_MISSING = re.compile(r"^Object missing required field ([A-Za-z_]+)")
_ELEMENT = re.compile(r"^array element \d+: ")


def reason_label(text: str) -> str:
    """A bounded label for a dead-letter reason: the contract field it names, or a kind.

    >>> reason_label("features: expected 64 values for model digits, got 3")
    'features'
    >>> reason_label("ts: not an RFC 3339 time or epoch seconds: 'yesterday'")
    'ts'
    >>> reason_label("array element 3: Expected float, got str - at $.features[1]")
    'features'
    >>> reason_label("Object missing required field client_id")
    'client_id'
    >>> reason_label("features.amount.mean: 1e+300 is not a plausible value")
    'features'
    >>> reason_label("JSON is malformed: invalid character (byte 0)")
    'json'
    >>> reason_label("JSON is nested over 256 levels deep")
    'json'
    >>> reason_label("record is 2000000 bytes, over the 1 MiB limit")
    'size'
    >>> reason_label("Expected object | array, got str")
    'schema'
    >>> reason_label("key-7f3a: something new")
    'other'
    """
    text = _ELEMENT.sub("", text)
    for pattern in (_AT_PATH, _MISSING):
        match = pattern.search(text)
        if match:
            return match.group(1) if match.group(1) in FIELDS else "schema"
    head = text.split(":", 1)[0].split(".", 1)[0].strip()
    if head in FIELDS:
        return head
    if text.startswith(("JSON is malformed", "not JSON", "Input data was truncated",
                        "JSON is nested")):
        return "json"
    if text.startswith("record is ") and "limit" in text:
        return "size"
    if text.startswith(("Expected ", "Object ")):
        return "schema"
    return "other"


def severity_label(severity: float) -> str:
    """ECS numeric severity (0-100) as its band's name (:data:`streams.alerts.SEVERITY_BANDS`).

    >>> [severity_label(s) for s in (10, 40, 50, 90)]
    ['low', 'medium', 'high', 'critical']
    """
    return severity_band(severity).name


class _BulkHistogram:
    """A labelled histogram observed a whole numpy array at a time.

    prometheus-client's Histogram takes one value per call; event lag comes per
    event (thousands per batch), so it is counted with one ``searchsorted``.
    """

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...],
                 buckets: tuple[float, ...]):
        self.name, self.documentation, self.labelnames = name, documentation, labelnames
        self.bounds = np.asarray(buckets[:-1] if math.isinf(buckets[-1]) else buckets, float)
        self._series: dict[tuple[str, ...], list] = {}  # labels -> [counts per bucket, sum]
        self._lock = threading.Lock()  # the HTTP server's thread reads while the worker writes

    def observe_many(self, labels: tuple[str, ...], values: np.ndarray) -> None:
        values = np.asarray(values, float)
        values = values[np.isfinite(values)]
        if not len(values):
            return
        counts = np.bincount(np.searchsorted(self.bounds, values, side="left"),
                             minlength=len(self.bounds) + 1)
        with self._lock:
            series = self._series.setdefault(labels, [np.zeros(len(self.bounds) + 1, np.int64), 0.0])
            series[0] += counts
            series[1] += float(values.sum())

    def describe(self):
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self):
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            series = [(k, v[0].copy(), v[1]) for k, v in self._series.items()]
        for labels, counts, total in series:
            cumulative = np.cumsum(counts)
            buckets = [(_le(b), float(c)) for b, c in zip(self.bounds, cumulative[:-1], strict=True)]
            buckets.append(("+Inf", float(cumulative[-1])))
            family.add_metric(list(labels), buckets, total)
        yield family


def _le(bound: float) -> str:
    return repr(float(bound))


class WorkerMetrics:
    """Every metric the worker exposes, with one method per thing that happened.

    Parameters
    ----------
    registry : CollectorRegistry, optional
        Where the metrics live; a fresh registry when not given.
    version : str, optional
        The ``version`` label of ``modelwatch_worker_info``; the installed
        package's version when not given.
    """

    def __init__(self, registry: CollectorRegistry | None = None, version: str | None = None):
        self.registry = r = registry if registry is not None else CollectorRegistry()
        self._models: set[str] = set()  # model label values in use (bounded)
        self._consumed = Counter(
            "modelwatch_records_consumed_total",
            "Valid events judged: inference events per model, training-stats batches per dataset "
            "(in the model label).", ("topic", "model"), registry=r)
        self._kafka_records = Counter(
            "modelwatch_kafka_records_total",
            "Kafka records consumed (a record may hold a JSON array of events).", ("topic",),
            registry=r)
        self._invalid = Counter(
            "modelwatch_invalid_records_total",
            "Events or records sent to the dead-letter topic, by the field or kind of the reason.",
            ("topic", "reason"), registry=r)
        self._alerts = Counter(
            "modelwatch_alerts_total", "Alerts raised.", ("detector", "rule", "severity"),
            registry=r)
        self._score_ratio = Histogram(
            "modelwatch_detector_score_ratio", "Score divided by threshold when an alert fires.",
            ("detector", "rule"), buckets=SCORE_RATIO_BUCKETS, registry=r)
        self._event_lag = _BulkHistogram(
            "modelwatch_event_time_lag_seconds",
            "Wall-clock time minus event time when an event is judged.", ("topic",), LAG_BUCKETS)
        r.register(self._event_lag)
        self._consumer_lag = Gauge(
            "modelwatch_consumer_lag_records",
            "Records between the worker's position and the partition's end.",
            ("topic", "partition"), registry=r)
        self._tracked = Gauge(
            "modelwatch_tracked_keys",
            "Keys with detector state: clients (inference) or dataset sources (training stats).",
            ("kind",), registry=r)
        self._evictions = Counter(
            "modelwatch_state_evictions_total",
            "Client keys evicted to keep the state under its caps (the longest idle first).",
            ("reason",), registry=r)
        self._state_bytes = Gauge(
            "modelwatch_state_bytes", "Size of the detector state, serialized.", registry=r)
        self._deliveries = Counter(
            "modelwatch_sink_deliveries_total", "Alerts delivered, by output.", ("sink",),
            registry=r)
        self._failures = Counter(
            "modelwatch_sink_failures_total", "Failed delivery attempts (retried), by output.",
            ("sink",), registry=r)
        self._dropped = Counter(
            "modelwatch_sink_dropped_total", "Alerts given up on, by output.", ("sink",),
            registry=r)
        self._processing = Histogram(
            "modelwatch_batch_processing_seconds", "Time to screen and judge one batch of records.",
            ("topic",), buckets=PROCESSING_BUCKETS, registry=r)
        self._info = Gauge("modelwatch_worker_info", "Always 1; the labels describe the worker.",
                           ("version",), registry=r)
        self._info.labels(version or _package_version()).set(1)
        ProcessCollector(registry=r)  # memory, CPU, open files of the worker process
        # Known series start at 0, so the first alert of a rule shows in increase()/rate().
        for rule in RULES:
            detector = rule.split(".", 1)[0]
            self._score_ratio.labels(detector, rule)
            for severity in SEVERITIES:
                self._alerts.labels(detector, rule, severity)
        for kind in TRACKED_KINDS:
            self._tracked.labels(kind).set(0)
        for reason in EVICTION_REASONS:
            self._evictions.labels(reason)

    # --- what the worker calls ---------------------------------------------------
    def consumed(self, topic: str, model: str, n: int = 1) -> None:
        """``n`` valid events of ``model`` (or batches of a dataset) judged from ``topic``.

        Model names come from producers: after ``MAX_MODEL_LABELS`` distinct ones, new
        names count as ``other``, so a client minting names cannot grow the series.

        >>> m = WorkerMetrics()
        >>> for i in range(MAX_MODEL_LABELS + 5):
        ...     m.consumed("inference-logs", f"minted-{i}")
        >>> m.value("modelwatch_records_consumed_total", topic="inference-logs", model="other")
        5.0
        """
        if model not in self._models:
            if len(self._models) >= MAX_MODEL_LABELS:
                model = "other"
            else:
                self._models.add(model)
        self._consumed.labels(topic, model).inc(n)

    def kafka_records(self, topic: str, n: int = 1) -> None:
        self._kafka_records.labels(topic).inc(n)

    def invalid(self, topic: str, reason_text: str, n: int = 1) -> None:
        """A dead letter; the free-text reason becomes a bounded label (:func:`reason_label`)."""
        self._invalid.labels(topic, reason_label(reason_text)).inc(n)

    def alert(self, alert: Mapping | object) -> None:
        """One alert (the ECS dict, or a :class:`streams.records.Alert`): count it and
        observe its score/threshold."""
        doc = alert if isinstance(alert, Mapping) else msgspec.to_builtins(alert)
        mw = doc["modelwatch"]
        detector = mw["detector"] if mw["detector"] in DETECTORS else "other"
        rule = doc["rule"]["name"] if doc["rule"]["name"] in RULES else "other"
        self._alerts.labels(detector, rule, severity_label(doc["event"]["severity"])).inc()
        score, threshold = float(mw["score"]), float(mw["threshold"])
        if threshold > 0 and math.isfinite(score):  # a ratio means nothing otherwise
            self._score_ratio.labels(detector, rule).observe(score / threshold)

    def event_lag(self, topic: str, seconds: Iterable[float] | np.ndarray) -> None:
        """Wall clock minus event time, one value per event judged."""
        self._event_lag.observe_many((topic,), np.asarray(seconds, float))

    def consumer_lag(self, topic: str, partition: int, lag: int) -> None:
        self._consumer_lag.labels(topic, str(partition)).set(lag)

    def tracked(self, kind: str, n: int) -> None:
        """Keys with state: ``kind`` is ``client`` or ``source``."""
        if kind not in TRACKED_KINDS:
            raise ValueError(f"kind must be one of {TRACKED_KINDS}, not {kind!r}")
        self._tracked.labels(kind).set(n)

    def evicted(self, reason: str, n: int = 1) -> None:
        """``n`` client keys evicted; ``reason`` is one of :data:`EVICTION_REASONS`."""
        if reason not in EVICTION_REASONS:
            raise ValueError(f"reason must be one of {EVICTION_REASONS}, not {reason!r}")
        self._evictions.labels(reason).inc(n)

    def state_bytes(self, n: int) -> None:
        self._state_bytes.set(n)

    def sink(self, name: str, delivered: int = 0, failed: int = 0, dropped: int = 0) -> None:
        """Delivery outcomes of one output (``name`` is the sink's kind, e.g. ``webhook``)."""
        self._deliveries.labels(name).inc(delivered)
        self._failures.labels(name).inc(failed)
        self._dropped.labels(name).inc(dropped)

    def processing(self, topic: str, seconds: float) -> None:
        self._processing.labels(topic).observe(seconds)

    def serve(self, port: int, addr: str = "0.0.0.0"):
        """Serve ``/metrics`` on ``addr:port`` from a daemon thread; port 0 disables.

        Returns the HTTP server (``shutdown()`` stops it), or None when disabled.
        """
        if not port:
            return None
        from prometheus_client import start_http_server

        server, _thread = start_http_server(port, addr, registry=self.registry)
        return server

    # --- for tests and tools -----------------------------------------------------
    def value(self, name: str, **labels: str) -> float | None:
        """One sample's current value (``name`` as exposed, e.g. ``..._total``)."""
        return self.registry.get_sample_value(name, labels)


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("modelwatch")
    except PackageNotFoundError:
        return "unknown"
