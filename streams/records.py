"""The wire contract (``shared/spec/contract.md`` v1) as typed records.

One validation path for everything that reads events — ``replay``, ``tail``
and the worker: :func:`decode_inference` and :func:`decode_stats` turn raw
bytes into records or a :class:`Rejected` with a reason that names the field.
The JSON Schema files shipped in ``streams/schemas/`` are generated from these
same types (``python -m streams.records``) and checked by a test.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Annotated

import msgspec
import numpy as np
from msgspec import Meta, Struct

MAX_RECORD_BYTES = 1 << 20
MAX_EPOCH = 253402300799.0  # 9999-12-31T23:59:59Z: what RFC 3339 can write
# Nesting deeper than this is rejected before decoding: the decoder recurses, and its
# own limit (Python's, ~1,000 levels less the caller's frames) would make the verdict
# depend on where it runs. An event of the contract nests 3 levels, a stats event 5.
MAX_NESTING = 256
# Counts above 2**53 are not exact in JSON (a double), and 10**400 overflowed the
# detectors' floats; integers beyond 64 bits are not labels anyone serves.
MAX_COUNT = 2**53
MAX_TEXT = 1024  # identifiers carried into alerts (request id, source, version)
Name = Annotated[str, Meta(min_length=1, max_length=200)]
Text = Annotated[str, Meta(max_length=MAX_TEXT)]
Probability = Annotated[float, Meta(ge=0.0, le=1.0)]
Count = Annotated[int, Meta(ge=0, le=MAX_COUNT)]
Label = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]
Timestamp = Annotated[str | float, Meta(description="RFC 3339 string, or epoch seconds")]


class InferenceEvent(Struct, kw_only=True, omit_defaults=True, gc=False):
    """One prediction served by a model."""

    ts: Timestamp
    model: Name
    client_id: Name
    prediction: str | Label
    features: list[float] | None = None
    probabilities: list[Probability] | None = None
    request_id: Text | None = None
    source_ip: Text | None = None
    model_version: Text | None = None
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
    # Optional addition: per label, rows that the profile's reference classifier puts in
    # each class (a flipped label shows as rows of one label classified as another).
    reference_classes: dict[str, dict[str, Count]] | None = None
    # Optional addition: the same by the profile's linear classifier.
    linear_classes: dict[str, dict[str, Count]] | None = None


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
_array = msgspec.json.Decoder(list[msgspec.Raw])
_stats = msgspec.json.Decoder(TrainingStatsEvent)
_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"', re.S)
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_UTC_STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,9})?Z", re.ASCII)


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


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return text.replace("`", "") if text else type(exc).__name__


def unreadable(raw) -> str | None:
    """Why a record cannot even be looked at as JSON text: no value (a Kafka
    tombstone), not bytes, over the size limit. None if it can."""
    if raw is None:
        return "not JSON: the record has no value (null: a Kafka tombstone)"
    if not isinstance(raw, bytes | bytearray | memoryview):
        return f"not JSON: the record is a {type(raw).__name__}, not bytes"
    if len(raw) > MAX_RECORD_BYTES:
        return f"record is {len(raw)} bytes, over the 1 MiB limit"
    return None


def _not_utf8(raw: bytes) -> str | None:
    """JSON text is UTF-8 throughout (RFC 8259), unknown fields and keys included:
    the decoder skips what it does not need without looking at it."""
    if raw.isascii():
        return None
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"JSON is malformed: invalid UTF-8 (byte {exc.start})"
    return None


def _structure(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The record's bytes, and where they stand outside strings (vectorized: a quote
    counts unless an odd run of backslashes precedes it)."""
    b = np.frombuffer(raw, dtype=np.uint8)
    n = len(b)
    position = np.arange(n)
    last_plain = np.maximum.accumulate(np.where(b != 0x5C, position, -1))
    quotes = np.flatnonzero(b == 0x22)
    before = quotes - 1
    run = np.where(before >= 0, before - last_plain[np.maximum(before, 0)], 0)
    real = quotes[run % 2 == 0]
    toggles = np.zeros(n + 1, dtype=np.int8)
    toggles[real] = 1
    inside = (np.cumsum(toggles[:n], dtype=np.int64) % 2 == 1)
    return b, ~inside  # a closing quote counts as inside: no bracket is one


def _depths(b: np.ndarray, outside: np.ndarray) -> np.ndarray:
    step = (outside & ((b == 0x5B) | (b == 0x7B))).astype(np.int64) \
        - (outside & ((b == 0x5D) | (b == 0x7D)))
    return np.cumsum(step)


def nesting(raw: bytes) -> int:
    """How deep arrays and objects nest (outside strings); a bound when that is enough.

    Exact only when the record holds more than ``MAX_NESTING`` opening brackets:
    below that, their count is returned, which no depth can exceed.
    """
    opening = raw.count(b"[") + raw.count(b"{")
    if opening <= MAX_NESTING:
        return opening
    brackets = np.frombuffer(_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS), dtype=np.uint8)
    if not len(brackets):
        return 0
    step = np.where((brackets == 0x5B) | (brackets == 0x7B), 1, -1).astype(np.int32)
    return int(np.cumsum(step).max())


TOO_DEEP = f"JSON is nested over {MAX_NESTING} levels deep"


def _decoded(decoder, raw):
    """``decoder.decode(raw)``, or the reason why not. The decoder recurses: its own
    limit (~1,000 levels, less the caller's frames) rejects the deepest records
    cheaply, and :func:`nesting` the rest beyond ``MAX_NESTING``, so the verdict
    does not depend on where it runs."""
    try:
        value = decoder.decode(raw)
    except msgspec.DecodeError as exc:
        return None, _reason(exc)
    except RecursionError:
        return None, TOO_DEEP
    if nesting(raw) > MAX_NESTING:
        return None, TOO_DEEP
    return value, None


def _split_array(raw: bytes) -> list[bytes] | None:
    """The elements of a top-level JSON array, as bytes, found without decoding them
    (their nesting may be too deep for the decoder); None if ``raw`` is no array."""
    text = raw.strip()
    if text[:1] != b"[" or text[-1:] != b"]":
        return None
    body = text[1:-1]
    b, outside = _structure(body)
    commas = np.flatnonzero(outside & (b == 0x2C) & (_depths(b, outside) == 0))
    cuts = [0, *(commas + 1).tolist(), len(body) + 1]
    elements = [body[a:z - 1].strip() for a, z in zip(cuts[:-1], cuts[1:], strict=True)]
    return [] if elements == [b""] else elements


def decode_inference(raw: bytes) -> list[InferenceEvent | Rejected]:
    """Decode one record (an event or a JSON array of events), in array order.

    Never raises: whatever ``raw`` is (None, not JSON, invalid UTF-8 anywhere,
    nested without end, numbers out of range), the answer is a list of events
    and :class:`Rejected`. A malformed element of an array becomes a
    :class:`Rejected` alone; its neighbours are kept. Event times are parsed in
    bulk by :func:`event_times`, model-specific checks (feature count) happen in
    :func:`check_against`.
    """
    problem = unreadable(raw)
    if problem is not None:
        return [Rejected(problem)]
    if not isinstance(raw, bytes):
        raw = bytes(raw)
    utf8 = _not_utf8(raw)
    if raw.lstrip()[:1] != b"[":
        if utf8 is not None:
            return [Rejected(utf8)]
        event, problem = _decoded(_inference_or_array, raw)
        return [Rejected(problem) if problem is not None else event]
    # An array: whatever is wrong inside one element costs only that one.
    try:
        elements = _array.decode(raw)
    except (msgspec.DecodeError, RecursionError) as exc:
        # Too deep for the decoder to skip over, or one element broken in a way it
        # cannot skip (an invalid \u escape): split by hand, judge each element alone.
        elements = _split_array(raw)
        if elements is None:
            return [Rejected(TOO_DEEP if isinstance(exc, RecursionError) else _reason(exc))]
    # Nesting and UTF-8 are looked at element by element only where they could be wrong.
    plain = utf8 is None and raw.count(b"[") + raw.count(b"{") <= MAX_NESTING
    out = []
    for position, element in enumerate(elements):
        if plain:
            try:
                out.append(_inference.decode(element))
                continue
            except msgspec.DecodeError as exc:
                element, problem = bytes(element), _reason(exc)
        else:
            element = bytes(element)
            problem = _not_utf8(element) if utf8 is not None else None
            if problem is None:
                event, problem = _decoded(_inference, element)
                if problem is None:
                    out.append(event)
                    continue
        out.append(Rejected(f"array element {position}: {problem}", element))
    return out


def event_times(values: list) -> np.ndarray:
    """Epoch seconds for a list of ``ts`` values; NaN where a value is not a valid time."""
    out = np.full(len(values), np.nan)
    # The fast path takes only the full "YYYY-MM-DDTHH:MM:SS[.fff]Z" form, exactly:
    # numpy reads more (offsets, odd separators as a time zone, with a warning) than
    # the slow path accepts.
    utc = [i for i, v in enumerate(values) if isinstance(v, str) and _UTC_STAMP.fullmatch(v)]
    done: set[int] = set()
    if utc:
        # numpy parses the common "...Z" form some twenty times faster. A value it
        # cannot read fails the whole array: then each is read alone, so that a
        # value's time never depends on its neighbours (the slow path reads a few
        # forms differently).
        strings = [values[i][:-1] for i in utc]
        try:
            stamps = np.array(strings, dtype="datetime64[us]")
        except (ValueError, OverflowError, TypeError):
            stamps = np.array([_stamp(s) for s in strings], dtype="datetime64[us]")
        with np.errstate(invalid="ignore"):
            epochs = stamps.astype(np.int64) / 1e6
        ok = (~np.isnat(stamps)) & (epochs >= 0) & (epochs <= MAX_EPOCH)
        out[np.array(utc)[ok]] = epochs[ok]
        done = {i for i, good in zip(utc, ok, strict=True) if good}
    for i, value in enumerate(values):
        if i in done:
            continue
        with contextlib.suppress(ValueError, OverflowError, TypeError):
            out[i] = parse_ts(value)
    return out


def _stamp(text: str) -> np.datetime64:
    try:
        return np.datetime64(text, "us")
    except (ValueError, OverflowError, TypeError):
        return np.datetime64("NaT", "us")


def bad_time(value) -> Rejected:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:80] + f"… ({len(shown)} characters)"
    return Rejected(f"ts: not an RFC 3339 time or epoch seconds: {shown}")


class Screened(Struct, gc=False):
    """Records that passed, with their times and tags, and those that did not.

    ``rejected`` holds (tag, reason, original bytes); ``elements`` says, for each,
    which element of its record it was (None: the record itself).
    """

    events: list
    ts: np.ndarray
    tags: list
    rejected: list  # (tag, reason, original bytes)
    elements: list  # per rejected: the array element's index, or None


def screen(items, check=None) -> Screened:
    """Decode and validate ``(raw record, tag)`` pairs in one pass; never raises on
    what a record holds.

    Times are parsed in bulk, then ``check(event)`` adds model-specific reasons
    (feature count), in record order, for events with a valid time only: a check
    may learn from what it passes (an unprofiled model's width), and an event
    rejected anyway must not teach it. A rejected record keeps its original
    bytes: the line itself, or its own array element; only a valid-looking
    element of an array, rejected later, is re-encoded. A reason about an array
    element starts with "array element N: ".
    """
    decoded, tags, where, raws, rejected, elements = [], [], [], [], [], []
    for raw, tag in items:
        records = decode_inference(raw)
        single = len(records) == 1 and not (isinstance(raw, bytes | bytearray)
                                            and raw.lstrip()[:1] == b"[")
        for position, record in enumerate(records):
            if isinstance(record, Rejected):  # only an element's rejection has its raw
                rejected.append((tag, record.reason, raw if record.raw is None else record.raw))
                elements.append(None if record.raw is None else position)
                continue
            decoded.append(record)
            tags.append(tag)
            where.append(None if single else position)
            raws.append(raw)
    times = event_times([e.ts for e in decoded])
    events, kept_tags, keep = [], [], []
    for i, (event, no_time) in enumerate(zip(decoded, np.isnan(times).tolist(), strict=True)):
        if no_time:
            reason = bad_time(event.ts).reason
        else:
            reason = check(event) if check is not None else None
            if reason is None:
                events.append(event)
                kept_tags.append(tags[i])
                keep.append(i)
                continue
        if where[i] is None:
            rejected.append((tags[i], reason, raws[i]))
        else:
            rejected.append((tags[i], f"array element {where[i]}: {reason}",
                             msgspec.json.encode(event)))
        elements.append(where[i])
    return Screened(events, times[keep], kept_tags, rejected, elements)


def decode_stats(raw: bytes) -> tuple[TrainingStatsEvent | Rejected, float]:
    """One training-stats record, or why not; never raises on what the record holds."""
    problem = unreadable(raw)
    if problem is not None:
        return Rejected(problem), math.nan
    if not isinstance(raw, bytes):
        raw = bytes(raw)
    problem = _not_utf8(raw)
    if problem is not None:
        return Rejected(problem), math.nan
    event, problem = _decoded(_stats, raw)
    if problem is not None:
        return Rejected(problem), math.nan
    try:
        return event, parse_ts(event.ts)
    except (ValueError, OverflowError, TypeError):
        return bad_time(event.ts), math.nan


def dead_letter_id(topic: str, partition: int, offset: int, element: int | None) -> str:
    """The same record (and element of it) gives the same id, after a restart too,
    so a consumer of the dead letters can drop repeats."""
    where = f"v1|{topic}|{partition}|{offset}|{'' if element is None else element}"
    return hashlib.sha256(where.encode()).hexdigest()[:32]


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


def partition_of(client_id: str, partitions: int) -> int:
    """The partition Kafka's default (murmur2) partitioner gives a record keyed by this
    client id: what ``tail`` sends it to, and the shard ``replay --partitions`` puts it in."""
    from kafka.partitioner.default import murmur2

    return (murmur2(client_id.encode()) & 0x7FFFFFFF) % partitions
