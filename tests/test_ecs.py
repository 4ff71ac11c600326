"""Every alert is valid ECS by ECS's own field definitions, and its OCSF form a valid
Detection Finding (class 2004): the demo's alerts and a fuzzed set of verdicts.

The definitions are slices of the real schemas, vendored in tests/data (each file
names its release and source; tests/data/vendor_slices.py writes them).
"""

from __future__ import annotations

import ipaddress
import json
import math
import string
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import msgspec
import numpy as np
import pytest

from detectors.base import ATLAS, Verdict
from detectors.rules import EVASION, EXTRACT, POISON, QUERY_BASED
from streams.alerts import ECS_VERSION, SEVERITY_BANDS, atlas_parent, build_alert
from streams.metrics import RULES
from streams.sinks.formats import OCSF_VERSION, ocsf

DATA = Path(__file__).parent / "data"
ECS = json.loads((DATA / "ecs_fields.json").read_text())
OCSF = json.loads((DATA / "ocsf_detection_finding.json").read_text())
CUSTOM = "modelwatch"  # our own namespace: not an ECS field set


# --- ECS ---------------------------------------------------------------------------


def flatten(doc: dict, prefix: str = "") -> Iterator[tuple[str, object]]:
    """(dotted ECS path, value) of every leaf; our namespace stays one leaf."""
    for key, value in doc.items():
        path = prefix + key
        spec = ECS["fields"].get(path, {})
        if isinstance(value, dict) and path != CUSTOM and spec.get("type") not in (
                "object", "flattened", "nested"):
            yield from flatten(value, path + ".")
        else:
            yield path, value


def _rfc3339(text: object) -> bool:
    try:
        datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return False
    return isinstance(text, str)


def _ip(text: object) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return isinstance(text, str)


ECS_TYPES = {
    "keyword": lambda v: isinstance(v, str),
    "constant_keyword": lambda v: isinstance(v, str),
    "wildcard": lambda v: isinstance(v, str),
    "match_only_text": lambda v: isinstance(v, str),
    "text": lambda v: isinstance(v, str),
    "long": lambda v: isinstance(v, int) and not isinstance(v, bool) and -2**63 <= v < 2**63,
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool) and -2**31 <= v < 2**31,
    "float": lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v),
    "scaled_float": lambda v: isinstance(v, int | float) and not isinstance(v, bool)
    and math.isfinite(v),
    "boolean": lambda v: isinstance(v, bool),
    "date": _rfc3339,
    "ip": _ip,
    "object": lambda v: isinstance(v, dict),
    "flattened": lambda v: isinstance(v, dict),
}


def ecs_problems(alert: dict) -> list[str]:
    """What in ``alert`` breaks ECS's field definitions (empty when nothing does)."""
    fields, problems = ECS["fields"], []
    if (alert.get("ecs") or {}).get("version") != ECS["ecs_version"]:
        problems.append(f"ecs.version is {(alert.get('ecs') or {}).get('version')!r}, "
                        f"not {ECS['ecs_version']}")
    if "@timestamp" not in alert:
        problems.append("@timestamp missing")
    for path, value in flatten(alert):
        if path == CUSTOM:
            continue
        spec = fields.get(path)
        if spec is None:
            problems.append(f"{path}: not an ECS field")
            continue
        if value is None:
            problems.append(f"{path}: null")
            continue
        is_array = "array" in spec.get("normalize", [])
        if is_array and not isinstance(value, list):
            problems.append(f"{path}: ECS expects an array")
        if isinstance(value, list) and not is_array:
            problems.append(f"{path}: an array where ECS expects one value")
        for item in value if isinstance(value, list) else [value]:
            if not ECS_TYPES[spec["type"]](item):
                problems.append(f"{path}: {item!r} is not of ECS type {spec['type']}")
            allowed = spec.get("allowed_values")
            if allowed is not None and item not in allowed:
                problems.append(f"{path}: {item!r} is not one of ECS's values")
    event = alert.get("event") or {}
    expected = fields["event.category"]["allowed_values"]
    categories, types = ([v] if isinstance(v, str) else v or []
                         for v in (event.get("category"), event.get("type")))
    for kind in types:
        if not any(kind in (expected.get(c) or []) for c in categories):
            problems.append(f"event.type {kind!r} is expected with none of the categories "
                            f"{categories}")
    for category in categories:
        if expected.get(category) and not set(expected[category]) & set(types):
            problems.append(f"event.category {category!r} has none of its expected types "
                            f"{expected[category]}")
    return problems + atlas_problems(alert)


def atlas_problems(alert: dict) -> list[str]:
    """ECS's shape for ATT&CK-style ids: techniques in technique.id, sub-techniques in
    technique.subtechnique.id with their parent listed, parallel id/name arrays."""
    problems = []
    technique = alert["threat"]["technique"]
    sub = technique.get("subtechnique") or {}
    for where, ref in (("threat.technique", technique), ("threat.technique.subtechnique", sub),
                       ("threat.tactic", alert["threat"].get("tactic") or {})):
        lengths = {len(ref[k]) for k in ("id", "name", "reference") if k in ref}
        if len(lengths) > 1:
            problems.append(f"{where}: id, name and reference differ in length")
    for tid in technique["id"]:
        if atlas_parent(tid) != tid:
            problems.append(f"threat.technique.id: {tid} is a sub-technique")
    for sid in sub.get("id", []):
        if atlas_parent(sid) == sid or atlas_parent(sid) not in technique["id"]:
            problems.append(f"threat.technique.subtechnique.id: {sid} without its parent")
    return problems


# --- OCSF --------------------------------------------------------------------------


def _base(kind: str) -> str:
    while OCSF["types"].get(kind):
        kind = OCSF["types"][kind]
    return kind


OCSF_TYPES = {
    "string_t": lambda v: isinstance(v, str),
    "integer_t": lambda v: isinstance(v, int) and not isinstance(v, bool) and -2**31 <= v < 2**31,
    "long_t": lambda v: isinstance(v, int) and not isinstance(v, bool) and -2**63 <= v < 2**63,
    "float_t": lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v),
    "boolean_t": lambda v: isinstance(v, bool),
    "json_t": lambda v: True,
    "object": lambda v: isinstance(v, dict),
}


def ocsf_problems(doc: dict, attributes: dict | None = None, constraints: dict | None = None,
                  where: str = "") -> list[str]:
    """What in ``doc`` breaks OCSF 1.8.0's Detection Finding (or the object at ``where``)."""
    attributes = OCSF["class"]["attributes"] if attributes is None else attributes
    problems = []
    for name, spec in attributes.items():
        if spec["requirement"] == "required" and not spec.get("profile") and name not in doc:
            problems.append(f"{where}{name}: required, missing")
    for names in (constraints or {}).values():
        if not any(n in doc for n in names):
            problems.append(f"{where or '(class)'}: needs at least one of {names}")
    for name, value in doc.items():
        spec = attributes.get(name)
        if spec is None:
            problems.append(f"{where}{name}: not an attribute here")
            continue
        if bool(spec.get("is_array")) != isinstance(value, list):
            problems.append(f"{where}{name}: is_array is {bool(spec.get('is_array'))}")
        for item in value if isinstance(value, list) else [value]:
            problems += _ocsf_value(f"{where}{name}", item, spec, doc)
    return problems


def _ocsf_value(path: str, value, spec: dict, parent: dict) -> list[str]:
    kind = spec["type"]
    if kind in OCSF["objects"]:
        if not isinstance(value, dict):
            return [f"{path}: not an object"]
        target = OCSF["objects"][kind]
        return ocsf_problems(value, target["attributes"], target["constraints"], path + ".")
    base = _base(kind)
    if base not in OCSF_TYPES:
        return [f"{path}: object type {kind} is not in the vendored slice"]
    if not OCSF_TYPES[base](value):
        return [f"{path}: {value!r} is not a {kind}"]
    if kind == "ip_t" and not _ip(value):
        return [f"{path}: {value!r} is not an IP address"]
    enum = spec.get("enum")
    if enum is not None:
        if str(value) not in enum:
            return [f"{path}: {value!r} is not one of {sorted(enum)}"]
        sibling = spec.get("sibling")
        if sibling in parent and value != 99 and parent[sibling] != enum[str(value)]:
            return [f"{path}: its sibling {sibling} is {parent[sibling]!r}, "
                    f"not {enum[str(value)]!r}"]
    return []


# --- the alerts --------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_alerts(demo) -> list[dict]:
    """The demo scenario replayed: the alerts a user sees first."""
    from detectors.config import load_thresholds
    from streams.files import load_profile
    from streams.replay import replay

    _, paths = demo
    result = replay([load_profile(paths["profile"])], load_thresholds(),
                    inference_log=paths["inference.jsonl"], training_stats=paths["stats"],
                    deadletter=None)
    return [msgspec.json.decode(msgspec.json.encode(a)) for a in result.alerts]


TECHNIQUES = (EXTRACT, QUERY_BASED, EVASION, POISON, ("AML.T0043.002",),
              ("AML.T0043", "AML.T0043.002", "AML.T0043.001"), ("AML.T0024.002", "AML.T0020"))
AWKWARD = ["", "\x00", "\x1b[2J", "\u0085", "\u2028", "\u2029", "\u202e", "é", "鍵", "=|\\",
           "\r\n", "\x9b", "\x7f", " "]


def _text(rng: np.random.Generator, longest: int) -> str:
    size = int(rng.integers(1, longest + 1))
    pieces = []
    while sum(map(len, pieces)) < size:
        pieces.append(str(rng.choice(AWKWARD)) if rng.random() < 0.3 else
                      "".join(rng.choice(list(string.printable), int(rng.integers(1, 12)))))
    return "".join(pieces)[:size] or "k"


def _number(rng: np.random.Generator) -> float:
    return float(rng.choice([0.0, 1e-300, -3.0, math.inf, -math.inf, math.nan, 1e308,
                             float(rng.exponential(1.0)), float(rng.uniform(0, 100))]))


def _address(rng: np.random.Generator) -> str | None:
    return rng.choice(np.array([None, "", "203.0.113.7", "2001:db8::1", "::ffff:192.0.2.9",
                                "gateway-7", "fe80::1%eth0", "not an ip\x00\u2028",
                                "10.0.0.256", _text(rng, 300)], dtype=object))


def fuzzed_alerts(n: int, seed: int = 0) -> list[dict]:
    """Alerts of ``n`` random verdicts: every rule, odd numbers, hostile text."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        rule = str(rng.choice([*RULES, "extraction.new_rule"]))
        family = rule.split(".")[0]
        evidence = {f"e{j}": rng.choice(np.array(
            [np.float64(_number(rng)), np.int64(rng.integers(-9, 9)), int(rng.integers(0, 2**40)),
             _text(rng, 40), np.float32(0.5)], dtype=object)) for j in range(int(rng.integers(0, 5)))}
        verdict = Verdict(detector=family, rule=rule, key=_text(rng, 50), score=_number(rng),
                          threshold=_number(rng), events_seen=int(rng.integers(0, 2**40)),
                          trigger=0, techniques=TECHNIQUES[int(rng.integers(len(TECHNIQUES)))],
                          description=_text(rng, 600), evidence=evidence)
        when = float(rng.choice([0.0, 1e9 + rng.random(), 4102444800.5, 253402300799.0]))
        if family == "poisoning":
            alert = build_alert(verdict, trigger_ts=when, dataset=_text(rng, 200),
                                batch_id=_text(rng, 200), source=_text(rng, 200))
        else:
            alert = build_alert(verdict, trigger_ts=when, model=_text(rng, 200),
                                client_id=_text(rng, 200),
                                request_id=None if i % 5 == 0 else _text(rng, 1024),
                                source_ip=_address(rng))
        out.append(msgspec.json.decode(msgspec.json.encode(alert)))
    return out


FUZZED = fuzzed_alerts(400)


# --- the tests ---------------------------------------------------------------------


def test_the_vendored_slices_name_their_release_and_source():
    assert ECS["ecs_version"] == ECS_VERSION == "8.17.0"
    assert ECS["source"].endswith("elastic/ecs/blob/v8.17.0/generated/ecs/ecs_flat.yml")
    assert CUSTOM not in ECS["field_sets"]  # our namespace cannot clash with ECS's
    assert OCSF["ocsf_version"] == OCSF_VERSION
    assert OCSF["class"]["uid"] == 2004 and OCSF["class"]["caption"] == "Detection Finding"


def test_the_checkers_catch_what_they_are_for():
    """Each kind of mistake, made on purpose in a good alert, is named."""
    good = FUZZED[0]
    assert ecs_problems(good) == []

    def broken(change) -> list[str]:
        doc = json.loads(json.dumps(good))
        change(doc)
        return ecs_problems(doc)

    assert broken(lambda d: d["event"].update(type=["indicator"])) == [
        "event.type 'indicator' is expected with none of the categories "
        "['intrusion_detection']",
        "event.category 'intrusion_detection' has none of its expected types "
        "['allowed', 'denied', 'info']"]
    assert broken(lambda d: d["event"].update(kind="finding")) == [
        "event.kind: 'finding' is not one of ECS's values"]
    assert broken(lambda d: d["event"].update(severity="73")) == [
        "event.severity: '73' is not of ECS type long"]
    assert broken(lambda d: d["event"].update(category="intrusion_detection")) == [
        "event.category: ECS expects an array"]
    assert broken(lambda d: d.update(score=1)) == ["score: not an ECS field"]
    assert broken(lambda d: d.pop("ecs")) == ["ecs.version is None, not 8.17.0"]
    assert broken(lambda d: d.update(source={"ip": "gateway-7"})) == [
        "source.ip: 'gateway-7' is not of ECS type ip"]
    assert broken(lambda d: d["threat"]["technique"].update(id=["AML.T0024.002"])) != []
    assert ocsf_problems(ocsf(good)) == []
    doc = ocsf(good)
    doc.update(severity_id=7, activity_name="Update")
    del doc["metadata"]["product"]
    assert sorted(ocsf_problems(doc)) == [
        "activity_id: its sibling activity_name is 'Update', not 'Create'",
        "metadata.product: required, missing",
        "severity_id: 7 is not one of ['0', '1', '2', '3', '4', '5', '6', '99']"]


def test_the_contract_example_of_v1_is_what_ecs_refuses():
    """Why the alerts changed: the example's event.type and technique.id (the ids are
    kept, in ECS's own fields, and no field was removed)."""
    example = {
        "@timestamp": "2026-11-21T10:00:05.100Z", "ecs": {"version": ECS_VERSION},
        "event": {"kind": "alert", "category": ["intrusion_detection"], "type": ["indicator"],
                  "id": "b1946ac9", "severity": 73, "risk_score": 73.0,
                  "created": "2026-11-21T10:00:05.140Z", "dataset": "modelwatch.alerts",
                  "module": "modelwatch"},
        "rule": {"name": "extraction.prada", "category": "extraction", "description": "…",
                 "version": "1"},
        "threat": {"framework": "MITRE ATLAS",
                   "technique": {"id": ["AML.T0024.002"], "name": ["Extract AI Model"]}},
        "user": {"id": "key-7f3a"}, "source": {"ip": "203.0.113.7"},
        "modelwatch": {}, "message": "…"}
    assert ecs_problems(example) == [
        "event.type 'indicator' is expected with none of the categories "
        "['intrusion_detection']",
        "event.category 'intrusion_detection' has none of its expected types "
        "['allowed', 'denied', 'info']",
        "threat.technique.id: AML.T0024.002 is a sub-technique"]


def test_every_demo_alert_is_valid_ecs_and_a_valid_ocsf_detection_finding(demo_alerts):
    assert {a["modelwatch"]["detector"] for a in demo_alerts} == {
        "extraction", "adversarial", "poisoning"}
    problems = {p for alert in demo_alerts for p in ecs_problems(alert)}
    assert problems == set()
    problems = {p for alert in demo_alerts for p in ocsf_problems(ocsf(alert))}
    assert problems == set()


def test_every_fuzzed_alert_is_valid_ecs_and_a_valid_ocsf_detection_finding():
    assert {a["rule"]["category"] for a in FUZZED} == {"extraction", "adversarial", "poisoning"}
    for alert in FUZZED:
        assert ecs_problems(alert) == [], alert["event"]["id"]
        assert ocsf_problems(ocsf(alert)) == [], alert["event"]["id"]


def test_every_alert_keeps_the_contract_schema(demo_alerts):
    """Our namespace (modelwatch.*) and the rest, as the shipped JSON Schema says."""
    import jsonschema

    from streams.records import shipped_schema

    validator = jsonschema.Draft202012Validator(shipped_schema("alert"))
    for alert in [*demo_alerts, *FUZZED]:
        assert [e.message for e in validator.iter_errors(alert)] == [], alert["event"]["id"]


def test_sub_techniques_have_their_parent_and_every_id_is_kept():
    """No ATLAS id a rule names is lost: sub-techniques keep theirs, in ECS's field."""
    for alert in FUZZED:
        technique = alert["threat"]["technique"]
        listed = set(technique["id"]) | set((technique.get("subtechnique") or {}).get("id", []))
        assert set(alert_techniques(alert)) <= listed
        assert all(ATLAS.get(t) or t in technique["id"] for t in listed)
        assert alert["threat"]["tactic"]["id"], "every technique has a tactic"


def alert_techniques(alert: dict) -> list[str]:
    """The ids as given to build_alert (recovered from the rule's family in FUZZED)."""
    sub = (alert["threat"]["technique"].get("subtechnique") or {}).get("id", [])
    return [*sub, *(t for t in alert["threat"]["technique"]["id"]
                    if not any(atlas_parent(s) == t for s in sub))]


def test_ocsf_severity_is_the_band_of_the_ecs_severity():
    for alert in FUZZED:
        band = next(b for b in SEVERITY_BANDS
                    if b.floor <= alert["event"]["severity"] <= b.ceiling)
        doc = ocsf(alert)
        assert (doc["severity_id"], doc["severity"]) == (band.ocsf_id, band.ocsf_name)
