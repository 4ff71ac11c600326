"""``modelwatch run``: everything on one machine.

With no broker configured it starts the embedded one, creates the topics, starts
the worker (and ``tail`` on ``--log``), and prints each alert as it fires. Ctrl-C
or SIGTERM stops everything it started, children first, then the broker.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from contextlib import ExitStack, suppress
from pathlib import Path

from streams.alerts import alert_line
from streams.broker import EmbeddedBroker
from streams.settings import Settings
from streams.tabular import UserError

PARTITIONS = 8


def create_topics(address: str, settings: Settings) -> None:
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=address, request_timeout_ms=10_000)
    try:
        for topic in (settings.topic_inference, settings.topic_stats, settings.topic_alerts,
                      settings.topic_deadletter):
            with suppress(TopicAlreadyExistsError):
                admin.create_topics([NewTopic(topic, num_partitions=PARTITIONS,
                                              replication_factor=1)])
    finally:
        admin.close()


def _broker_with_topics(stack: ExitStack, settings: Settings) -> tuple[str, str]:
    """The configured broker, or the embedded one (stopped with ``stack``); topics created."""
    if settings.broker is None:
        broker = stack.enter_context(EmbeddedBroker())
        address, url = broker.address, broker.url
    else:
        url = settings.broker
        address = url.removeprefix("kafka://").split(",")[0]
    create_topics(address, settings)
    return address, url


def _stop_on_sigterm() -> None:
    def stop(*_):
        raise KeyboardInterrupt  # unwinds like Ctrl-C: children, then the broker

    signal.signal(signal.SIGTERM, stop)


def run(settings: Settings, log: Path | None, settings_argv: list[str]) -> int:
    _stop_on_sigterm()
    with ExitStack() as stack:
        address, url = _broker_with_topics(stack, settings)
        print(f"run: broker {url}; alerts below (Ctrl-C stops everything)", flush=True)
        base = [sys.executable, "-m", "streams.cli"]
        children = [subprocess.Popen([*base, "worker", "--broker", url, *settings_argv],
                                     stdout=subprocess.DEVNULL)]  # Faust's spinner
        if log is not None:
            children.append(subprocess.Popen([*base, "tail", str(log), "--broker", url,
                                              *settings_argv]))
        stack.callback(_stop_children, children)
        _print_alerts(address, settings.topic_alerts, children)
    return 0


def _print_alerts(address: str, topic: str, children: list[subprocess.Popen],
                  until=lambda alerts: False, idle_s: float | None = None) -> list[dict]:
    """Print alerts as they arrive; stop when ``until(alerts)`` or after ``idle_s`` quiet."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=address, auto_offset_reset="earliest",
                             enable_auto_commit=False, consumer_timeout_ms=500)
    consumer.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
    alerts, last = [], time.monotonic()
    try:
        while not until(alerts) and (idle_s is None or time.monotonic() - last < idle_s):
            for record in consumer:
                alerts.append(json.loads(record.value))
                print(alert_line(alerts[-1]), flush=True)
                last = time.monotonic()
            for child in children:
                if child.poll() not in (None, 0):
                    raise UserError(f"run: {' '.join(child.args[3:5])} exited with "
                                    f"status {child.returncode}")
            time.sleep(0.1)
    finally:
        consumer.close()
    return alerts


def run_demo(settings: Settings, settings_argv: list[str]) -> int:
    """The built-in scenario through the streaming stack; exits once it is played."""
    import tempfile

    from kafka import KafkaProducer

    from streams.demo import GENERATING, expected_detections, prepare, summary

    _stop_on_sigterm()
    with tempfile.TemporaryDirectory(prefix="modelwatch-demo-") as tmp, ExitStack() as stack:
        folder = Path(tmp)
        print(GENERATING, file=sys.stderr)
        paths = prepare(folder)
        (folder / "profiles").mkdir()
        (folder / "profiles" / "demo.json").write_bytes(paths["profile"].read_bytes())
        truth = json.loads(paths["truth.json"].read_text())
        address, url = _broker_with_topics(stack, settings)
        print(f"modelwatch demo: broker {url}; starting the worker and shipping the log...",
              file=sys.stderr, flush=True)
        base = [sys.executable, "-m", "streams.cli"]
        common = [*settings_argv, "--profiles", str(folder / "profiles"),
                  "--state-dir", str(folder / "state")]
        children = [subprocess.Popen([*base, "worker", "--broker", url, *common],
                                     stdout=subprocess.DEVNULL)]  # Faust's spinner
        stack.callback(_stop_children, children)
        subprocess.run([*base, "tail", str(paths["inference.jsonl"]), "--once", "--broker", url,
                        *common], check=True, stderr=subprocess.DEVNULL)
        producer = KafkaProducer(bootstrap_servers=address, acks="all")
        for line in paths["stats"].read_bytes().splitlines():
            producer.send(settings.topic_stats, key=json.loads(line)["dataset"].encode(), value=line)
        producer.flush()
        producer.close()
        wanted = expected_detections(truth)

        def all_caught(alerts):
            seen = {a["modelwatch"].get("client_id") for a in alerts}
            return wanted <= seen | {a["modelwatch"].get("batch_id") for a in alerts}

        alerts = _print_alerts(address, settings.topic_alerts, children, until=all_caught,
                               idle_s=DEMO_IDLE_S)
        caught = {a["modelwatch"].get("client_id") for a in alerts} | {
            a["modelwatch"].get("batch_id") for a in alerts}
        n_events = sum(1 for _ in paths["inference.jsonl"].open("rb"))
        print(summary(truth, caught, n_events, len(truth["batches"]), len(alerts)))
    return 0


DEMO_IDLE_S = 45.0  # the demo ends this long after its last alert if an attack goes unseen


def _stop_children(children: list[subprocess.Popen]) -> None:
    for child in children:
        if child.poll() is None:
            child.terminate()
    for child in children:
        try:
            child.wait(timeout=20)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
