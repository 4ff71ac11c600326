"""Grafana dashboards and Prometheus rules: generated from code, committed, pushed."""

from __future__ import annotations

import argparse
import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from streams.dashboards import DASHBOARDS, OUT, build_all, render, stale
from streams.dashboards.push import add_dashboards_parser, folder_uid, push
from streams.metrics import WorkerMetrics
from streams.tabular import UserError
from tests.conftest import ROOT


def test_committed_files_equal_the_generated_ones():
    assert OUT == ROOT / "dashboards"
    assert stale() == [], "run: python -m streams.dashboards build"


def test_build_command_checks_and_writes(tmp_path, monkeypatch):
    from streams.dashboards import __main__ as main

    assert main.main(["build", "--check"]) == 0
    monkeypatch.setattr(main, "OUT", tmp_path)
    assert main.main(["build", "--check"]) == 1
    assert main.main(["build"]) == 0
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.*")) == sorted(
        rel.as_posix() for rel in render())


def test_dashboards_have_fixed_uids_and_the_datasource_variable():
    docs = build_all()
    assert set(docs) == {"overview", "extraction", "adversarial", "poisoning", "pipeline"}
    assert [d["uid"] for d in docs.values()] == [m.UID for m in DASHBOARDS.values()]
    assert len({d["uid"] for d in docs.values()}) == len(docs)
    for name, doc in docs.items():
        variables = {v["name"]: v for v in doc["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        assert "id" not in doc, name  # a fixed id would clash on import; the uid identifies it
        ids = [p["id"] for p in doc["panels"]]
        assert len(ids) == len(set(ids)), name
        for panel in doc["panels"]:
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, (name, panel["title"])
            if panel["type"] == "row":
                continue
            assert panel["datasource"]["uid"] == "${datasource}", (name, panel["title"])
            assert panel["targets"], (name, panel["title"])
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${datasource}"
                for var in re.findall(r"\$(\w+)", target["expr"]):
                    assert var.startswith("__") or var in variables, (name, var)


def exposed_names(metrics: WorkerMetrics) -> set[str]:
    """Every series name the worker's registry can expose, samples or not yet."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"),
                "gauge": ("",), "info": ("_info",)}
    names = set()
    for family in metrics.registry.collect():
        names |= {family.name + s for s in suffixes.get(family.type, ("",))}
        names |= {sample.name for sample in family.samples}
    return names


def expressions() -> list[str]:
    """Every PromQL expression of every dashboard panel and alerting rule."""
    from streams.dashboards.rules import rules

    exprs = [t["expr"] for d in build_all().values() for p in d["panels"]
             for t in p.get("targets", [])]
    return exprs + [r["expr"] for g in rules()["groups"] for r in g["rules"]]


def test_every_metric_the_dashboards_and_rules_read_is_one_the_worker_exposes():
    exposed = exposed_names(WorkerMetrics())
    read = {name for e in expressions() for name in re.findall(r"\b(?:modelwatch|process)_\w+", e)}
    assert read - exposed == set()
    # ... and the dashboards show every modelwatch metric there is.
    shown = {re.sub(r"_(bucket|count|sum)$", "", n) for n in read if n.startswith("modelwatch_")}
    defined = {re.sub(r"_(bucket|count|sum)$", "", n) for n in exposed
               if n.startswith("modelwatch_")}
    assert defined - shown == set()


def test_rules_file_is_the_rules_of_the_code():
    import yaml

    from streams.dashboards.rules import rules

    text = (OUT / "prometheus" / "rules.yml").read_text()
    assert yaml.safe_load(text) == rules()


# --- push ------------------------------------------------------------------------

class FakeGrafana(BaseHTTPRequestHandler):
    """Records what grafana-client sends; answers like Grafana's HTTP API does."""

    requests: list
    folders: dict

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _record(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.requests.append((self.command, self.path, self.headers.get("Authorization"), body))
        return body

    def do_GET(self):
        self._record()
        uid = self.path.removeprefix("/api/folders/")
        if self.path.startswith("/api/folders/") and uid in self.folders:
            self._reply(200, {"uid": uid, "title": self.folders[uid]})
        elif self.path == "/api/folders":
            self._reply(200, [{"uid": u, "title": t} for u, t in self.folders.items()])
        else:
            self._reply(404, {"message": "folder not found"})

    def do_POST(self):
        body = self._record()
        if self.path == "/api/folders":
            if body["title"] in self.folders.values():
                self._reply(409, {"message": "a folder with the same name already exists"})
                return
            self.folders[body["uid"]] = body["title"]
            self._reply(200, {"uid": body["uid"], "title": body["title"]})
        elif self.path == "/api/dashboards/db":
            if body["dashboard"]["uid"] == "refuse":
                self._reply(412, {"message": "version-mismatch", "status": "version-mismatch"})
                return
            self._reply(200, {"status": "success", "uid": body["dashboard"]["uid"], "version": 1})
        else:
            self._reply(404, {"message": "not found"})

    def log_message(self, *args):
        pass


@pytest.fixture
def grafana():
    handler = type("Handler", (FakeGrafana,), {"requests": [], "folders": {}})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield handler, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="modelwatch")
    add_dashboards_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_push_puts_every_dashboard_into_the_folder_and_overwrites(grafana, monkeypatch):
    handler, url = grafana
    monkeypatch.setenv("MODELWATCH_GRAFANA_TOKEN", "glsa_secret")
    for _ in range(2):  # idempotent: the second push overwrites, the folder is made once
        assert _run_cli(["dashboards", "push", "--url", url, "--folder", "ML security"]) == 0
    posts = [body for method, path, _, body in handler.requests
             if method == "POST" and path == "/api/dashboards/db"]
    assert len(posts) == 2 * len(DASHBOARDS)
    assert [p["dashboard"]["uid"] for p in posts[:len(DASHBOARDS)]] == [m.UID for m in DASHBOARDS.values()]
    for body in posts:
        assert body["overwrite"] is True
        assert body["folderUid"] == "ml-security"
        assert body["dashboard"]["id"] is None
        assert body["dashboard"] == {**build_all()[_stem(body["dashboard"]["uid"])], "id": None}
    creates = [body for method, path, _, body in handler.requests
               if method == "POST" and path == "/api/folders"]
    assert creates == [{"title": "ML security", "uid": "ml-security"}]
    assert {auth for *_, auth, _ in handler.requests} == {"Bearer glsa_secret"}


def _stem(uid: str) -> str:
    return next(name for name, module in DASHBOARDS.items() if module.UID == uid)


def test_push_with_user_and_password_in_the_url_and_a_folder_made_by_hand(grafana, monkeypatch):
    handler, url = grafana
    monkeypatch.delenv("MODELWATCH_GRAFANA_TOKEN", raising=False)
    handler.folders["abc123"] = "modelwatch"  # same title, another uid
    pushed = push(url.replace("http://", "http://admin:s3cret@"), "modelwatch",
                  dashboards={"overview": build_all()["overview"]})
    assert pushed == ["modelwatch-overview"]
    assert handler.requests[-1][3]["folderUid"] == "abc123"
    expected = "Basic " + base64.b64encode(b"admin:s3cret").decode()
    assert {auth for *_, auth, _ in handler.requests} == {expected}


def test_push_errors_are_one_line_without_the_password(grafana):
    handler, url = grafana
    with pytest.raises(UserError) as exc:
        push(url.replace("http://", "http://admin:s3cret@"),
             dashboards={"x": {"uid": "refuse", "title": "x"}})
    message = str(exc.value)
    assert "\n" not in message and "s3cret" not in message
    assert "HTTP 412" in message and "admin:***@" in message
    with pytest.raises(UserError, match="expected http"):
        push("grafana:3000")
    with socket_closed() as port, pytest.raises(UserError, match=f"127.0.0.1:{port}"):
        push(f"http://127.0.0.1:{port}", timeout_s=2)


class socket_closed:
    """A loopback port that nothing listens on."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def __exit__(self, *exc):
        return False


def test_folder_uid_is_a_valid_grafana_uid():
    assert folder_uid("modelwatch") == "modelwatch"
    assert re.fullmatch(r"[a-z0-9_-]{1,40}", folder_uid("ünïcode / " + "x" * 80))
    assert folder_uid("///") == "modelwatch"
