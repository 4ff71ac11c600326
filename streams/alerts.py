"""Verdicts to ECS alerts (contract v1): deterministic ids, ATLAS techniques.

Also what every alert output shares, so that they agree: the severity bands
(:data:`SEVERITY_BANDS`, from which OCSF, syslog, CEF, the metric label and the
dashboards take theirs), the ATLAS hierarchy (technique, sub-technique, tactic),
and :func:`escape_controls` for every line a human or a line-based receiver reads.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import re
import time
from dataclasses import dataclass

import msgspec
import numpy as np

from detectors.base import ATLAS, Verdict
from streams.records import (
    Alert,
    AlertDetail,
    AlertEvent,
    AlertRule,
    AtlasRef,
    EcsRef,
    SourceRef,
    Technique,
    Threat,
    Trigger,
    UserRef,
    format_ts,
)

#: The ECS release the alerts follow (contract v1 says ECS 8.x; the fields used are the
#: same in 9.x). tests/data/ecs_fields.json holds that release's definitions of them.
ECS_VERSION = "8.17.0"
#: ``event.category`` and an ``event.type`` that ECS expects with it: an IDS-style alert
#: that did not block anything is ``info`` (``indicator`` belongs to category ``threat``).
EVENT_CATEGORY = ("intrusion_detection",)
EVENT_TYPE = ("info",)


# --- severity: one table ---------------------------------------------------------


@dataclass(frozen=True)
class SeverityBand:
    """A band of ECS ``event.severity`` (0..100, inclusive ends) and what it is elsewhere.

    ``name`` is the metric label and dashboard word; ``ocsf_id`` OCSF's
    ``severity_id`` (its caption is ``name.capitalize()``); ``syslog`` the RFC 5424
    severity; ``cef`` the CEF 0..10 range, inside ArcSight's word for the band (Low
    0-3, Medium 4-6, High 7-8, Very-High 9-10); ``color`` the Grafana color.
    """

    name: str
    floor: int
    ceiling: int
    ocsf_id: int
    syslog: int
    cef: tuple[int, int]
    color: str

    @property
    def ocsf_name(self) -> str:
        return self.name.capitalize()


#: Elastic Security's risk-score bands (low 0-21, medium 22-47, high 48-73, critical
#: 74-100): ``event.risk_score`` equals ``event.severity``, so a SIEM that reads it
#: names the alert as we do. Low first.
SEVERITY_BANDS = (
    SeverityBand("low", 0, 21, ocsf_id=2, syslog=5, cef=(0, 3), color="blue"),       # notice
    SeverityBand("medium", 22, 47, ocsf_id=3, syslog=4, cef=(4, 6), color="yellow"),  # warning
    SeverityBand("high", 48, 73, ocsf_id=4, syslog=3, cef=(7, 8), color="orange"),    # error
    SeverityBand("critical", 74, 100, ocsf_id=5, syslog=2, cef=(9, 10), color="red"),  # crit
)


def _clamped(severity: float) -> float:
    return 100.0 if not math.isfinite(severity) else min(100.0, max(0.0, float(severity)))


def severity_band(severity: float) -> SeverityBand:
    """The band of an ECS severity; out of range or non-finite counts as its nearest end.

    >>> [severity_band(s).name for s in (0, 21, 21.5, 22, 47, 48, 73, 74, 100, 150)]
    ['low', 'low', 'low', 'medium', 'medium', 'high', 'high', 'critical', 'critical', 'critical']
    """
    severity = _clamped(severity)
    return next(b for b in reversed(SEVERITY_BANDS) if severity >= b.floor)


def cef_severity(severity: float) -> int:
    """CEF's 0..10, linear inside the band's CEF range.

    >>> [cef_severity(s) for s in (0, 21, 22, 47, 48, 73, 74, 100)]
    [0, 3, 4, 6, 7, 8, 9, 10]
    """
    band = severity_band(severity)
    low, high = band.cef
    share = (min(_clamped(severity), band.ceiling) - band.floor) / (band.ceiling - band.floor)
    return min(high, max(low, low + math.floor(share * (high - low + 1))))


def syslog_severity(severity: float) -> int:
    """RFC 5424 severity: 2 critical, 3 error, 4 warning, 5 notice."""
    return severity_band(severity).syslog


# --- MITRE ATLAS -----------------------------------------------------------------

ATLAS_URL = "https://atlas.mitre.org"
#: Names of the parent techniques of the sub-techniques the detectors emit (ATLAS 5.x;
#: the detectors' own ids and names are ``detectors.base.ATLAS``).
PARENT_TECHNIQUES = {
    "AML.T0024": "Exfiltration via AI Inference API",
    "AML.T0043": "Craft Adversarial Data",
}
ATLAS_TACTICS = {
    "AML.T0024": (("AML.TA0010", "Exfiltration"),),
    "AML.T0043": (("AML.TA0001", "AI Attack Staging"),),
    "AML.T0020": (("AML.TA0003", "Resource Development"), ("AML.TA0006", "Persistence")),
}


def atlas_parent(technique: str) -> str:
    """``AML.T0024.002`` -> ``AML.T0024``; a technique is its own parent."""
    return ".".join(technique.split(".")[:2])


def technique_name(technique: str) -> str:
    """ATLAS's name for an id; an id no table here knows stands for itself (an alert
    must never fail to be made or sent for want of a name)."""
    return ATLAS.get(technique) or PARENT_TECHNIQUES.get(technique) or technique


def threat(techniques: tuple[str, ...] | list[str]) -> Threat:
    """ECS ``threat.*``: techniques in ``technique.id``, sub-techniques in
    ``technique.subtechnique.id`` with their parent in ``technique.id``, and tactics."""
    parents = list(dict.fromkeys(atlas_parent(t) for t in techniques))
    subs = list(dict.fromkeys(t for t in techniques if atlas_parent(t) != t))
    tactics = list(dict.fromkeys(tactic for p in parents for tactic in ATLAS_TACTICS.get(p, ())))
    return Threat(
        framework="MITRE ATLAS",
        technique=Technique(
            id=parents, name=[technique_name(t) for t in parents],
            reference=[f"{ATLAS_URL}/techniques/{t}" for t in parents],
            subtechnique=AtlasRef(id=subs, name=[technique_name(t) for t in subs],
                                  reference=[f"{ATLAS_URL}/techniques/{t}" for t in subs])
            if subs else None),
        tactic=AtlasRef(id=[t for t, _ in tactics], name=[n for _, n in tactics],
                        reference=[f"{ATLAS_URL}/tactics/{t}" for t, _ in tactics])
        if tactics else None)


def techniques_of(doc: dict) -> list[str]:
    """Every ATLAS id of an alert dict, most precise first: sub-techniques, then those
    techniques that none of them refines (alerts made before sub-techniques had their
    own field list them all in ``technique.id``)."""
    technique = (doc.get("threat") or {}).get("technique") or {}
    subs = (technique.get("subtechnique") or {}).get("id") or []
    listed = list(dict.fromkeys([*subs, *(technique.get("id") or [])]))
    refined = {atlas_parent(t) for t in listed if atlas_parent(t) != t}
    return [t for t in listed if t not in refined]


# --- text for line-based outputs -------------------------------------------------

# C0, DEL, C1 (U+0085 among them), the line and paragraph separators, the bidi
# controls that reorder what a terminal shows, and lone surrogates (not encodable).
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029"
                       r"\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _visible(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    r"""Every control character as visible text (``\x1b``, ``\u2028``): what a client
    id or request id holds can neither move a terminal's cursor nor split a line.

    >>> escape_controls("key\x1b[2J\u2028x\x85")
    'key\\x1b[2J\\u2028x\\x85'
    """
    return _CONTROLS.sub(_visible, text) if _CONTROLS.search(text) else text


def _plain(evidence: dict) -> dict:
    """Evidence as plain JSON numbers and strings; non-finite numbers are left out."""
    out = {}
    for key, value in evidence.items():
        value = value.item() if hasattr(value, "item") else value
        if isinstance(value, float) and not math.isfinite(value):
            continue
        out[key] = value
    return out


def _finite(value: float) -> float:
    """Infinities as the largest plain numbers; NaN (no number at all) as 0."""
    if math.isnan(value):
        return 0.0
    return float(value) if math.isfinite(value) else float(np.sign(value) * 1e308)


def _source(source_ip: str | None) -> SourceRef | None:
    """ECS ``source.ip`` only holds addresses; anything else goes to ``source.address``."""
    if not source_ip:
        return None
    try:
        return SourceRef(ip=str(ipaddress.ip_address(source_ip)))
    except ValueError:
        return SourceRef(address=source_ip)


def alert_id(rule: str, scope: str, key: str, trigger_ref: str, trigger_ts: float) -> str:
    """Same rule, key and trigger event give the same id, in replay and worker alike."""
    text = f"v1|{rule}|{scope}|{key}|{trigger_ref}|{trigger_ts:.6f}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def severity(verdict: Verdict) -> int:
    """50 at the threshold, rising to 90 at twice the threshold (scores are >= 0)."""
    if not (math.isfinite(verdict.score) and math.isfinite(verdict.threshold)):
        return 90
    if verdict.threshold <= 0:
        return 70
    excess = verdict.score / verdict.threshold - 1.0
    if not math.isfinite(excess):  # a score of 1e308 over a threshold of 1e-300
        return 90
    return int(round(50 + 40 * max(-0.25, min(1.0, excess))))


def build_alert(
    verdict: Verdict,
    *,
    trigger_ts: float,
    request_id: str | None = None,
    model: str | None = None,
    client_id: str | None = None,
    source_ip: str | None = None,
    dataset: str | None = None,
    batch_id: str | None = None,
    source: str | None = None,
) -> Alert:
    scope = model if model is not None else f"dataset:{dataset}"
    trigger_ref = request_id if request_id is not None else (batch_id or "")
    sev = severity(verdict)
    who = f"client {client_id} of model {model}" if client_id else f"batch {batch_id} of {dataset} from {source}"
    message = (f"{verdict.detector.capitalize()} suspected: {who}: {verdict.description} "
               f"(score {verdict.score:.3g}, threshold {verdict.threshold:.3g}, "
               f"after {verdict.events_seen} {'events' if client_id else 'batches'})")
    return Alert(
        timestamp=format_ts(trigger_ts),
        event=AlertEvent(
            kind="alert", category=list(EVENT_CATEGORY), type=list(EVENT_TYPE),
            id=alert_id(verdict.rule, scope, verdict.key, trigger_ref, trigger_ts),
            severity=sev, risk_score=float(sev), created=format_ts(time.time()),
            dataset="modelwatch.alerts", module="modelwatch",
        ),
        rule=AlertRule(name=verdict.rule, category=verdict.detector,
                       description=verdict.description, version="1"),
        threat=threat(verdict.techniques),
        user=UserRef(client_id) if client_id else None,
        source=_source(source_ip),
        modelwatch=AlertDetail(
            detector=verdict.detector, model=model, client_id=client_id, dataset=dataset,
            batch_id=batch_id, source=source, score=round(_finite(verdict.score), 6),
            threshold=round(_finite(verdict.threshold), 6), events_seen=int(verdict.events_seen),
            trigger=Trigger(request_id=request_id, ts=format_ts(trigger_ts)),
            evidence=_plain(verdict.evidence),
        ),
        message=message,
        ecs=EcsRef(ECS_VERSION),
    )


def alert_line(alert: Alert | dict) -> str:
    """A short readable line: time, rule, client or batch, score; no control characters."""
    doc = alert if isinstance(alert, dict) else msgspec.to_builtins(alert)
    mw = doc["modelwatch"]
    who = f"client {mw['client_id']}" if mw.get("client_id") else \
        f"batch {mw['batch_id']} ({mw.get('source')})"
    line = (f"{doc['@timestamp']}  {doc['rule']['name']:<34} {who:<36} "
            f"score {mw['score']:.3g} >= threshold {mw['threshold']:.3g}")
    evidence = mw.get("evidence") or {}
    if "shapiro_w" in evidence and "delta" in evidence:  # PRADA fires when W falls below delta
        line += f" (Shapiro-Wilk W {evidence['shapiro_w']} < delta {evidence['delta']})"
    return escape_controls(line)
