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
