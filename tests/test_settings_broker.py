"""Shared settings (flags and MODELWATCH_* variables) and the embedded broker."""

from __future__ import annotations

import argparse
import socket
import time

import pytest

from streams.broker import EmbeddedBroker
from streams.settings import SETTINGS, add_arguments, resolve
from streams.tabular import UserError


def parse(*argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_every_setting_has_a_field():
    from dataclasses import fields

    from streams.settings import Settings

    assert [f.name for f in fields(Settings)] == [s.name for s in SETTINGS]


def test_flag_wins_over_environment_which_wins_over_default():
    env = {"MODELWATCH_TOPIC_ALERTS": "from-env", "MODELWATCH_METRICS_PORT": "9200"}
    settings = resolve(parse("--topic-alerts", "from-flag"), env)
    assert settings.topic_alerts == "from-flag"
    assert settings.metrics_port == 9200
    assert settings.topic_inference == "inference-logs"


@pytest.mark.parametrize(("argv", "env", "message"), [
    ((), {"MODELWATCH_TOPIC_ALERT": "x"}, "MODELWATCH_TOPIC_ALERT is not a modelwatch setting"),
    (("--metrics-port", "70000"), {}, "--metrics-port: '70000'"),
    ((), {"MODELWATCH_BROKER": "localhost:9092"}, "MODELWATCH_BROKER: 'localhost:9092'"),
    (("--sasl-mechanism", "GSSAPI"), {}, "expected one of PLAIN"),
    (("--tls-cert", "c.pem"), {}, "--tls-cert and --tls-key go together"),
])
def test_bad_settings_are_one_clear_error(argv, env, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        resolve(parse(*argv), env)


def test_help_names_every_environment_variable():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    text = parser.format_help()
    assert all(s.env in text for s in SETTINGS)


def test_embedded_broker_serves_kafka_and_stops_cleanly():
    from kafka import KafkaProducer
    from kafka.admin import KafkaAdminClient, NewTopic

    with EmbeddedBroker() as broker:
        admin = KafkaAdminClient(bootstrap_servers=broker.address, request_timeout_ms=5000)
        admin.create_topics([NewTopic("inference-logs", num_partitions=8, replication_factor=1)])
        assert "inference-logs" in admin.list_topics()
        admin.close()
        producer = KafkaProducer(bootstrap_servers=broker.address, acks="all")
        sent = producer.send("inference-logs", key=b"c1", value=b"{}").get(timeout=10)
        producer.close()
        assert sent.topic == "inference-logs" and 0 <= sent.partition < 8
        pid, port = broker.process.pid, broker.port
    assert broker.process.poll() is not None, "broker still running after exit"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the port is free again
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) != 0:
                break
        time.sleep(0.05)
    else:
        pytest.fail(f"port {port} of broker {pid} still accepts connections")
