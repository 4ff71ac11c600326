"""The worker's metrics, and every dashboard and rule expression against a real Prometheus.

The integration test starts the ``prometheus`` server (Debian package
``prometheus``) on loopback with the committed scrape config and rules, scraping
every second, and asks its HTTP API for every PromQL expression of the
dashboards and the alerting rules: each must return data. Without the binary
the test is skipped, unless ``CI`` is set.
"""

from __future__ import annotations

import doctest
import json
import math
import re
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import yaml

import streams.dashboards.push
import streams.metrics
from detectors.base import Verdict
from streams.alerts import build_alert
from streams.dashboards import build_all
from streams.dashboards.rules import rules
from streams.metrics import FIELDS, RULES, WorkerMetrics, reason_label
from streams.records import decode_inference, decode_stats
from tests.conftest import ROOT, need_tool
from tests.streaming import terminate
from tests.test_sinks import free_port

PROMETHEUS_DIR = ROOT / "dashboards" / "prometheus"
INFERENCE, STATS = "inference-logs", "training-stats"
# What Grafana puts in place of its built-in variables for a 1 s scrape interval.
GRAFANA_BUILTINS = {"__rate_interval": "15s", "__interval": "15s", "__range": "10m"}


def need(tool: str) -> str:
    return need_tool(tool, package="prometheus")


# --- metrics, no server --------------------------------------------------------------

def test_doctests():
    for module in (streams.metrics, streams.dashboards.push):
        assert doctest.testmod(module).failed == 0, module.__name__


def test_rules_are_the_ones_the_detectors_document():
    documented = set()
    for path in (ROOT / "detectors").glob("*.py"):
        documented |= set(re.findall(r"``((?:extraction|adversarial|poisoning)\.[a-z_]+)``",
                                     path.read_text()))
    assert set(RULES) == documented


REJECTED = [
    b"not json", b"{}", b"[1, {}]", b'"a string"', b"x" * (2 << 20),
    b'{"ts": 1, "model": "", "client_id": "c", "prediction": 1}',
    b'{"ts": 1, "model": "m", "client_id": "c", "prediction": 1, "features": [1, "a"]}',
    b'{"ts": 1, "model": "m", "client_id": "c", "prediction": 1, "probabilities": [2]}',
    b'{"ts": 1, "model": "m", "client_id": "c", "prediction": [1]}',
]


def test_every_dead_letter_reason_maps_to_a_bounded_label():
    reasons = [r.reason for raw in REJECTED for r in decode_inference(raw)]
    reasons += [decode_stats(b'{"ts": "x", "dataset": "d", "batch_id": "b", "source": "s", '
                             b'"n": 1, "features": {}, "labels": {}}')[0].reason,
                decode_stats(b'{"dataset": 3}')[0].reason]
    labels = [reason_label(r) for r in reasons]
    allowed = FIELDS | {"json", "schema", "size", "other"}
    assert set(labels) <= allowed
    assert "other" not in labels  # every reason the decoder gives is recognised
    assert {"json", "schema", "size", "ts", "model", "features", "probabilities",
            "prediction", "dataset"} <= set(labels)


def _alert(rule: str, score: float, threshold: float):
    detector = rule.split(".")[0]
    verdict = Verdict(detector=detector, rule=rule, key="k", score=score, threshold=threshold,
                      events_seen=10, trigger=0, techniques=("AML.T0043",),
                      description="test", evidence={})
    if detector == "poisoning":
        return build_alert(verdict, trigger_ts=1.79e9, dataset="d", batch_id="b", source="s")
    return build_alert(verdict, trigger_ts=1.79e9, request_id="r", model="m", client_id="c")


def test_alerts_are_counted_by_detector_rule_and_severity():
    m = WorkerMetrics()
    m.alert(_alert("extraction.prada", 0.95, 0.9))      # just past: severity 52, high
    m.alert(_alert("poisoning.label_flip", 20.0, 4.0))  # far past: 90, critical
    import msgspec

    m.alert(msgspec.to_builtins(_alert("adversarial.low_margin", 5.0, 5.0)))  # the dict form
    assert m.value("modelwatch_alerts_total", detector="extraction", rule="extraction.prada",
                   severity="high") == 1
    assert m.value("modelwatch_alerts_total", detector="poisoning", rule="poisoning.label_flip",
                   severity="critical") == 1
    assert m.value("modelwatch_detector_score_ratio_bucket", detector="poisoning",
                   rule="poisoning.label_flip", le="5.0") == 1
    assert m.value("modelwatch_detector_score_ratio_bucket", detector="poisoning",
                   rule="poisoning.label_flip", le="3.0") == 0
    assert m.value("modelwatch_detector_score_ratio_sum", detector="adversarial",
                   rule="adversarial.low_margin") == pytest.approx(1.0)
    doc = msgspec.to_builtins(_alert("extraction.prada", 1.0, 0.5))
    doc["rule"]["name"] = "extraction.something_new"
    m.alert(doc)  # a rule this module does not know: counted, but under a bounded label
    assert m.value("modelwatch_alerts_total", detector="extraction", rule="other",
                   severity="critical") == 1


def test_bulk_event_lag_equals_prometheus_client_histogram():
    from prometheus_client import CollectorRegistry, Histogram

    values = np.random.default_rng(0).exponential(30.0, 5000)
    values[:3] = [0.1, 86400.0, 1e9]  # on a bucket edge, on the last edge, past it
    m = WorkerMetrics()
    m.event_lag(INFERENCE, values[:2000])
    m.event_lag(INFERENCE, values[2000:])
    m.event_lag(INFERENCE, [math.nan])  # not an event time: not counted
    reference = CollectorRegistry()
    h = Histogram("ref_seconds", "", ("topic",), buckets=streams.metrics.LAG_BUCKETS,
                  registry=reference)
    for v in values:
        h.labels(INFERENCE).observe(v)
    for bound in [*streams.metrics.LAG_BUCKETS[:-1], "+Inf"]:
        le = str(float(bound)) if bound != "+Inf" else bound
        assert m.value("modelwatch_event_time_lag_seconds_bucket", topic=INFERENCE, le=le) == \
            reference.get_sample_value("ref_seconds_bucket", {"topic": INFERENCE, "le": le})
    assert m.value("modelwatch_event_time_lag_seconds_count", topic=INFERENCE) == 5000
    assert m.value("modelwatch_event_time_lag_seconds_sum", topic=INFERENCE) == \
        pytest.approx(values.sum())


def test_serve_exposes_the_registry_and_port_zero_disables():
    assert WorkerMetrics().serve(0) is None
    a, b = WorkerMetrics(version="1.2.3"), WorkerMetrics()  # two registries, no collision
    a.consumed(INFERENCE, "fraud-v3", 7)
    a.sink("webhook", delivered=3, failed=1)
    with pytest.raises(ValueError):
        a.tracked("request", 1)
    port = free_port()
    server = a.serve(port, "127.0.0.1")
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert 'modelwatch_records_consumed_total{model="fraud-v3",topic="inference-logs"} 7.0' in text
    assert 'modelwatch_sink_failures_total{sink="webhook"} 1.0' in text
    assert 'modelwatch_worker_info{version="1.2.3"} 1.0' in text
    assert "_created" not in text
    assert b.value("modelwatch_records_consumed_total", topic=INFERENCE, model="fraud-v3") is None


# --- promtool ------------------------------------------------------------------------

def test_promtool_checks_the_rules_and_the_scrape_config(tmp_path):
    promtool = need("promtool")
    checked = subprocess.run([promtool, "check", "rules", str(PROMETHEUS_DIR / "rules.yml")],
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"{sum(len(g['rules']) for g in rules()['groups'])} rules found" in checked.stdout
    # The compose config names the rules file by its path in the container.
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    assert config["rule_files"] == ["/etc/prometheus/rules.yml"]
    config["rule_files"] = [str(PROMETHEUS_DIR / "rules.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    checked = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")],
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


# --- a real Prometheus ---------------------------------------------------------------

@dataclass
class Targets:
    """Addresses Prometheus scrapes in the ``modelwatch`` job."""

    up: list[str]
    down: list[str]  # a worker that is down, so the worker-down rule has something to say
    feed: Callable[[], None] | None = None  # sends the traffic, once Prometheus is watching


class Traffic:
    """Realistic calls into WorkerMetrics, as the worker makes them, until stopped.

    Besides detection traffic it stages the troubles the alerting rules watch for:
    a backlog on one partition, a producer sending bad records, a failing and a
    dropping alert output.
    """

    def __init__(self, metrics: WorkerMetrics):
        self.m = metrics
        self.stop = threading.Event()
        self.alerts = [_alert(rule, score, 1.0) for rule in RULES for score in (1.02, 1.6, 2.5)]
        self.rejected = [r.reason for raw in REJECTED for r in decode_inference(raw)]
        self.rng = np.random.default_rng(1)

    def tick(self, i: int) -> None:
        m, rng = self.m, self.rng
        for model in ("fraud-v3", "digits"):
            n = int(rng.integers(200, 500))
            m.kafka_records(INFERENCE, max(1, n // 100))
            m.consumed(INFERENCE, model, n)
            m.event_lag(INFERENCE, rng.exponential(0.4, n))
            m.processing(INFERENCE, float(rng.uniform(0.002, 0.05)))
        m.invalid(INFERENCE, self.rejected[i % len(self.rejected)], 20)  # a broken producer
        if i % 5 == 0:
            m.kafka_records(STATS, 1)
            m.consumed(STATS, "fraud-train", 1)
            m.event_lag(STATS, [rng.exponential(30.0)])
            m.processing(STATS, float(rng.uniform(0.01, 0.2)))
            m.invalid(STATS, "features.amount.mean: 1e+300 is not a plausible value")
        m.alert(self.alerts[i % len(self.alerts)])
        for partition in range(8):
            m.consumer_lag(INFERENCE, partition, 80_000 if partition == 5 else int(rng.integers(0, 50)))
            m.consumer_lag(STATS, partition, 0)
        m.tracked("client", 1200 + i)
        m.tracked("source", 3)
        m.state_bytes(5_000_000 + 1000 * i)
        m.sink("kafka", delivered=1)
        m.sink("webhook", delivered=1, failed=1)           # failing, retried
        m.sink("syslog", delivered=1, dropped=int(i % 10 == 0))  # gave up on some

    def run(self) -> None:
        i = 0
        while not self.stop.wait(0.2):
            self.tick(i)
            i += 1


@pytest.fixture(scope="module")
def targets():
    """The scrape targets. Today a WorkerMetrics fed by :class:`Traffic` in this process;
    to be replaced by a real worker under scenario traffic (keep the down target)."""
    metrics = WorkerMetrics()
    port = free_port()
    server = metrics.serve(port, "127.0.0.1")
    traffic = Traffic(metrics)
    traffic.tick(0)
    thread = threading.Thread(target=traffic.run, daemon=True)
    thread.start()
    try:
        yield Targets(up=[f"127.0.0.1:{port}"], down=[f"127.0.0.1:{free_port()}"])
    finally:
        traffic.stop.set()
        thread.join()
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def worker_targets(demo, tmp_path_factory):
    """A real worker, and ``feed`` to send it the demo scenario's traffic with bad records
    among it (the alert output is down); plus a worker address where nothing answers.

    The traffic is sent only when the test calls ``feed``, after Prometheus has scraped
    the worker's counters at zero: a counter that already stands at its final value in
    the first scrape shows no increase() (seen on a busy machine, where the worker had
    judged everything before Prometheus was up: "Rules that fired in range" was empty).
    """
    from streams.worker.broker import EmbeddedBroker
    from tests.conftest import run_cli
    from tests.streaming import create_topics, send_stats, start_worker, stop

    folder, paths = demo
    work = tmp_path_factory.mktemp("worker")
    port = free_port()
    log = work / "inference.jsonl"
    log.write_bytes(paths["inference.jsonl"].read_bytes() + b"not json\n{\"ts\": 1}\n")
    with EmbeddedBroker() as broker:
        create_topics(broker)
        worker = start_worker(broker, folder / "profiles", work / "state", work / "worker.log",
                              "--metrics-port", str(port),
                              "--sinks", f"syslog+tcp://127.0.0.1:{free_port()}")

        def feed() -> None:
            shipped = run_cli("tail", log, "--once", "--broker", broker.url,
                              "--checkpoint", work / "tail.json")
            assert shipped.returncode == 0, shipped.stderr
            send_stats(broker, paths["stats"])
            send_broken_records(broker)

        try:
            yield Targets(up=[f"127.0.0.1:{port}"], down=[f"127.0.0.1:{free_port()}"], feed=feed)
        finally:
            stop(worker)


def send_broken_records(broker) -> None:
    """What a broken producer writes straight to the topics, past ``tail``'s checks."""
    from tests.streaming import send_records

    send_records(broker, [("inference-logs", b"c1", b"not json"),
                          ("inference-logs", b"c1", b'{"ts": 1}'),
                          ("training-stats", b"d1", b'{"dataset": "d1"}')])


@pytest.fixture(scope="module")
def prometheus(targets, tmp_path_factory):
    yield from run_prometheus(targets, tmp_path_factory)


@pytest.fixture(scope="module")
def prometheus_on_worker(worker_targets, tmp_path_factory):
    yield from run_prometheus(worker_targets, tmp_path_factory)


def run_prometheus(targets, tmp_path_factory):
    """A Prometheus with the committed config, pointed at ``targets``, every second."""
    binary = need("prometheus")
    folder = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS_DIR / "rules.yml")]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "modelwatch"]
    job.pop("dns_sd_configs", None)  # the compose service name means nothing here
    job["static_configs"] = [{"targets": targets.up + targets.down}]
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(folder / "prometheus.log", "wb") as log:
        process = subprocess.Popen(
            [binary, f"--config.file={folder / 'prometheus.yml'}",
             f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
             "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/-/ready", timeout=1)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("prometheus did not start:\n" +
                                (folder / "prometheus.log").read_text()[-2000:])
                time.sleep(0.2)
        yield url
    finally:
        terminate(process)


def api(url: str, path: str, **params) -> dict:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(f"{url}/api/v1/{path}{query}", timeout=10) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, expression) for every panel target, with Grafana's variables filled in
    as Grafana would fill them from the dashboard's defaults."""
    out = []
    for name, doc in build_all().items():
        values = dict(GRAFANA_BUILTINS)
        values.update({v["name"]: v["current"]["value"] for v in doc["templating"]["list"]
                       if v["type"] == "textbox"})
        for panel in doc["panels"]:
            for target in panel.get("targets", []):
                expr = re.sub(r"\$(\w+)", lambda match, v=values: v[match.group(1)], target["expr"])
                out.append((f"{name}: {panel['title']} [{target['refId']}]", expr))
    return out


def rule_queries() -> list[tuple[str, str]]:
    return [(f"rule {r['alert']}", r["expr"]) for g in rules()["groups"] for r in g["rules"]]


def wait_for_scrapes(prometheus, timeout_s: float = 180.0) -> None:
    """A few scrapes of each target: rate() needs two samples."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        health = {t["scrapeUrl"]: t["health"] for t in api(prometheus, "targets")["activeTargets"]}
        samples = api(prometheus, "query", query="count_over_time(up[1m])")["result"]
        if len(health) == 2 and samples and min(float(s["value"][1]) for s in samples) >= 5:
            break
        time.sleep(0.5)
    assert sorted(health.values()) == ["down", "up"], health


def wait_for_zero_counters(prometheus, instance: str, timeout_s: float = 180.0) -> None:
    """Until Prometheus holds a sample of the worker's alert counters, all still at zero."""
    query = f'modelwatch_alerts_total{{instance="{instance}"}}'
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = api(prometheus, "query", query=query)["result"]
        if result:
            assert all(float(s["value"][1]) == 0 for s in result), "traffic before the first scrape"
            return
        time.sleep(0.5)
    pytest.fail(f"prometheus never scraped the worker's alert counters ({instance})")


def assert_each_returns_data(prometheus, queries, timeout_s: float = 60.0) -> None:
    """Polls until every query has data: bounded by ``timeout_s``, never a fixed wait."""
    empty = dict(queries)
    deadline = time.monotonic() + timeout_s
    while empty and time.monotonic() < deadline:
        for where, expr in list(empty.items()):
            if api(prometheus, "query", query=expr)["result"]:  # a bad query fails in api()
                del empty[where]
        time.sleep(1)
    assert not empty, "no data for:\n" + "\n".join(f"{w}: {e}" for w, e in empty.items())


@pytest.mark.integration
def test_every_dashboard_expression_returns_data_from_a_real_worker(prometheus_on_worker,
                                                                   worker_targets):
    wait_for_scrapes(prometheus_on_worker)
    wait_for_zero_counters(prometheus_on_worker, worker_targets.up[0])
    worker_targets.feed()
    queries = dashboard_queries()
    n_targets = sum(len(p.get("targets", [])) for d in build_all().values() for p in d["panels"])
    assert len(queries) == n_targets  # none left out
    # The worker needs ~10 s to join and then judges the scenario; on a busy machine far
    # longer. The wait ends as soon as every panel has data.
    assert_each_returns_data(prometheus_on_worker, queries, timeout_s=300.0)


@pytest.mark.integration
def test_every_rule_expression_returns_data_on_staged_trouble(prometheus):
    """The rules watch for trouble a short test cannot cause for real (a backlog of
    50,000 records, an output queue overflowing): the staged target has it."""
    wait_for_scrapes(prometheus)
    assert_each_returns_data(prometheus, rule_queries())


@pytest.mark.integration
def test_alerting_rules_evaluate_and_fire(prometheus, targets):
    names = {r["alert"] for g in rules()["groups"] for r in g["rules"]}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        loaded = [r for g in api(prometheus, "rules")["groups"] for r in g["rules"]]
        active = {a["labels"]["alertname"] for a in api(prometheus, "alerts")["alerts"]}
        if len(loaded) == len(names) and active >= names:
            break
        time.sleep(1)
    assert {r["name"] for r in loaded} == names
    assert all(r["health"] == "ok" for r in loaded), [(r["name"], r.get("lastError"))
                                                      for r in loaded]
    assert active == names  # pending or firing: each staged trouble is noticed
    down = [a for a in api(prometheus, "alerts")["alerts"]
            if a["labels"]["alertname"] == "ModelwatchWorkerDown"]
    assert [a["labels"]["instance"] for a in down] == targets.down
