"""No record can hurt the worker (issue 11, item 1), against the real embedded broker.

Every bad shape, alone and as an array element, mixed into the demo's good traffic in
one run: each goes to the dead-letter topic once, with its reason and a deterministic
id, and the good records give exactly replay's alerts on the clean files. An agent
that fails anyway stops the worker, non-zero, without committing what it did not judge.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from streams.records import MAX_RECORD_BYTES, dead_letter_id, partition_of
from streams.worker.broker import EmbeddedBroker
from streams.worker.decode import DEAD_LETTER_VALUE_MAX
from tests.conftest import ROOT
from tests.streaming import PARTITIONS, create_topics, read_topic, start_worker, stop

pytestmark = pytest.mark.integration

INFERENCE, STATS, DEAD = "inference-logs", "training-stats", "modelwatch-deadletter"
GOOD = {"ts": "2026-11-21T09:00:00.000Z", "model": "digits-mlp", "client_id": "bad-actor",
        "prediction": 1}


def event_with(extra: bytes, base: dict = GOOD) -> bytes:
    return json.dumps(base).encode()[:-1] + b", " + extra + b"}"


# Bad inference records: each one dead letter (a JSON array of two numbers: two).
BAD_INFERENCE = {
    "tombstone": None,
    "empty": b"",
    "not JSON": b"hello",
    "invalid UTF-8 in an unknown key": event_with(b'"zz\xff": 1'),
    "invalid UTF-8 deep in an unknown value": event_with(b'"x": {"k": ["a\xfe"]}'),
    "invalid UTF-8 in a known field": event_with(b'"request_id": "a\xffb"'),
    "lone surrogate escape": event_with(b'"request_id": "\\ud800"'),
    "float overflow": event_with(b'"latency_ms": 1e400'),
    "integer overflow in features": event_with(b'"features": [1' + b"0" * 400 + b"]"),
    "integer overflow in the label": json.dumps({**GOOD, "prediction": 0}).encode()
    .replace(b'"prediction": 0', b'"prediction": 1' + b"0" * 400),
    "deep nesting": event_with(b'"x": ' + b"[" * 100_000 + b"]" * 100_000),
    "deep objects": event_with(b'"x": ' + b'{"a": ' * 2_000 + b"1" + b"}" * 2_000),
    "a number": b"5",
    "a string": b'"text"',
    "an empty object": b"{}",
    "wrong type": json.dumps({**GOOD, "client_id": 7}).encode(),
    "missing field": json.dumps({k: v for k, v in GOOD.items() if k != "model"}).encode(),
    "bad time": json.dumps({**GOOD, "ts": "yesterday"}).encode(),
    "feature count of a profiled model": json.dumps({**GOOD, "features": [1.0, 2.0]}).encode(),
    "huge request id": json.dumps({**GOOD, "request_id": "r" * 5000}).encode(),
    "over 1 MiB": event_with(b'"pad": "' + b"x" * MAX_RECORD_BYTES + b'"'),
    "under 1 MiB, too big to forward whole": json.dumps(
        {k: v for k, v in GOOD.items() if k != "client_id"} | {"pad": "x" * 1_000_000}).encode(),
}
ARRAY_ONLY = {"two numbers": b"[1, 2]"}
STATS_GOOD = {"ts": "2026-11-21T09:00:00Z", "dataset": "digits", "batch_id": "b", "source": "s",
              "n": 5, "features": {"px0": {"count": 5}}, "labels": {"0": 5}}
BAD_STATS = {
    "tombstone": None,
    "not JSON": b"{",
    "count of 10^400": json.dumps(STATS_GOOD).encode().replace(b'"count": 5',
                                                               b'"count": 1' + b"0" * 400),
    "n of 10^400": json.dumps(STATS_GOOD).encode().replace(b'"n": 5', b'"n": 1' + b"0" * 400),
    "mean 1e400": json.dumps(STATS_GOOD).encode().replace(b'"count": 5',
                                                          b'"count": 5, "mean": 1e400'),
    "invalid UTF-8 in a feature name": json.dumps(STATS_GOOD).encode().replace(b"px0",
                                                                               b"px\xff"),
    "deep nesting": json.dumps(STATS_GOOD).encode()[:-1] + b', "x": '
    + b"[" * 50_000 + b"]" * 50_000 + b"}",
}


@dataclass
class Sent:
    topic: str
    partition: int
    key: bytes | None
    value: bytes | None
    bad: list  # (element index or None, what it is) of each expected dead letter
    offset: int = -1
    fuzzed: bool = False  # a mutant (maybe valid), not a record of the clean traffic


def good_records(paths, rng: random.Random) -> list[Sent]:
    """The demo's events in file order, each partition's run cut now and then into
    arrays (of consecutive events of one partition, so its order is the file's), a
    few with bad elements among the good ones."""
    lines = paths["inference.jsonl"].read_bytes().splitlines()
    out: list[Sent] = []
    open_arrays: dict[int, list] = {}
    shapes = [(n, v) for n, v in BAD_INFERENCE.items()
              if v and v[:1] == b"{" and len(v) < 200_000]
    for line in lines:
        client = json.loads(line)["client_id"]
        p = partition_of(client, PARTITIONS)
        if p in open_arrays:
            open_arrays[p].append(line)
            if len(open_arrays[p]) >= 6:
                elements = open_arrays.pop(p)
                bad = []
                if shapes and rng.random() < 0.7:
                    name, value = shapes.pop(rng.randrange(len(shapes)))
                    at = rng.randrange(len(elements) + 1)
                    elements.insert(at, value)
                    bad.append((at, name))
                out.append(Sent(INFERENCE, p, client.encode(), b"[" + b", ".join(elements) + b"]",
                                bad))
            continue
        if rng.random() < 0.03:
            open_arrays[p] = [line]
            continue
        out.append(Sent(INFERENCE, p, client.encode(), line, []))
    for p, elements in open_arrays.items():
        out.append(Sent(INFERENCE, p, b"k", b"[" + b", ".join(elements) + b"]", []))
    assert not shapes, "every small bad shape also went in as an array element"
    return out


def first_records(paths, count: int = 400) -> list[Sent]:
    """The demo's first events, one a record, each to its client's partition."""
    lines = paths["inference.jsonl"].read_bytes().splitlines()[:count]
    return [Sent(INFERENCE, partition_of(json.loads(line)["client_id"], PARTITIONS),
                 json.loads(line)["client_id"].encode(), line, []) for line in lines]


def all_records(paths, rng: random.Random) -> list[Sent]:
    records = good_records(paths, rng)
    bad = [Sent(INFERENCE, rng.randrange(PARTITIONS), b"bad-actor", v, [(None, n)])
           for n, v in BAD_INFERENCE.items()]
    bad += [Sent(INFERENCE, rng.randrange(PARTITIONS), b"bad-actor", v, [(0, n), (1, n)])
            for n, v in ARRAY_ONLY.items()]
    for sent in bad:
        records.insert(rng.randrange(len(records) + 1), sent)
    stats = [Sent(STATS, 0, json.loads(line)["dataset"].encode(), line, [])
             for line in paths["stats"].read_bytes().splitlines()]
    for name, value in BAD_STATS.items():
        stats.insert(rng.randrange(len(stats) + 1), Sent(STATS, 0, b"digits", value, [(None, name)]))
    return records + stats


def send(broker, records: list[Sent]) -> None:
    """Send in order; each record's offset is kept."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=broker.address, acks="all",
                             max_request_size=4 << 20)
    futures = [producer.send(r.topic, key=r.key, value=r.value, partition=r.partition)
               for r in records]
    producer.flush()
    for record, future in zip(records, futures, strict=True):
        record.offset = future.get(timeout=30).offset
    producer.close()


def committed(broker) -> dict[tuple[str, int], int]:
    """The worker's committed offsets (its group is the app's name)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=broker.address, group_id="modelwatch",
                             enable_auto_commit=False)  # never joins: committed() only
    try:
        out = {}
        for topic in (INFERENCE, STATS):
            for p in range(PARTITIONS):
                offset = consumer.committed(TopicPartition(topic, p))
                if offset is not None and offset >= 0:
                    out[(topic, p)] = offset
        return out
    finally:
        consumer.close()


def ends_of(records: list[Sent]) -> dict[tuple[str, int], int]:
    """(topic, partition) -> the offset after the last record sent to it."""
    ends: dict[tuple[str, int], int] = {}
    for r in records:
        ends[(r.topic, r.partition)] = max(ends.get((r.topic, r.partition), 0), r.offset + 1)
    return ends


def wait_until_committed(broker, records: list[Sent], worker, timeout_s: float = 180.0) -> None:
    """Until the worker committed every record sent (so all it sent is acknowledged)."""
    ends = ends_of(records)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and worker.poll() is None:
        done = committed(broker)
        if all(done.get(tp, 0) >= end for tp, end in ends.items()):
            return
        time.sleep(1.0)
    raise AssertionError(f"not all committed: {committed(broker)} of {ends}")


def headers_of(record) -> dict[str, bytes]:
    return dict(record.headers or [])




@contextmanager
def judged(folder, tmp_path, records):
    """A fresh broker and a worker that has judged and checkpointed ``records``:
    (broker, worker, log); the worker is stopped after the block if still running."""
    log = tmp_path / "worker.log"
    with EmbeddedBroker() as broker:
        create_topics(broker)
        worker = start_worker(broker, folder / "profiles", tmp_path / "state", log)
        try:
            send(broker, records)
            wait_until_committed(broker, records, worker)
            yield broker, worker, log
        finally:
            stop(worker)


def test_every_bad_shape_is_dead_lettered_and_good_records_alert_as_replay(demo, expected,
                                                                            tmp_path):
    folder, paths = demo
    records = all_records(paths, random.Random(11))
    with judged(folder, tmp_path, records) as (broker, worker, log):
        assert worker.poll() is None, log.read_text()[-3000:]
        dead = read_topic(broker, DEAD)
        alerts = [json.loads(r.value) for r in read_topic(broker, "security-alerts")]
    text = log.read_text()
    assert "Traceback" not in text and "failed" not in text, text[-3000:]

    got = {}
    for letter in dead:
        h = headers_of(letter)
        topic, partition, offset = h["source"].decode().rsplit("/", 2)
        element = int(h["element"]) if "element" in h else None
        where = (topic, int(partition), int(offset), element)
        assert where not in got, f"dead-lettered twice: {where}"
        got[where] = letter
    wanted = {(r.topic, r.partition, r.offset, element): (name, r)
              for r in records for element, name in r.bad}
    missing = {w: wanted[w][0] for w in set(wanted) - set(got)}
    assert not missing, f"not dead-lettered: {missing}"
    assert set(got) == set(wanted), f"dead letters for good records: {set(got) - set(wanted)}"
    for where, letter in got.items():
        h = headers_of(letter)
        name, sent = wanted[where]
        assert h["reason"].decode(), name
        assert h["id"].decode() == dead_letter_id(*where), name
        assert letter.key == sent.key, name
        if where[3] is None and sent.value is not None and len(sent.value) > DEAD_LETTER_VALUE_MAX:
            assert int(h["original-size"]) == len(sent.value), name
            assert letter.value == sent.value[:DEAD_LETTER_VALUE_MAX], name
        elif where[3] is None:
            assert letter.value == sent.value, name
    assert b"tombstone" in headers_of(got[next(w for w, (n, r) in wanted.items()
                                               if n == "tombstone" and r.topic == INFERENCE)])["reason"]

    expected_ids = sorted(a.event.id for a in expected.alerts)
    assert sorted(a["event"]["id"] for a in alerts) == expected_ids


def test_an_agent_that_fails_stops_the_worker_without_committing(demo, tmp_path):
    folder, paths = demo
    records = first_records(paths)
    failing = Sent(INFERENCE, 3, b"fail-here",
                   json.dumps({**GOOD, "client_id": "fail-here"}).encode(), [])
    log = tmp_path / "worker.log"
    with EmbeddedBroker() as broker:
        create_topics(broker)
        with open(log, "ab") as out:
            worker = subprocess.Popen(
                [sys.executable, "-m", "tests.fault_worker", "worker", "--broker", broker.url,
                 "--profiles", str(folder / "profiles"), "--state-dir", str(tmp_path / "state"),
                 "--metrics-port", "0"],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
        try:
            send(broker, records)
            wait_until_committed(broker, records, worker)  # judging works, commits flow
            send(broker, [failing])
            send(broker, records)  # more after it, in every partition
            code = worker.wait(timeout=120)
            after = committed(broker)
        finally:
            stop(worker)
    text = log.read_text()
    assert code != 0, text[-3000:]
    lines = [line for line in text.splitlines() if "worker: judge_inference failed" in line]
    assert len(lines) == 1 and "injected failure" in lines[0], text[-3000:]
    assert after.get((INFERENCE, failing.partition), 0) <= failing.offset


def test_dead_letter_records_fit_a_produce_request():
    """In-process: the cut, the headers, the deterministic id."""
    from streams.worker.decode import DEAD_LETTER_KEY_MAX, REASON_MAX, dead_letter_record

    value, key = b"v" * (MAX_RECORD_BYTES + 10), b"k" * 10_000
    k, v, headers = dead_letter_record(INFERENCE, 3, 42, None, key, value, "r" * 5000)
    h = dict(headers)
    assert len(v) == DEAD_LETTER_VALUE_MAX and int(h["original-size"]) == len(value)
    assert len(k) == DEAD_LETTER_KEY_MAX and int(h["original-key-size"]) == len(key)
    assert len(h["reason"].decode()) == REASON_MAX + 1
    assert h["id"] == dead_letter_id(INFERENCE, 3, 42, None).encode()
    assert h["source"] == f"{INFERENCE}/3/42".encode() and "element" not in h
    k, v, headers = dead_letter_record(INFERENCE, 3, 42, 5, None, None, "tombstone")
    h = dict(headers)
    assert (k, v) == (None, None) and h["element"] == b"5" and "original-size" not in h
    assert h["id"] != dead_letter_id(INFERENCE, 3, 42, None).encode()
