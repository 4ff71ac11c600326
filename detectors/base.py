"""The interface every detector shares: verdicts, errors and the rate test.

A detector keeps state per key (a client, or a dataset and source), is updated
with a batch of events at a time, scores a batch before it learns from it, and
returns :class:`Verdict` records. State objects are plain numpy containers so
that a streaming table can hold them (see :mod:`detectors.state`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

import numpy as np
from scipy import special

Family = Literal["extraction", "adversarial", "poisoning"]

#: MITRE ATLAS technique ids per rule family (ids are stable; names follow ATLAS 5.x).
ATLAS = {
    "AML.T0024.002": "Extract AI Model",
    "AML.T0043": "Craft Adversarial Data",
    "AML.T0043.001": "Black-Box Optimization",
    "AML.T0043.002": "Black-Box Transfer",
    "AML.T0020": "Poison Training Data",
}


class NotFittedError(RuntimeError):
    """A detector that needs a reference profile was used without one."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """One alert decision.

    ``score`` is always "higher is more suspicious" and is compared with
    ``threshold``; ``trigger`` is the index, within the batch given to the
    detector, of the event that made the rule fire. ``evidence`` holds numbers
    and identifiers only, never raw feature values.
    """

    detector: Family
    rule: str
    key: str
    score: float
    threshold: float
    events_seen: int
    trigger: int
    techniques: tuple[str, ...]
    description: str
    evidence: dict[str, float | int | str] = field(default_factory=dict)


@dataclass(frozen=True)
class Candidate:
    """Where in a batch one rule's condition holds, and how to state its verdict there.

    Rules report every event that satisfies them; :func:`select` then applies
    the family's cooldown in time order, so the alerts of a stream do not depend
    on how it was cut into batches. ``score`` (per event) and ``threshold`` are
    what the rule compares, for ``replay --explain`` and near misses; the mask
    may hold more conditions than that comparison.
    """

    detector: Family
    mask: np.ndarray
    verdict_at: Callable[[int], Verdict]
    rule: str = ""
    score: np.ndarray | None = None
    threshold: float | np.ndarray = float("nan")


def select(candidates: list[Candidate], ts: np.ndarray, last_alert: dict,
           cooldown: float) -> list[Verdict]:
    """One verdict per family per cooldown window: the earliest hit after the last alert.

    ``last_alert`` (family -> event time) is updated in place.
    """
    verdicts = []
    if not candidates or not np.array([c.mask for c in candidates]).any():
        return []  # most batches: no rule holds anywhere (one test, not one per rule)
    hit = [c for c in candidates if c.mask.any()]
    for family in dict.fromkeys(c.detector for c in hit):
        mine = [c for c in hit if c.detector == family]
        after = -1
        while mine:
            last = last_alert.get(family)
            open_from = ts >= last + cooldown if last is not None else np.ones(len(ts), bool)
            open_from &= np.arange(len(ts)) > after  # always forward, even with no cooldown
            firsts = [first_true(c.mask & open_from) for c in mine]
            hits = [(i, n) for n, i in enumerate(firsts) if i >= 0]
            if not hits:
                break
            index, which = min(hits)
            verdicts.append(mine[which].verdict_at(index))
            last_alert[family] = float(ts[index])
            after = index
    return verdicts


def decayed_counts(flags: np.ndarray, k0, decay: float) -> np.ndarray:
    """Exponentially decayed running counts after each row of ``flags``.

    ``flags`` is (events,) or (events, series); ``k0`` the counts before the
    batch. Row ``i`` of the result is the decayed count up to and including
    event ``i``. The decay bounds the memory of a rate test to about
    ``1 / (1 - decay)`` events, so a client's old behaviour neither hides nor
    inflates new behaviour.

    >>> decayed_counts(np.array([1, 1, 0]), 0.0, 0.5).tolist()
    [1.0, 1.5, 0.75]
    """
    flags = np.asarray(flags, dtype=np.float64)
    m = len(flags)
    out = np.empty_like(flags)
    carry = np.asarray(k0, dtype=np.float64)
    # k_i = decay^i * (decay*k0) + sum_j decay^(i-j) f_j, computed without a loop
    # by scaling with decay^-j, in blocks short enough for the scale to stay finite.
    block = _decay_block(decay)
    for start in range(0, m, block):
        stop = min(m, start + block)
        powers, inv = _decay_powers(decay, stop - start)
        if flags.ndim == 2:
            powers, inv = powers[:, None], inv[:, None]
        out[start:stop] = powers * (decay * carry + np.cumsum(flags[start:stop] * inv, axis=0))
        carry = out[stop - 1]
    return out


@lru_cache(maxsize=8)
def _decay_block(decay: float) -> int:
    return max(1, int(200 / max(-np.log10(decay), 1e-9)))


def _decay_powers(decay: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """decay^j and decay^-j for j < n: cached for the short batches a stream brings."""
    if n <= 1024:
        return _cached_powers(decay, n)
    steps = np.arange(n, dtype=np.float64)
    return decay**steps, decay**-steps


@lru_cache(maxsize=256)
def _cached_powers(decay: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    steps = np.arange(n, dtype=np.float64)
    powers, inv = decay**steps, decay**-steps
    powers.flags.writeable = inv.flags.writeable = False  # shared between calls
    return powers, inv


def rate_surprise(k: np.ndarray, n: np.ndarray, p0, min_k: float = 1.0) -> np.ndarray:
    """-log10 of the binomial tail P(X >= k | n, p0): how unlikely a count is.

    Counts are floored (decayed counts are not whole); 0 means "not surprising".
    Only counts of at least ``min_k`` above their expectation are evaluated:
    the tail is costly and the rules never look below that.

    >>> round(float(rate_surprise(np.array([5.0]), np.array([5.0]), 0.01)[0]), 1)
    10.0
    """
    k = np.asarray(k)
    if not k.size or k.max() < max(min_k, 1.0):  # the common case: nothing to evaluate
        return np.zeros(k.shape, dtype=np.float64)
    out = np.zeros(k.shape, dtype=np.float64)
    k_int = np.floor(k)
    n_int = np.maximum(np.floor(n), k_int)
    p0 = np.broadcast_to(np.asarray(p0, dtype=np.float64), out.shape)
    # Tails of 10^-3 or less need z > 3 under the normal approximation, and the
    # binomial tail is heavier, so nothing rules care about is skipped.
    spread = np.sqrt(np.maximum(n_int * p0 * (1 - p0), 1e-12))
    todo = (k_int >= max(min_k, 1.0)) & (k_int - n_int * p0 > 3 * spread)
    if todo.any():
        tail = special.bdtrc((k_int[todo] - 1).astype(np.int64), n_int[todo].astype(np.int64), p0[todo])
        out[todo] = -np.log10(np.clip(tail, 1e-300, 1.0))
    return out


def first_true(mask: np.ndarray) -> int:
    """Index of the first True in ``mask``, or -1."""
    hits = np.flatnonzero(mask)
    return int(hits[0]) if len(hits) else -1
