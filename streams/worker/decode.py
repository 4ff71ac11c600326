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


class Waiting:
    """A partition's events screened and not judged yet, in the order they are to be
    judged (each batch's by event time): their epoch waits for other shards."""

    __slots__ = ("events", "ts", "where", "keys", "last_offset")

    def __init__(self):
        self.events: list = []
        self.ts = np.empty(0)
        self.where: list[tuple[int, int]] = []  # (offset, element) of each event
        self.keys: list[str] = []
        self.last_offset = -1                   # the last record screened

    def add(self, events: list, ts: np.ndarray, where: list, keys: list) -> None:
        """Queue a batch's events (the lists are kept, not copied)."""
        if not self.events:  # the usual case: nothing waits
            self.events, self.ts, self.where, self.keys = events, ts, where, keys
            return
        self.events = self.events + events  # new lists: deferred() may read the old ones
        self.ts = np.concatenate([self.ts, ts])
        self.where = self.where + where
        self.keys = self.keys + keys

    def take(self, judged: np.ndarray) -> tuple[list, np.ndarray]:
        """Remove the events at indices ``judged`` (ascending); return them and their times."""
        if len(judged) == len(self.events):  # all of them: the usual case
            events, ts = self.events, self.ts
            self.events, self.ts, self.where, self.keys = [], np.empty(0), [], []
            return events, ts
        rest = np.ones(len(self.events), bool)
        rest[judged] = False
        events = [self.events[i] for i in judged]
        ts = self.ts[judged]
        kept = np.flatnonzero(rest).tolist()
        self.events = [self.events[i] for i in kept]
        self.ts = self.ts[rest]
        self.where = [self.where[i] for i in kept]
        self.keys = [self.keys[i] for i in kept]
        return events, ts

    def offsets(self) -> set[int]:
        """The records with events still waiting."""
        return {offset for offset, _ in self.where}

    def skipped(self) -> dict[str, tuple]:
        """Per key, its waiting events' (offset, element): what its state lacks of the
        records up to ``last_offset``."""
        out: dict[str, list] = {}
        for key, where in zip(self.keys, self.where, strict=True):
            out.setdefault(key, []).append(where)
        return {k: tuple(v) for k, v in out.items()}


class InferenceJudge:
    """Judges inference records, grouped by partition (a shard of the population).

    A partition's events of an epoch are judged once every partition has entered it
    (:meth:`streams.pipeline.Pipeline.judgeable`), so the population each is judged
    against does not depend on which partition was read first: until then they wait
    here, and their records are not acknowledged (:meth:`deferred`).
    """

    def __init__(self, pipeline: Pipeline, clients: KeyedStates, metrics: WorkerMetrics,
                 topic: str, clock: Callable[[], float] = time.time):
        self.pipeline, self.clients, self.metrics, self.topic = pipeline, clients, metrics, topic
        self.clock = clock
        self.restored: set[int] = set()  # partitions whose population is rebuilt
        self.waiting: dict[int, Waiting] = {}

    def __call__(self, events: list) -> Judged:
        """Judge records in offset order per partition (as :meth:`Checkpoint.hold` gives)."""
        by_partition: dict[int, list] = {}
        for event in events:
            by_partition.setdefault(event.message.partition, []).append(event)
        dead = []
        for partition, records in by_partition.items():
            self._restore(partition)
            result = screen(((e.value, (e.key, e.message.offset)) for e in records),
                            self.pipeline.reject_reason)
            dead += [DeadLetter(self.topic, partition, offset, element, key, raw, reason)
                     for ((key, offset), reason, raw), element
                     in zip(result.rejected, result.elements, strict=True)]
            waiting = self.waiting.setdefault(partition, Waiting())
            waiting.last_offset = max(waiting.last_offset, records[-1].message.offset)
            if not result.events:
                continue
            self.metrics.event_lag(self.topic, self.clock() - result.ts)
            # An event is known by its record's offset and its place among the record's
            # valid events: a state may hold some events of a record and not others.
            # (A record's events are contiguous in ``result``, records in offset order.)
            where, last, element = [], None, 0
            for _, offset in result.tags:
                if offset != last:
                    last, element = offset, 0
                where.append((offset, element))
                element += 1
            keys = [f"{e.model}/{e.client_id}" for e in result.events]
            events, ts = result.events, result.ts
            keep = self._not_held(keys, where, partition)
            if keep is not None:
                if not keep:
                    continue
                events, ts = [events[i] for i in keep], ts[keep]
                where, keys = [where[i] for i in keep], [keys[i] for i in keep]
            if len(ts) > 1 and not (ts[1:] >= ts[:-1]).all():
                # per client, partition order is kept
                order = np.argsort(ts, kind="stable").tolist()
                events, ts = [events[i] for i in order], ts[order]
                where, keys = [where[i] for i in order], [keys[i] for i in order]
            for model, n in Counter(e.model for e in events).items():
                self.metrics.consumed(self.topic, model, n)
            waiting.add(events, ts, where, keys)
        return Judged(dead, self._judge_ready())

    def _not_held(self, keys: list[str], where: list[tuple[int, int]],
                  partition: int) -> list[int] | None:
        """Indices of the events that the stored state of their key does not hold yet
        (None: all of them). A key's events come in offset order, so a key whose first
        one is past the last record its state holds has none held: the usual case."""
        clients, first = self.clients, {}
        for i, key in enumerate(keys):
            first.setdefault(key, i)
        suspect = set()
        for key, i in first.items():
            offset, element = where[i]
            if clients.holds(key, partition, offset, element):  # loads a stored state
                suspect.add(key)
                continue
            applied = clients.applied.get(key)
            if applied is not None and applied[0] == partition and offset <= applied[1]:
                suspect.add(key)  # a record judged in part: its waiting events are not held
        if not suspect:
            return None
        return [i for i, (key, (offset, element)) in enumerate(zip(keys, where, strict=True))
                if key not in suspect or not clients.holds(key, partition, offset, element)]

    def _restore(self, partition: int) -> None:
        if partition in self.restored:
            return
        started, count = time.perf_counter(), Counter()
        # The restored population and state views live on: set them aside too.
        with cyclic_gc_paused(freeze_after=True):
            gathered = self.clients.prefetched(partition)
            if gathered is None:
                gathered = counted(self.clients.restored(partition), count)
            else:
                count["n"] = len(gathered.clients)
            self.pipeline.restore_shard(partition, gathered)
        self.restored.add(partition)
        print(f"worker: {self.topic}[{partition}]: {count['n']:,} clients restored in "
              f"{time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)

    def _judge_ready(self) -> list[Alert]:
        """Judge every waiting event whose epoch all partitions have entered, and enter
        the epochs that wait, until nothing moves (a partition entering an epoch can
        free another's events)."""
        alerts: list[Alert] = []
        moved = True
        while moved:
            moved = False
            for partition in sorted(self.waiting):
                waiting = self.waiting[partition]
                if not waiting.events:
                    continue
                ok, first_waiting = self.pipeline.judgeable(partition, waiting.ts)
                judged = np.flatnonzero(ok)
                if len(judged):
                    moved = True
                    self.clients.position = (partition, waiting.last_offset)
                    events, ts = waiting.take(judged)
                    self.clients.skipped = waiting.skipped()
                    alerts += self.pipeline.process_inference(events, ts, shard=partition)
                    self.clients.skipped = {}
                if first_waiting is not None and self.pipeline.epoch_of(partition) != first_waiting:
                    self.pipeline.enter(partition, first_waiting)
                    moved = True
        return alerts

    def enter_idle(self, partitions: set[int]) -> Judged:
        """Partitions with nothing to judge and nothing more on the broker for a while
        enter the latest epoch any partition has, so the others' events of it are
        judged (an idle source's watermark); then judge what that freed."""
        target = self.pipeline.latest_epoch()
        if target is None:
            return Judged([], [])
        for partition in sorted(partitions):
            self._restore(partition)
            waiting = self.waiting.get(partition)
            entered = self.pipeline.epoch_of(partition)
            if (waiting is None or not waiting.events) and (entered is None or entered < target):
                self.pipeline.enter(partition, target)
        return Judged([], self._judge_ready())

    def all_waiting(self, partitions: set[int], limit: int) -> bool:
        """Whether more than ``limit`` events wait and every one of ``partitions`` has
        some: then each has entered the epoch it waits in, so none holds others back,
        and reading more would only add to the wait."""
        waiting = [self.waiting.get(p) for p in partitions]  # the detector thread may add some
        return (sum(len(w.events) for w in waiting if w is not None) > limit
                and all(w is not None and w.events for w in waiting))

    def deferred(self) -> set[tuple[str, int, int]]:
        """(topic, partition, offset) of the records with events still waiting: not to
        be acknowledged yet."""
        # Copies: the event loop asks while the detector thread may add partitions.
        return {(self.topic, partition, offset)
                for partition, waiting in list(self.waiting.items())
                for offset in waiting.offsets()}

    def any_waiting(self) -> bool:
        return any(w.events for w in list(self.waiting.values()))

    def forget(self, partitions: set[int]) -> None:
        """Partitions given away: their clients, shards and restored populations."""
        self.pipeline.forget_keys(self.clients.forget(partitions))
        self.restored -= partitions
        for partition in partitions:
            self.pipeline.forget_shard(partition)
            self.waiting.pop(partition, None)


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
