"""Honest traffic that looks like production, not like the training set, for the tests.

Queries come from the victim's benign pool (never its training rows), then are
distorted the ways real clients distort them: sensor noise at the data's
precision, sites with another calibration (a per-feature shift and scale),
service back-ends fanning one request into several predictions, entities
re-scored with small changes, probes sending the same few rows all day,
label-only clients. The bench (``bench/quality``) has the full mix; this is
the small, fast version the calibration tests need.
"""

from __future__ import annotations

import numpy as np

from streams.demo import scenario

KINDS = ("noisy", "site", "fanout", "rescored", "probe", "label_only", "light", "heavy")


def _rows(victim, rng, n):
    return victim.X_benign[rng.integers(0, len(victim.X_benign), size=n)].astype(float)


def _noise(victim, rng, shape, steps=1):
    """Re-measurement noise: up to ``steps`` units of the data's precision per feature."""
    unit = 10.0 ** -victim.decimals
    return rng.integers(-steps, steps + 1, size=shape) * unit


def site_distortion(victim, rng, strength=1.0):
    """Another scanner or unit: a shift of 0.2-0.5 std and a scale of 0.8-1.25 on a third
    of the features (``strength`` scales both)."""
    d = victim.n_features
    std = victim.X_train.std(0)
    chosen = rng.random(d) < 1 / 3
    shift = np.where(chosen, rng.uniform(0.2, 0.5, d) * rng.choice([-1, 1], d) * std, 0.0) * strength
    scale = np.where(chosen, np.exp(rng.uniform(np.log(0.8), np.log(1.25), d) * strength), 1.0)
    centre = victim.X_train.mean(0)
    return lambda X: centre + (X - centre) * scale + shift


def honest_plan(kind, victim, rng, distortion=None):
    """Rows and time offsets (seconds into a two-hour day) of one honest client."""
    day = 7200.0
    if kind == "noisy":
        n = int(rng.integers(30, 200))
        X = _rows(victim, rng, n) + _noise(victim, rng, (n, victim.n_features), 2)
    elif kind == "site":
        n = int(rng.integers(5, 200))
        X = distortion(_rows(victim, rng, n))
    elif kind == "fanout":  # one request becomes 3-6 predictions of near-identical rows
        reqs = int(rng.integers(10, 60))
        base = _rows(victim, rng, reqs)
        fan = rng.integers(3, 7, size=reqs)
        X = np.repeat(base, fan, axis=0)
        X += _noise(victim, rng, X.shape, 1) * (rng.random(X.shape) < 0.1)
        t = np.repeat(np.sort(rng.uniform(0, day, reqs)), fan) + rng.uniform(0, 0.05, len(X))
        return X, np.sort(t)
    elif kind == "rescored":  # entities re-scored over the day, 1-3 features nudged each time
        entities = _rows(victim, rng, int(rng.integers(2, 8)))
        n = int(rng.integers(40, 150))
        X = entities[rng.integers(0, len(entities), n)].copy()
        for row in X:
            j = rng.choice(victim.n_features, size=int(rng.integers(1, 4)), replace=False)
            row[j] += rng.normal(0, 0.1, len(j)) * victim.X_train.std(0)[j]
    elif kind == "probe":  # the same few rows every few minutes, all day
        fixed = _rows(victim, rng, int(rng.integers(1, 4)))
        n = int(day / rng.uniform(60, 300))
        X = fixed[np.arange(n) % len(fixed)] + _noise(victim, rng, (n, victim.n_features), 1) * (
            rng.random((n, victim.n_features)) < 0.05)
        return X, np.sort(rng.uniform(0, day, n))
    elif kind == "heavy":
        n = int(rng.integers(1000, 2500))
        X = _rows(victim, rng, n) + _noise(victim, rng, (n, victim.n_features), 1)
    else:  # light, label_only
        n = int(rng.integers(1, 21)) if kind == "light" else int(rng.integers(20, 150))
        X = _rows(victim, rng, n)
    lo, hi = victim.lo - (victim.hi - victim.lo), victim.hi + (victim.hi - victim.lo)
    return np.clip(X, lo, hi), np.sort(rng.uniform(0, day, len(X)))


def honest_population(victim, rng, per_kind=10, t0=scenario.DEFAULT_T0, kinds=KINDS,
                      distortion=None):
    """Events and client -> kind for ``per_kind`` clients of each kind. ``distortion``,
    when given, is applied to every client's rows (a shift all honest traffic shares)."""
    events, kinds_of = [], {}
    sites = [site_distortion(victim, rng) for _ in range(3)]
    for kind in kinds:
        for i in range(per_kind):
            client = f"{kind}-{i}"
            X, offsets = honest_plan(kind, victim, rng, sites[i % len(sites)])
            if distortion is not None:
                X = distortion(X)
            mine = scenario.client_events(victim, client, f"10.1.{len(kinds_of) // 250}."
                                          f"{len(kinds_of) % 250}", t0 + offsets, X, rng)
            if kind == "label_only":
                for e in mine:
                    del e["probabilities"]
            events += mine
            kinds_of[client] = kind
    return events, kinds_of
