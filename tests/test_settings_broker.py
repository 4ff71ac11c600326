"""Shared settings (flags and MODELWATCH_* variables) and the embedded broker."""

from __future__ import annotations

import argparse
import socket
import time

import pytest

from streams.settings import SETTINGS, add_arguments, resolve
from streams.tabular import UserError
from streams.worker.broker import EmbeddedBroker


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


def test_stats_kafka_sends_the_event_keyed_by_dataset(tmp_path, digits):
    import json

    import numpy as np
    from kafka import KafkaConsumer, TopicPartition

    from detectors.profile import build_profile
    from streams.files import write_profile
    from tests.conftest import run_cli
    from tests.test_cli import write_csv

    profile = tmp_path / "p.json"
    write_profile(build_profile(digits.X_train, digits.y_train, digits.names, model="digits",
                                dataset="digits-train"), profile)
    batch = write_csv(tmp_path / "b.csv", digits.names, digits.X_pool[:100], np.zeros(100, int))
    with EmbeddedBroker() as broker:
        done = run_cli("stats", "--profile", profile, "--dataset", "digits-train", "--source", "s",
                       "--batch-id", "b7", "--kafka", "--broker", broker.url, batch)
        assert done.returncode == 0, done.stderr
        assert done.stdout == "" and "training-stats[" in done.stderr
        partition = int(done.stderr.split("training-stats[")[1].split("]")[0])
        consumer = KafkaConsumer(bootstrap_servers=broker.address, consumer_timeout_ms=5000,
                                 auto_offset_reset="earliest", enable_auto_commit=False)
        consumer.assign([TopicPartition("training-stats", partition)])
        [record] = [next(iter(consumer))]
        consumer.close()
    assert record.key == b"digits-train"
    assert json.loads(record.value)["batch_id"] == "b7"


def test_stats_kafka_without_a_broker_is_one_clear_error(tmp_path):
    from tests.conftest import run_cli

    done = run_cli("stats", "--profile", tmp_path / "p.json", "--dataset", "d", "--source", "s",
                   "--batch-id", "b", "--kafka", tmp_path / "b.csv")
    assert done.returncode == 2 and "--kafka needs --broker" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_run_gives_children_their_sasl_password_in_the_environment_not_the_argv():
    from dataclasses import fields

    from streams.cli.run import _child_env, _child_settings
    from streams.settings import Settings

    values = {f.name: None for f in fields(Settings)}
    settings = Settings(**values | {"sasl_mechanism": "PLAIN", "sasl_username": "mw",
                                    "sasl_password": "s3cret"})
    for command in ("worker", "tail"):
        argv = _child_settings(settings, command)
        assert "s3cret" not in argv and "--sasl-password" not in argv
        assert "--sasl-username" in argv  # not a secret: still a flag
        assert _child_env(settings, command)["MODELWATCH_SASL_PASSWORD"] == "s3cret"
