"""Shapiro-Wilk W with cached coefficients (Royston 1992, as in scipy's swilk).

PRADA tests a client's distance distribution every few queries; scipy's
``shapiro`` spends ~150 µs per call, most of it rebuilding coefficients that
depend only on the sample size. Here they are computed once per size.

>>> import numpy as np
>>> from scipy import stats
>>> x = np.random.default_rng(1).gamma(2.0, size=300)
>>> bool(abs(shapiro_w(x) - stats.shapiro(x).statistic) < 1e-4)
True
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy.special import ndtri


@lru_cache(maxsize=2048)
def _coefficients(n: int) -> np.ndarray:
    if n == 3:
        return np.array([-np.sqrt(0.5), 0.0, np.sqrt(0.5)])
    m = ndtri((np.arange(1, n + 1) - 0.375) / (n + 0.25))
    ssq = float(m @ m)
    u = 1.0 / np.sqrt(n)
    c = m / np.sqrt(ssq)
    a = np.empty(n)
    an = c[-1] + 0.221157 * u - 0.147981 * u**2 - 2.071190 * u**3 + 4.434685 * u**4 - 2.706056 * u**5
    if n > 5:
        an1 = c[-2] + 0.042981 * u - 0.293762 * u**2 - 1.752461 * u**3 + 5.682633 * u**4 - 3.582633 * u**5
        phi = (ssq - 2 * m[-1] ** 2 - 2 * m[-2] ** 2) / (1 - 2 * an**2 - 2 * an1**2)
        a[:] = m / np.sqrt(phi)
        a[-1], a[-2], a[0], a[1] = an, an1, -an, -an1
    else:
        phi = (ssq - 2 * m[-1] ** 2) / (1 - 2 * an**2)
        a[:] = m / np.sqrt(phi)
        a[-1], a[0] = an, -an
    return a


def shapiro_w(x: np.ndarray) -> float:
    """The Shapiro-Wilk W statistic of a sample of at least 3 values (1.0 if constant)."""
    x = np.sort(np.asarray(x, dtype=np.float64))
    n = len(x)
    ss = float(((x - x.mean()) ** 2).sum())
    if n < 3 or ss <= 0:
        return 1.0
    w = float(_coefficients(n) @ x) ** 2 / ss
    return min(w, 1.0)


def shapiro_w_windows(series: np.ndarray, ends: np.ndarray, window: int) -> np.ndarray:
    """W of ``series[end - window:end]`` for each end, values beyond 3σ dropped first.

    Windows are sorted together; those left with the same number of values
    after trimming share one coefficient vector and one matrix product.

    >>> x = np.random.default_rng(2).normal(size=400)
    >>> w = shapiro_w_windows(x, np.array([150, 400]), 300)
    >>> bool(abs(w[1] - shapiro_w(x[100:400])) < 1e-9)
    True
    """
    out = np.empty(len(ends))
    full = np.flatnonzero(ends >= window)
    if len(full):
        views = np.lib.stride_tricks.sliding_window_view(series, window)[ends[full] - window]
        mu = views.mean(1, keepdims=True)
        sd = views.std(1, keepdims=True)
        trimmed = np.where(np.abs(views - mu) <= 3 * sd, views, np.nan)
        ordered = np.sort(trimmed, axis=1)  # NaNs last
        kept = window - np.isnan(ordered).sum(1)
        for n in np.unique(kept):
            rows = np.flatnonzero(kept == n)
            block = ordered[rows, :n]
            ss = ((block - block.mean(1, keepdims=True)) ** 2).sum(1)
            if n < 3:
                out[full[rows]] = 1.0
                continue
            w = (block @ _coefficients(int(n))) ** 2 / np.where(ss > 0, ss, 1.0)
            out[full[rows]] = np.where(ss > 0, np.minimum(w, 1.0), 1.0)
    for i in np.flatnonzero(ends < window):
        sample = series[:ends[i]]
        mu, sd = sample.mean(), sample.std()
        out[i] = shapiro_w(sample[np.abs(sample - mu) <= 3 * sd] if sd > 0 else sample)
    return out
