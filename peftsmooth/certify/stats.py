"""The three numbers behind a randomized-smoothing certificate (Cohen et al. 2019; validity rules 2-4 in
docs/architecture.md).

- `lower_confidence_bound(nA, n, alpha)`: the one-sided (1 - alpha) Clopper-Pearson lower bound on pA
  from nA successes out of n, i.e. the alpha quantile of Beta(nA, n - nA + 1), and 0 when nA = 0.
  (Cohen's code calls `proportion_confint(nA, n, alpha=2*alpha, method="beta")[0]`: the same number.)
- `binomial_pvalue(c1, c2)`: the two-sided binomial test of c1 out of c1 + c2 at p = 1/2 (PREDICT).
- `radius(sigma, pABar)`: sigma * Phi^-1(pABar), the certified L2 radius.
- `clopper_pearson_lower` / `clopper_pearson_upper`: both one-sided Clopper-Pearson bounds, elementwise
  on arrays (the lower one is the number `lower_confidence_bound` gives), for the many bounds a
  sequential certification computes.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import betainccinv, betaincinv
from scipy.stats import beta, binomtest, norm

ABSTAIN = -1  # the prediction of an abstention (Cohen's Smooth.ABSTAIN)


def lower_confidence_bound(nA: int, n: int, alpha: float) -> float:
    """P(pA >= returned value) >= 1 - alpha over the draw of nA ~ Binomial(n, pA)."""
    nA, n = int(nA), int(n)
    if not 0 <= nA <= n or n < 1:
        raise ValueError(f"need 0 <= nA <= n and n >= 1, got nA={nA}, n={n}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    if nA == 0:
        return 0.0
    return float(beta.ppf(alpha, nA, n - nA + 1))


def binomial_pvalue(c1: int, c2: int) -> float:
    """Two-sided p-value of 'c1 out of c1 + c2 at p = 1/2'; 1.0 when there are no counts at all."""
    c1, c2 = int(c1), int(c2)
    if c1 + c2 == 0:
        return 1.0
    return float(binomtest(c1, c1 + c2, p=0.5).pvalue)


def radius(sigma: float, pABar: float) -> float:
    """The certified L2 radius sigma * Phi^-1(pABar); only meaningful for pABar > 1/2."""
    if pABar >= 1.0:
        return math.inf
    return float(sigma * norm.ppf(pABar))


_INTEGERS = (int, np.integer)


def clopper_pearson_lower(nA, n, alpha):
    """The alpha quantile of Beta(nA, n - nA + 1), 0 where nA = 0; arrays broadcast, scalars give a float."""
    if isinstance(nA, _INTEGERS) and isinstance(n, _INTEGERS):  # the common case, without array overhead
        nA, n = int(nA), int(n)
        if not 0 <= nA <= n or n < 1:
            raise ValueError(f"need 0 <= nA <= n and n >= 1, got nA={nA}, n={n}")
        return float(betaincinv(nA, n - nA + 1, alpha)) if nA > 0 else 0.0
    nA, n = np.asarray(nA), np.asarray(n)
    if np.any(nA < 0) or np.any(nA > n) or np.any(n < 1):
        raise ValueError(f"need 0 <= nA <= n and n >= 1, got nA={nA}, n={n}")
    return np.where(nA > 0, betaincinv(np.maximum(nA, 1), n - nA + 1, alpha), 0.0)


def clopper_pearson_upper(nA, n, alpha):
    """The 1 - alpha quantile of Beta(nA + 1, n - nA), 1 where nA = n: P(pA <= bound) >= 1 - alpha.

    Computed directly as the inverse of the upper tail (betainccinv, beta.isf's form), not as
    1 - lower(n - nA): that subtraction loses the relative precision of a small bound (a disagreement
    of 1e-6 kept ~10 digits) and could round it down."""
    if isinstance(nA, _INTEGERS) and isinstance(n, _INTEGERS):
        nA, n = int(nA), int(n)
        if not 0 <= nA <= n or n < 1:
            raise ValueError(f"need 0 <= nA <= n and n >= 1, got nA={nA}, n={n}")
        return float(betainccinv(nA + 1, n - nA, alpha)) if nA < n else 1.0
    nA, n = np.asarray(nA), np.asarray(n)
    if np.any(nA < 0) or np.any(nA > n) or np.any(n < 1):
        raise ValueError(f"need 0 <= nA <= n and n >= 1, got nA={nA}, n={n}")
    return np.where(nA < n, betainccinv(nA + 1, np.maximum(n - nA, 1), alpha), 1.0)
