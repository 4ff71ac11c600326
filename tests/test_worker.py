"""The Faust worker against the real embedded broker: same alerts as replay."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from detectors.config import load_thresholds
from streams.broker import EmbeddedBroker
from streams.files import load_profile
from streams.replay import replay
from tests.conftest import ROOT, run_cli
from tests.streaming import terminate

TOPICS = ("inference-logs", "training-stats", "security-alerts", "modelwatch-deadletter")


def test_worker_alerts_equal_replay_alerts(demo, tmp_path):
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.admin import KafkaAdminClient, NewTopic

    folder, paths = demo
    expected = replay([load_profile(paths["profile"])], load_thresholds(),
                      inference_log=paths["inference.jsonl"], training_stats=paths["stats"],
                      deadletter=None)
    expected_ids = {a.event.id for a in expected.alerts}
    assert {a.rule.category for a in expected.alerts} == {"extraction", "adversarial", "poisoning"}

    with EmbeddedBroker() as broker:
        admin = KafkaAdminClient(bootstrap_servers=broker.address, request_timeout_ms=5000)
        admin.create_topics([NewTopic(t, num_partitions=8, replication_factor=1) for t in TOPICS])
        admin.close()
        worker = subprocess.Popen(
            [sys.executable, "-m", "streams.cli", "worker", "--broker", broker.url,
             "--profiles", str(folder / "profiles"), "--state-dir", str(tmp_path / "state")],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            shipped = run_cli("tail", paths["inference.jsonl"], "--once", "--broker", broker.url,
                              "--checkpoint", tmp_path / "cp.json")
            assert shipped.returncode == 0, shipped.stderr
            producer = KafkaProducer(bootstrap_servers=broker.address, acks="all")
            for line in paths["stats"].read_bytes().splitlines():
                producer.send("training-stats", key=json.loads(line)["dataset"].encode(), value=line)
            producer.flush()
            producer.close()
            consumer = KafkaConsumer(bootstrap_servers=broker.address, enable_auto_commit=False,
                                     auto_offset_reset="earliest", consumer_timeout_ms=1000)
            consumer.assign([TopicPartition("security-alerts", p) for p in range(8)])
            got, deadline = [], time.monotonic() + 90
            while time.monotonic() < deadline and len(got) < len(expected_ids):
                got += [json.loads(r.value) for r in consumer]
            consumer.close()
            assert worker.poll() is None, worker.stdout.read()
        finally:
            terminate(worker)
    assert {a["event"]["id"] for a in got} == expected_ids
    assert all(a["event"]["id"].encode() for a in got)
