"""``modelwatch replay``: the detectors over recorded files, in event-time order."""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np

from detectors.config import Thresholds
from detectors.profile import Profile
from streams.files import DeadLetters
from streams.pipeline import Pipeline
from streams.progress import tracked_open
from streams.records import Alert, Rejected, bad_time, decode_inference, decode_stats, event_times
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
    """Valid events in file order, ``size`` at a time, as (events, event times).

    Memory stays bounded by the chunk: times are parsed in bulk per chunk, and a
    rejected line keeps its original bytes only until its chunk is done.
    """
    events, lines, raws = [], [], []
    check = pipeline.reject_reason
    for number, raw in _lines(path, f"reading {path.name}"):
        records = decode_inference(raw)
        for record in records:
            if isinstance(record, Rejected):
                dead.add(str(path), number, record.reason, record.raw or raw)
                continue
            reason = check(record)
            if reason is not None:
                dead.add(str(path), number, reason, raw if len(records) == 1 else
                         msgspec.json.encode(record))
                continue
            events.append(record)
            lines.append(number)
            raws.append(raw if len(records) == 1 else None)
        if len(events) >= size:
            yield _timed(path, events, lines, raws, dead)
            events, lines, raws = [], [], []
    if events:
        yield _timed(path, events, lines, raws, dead)


def _timed(path, events, lines, raws, dead):
    ts = event_times([e.ts for e in events])
    bad = np.isnan(ts)
    if bad.any():
        for i in np.flatnonzero(bad):
            dead.add(str(path), lines[i], bad_time(events[i].ts).reason,
                     raws[i] if raws[i] is not None else msgspec.json.encode(events[i]))
        events = [e for e, b in zip(events, bad, strict=True) if not b]
        ts = ts[~bad]
    return events, ts


def read_stats(path: Path, pipeline: Pipeline, dead: DeadLetters):
    batches = []
    for number, raw in _lines(path, f"reading {path.name}"):
        record, ts = decode_stats(raw)
        reason = record.reason if isinstance(record, Rejected) else pipeline.stats_reject_reason(record)
        if reason is not None:
            dead.add(str(path), number, reason, raw)
        else:
            batches.append((ts, number, record))
    batches.sort(key=lambda item: (item[0], item[1]))
    return batches


def replay(profiles: list[Profile], thresholds: Thresholds, *, inference_log: Path | None,
           training_stats: Path | None, deadletter: Path | None) -> ReplayResult:
    pipeline = Pipeline(profiles, thresholds)
    dead = DeadLetters(deadletter)
    alerts: list[Alert] = []
    late = 0
    # Decoded events are many small lists; the cyclic GC would rescan them over
    # and over (events hold no cycles, so refcounting frees them all).
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        if inference_log is not None:
            alerts, late = _judge_in_time_order(
                inference_chunks(inference_log, pipeline, dead, CHUNK), pipeline)
        if training_stats is not None:
            for ts, _, record in read_stats(training_stats, pipeline, dead):
                alerts += pipeline.process_stats(record, ts)
    finally:
        dead.close()
        if gc_was_enabled:
            gc.enable()
    alerts.sort(key=lambda a: (a.timestamp, a.event.id))
    return ReplayResult(alerts, pipeline.counters.events, pipeline.counters.batches,
                        dead.count, pipeline, late)


def _judge_in_time_order(chunks, pipeline: Pipeline) -> tuple[list[Alert], int]:
    """Event-time order through a reorder buffer of two chunks.

    Logs are nearly sorted; an event is judged in exact time order unless it
    turns up more than a chunk's worth of events after its place. Such events
    are judged with the next chunk and counted as late.
    """
    alerts: list[Alert] = []
    held: list = []
    held_ts = np.empty(0)
    judged_until = -np.inf
    late = 0
    for events, ts in chunks:
        held += events
        held_ts = np.concatenate([held_ts, ts])
        late += int((ts < judged_until).sum())
        if len(held) < 2 * CHUNK:
            continue
        order = np.argsort(held_ts, kind="stable")
        now, rest = order[:CHUNK], order[CHUNK:]
        alerts += pipeline.process_inference([held[i] for i in now], held_ts[now])
        judged_until = max(judged_until, float(held_ts[now[-1]]))
        held, held_ts = [held[i] for i in rest], held_ts[rest]
    order = np.argsort(held_ts, kind="stable")
    for start in range(0, len(order), CHUNK):
        rows = order[start:start + CHUNK]
        alerts += pipeline.process_inference([held[i] for i in rows], held_ts[rows])
    return alerts, late


def write_alerts(alerts: list[Alert], path: Path) -> None:
    encoder = msgspec.json.Encoder()
    try:
        with open(path, "wb") as out:
            for alert in alerts:
                out.write(encoder.encode(alert) + b"\n")
    except OSError as exc:
        raise UserError(f"{path}: cannot write alerts: {exc.strerror}") from None
