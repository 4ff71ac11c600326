"""``modelwatch tail`` against the real embedded broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from streams.records import partition_of
from streams.worker.broker import EmbeddedBroker
from tests.conftest import ROOT, run_cli

PARTITIONS = 8


@pytest.fixture
def broker():
    from kafka.admin import KafkaAdminClient, NewTopic

    with EmbeddedBroker() as running:
        admin = KafkaAdminClient(bootstrap_servers=running.address, request_timeout_ms=5000)
        admin.create_topics([NewTopic(t, num_partitions=PARTITIONS, replication_factor=1)
                             for t in ("inference-logs", "modelwatch-deadletter")])
        admin.close()
        yield running


def read_topic(broker, topic, want=None, timeout_s=10.0):
    """All records of a topic (until ``want`` events arrived, or quiet)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=broker.address, auto_offset_reset="earliest",
                             enable_auto_commit=False, consumer_timeout_ms=1500)
    consumer.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
    records, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        records += list(consumer)
        if want is None or sum(len(json.loads(r.value)) for r in records) >= want:
            break
    consumer.close()
    return records


def events(n, clients=20, start=0):
    return [{"ts": 1.79e9 + start + i, "model": "m", "client_id": f"c{(start + i) % clients}",
             "prediction": 1, "features": [float(i), 1.0], "request_id": f"r{start + i}"}
            for i in range(n)]


def write(path, records, mode="w"):
    with open(path, mode) as out:
        for r in records:
            out.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def tail_once(broker, path, checkpoint):
    done = run_cli("tail", path, "--once", "--broker", broker.url, "--checkpoint", checkpoint)
    assert done.returncode == 0, done.stderr
    return done


def shipped_ids(broker, want: int, timeout_s: float) -> set[str]:
    """Request ids of the events tail put on the inference topic (array records opened)."""
    return {e["request_id"] for r in read_topic(broker, "inference-logs", want=want,
                                                timeout_s=timeout_s)
            for e in json.loads(r.value)}


def test_ships_batches_to_each_clients_partition_and_dead_letters_bad_lines(broker, tmp_path):
    log = tmp_path / "log.jsonl"
    write(log, events(150) + ["{broken", json.dumps({"ts": 1, "model": "m"})] + events(150, start=150))
    done = tail_once(broker, log, tmp_path / "cp.json")
    assert "300 events shipped, 2 bad lines" in done.stderr
    records = read_topic(broker, "inference-logs", want=300)
    shipped = [(r.partition, e) for r in records for e in json.loads(r.value)]
    assert len(shipped) == 300 and len(records) < 300  # batched: arrays, not one per event
    assert all(p == partition_of(e["client_id"], PARTITIONS) for p, e in shipped)
    dead = read_topic(broker, "modelwatch-deadletter", want=None, timeout_s=3)
    lines = sorted(dict(r.headers)["line"] for r in dead)
    assert lines == [b"151", b"152"] and dead[0].value in (b"{broken", b'{"ts": 1, "model": "m"}')


def test_restart_resumes_after_the_last_acknowledged_line(broker, tmp_path):
    log, checkpoint = tmp_path / "log.jsonl", tmp_path / "cp.json"
    write(log, events(100))
    tail_once(broker, log, checkpoint)
    assert "0 events shipped" in tail_once(broker, log, checkpoint).stderr
    write(log, events(25, start=100), mode="a")
    assert "25 events shipped" in tail_once(broker, log, checkpoint).stderr
    ids = [e["request_id"] for r in read_topic(broker, "inference-logs", want=125)
           for e in json.loads(r.value)]
    assert sorted(ids) == sorted(f"r{i}" for i in range(125))


def test_follows_growth_rotation_and_truncation(broker, tmp_path):
    log = tmp_path / "log.jsonl"
    write(log, events(40))
    follower = subprocess.Popen(
        [sys.executable, "-m", "streams.cli", "tail", str(log), "--broker", broker.url,
         "--checkpoint", str(tmp_path / "cp.json"), "--linger-ms", "50"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(1.5)
        write(log, events(20, start=40), mode="a")            # grows
        time.sleep(1.0)
        os.rename(log, tmp_path / "log.jsonl.1")              # rotated
        write(log, events(30, start=60))
        time.sleep(1.5)
        write(log, events(10, start=90), mode="w")            # truncated and rewritten
        ids = shipped_ids(broker, want=100, timeout_s=15)
    finally:
        follower.terminate()
        follower.wait(timeout=10)
    assert ids == {f"r{i}" for i in range(100)}


def test_waits_for_a_broker_that_is_not_up_yet(tmp_path):
    from kafka.admin import KafkaAdminClient, NewTopic

    from streams.worker.broker import free_port

    port = free_port()
    log = tmp_path / "log.jsonl"
    write(log, events(30))
    follower = subprocess.Popen(
        [sys.executable, "-m", "streams.cli", "tail", str(log), "--once",
         "--broker", f"kafka://127.0.0.1:{port}", "--checkpoint", str(tmp_path / "cp.json")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2.0)
        assert follower.poll() is None, follower.stderr.read()
        with EmbeddedBroker(port=port) as late:
            admin = KafkaAdminClient(bootstrap_servers=late.address, request_timeout_ms=5000)
            admin.create_topics([NewTopic("inference-logs", num_partitions=PARTITIONS,
                                          replication_factor=1)])
            admin.close()
            _, err = follower.communicate(timeout=60)
            assert follower.returncode == 0, err
            assert "30 events shipped" in err  # kafka-python blocks on metadata meanwhile
            shipped = [e for r in read_topic(late, "inference-logs", want=30)
                       for e in json.loads(r.value)]
    finally:
        if follower.poll() is None:
            follower.kill()
    assert len(shipped) == 30


def test_array_lines_ship_their_events_one_by_one(broker, tmp_path):
    log = tmp_path / "log.jsonl"
    write(log, [json.dumps(events(1)), json.dumps(events(3, start=1))])  # one- and three-element arrays
    assert "4 events shipped" in tail_once(broker, log, tmp_path / "cp.json").stderr
    shipped = [e for r in read_topic(broker, "inference-logs", want=4) for e in json.loads(r.value)]
    assert sorted(e["request_id"] for e in shipped) == ["r0", "r1", "r2", "r3"]


def test_waits_for_a_log_that_is_not_there_yet(broker, tmp_path):
    """As in the compose stack, where tail may start before the serving app's first line."""
    log = tmp_path / "later.jsonl"
    follower = subprocess.Popen(
        [sys.executable, "-m", "streams.cli", "tail", str(log), "--broker", broker.url,
         "--checkpoint", str(tmp_path / "cp.json"), "--linger-ms", "50"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        said = [follower.stderr.readline() for _ in range(1)]  # it says so, and keeps running
        while "waiting" not in said[-1] and said[-1] and len(said) < 20:
            said.append(follower.stderr.readline())
        assert "no such file yet; waiting" in said[-1] and str(log) in said[-1], said
        assert follower.poll() is None
        write(log, events(15))
        ids = shipped_ids(broker, want=15, timeout_s=60)
    finally:
        follower.terminate()
        follower.wait(timeout=30)
    assert ids == {f"r{i}" for i in range(15)}


def test_once_on_a_missing_log_is_one_clear_error(tmp_path):
    done = run_cli("tail", tmp_path / "nope.jsonl", "--once", "--broker", "kafka://127.0.0.1:9",
                   "--checkpoint", tmp_path / "cp.json")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    [line] = done.stderr.strip().splitlines()
    assert "nope.jsonl" in line and "no such file" in line


def test_default_checkpoint_is_in_the_state_dir_named_after_the_log(tmp_path):
    import argparse

    from streams.cli.main import tail_checkpoint
    from streams.settings import resolve

    settings = resolve(argparse.Namespace(state_dir=str(tmp_path)), environ={})
    a, b = tail_checkpoint(settings, "/logs/a.jsonl"), tail_checkpoint(settings, "/other/a.jsonl")
    assert a.parent == tmp_path and a.name.startswith("tail-a.jsonl-") and a != b
