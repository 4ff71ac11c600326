"""Verdicts to ECS alerts (contract v1): deterministic ids, ATLAS techniques."""

from __future__ import annotations

import hashlib
import ipaddress
import math
import time

import msgspec
import numpy as np

from detectors.base import ATLAS, Verdict
from streams.records import (
    Alert,
    AlertDetail,
    AlertEvent,
    AlertRule,
    SourceRef,
    Technique,
    Threat,
    Trigger,
    UserRef,
    format_ts,
)


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
    return int(max(40, min(90, round(50 + 40 * excess))))


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
            kind="alert", category=["intrusion_detection"], type=["indicator"],
            id=alert_id(verdict.rule, scope, verdict.key, trigger_ref, trigger_ts),
            severity=sev, risk_score=float(sev), created=format_ts(time.time()),
            dataset="modelwatch.alerts", module="modelwatch",
        ),
        rule=AlertRule(name=verdict.rule, category=verdict.detector,
                       description=verdict.description, version="1"),
        threat=Threat(framework="MITRE ATLAS", technique=Technique(
            id=list(verdict.techniques), name=[ATLAS[t] for t in verdict.techniques])),
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
    )


def alert_line(alert: Alert | dict) -> str:
    """A short readable line: time, rule, client or batch, score."""
    doc = alert if isinstance(alert, dict) else msgspec.to_builtins(alert)
    mw = doc["modelwatch"]
    who = f"client {mw['client_id']}" if mw.get("client_id") else \
        f"batch {mw['batch_id']} ({mw.get('source')})"
    return (f"{doc['@timestamp']}  {doc['rule']['name']:<34} {who:<36} "
            f"score {mw['score']:.3g} (threshold {mw['threshold']:.3g})")
