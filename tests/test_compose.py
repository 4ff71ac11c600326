"""docker-compose.yml without Docker: mounts exist, settings are known, ports agree."""

from __future__ import annotations

import argparse
import ast
import importlib
import re
from urllib.parse import urlsplit

import pytest
import yaml

from streams.cli import build_parser
from streams.settings import SETTINGS, resolve
from tests.conftest import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
MODELWATCH = [name for name, s in SERVICES.items() if s.get("image") == "modelwatch:local"]
DASHBOARDS = ROOT / "dashboards"


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _mounts(service: dict) -> list[tuple[str, str]]:
    """(source, target) of each volume entry (short syntax)."""
    return [tuple(v.split(":")[:2]) for v in service.get("volumes", [])]


def _mount_target(service: str, source: str) -> str:
    return dict(_mounts(SERVICES[service]))[source]


def _published(service: str) -> dict[int, int]:
    """container port -> host port."""
    out = {}
    for entry in SERVICES[service].get("ports", []):
        host, container = str(entry).rsplit(":", 1)[-2:] if ":" in str(entry) else (entry, entry)
        out[int(container)] = int(host)
    return out


def test_services():
    assert {"kafka", "topics", "worker", "tail", "prometheus", "grafana", "demo"} <= set(SERVICES)
    assert SERVICES["kafka"]["image"].startswith("apache/kafka:")
    assert "controller" in SERVICES["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]  # KRaft
    for name, service in SERVICES.items():
        if name.startswith("demo"):
            assert service["profiles"] == ["demo"], name
        else:
            assert "profiles" not in service, name  # the stack comes up without a profile


def test_every_bind_mount_exists_in_the_repository():
    named = set(COMPOSE.get("volumes", {}))
    for name, service in SERVICES.items():
        for source, _ in _mounts(service):
            if source.startswith((".", "/")):
                assert source.startswith("./"), (name, source)  # no host-specific paths
                assert (ROOT / source).exists(), (name, source)
            else:
                assert source in named, (name, source)


def test_dockerfile_copies_what_exists():
    assert SERVICES["worker"]["build"] == "."
    dockerfile = (ROOT / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source


def test_modelwatch_services_run_known_commands_with_known_settings():
    known = {s.env for s in SETTINGS}
    commands = set(build_parser()._subparsers._group_actions[0].choices)
    for name in MODELWATCH:
        service = SERVICES[name]
        env = _environment(service)
        assert {k for k in env if k.startswith("MODELWATCH_")} <= known, name
        resolve(argparse.Namespace(), environ=env)  # the values parse, as the CLI reads them
        command = service["command"]
        if command[0] == "modelwatch":
            assert command[1] in commands, name


def test_demo_scripts_compile_and_import_what_exists():
    scripts = [SERVICES[n]["command"][2] for n in MODELWATCH if SERVICES[n]["command"][0] == "python"]
    assert len(scripts) == 2
    for script in scripts:
        tree = ast.parse(script)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), (node.module, alias.name)


def test_worker_metrics_port_agrees_with_prometheus_and_the_published_port():
    port = int(_environment(SERVICES["worker"])["MODELWATCH_METRICS_PORT"])
    assert port != 0
    scrape = yaml.safe_load((DASHBOARDS / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in scrape["scrape_configs"] if j["job_name"] == "modelwatch"]
    targets = [t for c in job["static_configs"] for t in c["targets"]]
    assert targets == [f"worker:{port}"]
    assert _published("worker") == {port: port}


def test_prometheus_loads_the_rules_file_it_is_given():
    scrape = yaml.safe_load((DASHBOARDS / "prometheus" / "prometheus.yml").read_text())
    assert _mount_target("prometheus", "./dashboards/prometheus/prometheus.yml") == \
        "/etc/prometheus/prometheus.yml"
    assert scrape["rule_files"] == [_mount_target("prometheus", "./dashboards/prometheus/rules.yml")]


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards():
    provisioning = _mount_target("grafana", "./dashboards/provisioning")
    assert provisioning == "/etc/grafana/provisioning"
    (datasource,) = yaml.safe_load(
        (DASHBOARDS / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"]
    url = urlsplit(datasource["url"])
    assert datasource["type"] == "prometheus"
    assert url.hostname in SERVICES and url.port in _published(url.hostname)
    (provider,) = yaml.safe_load(
        (DASHBOARDS / "provisioning" / "dashboards" / "modelwatch.yml").read_text())["providers"]
    folder = _mount_target("grafana", "./dashboards")
    assert provider["options"]["path"] == folder
    home = _environment(SERVICES["grafana"])["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(folder + "/")
    assert (DASHBOARDS / home.removeprefix(folder + "/")).is_file()


def test_broker_and_topics_agree_with_kafka():
    kafka = SERVICES["kafka"]["environment"]
    advertised = dict(re.findall(r"(\w+)://([\w.-]+:\d+)", kafka["KAFKA_ADVERTISED_LISTENERS"]))
    inside = advertised[kafka["KAFKA_INTER_BROKER_LISTENER_NAME"]]
    for name in MODELWATCH:
        broker = _environment(SERVICES[name]).get("MODELWATCH_BROKER")
        if broker is not None:
            assert broker == f"kafka://{inside}", name
    host_port = int(advertised["HOST"].rsplit(":", 1)[1])
    assert _published("kafka") == {host_port: host_port}
    # The topics service makes the default topic names: no service may rename them.
    script = SERVICES["topics"]["command"][0]
    defaults = {s.default for s in SETTINGS if s.name.startswith("topic_")}
    assert set(re.search(r"for topic in ([^;]+);", script).group(1).split()) == defaults
    for name in MODELWATCH:
        assert not any(k.startswith("MODELWATCH_TOPIC_") for k in _environment(SERVICES[name]))


@pytest.mark.parametrize("service", ["worker", "tail"])
def test_state_is_kept_in_a_volume(service):
    state = _environment(SERVICES[service])["MODELWATCH_STATE_DIR"]
    assert state in {target for _, target in _mounts(SERVICES[service])}
