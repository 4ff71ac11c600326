"""The wire contract: decoding, rejection reasons, shipped JSON Schemas."""

from __future__ import annotations

import json
import re

import jsonschema
import msgspec
import numpy as np
import pytest

from streams.records import (
    MAX_RECORD_BYTES,
    SCHEMAS,
    InferenceEvent,
    Rejected,
    TrainingStatsEvent,
    decode_inference,
    decode_stats,
    event_times,
    schema_of,
    shipped_schema,
)
from tests.conftest import ROOT, SHARED_CONTRACT

CONTRACT = SHARED_CONTRACT


#: The repository's word-for-word copy, up to its own worked example (tests/test_cli.py
#: checks the copy against the shared file where that is present).
MIRROR = ROOT / "docs" / "contract.md"


def contract_examples() -> dict[str, dict]:
    """The JSON examples of the contract, by the section they stand in."""
    if CONTRACT.exists():
        text = CONTRACT.read_text()
    else:
        text = MIRROR.read_text().split("\n## A worked example")[0]
    examples = {}
    for section in text.split("\n## ")[1:]:
        title, _, body = section.partition("\n")
        block = re.search(r"```json\n(.*?)```", body, flags=re.S)
        if block:
            examples[title.strip()] = json.loads(block.group(1).replace("…", ""))
    return examples


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_shipped_schema_is_generated_from_the_types(name):
    assert shipped_schema(name) == schema_of(name), "run `make schemas` and commit"


def test_contract_examples_decode_and_match_the_schemas():
    examples = contract_examples()
    inference = examples["Inference event (one per prediction)"]
    stats = examples["Training-stats event (one per training-data batch)"]
    jsonschema.validate(inference, shipped_schema("inference-event"))
    jsonschema.validate(stats, shipped_schema("training-stats-event"))
    [event] = decode_inference(json.dumps(inference).encode())
    assert isinstance(event, InferenceEvent) and event.client_id == "key-7f3a"
    record, ts = decode_stats(json.dumps(stats).encode())
    assert isinstance(record, TrainingStatsEvent) and record.by_label["1"]["amount"].count == 120
    assert ts == pytest.approx(1795255200.0)


GOOD = {"ts": "2026-11-21T10:00:00.123Z", "model": "m", "client_id": "c", "prediction": 1}


@pytest.mark.parametrize(("change", "field"), [
    ({"client_id": None}, "client_id"),
    ({"model": ""}, "model"),
    ({"model": "x" * 201}, "model"),
    ({"prediction": 1.5}, "prediction"),
    ({"features": [1, "two"]}, "features"),
    ({"probabilities": [0.2, 1.2]}, "probabilities"),
    ({"latency_ms": -1}, "latency_ms"),
])
def test_rejections_name_the_field(change, field):
    record = {**GOOD, **change}
    if change.get("client_id", 0) is None:
        del record["client_id"]
    [rejected] = decode_inference(json.dumps(record).encode())
    assert isinstance(rejected, Rejected)
    assert field in rejected.reason


def test_non_finite_and_non_json_are_rejected():
    for raw in (b'{"ts":1,"model":"m","client_id":"c","prediction":1,"features":[NaN]}',
                b'{"ts":1,"model":"m","client_id":"c","prediction":1,"features":[1e999]}',
                b"not json", b""):
        [rejected] = decode_inference(raw)
        assert isinstance(rejected, Rejected), raw


def test_oversized_record_is_rejected_before_decoding():
    raw = b'{"pad":"' + b"x" * MAX_RECORD_BYTES + b'"}'
    [rejected] = decode_inference(raw)
    assert "1 MiB" in rejected.reason


def test_bad_array_element_goes_alone():
    raw = json.dumps([GOOD, {"ts": 1, "model": "m"}, {**GOOD, "client_id": "d"}]).encode()
    first, bad, last = decode_inference(raw)
    assert first.client_id == "c" and last.client_id == "d"
    assert isinstance(bad, Rejected) and "array element 1" in bad.reason
    assert msgspec.json.decode(bad.raw) == {"ts": 1, "model": "m"}


def test_event_times_accept_rfc3339_and_epoch_and_flag_the_rest():
    ts = event_times(["2026-11-21T10:00:00.5Z", "2026-11-21T11:00:00.5+01:00",
                      1795255200.5, "2026-11-21T10:00:00.5", "yesterday", "2026-13-01T00:00:00Z"])
    assert ts[:4].tolist() == [1795255200.5] * 4
    assert np.isnan(ts[4]) and np.isnan(ts[5])


def test_alert_source_is_an_ip_or_an_address():
    from detectors.base import Verdict
    from streams.alerts import build_alert

    verdict = Verdict(detector="adversarial", rule="adversarial.out_of_distribution", key="m/c",
                      score=7.0, threshold=6.0, events_seen=4, trigger=0, techniques=("AML.T0043",),
                      description="d", evidence={})
    ip = build_alert(verdict, trigger_ts=1e9, model="m", client_id="c", source_ip="2001:db8::1")
    host = build_alert(verdict, trigger_ts=1e9, model="m", client_id="c", source_ip="gateway-7")
    assert msgspec.json.decode(msgspec.json.encode(ip))["source"] == {"ip": "2001:db8::1"}
    assert msgspec.json.decode(msgspec.json.encode(host))["source"] == {"address": "gateway-7"}
    jsonschema.validate(msgspec.json.decode(msgspec.json.encode(host)), shipped_schema("alert"))


# --- hostile records: never an exception, always a reason ----------------------------

EVENT = json.dumps(GOOD).encode()


def _with(extra: bytes) -> bytes:
    return EVENT[:-1] + b", " + extra + b"}"


HOSTILE = {
    "tombstone": None,
    "empty": b"",
    "not json": b"hello",
    "invalid UTF-8 in an unknown key": _with(b'"zz\xff": 1'),
    "invalid UTF-8 in an unknown value": _with(b'"x": {"k": "a\xfe"}'),
    "invalid UTF-8 in a known field": _with(b'"request_id": "a\xffb"'),
    "lone surrogate": _with(b'"request_id": "\\ud800"'),
    "overlong UTF-8": _with(b'"x": "\xc0\xaf"'),
    "float overflow": _with(b'"latency_ms": 1e400'),
    "integer overflow in a float field": _with(b'"features": [1' + b"0" * 400 + b"]"),
    "integer overflow in the label": EVENT.replace(b'"prediction": 1', b'"prediction": 1' + b"0" * 400),
    "huge request id": _with(b'"request_id": "' + b"r" * 5000 + b'"'),
    "deep unknown field": _with(b'"x": ' + b"[" * 100_000 + b"]" * 100_000),
    "deep, within the decoder's reach": _with(b'"x": ' + b"[" * 300 + b"]" * 300),
    "deep objects": _with(b'"x": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5000),
    "number": b"5",
    "string": b'"text"',
    "null": b"null",
    "oversize": _with(b'"pad": "' + b"x" * MAX_RECORD_BYTES + b'"'),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_records_are_rejected_with_a_reason(name):
    [rejected] = decode_inference(HOSTILE[name])
    assert isinstance(rejected, Rejected) and rejected.reason


@pytest.mark.parametrize("name", [n for n in HOSTILE if HOSTILE[n] and HOSTILE[n][:1] == b"{"
                                  and len(HOSTILE[n]) <= MAX_RECORD_BYTES])
def test_a_hostile_array_element_costs_only_itself(name):
    raw = b"[" + EVENT + b", " + HOSTILE[name] + b", " + EVENT + b"]"
    first, bad, last = decode_inference(raw)
    assert isinstance(first, InferenceEvent) and isinstance(last, InferenceEvent)
    assert isinstance(bad, Rejected) and bad.reason.startswith("array element 1: ")
    assert bad.raw == HOSTILE[name]


def test_nesting_is_judged_the_same_wherever_the_decoder_runs():
    """Depth 257 is rejected by the limit, not by the decoder's recursion: also with
    most of the stack in use, and depth 256 passes with little of it left."""
    import sys

    at_limit = _with(b'"x": ' + b"[" * 255 + b"]" * 255)  # the event's object is one level
    over = _with(b'"x": ' + b"[" * 256 + b"]" * 256)

    def deep_call(n, raw):
        return deep_call(n - 1, raw) if n else decode_inference(raw)[0]

    for frames in (0, sys.getrecursionlimit() // 2):
        assert isinstance(deep_call(frames, at_limit), InferenceEvent)
        assert isinstance(deep_call(frames, over), Rejected)


def test_hostile_training_stats_are_rejected_with_a_reason():
    stats = {"ts": "2026-11-21T10:00:00Z", "dataset": "d", "batch_id": "b", "source": "s",
             "n": 5, "features": {"a": {"count": 5}}, "labels": {"0": 5}}
    raw = json.dumps(stats).encode()
    for bad in (None, b"", b"[]", raw.replace(b'"n": 5', b'"n": 1' + b"0" * 400),
                raw.replace(b'"count": 5', b'"count": 1e400'),
                raw.replace(b'"a":', b'"a\xff":'), raw[:-1] + b', "x\xfe": 1}',
                raw[:-1] + b', "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"):
        record, ts = decode_stats(bad)
        assert isinstance(record, Rejected) and record.reason, bad
    record, _ = decode_stats(raw.replace(b'"n": 5', b'"n": 9007199254740992'))
    assert isinstance(record, TrainingStatsEvent)


def test_screen_names_the_element_of_every_rejection():
    from streams.records import screen

    late_bad = dict(GOOD, ts="yesterday")
    raw = json.dumps([GOOD, late_bad, GOOD, {"ts": 1}]).encode()
    result = screen([(raw, "t"), (None, "u"), (json.dumps(late_bad).encode(), "v")])
    assert len(result.events) == 2
    found = sorted(zip([r[0] for r in result.rejected], result.elements,
                       [r[1] for r in result.rejected], strict=True), key=str)
    assert [(tag, element) for tag, element, _ in found] == [("t", 1), ("t", 3), ("u", None),
                                                               ("v", None)]
    assert found[0][2].startswith("array element 1: ts:")


def test_dead_letter_ids_are_deterministic():
    from streams.records import dead_letter_id

    assert dead_letter_id("t", 1, 5, None) == dead_letter_id("t", 1, 5, None)
    ids = {dead_letter_id("t", 1, 5, None), dead_letter_id("t", 1, 5, 0),
           dead_letter_id("t", 1, 6, None), dead_letter_id("t", 2, 5, None),
           dead_letter_id("u", 1, 5, None)}
    assert len(ids) == 5


def test_an_array_too_deep_to_decode_is_split_by_hand_around_strings():
    """Past the decoder's own depth limit the elements are found by hand: commas and
    brackets inside strings (escaped quotes too) do not cut an element."""
    tricky = json.dumps({**GOOD, "request_id": 'a,"]}[{\\', "client_id": "x,y"}).encode()
    deep = _with(b'"x": ' + b"[" * 5000 + b"]" * 5000)
    first, bad, last = decode_inference(b"[ " + tricky + b" ,\n" + deep + b", " + EVENT + b" ]")
    assert first.request_id == 'a,"]}[{\\' and first.client_id == "x,y"
    assert isinstance(bad, Rejected) and bad.raw == deep and "nested" in bad.reason
    assert isinstance(last, InferenceEvent)


def test_event_times_fast_path_takes_no_offset_before_the_z():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy warns when it applies an offset itself
        ts = event_times(["2026-11-21T10:00:00+01Z", "2026-11-21T10:00:00.5-01Z",
                          "2026-11-21T10:00:00ZZ", "2026-11-21T10:00:00.5Z"])
    assert np.isnan(ts[:3]).all() and ts[3] == 1795255200.5


def test_a_time_never_depends_on_its_neighbours():
    values = ["2026-11-21T10:00:00.1234567Z", "2026-11-21T10:00:60Z", "2026-11-21T24:00:00Z",
              "2026-11-21T10:00:00.5Z", "1969-12-31T23:59:59Z"]
    alone = [event_times([v])[0] for v in values]
    together = event_times([*values, "2026-13-45T99:99:99Z"])
    np.testing.assert_array_equal(together[:-1], alone)
    assert np.isnan(together[-1])


def test_an_event_rejected_for_its_time_teaches_the_checks_nothing():
    """Checks may learn from what they pass (an unprofiled model's width is fixed by
    its first event): they see only events with a valid time, in record order."""
    from streams.records import screen

    seen = []

    def check(event):
        seen.append(event.request_id)
        return "features: wrong" if event.request_id == "b" else None

    records = [dict(GOOD, request_id="a", ts="yesterday"), dict(GOOD, request_id="b"),
               dict(GOOD, request_id="c")]
    result = screen([(json.dumps(records).encode(), "t")], check)
    assert seen == ["b", "c"] and [e.request_id for e in result.events] == ["c"]
    assert [(r[1].split(":")[0], e) for r, e in zip(result.rejected, result.elements,
                                                    strict=True)] == [("array element 0", 0),
                                                                      ("array element 1", 1)]
