"""``modelwatch replay --report``: the alerts of a run as one self-contained HTML page.

The page holds a summary, alerts over time by detector, the top offending
clients and training batches with their evidence, and per rule the spread of
score/threshold. CSS is inline and the plots are SVG drawn here: the page
fetches nothing and runs no script, and its Content-Security-Policy tells the
browser so. Client ids, batch ids and evidence strings come from whoever sends
traffic, so every piece of text goes through ``_e``.

    python -m streams.report alerts.jsonl report.html [--deadletter dl.jsonl]
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
    "dead_letters": "dead letters (bad records)",
    "late": "events judged out of time order",
}
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
    technique = ((doc.get("threat") or {}).get("technique") or {}).get("id") or []
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
    level = "high" if value >= 80 else "medium" if value >= 60 else "low"
    return f'<span class="sev {level}" title="ECS event.severity">{value}</span>'


def _ratio_bar(ratio: float | None) -> str:
    if ratio is None:
        return ""
    # Bar length on a log scale: 1× is a sliver, 10× and more fills the cell.
    share = max(0.04, min(1.0, math.log10(max(ratio, 1.0)) + 0.04))
    return f'<span class="ratio-bar"><span style="width:{share * 100:.0f}%"></span></span>'


def _evidence(rows: list[_Row]) -> str:
    """The strongest alert of each rule fired: score against threshold and its numbers."""
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
                     f'<br><span class="ev">{numbers or "no evidence numbers"}</span></li>')
    return f'<ul class="evidence">{"".join(items)}</ul>'


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


def _rules_fired(rows: list[_Row]) -> str:
    counts = Counter(r.rule for r in rows)
    detector = {r.rule: r.detector for r in rows}
    techniques: dict[str, set] = defaultdict(set)
    for r in rows:
        techniques[r.rule].update(r.techniques)
    return '<ul class="rules">' + "".join(
        f'<li><span class="dot" style="background:{COLORS.get(detector[rule], OTHER_COLOR)}">'
        f'</span>{_e(rule)} ×{n}<div class="atlas">{_e(" ".join(sorted(techniques[rule])))}'
        f'</div></li>' for rule, n in sorted(counts.items())) + "</ul>"


def _span(times: list[float]) -> str:
    if not times or min(times) == max(times):
        return _e(_fmt_ts(min(times) if times else None))
    return f"{_e(_fmt_ts(min(times)))}<br>{_e(_fmt_ts(max(times)))}"


def _offender_table(offenders: list[_Offender], *, batches: bool) -> str:
    what = "training batches" if batches else "clients"
    if not offenders:
        return f'<p class="empty">No {what} alerted.</p>'
    heads = ["#", "batch" if batches else "client", "alerts", "rules fired (MITRE ATLAS)",
             "peak: score / threshold", "first / last alert (UTC)"]
    heads += ["evidence (strongest alert per rule)"]
    out = [f'<table class="offenders {"batches" if batches else "clients"}"><thead><tr>',
           *(f"<th>{h}</th>" for h in heads), "</tr></thead><tbody>"]
    for rank, o in enumerate(offenders[:TOP], start=1):
        peak = o.peak
        times = [r.ts for r in o.rows if r.ts is not None]
        cells = [
            f'<td class="n">{rank}</td>',
            f'<td class="who">{_who(o, batches)}</td>',
            f'<td class="n">{len(o.rows):,}</td>',
            f"<td>{_rules_fired(o.rows)}</td>",
            f'<td class="peak">{_sev(peak.severity)} {_num(peak.score)} / {_num(peak.threshold)}'
            f'{f" = {_num(peak.ratio)}×" if peak.ratio is not None else ""}'
            f'{_ratio_bar(peak.ratio)}</td>',
            f'<td class="when">{_span(times)}</td>',
        ]
        cells.append(f'<td class="evidence-cell">{_evidence(o.rows)}</td>')
        out.append(f'<tr>{"".join(cells)}</tr>')
    out.append("</tbody></table>")
    if len(offenders) > TOP:
        out.append(f'<p class="note">{len(offenders) - TOP} more {what} not shown; '
                   f'they are in the alert list below.</p>')
    return "".join(out)


def _alert_list(rows: list[_Row]) -> str:
    ordered = sorted(rows, key=lambda r: (r.ts is None, r.ts or 0.0, r.rule))
    body = []
    for r in ordered[:ALERT_ROWS]:
        who = (f"batch {r.batch_id} of {r.dataset} from {r.source}" if r.is_batch
               else f"client {r.client_id} of {r.model}")
        body.append(f'<tr><td class="when">{_e(_fmt_ts(r.ts))}</td><td>{_sev(r.severity)}</td>'
                    f'<td>{_e(r.rule)}</td><td class="id">{_e(who)}</td>'
                    f'<td class="n">{_num(r.score)} / {_num(r.threshold)}</td>'
                    f'<td>{_e(r.message)}</td></tr>')
    more = (f'<p class="note">First {ALERT_ROWS:,} of {len(rows):,} shown; the alerts file '
            f'holds them all.</p>' if len(rows) > ALERT_ROWS else "")
    return (f'<details><summary>All alerts in time order ({len(rows):,})</summary>'
            '<table class="alerts"><thead><tr><th>time (UTC)</th><th>sev</th><th>rule</th>'
            '<th>who</th><th>score / threshold</th><th>message</th></tr></thead><tbody>'
            f'{"".join(body)}</tbody></table>{more}</details>')


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
              for k, v in summary.items() if v is not None]
    items = "".join(
        f'<div class="card" style="border-top-color:{c or "var(--line)"}">'
        f'<dd>{v}</dd><dt>{_e(label)}</dt></div>' for label, v, c in cards)
    return f'<dl class="cards">{items}</dl>'


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
.sev{display:inline-block;min-width:26px;text-align:center;border-radius:3px;padding:0 4px;font-weight:600;color:#fff}
.sev.high{background:#b3261e}.sev.medium{background:#c76a00}.sev.low{background:#7a7f00}
.ratio-bar{display:block;height:5px;background:#eceff2;margin-top:4px;width:120px}
.ratio-bar span{display:block;height:100%;background:#D55E00}
td.peak{white-space:nowrap}
details summary{cursor:pointer;font-weight:600}
"""


def render(alerts: list[dict], *, summary: dict | None = None) -> str:
    """The report page as a string."""
    rows = [_row(a) for a in alerts]
    seen = {r.detector for r in rows}
    detectors = [d for d in DETECTORS if d in seen] + sorted(seen - set(DETECTORS))
    times = [r.ts for r in rows if r.ts is not None]
    span = (f"{_fmt_ts(min(times))} to {_fmt_ts(max(times))} UTC (event time)"
            if times else "no alert times")
    offenders = _offenders(rows)
    by_rule: dict[str, list[_Row]] = defaultdict(list)
    for r in rows:
        by_rule[r.rule].append(r)
    rule_order = sorted(by_rule, key=lambda k: (DETECTORS.index(by_rule[k][0].detector)
                                                if by_rule[k][0].detector in DETECTORS else 9, k))
    if rows:
        body = (
            f'<section id="timeline"><h2>Alerts over time by detector</h2>'
            f'{_timeline(rows, detectors)}</section>'
            f'<section id="clients"><h2>Top offending clients (model / client id)</h2>'
            f'{_offender_table([o for o in offenders if len(o.key) == 2], batches=False)}</section>'
            f'<section id="batches"><h2>Top offending training batches '
            f'(dataset / source / batch)</h2>'
            f'{_offender_table([o for o in offenders if len(o.key) == 3], batches=True)}</section>'
            f'<section id="scores"><h2>Scores against thresholds, per rule</h2>'
            f'<p class="note">How far past its threshold each alert was: 1.0 is the threshold '
            f'itself. A rule whose alerts all sit just past 1.0 is close to the edge of honest '
            f'traffic; the raw threshold is under each plot.</p><div class="hists">'
            f'{"".join(_histogram(k, by_rule[k]) for k in rule_order)}</div></section>'
            f'<section id="alerts">{_alert_list(rows)}</section>')
    else:
        body = '<section id="timeline"><p class="empty">No alerts: nothing fired.</p></section>'
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


def write_report(alerts: list[dict], out_path: Path, *, summary: dict | None = None) -> None:
    """Write the HTML report of ``alerts`` (ECS dicts, as in the alerts JSONL).

    ``summary`` holds counts of the run, shown first: ``events``, ``batches``,
    ``dead_letters``, ``late``; other keys are shown under their own name.
    """
    out_path = Path(out_path)
    page = render(alerts, summary=summary)
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
    parser = argparse.ArgumentParser(prog="python -m streams.report",
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
