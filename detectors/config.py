"""Detector thresholds: built-in defaults from ``thresholds.toml``, overridable by file."""

from __future__ import annotations

import math
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


#: Allowed range per key: (low, high, low_open). Every value must also be finite;
#: keys not listed must be >= 0.
RANGES = {
    "alerts.cooldown_s": (0, None, False),
    "population.epoch_s": (0, None, True),
    "population.quantile": (0, 1, True),
    "population.factor": (0, None, True),
    "population.min_clients": (1, None, False),
    "population.max_expected": (0, 1, True),
    "state.max_clients_per_model": (1, None, False),
    "state.max_clients": (1, None, False),
    "history.size": (8, 4096, False),
    "history.decay": (0, 1, True),
    "extraction.prada_delta": (0, 1, True),
    "extraction.prada_margin": (0, 1, False),
    "extraction.prada_every": (1, None, False),
    "extraction.prada_min_distances": (3, None, False),
    "extraction.prada_window": (3, 512, False),
    "extraction.synthetic_min_share": (0, 1, True),
    "extraction.coverage_min_entropy": (0, 1, True),
    "extraction.coverage_min_distinct": (0, 1, False),
    "extraction.step_p0": (0, 1, True),
    "extraction.boundary_min_share": (0, 1, True),
    "extraction.collusion_min_ids": (2, None, False),
    "extraction.collusion_min_step_share": (0, 1, False),
    "extraction.minting_min_ids": (2, None, False),
    "extraction.minting_quantile": (0, 1, True),
    "extraction.surprise": (0, None, True),
    "adversarial.knn_k": (1, 128, False),
    "adversarial.crowding_p0": (0, 1, True),
    "adversarial.ood_p0": (0, 1, True),
    "adversarial.bounds_p0": (0, 1, True),
    "adversarial.probe_p0": (0, 1, True),
    "adversarial.line_p0": (0, 1, True),
    "adversarial.low_margin": (0, 1, True),
    "adversarial.low_margin_floor": (0, 1, True),
    "adversarial.low_margin_min": (0, 1, True),
    "adversarial.min_flagged": (1, None, False),
    "adversarial.surprise": (0, None, True),
    "poisoning.min_rows": (1, None, False),
    "poisoning.flip_z": (0, None, True),
    "poisoning.flip_surprise": (0, None, True),
    "poisoning.spike_ratio": (1, None, True),
    "poisoning.spike_min_share": (0, 1, True),
    "poisoning.pile_surprise": (0, None, True),
    "poisoning.out_of_bounds_share": (0, 1, True),
    "poisoning.duplicate_share": (0, 1, False),
    "poisoning.recent_batches": (1, None, False),
}


def _check(values: dict, path: str) -> None:
    """Every value in its range: one error line naming the key.

    >>> load_thresholds("[history]\\nsize = -5")
    Traceback (most recent call last):
    ...
    detectors.config.ConfigError: thresholds: history.size must be between 8 and 4096, got -5
    """
    for section, keys in values.items():
        for key, value in keys.items():
            name = f"{section}.{key}"
            if not math.isfinite(value):
                raise ConfigError(f"{path}: {name} must be a finite number, got {value!r}")
            low, high, low_open = RANGES.get(name, (0, None, False))
            too_low = value <= low if low_open else value < low
            if too_low or (high is not None and value > high):
                if high is None:
                    bound = f"greater than {low}" if low_open else f"at least {low}"
                else:
                    bound = f"between {low} and {high}" + (" (not 0)" if low_open and low == 0 else "")
                raise ConfigError(f"{path}: {name} must be {bound}, got {value!r}")
    if values["history"]["decay"] >= 1:
        raise ConfigError(f"{path}: history.decay must be below 1 (1 never forgets)")
    ext, adv = values["extraction"], values["adversarial"]
    if adv["crowding_quantile"] not in KNN_LEVELS:
        raise ConfigError(f"{path}: adversarial.crowding_quantile must be one of {KNN_LEVELS}")
    if ext["prada_quantile"] not in PRADA_LEVELS:
        raise ConfigError(f"{path}: extraction.prada_quantile must be one of {PRADA_LEVELS}")
