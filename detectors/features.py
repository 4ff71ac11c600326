"""What the query rules measure of each event: scaled features, off-distribution
distance, margin and bound checks, computed once per batch for every event.

Two off-distribution distances are kept. ``ood`` is the Mahalanobis distance
to the training data. ``own_ood`` (see :func:`own_calibrated_ood`) measures
the query after the client's own calibration is taken out: its running mean
is removed. A site whose scanner reads every value 0.3 σ high, or in another
unit, sends queries that are all "off the training data" yet ordinary among
themselves; synthetic queries (uniform random, Jacobian steps) break the
training data's correlations and stay far off after that calibration.

>>> rng = np.random.default_rng(0)
>>> from detectors.profile import build_profile
>>> X = rng.normal(size=(600, 3)) @ np.array([[1, .9, 0], [0, .4, 0], [0, 0, 1]])
>>> p = build_profile(X, (X[:, 0] > 0).astype(int), ["a", "b", "c"], model="m")
>>> f = Featurizer(p, bounds_tolerance=0.25)
>>> shifted = X[:200] + [0, 1.5, 0]         # another scanner: one feature reads high
>>> batch = f.columns(shifted, [0] * 200, None)
>>> float((batch.ood > p.ood_threshold).mean()) > 0.5
True
>>> from detectors.clients import ClientState
>>> own = own_calibrated_ood(ClientState(2, 3, 8), batch, p)
>>> float(np.nanmean(own > p.ood_threshold)) < 0.05
True
"""

from __future__ import annotations

import numpy as np

from detectors.clients import ClientState, QueryBatch
from detectors.profile import Profile

Z_LIMIT = 1e6  # scaled feature values are clipped here: far beyond any honest value
#: Queries of a client before its own calibration is trusted (own_ood is NaN before).
OWN_CALIBRATION_MIN = 4


class Featurizer:
    """Turns one model's events into the columns the rules read."""

    def __init__(self, profile: Profile | None, bounds_tolerance: float):
        self.profile = profile
        if profile is not None:
            # Beyond the bounds means beyond by a share of the range, or by two steps of
            # the data's precision: re-measurement noise at a blank edge is not an attack.
            slack = np.maximum(bounds_tolerance * (profile.upper - profile.lower), 2 * profile.step)
            self.low, self.high = profile.lower - slack, profile.upper + slack

    def columns(self, X: np.ndarray, predictions, probabilities: list | None,
                has_features: np.ndarray | None = None, ts: np.ndarray | None = None,
                labels: np.ndarray | None = None) -> QueryBatch:
        """Columns of a batch: ``X`` rows × features (NaN rows where ``has_features`` is
        False), the predicted labels, the probabilities per event (or None)."""
        X = np.asarray(X, dtype=np.float64)
        m = len(X)
        if has_features is None:
            has_features = np.ones(m, dtype=bool)
        profile = self.profile
        if profile is not None:
            # Absurd values (1e300) must not overflow float32 windows or reach alerts as inf.
            # profile.scaled's arithmetic, in place: each chunk-sized temporary (67 MB for a
            # replay chunk of 131,072 x 64) is one more pass and fresh pages to fault in.
            with np.errstate(over="ignore", invalid="ignore"):
                Z = X - profile.mean
                Z /= profile.scale
                np.clip(Z, -Z_LIMIT, Z_LIMIT, out=Z)
            # Featureless rows are NaN (clipped rows hold no inf): zeros to the product.
            missing = np.isnan(Z)
            ood = np.where(has_features, profile.mahalanobis(
                np.where(missing, 0.0, Z) if missing.any() else Z), np.nan)
            out_of_bounds = ((self.low > X) | (self.high < X)).any(1) & has_features
            if labels is None:  # a batch answers with a few classes: look each up once
                index: dict = {}
                labels = np.fromiter((index[p] if p in index else index.setdefault(
                    p, profile.class_index(p)) for p in predictions), dtype=np.int64, count=m)
        else:
            Z, ood = np.clip(X, -Z_LIMIT, Z_LIMIT), np.full(m, np.nan)
            out_of_bounds = np.zeros(m, dtype=bool)
        return QueryBatch(ts=np.zeros(m) if ts is None else ts, Z=Z, has_features=has_features,
                          label=labels, margin=margins(probabilities, m), ood=ood,
                          out_of_bounds=out_of_bounds, source_ip=[])


def margins(probabilities: list | None, m: int) -> np.ndarray:
    """Top-1 minus top-2 probability per event; NaN without probabilities."""
    margin = np.full(m, np.nan)
    if not probabilities:
        return margin
    same = [i for i, p in enumerate(probabilities) if p and len(p) >= 2]
    if not same:
        return margin
    try:  # the common case: one width, one conversion
        P = np.array([probabilities[i] for i in same], dtype=np.float64)
    except ValueError:
        width = len(probabilities[same[0]])
        same = [i for i in same if len(probabilities[i]) == width]
        P = np.array([probabilities[i] for i in same], dtype=np.float64)
    # Top-1 minus top-2: the largest, then the largest of the rest (ties give 0).
    rows = np.arange(len(P))
    top = P.argmax(1)
    first = P[rows, top]
    P[rows, top] = -np.inf
    margin[same] = first - P.max(1)
    return margin


def own_calibrated_ood(state: ClientState, batch: QueryBatch, profile: Profile) -> np.ndarray:
    """Off-distribution distance of each query after the client's own calibration.

    Causal: the calibration at a query is the client's mean and spread over its
    queries up to and including it, so the value never depends on later queries
    or on how the stream was cut into batches. NaN for queries without features
    and for the client's first ``OWN_CALIBRATION_MIN`` queries. Updates the
    client's running sums.
    """
    m = len(batch)
    out = np.full(m, np.nan)
    rows = np.flatnonzero(batch.has_features)
    if not len(rows):
        return out
    Z = batch.Z if len(rows) == m else batch.Z[rows]
    n = state.featured + np.arange(1, len(rows) + 1)
    sums = state.z_sum + np.cumsum(Z, axis=0)
    own = Z - sums / n[:, None]
    first = max(OWN_CALIBRATION_MIN - state.featured, 0)  # n > OWN_CALIBRATION_MIN from here on
    if first < len(rows):
        out[rows[first:]] = profile.mahalanobis(own[first:])
    state.featured = int(n[-1])
    state.z_sum = sums[-1].copy()  # a view would keep the whole batch's cumsum alive
    return out
