"""Settings shared by ``worker``, ``tail`` and ``run`` (contract v1): each a flag
and a ``MODELWATCH_*`` environment variable; the flag wins. An environment
variable with the prefix that names no setting is an error (a typo would
otherwise be silently ignored). Each command takes the settings it uses
(:data:`COMMAND_SETTINGS`); its ``--help`` lists only those.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from streams.tabular import UserError

PREFIX = "MODELWATCH_"
# Secrets read by name where they are used (never flags: they would show in `ps`).
SECRETS = ("MODELWATCH_GRAFANA_TOKEN", "MODELWATCH_HEC_TOKEN", "MODELWATCH_WEBHOOK_SECRET")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
_BROKER = re.compile(r"^kafka://[^,:/\s]+:\d{1,5}(,[^,:/\s]+:\d{1,5})*$")


def _broker(text: str) -> str:
    if not _BROKER.match(text):
        raise ValueError("expected kafka://host:port[,host:port]")
    return text


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise ValueError("expected a port 0..65535 (0 disables)")
    return port


def _sasl(text: str) -> str:
    if text.upper() not in SASL_MECHANISMS:
        raise ValueError(f"expected one of {', '.join(SASL_MECHANISMS)}")
    return text.upper()


@dataclass(frozen=True)
class Setting:
    name: str
    help: str
    default: object = None
    parse: Callable[[str], object] = str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return PREFIX + self.name.upper()


SETTINGS = (
    Setting("broker", "Kafka bootstrap servers, kafka://host:port[,host:port]; unset for `run` "
            "means the embedded broker", None, _broker),
    Setting("profiles", "folder of reference profiles (*.json)", None, Path),
    Setting("thresholds", "thresholds TOML overriding the built-in defaults", None, Path),
    Setting("state_dir", "local state: the worker's tables (RocksDB), tail's shipped position", Path("modelwatch-state"), Path),
    Setting("metrics_port", "Prometheus endpoint port; 0 disables", 9108, _port),
    Setting("topic_inference", "inference events topic", "inference-logs"),
    Setting("topic_stats", "training-stats topic", "training-stats"),
    Setting("topic_alerts", "alerts topic", "security-alerts"),
    Setting("topic_deadletter", "dead-letter topic", "modelwatch-deadletter"),
    Setting("sinks", "more alert outputs, comma-separated URLs (syslog+udp://, syslog+tcp://, "
            "syslog+tls://, hec+https://, webhook+https://, file://); the alerts topic is always on",
            None),
    Setting("tls_ca", "CA certificate (PEM) for TLS to the broker", None, Path),
    Setting("tls_cert", "client certificate (PEM) for TLS", None, Path),
    Setting("tls_key", "client private key (PEM) for TLS", None, Path),
    Setting("sasl_mechanism", f"SASL mechanism: {', '.join(SASL_MECHANISMS)}", None, _sasl),
    Setting("sasl_username", "SASL user name", None),
    Setting("sasl_password", "SASL password (prefer the environment variable)", None),
)


CONNECTION = ("broker", "tls_ca", "tls_cert", "tls_key", "sasl_mechanism", "sasl_username",
              "sasl_password")
#: The settings of each command that takes any, by its name after ``modelwatch``.
#: ``worker`` and ``run`` take them all (``run`` passes each child what it takes).
COMMAND_SETTINGS: dict[str, tuple[str, ...]] = {
    "worker": tuple(s.name for s in SETTINGS),
    "run": tuple(s.name for s in SETTINGS),
    "tail": (*CONNECTION, "state_dir", "topic_inference", "topic_deadletter"),
    "stats": (*CONNECTION, "topic_stats"),
    "alerts forward": (*CONNECTION, "topic_alerts"),
}


@dataclass(frozen=True)
class Settings:
    broker: str | None
    profiles: Path | None
    thresholds: Path | None
    state_dir: Path
    metrics_port: int
    topic_inference: str
    topic_stats: str
    topic_alerts: str
    topic_deadletter: str
    sinks: str | None
    tls_ca: Path | None
    tls_cert: Path | None
    tls_key: Path | None
    sasl_mechanism: str | None
    sasl_username: str | None
    sasl_password: str | None


def add_arguments(parser: argparse.ArgumentParser, names: Iterable[str] | None = None) -> None:
    """One flag per setting in ``names``; ``--help`` names its environment variable and default.

    Without ``names``: the settings the command takes (:data:`COMMAND_SETTINGS`, by the
    parser's prog, e.g. ``modelwatch tail``), or all of them for a parser of no command.
    """
    if names is None:
        command = parser.prog.split(" ", 1)[1] if " " in parser.prog else parser.prog
        names = COMMAND_SETTINGS.get(command, COMMAND_SETTINGS["worker"])
    wanted = set(names)
    unknown = wanted - {s.name for s in SETTINGS}
    if unknown:
        raise ValueError(f"not settings: {sorted(unknown)}")
    group = parser.add_argument_group("settings (each flag also reads its environment variable)")
    for s in SETTINGS:
        if s.name not in wanted:
            continue
        default = f"; default {s.default}" if s.default is not None else ""
        group.add_argument(s.flag, dest=s.name, default=None, metavar=s.name.split("_")[-1].upper(),
                           help=f"{s.help} [{s.env}{default}]")


def resolve(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    """Flags, then ``MODELWATCH_*`` variables, then defaults; one clear error otherwise."""
    environ = os.environ if environ is None else environ
    known = {s.env for s in SETTINGS} | set(SECRETS)
    unknown = sorted(k for k in environ if k.startswith(PREFIX) and k not in known)
    if unknown:
        raise UserError(f"environment: {unknown[0]} is not a modelwatch setting "
                        f"(known: {', '.join(sorted(known))})")
    values = {}
    for s in SETTINGS:
        flag_value = getattr(args, s.name, None)
        source, text = (s.flag, flag_value) if flag_value is not None else (s.env, environ.get(s.env))
        if text is None or text == "":
            values[s.name] = s.default
            continue
        try:
            values[s.name] = s.parse(text)
        except ValueError as exc:
            raise UserError(f"{source}: {text!r}: {exc}") from None
    settings = Settings(**values)
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise UserError("--tls-cert and --tls-key go together")
    if settings.sasl_mechanism and not (settings.sasl_username and settings.sasl_password):
        raise UserError("--sasl-mechanism needs --sasl-username and --sasl-password")
    return settings


#: Settings a child process gets through its environment, never its argv (``ps`` shows argv).
SECRET_SETTINGS = frozenset({"sasl_password"})


def settings_argv(settings: Settings, names: Iterable[str]) -> list[str]:
    """The flags that give a child command these settings' values (unset ones and
    secrets left out: see :func:`settings_env`)."""
    argv = []
    for name in names:
        value = getattr(settings, name)
        if value is not None and name not in SECRET_SETTINGS:
            argv += ["--" + name.replace("_", "-"), str(value)]
    return argv


def settings_env(settings: Settings, names: Iterable[str]) -> dict[str, str]:
    """The environment variables that give a child command these settings' secrets.

    >>> from dataclasses import fields
    >>> s = Settings(**{f.name: None for f in fields(Settings)} | {"sasl_password": "pw"})
    >>> settings_env(s, ["sasl_password", "broker"]), settings_argv(s, ["sasl_password"])
    ({'MODELWATCH_SASL_PASSWORD': 'pw'}, [])
    """
    return {PREFIX + name.upper(): str(getattr(settings, name)) for name in names
            if name in SECRET_SETTINGS and getattr(settings, name) is not None}
