"""Alert formats: ECS as is, ArcSight CEF, OCSF Detection Finding (class 2004).

Each takes the ECS alert dict of contract v1. Severity words and levels come from
the one band table, :data:`streams.alerts.SEVERITY_BANDS`; the ATLAS hierarchy
from :mod:`streams.alerts` too.
"""

from __future__ import annotations

import importlib.metadata
import ipaddress
import math
import re

from streams.alerts import (
    ATLAS_TACTICS,
    atlas_parent,
    cef_severity,
    escape_controls,
    severity_band,
    technique_name,
    techniques_of,
)
from streams.records import parse_ts

PRODUCT = "modelwatch"
OCSF_VERSION = "1.8.0"
try:
    VERSION = importlib.metadata.version("modelwatch")
except importlib.metadata.PackageNotFoundError:  # run from a source tree
    VERSION = "0.0.0"

#: Marks where a value was cut to its limit (ASCII: a cut alone does not make the
#: syslog MSG UTF-8, which would put a BOM before ``CEF:``).
CUT = "..."


def epoch_ms(stamp: str) -> int:
    return round(parse_ts(stamp) * 1000)


def ecs(alert: dict) -> dict:
    """The contract's alert, unchanged."""
    return alert


# --- CEF -------------------------------------------------------------------------

# Lengths from ArcSight's "Implementing ArcSight CEF" (rev. 25): header fields, then
# the extension keys used here (cs1..cs6 take 4,000, their labels 1,023; externalId 40).
HEADER_LIMITS = (63, 63, 31, 1023, 512)  # vendor, product, version, class id, name
EXTENSION_LIMITS = {"cat": 1023, "externalId": 40, "suser": 1023, "shost": 1023,
                    "msg": 1023, "c6a2Label": 1023}
CUSTOM_STRING_LIMIT = 4000
LABEL_LIMIT = 1023
#: Fields whose length the input decides (ids, names, free text): the ones cut first
#: when a whole message must fit a size (:func:`cef`'s ``shrink``).
SHRINKABLE = frozenset({"name", "suser", "shost", "msg", "cs2", "cs3", "cs4", "cs5", "cs6"})
MIN_SHRUNK = 16


def _header_text(text: str) -> str:
    # A line break in the header would split the record for line-based receivers:
    # it becomes a space; any other control character becomes visible text.
    return escape_controls(text.replace("\r\n", " ").replace("\n", " ").replace("\r", " "))


def cef_header_escape(text: str) -> str:
    """Header field: CEF escapes only ``\\`` and ``|`` there."""
    return _header_text(text).replace("\\", "\\\\").replace("|", "\\|")


_BREAKS = re.compile(r"(\r\n|\n|\r)")


def _value_text(text: str) -> str:
    """Control characters as visible text, except line breaks (CEF has escapes for them)."""
    parts = _BREAKS.split(text)
    return "".join(p if i % 2 else escape_controls(p) for i, p in enumerate(parts))


def cef_value_escape(text: str) -> str:
    """Extension value: ``\\`` and ``=`` escaped, line breaks as CEF's ``\\n`` / ``\\r``,
    any other control character as visible text (``\\x1b``, itself escaped)."""
    parts = _BREAKS.split(text)
    return "".join(("\\r" if p == "\r" else "\\n") if i % 2 else
                   escape_controls(p).replace("\\", "\\\\").replace("=", "\\=")
                   for i, p in enumerate(parts))


def _number(value: float) -> str:
    return repr(float(value))


class _Cutter:
    """Caps values at their limit (times ``shrink`` for :data:`SHRINKABLE` ones) and
    counts the characters cut."""

    def __init__(self, shrink: float):
        self.shrink = shrink
        self.cut = 0

    def __call__(self, key: str, text: str | None, limit: int) -> str | None:
        if text is None:
            return None
        if key in SHRINKABLE and self.shrink < 1.0:
            limit = max(MIN_SHRUNK, math.floor(limit * self.shrink))
        if len(text) <= limit:
            return text
        self.cut += len(text) - (limit - len(CUT))
        return text[:limit - len(CUT)] + CUT


def _source_address(source: dict) -> tuple[str | None, str | None]:
    """(IPv4 for ``src``, IPv6 for ``c6a2``): CEF's ``src`` holds IPv4 only."""
    text = source.get("ip")
    if not text:
        return None, None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None, None
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return (str(address), None) if address.version == 4 else (None, str(address))


def cef(alert: dict, *, shrink: float = 1.0) -> str:
    """``CEF:0|modelwatch|modelwatch|<version>|<rule>|<title>|<0-10>|<extension>``.

    Every value is capped at CEF's length for its key; ``shrink`` < 1 caps the
    input-sized values (:data:`SHRINKABLE`) further, to fit a message size. A cut
    value ends in ``...``, and ``cn2`` (``truncatedChars``) counts what was cut.
    Control characters never reach the output raw (:func:`cef_value_escape`).
    """
    event, rule, mw = alert["event"], alert["rule"], alert["modelwatch"]
    cap = _Cutter(shrink)
    texts = (PRODUCT, PRODUCT, VERSION, rule["name"], rule.get("description") or rule["name"])
    keys = ("vendor", "product", "version", "class", "name")
    header = [cap(k, _header_text(t), limit) for k, t, limit in
              zip(keys, texts, HEADER_LIMITS, strict=True)]
    header.append(str(cef_severity(event["severity"])))
    source = alert.get("source") or {}
    ipv4, ipv6 = _source_address(source)
    trigger = mw.get("trigger") or {}
    technique = alert["threat"]["technique"]
    atlas = list(dict.fromkeys([*technique.get("id", []),
                                *(technique.get("subtechnique") or {}).get("id", [])]))

    def value(key: str, text: str | None, limit: int) -> str | None:
        return cap(key, None if text is None else _value_text(str(text)), limit)

    fields = [
        ("rt", str(epoch_ms(alert["@timestamp"]))),
        ("cat", value("cat", rule["category"], EXTENSION_LIMITS["cat"])),
        ("externalId", value("externalId", event["id"], EXTENSION_LIMITS["externalId"])),
        ("suser", value("suser", (alert.get("user") or {}).get("id"), EXTENSION_LIMITS["suser"])),
        ("src", ipv4),
        ("shost", value("shost", source.get("address"), EXTENSION_LIMITS["shost"])),
    ]
    if ipv6 is not None:
        fields += [("c6a2Label", "Source IPv6 Address"), ("c6a2", ipv6)]
    custom = [  # (key, its label, value); cn* are integers in CEF, fractions go to cfp*
        ("cs1", "atlasTechnique", ",".join(atlas)),
        ("cs2", "model", mw.get("model")),
        ("cs3", "dataset", mw.get("dataset")),
        ("cs4", "batchId", mw.get("batch_id")),
        ("cs5", "batchSource", mw.get("source")),
        ("cs6", "requestId", trigger.get("request_id")),
        ("cfp1", "score", _number(mw["score"])),
        ("cfp2", "threshold", _number(mw["threshold"])),
        ("cn1", "eventsSeen", str(mw["events_seen"])),
    ]
    for key, label, text in custom:
        if text is not None:
            limit = CUSTOM_STRING_LIMIT if key.startswith("cs") else LABEL_LIMIT
            fields += [(key + "Label", label), (key, value(key, text, limit))]
    fields.append(("msg", value("msg", alert["message"], EXTENSION_LIMITS["msg"])))
    if cap.cut:  # early in the extension, so that a cut message still says so
        fields[3:3] = [("cn2Label", "truncatedChars"), ("cn2", str(cap.cut))]
    extension = " ".join(f"{k}={cef_value_escape(v)}" for k, v in fields if v is not None)
    head = "|".join(h.replace("\\", "\\\\").replace("|", "\\|") for h in header)
    return f"CEF:0|{head}|{extension}"


# --- OCSF ------------------------------------------------------------------------


def _attacks(alert: dict) -> list[dict]:
    """One OCSF attack per (most precise technique, tactic of its parent)."""
    technique = alert["threat"]["technique"]
    named = {}  # the alert's own names first: it may come from an older release
    for ref in (technique, technique.get("subtechnique") or {}):
        named.update(zip(ref.get("id") or [], ref.get("name") or [], strict=False))
    attacks = []
    for uid in techniques_of(alert):
        parent = atlas_parent(uid)
        attack: dict = {"technique": {"uid": parent,
                                      "name": named.get(parent) or technique_name(parent)}}
        if parent != uid:
            attack["sub_technique"] = {"uid": uid, "name": named.get(uid) or technique_name(uid)}
        for tactic_uid, tactic_name in ATLAS_TACTICS.get(parent, ((None, None),)):
            entry = dict(attack)
            if tactic_uid is not None:
                entry["tactic"] = {"uid": tactic_uid, "name": tactic_name}
            attacks.append(entry)
    return attacks


def _drop_none(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if v is not None}


def ocsf(alert: dict) -> dict:
    """OCSF Detection Finding, activity Create (type_uid 200401)."""
    event, rule, mw = alert["event"], alert["rule"], alert["modelwatch"]
    band = severity_band(event["severity"])
    source = alert.get("source") or {}
    user_id = (alert.get("user") or {}).get("id")
    evidence = _drop_none({
        "actor": {"user": {"uid": user_id}} if user_id else None,
        "src_endpoint": _drop_none({"ip": source.get("ip"),
                                    "hostname": source.get("address")}) or None,
        "data": _drop_none({"dataset": mw.get("dataset"), "batch_id": mw.get("batch_id"),
                            "source": mw.get("source")}) or None,
    })
    resources = [{"name": mw["model"], "type": "ml_model"}] if mw.get("model") else \
        [{"name": mw["dataset"], "type": "dataset"}] if mw.get("dataset") else None
    return _drop_none({
        "class_uid": 2004, "class_name": "Detection Finding",
        "category_uid": 2, "category_name": "Findings",
        "activity_id": 1, "activity_name": "Create", "type_uid": 200401,
        "type_name": "Detection Finding: Create",
        "time": epoch_ms(alert["@timestamp"]),
        "severity_id": band.ocsf_id, "severity": band.ocsf_name,
        "status_id": 1, "status": "New",
        "is_alert": True,
        "risk_score": round(event["risk_score"]),
        "message": alert["message"],
        "metadata": {"version": OCSF_VERSION, "uid": event["id"],
                     "product": {"name": PRODUCT, "vendor_name": PRODUCT, "version": VERSION}},
        "finding_info": _drop_none({
            "uid": event["id"],
            "title": rule.get("description") or rule["name"],
            "desc": alert["message"],
            "types": [rule["category"]],
            "created_time": epoch_ms(event["created"]) if event.get("created") else None,
            "analytic": {"name": rule["name"], "type_id": 3, "type": "Statistical",
                         "category": rule["category"], "version": rule.get("version")},
            "attacks": _attacks(alert),
        }),
        "resources": resources,
        "evidences": [evidence] if evidence else None,
        "unmapped": {"modelwatch": mw},
    })


JSON_FORMATS = {"ecs": ecs, "ocsf": ocsf}
