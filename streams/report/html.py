"""``modelwatch replay --report``: the alerts of a run as one self-contained HTML page.

The page holds a summary with its denominators (how many clients, training
sources and batches were judged, how many alerted, and the share: most keys
alerting means bad calibration, not an attack), alerts over time by detector,
the top offending clients and training batches with their evidence, trigger
request ids and a strip of their alerts over time, the keys that came close
without alerting (near misses), a glossary of the rules (from
:data:`detectors.rules.RULES`, with ATLAS names and what each evidence key
means), and per rule the spread of score/threshold. Severity is shown as the
word of its band (:func:`streams.alerts.severity_band`, the one table every
output uses). CSS is inline and the plots are SVG drawn here: the page fetches
nothing and runs no script, and its Content-Security-Policy tells the browser
so. Client ids, batch ids and evidence strings come from whoever sends traffic,
so every piece of text goes through ``_e``.

    python -m streams.report.html alerts.jsonl report.html [--deadletter dl.jsonl]
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from detectors.rules import RULES
from streams.alerts import (
    SEVERITY_BANDS,
    atlas_parent,
    severity_band,
    technique_name,
    techniques_of,
)
from streams.explain import NEAR_MISS
from streams.tabular import UserError

DETECTORS = ("extraction", "adversarial", "poisoning")
# Okabe-Ito colours: told apart with the common colour-vision deficiencies.
COLORS = {"extraction": "#0072B2", "adversarial": "#E69F00", "poisoning": "#CC79A7"}
OTHER_COLOR = "#777777"
THRESHOLD_COLOR = "#D55E00"
TOP = 25           # offenders per table
ALERT_ROWS = 1000  # rows in the full alert list; a page of 100k rows helps nobody
SUMMARY_LABELS = {
    "events": "inference events judged",
    "batches": "training batches judged",
    "clients_judged": "clients judged (model / client id)",
    "sources_judged": "training sources judged (dataset / source)",
    "dead_letters": "dead letters (bad records)",
    "late": "events judged out of time order",
}
NEAR_MISS_ROWS = 100  # near misses shown
#: Above this share of judged clients alerting (with at least CALIBRATION_MIN_KEYS judged),
#: the page says to suspect calibration first: attacks are a few keys, not most of them.
CALIBRATION_SHARE = 0.25
CALIBRATION_MIN_KEYS = 4

_RATE = ("recent queries of the client that this rule flags (a decayed count, so it "
         "can be fractional)")
#: What each evidence key means: per rule first, then for every rule.
EVIDENCE_BY_RULE = {
    ("poisoning.duplicates", "expected_share"):
        "share of duplicated rows expected: the larger of the profile's and the source's "
        "recent clean batches' (the threshold adds duplicate_share to it)",
    ("poisoning.label_flip", "expected_share"):
        "share of that label's rows the profile's reference classifier put in the other "
        "class on the training set (cross-validated) or the source's recent clean batches",
    ("poisoning.label_flip", "estimated_flipped_share"):
        "estimated share of that class's rows that are flipped (the classifier test: the "
        "share classified as the other class above its expected share)",
    ("poisoning.out_of_bounds", "expected_share"):
        "share of this feature's values beyond the bounds expected from the source's recent "
        "clean batches (else the profile's held-out rate)",
}
EVIDENCE = {
    # query rules (adversarial.*, extraction.*)
    "flagged": _RATE,
    "of_recent": "recent queries of the client this rule could judge (decayed count): "
                 "the denominator of its share",
    "expected_share": "the share an honest client is expected to flag, calibrated from "
                      "production (the profile's value until enough clients are seen)",
    "ood_score": "off-distribution distance of the trigger query (scaled units; above "
                 "ood_threshold is off the training distribution)",
    "ood_threshold": "the profile's off-distribution distance threshold (its 99th "
                     "percentile, with re-measurement noise)",
    "knn_mean_distance": "mean distance from the trigger query to the k nearest earlier "
                         "distinct queries of the client (scaled units; small is crowded)",
    "off_profile_share": "share of the client's recent queries off the training distribution",
    "step_queries": "recent queries that step from an earlier one by a gradient sign in "
                    "nearly every feature (decayed count)",
    "low_margin_share": "share of the client's recent fresh queries answered with a low "
                        "margin (top two classes nearly tied)",
    "shapiro_w": "Shapiro-Wilk W of the distances between successive distinct queries "
                 "(1 is normal; PRADA fires when W falls below delta)",
    "delta": "PRADA's threshold on W, calibrated on simulated honest streams of the "
             "profile's data",
    "distances": "distances between successive distinct queries in the tested window",
    "class_entropy_ratio": "entropy of the classes answered to the client over the "
                           "population's (1 = every class as evenly as the population)",
    "distinct_share": "share of the client's queries that were new records, not repeats",
    "population_p95_events": "95th percentile of per-client query volume in the population",
    "ids_behind_ip": "client ids seen behind the source IP",
    "pooled_events": "events of all client ids behind the source IP, pooled",
    "pooled_off_profile_share": "share of the pooled events off the training distribution",
    "pooled_step_queries": "pooled gradient-step queries of the client ids behind the IP",
    "pooled_of_recent": "pooled recent queries those steps are counted among",
    "new_ids_from_source": "client ids new to the model from the source IP this epoch",
    "source_ip": "the source IP the client ids came from",
    # training batches (poisoning.*)
    "class": "the class whose rows look relabelled",
    "looks_like": "the class those rows look like",
    "estimated_flipped_share": "estimated share of that class's rows that are flipped",
    "z": "shift of the class mean along the direction between the two classes, in "
         "standard errors",
    "variance_widening_ratio": "how much the class widened along that direction, over "
                               "what a mixture of the two classes would give (1 = as a flip)",
    "reference": "what the batch was compared with: recent clean batches of the source, "
                 "or the profile",
    "test": "which flip test fired: class_means (class means moved toward another "
            "class), reference_classifier or linear_classifier (rows of the label that the "
            "profile's nearest-neighbour or linear classifier puts in another class)",
    "rows_labelled": "rows of the batch with that label, within the training bounds",
    "classified_as_other": "of those, rows the profile's classifier (see test) puts in the "
                           "other class",
    "feature": "the feature concerned",
    "bin_share": "share of the batch's values of that feature in the spiking bin",
    "reference_share": "that bin's share in the profile and recent clean batches",
    "features_with_spikes": "features with a spiking bin",
    "values_far_beyond": "values far beyond the training range, over all features",
    "per_row": "values far beyond the range per row of the batch",
    "worst_feature": "the feature with the most values far beyond its range",
    "features_far_beyond": "features with values far beyond their range",
    "beyond_share": "share of that feature's values beyond the training bounds (on that side)",
    "side": "which bound the values lie beyond: below, above, or beyond (a producer that "
            "counts both together)",
    "surprise": "-log10 of the chance of that many values beyond the bound on clean data, "
                "corrected over features and sides (alerts from pile_surprise)",
    "features_beyond": "features with a surprising share of values beyond their bounds",
    "duplicate_share": "share of the batch's rows that duplicate another row",
    "also": "other rules that fired on the same batch (a batch gets one alert, for its "
            "strongest rule)",
}


def evidence_meaning(rule: str, key: str) -> str | None:
    """What an evidence key of ``rule`` means, or None for a key this version does not know."""
    return EVIDENCE_BY_RULE.get((rule, key)) or EVIDENCE.get(key)
# Bidi overrides and other invisible characters can make one id look like another.
_INVISIBLE = re.compile("[\x00-\x1f\x7f-\x9f\u00ad\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


def _e(value) -> str:
    """Escaped for HTML text and attributes, invisible characters shown as \\uXXXX."""
    text = _INVISIBLE.sub(lambda m: f"\\u{ord(m.group()):04x}", str(value))
    return html.escape(text, quote=True)


def _num(value) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return _e(value)
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value) or abs(value) >= 1e300:  # alerts store ±inf as ±1e308
        return "∞" if value > 0 else "−∞"
    return f"{value:.4g}"


def _parse_ts(value) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:  # a time the page can print, or none
            return datetime.fromtimestamp(value, UTC).timestamp()
        except (OverflowError, OSError, ValueError):
            return None
    if isinstance(value, str):
        try:
            stamp = datetime.fromisoformat(value)
        except ValueError:
            return None
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=UTC)
        return stamp.timestamp()
    return None


def _fmt_ts(ts: float | None, pattern: str = "%Y-%m-%d %H:%M:%S") -> str:
    try:  # event times come from clients, so a bin edge may fall outside years 1..9999
        return "—" if ts is None else datetime.fromtimestamp(ts, UTC).strftime(pattern)
    except (OverflowError, OSError, ValueError):
        return "—"


@dataclass(frozen=True)
class _Row:
    """The fields of one alert that the page shows."""

    ts: float | None
    detector: str
    rule: str
    model: str | None
    client_id: str | None
    dataset: str | None
    source: str | None
    batch_id: str | None
    score: float
    threshold: float
    ratio: float | None  # score / threshold; None when the threshold is not positive
    severity: int
    events_seen: int
    evidence: dict
    techniques: tuple[str, ...]
    source_ip: str | None
    message: str
    request_id: str | None = None  # the trigger event's request id (query alerts)

    @property
    def trigger(self) -> str | None:
        """The request id of the event that fired, or the batch id of the batch."""
        return self.request_id if self.request_id is not None else self.batch_id

    @property
    def band(self) -> str:
        return severity_band(self.severity).name

    @property
    def is_batch(self) -> bool:
        return self.client_id is None and (self.batch_id is not None or self.dataset is not None)

    @property
    def peak_key(self) -> tuple:
        return (self.severity, math.inf if self.ratio is None else self.ratio, self.score)


def _row(doc: dict) -> _Row:
    """Tolerant of missing fields: a report of a partial file beats no report."""
    mw = doc.get("modelwatch") or {}
    rule = doc.get("rule") or {}
    event = doc.get("event") or {}
    try:
        technique = techniques_of(doc)
    except (AttributeError, TypeError):  # a hand-edited alert: no techniques beats no page
        technique = []
    trigger = mw.get("trigger") if isinstance(mw.get("trigger"), dict) else {}
    src = doc.get("source") or {}
    score, threshold = _float(mw.get("score")), _float(mw.get("threshold"))
    ratio = score / threshold if threshold > 0 and math.isfinite(score) else None
    detector = str(mw.get("detector") or rule.get("category") or "unknown")
    evidence = mw.get("evidence")
    return _Row(
        ts=_parse_ts(doc.get("@timestamp")), detector=detector,
        rule=str(rule.get("name") or detector), model=_opt(mw.get("model")),
        client_id=_opt(mw.get("client_id")), dataset=_opt(mw.get("dataset")),
        source=_opt(mw.get("source")), batch_id=_opt(mw.get("batch_id")),
        score=score, threshold=threshold, ratio=ratio,
        severity=_int(event.get("severity")), events_seen=_int(mw.get("events_seen")),
        evidence=evidence if isinstance(evidence, dict) else {},
        techniques=tuple(map(str, technique)),
        source_ip=_opt(src.get("ip") or src.get("address")), message=str(doc.get("message") or ""),
        request_id=_opt(trigger.get("request_id")),
    )


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _int(value) -> int:
    number = _float(value)
    return int(number) if math.isfinite(number) else 0


def _opt(value) -> str | None:
    return None if value is None else str(value)


# --- SVG helpers ------------------------------------------------------------------

def _nice_step(span: float, target: int) -> float:
    """A 1, 2 or 5 times a power of ten, so that ``span`` takes about ``target`` steps."""
    if span <= 0:
        return 1.0
    raw = span / target
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def _count_axis(peak: int, target: int, top: float, height: float):
    """Whole-number ticks for counts up to ``peak``: step, axis top, and count to y."""
    step = max(1, int(_nice_step(peak, target)))
    top_value = max(step, math.ceil(peak / step) * step)

    def y(v: float) -> float:
        return top + height - height * v / top_value

    return step, top_value, y


def _count_grid(left: float, width: float, y, top_value: int, step: int) -> str:
    return "".join(
        f'<line class="grid" x1="{left}" x2="{left + width}" y1="{y(v):.1f}" y2="{y(v):.1f}"/>'
        f'<text class="tick" x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v}</text>'
        for v in range(0, top_value + 1, step))


# Time bins an analyst reads at a glance.
_BIN_SECONDS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800,
                21600, 43200, 86400, 2 * 86400, 7 * 86400, 14 * 86400, 30 * 86400)


def _bin_label(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


def _timeline(rows: list[_Row], detectors: list[str]) -> str:
    """Stacked bars of alerts per time bin, one colour and one ``<g>`` per detector."""
    timed = [r for r in rows if r.ts is not None]
    if not timed:
        return '<p class="empty">No alert carries a readable time.</p>'
    t0, t1 = min(r.ts for r in timed), max(r.ts for r in timed)
    width = next((s for s in _BIN_SECONDS if (t1 - t0) / s < 60),
                 86400 * math.ceil((t1 - t0) / 60 / 86400))
    start = math.floor(t0 / width) * width
    n_bins = int((t1 - start) // width) + 1
    counts = {d: [0] * n_bins for d in detectors}
    for r in timed:
        counts[r.detector][min(n_bins - 1, int((r.ts - start) // width))] += 1
    totals = [sum(counts[d][i] for d in detectors) for i in range(n_bins)]

    W, H, left, right, top, bottom = 960, 300, 56, 170, 16, 48
    pw, ph = W - left - right, H - top - bottom
    bw = pw / n_bins
    pattern = ("%H:%M:%S" if width < 60 else "%H:%M" if t1 - t0 < 86400
               else "%m-%d %H:%M" if t1 - t0 < 60 * 86400 else "%Y-%m-%d")
    y_step, y_max, y = _count_axis(max(totals), 4, top, ph)

    out = [f'<svg class="plot timeline" viewBox="0 0 {W} {H}" width="{W}" height="{H}" '
           f'role="img" aria-label="alerts over time by detector" data-bins="{n_bins}" '
           f'data-bin-seconds="{width}">']
    out.append(_count_grid(left, pw, y, y_max, y_step))
    base = [0] * n_bins
    for d in detectors:
        color = COLORS.get(d, OTHER_COLOR)
        out.append(f'<g class="series" data-detector="{_e(d)}" fill="{color}">')
        for i, c in enumerate(counts[d]):
            if not c:
                continue
            bar_w = max(min(bw * 0.84, 48.0), 1.0)  # a lone bin stays a bar, not a wall
            x0 = left + i * bw + (bw - bar_w) / 2
            when = f"{_fmt_ts(start + i * width)} to {_fmt_ts(start + (i + 1) * width, '%H:%M:%S')}"
            out.append(f'<rect class="bar" data-count="{c}" x="{x0:.2f}" y="{y(base[i] + c):.2f}" '
                       f'width="{bar_w:.2f}" height="{y(base[i]) - y(base[i] + c):.2f}">'
                       f'<title>{_e(d)}: {c} alert{"s" * (c != 1)}, {when} UTC</title></rect>')
            base[i] += c
        out.append("</g>")
    # Labels on round times: every 5 min rather than every 6th bar.
    every = next((s for s in _BIN_SECONDS if s % width == 0 and (t1 - start) / s <= 8),
                 width * math.ceil(n_bins / 8))
    for i in range(n_bins):
        if (start + i * width) % every:
            continue
        x = left + i * bw
        out.append(f'<line class="axis" x1="{x:.1f}" x2="{x:.1f}" y1="{top + ph}" '
                   f'y2="{top + ph + 5}"/><text class="tick" x="{x:.1f}" y="{top + ph + 18}" '
                   f'text-anchor="middle">{_fmt_ts(start + i * width, pattern)}</text>')
    out.append(f'<line class="axis" x1="{left}" x2="{left + pw}" y1="{top + ph}" y2="{top + ph}"/>'
               f'<text class="label" x="{left + pw / 2}" y="{H - 8}" text-anchor="middle">'
               f'event time (UTC), one bar per {_bin_label(width)}</text>'
               f'<text class="label" x="14" y="{top + ph / 2}" text-anchor="middle" '
               f'transform="rotate(-90 14 {top + ph / 2})">alerts</text>')
    for k, d in enumerate(detectors):
        n = sum(counts[d])
        ly = top + 10 + 22 * k
        out.append(f'<g class="legend-item" data-detector="{_e(d)}">'
                   f'<rect x="{left + pw + 16}" y="{ly}" width="14" height="14" '
                   f'fill="{COLORS.get(d, OTHER_COLOR)}"/><text x="{left + pw + 36}" y="{ly + 12}">'
                   f'{_e(d)} ({n})</text></g>')
    out.append("</svg>")
    return "".join(out)


def _histogram(rule: str, rows: list[_Row]) -> str:
    """Score/threshold of one rule's alerts, with the threshold drawn at 1.0."""
    ratios = [r.ratio for r in rows if r.ratio is not None]
    unplotted = len(rows) - len(ratios)
    color = COLORS.get(rows[0].detector, OTHER_COLOR)
    thresholds = sorted({r.threshold for r in rows if math.isfinite(r.threshold)})
    if not thresholds:
        raw = "threshold —"
    elif len(thresholds) == 1:
        raw = f"threshold {_num(thresholds[0])}"
    else:  # calibrated per model or per dataset
        raw = f"threshold {_num(thresholds[0])} to {_num(thresholds[-1])} (varies by key)"
    caption = (f'<figcaption><span class="rule">{_e(rule)}</span> · {len(rows)} '
               f'alert{"s" * (len(rows) != 1)} · <span class="raw-threshold">{raw}</span>')
    if ratios:
        caption += f" · peak {_num(max(ratios))}× threshold"
    if unplotted:
        caption += f" · {unplotted} not plotted (threshold not positive)"
    caption += "</figcaption>"
    if not ratios:
        return f'<figure class="hist-card">{caption}</figure>'

    cap = 10.0  # beyond ten times the threshold the exact ratio no longer matters
    hi = max(2.0, float(math.ceil(min(max(ratios), cap))))  # ratios may be inf
    n = 20
    counts = [0] * n
    over = 0
    for q in ratios:
        if q > hi:
            over += 1
        else:
            counts[min(n - 1, int(max(q, 0.0) / hi * n))] += 1
    slots = n + (1 if over else 0) + (1 if over else 0)  # a gap, then the overflow bar
    W, H, left, right, top, bottom = 440, 190, 40, 12, 14, 40
    pw, ph = W - left - right, H - top - bottom
    bw = pw / slots
    y_step, y_top, y = _count_axis(max(max(counts), over), 3, top, ph)

    def x(q: float) -> float:
        return left + q / hi * n * bw

    out = [f'<figure class="hist-card"><svg class="plot hist" data-rule="{_e(rule)}" '
           f'data-alerts="{len(ratios)}" viewBox="0 0 {W} {H}" width="{W}" height="{H}" '
           f'role="img" aria-label="score over threshold for {_e(rule)}">']
    out.append(_count_grid(left, pw, y, y_top, y_step))
    out.append(f'<g class="series" fill="{color}">')
    for i, c in enumerate(counts):
        if c:
            lo_q, hi_q = i * hi / n, (i + 1) * hi / n
            out.append(f'<rect class="bar" data-count="{c}" x="{x(lo_q) + 0.5:.2f}" '
                       f'y="{y(c):.2f}" width="{bw - 1:.2f}" height="{y(0) - y(c):.2f}">'
                       f'<title>{c} alert{"s" * (c != 1)} at {lo_q:.3g} to {hi_q:.3g}× '
                       f'threshold</title></rect>')
    if over:
        ox = left + (n + 1) * bw
        out.append(f'<rect class="bar overflow" data-count="{over}" x="{ox + 0.5:.2f}" '
                   f'y="{y(over):.2f}" width="{bw - 1:.2f}" height="{y(0) - y(over):.2f}">'
                   f'<title>{over} alert{"s" * (over != 1)} above {hi:g}× threshold</title></rect>'
                   f'<text class="tick" x="{ox + bw / 2:.1f}" y="{top + ph + 14}" '
                   f'text-anchor="middle">&gt;{hi:g}</text>')
    out.append("</g>")
    tick = _nice_step(hi, 5)
    q = 0.0
    while q <= hi + 1e-9:
        out.append(f'<text class="tick" x="{x(q):.1f}" y="{top + ph + 14}" '
                   f'text-anchor="middle">{q:g}</text>')
        q += tick
    tx = x(1.0)
    out.append(f'<line class="axis" x1="{left}" x2="{left + pw}" y1="{top + ph}" y2="{top + ph}"/>'
               f'<line class="threshold-line" x1="{tx:.1f}" x2="{tx:.1f}" y1="{top - 4}" '
               f'y2="{top + ph}" stroke="{THRESHOLD_COLOR}"/>'
               f'<text class="threshold-label" x="{tx + 4:.1f}" y="{top + 6}" '
               f'fill="{THRESHOLD_COLOR}">threshold</text>'
               f'<text class="label" x="{left + pw / 2}" y="{H - 6}" text-anchor="middle">'
               f'score ÷ threshold</text></svg>{caption}</figure>')
    return "".join(out)


# --- tables -----------------------------------------------------------------------

@dataclass
class _Offender:
    key: tuple
    rows: list

    @property
    def peak(self) -> _Row:
        return max(self.rows, key=lambda r: r.peak_key)

    @property
    def sort_key(self) -> tuple:
        p = self.peak.peak_key
        return (-p[0], -len(self.rows), -p[1], tuple(map(str, self.key)))


def _offenders(rows: list[_Row]) -> list[_Offender]:
    groups: dict[tuple, list[_Row]] = defaultdict(list)
    for r in rows:
        key = (r.dataset, r.source, r.batch_id) if r.is_batch else (r.model, r.client_id)
        groups[key].append(r)
    return sorted((_Offender(k, v) for k, v in groups.items()), key=lambda o: o.sort_key)


def _sev(value: int) -> str:
    """The severity's word, from the one band table that every output uses."""
    band = severity_band(value)
    return (f'<span class="sev {band.name}" data-severity="{value}" title="ECS event.severity '
            f'{value} (band {band.floor}-{band.ceiling})">{band.name}</span>')


def _ratio_bar(ratio: float | None) -> str:
    if ratio is None:
        return ""
    # Bar length on a log scale: 1× is a sliver, 10× and more fills the cell.
    share = max(0.04, min(1.0, math.log10(max(ratio, 1.0)) + 0.04))
    return f'<span class="ratio-bar"><span style="width:{share * 100:.0f}%"></span></span>'


def _near_bar(ratio: float) -> str:
    """How close to its threshold a key came: the threshold is the right end."""
    share = max(0.0, min(1.0, ratio)) if math.isfinite(ratio) else 0.0
    return (f'<span class="ratio-bar near"><span style="width:{share * 100:.0f}%"></span>'
            f'</span>')


def _trigger(r: _Row) -> str:
    if r.request_id is not None:
        return f'request <span class="reqid">{_e(r.request_id)}</span>'
    if r.batch_id is not None:
        return f'batch <span class="reqid">{_e(r.batch_id)}</span>'
    return "no request id"


def _evidence(rows: list[_Row]) -> str:
    """The strongest alert of each rule fired: score against threshold, its trigger and
    its numbers."""
    best: dict[str, _Row] = {}
    for r in rows:
        if r.rule not in best or r.peak_key > best[r.rule].peak_key:
            best[r.rule] = r
    items = []
    for rule in sorted(best):
        r = best[rule]
        unit = "batches" if r.is_batch else "events"
        numbers = ", ".join(f"{_e(k)}={_num(v)}" for k, v in r.evidence.items())
        items.append(f'<li><span class="rule">{_e(rule)}</span> at {_e(_fmt_ts(r.ts))}: '
                     f'score {_num(r.score)} vs threshold {_num(r.threshold)}'
                     f'{f" ({_num(r.ratio)}×)" if r.ratio is not None else ""}'
                     f'{f" after {r.events_seen:,} {unit}" if r.events_seen else ""}'
                     f'; trigger {_trigger(r)}'
                     f'<br><span class="ev">{numbers or "no evidence numbers"}</span></li>')
    return f'<ul class="evidence">{"".join(items)}</ul>'


def _triggers(rows: list[_Row], shown: int = 6) -> str:
    """Every trigger request id (or batch id) of a key's alerts, in time order."""
    ordered = sorted(rows, key=lambda r: (r.ts is None, r.ts or 0.0))
    ids = list(dict.fromkeys(r.trigger for r in ordered if r.trigger is not None))
    if not ids:
        return '<div class="triggers empty">no trigger request ids</div>'
    more = f" +{len(ids) - shown} more" if len(ids) > shown else ""
    label = "trigger requests" if any(r.request_id is not None for r in rows) else "trigger batches"
    return (f'<div class="triggers" data-count="{len(ids)}"><span class="k">{label}:</span> '
            + ", ".join(f'<span class="reqid">{_e(i)}</span>' for i in ids[:shown])
            + f"{more}</div>")


def _who(o: _Offender, batches: bool) -> str:
    def part(cls: str, label: str, value) -> str:
        shown = "—" if value is None else _e(value)
        return f'<div class="{cls}"><span class="k">{label}</span> {shown}</div>'

    if batches:
        dataset, source, batch_id = o.key
        return (part("main", "batch", batch_id) + part("sub", "dataset", dataset)
                + part("sub", "source", source))
    model, client_id = o.key
    ips = sorted({r.source_ip for r in o.rows if r.source_ip})
    shown = ", ".join(ips[:3]) + (f" +{len(ips) - 3} more" if len(ips) > 3 else "")
    return (part("main", "client", client_id) + part("sub", "model", model)
            + part("sub", "source IP", shown or None))


def _atlas(technique: str) -> str:
    """An ATLAS id with its name, and the technique a sub-technique refines."""
    parent = atlas_parent(technique)
    text = f"{technique} {technique_name(technique)}"
    if parent != technique:
        text += f" (sub-technique of {parent} {technique_name(parent)})"
    return text


def _rules_fired(rows: list[_Row]) -> str:
    counts = Counter(r.rule for r in rows)
    detector = {r.rule: r.detector for r in rows}
    techniques: dict[str, dict] = defaultdict(dict)
    for r in rows:
        techniques[r.rule].update(dict.fromkeys(r.techniques))
    return '<ul class="rules">' + "".join(
        f'<li><span class="dot" style="background:{COLORS.get(detector[rule], OTHER_COLOR)}">'
        f'</span>{_e(rule)} ×{n}' + "".join(
            f'<div class="atlas">{_e(t)} {_e(technique_name(t))}</div>'
            for t in techniques[rule]) + '</li>'
        for rule, n in sorted(counts.items())) + "</ul>"


def _span(times: list[float]) -> str:
    if not times or min(times) == max(times):
        return _e(_fmt_ts(min(times) if times else None))
    return f"{_e(_fmt_ts(min(times)))}<br>{_e(_fmt_ts(max(times)))}"


def _strip(rows: list[_Row], t0: float, t1: float) -> str:
    """A key's alerts over the report's whole time range: one small stacked bar per bin,
    so that keys can be compared with one another at a glance."""
    timed = [r for r in rows if r.ts is not None]
    if not timed:
        return ""
    W, H, n = 150, 22, 50  # shorter than a timeline bar: the plots stay told apart
    span = max(t1 - t0, 1e-9)
    counts: dict[tuple[int, str], int] = Counter(
        (min(n - 1, int((r.ts - t0) / span * n)) if t1 > t0 else n // 2, r.detector)
        for r in timed)
    per_bin = Counter()
    for (i, _), c in counts.items():
        per_bin[i] += c
    peak = max(per_bin.values())
    bw = W / n
    out = [f'<svg class="strip" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" '
           f'data-alerts="{len(timed)}" aria-label="this key\'s alerts over the report\'s time range">'
           f'<title>{len(timed)} alert{"s" * (len(timed) != 1)} from {_e(_fmt_ts(min(r.ts for r in timed)))}'
           f' to {_e(_fmt_ts(max(r.ts for r in timed)))} UTC; the strip spans '
           f'{_e(_fmt_ts(t0))} to {_e(_fmt_ts(t1))}</title>'
           f'<line class="axis" x1="0" x2="{W}" y1="{H - 0.5}" y2="{H - 0.5}"/>']
    base = Counter()
    for (i, detector), c in sorted(counts.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        h = max(3.0, (H - 2) * c / peak) if c else 0.0
        h = min(h, H - 1 - base[i])
        if h <= 0:
            continue
        y = H - 1 - base[i] - h
        out.append(f'<rect class="tick-bar" data-count="{c}" x="{i * bw:.2f}" y="{y:.2f}" '
                   f'width="{max(bw - 0.6, 1.5):.2f}" height="{h:.2f}" '
                   f'fill="{COLORS.get(detector, OTHER_COLOR)}"/>')
        base[i] += h
    out.append("</svg>")
    return "".join(out)


def _offender_table(offenders: list[_Offender], *, batches: bool,
                    t_range: tuple[float, float] | None) -> str:
    what = "training batches" if batches else "clients"
    if not offenders:
        return f'<p class="empty">No {what} alerted.</p>'
    heads = ["#", "batch" if batches else "client", "alerts", "rules fired (MITRE ATLAS)",
             "peak: score / threshold", "first / last alert (UTC)"]
    heads += ["evidence (strongest alert per rule), triggers"]
    out = [f'<table class="offenders {"batches" if batches else "clients"}"><thead><tr>',
           *(f"<th>{h}</th>" for h in heads), "</tr></thead><tbody>"]
    for rank, o in enumerate(offenders[:TOP], start=1):
        peak = o.peak
        times = [r.ts for r in o.rows if r.ts is not None]
        strip = _strip(o.rows, *t_range) if t_range else ""
        cells = [
            f'<td class="n">{rank}</td>',
            f'<td class="who">{_who(o, batches)}</td>',
            f'<td class="n">{len(o.rows):,}</td>',
            f"<td>{_rules_fired(o.rows)}</td>",
            f'<td class="peak">{_sev(peak.severity)} {_num(peak.score)} / {_num(peak.threshold)}'
            f'{f" = {_num(peak.ratio)}×" if peak.ratio is not None else ""}'
            f'{_ratio_bar(peak.ratio)}</td>',
            f'<td class="when">{_span(times)}{strip}</td>',
        ]
        cells.append(f'<td class="evidence-cell">{_evidence(o.rows)}{_triggers(o.rows)}</td>')
        out.append(f'<tr>{"".join(cells)}</tr>')
    out.append("</tbody></table>")
    if len(offenders) > TOP:
        out.append(f'<p class="note">{len(offenders) - TOP} more {what} not shown; '
                   f'they are in the alert list below.</p>')
    if t_range:
        out.append(f'<p class="note">Activity: each key\'s alerts over the whole report, '
                   f'{_e(_fmt_ts(t_range[0]))} to {_e(_fmt_ts(t_range[1]))} UTC, '
                   f'coloured by detector; a taller bar is more alerts.</p>')
    return "".join(out)


def _alert_list(rows: list[_Row]) -> str:
    ordered = sorted(rows, key=lambda r: (r.ts is None, r.ts or 0.0, r.rule))
    body = []
    for r in ordered[:ALERT_ROWS]:
        who = (f"batch {r.batch_id} of {r.dataset} from {r.source}" if r.is_batch
               else f"client {r.client_id} of {r.model}")
        body.append(f'<tr><td class="when">{_e(_fmt_ts(r.ts))}</td><td>{_sev(r.severity)}</td>'
                    f'<td>{_e(r.rule)}</td><td class="id">{_e(who)}</td>'
                    f'<td class="id trigger">{_e(r.trigger or "—")}</td>'
                    f'<td class="n">{_num(r.score)} / {_num(r.threshold)}</td>'
                    f'<td>{_e(r.message)}</td></tr>')
    more = (f'<p class="note">First {ALERT_ROWS:,} of {len(rows):,} shown; the alerts file '
            f'holds them all.</p>' if len(rows) > ALERT_ROWS else "")
    return (f'<details><summary>All alerts in time order ({len(rows):,})</summary>'
            '<table class="alerts"><thead><tr><th>time (UTC)</th><th>severity</th><th>rule</th>'
            '<th>who</th><th>trigger request / batch id</th><th>score / threshold</th>'
            '<th>message</th></tr></thead><tbody>'
            f'{"".join(body)}</tbody></table>{more}</details>')


def _count(summary: dict, *names: str) -> int | None:
    """A count of the run from ``summary``, or None when it does not say."""
    for name in names:
        value = summary.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def _denominators(rows: list[_Row], summary: dict) -> str:
    """Keys judged, keys alerted and the share: the first thing to read. An attack is a
    few keys; most keys alerting is a calibration problem."""
    clients = {(r.model, r.client_id) for r in rows if not r.is_batch}
    sources = {(r.dataset, r.source) for r in rows if r.is_batch}
    batches = {(r.dataset, r.source, r.batch_id) for r in rows if r.is_batch}
    lines = [("clients", "clients (model / client id)", len(clients),
              _count(summary, "clients_judged")),
             ("sources", "training sources (dataset / source)", len(sources),
              _count(summary, "sources_judged")),
             ("batches", "training batches", len(batches),
              _count(summary, "batches_judged", "batches"))]
    body, warnings = [], []
    for kind, label, alerted, judged in lines:
        noun = label.split(" (")[0]
        reading = "" if judged is None else _e(f"{alerted:,} of {judged:,} {noun} alerted")
        if judged is None:
            share, judged_text = "—", '<span class="note">not given</span>'
        else:
            judged_text = _num(judged)
            share = f"{100 * alerted / judged:.3g} %" if judged else "—"
        body.append(f'<tr data-kind="{kind}"><th scope="row">{label}</th>'
                    f'<td class="n judged">{judged_text}</td><td class="n alerted">{_num(alerted)}'
                    f'</td><td class="n share">{share}</td><td class="reading">{reading}</td></tr>')
        # Clients only: a poisoning campaign may well taint most batches of a few sources.
        if (kind == "clients" and judged is not None and judged >= CALIBRATION_MIN_KEYS
                and CALIBRATION_SHARE * judged < alerted <= judged):
            warnings.append(
                f'<p class="calibration-warning" data-kind="{kind}"><strong>{alerted:,} of '
                f'{judged:,} {noun} alerted ({100 * alerted / judged:.3g} %).'
                f'</strong> Read this as bad calibration, not as an attack: attacks come from a few '
                f'keys, and this many at once means the thresholds do not fit this traffic (a '
                f'profile whose training set is unlike production or too small, or the wrong '
                f'profile for the model). Read the rules below and check a key with '
                f'<code>modelwatch replay --explain KEY</code> before escalating.</p>')
        elif judged is not None and alerted > judged:
            warnings.append(f'<p class="calibration-warning" data-kind="{kind}">More '
                            f'{noun} alerted than were judged: the counts '
                            f'come from another run.</p>')
    bands = Counter(r.band for r in rows)
    by_band = " · ".join(
        f'<span class="sev {b.name}" title="ECS event.severity {b.floor}-{b.ceiling}">{b.name}</span>'
        f' {bands[b.name]:,}' for b in reversed(SEVERITY_BANDS))
    return (f'<table class="denominators"><thead><tr><th>keys</th><th>judged</th>'
            f'<th>alerted</th><th>share alerted</th><th></th></tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>{"".join(warnings)}'
            f'<p class="by-severity">Alerts by severity: {by_band}</p>')


_IN_DENOMINATORS = ("clients_judged", "sources_judged", "batches_judged")  # shown in their table


def _summary(rows: list[_Row], detectors: list[str], summary: dict) -> str:
    by_detector = Counter(r.detector for r in rows)
    cards = [("alerts", _num(len(rows)), "")]
    cards += [(f"{d} alerts", _num(by_detector[d]), COLORS.get(d, OTHER_COLOR))
              for d in dict.fromkeys([*DETECTORS, *detectors])]
    cards += [("clients alerting", _num(len({(r.model, r.client_id) for r in rows
                                             if not r.is_batch})), ""),
              ("batches alerting", _num(len({(r.dataset, r.source, r.batch_id) for r in rows
                                             if r.is_batch})), "")]
    cards += [(SUMMARY_LABELS.get(k, str(k).replace("_", " ")), _num(v), "")
              for k, v in summary.items() if v is not None and k not in _IN_DENOMINATORS]
    items = "".join(
        f'<div class="card" style="border-top-color:{c or "var(--line)"}">'
        f'<dd>{v}</dd><dt>{_e(label)}</dt></div>' for label, v, c in cards)
    return f'<dl class="cards">{items}</dl>{_denominators(rows, summary)}'


def _near_misses(near_misses: list[dict] | None, rows: list[_Row]) -> str:
    """Keys that came close to a rule's threshold and never alerted, closest first."""
    head = '<h2>Near misses: keys that came close but did not alert</h2>'
    if near_misses is None:
        return (f'{head}<p class="empty near-misses-none">Near misses: not computed for this '
                f'run.</p>')
    cleaned = []
    for item in near_misses:
        if not isinstance(item, dict):
            continue
        ratio = _float(item.get("ratio"))
        cleaned.append((item.get("key"), item.get("rule"), ratio))
    cleaned.sort(key=lambda t: -t[2] if math.isfinite(t[2]) else math.inf)
    note = (f'<p class="note">Each key\'s closest rule over its events (or batches): '
            f'the best score reached as a share of the threshold, from {NEAR_MISS:.0%} up. '
            f'These keys stayed under every threshold, but not by much: worth a look when one '
            f'is also named elsewhere, and a sign of thresholds set close to honest traffic '
            f'when there are many. <code>modelwatch replay --explain KEY</code> shows every '
            f'rule of a key.</p>')
    if not cleaned:
        return (f'{head}<p class="empty">No key came within {NEAR_MISS:.0%} of a threshold '
                f'without alerting.</p>')
    known = {r.rule for r in rows} | set(RULES)
    body = []
    for rank, (key, rule, ratio) in enumerate(cleaned[:NEAR_MISS_ROWS], start=1):
        flag = "" if rule in known else ' <span class="note">(not in the rule registry)</span>'
        body.append(f'<tr><td class="n">{rank}</td><td class="id key">{_e("—" if key is None else key)}'
                    f'</td><td><span class="rule">{_e("—" if rule is None else rule)}</span>{flag}</td>'
                    f'<td class="ratio">{f"{ratio:.0%}" if math.isfinite(ratio) else "—"}'
                    f'{_near_bar(ratio)}</td></tr>')
    more = (f'<p class="note">{len(cleaned) - NEAR_MISS_ROWS:,} more not shown.</p>'
            if len(cleaned) > NEAR_MISS_ROWS else "")
    return (f'{head}{note}<table class="near-misses"><thead><tr><th>#</th>'
            f'<th>key (model / client, or dataset / source)</th><th>closest rule</th>'
            f'<th>reached (of the threshold)</th></tr></thead><tbody>{"".join(body)}'
            f'</tbody></table>{more}')


def _glossary_entry(name: str, rows: list[_Row]) -> str:
    rule = RULES.get(name)
    keys = list(dict.fromkeys(k for r in rows for k in r.evidence))
    facts = []
    if rule is None:
        summary = "not in this version's rule registry (an alert from another version?)"
        family = rows[0].detector if rows else "—"
        techniques = list(dict.fromkeys(t for r in rows for t in r.techniques))
    else:
        summary, family, techniques = rule.summary, rule.family, list(rule.techniques)
        facts += [("score against threshold",
                   f"{_e(rule.score)}; higher is more suspicious, and the rule alerts when "
                   f"the score reaches its threshold"),
                  ("expected honest value from", _e(rule.calibration)),
                  ("thresholds read (thresholds.toml)",
                   ", ".join(f"<code>{_e(k)}</code>" for k in rule.reads))]
    facts.insert(0, ("MITRE ATLAS", "<br>".join(_e(_atlas(t)) for t in techniques) or "—"))
    if keys:
        meanings = "".join(
            f'<dt><code>{_e(k)}</code></dt><dd>{_e(evidence_meaning(name, k) or "no description in this version")}</dd>'
            for k in keys)
        facts.append(("evidence keys", f'<dl class="evkeys">{meanings}</dl>'))
    elif rows:
        facts.append(("evidence keys", "its alerts carry none"))
    fired = (f'{len(rows):,} alert{"s" * (len(rows) != 1)} here' if rows
             else "no alert here")
    color = COLORS.get(family, OTHER_COLOR)
    return (f'<div class="gloss" data-rule="{_e(name)}"><h3><span class="dot" '
            f'style="background:{color}"></span><span class="rule">{_e(name)}</span> '
            f'<span class="fam">{_e(family)} · {fired}</span></h3><p>{_e(summary)}</p>'
            f'<dl class="facts">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts)
            + "</dl></div>")


def _glossary(rows: list[_Row]) -> str:
    by_rule: dict[str, list[_Row]] = defaultdict(list)
    for r in rows:
        by_rule[r.rule].append(r)
    fired = [n for n in RULES if n in by_rule] + sorted(set(by_rule) - set(RULES))
    quiet = [n for n in RULES if n not in by_rule]
    bands = ", ".join(f"{b.name} {b.floor}-{b.ceiling}" for b in SEVERITY_BANDS)
    out = [f'<h2>Rules: what fired and how to read it</h2><p class="note">Severity is ECS '
           f'<code>event.severity</code> (0-100; 50 at the threshold, 90 at twice it) named by '
           f'its band: {bands}, as in every other output. ATLAS ids are MITRE ATLAS '
           f'techniques.</p>']
    out += [_glossary_entry(n, by_rule[n]) for n in fired]
    if quiet:
        out.append(f'<details class="quiet"><summary>Rules that did not fire ({len(quiet)})'
                   f'</summary>{"".join(_glossary_entry(n, []) for n in quiet)}</details>')
    return "".join(out)


CSS = """
:root{--ink:#1d232a;--muted:#5b6470;--line:#d9dee4;--bg:#f6f7f9}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--ink);background:var(--bg)}
main{max-width:1400px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 10px}
.sub,.note,.empty{color:var(--muted)}
section{background:#fff;border:1px solid var(--line);border-radius:6px;padding:16px 18px;margin-top:16px}
section h2{margin-top:0}
section{overflow-x:auto}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:0}
.card{border:1px solid var(--line);border-top:4px solid var(--line);border-radius:4px;padding:8px 12px;min-width:130px}
.card dd{margin:0;font-size:22px;font-weight:600}.card dt{color:var(--muted);font-size:12px}
svg{max-width:100%;height:auto;font-size:11px}
svg text{fill:var(--ink)}svg .tick{fill:var(--muted)}
svg .grid{stroke:#eceff2}svg .axis{stroke:#9aa3ad}
svg .bar{shape-rendering:crispEdges}
svg .threshold-line{stroke-width:2;stroke-dasharray:5 3}
svg .threshold-label{font-weight:600;paint-order:stroke;stroke:#fff;stroke-width:3px}
.hists{display:flex;flex-wrap:wrap;gap:14px}
.hist-card{margin:0;border:1px solid var(--line);border-radius:4px;padding:8px;width:460px}
figcaption{font-size:12px;color:var(--muted)}
.rule{font-family:ui-monospace,Menlo,Consolas,monospace;color:var(--ink)}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{border-bottom:1px solid var(--line);padding:6px 8px;text-align:left;vertical-align:top}
th{background:#eef1f4;font-weight:600;white-space:nowrap}
tbody tr:nth-child(even){background:#fafbfc}
td.id{font-family:ui-monospace,Menlo,Consolas,monospace;overflow-wrap:anywhere;max-width:260px}
td.n{text-align:right;white-space:nowrap}td.when{white-space:nowrap;font-size:12px}
ul.rules,ul.evidence{margin:0;padding:0;list-style:none}
ul.evidence li+li{margin-top:4px}
ul.rules li{white-space:nowrap}ul.rules li+li{margin-top:3px}
.atlas{color:var(--muted);font-size:11px;margin-left:14px}
td.who{font-family:ui-monospace,Menlo,Consolas,monospace;overflow-wrap:anywhere;min-width:150px;max-width:240px}
td.who .main{font-weight:600}td.who .sub{color:var(--muted);font-size:12px}
td.who .k{font-family:system-ui,sans-serif;font-weight:400;color:var(--muted);font-size:11px}
td.evidence-cell{min-width:300px}
.ev{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;color:var(--muted);overflow-wrap:anywhere}
.dot{display:inline-block;width:9px;height:9px;border-radius:50%;margin-right:5px}
.sev{display:inline-block;min-width:26px;text-align:center;border-radius:3px;padding:0 5px;font-weight:600;color:#fff;font-size:12px}
.ratio-bar.near span{background:#8a96a3}
td.ratio{white-space:nowrap;min-width:140px}
.reqid{font-family:ui-monospace,Menlo,Consolas,monospace;color:var(--ink);overflow-wrap:anywhere}
.triggers{margin-top:6px;font-size:12px;color:var(--muted)}
.triggers .k{font-size:11px}
svg.strip{display:block;margin-top:6px;background:#f3f5f7}
svg.strip .axis{stroke:#c3cad2}
table.denominators{width:auto;margin-top:14px}
table.denominators th[scope=row]{background:none;font-weight:400}
table.denominators td.share{font-weight:600}
.calibration-warning{border-left:4px solid #D55E00;background:#fff4ec;padding:8px 12px;margin:10px 0 0}
.by-severity{margin:10px 0 0;color:var(--muted)}
.gloss{border-top:1px solid var(--line);padding:10px 0}
.gloss h3{font-size:14px;margin:0 0 4px}.gloss p{margin:0 0 6px}
.gloss .fam{color:var(--muted);font-weight:400;font-size:12px}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:3px 14px;margin:0;font-size:13px}
dl.facts>dt{color:var(--muted)}dl.facts>dd{margin:0}
dl.evkeys{display:grid;grid-template-columns:max-content 1fr;gap:2px 10px;margin:0}
dl.evkeys dd{margin:0}
code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
.ratio-bar{display:block;height:5px;background:#eceff2;margin-top:4px;width:120px}
.ratio-bar span{display:block;height:100%;background:#D55E00}
td.peak{white-space:nowrap}
details summary{cursor:pointer;font-weight:600}
"""
# Severity colours follow each band's dashboard colour (SEVERITY_BANDS), darkened for white text.
_BAND_COLORS = {"blue": "#2f5f98", "yellow": "#8a6d00", "orange": "#b85400", "red": "#b3261e"}
CSS += "".join(f".sev.{b.name}{{background:{_BAND_COLORS.get(b.color, OTHER_COLOR)}}}"
               for b in SEVERITY_BANDS) + "\n"


def render(alerts: list[dict], *, summary: dict | None = None,
           near_misses: list[dict] | None = None) -> str:
    """The report page as a string."""
    rows = [_row(a) for a in alerts]
    seen = {r.detector for r in rows}
    detectors = [d for d in DETECTORS if d in seen] + sorted(seen - set(DETECTORS))
    times = [r.ts for r in rows if r.ts is not None]
    span = (f"{_fmt_ts(min(times))} to {_fmt_ts(max(times))} UTC (event time)"
            if times else "no alert times")
    t_range = (min(times), max(times)) if times else None
    offenders = _offenders(rows)
    by_rule: dict[str, list[_Row]] = defaultdict(list)
    for r in rows:
        by_rule[r.rule].append(r)
    rule_order = sorted(by_rule, key=lambda k: (DETECTORS.index(by_rule[k][0].detector)
                                                if by_rule[k][0].detector in DETECTORS else 9, k))
    near = f'<section id="near-misses">{_near_misses(near_misses, rows)}</section>'
    glossary = f'<section id="glossary">{_glossary(rows)}</section>'
    if rows:
        body = (
            f'<section id="timeline"><h2>Alerts over time by detector</h2>'
            f'{_timeline(rows, detectors)}</section>'
            f'<section id="clients"><h2>Top offending clients (model / client id)</h2>'
            f'{_offender_table([o for o in offenders if len(o.key) == 2], batches=False, t_range=t_range)}'
            f'</section>'
            f'<section id="batches"><h2>Top offending training batches '
            f'(dataset / source / batch)</h2>'
            f'{_offender_table([o for o in offenders if len(o.key) == 3], batches=True, t_range=t_range)}'
            f'</section>{near}{glossary}'
            f'<section id="scores"><h2>Scores against thresholds, per rule</h2>'
            f'<p class="note">How far past its threshold each alert was: 1.0 is the threshold '
            f'itself. A rule whose alerts all sit just past 1.0 is close to the edge of honest '
            f'traffic; the raw threshold is under each plot.</p><div class="hists">'
            f'{"".join(_histogram(k, by_rule[k]) for k in rule_order)}</div></section>'
            f'<section id="alerts">{_alert_list(rows)}</section>')
    else:
        body = ('<section id="timeline"><p class="empty">No alerts: nothing fired.</p></section>'
                f'{near}{glossary}')
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        # The page needs nothing from outside; this makes the browser hold it to that.
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        'style-src \'unsafe-inline\'; img-src data:; base-uri \'none\'; form-action \'none\'">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<title>modelwatch alert report</title><style>{CSS}</style></head><body><main>'
        f'<h1>modelwatch alert report</h1><p class="sub">{_num(len(rows))} alerts · {span}</p>'
        f'<section id="summary"><h2>Summary</h2>{_summary(rows, detectors, summary or {})}'
        f'</section>{body}</main></body></html>\n')


def write_report(alerts: list[dict], out_path: Path, *, summary: dict | None = None,
                 near_misses: list[dict] | None = None) -> None:
    """Write the HTML report of ``alerts`` (ECS dicts, as in the alerts JSONL).

    ``summary`` holds counts of the run, shown first: ``events``, ``batches``
    (training batches judged), ``clients_judged`` (model / client keys seen),
    ``sources_judged`` (dataset / source pairs seen), ``dead_letters``, ``late``;
    other keys are shown under their own name. The keys judged are the denominators
    of the keys alerted; a count left out reads "not given".

    ``near_misses`` are rows ``{"key", "rule", "ratio"}`` as
    :meth:`streams.explain.Scores.near_misses` returns them; None says "not computed".
    """
    out_path = Path(out_path)
    page = render(alerts, summary=summary, near_misses=near_misses)
    part = out_path.with_name(out_path.name + ".part")  # no half-written report left behind
    try:
        part.write_text(page, encoding="utf-8")
        os.replace(part, out_path)
    except OSError as exc:
        raise UserError(f"{out_path}: cannot write report: {exc.strerror}") from None


def read_alerts(path: Path) -> list[dict]:
    alerts = []
    try:
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                try:
                    doc = json.loads(raw)
                except ValueError:
                    raise UserError(f"{path}:{number}: not a JSON alert") from None
                if not isinstance(doc, dict):
                    raise UserError(f"{path}:{number}: not a JSON object")
                alerts.append(doc)
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror}") from None
    return alerts


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as handle:
            return sum(1 for raw in handle if raw.strip())
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streams.report.html",
                                     description="an HTML report of a modelwatch alerts file")
    parser.add_argument("alerts", type=Path, help="alerts JSONL, as written by replay")
    parser.add_argument("out", type=Path, help="the HTML page to write")
    parser.add_argument("--deadletter", type=Path, help="dead-letter JSONL, to count its records")
    args = parser.parse_args(argv)
    try:
        summary = {"dead_letters": _count_lines(args.deadletter)} if args.deadletter else None
        alerts = read_alerts(args.alerts)
        write_report(alerts, args.out, summary=summary)
    except UserError as exc:
        print(f"modelwatch: {exc}", file=sys.stderr)
        return 2
    print(f"report: {len(alerts)} alerts -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
