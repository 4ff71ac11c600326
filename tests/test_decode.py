"""Judging a batch in-process: fake Kafka records through the worker's decode module."""

from __future__ import annotations

import dataclasses
import json

import msgspec
import numpy as np

from detectors.clients import ClientState
from detectors.config import load_thresholds
from detectors.poisoning import SourceState
from streams.metrics import WorkerMetrics
from streams.pipeline import Pipeline
from streams.records import format_ts
from streams.stats import stats_event
from streams.worker.decode import DeadLetter, InferenceJudge, StatsJudge
from streams.worker.tables import KeyedStates
from tests.conftest import T0

INFERENCE, STATS = "inference-logs", "training-stats"


class Message:
    def __init__(self, partition: int, offset: int):
        self.partition, self.offset = partition, offset


class Record:
    def __init__(self, partition: int, offset: int, value: bytes | None, key: bytes | None = None):
        self.message = Message(partition, offset)
        self.key, self.value = key, value


def records(partition: int, values: list) -> list[Record]:
    return [Record(partition, offset, v if isinstance(v, bytes | None) else json.dumps(v).encode(),
                   key=f"k{offset}".encode())
            for offset, v in enumerate(values)]


class Recorder:
    """Wraps the pipeline's judging to see what it is given."""

    def __init__(self, pipeline: Pipeline):
        self.calls: list[tuple[list, np.ndarray, int]] = []
        judge = pipeline.process_inference

        def recorded(events, ts, shard=0):
            self.calls.append((events, ts, shard))
            return judge(events, ts, shard=shard)

        pipeline.process_inference = recorded


def inference_judge(profile, table: dict, shards: int = 1) -> tuple[InferenceJudge, Recorder,
                                                                    WorkerMetrics]:
    clients = KeyedStates(table, ClientState)
    pipeline = Pipeline([profile], load_thresholds(), clients=clients, sources={}, shared={},
                        shards=shards)
    metrics = WorkerMetrics()
    return InferenceJudge(pipeline, clients, metrics, INFERENCE), Recorder(pipeline), metrics


def test_inference_dead_letters_each_bad_record_and_judges_the_rest_by_event_time(digits):
    good = digits.events("c1", digits.X_pool[:3])
    late, early, middle = good[0] | {"ts": format_ts(T0 + 9)}, good[1], good[2] | {
        "ts": format_ts(T0 + 5)}
    batch = records(2, [late, b"not json", [early, {"ts": "yesterday"}], None, middle])
    judge, recorder, metrics = inference_judge(digits.profile, {}, shards=3)

    judged = judge(batch)
    # Partitions 0 and 1 have entered no epoch yet: the events wait, unacknowledged.
    assert not recorder.calls and judge.deferred() == {(INFERENCE, 2, 0), (INFERENCE, 2, 2),
                                                       (INFERENCE, 2, 4)}
    # Reading on would only add to the wait once every partition owned waits.
    assert judge.all_waiting({2}, 2) and not judge.all_waiting({2}, 3)
    assert not judge.all_waiting({1, 2}, 0)
    assert not judge.enter_idle({0, 1}).alerts and not judge.deferred()

    reasons = {(d.offset, d.element): d.reason for d in judged.dead_letters}
    assert set(reasons) == {(1, None), (2, 1), (3, None)}
    assert all(d.topic == INFERENCE and d.partition == 2 for d in judged.dead_letters)
    bad_element = next(d for d in judged.dead_letters if d.element == 1)
    assert bad_element.key == b"k2" and b"yesterday" in bad_element.value
    assert reasons[(2, 1)].startswith("array element 1: ")
    [(events, ts, shard)] = recorder.calls
    assert shard == 2 and list(ts) == sorted(ts)
    assert [e.request_id for e in events] == ["c1-1", "c1-2", "c1-0"]
    assert metrics.value("modelwatch_records_consumed_total", topic=INFERENCE,
                         model="digits") == 3


def test_inference_skips_what_the_stored_state_already_holds(digits):
    """After a restart, records after the last commit are read again: an event whose
    key's stored state holds it is not judged twice, later ones are."""
    values = digits.events("c1", digits.X_pool[:4]) + digits.events("c2", digits.X_pool[4:6])
    first, recorder, _ = inference_judge(digits.profile, {})
    first(records(0, values[:4]))  # c1's four events
    table = {key: value for _, _, key, value in first.clients.snapshot({0})}
    assert set(table) == {b"digits/c1"}

    again, recorder, metrics = inference_judge(digits.profile, table)
    again(records(0, values))  # all six, from offset 0 again

    [(events, _, _)] = recorder.calls
    assert [e.request_id for e in events] == ["c2-0", "c2-1"]
    assert metrics.value("modelwatch_records_consumed_total", topic=INFERENCE,
                         model="digits") == 2


def test_inference_forgets_partitions_given_away(digits):
    judge, _, _ = inference_judge(digits.profile, {}, shards=2)
    judge(records(0, digits.events("c1", digits.X_pool[:2]))
          + records(1, digits.events("c2", digits.X_pool[2:4])))
    assert judge.restored == {0, 1} and set(judge.clients) == {"digits/c1", "digits/c2"}
    judge.forget({1})
    assert judge.restored == {0} and set(judge.clients) == {"digits/c1"}


def test_stats_dead_letters_bad_batches_and_skips_held_ones(digits):
    event = stats_event(digits.X_pool[:50], digits.y_train[:50].astype(str), digits.profile,
                        dataset="digits-train", source="s1", batch_id="b1", ts=T0)
    good = msgspec.json.encode(event)
    sources = KeyedStates({}, SourceState)
    pipeline = Pipeline([digits.profile], load_thresholds(), clients={}, sources=sources,
                        shared={})
    metrics = WorkerMetrics()
    judge = StatsJudge(pipeline, sources, metrics, STATS)

    judged = judge([Record(3, 7, b"{}", key=b"k"), Record(3, 8, good)])
    assert judged.dead_letters == [DeadLetter(STATS, 3, 7, None, b"k", b"{}",
                                              judged.dead_letters[0].reason)]
    assert pipeline.counters.batches == 1 and sources.applied["digits-train/s1"] == (3, 8, ())

    judge([Record(3, 8, good)])  # read again: the source's state holds it
    assert pipeline.counters.batches == 1
    assert metrics.value("modelwatch_records_consumed_total", topic=STATS,
                         model="digits-train") == 2


def test_a_restore_reads_stored_clients_without_decoding_them_and_rebuilds_the_same_population(digits):
    """A restarted worker restores every client of a partition to rebuild its population,
    but decodes a client's whole state only when its key comes back."""
    values = [e for c in range(4) for e in digits.events(f"c{c}", digits.X_pool[3 * c:3 * c + 3])]
    first, _, _ = inference_judge(digits.profile, {})
    first(records(0, values))
    table = {key: value for _, _, key, value in first.clients.snapshot({0})}
    [(key, state)] = [(k, s) for k, s in first.clients.live.items() if k == "digits/c1"]

    again, _, _ = inference_judge(digits.profile, table)
    restored = dict(again.clients.restored(0))
    again.pipeline.restore_shard(0, restored.items())

    assert set(restored) == set(first.clients.live) and not again.clients.live
    for field in dataclasses.fields(ClientState):
        stored, kept = getattr(restored[key], field.name), getattr(state, field.name)
        if isinstance(kept, np.ndarray):
            assert stored.dtype == kept.dtype and np.array_equal(stored, kept, equal_nan=True)
        else:
            assert stored == kept or (stored != stored and kept != kept)
    ours, theirs = again.pipeline.pending[0]["digits"], first.pipeline.pending[0]["digits"]
    assert np.array_equal(ours.class_counts, theirs.class_counts)
    assert np.array_equal(ours.rate_hist, theirs.rate_hist) and ours.ips == theirs.ips
    assert again.clients.holds("digits/c1", 0, 0) and set(again.clients.live) == {"digits/c1"}
    assert set(again.clients.forget({0})) == set(first.clients.live)
