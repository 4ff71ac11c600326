"""Quality-benchmark traffic: production-like honest clients, real attack code (ART),
training batches.

    python bench/quality/generate.py --out bench/quality/data [--seed 0] [--scale 1.0]

Four victims (digits, cancer, synth, and wine trained on 106 rows) on one two-hour
timeline. Honest traffic (``streams.demo.scenario.production_clients``), the numpy attackers
and the training batches come from ``streams.demo.scenario``; the attacks that exist in the
Adversarial Robustness Toolbox are run through it, and every row ART asks the victim
about becomes one inference event of the attacking client. ``--seed`` draws everything:
victims' splits, the honest mix, distortions, attack parameters; a second seed is a
held-out set.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from score import code_version  # noqa: E402  (beside this file)

from streams.demo.scenario import (  # noqa: E402
    BATCH_KINDS,
    BATCH_ROWS,
    DATASETS,
    DEFAULT_T0,
    Identities,
    QueryRecorder,
    Victim,
    client_events,
    client_truth,
    honest_mix,
    jacobian_extraction,
    load_victim,
    paced_times,
    poisoned_batches,
    production_clients,
    sort_events,
    uniform_extraction,
    write_batches,
    write_csv,
    write_jsonl,
)

# ART warns about missing deep-learning frameworks on import; none are needed here.
warnings.filterwarnings("ignore", message=".*not found.*")
from art.attacks.evasion import (  # noqa: E402
    BoundaryAttack,
    FastGradientMethod,
    HopSkipJump,
    SignOPTAttack,
    ZooAttack,
)
from art.attacks.extraction import KnockoffNets  # noqa: E402
from art.estimators.classification import BlackBoxClassifier, SklearnClassifier  # noqa: E402
from art.estimators.classification.scikitlearn import ScikitlearnClassifier  # noqa: E402

TIMELINE_S = 2 * 3600.0
BENIGN_CLIENTS = 300
ATTACKERS_PER_VARIANT = 10
# Attacks spread over several client ids: (ids, source IPs); None = one IP per id.
SPREAD = {"ext_slow_sybil": (5, 1), "ext_sybil_5x5": (5, 5), "ext_sybil_10x10": (10, 10)}
# Batches per dataset at scale 1; the first WARMUP_PER_SOURCE of every source are clean.
BATCH_COUNTS = {"clean": 40, "benign_drift": 20, "label_flip": 20, "backdoor": 20,
                "outliers": 20, "duplicates": 20, "label_flip_subtle": 10,
                "backdoor_subtle": 10}
BATCH_SOURCES = ["vendor-feed-a", "vendor-feed-b", "etl-nightly"]
WARMUP_PER_SOURCE = 10


# --------------------------------------------------------------------------- ART plumbing


class UnitSpace:
    """Each feature mapped linearly from its training [min, max] onto [0, 1].

    ART's black-box attacks measure distances in their input space; on raw cancer
    features (areas in the thousands next to ratios below 0.1) that space is useless,
    and ZooAttack takes a single clip range anyway. So the attacker works in unit space
    (clip values (0, 1) = the training data's per-feature min/max) and its client sends
    the raw, rounded row.
    """

    def __init__(self, victim: Victim):
        self.lo = victim.lo
        # Constant features (digits' blank corners) get one step of the data's precision;
        # ART rejects clip ranges with min >= max.
        self.span = np.maximum(victim.hi - victim.lo, 10.0 ** -victim.decimals)

    def to_raw(self, U: np.ndarray) -> np.ndarray:
        return self.lo + np.asarray(U, dtype=float) * self.span

    def to_unit(self, X: np.ndarray) -> np.ndarray:
        return ((X - self.lo) / self.span).astype(np.float32)


def black_box(victim: Victim, recorder: QueryRecorder) -> tuple[BlackBoxClassifier, UnitSpace]:
    """The victim's API as an ART classifier in unit space; every row it sees is recorded."""
    space = UnitSpace(victim)
    classifier = BlackBoxClassifier(
        lambda U: recorder(space.to_raw(U)), input_shape=(victim.n_features,),
        nb_classes=len(victim.classes), clip_values=(0.0, 1.0),
    )
    return classifier, space


class OnlineThief(ClassifierMixin, BaseEstimator):
    """Thieved model for ART's KnockoffNets: an SGD logistic regression trained online.

    KnockoffNets passes ``batch_size``/``nb_epochs``/``verbose`` to ``fit`` and, with
    adaptive sampling, fits one row at a time; a plain scikit-learn classifier rejects
    both, so each ``fit`` call here is ``nb_epochs`` passes of ``partial_fit``.
    """

    def __init__(self, n_classes: int = 2, random_state: int = 0):
        self.n_classes = n_classes
        self.random_state = random_state

    def fit(self, X, y, nb_epochs: int = 1, **_ignored):
        if not hasattr(self, "model_"):
            self.model_ = make_pipeline(StandardScaler(), SGDClassifier(
                loss="log_loss", random_state=self.random_state))
        scaler, sgd = self.model_[0], self.model_[1]
        scaler.partial_fit(X)
        for _ in range(nb_epochs):
            sgd.partial_fit(scaler.transform(X), y, classes=np.arange(self.n_classes))
        self.classes_ = sgd.classes_
        self.n_features_in_ = X.shape[1]
        return self

    def predict_proba(self, X):
        return self.model_.predict_proba(X)

    def predict(self, X):
        return self.model_.predict(X)


def fidelity(victim: Victim, predict) -> float:
    """Share of benign-pool rows on which a stolen model agrees with the victim."""
    return float(np.mean(predict(victim.X_benign) == victim.model.predict(victim.X_benign)))


def substitute_fidelity(victim: Victim, recorder: QueryRecorder) -> float:
    """Fidelity of a logistic regression trained on everything the attacker was told."""
    X = np.vstack([rows for rows, _ in recorder.requests])
    y = np.concatenate([proba.argmax(axis=1) for _, proba in recorder.requests])
    if len(np.unique(y)) < 2:
        return 0.0
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(X, y)
    return fidelity(victim, model.predict)


def natural_pool(victim: Victim, rng: np.random.Generator, size: int):
    """The attacker's natural data, grown to ``size`` rows if it is smaller.

    Knockoff Nets assumes a large natural data set; ours are small, so extra rows are
    same-class interpolations of two attacker rows (rounded like real data), not exact
    repeats.
    """
    X, y = victim.round(victim.X_attacker), victim.y_attacker
    extra = max(0, size - len(X))
    first = rng.integers(len(X), size=extra)
    second = np.array([rng.choice(np.flatnonzero(y == y[i])) for i in first], dtype=int)
    mix = rng.uniform(0.2, 0.8, size=(extra, 1))
    blended = victim.round(mix * X[first] + (1 - mix) * X[second])
    return np.vstack([X, blended]), np.concatenate([y, y[first]])


# --------------------------------------------------------------------------- attackers
# Each takes (victim, recorder, rng) and returns what the attack achieved.


def attack_ext_uniform(victim, recorder, rng):
    uniform_extraction(victim, recorder, rng, int(rng.integers(500, 2001)),
                       rows_per_request=int(rng.integers(1, 51)))
    return {"fidelity": substitute_fidelity(victim, recorder)}


def attack_ext_jacobian(victim, recorder, rng):
    substitute = jacobian_extraction(victim, recorder, rng, n_seeds=int(rng.integers(20, 51)),
                                     n_rounds=int(rng.integers(3, 6)))
    return {"fidelity": fidelity(victim, substitute.predict)}


def _knockoff(strategy: str):
    def attack_ext_knockoff(victim, recorder, rng):
        budget = int(rng.integers(1500, 3001))
        X, y = natural_pool(victim, rng, budget)
        # Natural rows need no clipping or rescaling: the victim sees them as they are.
        classifier = BlackBoxClassifier(recorder, input_shape=(victim.n_features,),
                                        nb_classes=len(victim.classes))
        thief = ScikitlearnClassifier(OnlineThief(len(victim.classes)))
        knockoff = KnockoffNets(
            classifier, batch_size_fit=64, batch_size_query=int(rng.integers(16, 129)),
            nb_epochs=5, nb_stolen=budget, sampling_strategy=strategy, reward="all",
            verbose=False,
        )
        stolen = knockoff.extract(X, y=y if strategy == "adaptive" else None,
                                  thieved_classifier=thief)
        return {"strategy": strategy,
                "fidelity": fidelity(victim, lambda rows: stolen.predict(rows).argmax(axis=1))}
    return attack_ext_knockoff


def attack_ext_sybil_uniform(victim, recorder, rng):
    return {"query_kind": "uniform", **attack_ext_uniform(victim, recorder, rng)}


def attack_ext_sybil_jacobian(victim, recorder, rng):
    return {"query_kind": "jacobian", **attack_ext_jacobian(victim, recorder, rng)}


def attack_ext_sybil_knockoff(victim, recorder, rng):
    return {"query_kind": "knockoff", **_knockoff("random")(victim, recorder, rng)}


def _starting_points(victim, recorder, rng, targets):
    """What a decision-based attacker starts from: for each target, the nearest of 30 of
    its own rows that the victim labels differently (found by asking the victim)."""
    candidates = victim.round(victim.X_attacker[rng.choice(
        len(victim.X_attacker), min(30, len(victim.X_attacker)), replace=False)])
    candidate_labels = recorder.labels(candidates)
    target_labels = recorder.labels(targets)
    span = UnitSpace(victim).span
    starts = []
    for target, label in zip(targets, target_labels, strict=True):
        other = np.flatnonzero(candidate_labels != label)
        distance = np.linalg.norm((candidates[other] - target) / span, axis=1)
        starts.append(candidates[other[np.argmin(distance)]])
    return np.array(starts)


class Blinded:
    """Query blinding (after the OARS attacks on stateful defenses, Feng et al. 2023):
    every row the attack asks about is sent with a small random transform, Gaussian noise
    of ``noise`` plus a random per-feature shift of up to ``noise`` per request, in unit
    space; the attack is told the victim's answer about what was sent."""

    def __init__(self, recorder: QueryRecorder, space: UnitSpace, rng: np.random.Generator,
                 noise: float):
        self.recorder, self.space, self.rng, self.noise = recorder, space, rng, noise

    def __call__(self, U: np.ndarray) -> np.ndarray:
        U = np.asarray(U, dtype=float)
        shift = self.rng.uniform(-self.noise, self.noise, size=U.shape[1])
        sent = np.clip(U + shift + self.rng.normal(0, self.noise, size=U.shape), 0.0, 1.0)
        return self.recorder(self.space.to_raw(sent))


def _evasion(victim, recorder, rng, make_attack, with_start: bool, n_targets=(1, 4),
             blinding: float | None = None):
    """Run an ART evasion attack on benign-pool rows; report how far it got."""
    targets = victim.round(victim.X_benign[rng.choice(len(victim.X_benign),
                                                      int(rng.integers(*n_targets)),
                                                      replace=False)])
    classifier, space = black_box(victim, recorder)
    if blinding is not None:
        classifier = BlackBoxClassifier(
            Blinded(recorder, space, rng, blinding), input_shape=(victim.n_features,),
            nb_classes=len(victim.classes), clip_values=(0.0, 1.0))
    kwargs = {}
    if with_start:
        kwargs["x_adv_init"] = space.to_unit(_starting_points(victim, recorder, rng, targets))
    adversarial = victim.round(space.to_raw(
        make_attack(classifier).generate(space.to_unit(targets), **kwargs)))
    fooled = victim.model.predict(adversarial) != victim.model.predict(targets)
    perturbation = np.sqrt((((adversarial - targets) / space.span) ** 2).mean(axis=1))
    outcome = {"targets": len(targets), "fooled": int(fooled.sum()),
               "rms_perturbation": [round(float(p), 4) for p in perturbation]}
    if blinding is not None:
        outcome["blinding_noise"] = round(blinding, 4)
    return outcome


def attack_adv_hopskipjump(victim, recorder, rng):
    return _evasion(victim, recorder, rng, lambda c: HopSkipJump(
        c, max_iter=int(rng.integers(8, 15)), max_eval=200, init_eval=20, verbose=False),
        with_start=True)


def attack_adv_boundary(victim, recorder, rng):
    return _evasion(victim, recorder, rng, lambda c: BoundaryAttack(
        c, targeted=False, max_iter=int(rng.integers(50, 101)), num_trial=5, sample_size=10,
        verbose=False), with_start=True)


def attack_adv_signopt(victim, recorder, rng):
    return _evasion(victim, recorder, rng, lambda c: SignOPTAttack(
        c, targeted=False, num_trial=20, k=30, query_limit=int(rng.integers(400, 901)),
        verbose=False), with_start=False)


def attack_adv_zoo(victim, recorder, rng):
    # Tuned: finite-difference step h must survive rounding to the data's precision.
    return _evasion(victim, recorder, rng, lambda c: ZooAttack(
        c, max_iter=int(rng.integers(25, 46)), nb_parallel=10, learning_rate=0.1,
        binary_search_steps=1, initial_const=1.0, variable_h=0.07, use_resize=False,
        use_importance=False, abort_early=False, verbose=False), with_start=False)


def _blinding(victim: Victim, rng: np.random.Generator) -> float:
    """Blinding noise in unit space: 0.5-2 % of the range, plus half a precision step so
    that rounding to the data's precision does not undo it (digits)."""
    step = float(np.median(10.0 ** -victim.decimals / UnitSpace(victim).span))
    return float(rng.uniform(0.005, 0.02)) + 0.5 * step


def attack_adv_blinded_hopskipjump(victim, recorder, rng):
    return {"attack": "hopskipjump", **_evasion(victim, recorder, rng, lambda c: HopSkipJump(
        c, max_iter=int(rng.integers(8, 15)), max_eval=200, init_eval=20, verbose=False),
        with_start=True, blinding=_blinding(victim, rng))}


def attack_adv_blinded_boundary(victim, recorder, rng):
    return {"attack": "boundary", **_evasion(victim, recorder, rng, lambda c: BoundaryAttack(
        c, targeted=False, max_iter=int(rng.integers(50, 101)), num_trial=5, sample_size=10,
        verbose=False), with_start=True, blinding=_blinding(victim, rng))}


def attack_adv_human_hopskipjump(victim, recorder, rng):
    """A person working one row by hand: a short HopSkipJump, one query at a time."""
    return {"attack": "hopskipjump", **_evasion(victim, recorder, rng, lambda c: HopSkipJump(
        c, max_iter=int(rng.integers(2, 5)), max_eval=int(rng.integers(30, 61)), init_eval=10,
        verbose=False), with_start=True, n_targets=(1, 2))}


def attack_adv_human_boundary(victim, recorder, rng):
    return {"attack": "boundary", **_evasion(victim, recorder, rng, lambda c: BoundaryAttack(
        c, targeted=False, max_iter=int(rng.integers(15, 41)), num_trial=5, sample_size=5,
        verbose=False), with_start=True, n_targets=(1, 2))}


def attack_adv_transfer(victim, recorder, rng):
    """FGSM on the attacker's own substitute, then one-shot queries to the victim."""
    X, y = victim.round(victim.X_attacker), victim.y_attacker
    mean, std = X.mean(axis=0), X.std(axis=0) + 1e-9
    substitute = LogisticRegression(max_iter=2000).fit((X - mean) / std, y)
    space = UnitSpace(victim)
    art_substitute = SklearnClassifier(  # picks the wrapper that has loss gradients
        substitute, clip_values=(victim.lo, victim.lo + space.span), preprocessing=(mean, std))
    eps = rng.uniform(0.5, 1.0) * std
    chosen = rng.choice(len(X), size=min(len(X), int(rng.integers(10, 41))), replace=False)
    adversarial = FastGradientMethod(art_substitute, eps=eps, eps_step=0.1 * std).generate(
        X[chosen].astype(np.float32))
    for row in victim.round(victim.clip(adversarial)):  # one request per query
        recorder(row[None])
    answers = np.concatenate([proba.argmax(axis=1) for _, proba in recorder.requests])
    return {"targets": len(chosen), "fooled": int(np.sum(answers != y[chosen]))}


@dataclass(frozen=True)
class Variant:
    family: str
    attacks: tuple  # (victim, recorder, rng) -> dict; attacker k runs attacks[k % len]
    think_s: tuple[float, float]  # range of the attacker's mean pause between requests
    pacing: str = "burst"  # burst: requests think_s apart; spread: over the whole timeline;
    # human: one query at a time, seconds to minutes apart, over most of the timeline
    rows_per_request: tuple[int, int] = (64, 65)  # range of the largest request
    ids: tuple[int, int] = (1, 2)  # range of client ids the attacker rotates over
    ips: str = "one"  # one: one source IP; per_id: one per id; mixed: attacker k odd: one


def variants_for(victim: Victim) -> dict[str, Variant]:
    """The attack variants run against ``victim``."""
    sybil = (attack_ext_sybil_uniform, attack_ext_sybil_jacobian, attack_ext_sybil_knockoff)
    variants = {
        "ext_uniform": Variant("extraction", (attack_ext_uniform,), (0.2, 3.0)),
        "ext_jacobian": Variant("extraction", (attack_ext_jacobian,), (0.2, 3.0)),
        "ext_knockoff": Variant("extraction", (_knockoff("random"), _knockoff("adaptive")),
                                (0.05, 0.5)),
        # A few requests a minute over the whole timeline, dealt out over several ids.
        "ext_slow_sybil": Variant("extraction",
                                  (attack_ext_sybil_uniform, attack_ext_sybil_jacobian), (0, 0),
                                  "spread", (1, 11), (5, 6), "one"),
        "ext_sybil_5x5": Variant("extraction", sybil, (0, 0), "spread", (1, 11), (5, 6),
                                 "per_id"),
        "ext_sybil_10x10": Variant("extraction", sybil, (0, 0), "spread", (1, 11), (10, 11),
                                   "per_id"),
        "adv_hopskipjump": Variant("adversarial", (attack_adv_hopskipjump,), (0.02, 0.3)),
        "adv_boundary": Variant("adversarial", (attack_adv_boundary,), (0.02, 0.3)),
        # Blinded queries rotated over 3-8 keys, a few rows per request.
        "adv_blinded": Variant("adversarial",
                               (attack_adv_blinded_hopskipjump, attack_adv_blinded_boundary),
                               (0.05, 2.0), "burst", (1, 9), (3, 9), "mixed"),
        "adv_human_pace": Variant("adversarial",
                                  (attack_adv_human_hopskipjump, attack_adv_human_boundary),
                                  (0, 0), "human", (1, 2)),
        "adv_transfer": Variant("adversarial", (attack_adv_transfer,), (2.0, 30.0)),
    }
    # SignOPT refuses binary models; ZooAttack runs on all but rarely fools the digits model.
    if len(victim.classes) > 2:
        variants["adv_signopt"] = Variant("adversarial", (attack_adv_signopt,), (0.02, 0.3))
    else:
        variants["adv_zoo"] = Variant("adversarial", (attack_adv_zoo,), (0.02, 0.3))
    return variants


# --------------------------------------------------------------------------- one dataset


def dataset_traffic(
    victim: Victim, rng: np.random.Generator, identities: Identities, scale: float,
    out: Path,
) -> tuple[list[dict], dict, list[dict], dict]:
    """Events, client truth, batch truth and per-attacker results of one victim."""
    t0 = DEFAULT_T0
    honest: dict[str, dict] = {}
    shares = honest_mix(rng)
    events = production_clients(victim, max(1, round(BENIGN_CLIENTS * scale)), rng, t0,
                                TIMELINE_S, identities, honest, shares)
    truth = {cid: client_truth(victim, "benign", None, cid, **detail)
             for cid, detail in honest.items()}

    results: dict[str, list[dict]] = defaultdict(list)
    n_attackers = max(1, round(ATTACKERS_PER_VARIANT * scale))
    for name, variant in variants_for(victim).items():
        for k in range(n_attackers):
            recorder = QueryRecorder(victim, int(rng.integers(*variant.rows_per_request)))
            np.random.seed(int(rng.integers(2**31)))  # ART draws from the global RNG
            started = time.perf_counter()
            outcome = variant.attacks[k % len(variant.attacks)](victim, recorder, rng)
            seconds = time.perf_counter() - started
            group = f"{victim.dataset}/{name}/{k}"
            n_ids = int(rng.integers(*variant.ids))
            client_ids = [identities.client_id() for _ in range(n_ids)]
            one_ip = variant.ips == "one" or (variant.ips == "mixed" and k % 2 == 1)
            ips = [identities.ip()] * n_ids if one_ip else [identities.ip() for _ in client_ids]
            label_only = variant.pacing == "human" and k % 4 >= 2
            sizes = [len(rows) for rows, _ in recorder.requests]
            times = _attack_times(variant, sizes, t0, rng)
            # Rotating keys deal requests in turn; sybils deal them at random.
            rotate = variant.pacing == "burst"
            events += attack_events(recorder, client_ids, ips, times, rng, rotate, label_only)
            for cid in client_ids:
                truth[cid] = client_truth(victim, name, variant.family, group,
                                          ids=n_ids, ips=len(set(ips)), label_only=label_only)
            results[name].append({"group": group, "queries": recorder.n_queries,
                                  "ids": n_ids, "ips": len(set(ips)),
                                  "seconds": round(seconds, 2),
                                  "span_s": round(float(times[-1] - times[0]), 1), **outcome})

    # A small data set has small batches: a third to two thirds of its batch pool, so
    # that batches differ (wine: 24-48 of 72 rows); the others take 200-500 rows.
    pool = len(victim.X_batches)
    rows = (pool // 3, 2 * pool // 3) if pool < BATCH_ROWS[0] else BATCH_ROWS
    warmup = max(1, round(WARMUP_PER_SOURCE * scale))
    counts = {kind: max(1, round(count * scale)) for kind, count in BATCH_COUNTS.items()}
    counts["clean"] = max(counts["clean"], warmup * len(BATCH_SOURCES) + 1)
    batches = poisoned_batches(victim, rng, t0, TIMELINE_S, counts, BATCH_SOURCES,
                               warmup_per_source=warmup, n_rows=rows)
    batch_truth = write_batches(batches, victim, out / victim.dataset / "batches", out)
    write_csv(out / victim.dataset / "train.csv", victim, victim.X_train, victim.y_train)
    return events, truth, batch_truth, {"honest_shares": {k: round(v, 4) for k, v in
                                                          shares.items()}, **results}


def attack_events(
    recorder: QueryRecorder, client_ids: list[str], ips: list[str], times: np.ndarray,
    rng: np.random.Generator, rotate: bool, label_only: bool,
) -> list[dict]:
    """Events for everything the recorder saw; requests dealt over the ids in turn
    (``rotate``) or at random, evenly."""
    victim = recorder.victim
    n = len(recorder.requests)
    turns = np.arange(n) % len(client_ids)
    owner = turns if rotate else rng.permutation(turns)
    sent = dict.fromkeys(client_ids, 0)
    events, row = [], 0
    for (X, proba), who in zip(recorder.requests, owner, strict=True):
        client_id = client_ids[who]
        events += client_events(victim, client_id, ips[who], times[row : row + len(X)], X,
                                rng, proba=proba, first_index=sent[client_id])
        sent[client_id] += len(X)
        row += len(X)
    if label_only:
        for event in events:
            del event["probabilities"]
    return events


def _attack_times(variant: Variant, sizes: list[int], t0: float,
                  rng: np.random.Generator) -> np.ndarray:
    """Send times of an attacker's rows on the timeline."""
    if variant.pacing == "spread":  # a few requests a minute over the whole timeline
        starts = np.sort(rng.uniform(0, TIMELINE_S, size=len(sizes)))
        gaps = [rng.exponential(0.004, size=size) for size in sizes]
        return t0 + np.concatenate([s + np.cumsum(g) for s, g in zip(starts, gaps, strict=True)])
    if variant.pacing == "human":  # seconds to minutes apart, over 60-95 % of the timeline
        n = sum(sizes)
        gaps = rng.lognormal(0.0, 1.0, size=n)
        gaps *= rng.uniform(0.6, 0.95) * TIMELINE_S / gaps.sum()
        offsets = np.cumsum(gaps)
        return t0 + rng.uniform(0, TIMELINE_S - offsets[-1]) + offsets
    think = rng.uniform(*variant.think_s)
    times = paced_times(sizes, 0.0, rng, think_s=think)
    start = rng.uniform(0, max(TIMELINE_S - times[-1], 0.0))
    return t0 + start + times * min(1.0, TIMELINE_S / max(times[-1], 1e-9))


# --------------------------------------------------------------------------- main


def _one_dataset(job: tuple[Path, int, float, int, str]):
    """Everything of one victim (run in a worker process)."""
    out, seed, scale, index, dataset = job
    logging.getLogger("art").setLevel(logging.ERROR)
    warnings.simplefilter("ignore", ConvergenceWarning)
    started = time.perf_counter()
    victim = load_victim(dataset, seed)
    rng = np.random.default_rng([seed, 100 + index])
    identities = Identities(np.random.default_rng([seed, 1, index]), block=index)
    events, truth, batch_truth, results = dataset_traffic(victim, rng, identities, scale, out)
    print(f"  {dataset}: {len(events)} events, {len(batch_truth)} batches "
          f"({time.perf_counter() - started:.0f} s)", flush=True)
    return events, truth, batch_truth, results


def generate(out: Path, seed: int = 0, scale: float = 1.0, jobs: int = 2,
             datasets: tuple[str, ...] = DATASETS) -> dict:
    """Write the benchmark data into ``out``; return a summary. A data set's traffic does
    not depend on which others are generated with it."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    work = [(out, seed, scale, index, dataset) for index, dataset in enumerate(DATASETS)
            if dataset in datasets]
    if jobs > 1:
        with ProcessPoolExecutor(min(jobs, len(work))) as pool:
            parts = list(pool.map(_one_dataset, work))
    else:
        parts = [_one_dataset(job) for job in work]
    all_events, clients, batches, attacks = [], {}, [], {}
    for (_, _, _, _, dataset), (events, truth, batch_truth, results) in zip(work, parts,
                                                                              strict=True):
        all_events += events
        if clients.keys() & truth.keys():
            raise RuntimeError("client ids collide across data sets")
        clients.update(truth)
        batches += batch_truth
        attacks[dataset] = results
    write_jsonl(out / "inference.jsonl", sort_events(all_events))
    (out / "truth.json").write_text(json.dumps(
        {"seed": seed, "scale": scale, "clients": clients, "batches": batches}, indent=1))
    summary = _summary(all_events, clients, batches, attacks, time.perf_counter() - started)
    # The commit that made the data: the traffic follows the scenario code, so the same
    # seed gives other data after it changes.
    summary.update(seed=seed, scale=scale, code=code_version())
    (out / "generation.json").write_text(json.dumps(summary, indent=1))
    return summary


def _summary(events, clients, batches, attacks, seconds) -> dict:
    per_variant = Counter(clients[e["client_id"]]["variant"] for e in events)
    per_behaviour = Counter(clients[e["client_id"]].get("behaviour") for e in events
                            if clients[e["client_id"]]["kind"] == "benign")
    attackers = {
        f"{dataset}/{variant}": {
            "attackers": len(runs),
            "queries_min": min(r["queries"] for r in runs),
            "queries_median": float(np.median([r["queries"] for r in runs])),
            "queries_max": max(r["queries"] for r in runs),
            **_success(runs),
        }
        for dataset, results in attacks.items() for variant, runs in results.items()
        if variant != "honest_shares"
    }
    return {
        "seconds": round(seconds, 1), "events": len(events),
        "events_per_variant": dict(sorted(per_variant.items())),
        "benign_events_per_behaviour": dict(sorted(per_behaviour.items())),
        "batches_per_kind": {k: sum(b["kind"] == k for b in batches) for k in BATCH_KINDS},
        "attackers": attackers, "runs": attacks,
    }


def _success(runs: list[dict]) -> dict:
    if "fidelity" in runs[0]:
        return {"fidelity_median": round(float(np.median([r["fidelity"] for r in runs])), 3)}
    fooled, targets = sum(r["fooled"] for r in runs), sum(r["targets"] for r in runs)
    success = {"fooled": f"{fooled}/{targets}", "success_rate": round(fooled / targets, 3)}
    perturbations = [p for r in runs for p in r.get("rms_perturbation", [])]
    if perturbations:
        success["rms_perturbation_median"] = round(float(np.median(perturbations)), 4)
    return success


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/quality/data"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiplies the numbers of clients, attackers and batches")
    parser.add_argument("--jobs", type=int, default=2,
                        help="worker processes (one data set each); 1 runs in this process")
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS),
                        help="only these data sets (for a quick look)")
    args = parser.parse_args(argv)
    logging.getLogger("art").setLevel(logging.ERROR)
    warnings.simplefilter("ignore", ConvergenceWarning)
    print(f"generating into {args.out} (seed {args.seed}, scale {args.scale})", flush=True)
    summary = generate(args.out, args.seed, args.scale, args.jobs, tuple(args.datasets))
    print(f"{summary['events']} events in {summary['seconds']} s")
    for variant, count in summary["events_per_variant"].items():
        print(f"  {variant:18s} {count:8d} events")
    for behaviour, count in summary["benign_events_per_behaviour"].items():
        print(f"    benign {behaviour:18s} {count:8d} events")
    print(f"  batches: {summary['batches_per_kind']}")
    for name, row in summary["attackers"].items():
        detail = ", ".join(f"{k}={v}" for k, v in row.items() if k != "attackers")
        print(f"  {name:26s} x{row['attackers']}: {detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
