"""Adversarial-input detection: query-based black-box attacks and evasion inputs.

Rules, each a rate test on the client's recent queries (see :mod:`detectors.monitor`)
against an expected rate calibrated from production (:func:`detectors.monitor.expected_rate`):

``adversarial.query_crowding``
    Stateful detection after Chen, Carlini & Wagner (2019): decision-based attacks
    (HopSkipJump, Boundary, Sign-OPT) query many points very close to each other
    while they walk along the decision boundary. A query is *crowded* when the
    mean distance to its ``knn_k`` nearest earlier distinct queries is below the
    ``crowding_quantile`` of the same statistic on held-out training data, a
    distance honest data almost never shows. Exact repeats are not crowding.
``adversarial.low_margin``
    The client's answers sit on the decision boundary far more often than the
    population's (median over clients).
``adversarial.out_of_distribution``
    Queries beyond the profile's calibrated 99th-percentile Mahalanobis distance,
    both as sent and after the client's own calibration is taken out (see
    :mod:`detectors.features`), far more often than the population's clients are.
``adversarial.feature_bounds``
    Feature values beyond the training data's bounds.
``adversarial.coordinate_probing``
    Zeroth-order attacks (ZOO, Chen et al. 2017) estimate the gradient by finite
    differences, coordinate by coordinate: x ± h·e_i for many features i around one
    point. Such a query differs, beyond rounding, in one or two features from many
    earlier queries of the client (:func:`detectors.clients.axis_probes`); an honest
    what-if edits a record a few times. The crowding, PRADA and low-margin rates
    leave these sparse re-sends out, so this rate test is what sees them.
``adversarial.line_search``
    Decision-based attacks search along lines: HopSkipJump's and Sign-OPT's binary
    search between a point and an adversarial one and their step-size search,
    Boundary's step from a candidate towards the original. Such a query lies between
    its nearest earlier query and a farther one, on their line, with a dense move
    (:func:`detectors.clients.line_steps`). Honest records are not interpolations of
    a client's earlier records; re-scored entities move a few fields and are left out.
"""

from __future__ import annotations

import numpy as np

from detectors.base import Candidate, Verdict, rate_surprise
from detectors.rules import RULES


def judge(view, cfg) -> list[Candidate]:
    """Rule hits in one client's batch; ``view`` is a :class:`detectors.monitor.ClientView`."""
    min_flagged = cfg["min_flagged"]
    surprise = cfg["surprise"]
    rules = RATE_RULES if view.profile is not None else RATE_RULES[-1:]
    rates = [rate for _, rate, _ in rules]
    p0s = [view.expected[rate] for rate in rates]
    # All of the client's rate tests in one call (each is elementwise): fewer small calls.
    K, N = view.rates(rates)
    S = rate_surprise(K, N, np.array(p0s), min_flagged)
    masks = (K >= min_flagged) & (S >= surprise)
    candidates = []

    def rate_rule(j, name, p0, description):
        rule = RULES[f"adversarial.{name}"]
        k, n, s = K[:, j], N[:, j], S[:, j]

        def verdict_at(hit: int) -> Verdict:
            return Verdict(
                detector="adversarial", rule=rule.name, key=view.key,
                score=float(s[hit]), threshold=surprise, events_seen=view.events_at(hit),
                trigger=hit, techniques=rule.techniques, description=description,
                evidence={"flagged": round(float(k[hit]), 2), "of_recent": round(float(n[hit]), 2),
                          "expected_share": round(p0, 4), **view.evidence_at(hit)},
            )

        candidates.append(Candidate("adversarial", masks[:, j], verdict_at, rule.name, s, surprise))

    for j, ((name, _, description), p0) in enumerate(zip(rules, p0s, strict=True)):
        rate_rule(j, name, p0, description)
    return candidates


#: The rate rules, each (rule, rate, description), the expected share ``view.expected[rate]``;
#: all but the last need a profile.
RATE_RULES = (
    ("query_crowding", "crowded",
     "queries crowd around each other at the decision boundary as in a "
     "decision-based black-box attack"),
    ("out_of_distribution", "ood",
     "queries lie outside the training distribution, even after the client's own "
     "calibration, far more often than the population's clients"),
    ("feature_bounds", "bounds", "queries carry feature values beyond the training data's bounds"),
    ("coordinate_probing", "axis_probe",
     "queries vary one point one or two features at a time, over many features, "
     "as finite-difference gradient estimation does (ZOO)"),
    ("line_search", "line_step",
     "queries lie on lines through earlier queries, between them, as the binary "
     "and step-size searches of decision-based attacks do"),
    ("low_margin", "low_margin",
     "answers sit on the decision boundary far more often than the population's"),
)


DENSE_CROWDING_QUANTILE = "0.01"  # of the profile's k-NN distances, for dense moves


def crowding_threshold(profile, cfg) -> float:
    """The k-NN distance below which a query counts as crowded (scaled units)."""
    return profile.knn_quantiles[str(cfg["crowding_quantile"])]


def flags(view, cfg) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-query (flagged, eligible) masks for this family's rate tests."""
    out = {}
    margin = view.batch.margin
    nb = view.neighbours
    # Re-sent records (a probe, a re-scored entity) say nothing new about the boundary.
    fresh = ~nb.repeat & ~nb.near_repeat
    out["low_margin"] = (margin < cfg["low_margin"], ~np.isnan(margin) & fresh)
    if view.profile is not None:
        feats = view.batch.has_features
        knn = nb.knn_mean
        at_boundary = nb.mixed
        # An entity edited field by field (re-scored with a changed amount) that drifts
        # across the boundary is not a walk along it.
        # Blinded queries (fresh noise on each) stay outside the 0.1 % distance, but move
        # densely; honest re-sends change a field or two. Dense moves crowd at the 1 %.
        dense = nb.has_nearest & ~nb.sparse_resend
        crowded = (knn < crowding_threshold(view.profile, cfg)) | (
            dense & (knn < view.profile.knn_quantiles[DENSE_CROWDING_QUANTILE]))
        out["crowded"] = (crowded & at_boundary, ~np.isnan(knn) & ~nb.sparse_edit)
        threshold = view.profile.ood_threshold
        own = view.own_ood
        # A record re-sent with a few fields changed (a what-if, a correction) can break the
        # data's correlations without being synthetic: it says nothing about the client.
        # Nor does a record sent again as it was (a probe, a QA suite): it counts once.
        out["ood"] = ((view.batch.ood > threshold) & (own > threshold),
                      ~np.isnan(own) & ~nb.sparse_resend & ~nb.repeat)
        # Likewise a record sent again as it was stays out of bounds if it was: once.
        out["bounds"] = (view.batch.out_of_bounds, feats & ~nb.repeat)
        out["sign_step"] = (view.neighbours.sign_step, view.neighbours.has_nearest)
        out["axis_probe"] = (nb.axis_probe, nb.has_nearest)
        out["line_step"] = (nb.line_step, nb.has_nearest)
    return out
