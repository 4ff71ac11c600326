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

from streams.broker import EmbeddedBroker
from streams.settings import Settings
from streams.tabular import UserError

PARTITIONS = 8


def alert_summary(alert: dict) -> str:
    """Time, detector, client or batch, score: one readable line."""
    mw = alert["modelwatch"]
    who = f"client {mw['client_id']}" if mw.get("client_id") else f"batch {mw['batch_id']}"
    return (f"{alert['@timestamp']}  {alert['rule']['name']:<34} {who:<36} "
            f"score {mw['score']:.3g} (threshold {mw['threshold']:.3g})")


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


def run(settings: Settings, log: Path | None, settings_argv: list[str]) -> int:
    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    with ExitStack() as stack:
        if settings.broker is None:
            broker = stack.enter_context(EmbeddedBroker())
            address, url = broker.address, broker.url
        else:
            url = settings.broker
            address = url.removeprefix("kafka://").split(",")[0]
        create_topics(address, settings)
        print(f"run: broker {url}; alerts below (Ctrl-C stops everything)", flush=True)
        base = [sys.executable, "-m", "streams.cli"]
        children = [subprocess.Popen([*base, "worker", "--broker", url, *settings_argv])]
        if log is not None:
            children.append(subprocess.Popen([*base, "tail", str(log), "--broker", url,
                                              *settings_argv]))
        stack.callback(_stop_children, children)
        _print_alerts(address, settings.topic_alerts, children)
    return 0


def _print_alerts(address: str, topic: str, children: list[subprocess.Popen]) -> None:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=address, auto_offset_reset="earliest",
                             enable_auto_commit=False, consumer_timeout_ms=500)
    consumer.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
    try:
        while True:
            for record in consumer:
                print(alert_summary(json.loads(record.value)), flush=True)
            for child in children:
                if child.poll() not in (None, 0):
                    raise UserError(f"run: {' '.join(child.args[3:5])} exited with "
                                    f"status {child.returncode}")
            time.sleep(0.1)
    finally:
        consumer.close()


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
