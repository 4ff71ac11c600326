"""Fuzz: mutated records through ``replay`` (200,000) and through the worker against
the real broker (20,000). No crash, every bad record dead-lettered with a reason,
the alerts on the valid ones identical to a clean run. ``bench/fuzz`` runs the
same with 1,000,000 through ``replay``."""

from __future__ import annotations

import json
import random

import pytest

from bench.fuzz.mutants import FUZZ_DATASET, FUZZ_MODEL, Line, mutate_stats, records, renamed_stats
from bench.fuzz.run import fuzz_profiles, fuzz_replay
from detectors.config import load_thresholds
from streams.records import dead_letter_id, partition_of
from streams.replay import replay
from streams.worker.broker import EmbeddedBroker
from tests.streaming import PARTITIONS, create_topics, read_topic, start_worker, stop
from tests.test_worker_faults import STATS, Sent, committed, headers_of, send, wait_until_committed

pytestmark = pytest.mark.slow

INFERENCE, DEAD = "inference-logs", "modelwatch-deadletter"


def test_200k_mutated_records_through_replay(demo, tmp_path):
    _, paths = demo
    report = fuzz_replay(paths["profile"], paths["inference.jsonl"], paths["stats"], tmp_path,
                         n=200_000, seed=7, rare_every=20_000)
    assert not report.problems, report
    assert report.records == 200_000 and report.bad > 100_000
    assert report.dead_letters >= report.bad
    assert {"flip", "truncate", "utf8", "huge", "null", "wrong_type", "deep", "oversize",
            "top_level"} <= set(report.kinds)


def _moved_in_time(line: Line, base: dict) -> bool:
    """A single mutant still JSON whose time moved: valid, it could advance a shard's
    event-time epoch ahead of the real model's traffic in the worker (judged in
    partition order, where replay sorts by time), which is no fault of decoding."""
    try:
        doc = json.loads(line.raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False
    return isinstance(doc, dict) and doc.get("ts") != base["ts"]


def worker_traffic(paths, n: int, seed: int) -> list[Sent]:
    """The demo's traffic, each mutant sent after its base event to that client's
    partition; training-stats mutants among the real batches."""
    clean = paths["inference.jsonl"].read_bytes().splitlines()
    events = [json.loads(line) for line in clean]
    after: list[list[Line]] = [[] for _ in clean]
    for base, line in records(events, n, seed, rare_every=10_000):
        if line.single is not None and _moved_in_time(line, events[base]):
            continue
        after[base].append(line)
    out = []
    for raw, event, extra in zip(clean, events, after, strict=True):
        p = partition_of(event["client_id"], PARTITIONS)
        out.append(Sent(INFERENCE, p, event["client_id"].encode(), raw, []))
        for line in extra:
            bad = [(None, line.single.kind)] if line.single is not None and line.single.bad else []
            bad += [(k, m.kind) for k, m in enumerate(line.elements) if m.bad]
            out.append(Sent(INFERENCE, p, event["client_id"].encode(), line.raw, bad,
                            fuzzed=True))
    rng = random.Random(seed)
    stats = paths["stats"].read_bytes().splitlines()
    base = [renamed_stats(json.loads(line)) for line in stats]
    stats_sent = [Sent(STATS, 0, json.loads(line)["dataset"].encode(), line, []) for line in stats]
    for _ in range(max(1, n // 100)):
        m = mutate_stats(rng.choice(base), rng)
        if not m.bad and _moved_in_time(Line(m.raw, single=m), base[0]):
            continue
        stats_sent.insert(rng.randrange(len(stats_sent) + 1),
                          Sent(STATS, 0, FUZZ_DATASET.encode(), m.raw,
                               [(None, m.kind)] if m.bad else [], fuzzed=True))
    return out + stats_sent


@pytest.mark.integration
def test_20k_mutated_records_through_the_worker(demo, tmp_path):
    folder, paths = demo
    profiles_dir = tmp_path / "profiles"
    profiles_dir.mkdir()
    profiles = fuzz_profiles(paths["profile"], profiles_dir)
    (profiles_dir / "digits.json").write_bytes(paths["profile"].read_bytes())
    traffic = worker_traffic(paths, 22_000, seed=3)  # some are left out: see _moved_in_time
    assert sum(r.fuzzed for r in traffic) >= 20_000
    expected = replay(profiles[:1], load_thresholds(), inference_log=paths["inference.jsonl"],
                      training_stats=paths["stats"], deadletter=None)
    log = tmp_path / "worker.log"
    with EmbeddedBroker() as broker:
        create_topics(broker)
        worker = start_worker(broker, profiles_dir, tmp_path / "state", log)
        try:
            send(broker, traffic)
            wait_until_committed(broker, traffic, worker, timeout_s=300)
            assert worker.poll() is None, log.read_text()[-3000:]
            dead = read_topic(broker, DEAD)
            alerts = [json.loads(r.value) for r in read_topic(broker, "security-alerts")]
            assert committed(broker)
        finally:
            stop(worker)
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]

    letters: dict[tuple, list] = {}
    for letter in dead:
        h = headers_of(letter)
        topic, partition, offset = h["source"].decode().rsplit("/", 2)
        element = int(h["element"]) if "element" in h else None
        where = (topic, int(partition), int(offset), element)
        assert h["reason"].decode(), where
        assert h["id"].decode() == dead_letter_id(*where)
        letters.setdefault(where[:3], []).append(element)
    missed, wrong = [], []
    for r in traffic:
        got = letters.get((r.topic, r.partition, r.offset), [])
        if not r.fuzzed:
            if got:
                wrong.append(r.value[:100])  # a clean record dead-lettered
            continue
        for element, kind in r.bad:  # a single record may go as its elements ("[1, 2]")
            if not (got if element is None else element in got or None in got):
                missed.append((kind, (r.value or b"")[:100]))
    assert not missed, f"{len(missed)} bad records not dead-lettered, e.g. {missed[:3]}"
    assert not wrong, f"clean records dead-lettered: {wrong[:3]}"

    real = sorted(a["event"]["id"] for a in alerts
                  if a["modelwatch"]["model"] != FUZZ_MODEL
                  and a["modelwatch"]["dataset"] != FUZZ_DATASET)
    assert real == sorted(a.event.id for a in expected.alerts)
