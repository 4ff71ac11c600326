"""Backdoor triggers in small batches: a few rows stamped with a value just beyond one
bound of a feature, on real scikit-learn data (wine, a 106-row training set)."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
from sklearn.datasets import load_wine

from detectors.config import load_thresholds
from streams.pipeline import Pipeline
from streams.records import TrainingStatsEvent
from streams.stats import stats_event
from tests.test_poisoning_flips import profiled

T0 = 1_790_000_000.0


@pytest.fixture(scope="module")
def wine():
    return profiled(*load_wine(return_X_y=True), 106, "wine")


def stamped(profile, X, y, rng, rows: int, feature: int):
    """``rows`` rows with ``feature`` set just above its training maximum, relabelled 0."""
    X, y = X.copy(), y.copy()
    hit = rng.choice(len(X), size=rows, replace=False)
    X[hit, feature] = profile.upper[feature] + 0.1 * (profile.upper[feature] - profile.lower[feature])
    y[hit] = 0
    return X, y


def test_a_trigger_of_three_rows_in_35_is_caught_and_does_not_teach_the_reference(wine):
    profile, X, y = wine
    rng = np.random.default_rng(3)
    # The feature whose held-out rows most often fall below its training minimum: clean
    # values beyond the other bound must not hide a pile above.
    below = (X < profile.lower).sum(0)
    feature = int(np.argmax(below - 100 * (X > profile.upper).sum(0)))
    pipeline = Pipeline([profile], load_thresholds())
    plan = ["clean"] * 8 + ["trigger", "clean"] * 6
    fired = {"clean": [], "trigger": []}
    for i, kind in enumerate(plan):
        rows = rng.choice(len(X), size=35, replace=False)
        bx, by = X[rows], y[rows]
        if kind == "trigger":
            bx, by = stamped(profile, bx, by, rng, 3, feature)
        raw = stats_event(bx, by, profile, dataset="wine", source="feed", batch_id=f"b{i}",
                          ts=T0 + 60 * i)
        alerts = pipeline.process_stats(msgspec.convert(raw, TrainingStatsEvent), T0 + 60 * i)
        fired[kind].append(alerts)
    assert not any(fired["clean"]), fired["clean"]
    caught = [bool(a) for a in fired["trigger"]]
    # Every trigger batch, the last ones too: the ones before did not raise the reference.
    assert all(caught), caught
    alert = fired["trigger"][-1][0]
    assert alert.rule.name == "poisoning.out_of_bounds", alert
    assert alert.modelwatch.evidence["side"] == "above", alert
