"""Synthetic traffic for modelwatch: victims, benign clients, attackers, training batches.

Everything here uses numpy and scikit-learn only, so it can ship in the package and
drive the built-in demo. The quality benchmark (``bench/quality/generate.py``) builds on
these pieces and adds the real attack code (ART).

Every generator is deterministic given its ``numpy.random.Generator``. Times are epoch
seconds (floats) until an event is written; events carry RFC 3339 strings.
"""

from __future__ import annotations

import csv
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import numpy as np
from sklearn.datasets import load_breast_cancer, load_digits, load_wine, make_classification
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from streams.records import format_ts

# ``wine`` is the small-training-set victim: 106 training rows.
DATASETS = ("digits", "cancer", "synth", "wine")
# 2026-11-21T08:00:00Z: every timeline starts here unless told otherwise.
DEFAULT_T0 = 1795248000.0
BATCH_ROWS = (200, 500)
POISON_KINDS = ("label_flip", "backdoor", "outliers", "duplicates")
# Harder poisoning, reported on its own: 2-6 % of a class flipped; a trigger inside the
# training range on 1-3 % of rows.
SUBTLE_KINDS = ("label_flip_subtle", "backdoor_subtle")
BATCH_KINDS = ("clean", "benign_drift", *POISON_KINDS, *SUBTLE_KINDS)
# Split of each data set: the rest after these goes to the training-batch pool.
_SPLIT = {"train": 0.40, "benign": 0.25, "attacker": 0.20}
# The small data set trains on more of its 178 rows (106), still far below 200.
_SPLITS = {"wine": {"train": 0.60, "benign": 0.25, "attacker": 0.15}}
# What a measurement can physically be (digits: 4-bit counts; cancer and wine:
# non-negative quantities). Distorted honest inputs are clipped to these, never to the
# training range.
_PHYSICAL = {"digits": (0.0, 16.0), "cancer": (0.0, np.inf), "wine": (0.0, np.inf)}


# --------------------------------------------------------------------------- victims


@dataclass
class Victim:
    """A served model, the data it was trained on, and the pools traffic is drawn from."""

    dataset: str
    model_name: str
    feature_names: list[str]
    classes: list[int]
    model: Pipeline
    X_train: np.ndarray
    y_train: np.ndarray
    X_benign: np.ndarray
    y_benign: np.ndarray
    X_attacker: np.ndarray
    y_attacker: np.ndarray
    X_batches: np.ndarray
    y_batches: np.ndarray
    decimals: np.ndarray  # per-feature precision of the data (all 0 for digits)
    physical: tuple[float, float] = (-np.inf, np.inf)  # what a measurement can be
    lo: np.ndarray = field(init=False)  # per-feature training bounds: the attacker's clip range
    hi: np.ndarray = field(init=False)

    def __post_init__(self):
        self.lo = self.X_train.min(axis=0)
        self.hi = self.X_train.max(axis=0)

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    def round(self, X: np.ndarray) -> np.ndarray:
        """Round rows to the data's precision, feature by feature."""
        scale = 10.0 ** self.decimals
        return np.round(np.asarray(X, dtype=float) * scale) / scale

    def clip(self, X: np.ndarray) -> np.ndarray:
        """Clip rows to the training data's per-feature range."""
        return np.clip(X, self.lo, self.hi)

    def measure(self, X: np.ndarray) -> np.ndarray:
        """What an instrument reports: clipped to the physical range, at the data's precision."""
        return self.round(np.clip(X, *self.physical))

    @property
    def std(self) -> np.ndarray:
        """Per-feature spread of the training data (one precision step where it is 0)."""
        return np.maximum(self.X_train.std(axis=0), 10.0 ** -self.decimals)


def _precision(X: np.ndarray, max_decimals: int = 6) -> np.ndarray:
    """Smallest number of decimals that represents each column exactly (capped)."""
    decimals = np.full(X.shape[1], max_decimals)
    for d in range(max_decimals, -1, -1):
        exact = np.all(np.abs(np.round(X, d) - X) < 1e-9, axis=0)
        decimals[exact] = d
    return decimals


def _load_data(name: str, seed: int):
    if name == "digits":
        bunch = load_digits()
        return bunch.data, bunch.target, list(bunch.feature_names)
    if name == "cancer":
        bunch = load_breast_cancer()
        return bunch.data, bunch.target, [str(f) for f in bunch.feature_names]
    if name == "synth":
        X, y = make_classification(
            n_samples=6000, n_features=20, n_informative=10, n_redundant=4, n_classes=4,
            random_state=seed,
        )
        # Served data has a fixed precision; without it every query would look unique.
        return np.round(X, 3), y, [f"f{i:02d}" for i in range(20)]
    if name == "wine":
        bunch = load_wine()
        return bunch.data, bunch.target, [str(f) for f in bunch.feature_names]
    raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")


def load_victim(name: str, seed: int = 0) -> Victim:
    """Train the victim model of one data set and split its data into pools.

    Parameters
    ----------
    name : {"digits", "cancer", "synth", "wine"}
        The data set; the model is called ``<name>-mlp``.
    seed : int
        Seeds the split and the model.

    Returns
    -------
    Victim
        Training split (also the reference profile), benign inference pool, attacker
        pool (disjoint from the benign pool) and training-batch pool. The batch pool is
        its own split when it holds a full batch; otherwise (small data sets) it is every
        row outside the training split, like labelled inference data fed back.
    """
    X, y, feature_names = _load_data(name, seed)
    split = _SPLITS.get(name, _SPLIT)
    X_train, X_rest, y_train, y_rest = train_test_split(
        X, y, train_size=split["train"], stratify=y, random_state=seed
    )
    n = len(X)
    n_benign, n_attacker = int(split["benign"] * n), int(split["attacker"] * n)
    X_benign, y_benign = X_rest[:n_benign], y_rest[:n_benign]
    X_attacker = X_rest[n_benign : n_benign + n_attacker]
    y_attacker = y_rest[n_benign : n_benign + n_attacker]
    X_batches, y_batches = X_rest[n_benign + n_attacker :], y_rest[n_benign + n_attacker :]
    if len(X_batches) < BATCH_ROWS[1]:
        X_batches, y_batches = X_rest, y_rest

    model = make_pipeline(
        StandardScaler(), MLPClassifier(hidden_layer_sizes=(64,), max_iter=500, random_state=seed)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(X_train, y_train)
    return Victim(
        dataset=name, model_name=f"{name}-mlp", feature_names=feature_names,
        classes=[int(c) for c in model.classes_], model=model,
        X_train=X_train, y_train=y_train, X_benign=X_benign, y_benign=y_benign,
        X_attacker=X_attacker, y_attacker=y_attacker, X_batches=X_batches, y_batches=y_batches,
        decimals=_precision(X), physical=_PHYSICAL.get(name, (-np.inf, np.inf)),
    )


# --------------------------------------------------------------------------- events


def inference_event(
    victim: Victim, client_id: str, index: int, row: np.ndarray, proba: np.ndarray,
    ts: float, source_ip: str, latency_ms: float | None = None,
) -> dict:
    """One inference event exactly as the wire contract describes it.

    Parameters
    ----------
    victim : Victim
        The model that answered.
    client_id : str
        The principal; ``request_id`` is ``f"{client_id}-{index}"``.
    index : int
        The client's running request number.
    row, proba : numpy.ndarray
        The query (already at the data's precision) and the model's class probabilities.
    ts : float
        Event time, epoch seconds.
    source_ip : str
    latency_ms : float, optional
    """
    event = {
        "ts": format_ts(ts),
        "model": victim.model_name,
        "client_id": client_id,
        "features": victim.round(row).tolist(),
        "prediction": victim.classes[int(np.argmax(proba))],
        "probabilities": np.round(proba, 4).tolist(),
        "request_id": f"{client_id}-{index}",
        "source_ip": source_ip,
    }
    if latency_ms is not None:
        event["latency_ms"] = round(float(latency_ms), 2)
    return event


def client_events(
    victim: Victim, client_id: str, source_ip: str, times: np.ndarray, X: np.ndarray,
    rng: np.random.Generator, proba: np.ndarray | None = None, first_index: int = 0,
) -> list[dict]:
    """Events of one client for query rows ``X`` sent at ``times`` (answers computed if absent)."""
    X = victim.round(X)
    if proba is None:
        proba = victim.model.predict_proba(X)
    latency = rng.lognormal(np.log(8.0), 0.4, size=len(X))
    return [
        inference_event(victim, client_id, first_index + i, X[i], proba[i], times[i],
                        source_ip, latency[i])
        for i in range(len(X))
    ]


def sort_events(events: list[dict]) -> list[dict]:
    """Events in time order (stable: a client's same-millisecond events keep their order)."""
    return sorted(events, key=lambda e: e["ts"])


def write_jsonl(path: Path, events: list[dict]) -> None:
    encoder = msgspec.json.Encoder()
    with open(path, "wb") as out:
        for event in events:
            out.write(encoder.encode(event))
            out.write(b"\n")


def write_csv(path: Path, victim: Victim, X: np.ndarray, y: np.ndarray) -> None:
    """A training-data CSV: header = feature names + ``y``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    X = victim.round(X)
    with open(path, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow([*victim.feature_names, "y"])
        for row, label in zip(X.tolist(), y.tolist(), strict=True):
            writer.writerow([*(_csv_number(v) for v in row), int(label)])


def _csv_number(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)


class Identities:
    """Unique, meaningless client ids and source IPs: names must not give attackers away."""

    def __init__(self, rng: np.random.Generator, block: int | None = None):
        """``block`` (0-3), if given, keeps these ids and addresses apart from other
        blocks' (ids start with the block's hex digit, addresses take a quarter of
        10.0.0.0/8), for allocators that run in separate processes."""
        self._rng = rng
        self._block = block
        self._used: set[str] = set()

    def _fresh(self, make) -> str:
        while (name := make()) in self._used:
            pass
        self._used.add(name)
        return name

    def client_id(self) -> str:
        if self._block is not None:
            return self._fresh(lambda: f"key-{self._block:x}{int(self._rng.integers(16**7)):07x}")
        return self._fresh(lambda: f"key-{int(self._rng.integers(16**8)):08x}")

    def ip(self) -> str:
        def make():
            a, b, c = self._rng.integers(0, 256, size=3)
            if self._block is not None:
                a = 64 * self._block + a % 64
            return f"10.{a}.{b}.{max(int(c), 1)}"
        return self._fresh(make)


def client_truth(victim: Victim, variant: str, family: str | None, group: str, **extra) -> dict:
    """Ground truth of one client id, as ``truth.json`` stores it."""
    return {
        "dataset": victim.dataset, "model": victim.model_name,
        "kind": "benign" if family is None else "attack",
        "variant": variant, "family": family, "group": group, **extra,
    }


# --------------------------------------------------------------------------- benign traffic

# How many of each behaviour among n benign clients (the rest are light users).
_BEHAVIOUR_SHARES = {"heavy": 0.012, "batch_job": 0.05, "repeater": 0.05, "regular": 0.30}


def _class_preference(victim: Victim, rng: np.random.Generator) -> np.ndarray:
    """Per-row sampling weights over the benign pool from a Dirichlet over classes."""
    concentration = rng.choice([0.3, 1.0, 5.0])  # narrow, mixed, broad users
    class_weights = rng.dirichlet(np.full(len(victim.classes), concentration))
    # The floor keeps every row possible: sampling without replacement needs enough of them.
    row_weights = class_weights[np.searchsorted(victim.classes, victim.y_benign)] + 1e-12
    return row_weights / row_weights.sum()


def _fit_in(gaps: np.ndarray, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """Offsets of a client's queries from its inter-arrival gaps, placed at a random start."""
    offsets = np.cumsum(gaps)
    span = offsets[-1]
    if span > 0.98 * duration_s:
        offsets *= 0.98 * duration_s / span
        span = offsets[-1]
    return rng.uniform(0, duration_s - span) + offsets


def _benign_plan(behaviour: str, victim: Victim, rng: np.random.Generator, duration_s: float):
    """Query rows and time offsets of one benign client."""
    weights = _class_preference(victim, rng)
    pool = len(victim.X_benign)
    if behaviour == "batch_job":
        # A scoring job: a few bursts of distinct records within seconds, idle in between.
        bursts = [int(rng.integers(100, 400)) for _ in range(int(rng.integers(1, 4)))]
        rows, gaps = [], []
        for size in bursts:
            size = min(size, pool)
            rows.append(rng.choice(pool, size=size, replace=False, p=weights))
            burst_gaps = rng.exponential(rng.uniform(0.005, 0.02), size=size)
            burst_gaps[0] = rng.uniform(300, 1800)
            gaps.append(burst_gaps)
        return np.concatenate(rows), _fit_in(np.concatenate(gaps), duration_s, rng)
    if behaviour == "repeater":
        favourites = rng.choice(pool, size=int(rng.integers(1, 6)), replace=False, p=weights)
        n = int(rng.integers(50, 300))
        rows = rng.choice(favourites, size=n)
        return rows, _fit_in(rng.exponential(rng.uniform(5, 40), size=n), duration_s, rng)
    n, mean_gap = {
        "light": (int(rng.integers(5, 51)), rng.uniform(5, 120)),
        "regular": (int(rng.integers(50, 301)), rng.uniform(2, 30)),
        "heavy": (int(rng.integers(2000, 5001)), None),
    }[behaviour]
    if mean_gap is None:  # heavy users are busy for most of the timeline
        mean_gap = rng.uniform(0.6, 0.95) * duration_s / n
    rows = rng.choice(pool, size=n, p=weights)
    return rows, _fit_in(rng.exponential(mean_gap, size=n), duration_s, rng)


def benign_clients(
    victim: Victim, n_clients: int, rng: np.random.Generator, t0: float, duration_s: float,
    identities: Identities | None = None, behaviours: dict[str, str] | None = None,
) -> list[dict]:
    """Benign inference traffic: the false-positive trap.

    Light (5-50 queries) and regular (50-300) users, a few heavy ones (2,000-5,000),
    batch jobs (bursts of hundreds of distinct records within seconds), repeaters (the
    same few records again and again); each with its own class preference; about 15 of
    them behind one NAT address. Queries are natural rows of the benign pool.

    Parameters
    ----------
    victim : Victim
    n_clients : int
    rng : numpy.random.Generator
    t0, duration_s : float
        The timeline, epoch seconds.
    identities : Identities, optional
        Shared id/IP allocator, so that ids stay unique across data sets.
    behaviours : dict, optional
        If given, filled with ``client_id -> behaviour`` (for ground truth).

    Returns
    -------
    list of dict
        Inference events, per client in time order (not merged across clients).
    """
    identities = identities or Identities(rng)
    counts = {b: round(share * n_clients) for b, share in _BEHAVIOUR_SHARES.items()}
    counts["heavy"] = max(counts["heavy"], 1)
    counts["light"] = n_clients - sum(counts.values())
    plan = [b for b, c in counts.items() for _ in range(c)]
    rng.shuffle(plan)
    # An office behind one NAT address: ordinary users sharing a source_ip.
    nat_seats = min(15, n_clients // 4)
    nat_ip = identities.ip()
    events = []
    for behaviour in plan:
        client_id = identities.client_id()
        behind_nat = nat_seats > 0 and behaviour in ("light", "regular")
        nat_seats -= behind_nat
        source_ip = nat_ip if behind_nat else identities.ip()
        rows, offsets = _benign_plan(behaviour, victim, rng, duration_s)
        events += client_events(victim, client_id, source_ip, t0 + offsets,
                                victim.X_benign[rows], rng)
        if behaviours is not None:
            behaviours[client_id] = f"{behaviour}_nat" if behind_nat else behaviour
    return events


# --------------------------------------------------------------------------- production-like honest traffic
#
# Honest traffic as a production model sees it, not as the training set looks: inputs
# re-measured with noise, whole sites with another calibration, service back-ends
# fanning one request out, batch jobs and backfills at machine speed, probes and QA
# suites repeating themselves all day, entities re-scored with small changes, label-only
# keys, many light users. Every row comes from the benign pool (never the training
# split). Where a kind needs more distinct records than the pool holds, and on a small
# pool (< 200 rows, wine) for every row, a record is a new sample of the same population:
# a pool row blended up to half-way with another of its class, measured with noise.

# Nominal share of a data set's honest clients per kind; ``light`` takes the rest.
HONEST_SHARES = {
    "medium": 0.15, "heavy": 0.013, "office_nat": 0.05, "sensor_noise": 0.10, "site": 0.10,
    "service_backend": 0.04, "batch_rescore": 0.04, "backfill": 0.04, "probe": 0.04,
    "qa_suite": 0.04, "entity_rescore": 0.05, "label_only": 0.05,
}
HONEST_KINDS = ("light", *HONEST_SHARES)
_SMALL_POOL = 200


def honest_mix(rng: np.random.Generator | None = None) -> dict[str, float]:
    """Shares of the honest kinds: nominal, or each scaled by a factor in [0.6, 1.6] drawn
    from ``rng`` (a differently seeded bench gets a different mix)."""
    if rng is None:
        return dict(HONEST_SHARES)
    shares = {kind: share * float(rng.uniform(0.6, 1.6)) for kind, share in HONEST_SHARES.items()}
    total = sum(shares.values())  # light users stay at least a fifth of the population
    return {k: v * min(1.0, 0.8 / total) for k, v in shares.items()}


class _Honest:
    """Row and time plans of honest clients of one victim (offsets in seconds from t0)."""

    def __init__(self, victim: Victim, rng: np.random.Generator, duration_s: float):
        self.victim, self.rng, self.duration = victim, rng, duration_s

    # ---------------------------------------------------------------- rows

    def records(self, n: int, weights: np.ndarray, distinct: bool = False) -> np.ndarray:
        """``n`` benign-pool rows under a class preference; ``distinct`` ones as far as the
        pool allows (beyond it, new samples: see ``new_samples``). On a small pool every
        row is a new sample."""
        v, rng = self.victim, self.rng
        pool = len(v.X_benign)
        if distinct and n > pool:
            index = np.concatenate([rng.permutation(pool), rng.choice(pool, n - pool, p=weights)])
            X = v.X_benign[index].astype(float)
            X[pool:] = self.new_samples(index[pool:])
        else:
            index = rng.choice(pool, n, replace=not distinct, p=weights)
            X = v.X_benign[index].astype(float)
        if pool < _SMALL_POOL:
            X = self.new_samples(index)
        return v.measure(X)

    def new_samples(self, index: np.ndarray) -> np.ndarray:
        """New records of the same population as pool rows ``index``: each blended with
        another pool row of its class (up to half-way), then measured with noise of 5 %
        of the feature's spread. The attackers' natural pool grows the same way."""
        v, rng = self.victim, self.rng
        partner = np.empty(len(index), dtype=int)
        for c in np.unique(v.y_benign[index]):
            rows = v.y_benign[index] == c
            partner[rows] = rng.choice(np.flatnonzero(v.y_benign == c), size=int(rows.sum()))
        mix = rng.uniform(0.0, 0.5, size=(len(index), 1))
        blended = (1 - mix) * v.X_benign[index] + mix * v.X_benign[partner]
        return self.remeasure(blended, 0.05)

    def remeasure(self, X: np.ndarray, relative: float | np.ndarray) -> np.ndarray:
        """Rows measured again: Gaussian noise of ``relative`` x the feature's spread."""
        noise = self.rng.normal(size=np.shape(X)) * relative * self.victim.std
        return self.victim.measure(X + noise)

    def steps(self, X: np.ndarray, max_features: int) -> np.ndarray:
        """Each row with 0..``max_features`` features moved by one precision step."""
        v, X = self.victim, np.array(X, dtype=float)
        for row in X:
            features = self.rng.choice(v.n_features, int(self.rng.integers(0, max_features + 1)),
                                       replace=False)
            row[features] += self.rng.choice([-1.0, 1.0], len(features)) * 10.0 ** -v.decimals[features]
        return v.measure(X)

    # ---------------------------------------------------------------- times

    def spread(self, n: int, mean_gap: float) -> np.ndarray:
        """Offsets of ``n`` queries with exponential gaps, placed at a random start."""
        return _fit_in(self.rng.exponential(mean_gap, size=n), self.duration, self.rng)

    def burst(self, start: float, n: int, gap_s: float) -> np.ndarray:
        """``n`` queries from ``start`` at machine speed (``gap_s`` mean apart)."""
        return start + np.cumsum(self.rng.exponential(gap_s, size=n))

    def every(self, interval_s: float) -> np.ndarray:
        """Start times of a job that runs every ``interval_s`` (10 % jitter) all day."""
        first = self.rng.uniform(0, interval_s)
        n = max(1, int((self.duration - first) // interval_s))
        jitter = self.rng.normal(0, 0.1 * interval_s, size=n)
        return np.clip(first + np.arange(n) * interval_s + jitter, 0, self.duration - 60)

    # ---------------------------------------------------------------- kinds
    # Each returns (offsets, rows, detail).

    def light(self, w):
        n = int(self.rng.integers(1, 21))
        return self.spread(n, self.rng.uniform(10, 600)), self.records(n, w), {}

    def medium(self, w):
        n = int(self.rng.integers(50, 301))
        return self.spread(n, self.rng.uniform(2, 30)), self.records(n, w), {}

    def heavy(self, w):
        n = int(self.rng.integers(2000, 5001))
        gap = self.rng.uniform(0.6, 0.95) * self.duration / n
        return self.spread(n, gap), self.records(n, w), {}

    def sensor_noise(self, w):
        n = int(self.rng.integers(20, 301))
        relative = self.rng.uniform(0.03, 0.15)
        per_feature = relative * self.rng.uniform(0.5, 1.5, size=self.victim.n_features)
        X = self.remeasure(self.records(n, w), per_feature)
        return self.spread(n, self.rng.uniform(2, 60)), X, {"noise": round(relative, 3)}

    def site_member(self, w, distortion):
        n = int(self.rng.integers(5, 301))
        X = self.records(n, w)
        X = self.victim.measure(distortion["mean"] + distortion["scale"] * (X - distortion["mean"])
                                + distortion["shift"])
        return self.spread(n, self.rng.uniform(2, 120)), X, {}

    def site_distortion(self) -> dict:
        """Another scanner or unit: on 20-60 % of features, a gain of 0.8-1.25 around the
        mean and/or a shift of 0.2-0.5 standard deviations."""
        v, rng = self.victim, self.rng
        chosen = rng.random(v.n_features) < rng.uniform(0.2, 0.6)
        chosen[rng.integers(v.n_features)] = True
        mode = rng.integers(1, 4, size=v.n_features)  # 1 shift, 2 scale, 3 both
        shift = np.where(chosen & (mode != 2),
                         rng.choice([-1.0, 1.0], v.n_features) * rng.uniform(0.2, 0.5, v.n_features),
                         0.0) * v.std
        scale = np.where(chosen & (mode != 1),
                         np.exp(rng.uniform(np.log(0.8), np.log(1.25), v.n_features)), 1.0)
        return {"mean": v.X_train.mean(axis=0), "shift": shift, "scale": scale,
                "features": int(chosen.sum())}

    def service_backend(self, w):
        """One upstream request fans out into 2-6 predictions within milliseconds: the same
        row, the row with a step of jitter, or the entity with 1-3 features varied."""
        rng = self.rng
        n_requests = int(rng.integers(80, 401))
        starts = self.spread(n_requests, self.duration * rng.uniform(0.5, 0.95) / n_requests)
        entities = self.records(n_requests, w)
        mix = rng.dirichlet([1.0, 1.0, 1.0])
        times, rows = [], []
        for start, entity in zip(starts, entities, strict=True):
            k = int(rng.integers(2, 7))
            mode = rng.choice(3, p=mix)
            X = np.repeat(entity[None], k, axis=0)
            if mode == 1:
                X = self.steps(X, 2)
            elif mode == 2:
                for row in X[1:]:
                    features = rng.choice(self.victim.n_features, int(rng.integers(1, 4)),
                                          replace=False)
                    row[features] = self.victim.X_benign[rng.integers(len(self.victim.X_benign)),
                                                         features]
            times.append(self.burst(start, k, 0.002))
            rows.append(self.victim.measure(X))
        return np.concatenate(times), np.vstack(rows), {"requests": n_requests}

    def batch_rescore(self, w):
        """A stored set of records re-scored every 10-40 minutes at machine speed: most of
        the set again each run, a few new records added."""
        rng = self.rng
        stored = self.records(int(rng.integers(100, 601)), w, distinct=True)
        interval = rng.uniform(600, 2400)
        times, rows = [], []
        for start in self.every(interval)[: int(rng.integers(2, 7))]:
            keep = stored[rng.random(len(stored)) < rng.uniform(0.7, 1.0)]
            new = self.records(int(rng.integers(0, max(2, len(stored) // 10))), w)
            stored = np.vstack([stored, new])
            run = np.vstack([keep, new])[rng.permutation(len(keep) + len(new))]
            times.append(self.burst(start, len(run), rng.uniform(0.002, 0.02)))
            rows.append(run)
        return np.concatenate(times), np.vstack(rows), {"runs": len(rows)}

    def backfill(self, w):
        """One burst of 200-1,500 stored records at machine speed, at any time."""
        n = int(self.rng.integers(200, 1501))
        start = self.rng.uniform(0, self.duration - 120)
        return (self.burst(start, n, self.rng.uniform(0.001, 0.01)),
                self.records(n, w, distinct=True), {})

    def probe(self, w):
        """A health check: the same 1-5 rows every 1-10 minutes, all day, maybe jittered."""
        rng = self.rng
        fixed = self.records(int(rng.integers(1, 6)), w, distinct=True)
        jitter = rng.random() < 0.5
        return self.repeated(fixed, rng.uniform(60, 600), lambda: 0.003, 2, jitter)

    def qa_suite(self, w):
        """A QA suite: the same 10-60 rows in the same order every 10-30 minutes, fast."""
        rng = self.rng
        fixed = self.records(int(rng.integers(10, 61)), w, distinct=True)
        jitter = rng.random() < 0.3
        return self.repeated(fixed, rng.uniform(600, 1800), lambda: rng.uniform(0.005, 0.05), 1,
                             jitter)

    def repeated(self, fixed, period, gap, fields, jitter):
        """``fixed`` sent again every ``period`` seconds all day, its rows ``gap()`` seconds
        apart, each time with a precision step of jitter on up to ``fields`` features if
        ``jitter``."""
        times, rows = [], []
        for start in self.every(period):
            times.append(self.burst(start, len(fixed), gap()))
            rows.append(self.steps(fixed, fields) if jitter else fixed)
        return np.concatenate(times), np.vstack(rows), {"rows": len(fixed), "jitter": jitter}

    def entity_rescore(self, w):
        """2-15 records re-scored 10-60 times each, 1-3 features nudged every time."""
        rng, v = self.rng, self.victim
        entities = self.records(int(rng.integers(2, 16)), w, distinct=True)
        times, rows = [], []
        for entity in entities:
            n = int(rng.integers(10, 61))
            nudge = rng.uniform(0.02, 0.15)
            state, X = entity.astype(float), []
            for _ in range(n):
                features = rng.choice(v.n_features, int(rng.integers(1, 4)), replace=False)
                state[features] += rng.normal(size=len(features)) * nudge * v.std[features]
                state = v.measure(state[None])[0]
                X.append(state.copy())
            times.append(np.sort(rng.uniform(0, self.duration, size=n)))
            rows.append(np.array(X))
        return np.concatenate(times), np.vstack(rows), {"entities": len(entities)}


def production_clients(
    victim: Victim, n_clients: int, rng: np.random.Generator, t0: float, duration_s: float,
    identities: Identities | None = None, truth: dict[str, dict] | None = None,
    shares: dict[str, float] | None = None,
) -> list[dict]:
    """Honest traffic that looks like production (see ``HONEST_KINDS``).

    Parameters
    ----------
    victim : Victim
    n_clients : int
        Honest client ids; every kind gets at least one when ``n_clients`` allows.
    rng : numpy.random.Generator
    t0, duration_s : float
        The timeline, epoch seconds.
    identities : Identities, optional
    truth : dict, optional
        Filled with ``client_id -> {"behaviour": kind, ...}`` (site, label-only, detail).
    shares : dict, optional
        Share per kind (``honest_mix``); ``light`` takes the rest.

    Returns
    -------
    list of dict
        Inference events, per client in time order (not merged across clients).
    """
    identities = identities or Identities(rng)
    shares = shares or honest_mix()
    counts = {k: round(s * n_clients) for k, s in shares.items()}
    if n_clients >= 2 * len(HONEST_KINDS):
        counts = {k: max(c, 1) for k, c in counts.items()}
    counts["light"] = max(0, n_clients - sum(counts.values()))
    plan = _Honest(victim, rng, duration_s)
    nat_ip = identities.ip()
    events: list[dict] = []

    def emit(kind, offsets, X, source_ip, label_only=False, **detail):
        client_id = identities.client_id()
        order = np.argsort(offsets, kind="stable")
        mine = client_events(victim, client_id, source_ip, t0 + offsets[order], X[order], rng)
        if label_only:
            for event in mine:
                del event["probabilities"]
        events.extend(mine)
        if truth is not None:
            truth[client_id] = {"behaviour": kind, "label_only": label_only, **detail}

    for kind, count in counts.items():
        if kind == "site":
            remaining, site = count, 0
            while remaining > 0:
                members = min(remaining, int(rng.integers(3, 9)))
                distortion = plan.site_distortion()
                ips = [identities.ip() for _ in range(int(rng.integers(1, 3)))]
                name = f"{victim.dataset}/site-{site}"
                for _ in range(members):
                    offsets, X, _ = plan.site_member(_class_preference(victim, rng), distortion)
                    emit(kind, offsets, X, str(rng.choice(ips)), site=name,
                         distorted_features=distortion["features"])
                remaining -= members
                site += 1
            continue
        for _ in range(count):
            weights = _class_preference(victim, rng)
            if kind == "office_nat":
                offsets, X, detail = plan.light(weights) if rng.random() < 0.6 else \
                    plan.medium(weights)
                emit(kind, offsets, X, nat_ip, **detail)
            elif kind == "label_only":
                n = int(rng.integers(20, 301))
                emit(kind, plan.spread(n, rng.uniform(2, 60)), plan.records(n, weights),
                     identities.ip(), label_only=True)
            else:
                offsets, X, detail = getattr(plan, kind)(weights)
                emit(kind, offsets, X, identities.ip(), **detail)
    return events


# --------------------------------------------------------------------------- attackers


class QueryRecorder:
    """The victim's prediction API as an attacker's client sees it.

    Each call rounds the rows to the data's precision (a real client sends what the
    data looks like), answers with ``predict_proba`` and records the call, split into
    requests of at most ``max_rows_per_request`` rows. Usable directly as the predict
    function of ART's ``BlackBoxClassifier``.
    """

    def __init__(self, victim: Victim, max_rows_per_request: int = 64):
        self.victim = victim
        self.max_rows_per_request = max_rows_per_request
        self.requests: list[tuple[np.ndarray, np.ndarray]] = []

    def __call__(self, X: np.ndarray) -> np.ndarray:
        X = self.victim.round(np.asarray(X, dtype=float).reshape(len(X), -1))
        proba = self.victim.model.predict_proba(X)
        for start in range(0, len(X), self.max_rows_per_request):
            stop = start + self.max_rows_per_request
            self.requests.append((X[start:stop], proba[start:stop]))
        return proba

    def labels(self, X: np.ndarray) -> np.ndarray:
        return np.argmax(self(X), axis=1)

    @property
    def n_queries(self) -> int:
        return sum(len(rows) for rows, _ in self.requests)


def paced_times(
    request_sizes: list[int], start: float, rng: np.random.Generator,
    think_s: float = 0.3, row_gap_s: float = 0.004,
) -> np.ndarray:
    """Send times of every row: requests one after another, ``think_s`` (mean) apart,
    rows of one request ``row_gap_s`` (mean) apart."""
    gaps = [
        np.concatenate([[rng.exponential(think_s)], rng.exponential(row_gap_s, size=size - 1)])
        for size in request_sizes
    ]
    return start + np.cumsum(np.concatenate(gaps))


def recorded_events(
    recorder: QueryRecorder, client_ids: list[str], source_ip: str, times: np.ndarray,
    rng: np.random.Generator,
) -> list[dict]:
    """Events for everything the recorder saw, at ``times`` (one per row).

    With several client ids (a sybil), the requests are dealt out among them in random
    order, evenly, so that every id is used.
    """
    victim = recorder.victim
    owner = rng.permutation(np.arange(len(recorder.requests)) % len(client_ids))
    sent = dict.fromkeys(client_ids, 0)
    events, row = [], 0
    for (X, proba), who in zip(recorder.requests, owner, strict=True):
        client_id = client_ids[who]
        events += client_events(victim, client_id, source_ip, times[row : row + len(X)], X,
                                rng, proba=proba, first_index=sent[client_id])
        sent[client_id] += len(X)
        row += len(X)
    return events


def uniform_extraction(
    victim: Victim, recorder: QueryRecorder, rng: np.random.Generator, n_queries: int,
    rows_per_request: int = 20,
) -> None:
    """Extraction with uniform random queries inside the training data's bounds."""
    for start in range(0, n_queries, rows_per_request):
        size = min(rows_per_request, n_queries - start)
        recorder(rng.uniform(victim.lo, victim.hi, size=(size, victim.n_features)))


def _log_proba_gradient_sign(substitute: Pipeline, X: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """sign of d log p(label | x) / dx for a (scaler + logistic regression) substitute."""
    scaler, logreg = substitute[0], substitute[-1]
    W = logreg.coef_
    if W.shape[0] == 1:  # binary: p1 = softmax([0, w.x + b])
        W = np.vstack([np.zeros_like(W), W])
    proba = substitute.predict_proba(X)
    own = W[np.searchsorted(logreg.classes_, labels)]
    # Gradient in scaled space divided by the (positive) scale: the sign is unchanged.
    return np.sign((own - proba @ W) / scaler.scale_)


def jacobian_extraction(
    victim: Victim, recorder: QueryRecorder, rng: np.random.Generator, n_seeds: int = 30,
    n_rounds: int = 4, step: float = 0.1,
) -> Pipeline:
    """Papernot et al. (2017) Jacobian-based dataset augmentation.

    A few natural seed rows; each round trains a logistic-regression substitute on the
    victim's answers and adds ``x + step * range * sign(grad log p_substitute(y_victim|x))``
    for every known point, so the query set doubles each round.

    Returns
    -------
    Pipeline
        The final substitute.
    """
    seeds = rng.choice(len(victim.X_attacker), size=min(n_seeds, len(victim.X_attacker)),
                       replace=False)
    X = victim.round(victim.X_attacker[seeds])
    labels = np.asarray(victim.classes)[recorder.labels(X)]
    span = victim.hi - victim.lo
    substitute = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    for _ in range(n_rounds):
        if len(np.unique(labels)) < 2:  # nothing to learn yet: explore at random
            direction = rng.choice([-1.0, 1.0], size=X.shape)
        else:
            substitute.fit(X, labels)
            direction = _log_proba_gradient_sign(substitute, X, labels)
        new = victim.round(victim.clip(X + step * span * direction))
        new_labels = np.asarray(victim.classes)[recorder.labels(new)]
        X, labels = np.vstack([X, new]), np.concatenate([labels, new_labels])
    return substitute.fit(X, labels) if len(np.unique(labels)) > 1 else substitute


def boundary_walk_attack(
    victim: Victim, recorder: QueryRecorder, rng: np.random.Generator, target: np.ndarray,
    n_queries: int = 500, n_probes: int = 20, search_steps: int = 8,
) -> np.ndarray:
    """A small HopSkipJump-like decision-based evasion of one row.

    Starts from a pool row of another class, binary-searches toward ``target`` to the
    decision boundary, then repeatedly probes random directions around the boundary
    point, steps along the estimated gradient and searches again. Only labels are used.

    Returns
    -------
    numpy.ndarray
        The adversarial row closest to ``target`` found within the query budget.
    """
    target = victim.round(target)
    own_class = recorder.labels(target[None])[0]
    starts = victim.round(victim.X_attacker[rng.permutation(len(victim.X_attacker))[:50]])
    other_class = np.flatnonzero(recorder.labels(starts) != own_class)
    if len(other_class) == 0:
        raise ValueError("no attacker-pool row of another class among 50 tried")
    start = starts[other_class[0]]

    def is_adversarial(X):
        return recorder.labels(X) != own_class

    def towards_target(adversarial):
        low, high = 0.0, 1.0  # fraction of the way from target to the adversarial point
        for _ in range(search_steps):
            mid = (low + high) / 2
            if is_adversarial(victim.round(target + mid * (adversarial - target))[None])[0]:
                high = mid
            else:
                low = mid
        return victim.round(target + high * (adversarial - target))

    scale = (victim.hi - victim.lo) / 20
    best = towards_target(start)
    while recorder.n_queries + n_probes + search_steps <= n_queries:
        probes = rng.normal(size=(n_probes, victim.n_features)) * scale
        signs = np.where(is_adversarial(victim.round(victim.clip(best + probes))), 1.0, -1.0)
        gradient = (signs - signs.mean())[:, None] * probes
        step = victim.clip(best + gradient.mean(axis=0) * 4)
        if is_adversarial(victim.round(step)[None])[0]:
            candidate = towards_target(victim.round(step))
            if np.linalg.norm(candidate - target) < np.linalg.norm(best - target):
                best = candidate
    return best


# --------------------------------------------------------------------------- training batches


def _informative_features(victim: Victim) -> np.ndarray:
    """Features ordered from most to least informative (spread of class means / std)."""
    X, y = victim.X_train, victim.y_train
    means = np.array([X[y == c].mean(axis=0) for c in np.unique(y)])
    return np.argsort(-means.std(axis=0) / (X.std(axis=0) + 1e-12))


def backdoor_trigger(victim: Victim) -> tuple[np.ndarray, np.ndarray]:
    """The trigger a backdoor attacker stamps: two of the least informative features set to
    a value beyond anything in the training data (a blank corner pixel at 16 on digits)."""
    features = _informative_features(victim)[-2:]
    span = victim.hi[features] - victim.lo[features]
    values = np.where(span > 0, victim.hi[features] + 0.1 * span, victim.X_train.max())
    scale = 10.0 ** victim.decimals[features]
    return features, np.ceil(values * scale) / scale  # rounded up: stays beyond the data


def training_batches(
    victim: Victim, rng: np.random.Generator, kind: str, n_rows: int,
    flip_rate: tuple[float, float] = (0.10, 0.30),
) -> tuple[np.ndarray, np.ndarray, dict]:
    """One training-data batch of ``kind``, rows drawn without replacement from the batch pool.

    Kinds: ``clean``; ``benign_drift`` (a legitimate new sub-population: rows above the
    70th percentile of an informative feature, mixed with ordinary rows, true labels);
    ``label_flip`` (``flip_rate`` of one class relabelled as another; ``label_flip_subtle``:
    2-6 %); ``backdoor`` (5-10 % of
    rows stamped with a trigger and labelled as a target class); ``outliers`` (3-5 % of
    rows pushed far outside the data range); ``duplicates`` (20-40 % of rows are copies
    of a handful of rows); ``backdoor_subtle`` (1-3 % of rows, a trigger inside the
    training range).

    Returns
    -------
    X, y : numpy.ndarray
    extra : dict
        What was done (rates, classes, features) for the ground truth.
    """
    pool_X, pool_y = victim.X_batches, victim.y_batches
    n_rows = min(n_rows, len(pool_X))
    if kind == "benign_drift":
        feature = int(rng.choice(_informative_features(victim)[:5]))
        high = pool_X[:, feature] > np.quantile(pool_X[:, feature], 0.70)
        share = rng.uniform(0.4, 0.7)
        n_high = min(int(share * n_rows), int(high.sum()))
        rows = np.concatenate([
            rng.choice(np.flatnonzero(high), size=n_high, replace=False),
            rng.choice(np.flatnonzero(~high), size=n_rows - n_high, replace=False),
        ])
        rng.shuffle(rows)
        extra = {"feature": victim.feature_names[feature], "drifted_share": n_high / n_rows}
        return victim.round(pool_X[rows]), pool_y[rows].copy(), extra

    rows = rng.choice(len(pool_X), size=n_rows, replace=False)
    X, y = victim.round(pool_X[rows]), pool_y[rows].copy()
    if kind == "clean":
        return X, y, {}
    if kind in ("label_flip", "label_flip_subtle"):
        source, flipped_to = rng.choice(victim.classes, size=2, replace=False)
        members = np.flatnonzero(y == source)
        rate = rng.uniform(*(flip_rate if kind == "label_flip" else (0.02, 0.06)))
        flipped = rng.choice(members, size=max(1, round(rate * len(members))), replace=False)
        y[flipped] = flipped_to
        return X, y, {"from": int(source), "to": int(flipped_to), "rate": rate,
                      "n_poisoned": len(flipped)}
    if kind == "backdoor":
        features, values = backdoor_trigger(victim)
        target_class = int(rng.choice(victim.classes))
        rate = rng.uniform(0.05, 0.10)
        poisoned = rng.choice(n_rows, size=round(rate * n_rows), replace=False)
        X[np.ix_(poisoned, features)] = values
        y[poisoned] = target_class
        X = victim.round(X)
        return X, y, {"target": target_class, "rate": rate, "n_poisoned": len(poisoned),
                      "trigger_features": [victim.feature_names[f] for f in features]}
    if kind == "backdoor_subtle":
        # The trigger stays inside the training range: two uninformative features at their
        # training maximum, on 1-3 % of rows.
        varying = [f for f in _informative_features(victim)[::-1] if victim.hi[f] > victim.lo[f]]
        features = np.array(varying[:2])
        target_class = int(rng.choice(victim.classes))
        rate = rng.uniform(0.01, 0.03)
        poisoned = rng.choice(n_rows, size=max(1, round(rate * n_rows)), replace=False)
        X[np.ix_(poisoned, features)] = victim.hi[features]
        y[poisoned] = target_class
        return victim.round(X), y, {
            "target": target_class, "rate": rate, "n_poisoned": len(poisoned),
            "trigger_features": [victim.feature_names[f] for f in features]}
    if kind == "outliers":
        rate = rng.uniform(0.03, 0.05)
        poisoned = rng.choice(n_rows, size=max(1, round(rate * n_rows)), replace=False)
        span = np.where(victim.hi > victim.lo, victim.hi - victim.lo, 1.0)
        for row in poisoned:
            features = rng.choice(victim.n_features, size=int(rng.integers(1, 6)), replace=False)
            side = rng.choice([-1.0, 1.0], size=len(features))
            base = np.where(side > 0, victim.hi[features], victim.lo[features])
            X[row, features] = base + side * rng.uniform(3, 10, size=len(features)) * span[features]
        return victim.round(X), y, {"rate": rate, "n_poisoned": len(poisoned)}
    if kind == "duplicates":
        rate = rng.uniform(0.20, 0.40)
        originals = rng.choice(n_rows, size=int(rng.integers(2, 6)), replace=False)
        others = np.setdiff1d(np.arange(n_rows), originals)
        copies = rng.choice(others, size=round(rate * n_rows), replace=False)
        source = rng.choice(originals, size=len(copies))
        X[copies], y[copies] = X[source], y[source]
        return X, y, {"rate": rate, "n_poisoned": len(copies), "n_originals": len(originals)}
    raise ValueError(f"unknown batch kind {kind!r}; expected one of {BATCH_KINDS}")


@dataclass
class Batch:
    """One training-data batch on the timeline."""

    batch_id: str
    source: str
    ts: float
    kind: str
    X: np.ndarray
    y: np.ndarray
    extra: dict


def poisoned_batches(
    victim: Victim, rng: np.random.Generator, t0: float, duration_s: float,
    kinds: dict[str, int], sources: list[str], warmup_per_source: int,
    n_rows: tuple[int, int] = BATCH_ROWS, flip_rate: tuple[float, float] = (0.10, 0.30),
) -> list[Batch]:
    """A timeline of training batches from several sources, some of them poisoned.

    The first ``warmup_per_source`` batches of every source are clean (a history to
    compare against) and arrive in the first sixth of the timeline; the rest (``kinds``
    minus those warm-up clean batches) are shuffled over the remaining time.

    Returns
    -------
    list of Batch
        In time order; ``batch_id`` is ``<dataset>-<running number>``.
    """
    n_warmup = warmup_per_source * len(sources)
    later = _without([k for k, c in kinds.items() for _ in range(c)], "clean", n_warmup)
    rng.shuffle(later)
    warmup_times = np.sort(rng.uniform(0, duration_s / 6, size=n_warmup))
    later_times = np.sort(rng.uniform(duration_s / 6, duration_s, size=len(later)))
    warmup_sources = [s for s in sources for _ in range(warmup_per_source)]
    rng.shuffle(warmup_sources)
    plan = [("clean", s, t) for s, t in zip(warmup_sources, warmup_times, strict=True)]
    plan += [(k, str(rng.choice(sources)), t) for k, t in zip(later, later_times, strict=True)]
    batches = []
    for number, (kind, source, offset) in enumerate(plan):
        size = int(rng.integers(n_rows[0], n_rows[1] + 1))
        X, y, extra = training_batches(victim, rng, kind, size, flip_rate)
        batch_id = f"{victim.dataset}-{number:04d}"
        batches.append(Batch(batch_id, source, t0 + offset, kind, X, y, extra))
    return batches


def _without(items: list[str], value: str, count: int) -> list[str]:
    """``items`` with the first ``count`` occurrences of ``value`` removed."""
    if items.count(value) < count:
        raise ValueError(f"need at least {count} {value!r} batches for the warm-up")
    out = list(items)
    for _ in range(count):
        out.remove(value)
    return out


def write_batches(
    batches: list[Batch], victim: Victim, out_dir: Path, relative_to: Path
) -> list[dict]:
    """Write each batch as ``<out_dir>/<batch_id>.csv``; return their ground-truth records."""
    records = []
    for batch in batches:
        path = out_dir / f"{batch.batch_id}.csv"
        write_csv(path, victim, batch.X, batch.y)
        records.append({
            "dataset": victim.dataset, "batch_id": batch.batch_id, "source": batch.source,
            "ts": format_ts(batch.ts), "path": str(path.relative_to(relative_to)),
            "kind": batch.kind, "poisoned": batch.kind in POISON_KINDS + SUBTLE_KINDS,
            "subtle": batch.kind in SUBTLE_KINDS, "detail": batch.extra,
        })
    return records


# --------------------------------------------------------------------------- the demo


def demo_scenario(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """The built-in demo: digits victim, ~30 benign clients, three attackers, six batches.

    Writes ``train.csv``, ``inference.jsonl`` (sorted by ``ts``), ``batches/*.csv``,
    ``batches.json`` and ``truth.json`` into ``out_dir``.

    Returns
    -------
    dict
        Name -> path of every file written (``batches`` is the folder).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    victim = load_victim("digits", seed)
    identities = Identities(rng)
    t0, duration = DEFAULT_T0, 1800.0

    behaviours: dict[str, str] = {}
    events = benign_clients(victim, 30, rng, t0, duration, identities, behaviours)
    truth = {cid: client_truth(victim, "benign", None, cid, behaviour=b)
             for cid, b in behaviours.items()}

    attacks = {
        "ext_uniform": ("extraction",
                        lambda rec: uniform_extraction(victim, rec, rng, 600)),
        "ext_jacobian": ("extraction",
                         lambda rec: jacobian_extraction(victim, rec, rng, n_seeds=30, n_rounds=4)),
        "adv_boundary_walk": ("adversarial",
                              lambda rec: boundary_walk_attack(victim, rec, rng,
                                                               victim.X_benign[0])),
    }
    for variant, (family, attack) in attacks.items():
        recorder = QueryRecorder(victim)
        attack(recorder)
        client_id = identities.client_id()
        start = t0 + rng.uniform(0.2, 0.5) * duration
        times = paced_times([len(r) for r, _ in recorder.requests], start, rng)
        events += recorded_events(recorder, [client_id], identities.ip(), times, rng)
        truth[client_id] = client_truth(victim, variant, family, client_id)

    batches = poisoned_batches(
        victim, rng, t0, duration, {"clean": 4, "label_flip": 1, "backdoor": 1},
        sources=["etl-nightly", "vendor-feed"], warmup_per_source=2,
        flip_rate=(0.4, 0.4),  # a clear flip for the demo; the benchmark covers 10-30 %
    )
    batch_records = write_batches(batches, victim, out / "batches", out)

    paths = {name: out / name for name in
             ("train.csv", "inference.jsonl", "batches.json", "truth.json")}
    paths["batches"] = out / "batches"
    write_csv(paths["train.csv"], victim, victim.X_train, victim.y_train)
    write_jsonl(paths["inference.jsonl"], sort_events(events))
    paths["batches.json"].write_text(json.dumps(
        [{k: r[k] for k in ("batch_id", "source", "ts", "path", "kind")} for r in batch_records],
        indent=1))
    paths["truth.json"].write_text(
        json.dumps({"clients": truth, "batches": batch_records}, indent=1))
    return paths
