"""The HTML report: built from a real replay of the demo scenario, checked as parsed
HTML and as rendered by headless Chromium."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import zlib
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from detectors.rules import RULES
from streams.alerts import SEVERITY_BANDS, severity_band, technique_name, techniques_of
from streams.demo.play import prepare
from streams.report.html import COLORS, evidence_meaning, write_report
from tests.conftest import ROOT, need_tool, run_cli

HOSTILE = "<script>alert(1)</script>"
# Rows as streams.explain.Scores.near_misses returns them (replay passes them in).
NEAR = [{"key": "digits-mlp/key-near", "rule": "adversarial.low_margin", "ratio": 0.912},
        {"key": f"digits/{HOSTILE}", "rule": "poisoning.duplicates", "ratio": 0.74},
        {"key": "digits-mlp/key-closer", "rule": "extraction.prada", "ratio": 0.98}]
VOID = {"meta", "br", "hr", "img", "input", "link", "col", "wbr", "source", "area", "base"}


class Node:
    def __init__(self, tag: str, attrs: dict, parent: Node | None):
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list[Node] = []
        self.text: list[str] = []

    @property
    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())

    def walk(self):
        yield self
        for child in self.children:
            yield from child.walk()

    def find(self, tag: str, cls: str | None = None) -> list[Node]:
        return [n for n in self.walk() if n.tag == tag and (cls is None or cls in n.classes)]

    def all_text(self) -> str:
        return "".join(t for n in self.walk() for t in n.text)


class Tree(HTMLParser):
    """A small DOM: enough to count SVG series and bars without a browser library."""

    def __init__(self, page: str):
        super().__init__(convert_charrefs=True)
        self.root = self.node = Node("#root", {}, None)
        self.feed(page)
        self.close()

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs), self.node)
        self.node.children.append(node)
        if tag not in VOID:
            self.node = node

    def handle_startendtag(self, tag, attrs):
        self.node.children.append(Node(tag, dict(attrs), self.node))

    def handle_endtag(self, tag):
        node = self.node
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.node = node.parent

    def handle_data(self, data):
        self.node.text.append(data)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The demo scenario replayed through the CLI, one attacker renamed to a script tag."""
    folder = tmp_path_factory.mktemp("report")
    paths = prepare(folder)
    truth = json.loads(paths["truth.json"].read_text())
    attacker = next(c for c, t in sorted(truth["clients"].items()) if t["kind"] == "attack")
    log = paths["inference.jsonl"]
    lines = []
    for line in log.read_text().splitlines():
        event = json.loads(line)
        if event["client_id"] == attacker:
            event["client_id"] = HOSTILE  # client ids are whatever the caller sends
        lines.append(json.dumps(event))
    log.write_text("\n".join(lines) + "\n")
    alerts_path, dead = folder / "alerts.jsonl", folder / "dead.jsonl"
    done = run_cli("replay", "--profile", paths["profile"], "--inference-log", log,
                   "--training-stats", paths["stats"], "--alerts-out", alerts_path,
                   "--deadletter", dead)
    assert done.returncode == 0, done.stderr
    counts = re.search(r"(\d+) events, (\d+) training batches", done.stderr)
    alerts = [json.loads(line) for line in alerts_path.read_text().splitlines()]
    events = [json.loads(line) for line in log.read_text().splitlines()]
    batches = [json.loads(line) for line in paths["stats"].read_text().splitlines()]
    summary = {"events": int(counts[1]), "batches": int(counts[2]), "dead_letters": 0,
               "clients_judged": len({(e["model"], e["client_id"]) for e in events}),
               "sources_judged": len({(b["dataset"], b["source"]) for b in batches})}
    page_path = folder / "report.html"
    write_report(alerts, page_path, summary=summary, near_misses=NEAR)
    return alerts, page_path, summary


def _bars_by_detector(svg: Node) -> Counter:
    return Counter({g.attrs["data-detector"]: sum(int(r.attrs["data-count"])
                                                  for r in g.find("rect", "bar"))
                    for g in svg.find("g", "series")})


def _check_plots(tree: Tree, alerts: list[dict]) -> None:
    """The timeline has one series per detector that alerted, and bars that add up."""
    per_detector = Counter(a["modelwatch"]["detector"] for a in alerts)
    [timeline] = [s for s in tree.root.find("svg") if "timeline" in s.classes]
    assert _bars_by_detector(timeline) == per_detector
    hists = {s.attrs["data-rule"]: s for s in tree.root.find("svg", "hist")}
    per_rule = Counter(a["rule"]["name"] for a in alerts)
    assert set(hists) == set(per_rule)
    for rule, svg in hists.items():
        assert sum(int(r.attrs["data-count"]) for r in svg.find("rect", "bar")) == per_rule[rule]
        assert len(svg.find("line", "threshold-line")) == 1


def test_scenario_alerts_cover_every_family_and_the_hostile_client(run):
    alerts, _, _ = run
    assert {a["modelwatch"]["detector"] for a in alerts} == {"extraction", "adversarial",
                                                              "poisoning"}
    assert HOSTILE in {a["modelwatch"]["client_id"] for a in alerts}


def test_every_detector_that_alerted_is_in_the_time_plot(run):
    alerts, page_path, _ = run
    _check_plots(Tree(page_path.read_text()), alerts)


def test_hostile_client_id_is_shown_as_text_never_as_markup(run):
    _, page_path, _ = run
    page = page_path.read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert HOSTILE not in page and "<script" not in page.lower()
    tree = Tree(page)
    assert not tree.root.find("script")
    [clients] = tree.root.find("table", "clients")
    assert HOSTILE in clients.all_text()


def test_page_fetches_nothing(run):
    _, page_path, _ = run
    page = page_path.read_text()
    for needle in ("src=", "href=", "url(", "@import", "<link", "http://", "https://"):
        assert needle not in page.lower(), needle
    assert "default-src 'none'" in page  # the CSP keeps the browser to it as well


def test_offenders_and_evidence(run):
    alerts, page_path, _ = run
    tree = Tree(page_path.read_text())
    [clients] = tree.root.find("table", "clients")
    [batches] = tree.root.find("table", "batches")
    client_text, batch_text = clients.all_text(), batches.all_text()
    for a in alerts:
        mw = a["modelwatch"]
        if mw["client_id"]:
            assert mw["client_id"] in client_text and mw["model"] in client_text
        else:
            assert mw["batch_id"] in batch_text and mw["source"] in batch_text
        assert a["rule"]["name"] in (client_text if mw["client_id"] else batch_text)
        first_key = next(iter(mw["evidence"]))
        assert f"{first_key}=" in (client_text if mw["client_id"] else batch_text)


def test_summary_and_raw_thresholds(run):
    alerts, page_path, summary = run
    tree = Tree(page_path.read_text())
    [cards] = tree.root.find("dl", "cards")
    text = cards.all_text()
    assert f"{summary['events']:,}inference events judged" in text
    assert f"{summary['batches']:,}training batches judged" in text
    assert "0dead letters" in text and f"{len(alerts)}alerts" in text
    captions = {f.find("span", "rule")[0].all_text(): f.find("span", "raw-threshold")[0].all_text()
                for f in tree.root.find("figure", "hist-card")}
    for a in alerts:
        assert f"{a['modelwatch']['threshold']:.4g}" in captions[a["rule"]["name"]]


def test_odd_alerts_still_render_and_every_field_is_escaped(run, tmp_path):
    """Zero threshold, infinite score, no time, an unknown detector, markup everywhere."""
    alerts, _, _ = run
    evil = '"><img src=x onerror=alert(1)>\u202e'
    odd = json.loads(json.dumps(alerts[:3]))
    odd[0]["modelwatch"].update(threshold=0.0, model=evil, client_id=evil, evidence={evil: evil})
    odd[1]["modelwatch"].update(score=1e308, detector=evil, dataset=evil, source=evil,
                                batch_id=evil, client_id=None)
    odd[1]["rule"]["name"] = evil
    del odd[2]["@timestamp"]
    out = tmp_path / "odd.html"
    write_report(odd, out, summary={evil: evil})
    page = out.read_text()
    assert "<img" not in page and "\u202e" not in page and "\\u202e" in page
    tree = Tree(page)
    assert not tree.root.find("img")
    [timeline] = [s for s in tree.root.find("svg") if "timeline" in s.classes]
    assert sum(_bars_by_detector(timeline).values()) == 2  # the one without a time is left out


def test_no_alerts_gives_a_page_that_says_so(tmp_path):
    out = tmp_path / "empty.html"
    write_report([], out, summary={"events": 10})
    page = out.read_text()
    assert "No alerts" in page and not Tree(page).root.find("svg")


def test_module_command(run, tmp_path):
    _, page_path, _ = run
    alerts_path = page_path.parent / "alerts.jsonl"
    out = tmp_path / "r.html"
    done = subprocess.run([sys.executable, "-m", "streams.report.html", alerts_path, out,
                           "--deadletter", page_path.parent / "dead.jsonl"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "dead letters" in out.read_text()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(alerts_path.read_text().splitlines()[0] + "\n{not json\n")
    done = subprocess.run([sys.executable, "-m", "streams.report.html", bad, out],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and done.stderr.strip() == f"modelwatch: {bad}:2: not a JSON alert"


def _visible(node: Node) -> bool:
    """Not inside a collapsed <details> (the page opens none by default)."""
    while node is not None:
        if node.tag == "details":
            return False
        node = node.parent
    return True


def _one_alert(alerts: list[dict], **changes) -> dict:
    """A copy of the first client alert, with modelwatch fields and severity changed."""
    doc = json.loads(json.dumps(next(a for a in alerts if a["modelwatch"]["client_id"])))
    if "severity" in changes:
        doc["event"]["severity"] = changes.pop("severity")
    if "request_id" in changes:
        doc["modelwatch"]["trigger"]["request_id"] = changes.pop("request_id")
    doc["modelwatch"].update(changes)
    return doc


def _denominator_rows(tree: Tree) -> dict[str, Node]:
    [table] = tree.root.find("table", "denominators")
    return {tr.attrs["data-kind"]: tr for tr in table.find("tr") if "data-kind" in tr.attrs}


def _cell(row: Node, cls: str) -> str:
    return row.find("td", cls)[0].all_text()


def test_denominators_keys_judged_alerted_and_share(run):
    alerts, page_path, summary = run
    tree = Tree(page_path.read_text())
    rows = _denominator_rows(tree)
    mws = [a["modelwatch"] for a in alerts]
    clients = {(m["model"], m["client_id"]) for m in mws if m["client_id"]}
    sources = {(m["dataset"], m["source"]) for m in mws if not m["client_id"]}
    batches = {(m["dataset"], m["source"], m["batch_id"]) for m in mws if not m["client_id"]}
    for kind, alerted, judged in (("clients", clients, summary["clients_judged"]),
                                  ("sources", sources, summary["sources_judged"]),
                                  ("batches", batches, summary["batches"])):
        assert 0 < len(alerted) < judged
        assert _cell(rows[kind], "judged") == f"{judged:,}"
        assert _cell(rows[kind], "alerted") == f"{len(alerted):,}"
        assert _cell(rows[kind], "share") == f"{100 * len(alerted) / judged:.3g} %"
    assert f"{len(clients)} of {summary['clients_judged']} clients alerted" in \
        _cell(rows["clients"], "reading")
    assert not tree.root.find("p", "calibration-warning")  # a few keys: read as attacks


def test_most_clients_alerting_reads_as_bad_calibration_not_as_an_attack(run, tmp_path):
    alerts, _, _ = run
    ten = [_one_alert(alerts, client_id=f"honest-{i}", request_id=f"req-{i}") for i in range(10)]
    out = tmp_path / "ten.html"
    write_report(ten, out, summary={"events": 5000, "clients_judged": 10})
    tree = Tree(out.read_text())
    assert _cell(_denominator_rows(tree)["clients"], "reading") == "10 of 10 clients alerted"
    [warning] = tree.root.find("p", "calibration-warning")
    assert "10 of 10 clients alerted (100 %)" in warning.all_text()
    assert "bad calibration, not as an attack" in warning.all_text()

    write_report(ten, out, summary={"clients_judged": 10_000})
    tree = Tree(out.read_text())
    assert _cell(_denominator_rows(tree)["clients"], "share") == "0.1 %"
    assert not tree.root.find("p", "calibration-warning")

    write_report(ten, out)  # a run that does not say how many keys it judged
    rows = _denominator_rows(Tree(out.read_text()))
    assert _cell(rows["clients"], "judged") == "not given" and _cell(rows["clients"], "share") == "—"


def test_glossary_names_each_rule_its_atlas_techniques_and_evidence_keys(run):
    alerts, page_path, _ = run
    tree = Tree(page_path.read_text())
    entries = {d.attrs["data-rule"]: d for d in tree.root.find("div", "gloss")}
    assert set(entries) == set(RULES)  # those that did not fire too, folded away
    for a in alerts:
        name = a["rule"]["name"]
        entry = entries[name]
        assert _visible(entry), name  # a rule that fired is explained in the open
        text = entry.all_text()
        rule = RULES[name]
        for part in (rule.summary, rule.score, rule.calibration):
            assert part in text, (name, part)
        for technique in techniques_of(a):
            assert f"{technique} {technique_name(technique)}" in text
        assert "AML.T0024.002 Extract AI Model" in entries["extraction.prada"].all_text()
        for key in a["modelwatch"]["evidence"]:
            meaning = evidence_meaning(name, key)
            assert meaning, (name, key)
            assert f"{key}{meaning}" in text


def _evidence_keys_in_detectors() -> set[str]:
    """Every evidence key the rule code writes as a literal: ``evidence=`` dicts, the last
    argument of ``_verdict(...)``, the dict lambdas of ``_candidate``, ``details[...] =``,
    ``out[...]`` in ``evidence_at`` and ``.evidence[...]``."""
    import ast

    keys: set[str] = set()

    def add(node):
        if isinstance(node, ast.Dict):
            keys.update(k.value for k in node.keys if isinstance(k, ast.Constant))

    for name in ("adversarial", "extraction", "monitor", "poisoning"):
        tree = ast.parse((ROOT / "detectors" / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "evidence":
                add(node.value)
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "_verdict":
                add(node.args[-1])
            elif isinstance(node, ast.Lambda):
                add(node.body)
            elif isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == "evidence"
                    or isinstance(t, ast.Subscript) and getattr(t.value, "id", "") == "details"
                    for t in node.targets):
                add(node.value)
            elif isinstance(node, ast.FunctionDef) and node.name == "evidence_at":
                keys.update(n.slice.value for n in ast.walk(node) if isinstance(n, ast.Subscript)
                            and isinstance(n.slice, ast.Constant) and isinstance(n.slice.value, str))
    return keys | {"also"}  # streams/pipeline.py: the other rules on the same batch


def test_every_evidence_key_the_detectors_write_has_a_meaning():
    keys = _evidence_keys_in_detectors()
    assert {"flagged", "shapiro_w", "ids_behind_ip", "looks_like", "ood_score"} <= keys
    assert sorted(k for k in keys if not evidence_meaning("", k)) == []


def test_severity_words_come_from_the_one_band_table(run, tmp_path):
    alerts, page_path, _ = run
    tree = Tree(page_path.read_text())
    [table] = tree.root.find("table", "alerts")
    sevs = table.find("span", "sev")
    assert sorted(int(s.attrs["data-severity"]) for s in sevs) == sorted(
        a["event"]["severity"] for a in alerts)
    for s in sevs:
        assert s.all_text() == severity_band(int(s.attrs["data-severity"])).name
    edges = [v for b in SEVERITY_BANDS for v in (b.floor, b.ceiling)]
    out = tmp_path / "bands.html"
    write_report([_one_alert(alerts, severity=v, client_id=f"c{v}") for v in edges], out)
    [table] = Tree(out.read_text()).root.find("table", "alerts")
    words = {int(s.attrs["data-severity"]): s.all_text() for s in table.find("span", "sev")}
    assert words == {v: severity_band(v).name for v in edges}
    assert set(words.values()) == {"low", "medium", "high", "critical"}


def test_trigger_request_ids_and_activity_per_key(run):
    alerts, page_path, _ = run
    tree = Tree(page_path.read_text())
    [clients] = tree.root.find("table", "clients")
    [batches] = tree.root.find("table", "batches")
    [listing] = tree.root.find("table", "alerts")
    listed = [td.all_text() for td in listing.find("td", "trigger")]
    for a in alerts:
        mw = a["modelwatch"]
        trigger = mw["trigger"]["request_id"] if mw["client_id"] else mw["batch_id"]
        assert trigger and trigger in listed
        table = clients if mw["client_id"] else batches
        shown = {s.all_text() for s in table.find("span", "reqid")}
        assert trigger in shown, trigger
    per_key = Counter((a["modelwatch"]["model"], a["modelwatch"]["client_id"]) for a in alerts
                      if a["modelwatch"]["client_id"])
    rows = clients.find("tbody")[0].children
    assert len(rows) == len(per_key)
    for row in rows:
        who = row.find("td", "who")[0]
        client = "".join(who.find("div", "main")[0].text).strip()  # its own text, not the label
        model = "".join(who.find("div", "sub")[0].text).strip()
        [strip] = row.find("svg", "strip")
        assert int(strip.attrs["data-alerts"]) == per_key[(model, client)]
        assert sum(int(r.attrs["data-count"]) for r in strip.find("rect")) == per_key[(model, client)]


def test_near_misses_from_the_rows_given(run, tmp_path):
    _, page_path, _ = run
    tree = Tree(page_path.read_text())
    [table] = tree.root.find("table", "near-misses")
    rows = table.find("tbody")[0].children
    got = [(r.find("td", "key")[0].all_text(), r.find("span", "rule")[0].all_text(),
            r.find("td", "ratio")[0].all_text()) for r in rows]
    assert got == [("digits-mlp/key-closer", "extraction.prada", "98%"),
                   ("digits-mlp/key-near", "adversarial.low_margin", "91%"),
                   (f"digits/{HOSTILE}", "poisoning.duplicates", "74%")]
    out = tmp_path / "near.html"
    write_report([], out)
    assert "Near misses: not computed for this run." in Tree(out.read_text()).root.all_text()
    write_report([], out, near_misses=[])
    assert "No key came within 70% of a threshold" in out.read_text()
    write_report([], out, near_misses=NEAR)
    assert len(Tree(out.read_text()).root.find("table", "near-misses")[0].find("tr")) == 4


# --- rendered in a real browser -----------------------------------------------------

def _chromium() -> str:
    return need_tool("chromium", "chromium-browser", package="chromium")


def _headless(browser: str, profile: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                           "--hide-scrollbars", f"--user-data-dir={profile}", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def _png_pixels(path: Path) -> np.ndarray:
    """RGB(A) pixels of a non-interlaced 8-bit PNG, as Chromium writes them (no Pillow here)."""
    data, pos, idat = path.read_bytes(), 8, b""
    while pos < len(data):
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + size]
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and color in (2, 6) and interlace == 0
        elif kind == b"IDAT":
            idat += body
        pos += 12 + size
    bpp = 3 if color == 2 else 4
    stride = width * bpp
    raw = zlib.decompress(idat)
    out = np.zeros((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.int64)
    for row in range(height):
        kind = raw[row * (stride + 1)]
        line = np.frombuffer(raw, np.uint8, stride, row * (stride + 1) + 1).astype(np.int64)
        if kind == 1:  # Sub: a running sum per channel
            line = line.reshape(-1, bpp).cumsum(0).reshape(-1) % 256
        elif kind == 2:
            line = (line + prev) % 256
        elif kind in (3, 4):  # Average, Paeth: depend on the left pixel, one byte at a time
            cur, up = line.tolist(), prev.tolist()
            for i in range(stride):
                a = cur[i - bpp] if i >= bpp else 0
                b, c = up[i], (up[i - bpp] if i >= bpp else 0)
                if kind == 3:
                    pred = (a + b) // 2
                else:
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                cur[i] = (cur[i] + pred) % 256
            line = np.array(cur, dtype=np.int64)
        out[row], prev = line, line
    return out.reshape(height, width, bpp)[..., :3]


def test_chromium_renders_the_plots(run, tmp_path):
    browser = _chromium()
    alerts, page_path, _ = run
    done = _headless(browser, tmp_path / "profile", "--dump-dom", page_path.as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    dom = Tree(done.stdout)  # the DOM after parsing and layout, not our own string
    _check_plots(dom, alerts)
    [clients] = dom.root.find("table", "clients")
    assert HOSTILE in clients.all_text() and not dom.root.find("script")

    shot = tmp_path / "shot.png"
    done = _headless(browser, tmp_path / "profile", f"--screenshot={shot}",
                     "--window-size=1100,1200", page_path.as_uri())
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    pixels = _png_pixels(shot)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # not a blank page
    for detector in {a["modelwatch"]["detector"] for a in alerts}:
        rgb = np.array([int(COLORS[detector][i:i + 2], 16) for i in (1, 3, 5)])
        match = np.abs(pixels.astype(int) - rgb).max(axis=2) <= 3
        # A bar is taller than the legend swatch (14 px) and the summary card border (4 px).
        assert match.sum(axis=0).max() >= 25, f"no {detector} bar painted"


def test_chromium_shows_denominators_glossary_severity_triggers_and_near_misses(run, tmp_path):
    """What an analyst reads first, in the DOM as Chromium built it and outside any
    folded <details>; the near-miss bars and severity badges painted."""
    browser = _chromium()
    alerts, page_path, summary = run
    done = _headless(browser, tmp_path / "profile", "--dump-dom", page_path.as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    dom = Tree(done.stdout)

    rows = _denominator_rows(dom)
    clients = {(a["modelwatch"]["model"], a["modelwatch"]["client_id"]) for a in alerts
               if a["modelwatch"]["client_id"]}
    assert _cell(rows["clients"], "reading") == \
        f"{len(clients)} of {summary['clients_judged']} clients alerted"
    assert all(_visible(r) for r in rows.values())

    entries = {d.attrs["data-rule"]: d for d in dom.root.find("div", "gloss")}
    for name in {a["rule"]["name"] for a in alerts}:
        assert _visible(entries[name]) and RULES[name].summary in entries[name].all_text()

    [table] = dom.root.find("table", "clients")
    sevs = table.find("span", "sev")
    assert sevs and all(s.all_text() == severity_band(int(s.attrs["data-severity"])).name
                        for s in sevs)
    shown = {s.all_text() for s in table.find("span", "reqid") if _visible(s)}
    assert {a["modelwatch"]["trigger"]["request_id"] for a in alerts
            if a["modelwatch"]["client_id"]} <= shown

    [near] = dom.root.find("table", "near-misses")
    assert _visible(near)
    assert [r.find("td", "key")[0].all_text() for r in near.find("tbody")[0].children] == \
        [n["key"] for n in sorted(NEAR, key=lambda n: -n["ratio"])]

    page = tmp_path / "quiet.html"  # no alert: the near misses come right after the summary
    write_report([], page, summary={"events": 900, "clients_judged": 30}, near_misses=NEAR)
    shot = tmp_path / "quiet.png"
    done = _headless(browser, tmp_path / "profile", f"--screenshot={shot}",
                     "--window-size=1100,900", page.as_uri())
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    pixels = _png_pixels(shot).astype(int)

    def painted(hex_color: str) -> np.ndarray:
        rgb = np.array([int(hex_color[i:i + 2], 16) for i in (1, 3, 5)])
        return np.abs(pixels - rgb).max(axis=2) <= 3

    # The 98 % bar fills most of its 120 px track.
    assert painted("#8a96a3").sum(axis=1).max() >= 100, "no near-miss bar painted"
    from streams.report.html import _BAND_COLORS
    for band in SEVERITY_BANDS:  # the "alerts by severity" line shows every band's badge
        assert painted(_BAND_COLORS[band.color]).sum() >= 100, f"no {band.name} badge painted"
