"""One severity table: OCSF, syslog, CEF, the metric label and the dashboards agree."""

from __future__ import annotations

import copy

from streams.alerts import SEVERITY_BANDS, cef_severity, severity_band
from streams.dashboards import build_all
from streams.metrics import SEVERITIES, WorkerMetrics, severity_label
from streams.sinks.formats import cef, ocsf
from streams.sinks.syslog_cef import syslog_message
from tests.test_sinks import ALERT, parse_cef

# ArcSight's words for CEF's 0..10, and the band each stands for.
CEF_WORDS = {"low": range(0, 4), "medium": range(4, 7), "high": range(7, 9),
             "critical": range(9, 11)}
# RFC 5424 severities, the more urgent the lower.
SYSLOG = {"low": 5, "medium": 4, "high": 3, "critical": 2}


def at(severity: int) -> dict:
    doc = copy.deepcopy(ALERT)
    doc["event"]["severity"], doc["event"]["risk_score"] = severity, float(severity)
    return doc


def test_the_bands_cover_0_to_100_in_order_without_gaps():
    assert SEVERITY_BANDS[0].floor == 0 and SEVERITY_BANDS[-1].ceiling == 100
    for lower, upper in zip(SEVERITY_BANDS, SEVERITY_BANDS[1:], strict=False):
        assert upper.floor == lower.ceiling + 1
    assert [b.name for b in SEVERITY_BANDS] == ["low", "medium", "high", "critical"]
    assert SEVERITIES == tuple(b.name for b in SEVERITY_BANDS)


def test_every_output_names_each_severity_as_its_band():
    metrics = WorkerMetrics()
    previous = None
    for severity in range(0, 101):
        band = severity_band(severity)
        doc = at(severity)
        # OCSF
        assert (ocsf(doc)["severity_id"], ocsf(doc)["severity"]) == (band.ocsf_id,
                                                                    band.ocsf_name)
        # syslog PRI = facility * 8 + severity (local0 = 16)
        pri = int(syslog_message(doc, hostname="h").split(b">")[0][1:])
        assert pri - 16 * 8 == band.syslog == SYSLOG[band.name]
        # CEF: the header's 7th field, inside ArcSight's word for the band
        level = int(parse_cef(cef(doc))[0][6])
        assert level == cef_severity(severity) and level in CEF_WORDS[band.name]
        # the metric label
        assert severity_label(severity) == band.name
        metrics.alert(doc)
        assert metrics.value("modelwatch_alerts_total", detector="extraction", rule="other",
                             severity=band.name) >= 1
        # never less urgent for a higher severity
        if previous is not None:
            assert band.ocsf_id >= previous[0] and band.syslog <= previous[1]
            assert level >= previous[2]
        previous = (band.ocsf_id, band.syslog, level)


def test_out_of_range_severities_take_the_nearest_band():
    assert severity_band(-5).name == "low" and severity_band(250).name == "critical"
    assert severity_band(float("nan")).name == "critical"
    assert cef_severity(250) == 10 and cef_severity(-5) == 0


def test_dashboards_take_the_bands_words_colors_and_floors():
    top = SEVERITY_BANDS[-1]
    colors = {b.name: b.color for b in SEVERITY_BANDS}
    seen_overrides = seen_stats = 0
    for name, doc in build_all().items():
        for panel in doc["panels"]:
            exprs = " ".join(t["expr"] for t in panel.get("targets", []))
            if 'by (severity)' in exprs:
                overrides = {o["matcher"]["options"]: o["properties"][0]["value"]["fixedColor"]
                             for o in panel["fieldConfig"]["overrides"]}
                assert overrides == colors, (name, panel["title"])
                for band in SEVERITY_BANDS:
                    assert f"{band.name} {band.floor}-{band.ceiling}" in panel["description"]
                seen_overrides += 1
            for severity in ("low", "medium", "high", "critical"):
                if f'severity="{severity}"' in exprs:
                    assert severity == top.name, (name, panel["title"])
                    assert f"{top.floor} or more" in panel["description"]
                    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
                    assert steps[-1]["color"] == top.color
                    seen_stats += 1
    assert seen_overrides == 4 and seen_stats == 3  # overview + 3 families; 3 families
