"""``modelwatch replay``: the detectors over recorded files, in event-time order."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np

from detectors.config import Thresholds
from detectors.profile import Profile
from streams.explain import Scores
from streams.files import DeadLetters
from streams.gcpause import cyclic_gc_paused
from streams.pipeline import Pipeline
from streams.progress import tracked_open
from streams.records import Alert, partition_of, screen
from streams.tabular import UserError

CHUNK = 131_072  # events judged together: large, so per-client overhead is spread thin


@dataclass
class ReplayResult:
    alerts: list[Alert]
    events: int
    batches: int
    rejected: int
    pipeline: Pipeline
    late: int = 0  # events judged after later ones: more than a chunk out of place


def _lines(path: Path, label: str):
    try:
        with tracked_open(path, label, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if raw.strip():
                    yield number, raw
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror}") from None


def inference_chunks(path: Path, pipeline: Pipeline, dead: DeadLetters, size: int):
    """Valid events in file order, about ``size`` lines at a time, as (events, times).

    Memory stays bounded by the chunk: a line's bytes are kept only until its
    chunk has been screened.
    """
    items = []
    for number, raw in _lines(path, f"reading {path.name}"):
        items.append((raw, number))
        if len(items) >= size:
            yield _screened(path, items, pipeline, dead)
            items = []
    if items:
        yield _screened(path, items, pipeline, dead)


def _screened(path, items, pipeline: Pipeline, dead: DeadLetters):
    result = screen(items, pipeline.reject_reason)
    for line, reason, raw in result.rejected:
        dead.add(str(path), line, reason, raw)
    dead.spill()  # the next chunk's lines come after this one's
    _compact_features(result.events)
    return result.events, result.ts


def _compact_features(events) -> None:
    """Features as rows of one float64 array instead of lists of float objects: ~0.6
    instead of ~2 KiB an event with 64 features, and the reorder buffer holds 262,144."""
    featured = [e for e in events if e.features is not None]
    rows = None
    if featured:
        with contextlib.suppress(ValueError):  # ragged: unprofiled models of other widths
            rows = np.array([e.features for e in featured], dtype=np.float64)
    if rows is None or rows.ndim != 2:
        for event in featured:
            event.features = np.array(event.features, dtype=np.float64)
        return
    for event, row in zip(featured, rows, strict=True):
        event.features = row


def read_stats(path: Path, pipeline: Pipeline, dead: DeadLetters):
    batches = []
    for number, raw in _lines(path, f"reading {path.name}"):
        record, ts, reason = pipeline.screen_stats(raw)
        if reason is not None:
            dead.add(str(path), number, reason, raw)
            dead.spill()  # judged line by line, in order
        else:
            batches.append((ts, number, record))
    batches.sort(key=lambda item: (item[0], item[1]))
    return batches


def replay(profiles: list[Profile], thresholds: Thresholds, *, inference_log: Path | None,
           training_stats: Path | None, deadletter: Path | None,
           scores: Scores | None = None, partitions: int = 1) -> ReplayResult:
    """``scores``, if given, collects each rule's scores per key (``--explain``, near misses).
    ``partitions``: judge as a worker does on an inference topic of that many partitions
    (client ids as record keys), whose alerts are then the same."""
    pipeline = Pipeline(profiles, thresholds, scores=scores, shards=partitions)
    dead = DeadLetters(deadletter)
    alerts: list[Alert] = []
    late = 0
    # Decoded events are many small lists that hold no cycles.
    try:
        with cyclic_gc_paused():
            if inference_log is not None:
                alerts, late = _judge_in_time_order(
                    inference_chunks(inference_log, pipeline, dead, CHUNK), pipeline)
            if training_stats is not None:
                for ts, _, record in read_stats(training_stats, pipeline, dead):
                    alerts += pipeline.process_stats(record, ts)
    finally:
        dead.close()
    alerts.sort(key=lambda a: (a.timestamp, a.event.id))
    return ReplayResult(alerts, pipeline.counters.events, pipeline.counters.batches,
                        dead.count, pipeline, late)


def _judge_in_time_order(chunks, pipeline: Pipeline) -> tuple[list[Alert], int]:
    """Event-time order through a reorder buffer of two chunks.

    Logs are nearly sorted; an event is judged in exact time order unless it
    turns up more than a chunk's worth of events after its place. Such events
    are judged with the next chunk and counted as late.

    The buffer is cut every ``2 * CHUNK`` valid events, whatever the lines around
    them: the same valid events in the same order give the same alerts, however
    many bad lines sit between them (and however the file was read in chunks).
    """
    alerts: list[Alert] = []
    held: list = []
    held_ts = np.empty(0)
    judged_until = -np.inf
    late = 0
    window = 2 * CHUNK
    for events, ts in chunks:
        held += events
        held_ts = np.concatenate([held_ts, ts])
        while len(held) >= window:
            order = np.argsort(held_ts[:window], kind="stable")
            now, rest = order[:CHUNK], order[CHUNK:]
            late += int((held_ts[now] < judged_until).sum())
            alerts += judge_sharded(pipeline, [held[i] for i in now], held_ts[now])
            judged_until = max(judged_until, float(held_ts[now[-1]]))
            held = [held[i] for i in rest] + held[window:]
            held_ts = np.concatenate([held_ts[rest], held_ts[window:]])
    order = np.argsort(held_ts, kind="stable")
    late += int((held_ts < judged_until).sum())
    for start in range(0, len(order), CHUNK):
        rows = order[start:start + CHUNK]
        alerts += judge_sharded(pipeline, [held[i] for i in rows], held_ts[rows])
    return alerts, late


def judge_sharded(pipeline: Pipeline, events: list, ts: np.ndarray) -> list[Alert]:
    """Events in time order, judged per shard (the partition a worker would read each
    from) epoch by epoch: every shard enters an epoch before any judges it."""
    if pipeline.n_shards == 1:
        return pipeline.process_inference(events, ts)
    shard_of: dict[str, int] = {}

    def shard(client_id: str) -> int:
        found = shard_of.get(client_id)
        if found is None:
            found = shard_of[client_id] = partition_of(client_id, pipeline.n_shards)
        return found

    shards = np.fromiter((shard(e.client_id) for e in events), dtype=np.int64, count=len(events))
    alerts: list[Alert] = []
    epochs = np.floor(ts / pipeline.epoch_s)
    for epoch in np.unique(epochs):
        for shard in range(pipeline.n_shards):
            pipeline.enter(shard, float(epoch))
        for shard in range(pipeline.n_shards):
            rows = np.flatnonzero((epochs == epoch) & (shards == shard))
            if len(rows):
                alerts += pipeline.process_inference([events[i] for i in rows], ts[rows], shard)
    return alerts


def write_alerts(alerts: list[Alert], path: Path) -> None:
    encoder = msgspec.json.Encoder()
    try:
        with open(path, "wb") as out:
            for alert in alerts:
                out.write(encoder.encode(alert) + b"\n")
    except OSError as exc:
        raise UserError(f"{path}: cannot write alerts: {exc.strerror}") from None
