"""``modelwatch alerts forward`` against the real embedded broker."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import time
from collections import Counter

import pytest

from streams.cli.forward import add_forward_parser, forward
from streams.settings import add_arguments, resolve
from streams.sinks import open_sink
from streams.tabular import UserError
from streams.worker.broker import EmbeddedBroker
from tests.test_sinks import Receiver, alert

TOPIC = "security-alerts"
ROUNDS, PER_ROUND = 3, 12


def forward_cli(*argv) -> int:
    parser = argparse.ArgumentParser()
    add_forward_parser(parser.add_subparsers())
    args = parser.parse_args(["alerts", "forward", *map(str, argv)])
    return args.func(args)


@pytest.fixture(scope="module")
def published():
    """Alerts on a 3-partition topic, keyed by event.id, sent in rounds (several
    records per batch, where the broker's end_offsets falls short)."""
    from kafka import KafkaProducer
    from kafka.admin import KafkaAdminClient, NewTopic

    with EmbeddedBroker() as broker:
        admin = KafkaAdminClient(bootstrap_servers=broker.address, request_timeout_ms=5000)
        admin.create_topics([NewTopic(TOPIC, num_partitions=3, replication_factor=1)])
        admin.close()
        producer = KafkaProducer(bootstrap_servers=broker.address, acks="all", linger_ms=20)
        records, cut_ms = [], None  # (partition, offset, alert)
        for round_ in range(ROUNDS):
            if round_ == ROUNDS - 1:
                time.sleep(0.05)
                cut_ms = int(time.time() * 1000)
                time.sleep(0.05)
            sent = [(doc, producer.send(TOPIC, key=doc["event"]["id"].encode(),
                                        value=json.dumps(doc).encode()))
                    for doc in (alert(round_ * PER_ROUND + i) for i in range(PER_ROUND))]
            producer.flush()
            for doc, future in sent:
                meta = future.get(timeout=10)
                records.append((meta.partition, meta.offset, doc))
        producer.close()
        assert len({p for p, _, _ in records}) > 1
        yield broker, records, cut_ms


def ids(docs) -> Counter:
    return Counter(doc["event"]["id"] for doc in docs)


def test_forward_to_a_file_sends_every_alert_once(published, tmp_path):
    broker, records, _ = published
    out = tmp_path / "out.jsonl"
    assert forward_cli("--sink", f"file://{out}", "--to-end", "--broker", broker.url) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert ids(got) == ids(doc for _, _, doc in records)
    assert max(ids(got).values()) == 1
    assert sorted(got, key=lambda d: d["event"]["id"]) == \
        sorted((doc for _, _, doc in records), key=lambda d: d["event"]["id"])


def test_forward_from_offset(published, tmp_path):
    broker, records, _ = published
    out = tmp_path / "out.jsonl"
    assert forward_cli("--sink", f"file://{out}", "--to-end", "--from-offset", 5,
                       "--broker", broker.url) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    expected = [doc for _, offset, doc in records if offset >= 5]
    assert expected and ids(got) == ids(expected)


def test_forward_from_an_offset_past_the_end_sends_nothing(published, tmp_path):
    broker, _, _ = published
    out = tmp_path / "out.jsonl"
    assert forward_cli("--sink", f"file://{out}", "--to-end", "--from-offset", 10_000,
                       "--broker", broker.url) == 0
    assert not out.exists() or out.read_text() == ""


def test_forward_from_time(published, tmp_path):
    broker, records, cut_ms = published
    out = tmp_path / "out.jsonl"
    from streams.records import format_ts

    assert forward_cli("--sink", f"file://{out}", "--to-end", "--from-time",
                       format_ts(cut_ms / 1000), "--broker", broker.url) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert ids(got) == ids(doc for _, _, doc in records[-PER_ROUND:])


def test_forward_to_a_signed_webhook(published, monkeypatch):
    broker, records, _ = published
    monkeypatch.setenv("MW_TEST_FORWARD_SECRET", "k")
    with Receiver() as receiver:
        assert forward_cli("--sink", f"webhook+http://127.0.0.1:{receiver.port}/in"
                           "?secret_env=MW_TEST_FORWARD_SECRET", "--to-end",
                           "--broker", broker.url) == 0
    got = [json.loads(body) for _, _, body in receiver.requests]
    assert ids(got) == ids(doc for _, _, doc in records) and max(ids(got).values()) == 1
    for _, headers, body in receiver.requests:
        assert headers["X-Modelwatch-Signature"] == \
            "sha256=" + hmac.new(b"k", body, hashlib.sha256).hexdigest()


def test_forward_without_to_end_follows_new_alerts(published, tmp_path):
    from kafka import KafkaProducer
    from kafka.admin import KafkaAdminClient, NewTopic

    from tests.test_sinks import wait_until

    broker, _, _ = published
    admin = KafkaAdminClient(bootstrap_servers=broker.address, request_timeout_ms=5000)
    admin.create_topics([NewTopic("follow-alerts", num_partitions=2, replication_factor=1)])
    admin.close()
    settings = resolve(settings_parser().parse_args(
        ["--broker", broker.url, "--topic-alerts", "follow-alerts"]), {})
    out = tmp_path / "out.jsonl"

    def lines() -> list[dict]:
        return [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []

    def publish(doc) -> None:
        producer = KafkaProducer(bootstrap_servers=broker.address, acks="all")
        producer.send("follow-alerts", key=doc["event"]["id"].encode(),
                      value=json.dumps(doc).encode()).get(timeout=10)
        producer.close()

    async def main():
        publish(alert(500))
        following = asyncio.create_task(forward(settings, open_sink(f"file://{out}"),
                                                to_end=False))
        await wait_until(lambda: len(lines()) == 1, 10)
        await asyncio.to_thread(publish, alert(501))
        await wait_until(lambda: len(lines()) == 2, 10)
        assert not following.done()
        following.cancel()
        await asyncio.gather(following, return_exceptions=True)

    asyncio.run(main())
    assert ids(lines()) == ids([alert(500), alert(501)])


def settings_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser


def test_forward_gives_up_on_a_refusing_sink_and_says_where_to_resume(published):
    broker, _, _ = published
    settings = resolve(settings_parser().parse_args(["--broker", broker.url]), {})
    with Receiver(status=500) as receiver:
        sink = open_sink(f"webhook+http://127.0.0.1:{receiver.port}/in")
        with pytest.raises(UserError, match=r"HTTP 500.*resume with --from-offset 0"):
            asyncio.run(forward(settings, sink, delivery_attempts=2))
    assert len(receiver.requests) == 2


@pytest.mark.parametrize(("argv", "message"), [
    (("--topic-alerts", "no-such-topic"), "no topic 'no-such-topic'"),
    (("--from-time", "yesterday"), "--from-time: not an RFC 3339 time"),
    (("--from-offset", "-1"), "--from-offset -1: expected 0 or more"),
])
def test_forward_mistakes_are_one_clear_line(published, tmp_path, argv, message):
    broker, _, _ = published
    with pytest.raises(UserError, match=message):
        forward_cli("--sink", f"file://{tmp_path}/o.jsonl", "--to-end", "--broker", broker.url,
                    *argv)


def test_forward_needs_a_broker(tmp_path, monkeypatch):
    monkeypatch.delenv("MODELWATCH_BROKER", raising=False)
    with pytest.raises(UserError, match="needs --broker"):
        forward_cli("--sink", f"file://{tmp_path}/o.jsonl")
