"""The interface every detector shares: verdicts, errors and the rate test.

A detector keeps state per key (a client, or a dataset and source), is updated
with a batch of events at a time, scores a batch before it learns from it, and
returns :class:`Verdict` records. State objects are plain numpy containers so
that a streaming table can hold them (see :mod:`detectors.state`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
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


def decayed_counts(flags: np.ndarray, k0: float, n0: float, decay: float):
    """Exponentially decayed running counts after each element of ``flags``.

    Returns ``(k, n)`` arrays: ``k[i]`` is the decayed number of flagged events
    up to and including event ``i``, ``n[i]`` the decayed number of events. The
    decay bounds the memory of a rate test to about ``1 / (1 - decay)`` events,
    so a client's old behaviour neither hides nor inflates new behaviour.

    >>> k, n = decayed_counts(np.array([1, 1, 0]), 0.0, 0.0, 0.5)
    >>> k.tolist(), n.tolist()
    ([1.0, 1.5, 0.75], [1.0, 1.5, 1.75])
    """
    m = len(flags)
    k = np.empty(m)
    n = np.empty(m)
    # k_i = decay^i * (decay*k0) + sum_j decay^(i-j) f_j, computed without a loop
    # by scaling with decay^-j, in blocks short enough for the scale to stay finite.
    block = max(1, int(200 / max(-np.log10(decay), 1e-9)))
    start = 0
    while start < m:
        stop = min(m, start + block)
        steps = np.arange(stop - start, dtype=np.float64)
        powers, inv = decay**steps, decay**-steps
        k[start:stop] = powers * (decay * k0 + np.cumsum(flags[start:stop] * inv))
        n[start:stop] = powers * (decay * n0 + np.cumsum(inv))
        k0, n0 = k[stop - 1], n[stop - 1]
        start = stop
    return k, n


def rate_surprise(k: np.ndarray, n: np.ndarray, p0: float) -> np.ndarray:
    """-log10 of the binomial tail P(X >= k | n, p0): how unlikely a count is.

    Counts are floored (decayed counts are not whole); 0 means "not surprising".

    >>> round(float(rate_surprise(np.array([5.0]), np.array([5.0]), 0.01)[0]), 1)
    10.0
    """
    k_int = np.floor(k)
    n_int = np.maximum(np.floor(n), k_int)
    with np.errstate(divide="ignore"):
        tail = np.where(k_int >= 1, special.bdtrc(k_int - 1, n_int, p0), 1.0)
        return -np.log10(np.clip(tail, 1e-300, 1.0))


def first_true(mask: np.ndarray) -> int:
    """Index of the first True in ``mask``, or -1."""
    hits = np.flatnonzero(mask)
    return int(hits[0]) if len(hits) else -1
