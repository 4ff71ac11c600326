"""Calibration from production holds: honest traffic unlike the training set stays quiet,
attackers who try to move the baseline are still caught, small training sets say so.

Honest traffic is ``tests/production.py``'s (noise, sites with another calibration,
fan-out, re-scored entities, probes, label-only, light and heavy users), from rows
the model was not trained on. Attacks are the scenario's uniform-random extraction
and ART's HopSkipJump through the victim's prediction API.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.datasets import load_wine
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from detectors.profile import build_profile
from streams.demo import scenario
from tests import production
from tests.test_detection import judge

T0 = scenario.DEFAULT_T0
DAY = 7200.0


def alerted(alerts):
    return {a.modelwatch.client_id for a in alerts}


@pytest.fixture(scope="module")
def honest(victim):
    return production.honest_population(victim, np.random.default_rng(11), per_kind=12)


def uniform_keys(victim, keys, per_key, rng, prefix="sybil"):
    """One actor's uniform-random extraction dealt over ``keys`` ids and IPs, all day."""
    events = []
    for k in range(keys):
        X = rng.uniform(victim.lo, victim.hi, size=(per_key, victim.n_features))
        times = T0 + np.sort(rng.uniform(0, DAY, per_key))
        events += scenario.client_events(victim, f"{prefix}-{k}", f"203.0.113.{k % 250}",
                                         times, X, rng)
    return events


def hopskipjump(victim, row, client, start, *, clients=None, blind=None, **budget):
    """ART's HopSkipJump on benign row ``row`` as events of ``client`` (or dealt over
    ``clients``) from ``start``; ``blind(recorder)`` wraps the victim's API."""
    from art.attacks.evasion import HopSkipJump
    from art.estimators.classification import BlackBoxClassifier

    recorder = scenario.QueryRecorder(victim)
    label = victim.model.predict(victim.X_benign[row:row + 1])[0]
    others = victim.X_attacker[victim.model.predict(victim.X_attacker) != label]
    np.random.seed(row)
    classifier = BlackBoxClassifier(blind(recorder) if blind else recorder,
                                    input_shape=(victim.n_features,),
                                    nb_classes=len(victim.classes), clip_values=(0.0, 16.0))
    budget = {"max_iter": 3, "max_eval": 60, "init_eval": 10} | budget
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        HopSkipJump(classifier, verbose=False, **budget).generate(
            victim.X_benign[row:row + 1], x_adv_init=others[:1])
    rng = np.random.default_rng(row)
    times = scenario.paced_times([len(r) for r, _ in recorder.requests], start, rng)
    return scenario.recorded_events(recorder, clients or [client], "198.51.100.9", times, rng)


def test_production_like_honest_clients_stay_quiet(profile, honest):
    events, kinds = honest
    flagged = alerted(judge(profile, events)) & set(kinds)
    # 96 clients of eight kinds, none drawn from the training rows: at most one alerted.
    assert len(flagged) <= 1, sorted((c, kinds[c]) for c in flagged)


def test_ten_percent_attackers_are_still_caught(victim, profile, honest):
    events, kinds = honest
    rng = np.random.default_rng(5)
    attack = uniform_keys(victim, 5, 300, rng, prefix="uniform")
    for i in range(5):
        attack += hopskipjump(victim, i, f"hsj-{i}", T0 + 900 * (i + 1))
    flagged = alerted(judge(profile, events + attack))
    attackers = {e["client_id"] for e in attack}
    assert len(attackers) == 10
    assert attackers <= flagged, attackers - flagged
    assert len(flagged & set(kinds)) <= 1


def test_one_actor_behind_fifty_keys_does_not_move_the_baseline(victim, profile, honest):
    events, kinds = honest
    sybils = uniform_keys(victim, 50, 40, np.random.default_rng(6))
    flagged = alerted(judge(profile, events + sybils))
    caught = {c for c in flagged if c.startswith("sybil-")}
    # Each key alone holds 40 uniform queries over two hours; every key is caught.
    assert len(caught) >= 45, len(caught)
    assert len(flagged & set(kinds)) <= 1


def test_a_shift_every_honest_client_shares_raises_no_alert(victim, profile):
    rng = np.random.default_rng(12)
    shared = production.site_distortion(victim, rng, strength=1.5)
    events, kinds = production.honest_population(victim, rng, per_kind=12, distortion=shared)
    flagged = alerted(judge(profile, events)) & set(kinds)
    assert len(flagged) <= 1, sorted((c, kinds[c]) for c in flagged)


@pytest.fixture(scope="module")
def wine():
    """A wine classifier trained on 150 rows, the other 28 rows as honest queries."""
    X, y = load_wine(return_X_y=True)
    X_train, X_rest, y_train, y_rest = train_test_split(X, y, train_size=150, stratify=y,
                                                        random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = make_pipeline(StandardScaler(), MLPClassifier((32,), max_iter=2000,
                                                              random_state=0)).fit(X_train, y_train)
    names = [f"f{i}" for i in range(X.shape[1])]
    victim = scenario.Victim(
        dataset="wine", model_name="wine-mlp", feature_names=names, classes=[0, 1, 2],
        model=model, X_train=X_train, y_train=y_train, X_benign=X_rest, y_benign=y_rest,
        X_attacker=X_rest, y_attacker=y_rest, X_batches=X_rest, y_batches=y_rest,
        decimals=np.array([2] * X.shape[1]))
    return victim, build_profile(X_train, y_train, names, model="wine-mlp", dataset="wine")


def test_a_150_row_profile_says_what_it_cannot_calibrate(wine):
    _, profile = wine
    notes = " ".join(profile.notes)
    assert "adversarial.query_crowding" in notes and "too few" in notes
    assert profile.n_rows == 150


def test_a_150_row_profile_does_not_flag_honest_clients(wine):
    victim, profile = wine
    events, kinds = production.honest_population(victim, np.random.default_rng(13), per_kind=5)
    flagged = alerted(judge(profile, events)) & set(kinds)
    assert len(flagged) <= 1, sorted((c, kinds[c]) for c in flagged)
    # ... and still catches uniform-random extraction on it.
    attack = uniform_keys(victim, 1, 300, np.random.default_rng(14), prefix="thief")
    assert "thief-0" in alerted(judge(profile, events + attack))


def test_a_106_row_profile_catches_uniform_extraction_early():
    """With 21 held-out rows the 99th-percentile distance cannot be estimated, and the
    held-out maximum is one row's accident (here far beyond every honest client's
    typical distance): the fallback must not let uniform-random queries under it."""
    from tests.test_detection import first_alert

    victim = scenario.load_victim("wine", seed=0)
    profile = build_profile(victim.X_train, victim.y_train, victim.feature_names,
                            model=victim.model_name, dataset="wine")
    assert profile.n_rows < 120
    events, kinds = production.honest_population(victim, np.random.default_rng(15), per_kind=5)
    attack = uniform_keys(victim, 1, 300, np.random.default_rng(16), prefix="thief")
    alerts = judge(profile, events + attack)
    assert len(alerted(alerts) & set(kinds)) <= 1
    assert first_alert(alerts, "thief-0") <= 60


def test_a_probe_resending_an_unusual_record_counts_it_once():
    """A health check sends the same three records all day, one of them an honest but
    unusual one beyond the off-distribution distance: one off record, not a third."""
    victim = scenario.load_victim("cancer", seed=0)
    profile = build_profile(victim.X_train, victim.y_train, victim.feature_names,
                            model=victim.model_name, dataset="cancer")
    rows = np.vstack([victim.X_benign, victim.X_batches])
    distance = profile.mahalanobis(profile.scaled(rows))
    low, high = victim.X_train.min(0), victim.X_train.max(0)
    slack = (high - low) / 4  # well inside the bounds rule's half range
    inside = ~((rows < low - slack) | (rows > high + slack)).any(1)
    unusual = int(np.flatnonzero(inside)[np.argmax(distance[inside])])
    assert distance[unusual] > 1.5 * profile.ood_threshold
    ordinary = np.random.default_rng(19).choice(
        np.flatnonzero(distance < np.median(distance)), 2, replace=False)
    fixed = rows[[unusual, *ordinary]]
    X = np.tile(fixed, (150, 1))
    times = T0 + np.repeat(np.arange(150) * 40.0, 3) + np.tile([0.0, 0.01, 0.02], 150)
    events = scenario.client_events(victim, "probe", "198.51.100.9", times, X,
                                    np.random.default_rng(17))
    # Alone: the expected rate is the profile's, not moved by other clients.
    assert "probe" not in alerted(judge(profile, events))


def test_a_blinded_decision_based_attack_on_integer_pixels_is_caught(victim, profile, honest):
    """Query blinding (the OARS attacks on stateful defenses): every query carries fresh
    noise within the data's range, so queries no longer crowd within the 0.1 % k-NN
    distance, and the requests are dealt over six keys. Its moves are dense (noise in
    every pixel), unlike honest re-sends, which change a field or two."""
    from tests.test_detection import first_alert

    rng = np.random.default_rng(21)
    noise = 0.041 * (victim.hi - victim.lo)  # 1 % of the range plus half a pixel step

    def blind(recorder):
        def blinded(X):
            X = np.asarray(X, dtype=float)
            shift = rng.uniform(-1, 1, size=X.shape[1]) * noise
            return recorder(np.clip(X + shift + rng.normal(size=X.shape) * noise,
                                    victim.lo, victim.hi))
        return blinded

    keys = [f"blinded-{k}" for k in range(6)]  # requests dealt over six keys
    attack = hopskipjump(victim, 40, None, T0 + 900, clients=keys, blind=blind,
                         max_iter=10, max_eval=200, init_eval=20)
    events, kinds = honest
    alerts = judge(profile, events + attack)
    caught = [k for k in keys if (first_alert(alerts, k, "adversarial") or 999) <= 60]
    assert len(caught) >= 4, caught  # of ~100 queries a key
    assert len(alerted(alerts) & set(kinds)) <= 1


def test_a_probe_resending_an_out_of_bounds_record_counts_it_once(victim, profile):
    """A health check on digits sends the same three records all day, one of them with
    a pixel lit that was blank in every training image: one such record, not a third."""
    from detectors.config import load_thresholds
    from detectors.features import Featurizer

    rows = np.vstack([victim.X_benign, victim.X_batches])
    featurizer = Featurizer(profile, load_thresholds().section("adversarial")["bounds_tolerance"])
    beyond = np.flatnonzero((rows < featurizer.low).any(1) | (rows > featurizer.high).any(1))
    assert len(beyond)
    inside = np.setdiff1d(np.arange(len(rows)), beyond)[:2]
    fixed = rows[[beyond[0], *inside]]
    X = np.tile(fixed, (150, 1))
    times = T0 + np.repeat(np.arange(150) * 40.0, 3) + np.tile([0.0, 0.01, 0.02], 150)
    events = scenario.client_events(victim, "probe", "198.51.100.11", times, X,
                                    np.random.default_rng(22))
    assert "probe" not in alerted(judge(profile, events))
