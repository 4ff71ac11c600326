"""Model-extraction detection: a client stealing the model through its queries.

Rules:

``extraction.prada``
    PRADA (Juuti et al., EuroS&P 2019). For each query, the distance to the
    nearest earlier query of the same client that got the same answer; honest
    query streams give a roughly normal distribution of these distances,
    synthetic extraction queries do not. Every ``prada_every`` new distances
    after ``prada_min_distances``, the Shapiro-Wilk W of the most recent
    ``prada_window`` distances (beyond-3σ values dropped, as in the reference
    code) is compared with δ. Differences from the paper: the set of earlier
    queries is the client's bounded window, not an unbounded growing set, and
    exact repeats are left out (honest clients re-ask records).
``extraction.synthetic_queries``
    What PRADA misses when synthetic queries are spread out (uniform random,
    Jacobian augmentation): a large share of a client's queries lie outside
    the training distribution, sustained over ``synthetic_min_queries``.
``extraction.gradient_steps``
    Papernot et al.'s Jacobian-based augmentation builds each query from an
    earlier one as x + λ·sign(∇): nearly every feature moves by about the same
    share of its range. Such steps between a query and its nearest earlier
    query are counted and rate-tested against the share that held-out training
    rows show (about zero).
``extraction.query_coverage``
    Natural-looking (Knockoff-style) query sets: high volume against the
    population, answers covering the classes as evenly as the population's,
    and almost no repeated records (honest heavy users re-score records).
``extraction.boundary_probing``
    A large share of low-margin answers over many queries.
``extraction.collusion``
    Several client ids behind one source IP whose pooled queries are mostly
    off the training distribution, or pooled gradient-sign steps (a slow
    attacker spread over ids).
"""

from __future__ import annotations

import numpy as np

from detectors.base import Verdict, first_true, rate_surprise
from detectors.clients import PRADA_RING, ClientState
from detectors.normality import shapiro_w_windows

EXTRACT = ("AML.T0024.002",)


def _verdict(view, rule, score, threshold, hit, description, evidence) -> Verdict:
    evidence = {**evidence, **view.evidence_at(hit)}
    return Verdict(
        detector="extraction", rule=f"extraction.{rule}", key=view.key,
        score=float(score), threshold=float(threshold), events_seen=view.events_at(hit),
        trigger=hit, techniques=EXTRACT, description=description, evidence=evidence,
    )


def judge(view, cfg) -> list[Verdict]:
    """Verdicts for one client's batch; ``view`` is a :class:`detectors.monitor.ClientView`."""
    verdicts = []
    prada = _prada(view, cfg)
    if prada:
        verdicts.append(prada)
    events = view.events_at(np.arange(len(view.batch)))

    if view.profile is not None:
        k, n = view.rate("ood")
        share = np.divide(k, n, out=np.zeros_like(k), where=n > 0)
        s = rate_surprise(k, n, 0.01)
        hit = first_true((events >= cfg["synthetic_min_queries"])
                         & (share >= cfg["synthetic_min_share"]) & (s >= cfg["surprise"]))
        if hit >= 0:
            verdicts.append(_verdict(
                view, "synthetic_queries", share[hit], cfg["synthetic_min_share"], hit,
                "most of the client's queries lie outside the training distribution",
                {"off_profile_share": round(float(share[hit]), 3)}))

    if view.profile is not None:
        k, n = view.rate("sign_step")
        p0 = min(0.5, max(cfg["step_p0"], 2 * view.profile.sign_step_rate))
        s = rate_surprise(k, n, p0, cfg["step_min_flagged"])
        hit = first_true((k >= cfg["step_min_flagged"]) & (s >= cfg["surprise"]))
        if hit >= 0:
            verdicts.append(_verdict(
                view, "gradient_steps", s[hit], cfg["surprise"], hit,
                "the client's queries step from earlier ones by a gradient sign in nearly every "
                "feature (Jacobian-based augmentation)",
                {"step_queries": round(float(k[hit]), 2), "of_recent": round(float(n[hit]), 2),
                 "expected_share": round(p0, 4)}))

    coverage = _coverage(view, cfg, events)
    if coverage:
        verdicts.append(coverage)

    k, n = view.rate("low_margin")
    share = np.divide(k, n, out=np.zeros_like(k), where=n > 0)
    hit = first_true((events >= cfg["boundary_min_queries"]) & (share >= cfg["boundary_min_share"])
                     & (rate_surprise(k, n, cfg["boundary_min_share"] / 3) >= cfg["surprise"]))
    if hit >= 0:
        verdicts.append(_verdict(
            view, "boundary_probing", share[hit], cfg["boundary_min_share"], hit,
            "a large share of the client's answers are low-margin: the decision boundary is being mapped",
            {"low_margin_share": round(float(share[hit]), 3)}))
    return verdicts


def _prada(view, cfg) -> Verdict | None:
    state: ClientState = view.state
    new = view.neighbours.nn_same_class
    rows = np.flatnonzero(~np.isnan(new))
    if len(rows) == 0:
        return None
    start = state.prada_count
    count = start + len(rows)
    ring = state.prada
    # Distances in order: the last PRADA_RING before this batch, then this batch's.
    before = min(start, PRADA_RING)
    history = np.roll(ring, -(start % PRADA_RING))[PRADA_RING - before:] if before else ring[:0]
    series = np.concatenate([history, new[rows].astype(np.float32)])
    every, minimum, window = cfg["prada_every"], cfg["prada_min_distances"], cfg["prada_window"]
    # Tests at minimum, minimum + every, ...: the same points however the stream is cut.
    first_test = minimum if start < minimum else minimum + ((start - minimum) // every + 1) * every
    totals = np.arange(first_test, count + 1, every)
    verdict = None
    if len(totals):
        ends = len(series) - (count - totals)
        w = shapiro_w_windows(series.astype(np.float64), ends, window)
        delta = prada_delta(view.profile, cfg)
        alarms = np.flatnonzero(w < delta)
        if len(alarms):
            first = alarms[0]
            hit = int(rows[totals[first] - start - 1])
            verdict = _verdict(
                view, "prada", 1.0 - w[first], 1.0 - delta, hit,
                "the distances between the client's successive queries are far from normal (PRADA)",
                {"shapiro_w": round(float(w[first]), 4), "delta": round(delta, 4),
                 "distances": int(min(window, totals[first]))})
    slots = (start + np.arange(len(rows))) % PRADA_RING
    ring[slots[-PRADA_RING:]] = new[rows][-PRADA_RING:]
    state.prada_count = count
    return verdict


def prada_delta(profile, cfg) -> float:
    """δ: the configured value, lowered to what simulated honest streams of this
    model's own data reach at the calibrated false-positive rate."""
    if profile is None:
        return cfg["prada_delta"]
    return min(cfg["prada_delta"],
               profile.prada_w[str(cfg["prada_quantile"])] - cfg["prada_margin"])


def _coverage(view, cfg, events) -> Verdict | None:
    pop = view.population
    p95 = pop.volume_quantile(0.95)
    pop_entropy = pop.class_entropy()
    if p95 is None or pop_entropy <= 0:
        return None
    batch = view.batch
    state: ClientState = view.state
    eligible = events >= max(cfg["coverage_min_queries"], cfg["coverage_volume_factor"] * p95)
    if not eligible.any():
        return None
    labels = batch.label
    onehot = np.zeros((len(batch), state.n_classes))
    known = labels >= 0
    onehot[np.flatnonzero(known), labels[known]] = 1.0
    counts = state.class_counts[None, :] + np.cumsum(onehot, 0)
    totals = counts.sum(1, keepdims=True)
    p = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.nansum(np.where(p > 0, p * np.log(p), 0.0), 1)
    ratio = ent / pop_entropy
    fresh = batch.has_features & ~view.neighbours.repeat
    distinct = (state.distinct + np.cumsum(fresh)) / np.maximum(events, 1)
    hit = first_true(eligible & (ratio >= cfg["coverage_min_entropy"])
                     & (distinct >= cfg["coverage_min_distinct"]))
    if hit < 0:
        return None
    return _verdict(
        view, "query_coverage", float(ratio[hit]), cfg["coverage_min_entropy"], hit,
        "a high-volume client sweeps every class evenly with almost no repeated records",
        {"class_entropy_ratio": round(float(ratio[hit]), 3),
         "distinct_share": round(float(distinct[hit]), 3),
         "population_p95_events": p95})


def judge_pooled(ids, counts, events, cfg, step_rate) -> tuple[float, float, dict] | None:
    """Several ids behind one source IP, pooled: off-profile or gradient-step queries.

    ``counts`` holds decayed (off-profile, with features, steps, with a nearest query).
    """
    if len(ids) < cfg["collusion_min_ids"] or events < cfg["synthetic_min_queries"]:
        return None
    ood_k, ood_n, step_k, step_n = counts
    if ood_n > 0 and ood_k / ood_n >= cfg["synthetic_min_share"] and rate_surprise(
            np.array([ood_k]), np.array([ood_n]), 0.01)[0] >= cfg["surprise"]:
        return ood_k / ood_n, cfg["synthetic_min_share"], {
            "pooled_off_profile_share": round(ood_k / ood_n, 3)}
    p0 = min(0.5, max(cfg["step_p0"], step_rate))
    surprise = rate_surprise(np.array([step_k]), np.array([step_n]), p0, cfg["step_min_flagged"])[0]
    if step_k >= cfg["step_min_flagged"] and surprise >= cfg["surprise"]:
        return surprise, cfg["surprise"], {"pooled_step_queries": round(step_k, 2),
                                           "pooled_of_recent": round(step_n, 2)}
    return None
