"""The rule registry is the one list: the code, the thresholds file, the metrics and
the README derive from it or are checked against it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from detectors.config import ConfigError, load_thresholds
from detectors.rules import RULES, markdown_table
from streams.metrics import RULES as METRIC_RULES

ROOT = Path(__file__).resolve().parent.parent
#: Settings of the machinery around the rules rather than of one rule.
SHARED = {"alerts.cooldown_s", "history.size", "state.max_clients_per_model", "state.max_clients"}


def test_every_threshold_is_read_by_a_rule_and_every_read_exists():
    keys = {f"{s}.{k}" for s, values in load_thresholds().as_dict().items() for k in values}
    read = {key for rule in RULES.values() for key in rule.reads}
    assert read <= keys, read - keys
    assert keys - read == SHARED, keys - read - SHARED


def test_metrics_label_rules_by_the_registry():
    assert set(METRIC_RULES) == set(RULES)


def test_the_rule_modules_document_exactly_the_registered_rules():
    documented = set()
    for name in ("adversarial", "extraction", "poisoning"):
        text = (ROOT / "detectors" / f"{name}.py").read_text()
        documented |= set(re.findall(r"``((?:extraction|adversarial|poisoning)\.[a-z_]+)``", text))
    assert documented == set(RULES)


def test_the_readme_rule_table_is_the_registry():
    readme = (ROOT / "README.md").read_text()
    assert markdown_table() in readme, "README rule table: regenerate with python -m detectors.rules"


@pytest.mark.parametrize("text, message", [
    ("[population]\nepoch_s = nan", "population.epoch_s must be a finite number"),
    ("[alerts]\ncooldown_s = -5", "alerts.cooldown_s must be at least 0"),
    ("[history]\nsize = -5", "history.size must be between 8 and 4096"),
    ("[history]\ndecay = 1.0", "history.decay must be below 1"),
    ("[adversarial]\nknn_k = 0", "adversarial.knn_k must be between 1 and 128"),
    ("[population]\nquantile = 0.0", "population.quantile must be between 0 and 1"),
    ("[poisoning]\nflip_z = inf", "poisoning.flip_z must be a finite number"),
])
def test_every_threshold_is_range_checked_with_one_line_naming_the_key(text, message):
    with pytest.raises(ConfigError) as caught:
        load_thresholds(text)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)
