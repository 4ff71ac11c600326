"""Decoding and judging a batch: Kafka records in, dead letters and alerts out.

Plain code over events with ``.key``, ``.value`` and ``.message.partition`` /
``.offset`` (Faust's, or fakes in ``tests/test_decode.py``). The inference
judge screens each partition's records (decode and validate), skips events that
the stored state of their key already holds (read again after a restart), orders
the rest by event time and runs the pipeline; the stats judge does the same per
training batch. Sending is the caller's: it runs in the detector thread.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from streams.gcpause import cyclic_gc_paused
from streams.metrics import WorkerMetrics
from streams.pipeline import Pipeline
from streams.records import Alert, dead_letter_id, screen
from streams.worker.tables import KeyedStates

# A dead letter must fit in one produce request (Faust's producer: 1,000,000 bytes): a
# longer record is forwarded cut to this size, with its size in the headers.
DEAD_LETTER_VALUE_MAX = 512 << 10
DEAD_LETTER_KEY_MAX = 4 << 10
REASON_MAX = 1000  # characters of a reason in a header (a reason may quote the record)


class DeadLetter(NamedTuple):
    """A record, or one element of an array record, that could not be judged."""

    topic: str
    partition: int
    offset: int
    element: int | None
    key: bytes | None
    value: bytes | None
    reason: str


class Judged(NamedTuple):
    dead_letters: list[DeadLetter]
    alerts: list[Alert]


def dead_letter_record(topic: str, partition: int, offset: int, element: int | None,
                       key: bytes | None, value: bytes | None, reason: str):
    """(key, value, headers) of the dead letter for a record, or one element of it.

    Headers: ``reason``; ``id``, the same for the same record after any restart
    (:func:`streams.records.dead_letter_id`), to drop repeats by; ``source``,
    "topic/partition/offset"; ``element``, the index in an array record; and, for
    a key or value cut to fit, ``original-key-size`` / ``original-size``.
    """
    if len(reason) > REASON_MAX:
        reason = reason[:REASON_MAX] + "…"
    headers = [("reason", reason.encode("utf-8", "replace")),
               ("id", dead_letter_id(topic, partition, offset, element).encode()),
               ("source", f"{topic}/{partition}/{offset}".encode())]
    if element is not None:
        headers.append(("element", str(element).encode()))
    if key is not None and len(key) > DEAD_LETTER_KEY_MAX:
        headers.append(("original-key-size", str(len(key)).encode()))
        key = bytes(key[:DEAD_LETTER_KEY_MAX])
    if value is not None and len(value) > DEAD_LETTER_VALUE_MAX:
        headers.append(("original-size", str(len(value)).encode()))
        value = bytes(value[:DEAD_LETTER_VALUE_MAX])
    return key, value, headers


class InferenceJudge:
    """Judges inference records, grouped by partition (a shard of the population)."""

    def __init__(self, pipeline: Pipeline, clients: KeyedStates, metrics: WorkerMetrics,
                 topic: str, clock: Callable[[], float] = time.time):
        self.pipeline, self.clients, self.metrics, self.topic = pipeline, clients, metrics, topic
        self.clock = clock
        self.restored: set[int] = set()  # partitions whose population is rebuilt

    def __call__(self, events: list) -> Judged:
        """Judge records in offset order per partition (as :meth:`Checkpoint.hold` gives)."""
        by_partition: dict[int, list] = {}
        for event in events:
            by_partition.setdefault(event.message.partition, []).append(event)
        dead, alerts = [], []
        for partition, records in by_partition.items():
            if partition not in self.restored:
                started, count = time.perf_counter(), Counter()
                # The restored population and state views live on: set them aside too.
                with cyclic_gc_paused(freeze_after=True):
                    self.pipeline.restore_shard(partition,
                                                counted(self.clients.restored(partition), count))
                self.restored.add(partition)
                print(f"worker: {self.topic}[{partition}]: {count['n']:,} clients restored in "
                      f"{time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
            result = screen(((e.value, (e.key, e.message.offset)) for e in records),
                            self.pipeline.reject_reason)
            dead += [DeadLetter(self.topic, partition, offset, element, key, raw, reason)
                     for ((key, offset), reason, raw), element
                     in zip(result.rejected, result.elements, strict=True)]
            if not result.events:
                continue
            self.metrics.event_lag(self.topic, self.clock() - result.ts)
            keep = [i for i, (event, (_, offset))
                    in enumerate(zip(result.events, result.tags, strict=True))
                    if not self.clients.holds(f"{event.model}/{event.client_id}", partition,
                                              offset)]
            if not keep:
                continue
            ts = result.ts[keep]
            order = np.argsort(ts, kind="stable")  # per client, partition order is kept
            self.clients.position = (partition, records[-1].message.offset)
            judged = [result.events[keep[i]] for i in order]
            for model, n in Counter(e.model for e in judged).items():
                self.metrics.consumed(self.topic, model, n)
            alerts += self.pipeline.process_inference(judged, ts[order], shard=partition)
        return Judged(dead, alerts)

    def forget(self, partitions: set[int]) -> None:
        """Partitions given away: their clients, shards and restored populations."""
        self.pipeline.forget_keys(self.clients.forget(partitions))
        self.restored -= partitions
        for partition in partitions:
            self.pipeline.pending.pop(partition, None)


def counted(items, count: Counter):
    """``items``, counting them in ``count["n"]`` as they pass."""
    for item in items:
        count["n"] += 1
        yield item


class StatsJudge:
    """Judges training-stats records, one training batch each."""

    def __init__(self, pipeline: Pipeline, sources: KeyedStates, metrics: WorkerMetrics,
                 topic: str, clock: Callable[[], float] = time.time):
        self.pipeline, self.sources, self.metrics, self.topic = pipeline, sources, metrics, topic
        self.clock = clock

    def __call__(self, events: list) -> Judged:
        dead, alerts = [], []
        for event in events:
            partition, offset = event.message.partition, event.message.offset
            record, ts, reason = self.pipeline.screen_stats(event.value)
            if reason is not None:
                dead.append(DeadLetter(self.topic, partition, offset, None, event.key,
                                       event.value, reason))
                continue
            self.metrics.consumed(self.topic, record.dataset, 1)
            self.metrics.event_lag(self.topic, np.array([self.clock() - ts]))
            if self.sources.holds(f"{record.dataset}/{record.source}", partition, offset):
                continue
            self.sources.position = (partition, offset)
            alerts += self.pipeline.process_stats(record, ts)
        return Judged(dead, alerts)

    def forget(self, partitions: set[int]) -> None:
        self.sources.forget(partitions)
