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
``extraction.key_minting``
    One source IP bringing new client ids into a model faster than honest sources
    do (new ids per population epoch against a quantile of sources' past counts):
    keys minted for a distributed extraction. Judged in :mod:`detectors.monitor`,
    which sees a client's first event.
"""

from __future__ import annotations

import numpy as np

from detectors.base import Candidate, Verdict, rate_surprise
from detectors.clients import PRADA_RING, ClientState
from detectors.normality import shapiro_w_windows
from detectors.rules import RULES


def _verdict(view, rule, score, threshold, hit, description, evidence) -> Verdict:
    """A verdict at event ``hit`` of the batch."""
    evidence = {**evidence, **view.evidence_at(hit)}
    return Verdict(
        detector="extraction", rule=f"extraction.{rule}", key=view.key,
        score=float(score), threshold=float(threshold), events_seen=view.events_at(hit),
        trigger=hit, techniques=RULES[f"extraction.{rule}"].techniques, description=description,
        evidence=evidence,
    )


def _candidate(view, rule, mask, score, threshold, description, evidence_at) -> Candidate:
    """A rule's hits; ``score`` is per event, ``evidence_at(i)`` the evidence at a hit."""
    return Candidate("extraction", mask, lambda hit: _verdict(
        view, rule, float(score[hit]), threshold, hit, description, evidence_at(hit)),
        f"extraction.{rule}", score, float(threshold))


def judge(view, cfg) -> list[Candidate]:
    """Rule hits in one client's batch; ``view`` is a :class:`detectors.monitor.ClientView`."""
    candidates = [_prada(view, cfg)]
    events = view.events_at(np.arange(len(view.batch)))
    latest = int(events[-1]) if len(events) else 0  # rules judged only past a count skip their tests below it

    if view.profile is not None:
        k, n = view.rate("ood")
        share = np.divide(k, n, out=np.zeros_like(k), where=n > 0)
        if latest >= cfg["synthetic_min_queries"]:
            s = rate_surprise(k, n, view.expected["ood"])
            mask = ((events >= cfg["synthetic_min_queries"]) & (share >= cfg["synthetic_min_share"])
                    & (s >= cfg["surprise"]))
        else:
            mask = np.zeros(len(events), dtype=bool)
        candidates.append(_candidate(
            view, "synthetic_queries", mask, share, cfg["synthetic_min_share"],
            "most of the client's queries lie outside the training distribution",
            lambda i: {"off_profile_share": round(float(share[i]), 3)}))

        k_step, n_step = view.rate("sign_step")
        p0 = view.expected["sign_step"]
        s_step = rate_surprise(k_step, n_step, p0, cfg["step_min_flagged"])
        candidates.append(_candidate(
            view, "gradient_steps",
            (k_step >= cfg["step_min_flagged"]) & (s_step >= cfg["surprise"]),
            s_step, cfg["surprise"],
            "the client's queries step from earlier ones by a gradient sign in nearly every "
            "feature (Jacobian-based augmentation)",
            lambda i: {"step_queries": round(float(k_step[i]), 2),
                       "of_recent": round(float(n_step[i]), 2), "expected_share": round(p0, 4)}))

    candidates.append(_coverage(view, cfg, events))

    k_low, n_low = view.rate("low_margin")
    low_share = np.divide(k_low, n_low, out=np.zeros_like(k_low), where=n_low > 0)
    if latest >= cfg["boundary_min_queries"]:
        mask = ((events >= cfg["boundary_min_queries"]) & (low_share >= cfg["boundary_min_share"])
                & (rate_surprise(k_low, n_low, cfg["boundary_min_share"] / 3) >= cfg["surprise"]))
    else:
        mask = np.zeros(len(events), dtype=bool)
    candidates.append(_candidate(
        view, "boundary_probing", mask, low_share, cfg["boundary_min_share"],
        "a large share of the client's answers are low-margin: the decision boundary is being mapped",
        lambda i: {"low_margin_share": round(float(low_share[i]), 3)}))
    return candidates


def _prada(view, cfg) -> Candidate:
    state: ClientState = view.state
    m = len(view.batch)
    mask = np.zeros(m, dtype=bool)
    score = np.full(m, np.nan)  # 1 - W where a test ran
    details: dict[int, dict] = {}
    new = view.neighbours.nn_same_class
    rows = (~np.isnan(new)).nonzero()[0]
    delta = prada_delta(view.profile, cfg)
    description = "the distances between the client's successive queries are far from normal (PRADA)"
    if len(rows):
        start = state.prada_count
        count = start + len(rows)
        ring = state.prada
        # Distances in order: the last PRADA_RING before this batch, then this batch's. The
        # ring grows to PRADA_RING in order (slot i holds distance i), then wraps.
        before = min(start, PRADA_RING)
        if len(ring) < PRADA_RING:
            history = ring[:before]
        else:
            history = np.roll(ring, -(start % PRADA_RING))[PRADA_RING - before:]
        series = np.concatenate([history, new[rows].astype(np.float32)])
        every, minimum, window = cfg["prada_every"], cfg["prada_min_distances"], cfg["prada_window"]
        # Tests at minimum, minimum + every, ...: the same points however the stream is cut.
        first_test = minimum if start < minimum else minimum + ((start - minimum) // every + 1) * every
        totals = np.arange(first_test, count + 1, every)
        if len(totals):
            ends = len(series) - (count - totals)
            w = shapiro_w_windows(series.astype(np.float64), ends, window)
            score[rows[totals - start - 1]] = 1.0 - w
            for alarm in np.flatnonzero(w < delta):
                hit = int(rows[totals[alarm] - start - 1])
                mask[hit], score[hit] = True, 1.0 - w[alarm]
                details[hit] = {"shapiro_w": round(float(w[alarm]), 4), "delta": round(delta, 4),
                                "distances": int(min(window, totals[alarm]))}
        # Distance i sits in slot i % PRADA_RING: in order while the ring grows.
        if count <= PRADA_RING:
            state.prada = series
        else:
            state.prada = np.empty(PRADA_RING, dtype=np.float32)
            state.prada[np.arange(count - PRADA_RING, count) % PRADA_RING] = series[-PRADA_RING:]
        state.prada_count = count
    return _candidate(view, "prada", mask, score, 1.0 - delta, description, details.get)


def prada_delta(profile, cfg) -> float:
    """δ: the configured value, lowered to what simulated honest streams of this
    model's own data reach at the calibrated false-positive rate."""
    if profile is None:
        return cfg["prada_delta"]
    return min(cfg["prada_delta"],
               profile.prada_w[str(cfg["prada_quantile"])] - cfg["prada_margin"])


def _coverage(view, cfg, events) -> Candidate:
    pop = view.population
    p95 = pop.volume_quantile(0.95)
    description = "a high-volume client sweeps every class evenly with almost no repeated records"
    if p95 is not None:
        least = max(cfg["coverage_min_queries"], cfg["coverage_volume_factor"] * p95)
        # Events only grow: none is eligible unless the last is (the entropy is then not needed).
        pop_entropy = pop.class_entropy() if len(events) and events[-1] >= least else 0.0
    if p95 is None or pop_entropy <= 0:
        return _candidate(view, "query_coverage", np.zeros(len(events), dtype=bool),
                          np.full(len(events), np.nan), cfg["coverage_min_entropy"], description, dict)
    batch = view.batch
    state: ClientState = view.state
    eligible = events >= least
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
    mask = eligible & (ratio >= cfg["coverage_min_entropy"]) & (distinct >= cfg["coverage_min_distinct"])
    return _candidate(
        view, "query_coverage", mask, ratio, cfg["coverage_min_entropy"], description,
        lambda i: {"class_entropy_ratio": round(float(ratio[i]), 3),
                   "distinct_share": round(float(distinct[i]), 3), "population_p95_events": p95})


def pooled_hits(n_ids: int, counts: np.ndarray, cfg, expected: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per event, whether several ids behind one IP look like extraction when pooled.

    ``counts`` is (events, 5): off-profile, with features, steps, with a nearest
    query, events — pooled as they stood at each event. Returns (mask, score, kind)
    where kind 0 is off-profile, 1 gradient steps.
    """
    ood_k, ood_n, step_k, step_n, events = counts.T
    m = len(counts)
    if n_ids < cfg["collusion_min_ids"]:
        return np.zeros(m, bool), np.zeros(m), np.zeros(m, int)
    enough = events >= cfg["synthetic_min_queries"]
    ood_share = np.divide(ood_k, ood_n, out=np.zeros(m), where=ood_n > 0)
    off = enough & (ood_share >= cfg["synthetic_min_share"]) & (
        rate_surprise(ood_k, ood_n, expected["ood"]) >= cfg["surprise"])
    p0 = expected["sign_step"]
    step_surprise = rate_surprise(step_k, step_n, p0, cfg["step_min_flagged"])
    steps = enough & (step_k >= cfg["step_min_flagged"]) & (step_surprise >= cfg["surprise"]) & (
        step_k >= cfg["collusion_min_step_share"] * step_n)
    score = np.where(off, ood_share, step_surprise)
    return off | steps, score, np.where(off, 0, 1)
