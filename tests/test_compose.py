"""docker-compose.yml without Docker: valid against the compose specification's JSON
schema, mounts exist, settings are known, ports agree, every long-running service has
a healthcheck that works, the worker scales, no secret is committed, and the build
context holds only what the image needs.

The schema is vendored: tests/schemas/compose-spec.json is schema/compose-spec.json of
github.com/compose-spec/compose-spec (Apache-2.0; see tests/schemas/README.md).
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import importlib
import json
import os
import re
import subprocess
import sys
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from streams.cli.main import build_parser, tail_checkpoint
from streams.settings import SETTINGS, resolve
from tests.conftest import ROOT, need_tool

RAW = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
DASHBOARDS = ROOT / "dashboards"
SCHEMA = json.loads((ROOT / "tests" / "schemas" / "compose-spec.json").read_text())
ENV_EXAMPLE = ROOT / ".env.example"

# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}; $$ is a "$".
_VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}|\$(\w+)")


class MissingVariable(Exception):
    pass


def interpolate(value, env: dict[str, str]):
    """What compose makes of the file given these variables (its interpolation rules)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match):
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        op, arg = match.group(2), match.group(3)
        present = name in env
        empty = not env.get(name)
        if op in (":-", "-"):
            use_default = empty if op == ":-" else not present
            return arg if use_default else env[name]
        if op in (":?", "?"):
            if empty if op == ":?" else not present:
                raise MissingVariable(f"{name}: {arg}")
            return env[name]
        return env.get(name, "")

    return _VARIABLE.sub(one, value)


def env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            out[name.strip()] = value.strip()
    return out


# The stack as compose runs it with .env.example and a password filled in.
COMPOSE = interpolate(RAW, {**env_example(), "GRAFANA_ADMIN_PASSWORD": "not-a-real-one"})
SERVICES = COMPOSE["services"]
MODELWATCH = [name for name, s in SERVICES.items() if s.get("image") == "modelwatch:local"]


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _mounts(service: dict) -> list[tuple[str | None, str]]:
    """(source, target) of each volume entry (short syntax); source None: anonymous."""
    return [tuple(v.split(":")[:2]) if ":" in v else (None, v)
            for v in service.get("volumes", [])]


def _mount_target(service: str, source: str) -> str:
    return dict(_mounts(SERVICES[service]))[source]


def _published(service: str) -> dict[int, int | None]:
    """container port -> host port (None: compose picks a free one)."""
    out = {}
    for entry in SERVICES[service].get("ports", []):
        parts = str(entry).split(":")
        out[int(parts[-1])] = int(parts[-2]) if len(parts) > 1 and parts[-2] else None
    return out


def _runs_to_completion(service: dict) -> bool:
    return service.get("restart") == "no"


# --- the file itself --------------------------------------------------------------------

def test_the_file_is_valid_against_the_compose_specification():
    errors = sorted(jsonschema.Draft7Validator(SCHEMA).iter_errors(RAW), key=lambda e: e.path)
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)
    # ... and still after interpolation (ports and booleans must stay what they were).
    assert not list(jsonschema.Draft7Validator(SCHEMA).iter_errors(COMPOSE))


def test_the_schema_check_catches_mistakes():
    broken = json.loads(json.dumps(RAW))
    broken["services"]["worker"]["healthcheck"]["intervall"] = "5s"
    broken["services"]["tail"]["depends_on"]["topics"]["condition"] = "service_finished"
    messages = [e.message for e in jsonschema.Draft7Validator(SCHEMA).iter_errors(broken)]
    assert any("intervall" in m for m in messages)
    assert len(messages) == 2


def test_every_variable_is_in_env_example_and_interpolates():
    used = {m.group(1) or m.group(4) for m in _VARIABLE.finditer(
        (ROOT / "docker-compose.yml").read_text()) if m.group(0) != "$$"}
    assert used <= set(env_example()), used - set(env_example())
    # Compose variables are not settings: a MODELWATCH_* name in .env would be read as one.
    assert not any(name.startswith("MODELWATCH_") for name in env_example())


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
            if source is None:
                continue  # an anonymous volume
            if source.startswith((".", "/")):
                assert source.startswith("./"), (name, source)  # no host-specific paths
                assert (ROOT / source).exists(), (name, source)
            else:
                assert source in named, (name, source)


def test_profiles_and_logs_are_host_folders_given_in_env():
    for service, target, variable in (("worker", "/profiles", "PROFILES_DIR"),
                                      ("tail", "/logs", "INFERENCE_LOG_DIR")):
        (entry,) = [v for v in RAW["services"][service]["volumes"] if f":{target}" in v]
        assert entry.startswith(f"${{{variable}:-./"), entry
        assert entry.endswith(":ro"), entry  # modelwatch never writes there
    moved = interpolate(RAW, {"PROFILES_DIR": "/srv/profiles", "INFERENCE_LOG_DIR": "/var/log/m",
                              "INFERENCE_LOG_FILE": "serving.jsonl",
                              "GRAFANA_ADMIN_PASSWORD": "x"})["services"]
    assert ("/srv/profiles", "/profiles") in _mounts(moved["worker"])
    assert ("/var/log/m", "/logs") in _mounts(moved["tail"])
    assert moved["tail"]["command"] == ["modelwatch", "tail", "/logs/serving.jsonl"]
    assert SERVICES["tail"]["command"][-1] == "/logs/inference.jsonl"  # the default
    # No service writes into a folder that may be the serving app's real log.
    for name, service in SERVICES.items():
        for entry, (source, _) in zip(service.get("volumes", []), _mounts(service), strict=True):
            if source == "./logs":
                assert entry.endswith(":ro"), name


def test_the_demo_plays_into_its_own_log_and_its_own_tail():
    script = SERVICES["demo"]["command"][2]
    (written,) = re.findall(r'open\("([^"]+)", "w"\)', script)
    assert _mount_target("demo", "demo") == "/demo"
    assert SERVICES["demo-tail"]["command"] == ["modelwatch", "tail", written]
    assert _mount_target("demo-tail", "demo") == "/demo"


def test_dockerfile_copies_what_exists():
    assert SERVICES["worker"]["build"] == "."
    for source in _copied():
        assert (ROOT / source).exists(), source


def _copied() -> list[str]:
    sources = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            sources += line.split()[1:-1]
    return sources


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


# --- scaling and Prometheus -------------------------------------------------------------

def test_the_worker_scales_no_fixed_host_port():
    worker = SERVICES["worker"]
    assert "container_name" not in worker  # a fixed name allows one container
    port = int(_environment(worker)["MODELWATCH_METRICS_PORT"])
    assert port != 0
    assert _published("worker") == {port: None}  # each replica on a free host port
    for name in MODELWATCH:  # no fixed host port on anything that may scale
        assert all(host is None for host in _published(name).values()), name


def test_worker_replicas_share_no_state():
    state = _environment(SERVICES["worker"])["MODELWATCH_STATE_DIR"]
    (source,) = [s for s, target in _mounts(SERVICES["worker"]) if target == state]
    assert source is None  # anonymous: one volume per replica, never one for all


def test_prometheus_finds_every_worker_replica_by_dns():
    port = int(_environment(SERVICES["worker"])["MODELWATCH_METRICS_PORT"])
    scrape = yaml.safe_load((DASHBOARDS / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in scrape["scrape_configs"] if j["job_name"] == "modelwatch"]
    assert "static_configs" not in job  # a static target is one replica
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["worker"] and sd["names"][0] in SERVICES
    assert sd["type"] == "A" and sd["port"] == port


def test_prometheus_loads_the_rules_file_it_is_given():
    scrape = yaml.safe_load((DASHBOARDS / "prometheus" / "prometheus.yml").read_text())
    assert _mount_target("prometheus", "./dashboards/prometheus/prometheus.yml") == \
        "/etc/prometheus/prometheus.yml"
    assert scrape["rule_files"] == [_mount_target("prometheus", "./dashboards/prometheus/rules.yml")]


def test_promtool_checks_the_prometheus_config_as_mounted(tmp_path):
    """The scrape config with its DNS discovery, and the rules file at its mounted path."""
    promtool = need_tool("promtool", package="prometheus")
    config = yaml.safe_load((DASHBOARDS / "prometheus" / "prometheus.yml").read_text())
    config["rule_files"] = [str(DASHBOARDS / "prometheus" / "rules.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    checked = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")],
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout + checked.stderr


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


@pytest.mark.parametrize("service", ["worker", "tail", "demo-tail"])
def test_state_is_kept_in_a_volume(service):
    state = _environment(SERVICES[service])["MODELWATCH_STATE_DIR"]
    assert state in {target for _, target in _mounts(SERVICES[service])}


# --- healthchecks -----------------------------------------------------------------------

def test_every_long_running_service_has_a_healthcheck():
    for name, service in SERVICES.items():
        if _runs_to_completion(service):
            continue  # judged by its exit status (service_completed_successfully)
        check = service.get("healthcheck")
        assert check and not check.get("disable"), name
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name
    # What waits on a service that runs to completion waits for its success.
    for name, service in SERVICES.items():
        for dependency, condition in (service.get("depends_on") or {}).items():
            if _runs_to_completion(SERVICES[dependency]):
                assert condition["condition"] == "service_completed_successfully", (name, dependency)


def _python_check(service: str) -> str:
    test = SERVICES[service]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"], test
    return test[3]


def test_worker_healthcheck_answers_while_metrics_are_served(tmp_path):
    from streams.metrics import WorkerMetrics
    from tests.test_sinks import free_port

    code = _python_check("worker")
    port = free_port()
    env = {**os.environ, **_environment(SERVICES["worker"]), "MODELWATCH_METRICS_PORT": str(port)}
    server = WorkerMetrics().serve(port, "127.0.0.1")
    try:
        assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0
    finally:
        server.shutdown()
        server.server_close()
    assert subprocess.run([sys.executable, "-c", code], env=env,
                          capture_output=True).returncode != 0


@pytest.mark.parametrize("service", ["tail", "demo-tail"])
def test_tail_healthcheck_looks_where_tail_keeps_its_position(service, tmp_path):
    code = _python_check(service)
    env = _environment(SERVICES[service])
    state = env["MODELWATCH_STATE_DIR"]
    (pattern,) = re.findall(r"glob\.glob\('([^']+)'\)", code)
    settings = resolve(argparse.Namespace(), environ=env)
    log = SERVICES[service]["command"][2]
    assert fnmatch.fnmatch(str(tail_checkpoint(settings, log)), pattern)
    # Run it against a folder of our own: healthy with a fresh position, not without one.
    local = code.replace(f"'{state}/", f"'{tmp_path}/")
    assert local != code
    assert subprocess.run([sys.executable, "-c", local]).returncode != 0
    (tmp_path / tail_checkpoint(settings, log).name).write_text("{}")
    assert subprocess.run([sys.executable, "-c", local]).returncode == 0
    old = tmp_path / tail_checkpoint(settings, log).name
    os.utime(old, (old.stat().st_atime - 600, old.stat().st_mtime - 600))
    assert subprocess.run([sys.executable, "-c", local]).returncode != 0  # stuck: unhealthy


def test_grafana_waits_for_a_healthy_prometheus():
    assert SERVICES["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"


# --- secrets ----------------------------------------------------------------------------

def test_grafana_password_comes_from_env_and_none_is_committed():
    raw = RAW["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    assert raw.startswith("${GRAFANA_ADMIN_PASSWORD:?")  # required, no default
    with pytest.raises(MissingVariable, match="GRAFANA_ADMIN_PASSWORD"):
        interpolate(RAW, env_example())  # .env.example as shipped: no password in it
    assert env_example()["GRAFANA_ADMIN_PASSWORD"] == ""
    assert "admin / admin" not in (ROOT / "docker-compose.yml").read_text()


# --- the build context ------------------------------------------------------------------

def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _pattern_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(p) for p in prefixes):
            excluded = not negate
    return excluded


def _pattern_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i:end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("path", [
    ".venv/bin/python", ".venv", ".git/HEAD", "bench/out/quality/scores.json",
    "bench/quality/data/train.csv", "bench/quality/data-large/x.csv", ".env",
    "streams/cli/__pycache__/main.cpython-311.pyc", "detectors/__pycache__/base.cpython-311.pyc",
    ".pytest_cache/v/cache/lastfailed", ".ruff_cache/0.6/x", "modelwatch.egg-info/PKG-INFO",
    "tests/test_cli.py", "profiles/demo.json", "logs/inference.jsonl",
])
def test_dockerignore_keeps_out(path):
    assert dockerignored(path, _dockerignore()), path


def test_dockerignore_keeps_what_the_image_copies():
    patterns = _dockerignore()
    kept = [*_copied(), "streams/cli/main.py", "streams/schemas/inference-event.json",
            "detectors/thresholds.toml"]
    for path in kept:
        assert not dockerignored(path, patterns), path
    for source in _copied():  # every file under what is copied, but caches
        base = ROOT / source
        for file in ([base] if base.is_file() else base.rglob("*")):
            relative = file.relative_to(ROOT).as_posix()
            if file.is_file() and "__pycache__" not in relative:
                assert not dockerignored(relative, patterns), relative


def test_dockerignore_matcher_follows_docker_rules():
    assert dockerignored("a/b/c", ["a"]) and not dockerignored("a/b/c", ["a", "!a/b"])
    assert dockerignored("x/y/__pycache__/z", ["**/__pycache__"])
    assert not dockerignored("ab", ["a"]) and dockerignored("ab", ["a*"])
