"""Alert formats: ECS as is, ArcSight CEF, OCSF Detection Finding (class 2004).

Each takes the ECS alert dict of contract v1. Severity bands are defined once
here so that CEF, syslog and OCSF agree on what "high" means.
"""

from __future__ import annotations

import importlib.metadata

from streams.records import parse_ts

PRODUCT = "modelwatch"
OCSF_VERSION = "1.8.0"
try:
    VERSION = importlib.metadata.version("modelwatch")
except importlib.metadata.PackageNotFoundError:  # run from a source tree
    VERSION = "0.0.0"

# ATLAS parents and tactics for the techniques the detectors emit (ATLAS 5.x).
ATLAS_PARENT = {
    "AML.T0024.002": ("AML.T0024", "Exfiltration via AI Inference API"),
    "AML.T0043.001": ("AML.T0043", "Craft Adversarial Data"),
    "AML.T0043.002": ("AML.T0043", "Craft Adversarial Data"),
}
ATLAS_TACTICS = {
    "AML.T0024": (("AML.TA0010", "Exfiltration"),),
    "AML.T0043": (("AML.TA0001", "AI Attack Staging"),),
    "AML.T0020": (("AML.TA0003", "Resource Development"), ("AML.TA0006", "Persistence")),
}

# (lowest alert severity 0..100, syslog severity, OCSF severity_id, OCSF name), high first.
SEVERITY_BANDS = (
    (90, 2, 5, "Critical"),
    (70, 3, 4, "High"),
    (40, 4, 3, "Medium"),
    (1, 5, 2, "Low"),
    (0, 6, 1, "Informational"),
)


def _band(severity: int) -> tuple[int, int, int, str]:
    return next(band for band in SEVERITY_BANDS if severity >= band[0])


def syslog_severity(severity: int) -> int:
    """RFC 5424 severity: 2 critical, 3 error, 4 warning, 5 notice, 6 informational."""
    return _band(severity)[1]


def epoch_ms(stamp: str) -> int:
    return round(parse_ts(stamp) * 1000)


def ecs(alert: dict) -> dict:
    """The contract's alert, unchanged."""
    return alert


# --- CEF -------------------------------------------------------------------------


def cef_header_escape(text: str) -> str:
    # CEF escapes only \ and | in the header; a line break there would split the
    # record for line-based receivers, so it becomes a space.
    text = text.replace("\\", "\\\\").replace("|", "\\|")
    return text.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")


def cef_value_escape(text: str) -> str:
    return (text.replace("\\", "\\\\").replace("=", "\\=")
            .replace("\r\n", "\\n").replace("\n", "\\n").replace("\r", "\\r"))


def _number(value: float) -> str:
    return repr(float(value))


def cef(alert: dict) -> str:
    """``CEF:0|modelwatch|modelwatch|<version>|<rule>|<title>|<0-10>|<extension>``."""
    event, rule, mw = alert["event"], alert["rule"], alert["modelwatch"]
    title = (rule.get("description") or rule["name"])[:512]
    severity = max(0, min(10, round(event["severity"] / 10)))
    header = "|".join(cef_header_escape(h) for h in (
        PRODUCT, PRODUCT, VERSION, rule["name"], title, str(severity)))
    source = alert.get("source") or {}
    trigger = mw.get("trigger") or {}
    fields = [
        ("rt", str(epoch_ms(alert["@timestamp"]))),
        ("cat", rule["category"]),
        ("externalId", event["id"]),
        ("suser", (alert.get("user") or {}).get("id")),
        ("src", source.get("ip")),
        ("shost", source.get("address")),
    ]
    custom = [  # (key, its label, value); cn* are integers in CEF, fractions go to cfp*
        ("cs1", "atlasTechnique", ",".join(alert["threat"]["technique"]["id"])),
        ("cs2", "model", mw.get("model")),
        ("cs3", "dataset", mw.get("dataset")),
        ("cs4", "batchId", mw.get("batch_id")),
        ("cs5", "batchSource", mw.get("source")),
        ("cs6", "requestId", trigger.get("request_id")),
        ("cfp1", "score", _number(mw["score"])),
        ("cfp2", "threshold", _number(mw["threshold"])),
        ("cn1", "eventsSeen", str(mw["events_seen"])),
    ]
    for key, label, value in custom:
        fields += [(key + "Label", label), (key, value)] if value is not None else []
    fields.append(("msg", alert["message"]))
    extension = " ".join(f"{k}={cef_value_escape(v)}" for k, v in fields if v is not None)
    return f"CEF:0|{header}|{extension}"


# --- OCSF ------------------------------------------------------------------------


def _attacks(technique_ids: list[str], names: list[str]) -> list[dict]:
    named = dict(zip(technique_ids, names, strict=False))
    listed_parents = {ATLAS_PARENT[t][0] for t in technique_ids if t in ATLAS_PARENT}
    attacks = []
    for uid in technique_ids:
        if uid in listed_parents:
            continue  # said more precisely by its sub-technique
        attack: dict = {}
        if uid in ATLAS_PARENT:
            parent_uid, parent_name = ATLAS_PARENT[uid]
            attack["technique"] = {"uid": parent_uid, "name": parent_name}
            attack["sub_technique"] = {"uid": uid, "name": named.get(uid)}
        else:
            parent_uid = uid
            attack["technique"] = {"uid": uid, "name": named.get(uid)}
        for tactic_uid, tactic_name in ATLAS_TACTICS.get(parent_uid, ((None, None),)):
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
    _, _, severity_id, severity_name = _band(event["severity"])
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
    technique = alert["threat"]["technique"]
    return _drop_none({
        "class_uid": 2004, "class_name": "Detection Finding",
        "category_uid": 2, "category_name": "Findings",
        "activity_id": 1, "activity_name": "Create", "type_uid": 200401,
        "type_name": "Detection Finding: Create",
        "time": epoch_ms(alert["@timestamp"]),
        "severity_id": severity_id, "severity": severity_name,
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
            "attacks": _attacks(technique["id"], technique["name"]),
        }),
        "resources": resources,
        "evidences": [evidence] if evidence else None,
        "unmapped": {"modelwatch": mw},
    })


JSON_FORMATS = {"ecs": ecs, "ocsf": ocsf}
