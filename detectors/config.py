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
    _check(merged, path)
    return Thresholds(MappingProxyType({k: MappingProxyType(v) for k, v in merged.items()}))


#: Quantile levels that profiles calibrate (see detectors.profile).
KNN_LEVELS = (0.001, 0.01, 0.05, 0.5)
PRADA_LEVELS = (0.001, 0.01, 0.5)


def _check(values: dict, path: str) -> None:
    ext, adv = values["extraction"], values["adversarial"]
    if adv["crowding_quantile"] not in KNN_LEVELS:
        raise ConfigError(f"{path}: adversarial.crowding_quantile must be one of {KNN_LEVELS}")
    if ext["prada_quantile"] not in PRADA_LEVELS:
        raise ConfigError(f"{path}: extraction.prada_quantile must be one of {PRADA_LEVELS}")
    if not 3 <= ext["prada_window"] <= 512:
        raise ConfigError(f"{path}: extraction.prada_window must be 3..512 (the distance ring)")
    if ext["prada_every"] < 1 or ext["prada_min_distances"] < 3:
        raise ConfigError(f"{path}: extraction.prada_every must be >= 1, prada_min_distances >= 3")
    if values["population"]["epoch_s"] <= 0:
        raise ConfigError(f"{path}: population.epoch_s must be positive")
    if not 0 < values["history"]["decay"] < 1:
        raise ConfigError(f"{path}: history.decay must be between 0 and 1")
