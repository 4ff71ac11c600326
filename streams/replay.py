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
from streams.progress import steps, tracked_open
from streams.records import Alert, Rejected, bad_time, decode_inference, decode_stats, event_times
from streams.tabular import UserError

CHUNK = 262_144  # events judged together: large, so per-client overhead is spread thin


@dataclass
class ReplayResult:
    alerts: list[Alert]
    events: int
    batches: int
    rejected: int
    pipeline: Pipeline


def _lines(path: Path, label: str):
    try:
        with tracked_open(path, label, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if raw.strip():
                    yield number, raw
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror}") from None


def read_inference(path: Path, pipeline: Pipeline, dead: DeadLetters):
    events, lines, single = [], [], []
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
            single.append(len(records) == 1)
    ts = event_times([e.ts for e in events])
    bad = np.flatnonzero(np.isnan(ts))
    if len(bad):
        # Rare: read those lines again so the dead letter keeps the original bytes.
        wanted = {lines[i] for i in bad if single[i]}
        original = {n: raw for n, raw in _lines(path, "rereading") if n in wanted}
        for i in bad:
            raw = original[lines[i]] if single[i] else msgspec.json.encode(events[i])
            dead.add(str(path), lines[i], bad_time(events[i].ts).reason, raw)
        keep = ~np.isnan(ts)
        events = [e for e, k in zip(events, keep, strict=True) if k]
        ts = ts[keep]
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
    # Millions of small lists live until the end; the cyclic GC would rescan them
    # over and over (events hold no cycles, so nothing is left uncollected).
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        if inference_log is not None:
            events, ts = read_inference(inference_log, pipeline, dead)
            order = np.argsort(ts, kind="stable")
            with steps("judging events", len(order)) as advance:
                for start in range(0, len(order), CHUNK):
                    rows = order[start:start + CHUNK]
                    alerts += pipeline.process_inference([events[i] for i in rows], ts[rows])
                    advance(len(rows))
        if training_stats is not None:
            for ts, _, record in read_stats(training_stats, pipeline, dead):
                alerts += pipeline.process_stats(record, ts)
    finally:
        dead.close()
        if gc_was_enabled:
            gc.enable()
    alerts.sort(key=lambda a: (a.timestamp, a.event.id))
    return ReplayResult(alerts, pipeline.counters.events, pipeline.counters.batches,
                        dead.count, pipeline)


def write_alerts(alerts: list[Alert], path: Path) -> None:
    encoder = msgspec.json.Encoder()
    try:
        with open(path, "wb") as out:
            for alert in alerts:
                out.write(encoder.encode(alert) + b"\n")
    except OSError as exc:
        raise UserError(f"{path}: cannot write alerts: {exc.strerror}") from None
