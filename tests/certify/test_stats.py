"""The bounds behind a certificate, against exact answers (statsmodels, the binomial tail)."""

import math

import pytest
from scipy.stats import binom, binomtest, norm
from statsmodels.stats.proportion import proportion_confint

from peftsmooth.certify.stats import binomial_pvalue, lower_confidence_bound, radius

GRID = [(nA, n, alpha)
        for n in (1, 2, 10, 100, 1000, 100000)
        for nA in sorted({0, 1, n // 2, max(n - 1, 0), n})
        for alpha in (0.001, 0.01, 0.05, 0.25)]


@pytest.mark.parametrize("nA,n,alpha", GRID)
def test_lower_bound_is_exact_clopper_pearson(nA, n, alpha):
    ours = lower_confidence_bound(nA, n, alpha)
    # Cohen's call: the lower end of the two-sided (1 - 2 alpha) interval is the one-sided (1 - alpha) bound.
    reference = proportion_confint(nA, n, alpha=2 * alpha, method="beta")[0]
    reference = 0.0 if nA == 0 else reference
    assert ours == pytest.approx(reference, rel=1e-10, abs=1e-14)


@pytest.mark.parametrize("nA,n,alpha", [g for g in GRID if g[0] > 0])
def test_lower_bound_inverts_the_binomial_tail(nA, n, alpha):
    """pABar is the p at which seeing >= nA successes has probability exactly alpha."""
    pABar = lower_confidence_bound(nA, n, alpha)
    assert binom.sf(nA - 1, n, pABar) == pytest.approx(alpha, rel=1e-6)


def test_lower_bound_edges():
    assert lower_confidence_bound(0, 100, 0.001) == 0.0
    assert lower_confidence_bound(100, 100, 0.001) == pytest.approx(0.001 ** (1 / 100))
    assert 0.5 < lower_confidence_bound(100000, 100000, 0.001) < 1.0
    for bad in [(-1, 10, 0.1), (11, 10, 0.1), (0, 0, 0.1), (5, 10, 0.0), (5, 10, 1.0), (5, 10, -0.5)]:
        with pytest.raises(ValueError):
            lower_confidence_bound(*bad)


@pytest.mark.parametrize("c1,c2", [(0, 0), (10, 0), (60, 40), (500, 500), (9, 1), (1000, 0)])
def test_binomial_pvalue_is_the_two_sided_test(c1, c2):
    expected = 1.0 if c1 + c2 == 0 else binomtest(c1, c1 + c2, 0.5).pvalue
    assert binomial_pvalue(c1, c2) == pytest.approx(expected)
    assert binomial_pvalue(c1, c2) == pytest.approx(binomial_pvalue(c2, c1))


def test_radius_is_sigma_times_gaussian_quantile():
    assert radius(0.5, 0.5) == 0.0
    assert radius(0.25, 0.99) == pytest.approx(0.25 * norm.ppf(0.99))
    assert radius(1.0, 0.3) < 0
    assert math.isinf(radius(1.0, 1.0))


@pytest.mark.parametrize("n", [1000, 10**6, 10**8])
@pytest.mark.parametrize("alpha", [1e-6, 0.001, 0.025])
def test_upper_bound_keeps_its_relative_precision_at_small_disagreement(n, alpha):
    """The one-sided Clopper-Pearson upper bound, computed directly: at nA = 0 it is exactly
    1 - alpha^(1/n) (= -expm1(ln(alpha)/n), full precision), and for small nA it solves
    P(Binomial(n, u) <= nA) = alpha to relative precision (1 - lower(n - nA) keeps only ~1e-16 / u)."""
    import numpy as np

    from peftsmooth.certify.stats import clopper_pearson_upper

    assert clopper_pearson_upper(0, n, alpha) == pytest.approx(-math.expm1(math.log(alpha) / n), rel=1e-13)
    for nA in (1, 3, 10):
        u = clopper_pearson_upper(nA, n, alpha)
        assert binom.cdf(nA, n, u) == pytest.approx(alpha, rel=1e-8)
    many = clopper_pearson_upper(np.array([0, 1, 3, n]), np.array([n] * 4), alpha)
    assert many.tolist() == [clopper_pearson_upper(k, n, alpha) for k in (0, 1, 3)] + [1.0]
    assert clopper_pearson_upper(n, n, alpha) == 1.0
