"""Mutated records for fuzzing the decode path (the worker's and ``replay``'s).

Each mutant is made from a valid inference event and says whether it is
*certainly* bad (null, truncated, invalid UTF-8, overflowing numbers, wrong
types of required fields, nesting over the limit, over 1 MiB) or *maybe* valid
(a flipped bit, a huge but finite number, an optional field set to null): a
maybe-valid mutant is judged or dead-lettered, never lost and never a crash.

Base events are renamed to :data:`FUZZ_MODEL` (profiled with a copy of the real
profile), so valid mutants never touch the real model's state; a single bit flip
cannot turn the name back.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

import msgspec

from streams.records import MAX_NESTING, MAX_RECORD_BYTES

FUZZ_MODEL = "fuzzed-model"
FUZZ_DATASET = "fuzzed-dataset"
INVALID_UTF8 = (b"\xff", b"\xfe", b"\xc3\x28", b"\xa0\xa1", b"\xe2\x28\xa1", b"\xed\xa0\x80",
                b"\xf0\x28\x8c\xbc", b"\xf8\xa1\xa1\xa1\xa1", b"\xc0\xaf", b"\x80")
HUGE = ("1e400", "-1e400", "1" + "0" * 400, "-" + "9" * 500, "1e309", "2e308")
REQUIRED = ("ts", "model", "client_id", "prediction")
WRONG = {
    "ts": ("[]", "{}", "true", "null", '"yesterday"', "-5", '"2026-13-45T99:99:99Z"'),
    "model": ("5", "[]", '""', "null", json.dumps("m" * 201)),
    "client_id": ("7", "{}", '""', "null", "false"),
    "prediction": ("1.5", "[]", "{}", "true", "null"),
    "features": ('"x"', "[[1]]", '{"a": 1}', "[true]", '[1, "two"]', "[null]", "5"),
    "probabilities": ("[2.0]", '"x"', "[-0.1, 1.1]", "[null]"),
    "latency_ms": ("-1", '"fast"', "[]"),
    "request_id": ("5", "[]", json.dumps("r" * 2000)),
    "source_ip": ("{}", "1"),
}
TOP_LEVEL = (b"null", b"5", b'"text"', b"true", b"[1, 2]", b"{}", b"[null]", b"not json",
             b"{", b"]", b"\x00")


@dataclass
class Mutant:
    raw: bytes
    kind: str
    bad: bool  # certainly bad; False: maybe valid


@dataclass
class Line:
    """One record: an event or an array; for an array, its elements' mutants."""

    raw: bytes
    elements: list[Mutant] = field(default_factory=list)  # empty: a single record
    single: Mutant | None = None


def renamed(event: dict) -> dict:
    return {**event, "model": FUZZ_MODEL}


def _with(event: dict, name: str, value_json: str) -> bytes:
    text = msgspec.json.encode({k: v for k, v in event.items() if k != name})
    return text[:-1] + f', "{name}": {value_json}}}'.encode()


BYTE_KINDS = ("flip", "truncate", "utf8")


def byte_mutant(raw: bytes, kind: str, rng: random.Random) -> Mutant:
    """A mutant made on the bytes: a flipped bit, a cut, invalid UTF-8 put in."""
    if kind == "flip":
        i = rng.randrange(len(raw))
        flipped = raw[i] ^ (1 << rng.randrange(8))
        if flipped == 0x0A:  # a new line would split the record in a file
            flipped = raw[i] ^ 0x80
        return Mutant(raw[:i] + bytes([flipped]) + raw[i + 1:], kind, False)
    if kind == "truncate":
        return Mutant(raw[:rng.randrange(1, len(raw))], kind, True)
    i = rng.randrange(len(raw) + 1)
    return Mutant(raw[:i] + rng.choice(INVALID_UTF8) + raw[i:], kind, True)


def mutate(event: dict, rng: random.Random, *, rare: bool = False,
           raw: bytes | None = None) -> Mutant:
    """One mutant of a (renamed) event (``raw``: its JSON, if at hand); ``rare``: a
    big one (over 1 MiB, or nested 100,000 levels deep)."""
    raw = raw if raw is not None else msgspec.json.encode(event)
    if rare and rng.random() < 0.5:
        pad = MAX_RECORD_BYTES + rng.randrange(1, 4096)
        return Mutant(_with(event, "pad", json.dumps("x" * pad)), "oversize", True)
    if rare:
        return Mutant(_with(event, "x", "[" * 100_000 + "]" * 100_000), "deep", True)
    kind = rng.choice(("flip", "flip", "flip", "truncate", "utf8", "huge", "null",
                       "wrong_type", "deep", "top_level", "huge_finite", "optional_null"))
    if kind in BYTE_KINDS:
        return byte_mutant(raw, kind, rng)
    if kind == "huge":
        number = rng.choice(HUGE)
        where = rng.choice(("features", "prediction", "ts", "latency_ms", "probabilities"))
        if where == "features" and event.get("features"):
            features = [repr(v) for v in event["features"]]
            features[rng.randrange(len(features))] = number
            return Mutant(_with(event, "features", "[" + ", ".join(features) + "]"), kind, True)
        if where == "prediction" and not number.lstrip("-").isdigit():
            number = "1" + "0" * 400  # a float is a wrong type there anyway; an int overflow
        return Mutant(_with(event, where if where != "features" else "latency_ms", number),
                      kind, True)
    if kind == "null":
        return Mutant(_with(event, rng.choice(REQUIRED), "null"), kind, True)
    if kind == "optional_null":
        return Mutant(_with(event, rng.choice(("features", "probabilities", "request_id",
                                               "source_ip", "latency_ms")), "null"), kind, False)
    if kind == "wrong_type":
        name = rng.choice(sorted(WRONG))
        return Mutant(_with(event, name, rng.choice(WRONG[name])), kind, True)
    if kind == "deep":
        depth = rng.choice((MAX_NESTING + 1, 300, 1_000, 3_000))
        opener, closer = rng.choice((("[", "]"), ('{"a":', "}")))
        nested = opener * depth + "1" + closer * depth
        return Mutant(_with(event, rng.choice(("x", "features", "extra")), nested), kind, True)
    if kind == "top_level":
        return Mutant(rng.choice(TOP_LEVEL), kind, True)
    # huge but finite: valid by the contract (the pipeline clips it)
    features = event.get("features") or [0.0]
    features = [repr(v) for v in features]
    features[rng.randrange(len(features))] = rng.choice(("1e308", "-1.7976931348623157e308"))
    return Mutant(_with(event, "features", "[" + ", ".join(features) + "]"), "huge_finite", False)


def array_of(events: list[dict], rng: random.Random) -> Line:
    """An array record: each element the event as is, or a mutant of it that keeps
    the array well-formed JSON (a bit flip or a cut can break the array itself:
    those are single mutants)."""
    elements = []
    for event in events:
        if rng.random() < 0.5:
            elements.append(Mutant(msgspec.json.encode(event), "valid", False))
            continue
        m = mutate(event, rng)
        while m.kind == "top_level" and m.raw in (b"{", b"]", b"not json", b"\x00"):
            m = mutate(event, rng)
        if m.kind in ("flip", "truncate", "utf8"):  # invalid UTF-8 inside a string instead
            cut = rng.randrange(1, len(event["client_id"]))
            name = event["client_id"].encode()
            m = Mutant(_with(event, "client_id", "null").replace(
                b'"client_id": null', b'"client_id": "' + name[:cut] + rng.choice(INVALID_UTF8)
                + name[cut:] + b'"'), "utf8", True)
        elements.append(m)
    return Line(b"[" + b", ".join(m.raw for m in elements) + b"]", elements=elements)


def records(events: list[dict], n: int, seed: int = 0, *, rare_every: int = 20_000,
            array_every: int = 20):
    """``n`` records made from ``events`` (renamed to the fuzz model), each a
    :class:`Line`; yields (index of the base event, Line)."""
    rng = random.Random(seed)
    bases = [renamed(e) for e in events]
    raws = [msgspec.json.encode(e) for e in bases]
    for i in range(n):
        base = rng.randrange(len(events))
        event = bases[base]
        if array_every and i % array_every == array_every - 1:
            group = [renamed(events[(base + k) % len(events)])
                     for k in range(rng.randrange(2, 6))]
            group = [{**e, "client_id": event["client_id"], "ts": event["ts"]} for e in group]
            yield base, array_of(group, rng)
            continue
        m = mutate(event, rng, rare=bool(rare_every) and i % rare_every == 7, raw=raws[base])
        yield base, Line(m.raw, single=m)


# --- training stats -----------------------------------------------------------------

STATS_WRONG = {
    "ts": ("[]", "null", '"later"'), "dataset": ("5", '""', "null"), "batch_id": ("[]",),
    "source": ("{}",), "n": ("-1", '"many"', "1.5", "1" + "0" * 400, "1e400"),
    "features": ("[]", '{"a": 5}', '{"a": {"count": -1}}', '{"a": {"count": 1e400}}',
                 '{"a": {"count": 1, "mean": 1e400}}'),
    "labels": ('{"0": -5}', '{"0": 1' + "0" * 400 + "}", "[]"),
}


def renamed_stats(event: dict) -> dict:
    return {**event, "dataset": FUZZ_DATASET}


def mutate_stats(event: dict, rng: random.Random) -> Mutant:
    """One mutant of a (renamed) training-stats event."""
    raw = msgspec.json.encode(event)
    kind = rng.choice(("flip", "flip", "truncate", "utf8", "wrong_type", "null", "deep",
                       "utf8_key"))
    if kind in BYTE_KINDS:
        return byte_mutant(raw, kind, rng)
    if kind == "utf8_key":
        return Mutant(raw[:-1] + b', "x\xff": 1}', kind, True)
    if kind == "wrong_type":
        name = rng.choice(sorted(STATS_WRONG))
        return Mutant(_with(event, name, rng.choice(STATS_WRONG[name])), kind, True)
    if kind == "null":
        return Mutant(_with(event, rng.choice(("ts", "dataset", "n", "features", "labels")),
                            "null"), kind, True)
    depth = rng.choice((MAX_NESTING + 1, 2_000))
    return Mutant(_with(event, "x", "[" * depth + "]" * depth), "deep", True)
