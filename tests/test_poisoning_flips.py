"""Label flips against the profile's reference classifiers (nearest neighbours and
linear), on real scikit-learn data (breast cancer): a flipped batch is caught and named, a
clean one is not."""

from __future__ import annotations

import dataclasses

import msgspec
import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer

from detectors.config import load_thresholds
from detectors.poisoning import PoisoningDetector
from detectors.profile import (
    NEIGHBOURS_VOTES,
    NeighbourClassifier,
    Profile,
    ProfileError,
    build_profile,
)
from streams.pipeline import batch_stats
from streams.records import TrainingStatsEvent
from streams.stats import stats_event

T0 = 1_790_000_000.0


def profiled(X, y, n_train: int, dataset: str):
    """A profile of ``n_train`` rows drawn at random (seed 0), and the other rows."""
    order = np.random.default_rng(0).permutation(len(X))
    train, rest = order[:n_train], order[n_train:]
    names = [f"f{j}" for j in range(X.shape[1])]
    profile = build_profile(X[train], y[train], names, model=dataset, dataset=dataset)
    return profile, X[rest], y[rest]


@pytest.fixture(scope="module")
def cancer():
    return profiled(*load_breast_cancer(return_X_y=True), 300, "cancer")


def judge(profile, batches, linear=True):
    """Flip verdicts per batch, one source, in order; ``linear=False`` judges as a
    profile without the linear classifier."""
    if not linear:
        profile = dataclasses.replace(profile, linear=None, linear_agreement=None)
    detector = PoisoningDetector(load_thresholds())
    state = detector.new_state()
    out = []
    for i, (X, y) in enumerate(batches):
        raw = stats_event(X, y, profile, dataset="cancer", source="feed", batch_id=f"b{i}",
                          ts=T0 + 60 * i)
        event = msgspec.convert(raw, TrainingStatsEvent)
        verdicts = detector.update("cancer/feed", state, batch_stats(event, profile), profile)
        out.append([v for v in verdicts if v.rule == "poisoning.label_flip"])
    return out


def flipped(y, rng, share, source=1, target=0):
    y = y.copy()
    rows = np.flatnonzero(y == source)
    y[rng.choice(rows, size=int(share * len(rows)), replace=False)] = target
    return y


def test_profile_carries_a_neighbour_classifier_that_agrees_with_clean_labels(cancer):
    profile, _, _ = cancer
    assert profile.neighbour_rows is not None and len(profile.neighbour_rows) == profile.n_rows
    assert profile.label_agreement.shape == (2, 2)
    assert np.allclose(profile.label_agreement.sum(1), 1.0)
    # Confident disagreements are rare on real, correctly labelled data.
    assert np.all(np.diag(profile.label_agreement) > 0.9), profile.label_agreement


def test_a_flipped_batch_is_caught_and_named_and_clean_ones_are_quiet(cancer):
    profile, X, y = cancer
    rng = np.random.default_rng(1)
    batches = []
    for i in range(8):
        rows = rng.choice(len(X), size=200, replace=False)
        labels = y[rows] if i < 6 else flipped(y[rows], rng, 0.2)
        batches.append((X[rows], labels))
    verdicts = judge(profile, batches)
    assert verdicts[:6] == [[]] * 6
    assert all(v for v in verdicts[6:]), verdicts
    evidence = [v[0].evidence for v in verdicts[6:]]
    assert all(e["class"] == "0" and e["looks_like"] == "1" for e in evidence), evidence
    assert all(e["test"] in ("reference_classifier", "linear_classifier") for e in evidence), evidence
    # The neighbours alone catch these too.
    alone = judge(profile, batches, linear=False)
    assert alone[:6] == [[]] * 6 and all(alone[6:]), alone
    assert all(v[0].evidence["test"] == "reference_classifier" for v in alone[6:])


def test_the_linear_classifier_catches_flips_that_the_neighbours_miss(cancer):
    """Malignant rows relabelled benign, 15 % of them: the malignant class is spread out, so
    few flipped rows have 9 of 10 malignant neighbours, but most lie well beyond the
    linear boundary."""
    profile, X, y = cancer
    rng = np.random.default_rng(2)
    clean = [(X[rows], y[rows]) for rows in (rng.choice(len(X), size=200, replace=False)
                                             for _ in range(4))]
    caught = {True: 0, False: 0}
    for _ in range(12):
        rows = rng.choice(len(X), size=200, replace=False)
        batches = clean + [(X[rows], flipped(y[rows], rng, 0.15, source=0, target=1))]
        for linear in (True, False):
            verdicts = judge(profile, batches, linear=linear)
            assert verdicts[:4] == [[]] * 4
            caught[linear] += bool(verdicts[4])
    assert caught[True] >= 9 and caught[True] >= caught[False] + 5, caught


def test_only_confident_disagreement_moves_a_row():
    rng = np.random.default_rng(0)
    Z = np.r_[rng.normal(0, 1, (60, 2)), rng.normal(8, 1, (60, 2))]
    model = NeighbourClassifier.fit(Z, np.repeat([0, 1], 60), np.ones(2), 2)
    rows = np.array([[8.0, 8.0], [8.0, 8.0], [4.0, 4.0], [0.0, 0.0]])
    assigned = model.classes(rows, np.array([0, 1, 0, 1]))
    assert assigned.tolist() == [1, 1, 0, 0]
    # Half-way between the classes: it moves only if NEIGHBOURS_VOTES neighbours agree.
    votes = model.votes(np.array([[4.0, 4.0]]))[0]
    assert votes.sum() == 10
    assert assigned[2] == (int(votes.argmax()) if votes.max() >= NEIGHBOURS_VOTES else 0)


def test_the_classifiers_survive_the_profile_file_and_bad_ones_are_refused(cancer):
    profile, X, y = cancer
    doc = profile.to_dict()
    again = Profile.from_dict(doc)
    labels = np.array([profile.class_index(v) for v in y.astype(str)])
    assert np.array_equal(again.reference_classes(X, labels), profile.reference_classes(X, labels))
    assert np.array_equal(again.linear_classes(X, labels), profile.linear_classes(X, labels))
    for section, key in (("neighbours", "labels"), ("linear", "bias")):
        bad = Profile.from_dict(profile.to_dict()).to_dict()
        bad["calibration"][section][key] = bad["calibration"][section][key][:-1]
        with pytest.raises(ProfileError):
            Profile.from_dict(bad)


def test_a_label_the_profile_never_saw_is_not_counted_in_another_class(cancer):
    profile, X, y = cancer
    labels = y[:100].astype(str).astype(object)
    labels[:5] = "unknown"
    raw = stats_event(X[:100], labels.astype(str), profile, dataset="cancer", source="feed",
                      batch_id="b", ts=T0)
    assert set(raw["reference_classes"]["unknown"]) <= {"unknown", "0", "1"}
    assert sum(raw["reference_classes"]["unknown"].values()) <= 5


def test_a_profile_made_before_the_neighbours_still_classifies(cancer):
    """Profiles made before carry Gaussian discriminants instead: stats still counts every
    in-bounds row once, and rows go to classes regardless of their label."""
    profile, X, y = cancer
    old = dataclasses.replace(profile, neighbour_rows=None, neighbour_labels=None,
                              neighbour_weights=None)
    flipped_labels = 1 - y[:150]
    raw = stats_event(X[:150], flipped_labels.astype(str), old, dataset="cancer", source="feed",
                      batch_id="b", ts=T0)
    counts = raw["reference_classes"]
    assert sum(sum(c.values()) for c in counts.values()) <= 150
    # Every label flipped: most rows of each label go to the other class.
    assert counts["0"].get("1", 0) > counts["0"].get("0", 0)
    assert counts["1"].get("0", 0) > counts["1"].get("1", 0)
