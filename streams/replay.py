"""``modelwatch replay``: the detectors over recorded files, in event-time order."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np

from detectors.config import Thresholds
from detectors.profile import Profile
from streams.files import DeadLetters
from streams.pipeline import Pipeline
from streams.progress import steps, tracked_open
from streams.records import Alert, Rejected, decode_inference, decode_stats
from streams.tabular import UserError

CHUNK = 65_536  # events judged together; a client's results do not depend on it


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
    events, stamps = [], []
    for number, raw in _lines(path, f"reading {path.name}"):
        for record, ts in decode_inference(raw):
            if isinstance(record, Rejected):
                dead.add(str(path), number, record.reason, record.raw or raw)
                continue
            reason = pipeline.reject_reason(record)
            if reason is not None:
                dead.add(str(path), number, reason, msgspec.json.encode(record))
                continue
            events.append(record)
            stamps.append(ts)
    return events, np.array(stamps, dtype=np.float64)


def read_stats(path: Path, dead: DeadLetters):
    batches = []
    for number, raw in _lines(path, f"reading {path.name}"):
        record, ts = decode_stats(raw)
        if isinstance(record, Rejected):
            dead.add(str(path), number, record.reason, raw)
        else:
            batches.append((ts, number, record))
    batches.sort(key=lambda item: (item[0], item[1]))
    return batches


def replay(profiles: list[Profile], thresholds: Thresholds, *, inference_log: Path | None,
           training_stats: Path | None, deadletter: Path | None) -> ReplayResult:
    pipeline = Pipeline(profiles, thresholds)
    dead = DeadLetters(deadletter)
    alerts: list[Alert] = []
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
            for ts, _, record in read_stats(training_stats, dead):
                alerts += pipeline.process_stats(record, ts)
    finally:
        dead.close()
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
