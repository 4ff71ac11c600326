"""The wire contract (``shared/spec/contract.md`` v1) as typed records.

One validation path for everything that reads events — ``replay``, ``tail``
and the worker: :func:`decode_inference` and :func:`decode_stats` turn raw
bytes into records or a :class:`Rejected` with a reason that names the field.
The JSON Schema files shipped in ``streams/schemas/`` are generated from these
same types (``python -m streams.records``) and checked by a test.
"""

from __future__ import annotations

import contextlib
import json
import math
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Annotated

import msgspec
import numpy as np
from msgspec import Meta, Struct

MAX_RECORD_BYTES = 1 << 20
MAX_EPOCH = 253402300799.0  # 9999-12-31T23:59:59Z: what RFC 3339 can write
Name = Annotated[str, Meta(min_length=1, max_length=200)]
Probability = Annotated[float, Meta(ge=0.0, le=1.0)]
Count = Annotated[int, Meta(ge=0)]
Timestamp = Annotated[str | float, Meta(description="RFC 3339 string, or epoch seconds")]


class InferenceEvent(Struct, kw_only=True, omit_defaults=True, gc=False):
    """One prediction served by a model."""

    ts: Timestamp
    model: Name
    client_id: Name
    prediction: str | int
    features: list[float] | None = None
    probabilities: list[Probability] | None = None
    request_id: str | None = None
    source_ip: str | None = None
    model_version: str | None = None
    latency_ms: Annotated[float, Meta(ge=0.0)] | None = None


class Histogram(Struct, omit_defaults=True):
    edges: list[float]
    counts: list[Count]


class FeatureStats(Struct, kw_only=True, omit_defaults=True):
    count: Count
    nulls: Count = 0
    mean: float | None = None
    std: float | None = None
    min: float | None = None
    max: float | None = None
    hist: Histogram | None = None
    # Optional additions: values below the first / above the last histogram edge,
    # and values beyond the edges by more than the edges' whole span.
    below: Count | None = None
    above: Count | None = None
    far: Count | None = None


class ClassMoments(Struct, kw_only=True, omit_defaults=True):
    count: Count
    mean: float | None = None
    std: float | None = None


class TrainingStatsEvent(Struct, kw_only=True, omit_defaults=True):
    """Statistics of one training-data batch (see ``modelwatch stats``)."""

    ts: Timestamp
    dataset: Name
    batch_id: Name
    source: Name
    n: Count
    features: dict[str, FeatureStats]
    labels: dict[str, Count]
    by_label: dict[str, dict[str, ClassMoments]] | None = None
    # Optional addition: rows that repeat an earlier row of the same batch.
    duplicates: Count | None = None


# --- alerts (ECS 8.x) -------------------------------------------------------------

class AlertEvent(Struct, kw_only=True):
    kind: str
    category: list[str]
    type: list[str]
    id: str
    severity: int
    risk_score: float
    created: str
    dataset: str
    module: str


class AlertRule(Struct, kw_only=True):
    name: str
    category: str
    description: str
    version: str


class AtlasRef(Struct, kw_only=True, omit_defaults=True):
    """ECS ``threat.tactic`` / ``threat.technique.subtechnique``: parallel arrays."""

    id: list[str]
    name: list[str]
    reference: list[str] | None = None


class Technique(Struct, omit_defaults=True):
    id: list[str]
    name: list[str]
    # Optional additions (ECS): links to ATLAS, and the sub-techniques of the ids above.
    reference: list[str] | None = None
    subtechnique: AtlasRef | None = None


class Threat(Struct, omit_defaults=True):
    framework: str
    technique: Technique
    tactic: AtlasRef | None = None  # optional addition (ECS threat.tactic.*)


class Trigger(Struct, kw_only=True):
    request_id: str | None
    ts: str


class AlertDetail(Struct, kw_only=True):
    detector: str
    model: str | None
    client_id: str | None
    dataset: str | None
    batch_id: str | None
    source: str | None
    score: float
    threshold: float
    events_seen: int
    trigger: Trigger
    evidence: dict[str, float | int | str]


class UserRef(Struct):
    id: str


class SourceRef(Struct, kw_only=True, omit_defaults=True):
    ip: str | None = None
    address: str | None = None


class EcsRef(Struct):
    version: str


class Alert(Struct, kw_only=True, omit_defaults=True, rename={"timestamp": "@timestamp"}):
    timestamp: str
    event: AlertEvent
    rule: AlertRule
    threat: Threat
    modelwatch: AlertDetail
    message: str
    user: UserRef | None = None
    source: SourceRef | None = None
    ecs: EcsRef | None = None  # optional addition: ECS requires ecs.version


# --- decoding ---------------------------------------------------------------------

class Rejected(Struct):
    """A record that breaks the contract, with the reason (naming the field).

    ``raw`` is the offending array element when the record was an array.
    """

    reason: str
    raw: bytes | None = None


_inference = msgspec.json.Decoder(InferenceEvent)
_inference_or_array = msgspec.json.Decoder(InferenceEvent | list[msgspec.Raw])
_stats = msgspec.json.Decoder(TrainingStatsEvent)


def parse_ts(value: str | float) -> float:
    """Event time in epoch seconds; naive RFC 3339 strings are taken as UTC."""
    if isinstance(value, str):
        stamp = datetime.fromisoformat(value)
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=UTC)
        epoch = stamp.timestamp()
        if not 0.0 <= epoch <= MAX_EPOCH:
            raise ValueError("before 1970")
        return epoch
    if not (math.isfinite(value) and 0.0 <= value <= MAX_EPOCH):
        raise ValueError("outside 1970-01-01..9999-12-31")
    return float(value)


def format_ts(epoch: float) -> str:
    """RFC 3339 UTC with milliseconds, as in the contract's examples."""
    stamp = datetime.fromtimestamp(epoch, UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


def _reason(exc: Exception) -> str:
    text = str(exc)
    return text.replace("`", "") if text else type(exc).__name__


def decode_inference(raw: bytes) -> list[InferenceEvent | Rejected]:
    """Decode one record (an event or a JSON array of events), in array order.

    A malformed element becomes a :class:`Rejected` alone; its neighbours are
    kept. Event times are parsed in bulk by :func:`event_times`, model-specific
    checks (feature count) happen in :func:`check_against`.
    """
    if len(raw) > MAX_RECORD_BYTES:
        return [Rejected(f"record is {len(raw)} bytes, over the 1 MiB limit")]
    try:
        decoded = _inference_or_array.decode(raw)
    except msgspec.DecodeError as exc:
        return [Rejected(_reason(exc))]
    if isinstance(decoded, InferenceEvent):
        return [decoded]
    out = []
    for position, element in enumerate(decoded):
        try:
            out.append(_inference.decode(element))
        except msgspec.DecodeError as exc:
            out.append(Rejected(f"array element {position}: {_reason(exc)}", bytes(element)))
    return out


def event_times(values: list) -> np.ndarray:
    """Epoch seconds for a list of ``ts`` values; NaN where a value is not a valid time."""
    out = np.full(len(values), np.nan)
    # The fast path takes only the full "YYYY-MM-DDTHH:MM:SS[.fff]Z" form.
    utc = [i for i, v in enumerate(values)
           if isinstance(v, str) and len(v) >= 20 and v[-1] == "Z" and v[10] == "T" and v[4] == "-"]
    if utc:
        try:  # numpy parses the common "...Z" form some twenty times faster
            stamps = np.array([values[i][:-1] for i in utc], dtype="datetime64[us]")
            epochs = stamps.astype(np.int64) / 1e6
            ok = (~np.isnat(stamps)) & (epochs >= 0) & (epochs <= MAX_EPOCH)
            out[np.array(utc)[ok]] = epochs[ok]
            done = {i for i, good in zip(utc, ok, strict=True) if good}
        except ValueError:
            done = set()
    else:
        done = set()
    for i, value in enumerate(values):
        if i in done:
            continue
        with contextlib.suppress(ValueError, OverflowError, TypeError):
            out[i] = parse_ts(value)
    return out


def bad_time(value) -> Rejected:
    return Rejected(f"ts: not an RFC 3339 time or epoch seconds: {value!r}")


class Screened(Struct, gc=False):
    """Records that passed, with their times and tags, and those that did not."""

    events: list
    ts: np.ndarray
    tags: list
    rejected: list  # (tag, reason, original bytes)


def screen(items, check=None) -> Screened:
    """Decode and validate ``(raw record, tag)`` pairs in one pass.

    ``check(event)`` adds model-specific reasons (feature count). A rejected
    record keeps its original bytes: the line itself, or its own array element;
    only a valid-looking element of an array, rejected later, is re-encoded.
    Times are parsed in bulk at the end.
    """
    events, tags, single, raws, rejected = [], [], [], [], []
    for raw, tag in items:
        records = decode_inference(raw)
        for record in records:
            if isinstance(record, Rejected):
                rejected.append((tag, record.reason, record.raw or raw))
                continue
            reason = check(record) if check is not None else None
            if reason is not None:
                rejected.append((tag, reason, raw if len(records) == 1 else
                                 msgspec.json.encode(record)))
                continue
            events.append(record)
            tags.append(tag)
            single.append(len(records) == 1)
            raws.append(raw)
    ts = event_times([e.ts for e in events])
    bad = np.isnan(ts)
    if bad.any():
        for i in np.flatnonzero(bad):
            rejected.append((tags[i], bad_time(events[i].ts).reason,
                             raws[i] if single[i] else msgspec.json.encode(events[i])))
        keep = ~bad
        events = [e for e, k in zip(events, keep, strict=True) if k]
        tags = [t for t, k in zip(tags, keep, strict=True) if k]
        ts = ts[keep]
    return Screened(events, ts, tags, rejected)


def decode_stats(raw: bytes) -> tuple[TrainingStatsEvent | Rejected, float]:
    if len(raw) > MAX_RECORD_BYTES:
        return Rejected(f"record is {len(raw)} bytes, over the 1 MiB limit"), math.nan
    try:
        event = _stats.decode(raw)
    except msgspec.DecodeError as exc:
        return Rejected(_reason(exc)), math.nan
    try:
        return event, parse_ts(event.ts)
    except (ValueError, OverflowError):
        return bad_time(event.ts), math.nan


def check_against(event: InferenceEvent, n_features: int, n_classes: int) -> str | None:
    """Why an event breaks its model's profile, or None."""
    if event.features is not None and len(event.features) != n_features:
        return f"features: expected {n_features} values for model {event.model}, got {len(event.features)}"
    if event.probabilities is not None and len(event.probabilities) != n_classes:
        return (f"probabilities: expected {n_classes} values for model {event.model}, "
                f"got {len(event.probabilities)}")
    return None


# --- JSON Schema ------------------------------------------------------------------

SCHEMAS = {
    "inference-event": InferenceEvent,
    "training-stats-event": TrainingStatsEvent,
    "alert": Alert,
}


def schema_of(name: str) -> dict:
    schema = msgspec.json.schema(SCHEMAS[name])
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"https://modelwatch.dev/schemas/v1/{name}.json",
            "title": f"modelwatch {name} (contract v1)", **schema}


def shipped_schema(name: str) -> dict:
    """The schema file shipped in the package."""
    return json.loads(resources.files("streams").joinpath(f"schemas/{name}.json").read_text())


def write_schemas(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in SCHEMAS:
        (folder / f"{name}.json").write_text(json.dumps(schema_of(name), indent=2) + "\n")


if __name__ == "__main__":
    write_schemas(Path(__file__).parent / "schemas")
