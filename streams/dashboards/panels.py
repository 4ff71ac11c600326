"""Small builders for Grafana dashboard JSON (schema 39), shared by the dashboard modules.

Every panel reads the ``$datasource`` variable, so one file works against any
Prometheus. Panels are laid out left to right, 24 grid units a row.
"""

from __future__ import annotations

from streams.dashboards.queries import INFERENCE_TOPIC, STATS_TOPIC

SCHEMA_VERSION = 39
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
TAG = "modelwatch"
# Grafana's own rate window: at least four scrapes, whatever the scrape interval.
RATE = "$__rate_interval"


def target(expr: str, legend: str = "", ref: str = "A", **extra) -> dict:
    return {"refId": ref, "datasource": DATASOURCE, "expr": expr, "legendFormat": legend,
            "range": True, **extra}


def _targets(queries) -> list[dict]:
    """``queries``: an expression, or (expr, legend) pairs."""
    if isinstance(queries, str):
        queries = [(queries, "")]
    return [target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(queries)]


def _panel(kind: str, title: str, queries, width: int, height: int, description: str,
           unit: str, options: dict | None = None, field_extra: dict | None = None,
           overrides: list[dict] | None = None, **extra) -> dict:
    return {"type": kind, "title": title, "description": description, "datasource": DATASOURCE,
            "gridPos": {"w": width, "h": height},
            "targets": _targets(queries),
            "fieldConfig": {"defaults": {"unit": unit, **(field_extra or {})},
                            "overrides": overrides or []},
            "options": options or {}, **extra}


def series_colors(colors: dict[str, str]) -> list[dict]:
    """Field overrides giving each named series (its legend text) a fixed color."""
    return [{"matcher": {"id": "byName", "options": name},
             "properties": [{"id": "color", "value": {"mode": "fixed", "fixedColor": color}}]}
            for name, color in colors.items()]


def severity_colors() -> list[dict]:
    """The severity bands' colors (``streams.alerts.SEVERITY_BANDS``), by band name."""
    from streams.alerts import SEVERITY_BANDS

    return series_colors({band.name: band.color for band in SEVERITY_BANDS})


def severity_description() -> str:
    from streams.alerts import SEVERITY_BANDS

    bands = ", ".join(f"{b.name} {b.floor}-{b.ceiling}" for b in SEVERITY_BANDS)
    return f"alerts per minute, by ECS severity band ({bands})"


def timeseries(title: str, queries, *, unit: str = "short", width: int = 12, height: int = 8,
               description: str = "", stack: bool = False, bars: bool = False,
               overrides: list[dict] | None = None) -> dict:
    custom = {"drawStyle": "bars" if bars else "line", "fillOpacity": 60 if bars else 10,
              "stacking": {"mode": "normal" if stack else "none", "group": "A"}}
    return _panel("timeseries", title, queries, width, height, description, unit,
                  {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                   "tooltip": {"mode": "multi", "sort": "desc"}},
                  {"custom": custom}, overrides, interval="1m" if bars else None)


def stat(title: str, queries, *, unit: str = "short", width: int = 6, height: int = 4,
         description: str = "", thresholds: list[tuple[float | None, str]] | None = None) -> dict:
    steps = [{"value": v, "color": c} for v, c in (thresholds or [(None, "green")])]
    panel = _panel("stat", title, queries, width, height, description, unit,
                   {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "value", "graphMode": "area", "textMode": "auto"},
                   {"thresholds": {"mode": "absolute", "steps": steps}})
    for t in panel["targets"]:
        if "$__range" in t["expr"]:  # a total over the whole range: one value, not a series
            t.update(instant=True, range=False)
    return panel


def bargauge(title: str, queries, *, unit: str = "short", width: int = 12, height: int = 8,
             description: str = "") -> dict:
    panel = _panel("bargauge", title, queries, width, height, description, unit,
                   {"displayMode": "gradient", "orientation": "horizontal",
                    "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "showUnfilled": True})
    for t in panel["targets"]:
        t.update(instant=True, range=False)
    return panel


def heatmap(title: str, expr: str, *, unit: str = "short", width: int = 12, height: int = 8,
            description: str = "") -> dict:
    """A Prometheus histogram as a heatmap: ``expr`` sums ``_bucket`` series by ``le``."""
    panel = _panel("heatmap", title, [(expr, "{{le}}")], width, height, description, unit,
                   {"calculate": False, "yAxis": {"unit": unit},
                    "cellGap": 1, "color": {"mode": "scheme", "scheme": "Oranges"},
                    "tooltip": {"show": True, "yHistogram": True}},
                   interval="1m")
    panel["targets"][0]["format"] = "heatmap"
    return panel


def row(title: str) -> dict:
    return {"type": "row", "title": title, "collapsed": False, "panels": [],
            "gridPos": {"w": 24, "h": 1}}


def _layout(panels: list[dict]) -> list[dict]:
    """Grid positions and ids in order: fill rows of 24 units, a row panel starts a new line."""
    x = y = row_height = 0
    out = []
    for i, panel in enumerate(panels, start=1):
        panel = {k: v for k, v in panel.items() if v is not None}
        w, h = panel["gridPos"]["w"], panel["gridPos"]["h"]
        if panel["type"] == "row" or x + w > 24:
            x, y, row_height = 0, y + row_height, 0
        panel["gridPos"] = {"x": x, "y": y, "w": w, "h": h}
        panel["id"] = i
        out.append(panel)
        x, row_height = x + w, max(row_height, h)
        if panel["type"] == "row":
            x, y, row_height = 0, y + h, 0
    return out


def textbox(name: str, label: str, default: str, description: str) -> dict:
    """A free-text variable (topic names are settings, so they are not hard-wired)."""
    return {"type": "textbox", "name": name, "label": label, "description": description,
            "query": default, "current": {"text": default, "value": default},
            "options": [{"selected": True, "text": default, "value": default}], "hide": 0}


def inference_topic() -> dict:
    return textbox("inference_topic", "Inference topic", INFERENCE_TOPIC,
                   "MODELWATCH_TOPIC_INFERENCE of the worker")


def stats_topic() -> dict:
    return textbox("stats_topic", "Training-stats topic", STATS_TOPIC,
                   "MODELWATCH_TOPIC_STATS of the worker")


def dashboard(uid: str, title: str, description: str, panels: list[dict],
              variables: list[dict] = ()) -> dict:
    datasource = {"type": "datasource", "name": "datasource", "label": "Data source",
                  "query": "prometheus", "current": {}, "options": [], "refresh": 1,
                  "regex": "", "hide": 0}
    return {
        "uid": uid, "title": title, "description": description, "tags": [TAG],
        "editable": True, "graphTooltip": 1, "schemaVersion": SCHEMA_VERSION, "version": 1,
        "time": {"from": "now-6h", "to": "now"}, "refresh": "30s", "timezone": "browser",
        "annotations": {"list": []},
        "links": [{"type": "dashboards", "tags": [TAG], "title": "modelwatch", "asDropdown": False,
                   "includeVars": True, "keepTime": True, "icon": "external link",
                   "targetBlank": False, "tooltip": "", "url": ""}],
        "templating": {"list": [datasource, *variables]},
        "panels": _layout(panels),
    }
