"""Poisoning detection from training-batch statistics (no model, no raw rows).

Each batch (a training-stats event) is compared with the reference profile and
with recent clean batches of the same dataset and source. Rules:

``poisoning.label_flip``
    Flipped labels leave the feature marginals alone but move a class's
    conditional mean toward the class its rows really belong to. For classes
    *a*, *b* with reference means μa, μb, the batch's shifts δa, δb (scaled
    units) give ``f = <δa - δb, μb - μa> / |μb - μa|²``: about the share of *a*'s
    rows that are really *b*'s, with a standard error from the reference
    within-class spreads. A shift common to all classes — a new, legitimate
    sub-population, where features and labels move together — cancels in
    ``δa - δb``; that is how benign drift is told apart.
``poisoning.trigger_spike``
    A histogram bin holding many times its reference mass (and that of recent
    clean batches), where the reference is nearly empty: backdoor triggers set
    a few features to a value rare in clean data.
``poisoning.out_of_bounds``
    Mass beyond the profile's per-feature bounds: injected outliers.
``poisoning.duplicates``
    A share of duplicated rows far above the reference's: duplicate flooding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from detectors.base import Verdict, rate_surprise
from detectors.profile import Profile

POISON = ("AML.T0020",)


@dataclass
class BatchStats:
    """One training batch's statistics, aligned to a profile's features and classes."""

    n: int
    count: np.ndarray            # non-null values per feature
    hist: list | None            # per feature counts on the profile's edges, None if edges differ
    beyond: np.ndarray           # per feature values beyond the profile's bounds
    label_counts: np.ndarray     # per profile class; labels the profile never saw are dropped
    class_n: np.ndarray          # rows per class with by_label moments
    class_mean: np.ndarray       # (classes, features), NaN where absent
    duplicates: int | None       # rows repeating an earlier row, if the producer counted them


@dataclass
class SourceState:
    """Recent clean history of one dataset and source (bounded: one vector per kind)."""

    batches: int = 0
    clean: int = 0
    bin_share: np.ndarray = field(default=None)   # EMA of clean batches' bin shares, concatenated
    duplicate_share: float = 0.0
    last_alert: dict = field(default_factory=dict)


class PoisoningDetector:
    def __init__(self, thresholds):
        self.cfg = thresholds.section("poisoning")

    def new_state(self) -> SourceState:
        return SourceState()

    def update(self, key: str, state: SourceState, batch: BatchStats,
               profile: Profile) -> list[Verdict]:
        cfg = self.cfg
        if batch.n < cfg["min_rows"]:
            state.batches += 1
            return []
        verdicts = [v for v in (
            self._label_flip(key, state, batch, profile),
            self._trigger_spike(key, state, batch, profile),
            self._out_of_bounds(key, state, batch, profile),
            self._duplicates(key, state, batch, profile),
        ) if v is not None]
        state.batches += 1
        if not verdicts:
            self._learn_clean(state, batch)
        return verdicts

    def _verdict(self, key, state, rule, score, threshold, description, evidence) -> Verdict:
        return Verdict(
            detector="poisoning", rule=f"poisoning.{rule}", key=key, score=float(score),
            threshold=float(threshold), events_seen=state.batches + 1, trigger=0,
            techniques=POISON, description=description, evidence=evidence,
        )

    def _label_flip(self, key, state, batch, profile) -> Verdict | None:
        scale = profile.scale
        ref = profile.class_mean / scale
        spread = profile.class_std / scale
        present = (batch.class_n >= 10) & ~np.isnan(batch.class_mean).any(1)
        idx = np.flatnonzero(present & (profile.class_counts > 0))
        if len(idx) < 2:
            return None
        delta = batch.class_mean[idx] / scale - ref[idx]
        best = (0.0, 0.0, -1, -1)
        for i, a in enumerate(idx):
            for j, b in enumerate(idx):
                if a == b:
                    continue
                u = ref[j] - ref[i]
                uu = float(u @ u)
                if uu <= 0:
                    continue
                f = float((delta[i] - delta[j]) @ u) / uu
                var = (((u**2) * spread[a] ** 2).sum() / batch.class_n[a]
                       + ((u**2) * spread[b] ** 2).sum() / batch.class_n[b]) / uu**2
                z = f / np.sqrt(var) if var > 0 else 0.0
                if z > best[0]:
                    best = (z, f, a, b)
        z, f, a, b = best
        if z < self.cfg["flip_z"] or f < 0.03:
            return None
        return self._verdict(
            key, state, "label_flip", z, self.cfg["flip_z"],
            f"rows labelled {profile.classes[a]} look like class {profile.classes[b]}: labels flipped",
            {"class": profile.classes[a], "looks_like": profile.classes[b],
             "estimated_flipped_share": round(f, 3), "z": round(z, 2)})

    def _trigger_spike(self, key, state, batch, profile) -> Verdict | None:
        if batch.hist is None:
            return None
        cfg = self.cfg
        ref_counts = np.concatenate(profile.hist)
        sizes = [len(h) for h in profile.hist]
        owner = np.repeat(np.arange(len(sizes)), sizes)
        ref_total = np.repeat([h.sum() for h in profile.hist], sizes)
        ref_share = (ref_counts + 0.5) / (ref_total + 0.5 * np.repeat(sizes, sizes))
        if state.bin_share is not None:
            ref_share = np.maximum(ref_share, state.bin_share)
        counts = np.concatenate(batch.hist).astype(np.float64)
        totals = np.maximum(batch.count[owner], 1)
        share = counts / totals
        ratio = share / ref_share
        surprise = rate_surprise(counts, totals, np.minimum(ref_share * 3, 0.99))
        hits = (ratio >= cfg["spike_ratio"]) & (share >= cfg["spike_min_share"]) & (surprise >= 7)
        if not hits.any():
            return None
        worst = int(np.argmax(np.where(hits, ratio, 0)))
        feature = profile.feature_names[owner[worst]]
        return self._verdict(
            key, state, "trigger_spike", ratio[worst], cfg["spike_ratio"],
            f"feature {feature} piles up in a value range that is rare in clean data (backdoor trigger?)",
            {"feature": feature, "bin_share": round(float(share[worst]), 4),
             "reference_share": round(float(ref_share[worst]), 5),
             "features_with_spikes": int(len(np.unique(owner[hits])))})

    def _out_of_bounds(self, key, state, batch, profile) -> Verdict | None:
        share = batch.beyond / np.maximum(batch.count, 1)
        j = int(np.argmax(share))
        expected = profile.bounds_rate
        limit = expected + self.cfg["out_of_bounds_share"]
        k = np.array([float(batch.beyond[j])])
        n = np.array([float(batch.count[j])])
        if share[j] < limit or rate_surprise(k, n, max(expected, 1e-3))[0] < 7:
            return None
        return self._verdict(
            key, state, "out_of_bounds", share[j], limit,
            f"{share[j]:.1%} of values of feature {profile.feature_names[j]} lie beyond the training bounds",
            {"feature": profile.feature_names[j], "beyond_share": round(float(share[j]), 4),
             "features_beyond": int((share >= limit).sum())})

    def _duplicates(self, key, state, batch, profile) -> Verdict | None:
        if batch.duplicates is None:
            return None
        share = batch.duplicates / batch.n
        expected = max(profile.duplicate_rate, state.duplicate_share)
        limit = expected + self.cfg["duplicate_share"]
        if share < limit:
            return None
        return self._verdict(
            key, state, "duplicates", share, limit,
            f"{share:.0%} of the batch's rows are duplicates",
            {"duplicate_share": round(share, 4), "expected_share": round(expected, 4)})

    def _learn_clean(self, state: SourceState, batch: BatchStats) -> None:
        alpha = 1.0 / self.cfg["recent_batches"]
        if batch.hist is not None:
            counts = np.concatenate(batch.hist).astype(np.float64)
            owner_totals = np.concatenate(
                [np.full(len(h), max(c, 1)) for h, c in zip(batch.hist, batch.count, strict=True)])
            share = counts / owner_totals
            state.bin_share = share if state.bin_share is None else (
                (1 - alpha) * state.bin_share + alpha * share)
        if batch.duplicates is not None:
            state.duplicate_share = ((1 - alpha) * state.duplicate_share
                                     + alpha * batch.duplicates / batch.n)
        state.clean += 1
