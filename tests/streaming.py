"""Helpers for integration tests against the embedded broker: topics, workers, reading topics."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tests.conftest import ROOT

TOPICS = ("inference-logs", "training-stats", "security-alerts", "modelwatch-deadletter")
PARTITIONS = 8


def create_topics(broker) -> None:
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=broker.address, request_timeout_ms=5000)
    admin.create_topics([NewTopic(t, num_partitions=PARTITIONS, replication_factor=1)
                         for t in TOPICS])
    admin.close()


def start_worker(broker, profiles: Path, state_dir: Path, log: Path,
                 *flags: str) -> subprocess.Popen:
    """A worker in its own process group (so kill -9 takes all of it)."""
    flags = flags or ("--metrics-port", "0")
    return subprocess.Popen(
        [sys.executable, "-m", "streams.cli", "worker", "--broker", broker.url,
         "--profiles", str(profiles), "--state-dir", str(state_dir), *flags],
        cwd=ROOT, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})


def kill9(worker: subprocess.Popen) -> None:
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait(timeout=10)


def stop(worker: subprocess.Popen) -> None:
    if worker.poll() is None:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            kill9(worker)


def terminate(process: subprocess.Popen, timeout_s: float = 20.0) -> None:
    """SIGTERM, then SIGKILL if it has not ended in time."""
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def send_records(broker, records) -> None:
    """(topic, key, value) records, each acknowledged by the broker."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=broker.address, acks="all")
    for topic, key, value in records:
        producer.send(topic, key=key, value=value)
    producer.flush()
    producer.close()


def send_stats(broker, stats: Path) -> None:
    send_records(broker, [("training-stats", json.loads(line)["dataset"].encode(), line)
                          for line in stats.read_bytes().splitlines()])


def read_topic(broker, topic: str, partitions: int = PARTITIONS) -> list:
    """Every record of a topic, read to the end without a consumer group."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=broker.address, enable_auto_commit=False,
                             auto_offset_reset="earliest", consumer_timeout_ms=1500)
    consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
    records = list(consumer)
    consumer.close()
    return records


def wait_for_alerts(broker, until, timeout_s: float = 120.0) -> list[dict]:
    """Alerts on the alerts topic, read until ``until(alerts)`` holds or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        alerts = [json.loads(r.value) for r in read_topic(broker, "security-alerts")]
        if until(alerts) or time.monotonic() > deadline:
            return alerts
        time.sleep(0.5)


def latest_states(broker, table: str, cls) -> dict:
    """The last value of every key in a table's changelog, decoded."""
    from detectors.state import loads
    from streams.app import _APPLIED

    latest = {r.key.decode(): r.value for r in read_topic(broker, f"modelwatch-{table}-changelog")}
    return {k: loads(cls, v[_APPLIED.size:]) for k, v in latest.items() if v is not None}


def state_differences(a, b) -> list[str]:
    """Fields where two detector states differ: counts exactly, float64 to 1e-9 relative,
    float32 distances to 1e-4 (they come from ‖a‖² + ‖b‖² − 2a·b in float32 blocks,
    and a batch cut differently rounds them differently: seen up to 1.6e-5)."""
    out = []
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray):
            rtol, atol = (1e-4, 1e-4) if x.dtype == np.float32 else (1e-9, 1e-12)
            same = x.shape == y.shape and (
                np.allclose(x, y, rtol=rtol, atol=atol, equal_nan=True)
                if x.dtype.kind == "f" else np.array_equal(x, y))
        elif isinstance(x, float):
            same = (np.isnan(x) and np.isnan(y)) or np.isclose(x, y, rtol=1e-9)
        else:
            same = x == y
        if not same:
            out.append(f.name)
    return out
