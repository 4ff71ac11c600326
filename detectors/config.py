"""Detector thresholds: built-in defaults from ``thresholds.toml``, overridable by file."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from types import MappingProxyType
from typing import Any


class ConfigError(ValueError):
    """A thresholds file is unreadable, has an unknown key or a wrong type."""


def _defaults() -> dict[str, dict[str, Any]]:
    text = resources.files("detectors").joinpath("thresholds.toml").read_text()
    return tomllib.loads(text)


@dataclass(frozen=True)
class Thresholds:
    """All thresholds, grouped by section: ``t.section("adversarial")["knn_k"]``."""

    values: MappingProxyType

    def section(self, name: str) -> MappingProxyType:
        return self.values[name]

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dict(keys) for name, keys in self.values.items()}


def load_thresholds(text: str | None = None, path: str = "thresholds") -> Thresholds:
    """Defaults, overridden by the TOML document ``text`` (read from ``path``) if given.

    >>> load_thresholds().section("history")["size"]
    128
    >>> load_thresholds("[history]\\nsize = 64").section("history")["size"]
    64
    """
    merged = _defaults()
    if text is not None:
        try:
            override = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        for section, keys in override.items():
            if section not in merged or not isinstance(keys, dict):
                raise ConfigError(f"{path}: unknown section [{section}]")
            for key, value in keys.items():
                if key not in merged[section]:
                    raise ConfigError(f"{path}: unknown key {section}.{key}")
                default = merged[section][key]
                if isinstance(default, float) and isinstance(value, int):
                    value = float(value)
                if type(value) is not type(default):
                    raise ConfigError(
                        f"{path}: {section}.{key} must be {type(default).__name__}, "
                        f"got {value!r}"
                    )
                merged[section][key] = value
    return Thresholds(MappingProxyType({k: MappingProxyType(v) for k, v in merged.items()}))
