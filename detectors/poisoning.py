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
    ``δa - δb``; that is how benign drift is told apart. Flipped rows also keep
    their features: the profile's reference classifier (the label's nearest training
    rows) confidently puts them in the class they came from, so rows of one label go
    to one other class far more often than on the training set (leave-one-out) and
    on the source's clean batches: a binomial tail per class pair, corrected over
    the pairs. A linear reference classifier (logistic regression) counts the same
    where the profile has one, and the stronger of the two counts, corrected for
    there being two, is the score: neighbours miss flipped rows of spread-out classes,
    a linear boundary misses them where classes are not linearly separable.
``poisoning.trigger_spike``
    A histogram bin holding many times its reference mass (and that of recent
    clean batches), where the reference is nearly empty: backdoor triggers set
    a few features to a value rare in clean data.
``poisoning.out_of_bounds``
    Values far beyond the training range (more than the range's own span past
    it: injected outliers), or a pile of one feature's values just beyond one of
    its bounds (a trigger value that clean data never takes): a binomial tail against
    the source's clean batches, per feature and side, corrected over them.
``poisoning.duplicates``
    A share of duplicated rows far above the reference's: duplicate flooding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from detectors.base import Verdict, rate_surprise
from detectors.profile import Profile
from detectors.rules import RULES

#: The smallest share of a label's rows that the flip test expects in another class: the
#: profile's estimate is already floored at the typical pair's rate (see
#: ``profile.neighbour_classifier``); this only keeps a tail finite.
MIN_EXPECTED_SHARE = 1e-4
#: The smallest share of a feature's values expected beyond one of its bounds: a bound
#: that no clean batch crossed yet is not promised never to be.
MIN_BEYOND_SHARE = 1e-3


@dataclass
class BatchStats:
    """One training batch's statistics, aligned to a profile's features and classes."""

    n: int
    count: np.ndarray            # non-null values per feature
    hist: list | None            # per feature counts on the profile's edges, None if edges differ
    # (2, features): values below and above the profile's bounds; a producer that counts
    # only both together has them in the second row, and ``sided`` False
    beyond: np.ndarray
    far: np.ndarray              # per feature values beyond them by more than their span, NaN if unknown
    label_counts: np.ndarray     # per profile class; labels the profile never saw are dropped
    class_n: np.ndarray          # rows per class with by_label moments
    class_mean: np.ndarray       # (classes, features), NaN where absent
    class_std: np.ndarray        # (classes, features), NaN where absent
    duplicates: int | None       # rows repeating an earlier row, if the producer counted them
    # (classes, classes): rows labelled c that the profile's reference classifier puts in
    # each class, if the producer counted them
    reference_classes: np.ndarray | None = None
    linear_classes: np.ndarray | None = None    # the same by the profile's linear classifier
    sided: bool = True


@dataclass
class SourceState:
    """Recent clean history of one dataset and source (bounded: one vector per kind)."""

    batches: int = 0
    clean: int = 0
    class_batches: int = 0                        # clean batches in the class moments
    bin_share: np.ndarray = field(default=None)   # EMA of clean batches' bin shares, concatenated
    class_mean: np.ndarray = field(default=None)  # EMA of clean batches' class means (scaled)
    class_var: np.ndarray = field(default=None)   # ... and class variances (scaled)
    class_n: np.ndarray = field(default=None)     # ... and rows per class
    beyond_share: np.ndarray = field(default=None)  # EMA of (2, features) shares below, above the bounds
    duplicate_share: float = 0.0
    agreement: np.ndarray = field(default=None)   # EMA of clean batches' label_agreement shares
    agreement_n: np.ndarray = field(default=None)  # ... and rows per class behind them
    linear_agreement: np.ndarray = field(default=None)    # the same for linear_classes
    linear_agreement_n: np.ndarray = field(default=None)
    last_alert: dict = field(default_factory=dict)


@dataclass
class _Call:
    """One update's own values, handed to its rules (never kept on the detector)."""

    key: str
    events_seen: int
    trace: dict  # rule -> (score, threshold)


class PoisoningDetector:
    def __init__(self, thresholds):
        self.cfg = thresholds.section("poisoning")

    def new_state(self) -> SourceState:
        return SourceState()

    def update(self, key: str, state: SourceState, batch: BatchStats, profile: Profile,
               dataset_batches: int | None = None, trace: dict | None = None) -> list[Verdict]:
        """Judge one batch of ``key`` (a dataset and source). ``dataset_batches`` is the
        dataset's batch count with this one (all sources), reported as ``events_seen``;
        without it, this source's count is. ``trace``, if given, receives each rule's
        (score, threshold)."""
        cfg = self.cfg
        call = _Call(key, state.batches + 1 if dataset_batches is None else dataset_batches,
                     {} if trace is None else trace)
        if batch.n < cfg["min_rows"]:
            state.batches += 1
            return []
        flip, flip_progress = self._label_flip(call, state, batch, profile)
        bounds, pile_progress = self._out_of_bounds(call, state, batch, profile)
        verdicts = [v for v in (
            flip,
            self._trigger_spike(call, state, batch, profile),
            bounds,
            self._duplicates(call, state, batch, profile),
        ) if v is not None]
        state.batches += 1
        if not verdicts:
            # A batch half-way to an alert does not teach the clean reference: else a
            # poisoner could raise it a little at a time.
            self._learn_clean(state, batch, profile.scale,
                              learn_classes=flip_progress < 0.5, learn_beyond=pile_progress < 0.25)
        return verdicts

    @staticmethod
    def _verdict(call, rule, score, threshold, description, evidence) -> Verdict:
        return Verdict(
            detector="poisoning", rule=f"poisoning.{rule}", key=call.key, score=float(score),
            threshold=float(threshold), events_seen=call.events_seen, trigger=0,
            techniques=RULES[f"poisoning.{rule}"].techniques, description=description,
            evidence=evidence,
        )

    def _label_flip(self, call, state, batch, profile) -> tuple[Verdict | None, float]:
        """The flip verdict if any, and how far the stronger of the two flip tests went
        toward its threshold (0 when untestable): the class-means test and the
        reference-classifier test."""
        cfg = self.cfg
        tests = [(*self._flip_by_means(state, batch, profile), cfg["flip_z"]),
                 (*self._flip_by_agreement(state, batch, profile), cfg["flip_surprise"])]
        score, f, a, b, evidence, threshold = max(tests, key=lambda t: t[0] / t[-1])
        call.trace["poisoning.label_flip"] = (score, threshold)
        progress = score / threshold
        if progress < 1 or f < 0.03:
            return None, progress
        return self._verdict(
            call, "label_flip", score, threshold,
            f"rows labelled {profile.classes[a]} look like class {profile.classes[b]}: labels flipped",
            {"class": profile.classes[a], "looks_like": profile.classes[b],
             "estimated_flipped_share": round(f, 3), **evidence}), progress

    def _flip_by_agreement(self, state, batch, profile) -> tuple:
        """Rows labelled a that a reference classifier of the profile puts in class b, far
        more often than it did on the training set (cross-validated) and on this source's
        clean batches: (surprise, excess share, a, b, evidence), the stronger of the
        neighbour and the linear classifiers. The surprise is -log10 of a binomial tail,
        Bonferroni-corrected over the class pairs and the classifiers."""
        tests = [(name, counts, agreement, learnt) for name, counts, agreement, learnt in (
            ("reference_classifier", batch.reference_classes, profile.label_agreement,
             state.agreement),
            ("linear_classifier", batch.linear_classes, profile.linear_agreement,
             state.linear_agreement)) if counts is not None and agreement is not None]
        best = (0.0, 0.0, -1, -1, {})
        for name, counts, expected, learnt in tests:
            n_classes = len(counts)
            if learnt is not None and state.class_batches >= 3:
                expected = np.maximum(expected, learnt)
            rows = counts.sum(1, keepdims=True)
            off = ~np.eye(n_classes, dtype=bool) & (rows >= 10)
            surprise = np.where(off, rate_surprise(counts, np.broadcast_to(rows, counts.shape),
                                                   np.clip(expected, MIN_EXPECTED_SHARE, 0.99)), 0.0)
            a, b = np.unravel_index(int(np.argmax(surprise)), surprise.shape)
            corrected = float(surprise[a, b]) - np.log10(n_classes * (n_classes - 1) * len(tests))
            if corrected > best[0]:
                share = float(counts[a, b] / rows[a, 0])
                best = (corrected, share - float(expected[a, b]), int(a), int(b), {
                    "test": name, "rows_labelled": int(rows[a, 0]),
                    "classified_as_other": int(counts[a, b]),
                    "expected_share": round(float(expected[a, b]), 4)})
        return best

    def _flip_by_means(self, state, batch, profile) -> tuple:
        """(z, estimated flipped share, a, b, evidence) from the class-conditional means."""
        scale = profile.scale
        # Reference: recent clean batches of this source once there are a few (their
        # average is many batches deep), else the profile (a finite sample too).
        if state.class_mean is not None and state.class_batches >= 3:
            ref, ref_var = state.class_mean, state.class_var
            depth = min(state.class_batches, 2 * self.cfg["recent_batches"] - 1)
            ref_n = np.maximum(state.class_n * depth, 1.0)
            reference = "recent_clean_batches"
        else:
            ref, ref_var = profile.class_mean / scale, (profile.class_std / scale) ** 2
            ref_n = np.maximum(profile.class_counts, 1.0)
            reference = "profile"
        present = (batch.class_n >= 10) & ~np.isnan(batch.class_mean).any(1)
        idx = np.flatnonzero(present & (profile.class_counts >= 10) & np.isfinite(ref).all(1))
        if len(idx) < 2:
            return 0.0, 0.0, -1, -1, {}
        delta = batch.class_mean[idx] / scale - ref[idx]
        batch_var = (batch.class_std[idx] / scale) ** 2
        precision = profile.within_precision
        best = (0.0, 0.0, -1, -1, 0.0)
        for i, a in enumerate(idx):
            for j, b in enumerate(idx):
                if a == b:
                    continue
                u = ref[j] - ref[i]
                # Project on the Fisher direction: with correlated features it is the
                # one along which a mixture of a and b stands out most from noise.
                direction = precision @ u
                separation = float(u @ direction)
                if separation <= 0:
                    continue
                f = float((delta[i] - delta[j]) @ direction) / separation
                var = (1 / batch.class_n[a] + 1 / batch.class_n[b]
                       + 1 / ref_n[a] + 1 / ref_n[b]) / separation
                z = f / np.sqrt(var)
                if z <= best[0]:
                    continue
                # A mixture of a and b widens a along u by f(1-f)|u|^2 per unit of u;
                # selecting a sub-population narrows it. Require half the widening.
                uu = float(u @ u)
                w = u**2 / uu
                widening = float(w @ (batch_var[i] - ref_var[a]))
                expected = f * (1 - f) * float(w @ u**2)
                if widening >= 0.5 * expected:
                    best = (z, f, a, b, widening / expected if expected > 0 else 0.0)
        z, f, a, b, widening = best
        return z, f, a, b, {"test": "class_means", "z": round(z, 2),
                            "variance_widening_ratio": round(widening, 2), "reference": reference}

    def _trigger_spike(self, call, state, batch, profile) -> Verdict | None:
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
        call.trace["poisoning.trigger_spike"] = (
            float(np.max(np.where(share >= cfg["spike_min_share"], ratio, 0), initial=0)),
            cfg["spike_ratio"])
        if not hits.any():
            return None
        worst = int(np.argmax(np.where(hits, ratio, 0)))
        feature = profile.feature_names[owner[worst]]
        return self._verdict(
            call, "trigger_spike", ratio[worst], cfg["spike_ratio"],
            f"feature {feature} piles up in a value range that is rare in clean data (backdoor trigger?)",
            {"feature": feature, "bin_share": round(float(share[worst]), 4),
             "reference_share": round(float(ref_share[worst]), 5),
             "features_with_spikes": int(len(np.unique(owner[hits])))})

    def _out_of_bounds(self, call, state, batch, profile) -> tuple[Verdict | None, np.ndarray]:
        """Values beyond the bounds: far beyond them (injected outliers), or piled
        up just beyond one feature's edge (a trigger value outside clean data). Also
        how far each (side, feature) went toward the pile threshold."""
        cfg = self.cfg
        # A trigger piles on one side of one feature: each side is tested on its own, so
        # that clean values beyond the other bound do not hide it.
        count = np.broadcast_to(np.maximum(batch.count, 1), batch.beyond.shape)
        share = batch.beyond / count
        if (state.beyond_share is not None and state.clean >= 3
                and state.beyond_share.shape == share.shape):
            expected = state.beyond_share  # what this source's clean batches show
        else:
            expected = np.full(share.shape, profile.bounds_value_rate)
        # Twice the reference share (batches vary), at least MIN_BEYOND_SHARE.
        surprise = rate_surprise(batch.beyond, count,
                                 np.clip(2 * expected, MIN_BEYOND_SHARE, 0.5))
        corrected = surprise - np.log10(surprise.size)
        progress = corrected / cfg["pile_surprise"]
        far = np.nan_to_num(batch.far)
        far_share = float(far.sum()) / max(batch.n, 1)
        call.trace["poisoning.out_of_bounds"] = (far_share, cfg["out_of_bounds_share"])
        if far_share >= cfg["out_of_bounds_share"]:
            j = int(np.argmax(far))
            return self._verdict(
                call, "out_of_bounds", far_share, cfg["out_of_bounds_share"],
                f"{int(far.sum())} values lie far beyond the training range "
                f"({int(far[j])} in feature {profile.feature_names[j]}): injected outliers",
                {"values_far_beyond": int(far.sum()), "per_row": round(far_share, 4),
                 "worst_feature": profile.feature_names[j],
                 "features_far_beyond": int((far > 0).sum())}), progress
        hits = (share >= cfg["spike_min_share"]) & (progress >= 1)
        if not hits.any():
            return None, progress
        side, j = np.unravel_index(int(np.argmax(np.where(hits, share, 0))), share.shape)
        where = ("beyond" if not batch.sided else ("below", "above")[side])
        return self._verdict(
            call, "out_of_bounds", share[side, j], cfg["spike_min_share"],
            f"{share[side, j]:.1%} of feature {profile.feature_names[j]}'s values lie {where} the "
            "training bounds (a trigger or outlier value)",
            {"feature": profile.feature_names[j], "side": where,
             "beyond_share": round(float(share[side, j]), 4),
             "expected_share": round(float(expected[side, j]), 5),
             "surprise": round(float(corrected[side, j]), 2),
             "features_beyond": int(hits.sum())}), progress

    def _duplicates(self, call, state, batch, profile) -> Verdict | None:
        if batch.duplicates is None:
            return None
        share = batch.duplicates / batch.n
        expected = max(profile.duplicate_rate, state.duplicate_share)
        limit = expected + self.cfg["duplicate_share"]
        call.trace["poisoning.duplicates"] = (share, limit)
        if share < limit:
            return None
        return self._verdict(
            call, "duplicates", share, limit,
            f"{share:.0%} of the batch's rows are duplicates",
            {"duplicate_share": round(share, 4), "expected_share": round(expected, 4)})

    def _learn_clean(self, state: SourceState, batch: BatchStats, scale: np.ndarray,
                     learn_classes: bool = True, learn_beyond: np.ndarray | bool = True) -> None:
        """Fold a clean batch into the source's reference; ``learn_beyond`` says which
        (side, feature) shares beyond the bounds it teaches."""
        # A running mean over the first `recent_batches` clean batches, then an
        # exponential one: every kept batch weighs alike until the window is full.
        state.clean += 1
        alpha = max(1.0 / state.clean, 1.0 / self.cfg["recent_batches"])
        if batch.hist is not None:
            counts = np.concatenate(batch.hist).astype(np.float64)
            owner_totals = np.concatenate(
                [np.full(len(h), max(c, 1)) for h, c in zip(batch.hist, batch.count, strict=True)])
            state.bin_share = _blend(state.bin_share, counts / owner_totals, alpha)
        if batch.duplicates is not None:
            state.duplicate_share = float(_blend(state.duplicate_share, batch.duplicates / batch.n,
                                                 alpha))
        beyond_share = batch.beyond / np.maximum(batch.count, 1)
        if state.beyond_share is None or state.beyond_share.shape != beyond_share.shape:
            state.beyond_share = beyond_share  # the first, a state from before sides, or a new producer
        else:
            state.beyond_share = np.where(learn_beyond, _blend(state.beyond_share, beyond_share, alpha),
                                          state.beyond_share)
        if not learn_classes:
            return
        for counts, shares_name in ((batch.reference_classes, "agreement"),
                                    (batch.linear_classes, "linear_agreement")):
            if counts is not None:
                self._learn_agreement(state, shares_name, counts)
        mean = batch.class_mean / scale
        var = (batch.class_std / scale) ** 2
        state.class_batches += 1
        if state.class_mean is None:
            state.class_mean, state.class_var, state.class_n = mean, var, batch.class_n.astype(float)
            return
        beta = max(1.0 / state.class_batches, 1.0 / self.cfg["recent_batches"])
        # Classes absent from this batch keep their history; a class seen for the
        # first time takes this batch's values.
        seen = np.isfinite(mean).all(1) & np.isfinite(var).all(1)
        new = seen & ~np.isfinite(state.class_mean).all(1)
        old = seen & ~new
        state.class_mean[new], state.class_var[new] = mean[new], var[new]
        state.class_n[new] = batch.class_n[new]
        state.class_mean[old] = _blend(state.class_mean[old], mean[old], beta)
        state.class_var[old] = _blend(state.class_var[old], var[old], beta)
        state.class_n[old] = _blend(state.class_n[old], batch.class_n[old], beta)


    def _learn_agreement(self, state: SourceState, name: str, counts: np.ndarray) -> None:
        """Per class, a running mean of a clean batch's classified shares while few rows are
        behind it, then an exponential one (a class absent from a batch keeps its history).
        ``name`` is the state's field of shares; its row counts are ``name + "_n"``."""
        rows = counts.sum(1, keepdims=True)
        shares = counts / np.maximum(rows, 1.0)
        agreement, seen_n = getattr(state, name), getattr(state, name + "_n")
        if agreement is None:
            agreement, seen_n = np.zeros_like(shares), np.zeros(len(shares))
        seen = rows[:, 0] > 0
        seen_n[seen] += 1
        weight = np.maximum(1.0 / np.maximum(seen_n, 1), 1.0 / self.cfg["recent_batches"])
        agreement[seen] = _blend(agreement[seen], shares[seen], weight[seen, None])
        setattr(state, name, agreement)
        setattr(state, name + "_n", seen_n)


def _blend(old, new, weight):
    return new if old is None else (1 - weight) * old + weight * new
