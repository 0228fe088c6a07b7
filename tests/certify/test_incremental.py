"""Incremental certification's statistics against exact answers: two half-space classifiers whose pA
and disagreement are known in closed form (bivariate normal), the bounds, the routing rule."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy.stats import binom, multivariate_normal, norm

from peftsmooth.certify import incremental as inc
from peftsmooth.certify.noise import image_seed
from peftsmooth.certify.pool import run_pool
from peftsmooth.certify.sequential import LookPlan, look_plan, thresholds
from peftsmooth.certify.smoothing import Smooth
from peftsmooth.certify.stats import clopper_pearson_lower, clopper_pearson_upper

SIGMA = 1.0


class HalfSpace(nn.Module):
    """Class 1 where w . z + b > 0, else class 0."""

    def __init__(self, w, b):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=torch.float32), requires_grad=False)
        self.b = float(b)

    def forward(self, z):
        score = z @ self.w + self.b
        return torch.stack([torch.zeros_like(score), score], dim=1)


def margin(w, b, x):
    """(w . x + b) / (sigma |w|): the standardized signed distance of x to the half-space's boundary."""
    w = np.asarray(w, dtype=float)
    return (w @ x + b) / (SIGMA * np.linalg.norm(w))


def exact(w1, b1, w2, b2, x):
    """P(f(x+e) = 1), P(f'(x+e) = 1) and P(f(x+e) != f'(x+e)), e ~ N(0, sigma^2 I), in closed form
    (parallel half-spaces: P(both) = Phi(min margin), the bivariate normal being degenerate)."""
    a1, a2 = margin(w1, b1, x), margin(w2, b2, x)
    rho = float(np.dot(w1, w2) / (np.linalg.norm(w1) * np.linalg.norm(w2)))
    if rho > 1 - 1e-12:
        both = norm.cdf(min(a1, a2))
    else:
        both = multivariate_normal(mean=[0, 0], cov=[[1, rho], [rho, 1]]).cdf([a1, a2])
    return norm.cdf(a1), norm.cdf(a2), norm.cdf(a1) + norm.cdf(a2) - 2 * both


# Nested half-spaces, the worst case of the statement: f' = 1 only where f = 1 (f' leaves class 1 exactly
# where the two disagree), so P(f' = cA) = pA - zeta with no slack to hide a failing bound.
W1, B1 = [1.0, 0.0], 0.0
W2, B2 = W1, -0.065  # the boundary moved by 0.065 sigma: ~1.4 % disagreement
X = np.array([1.1, 0.2])  # pA = Phi(1.1) = 0.864


def _parent_certificates(trials, n0, n, alpha_1):
    g = Smooth(HalfSpace(W1, B1), 2, SIGMA)
    x = torch.tensor(X, dtype=torch.float32)
    jobs = ((t, g.certify_job(x, 1000 + t, n0, n, alpha_1)) for t in range(trials))
    return {done.key: done.result for done in run_pool(g, jobs, 4096)}


def _disagreement_tests(parents, plan, radii, batch_size=4096):
    g_pair = Smooth(inc.DisagreementClassifier(HalfSpace(W1, B1), HalfSpace(W2, B2)), 2, SIGMA)
    x = torch.tensor(X, dtype=torch.float32)
    jobs = ((t, inc.disagreement_job(g_pair, x, 1000 + t, plan, c.pABar, radii))
            for t, c in parents.items() if c.prediction != Smooth.ABSTAIN)
    return {done.key: done.result for done in run_pool(g_pair, jobs, batch_size)}, g_pair


def test_the_pair_classifier_measures_the_closed_form_disagreement():
    pA, pA_variant, zeta = exact(W1, B1, W2, B2, X)
    assert pA_variant == pytest.approx(pA - zeta, abs=1e-15)  # nested: the statement's bound is attained
    g_pair = Smooth(inc.DisagreementClassifier(HalfSpace(W1, B1), HalfSpace(W2, B2)), 2, SIGMA)
    counts = g_pair._sample_noise(torch.tensor(X, dtype=torch.float32), 200_000, 8192, 7, "disagreement")
    measured = counts[1] / 200_000
    assert abs(measured - zeta) < 4 * math.sqrt(zeta * (1 - zeta) / 200_000)
    assert 0.01 < zeta < 0.03


def test_false_certificates_stay_below_alpha_total_in_1000_trials():
    """alpha_total = 0.05 = alpha_1 + alpha_2: a certificate is false when its bound exceeds the exact
    P(f'(x+e) = cA), which for the nested pair is pA - zeta (no slack). Thresholds near the truth make the
    bounds bite; the union bound is loose here (a false certificate needs both deviations to add up), so
    the tests above check the zeta part alone, exactly and with a broken control."""
    trials, alpha_1, alpha_2 = 1000, 0.025, 0.025
    pA, pA_variant, zeta = exact(W1, B1, W2, B2, X)
    parents = _parent_certificates(trials, 16, 400, alpha_1)
    plan = inc.disagreement_plan(2048, alpha_2)
    radii = tuple(np.round(np.arange(0.05, 1.2, 0.05), 3))
    tests, _ = _disagreement_tests(parents, plan, radii)
    assert len(tests) > 0.95 * trials
    false = 0
    for t, result in tests.items():
        truth = pA_variant if parents[t].cAHat == 1 else 1 - pA_variant
        false += result.certified and result.lower > truth
        assert result.lower == pytest.approx(parents[t].pABar - result.zeta_upper)
    assert false / trials <= alpha_1 + alpha_2
    certified = [r for r in tests.values() if r.certified]
    assert len(certified) > 0.9 * len(tests), "the test should certify most images (pA' = %.3f)" % pA_variant
    measured = sum(r.disagreements for r in tests.values()) / sum(r.samples for r in tests.values())
    assert abs(measured - zeta) < 0.01


def _stops(plan, p_lower, targets, j, found):
    """disagreement_steps' rule at look j with `found` disagreements: (stops here, the bound it reports)."""
    zeta_upper = clopper_pearson_upper(found, plan.looks[j], plan.alphas[j])
    decisions = inc._decisions(found, j, plan, p_lower, zeta_upper, targets)
    return plan.looks[j] == plan.looks[-1] or inc.OPEN not in decisions, p_lower - zeta_upper


def _exact_false_rate(plan, p_lower, zeta, radii):
    """P(the test certifies a bound above pA - zeta) for an oracle parent (p_lower = pA exactly, so only
    zeta's bound can fail): the exact distribution of the disagreement count over the looks."""
    targets = thresholds(inc.decision_radii(p_lower, SIGMA, radii), SIGMA)
    top = int(zeta * plan.looks[-1] + 12 * math.sqrt(zeta * plan.looks[-1] + 1) + 30)  # mass beyond: < 1e-15
    alive, drawn, false = np.eye(1, top + 1)[0], 0, 0.0
    for j, n in enumerate(plan.looks):
        alive = np.convolve(alive, binom.pmf(np.arange(min(n - drawn, top) + 1), n - drawn, zeta))[: top + 1]
        drawn = n
        for found in np.flatnonzero(alive > 0):
            stop, lower = _stops(plan, p_lower, targets, j, int(found))
            if stop:
                false += alive[found] * (lower >= 0.5 and lower > p_lower - zeta)
                alive[found] = 0.0
    return false


def _full_alpha_each_look(plan):
    """A broken plan: all of alpha_2 at every look (a fixed-n bound reused at each look)."""
    return LookPlan(plan.looks, (sum(plan.alphas),) * len(plan.looks), plan.upper_alphas)


RADII = tuple(np.round(np.arange(0.05, 3.0, 0.05), 3))


def test_the_dp_follows_the_disagreement_test_look_by_look():
    rng = np.random.default_rng(1)
    plan = inc.disagreement_plan(4096, 0.05)
    for p_lower, zeta in ((0.7, 0.01), (0.9, 0.05), (0.95, 0.01)):
        targets = thresholds(inc.decision_radii(p_lower, SIGMA, RADII), SIGMA)
        for _ in range(20):
            steps, found, j = inc.disagreement_steps(plan, p_lower, SIGMA, RADII), 0, 0
            m = next(steps)
            while True:
                got = int(rng.binomial(m, zeta))
                found += got
                stop, lower = _stops(plan, p_lower, targets, j, found)
                try:
                    m = steps.send(got)
                    assert not stop
                    j += 1
                except StopIteration as done:
                    assert stop and done.value.lower == lower and done.value.samples == plan.looks[j]
                    break


def test_worst_case_false_certificates_exactly_within_alpha_2_and_a_broken_split_exceeds_it():
    """Oracle parent, nested half-spaces (P(f' = cA) = pA - zeta exactly), alpha_2 = 0.05: the exact
    false-certificate rate of the test stays below alpha_2 everywhere on the grid and comes close to its
    final look's share (the margin is used, not hidden); full alpha_2 at every look exceeds alpha_2."""
    alpha_2, worst, broken = 0.05, 0.0, 0.0
    for n_max in (1024, 4096):
        plan = inc.disagreement_plan(n_max, alpha_2)
        for p_lower, zeta in ((0.7, 0.01), (0.8, 0.02), (0.9, 0.05), (0.95, 0.01)):
            worst = max(worst, _exact_false_rate(plan, p_lower, zeta, RADII))
            broken = max(broken, _exact_false_rate(_full_alpha_each_look(plan), p_lower, zeta, RADII))
    assert 0.5 * plan.alphas[-1] < worst <= alpha_2
    assert broken > alpha_2


def test_the_pipeline_at_the_worst_case_matches_the_exact_rate_and_the_broken_split_fails():
    """Through Smooth, the pool and the pair classifier on nested half-spaces (pA = 0.7, zeta = 1 %),
    oracle parent: the seeded false-certificate rate sits near the exact one, below alpha_2 = 0.05, and the
    same runs with full alpha_2 at every look go above alpha_2."""
    a = norm.ppf(0.7)
    delta = a - norm.ppf(0.69)
    plan, trials = inc.disagreement_plan(4096, 0.05), 1000
    g_pair = Smooth(inc.DisagreementClassifier(HalfSpace(W1, a), HalfSpace(W1, a - delta)), 2, SIGMA)
    x, rates = torch.zeros(2), []
    for tried in (plan, _full_alpha_each_look(plan)):
        jobs = ((t, inc.disagreement_job(g_pair, x, 5000 + t, tried, 0.7, RADII)) for t in range(trials))
        tests = [done.result for done in run_pool(g_pair, jobs, 8192)]
        rates.append(sum(r.certified and r.lower > 0.69 for r in tests) / trials)
        assert abs(rates[-1] - _exact_false_rate(tried, 0.7, 0.01, RADII)) < 4 * math.sqrt(0.07 / trials)
    assert rates[0] <= 0.05 < rates[1]


def test_a_fixed_n_bound_rechecked_at_every_look_is_what_the_split_prevents():
    """The control: with all of alpha_2 at every look, the bound at the stopping look fails more often
    than alpha_2 for a disagreement just above the threshold (why looks and their split are fixed)."""
    rng = np.random.default_rng(0)
    looks = look_plan(4096, 0.05).looks
    zeta, trials = 0.02, 4000
    naive = split = 0
    plan = look_plan(4096, 0.05)
    for _ in range(trials):
        hits = np.cumsum(rng.random(looks[-1]) < zeta)
        d = [int(hits[n - 1]) for n in looks]
        naive += any(1 - clopper_pearson_lower(n - k, n, 0.05) < zeta for n, k in zip(looks, d))
        split += any(1 - clopper_pearson_lower(n - k, n, a) < zeta for n, k, a in zip(looks, d, plan.alphas))
    assert naive / trials > 0.05 >= split / trials


def test_rows_do_not_depend_on_batch_size():
    parents = _parent_certificates(12, 16, 400, 0.025)
    plan = inc.disagreement_plan(2048, 0.025)
    a, _ = _disagreement_tests(parents, plan, (0.25, 0.5, 1.0), batch_size=4096)
    b, _ = _disagreement_tests(parents, plan, (0.25, 0.5, 1.0), batch_size=37)
    assert a == b


def test_an_identical_variant_has_zero_disagreements():
    g_pair = Smooth(inc.DisagreementClassifier(HalfSpace(W1, B1), HalfSpace(W1, B1)), 2, SIGMA)
    plan = inc.disagreement_plan(2048, 0.001)
    job = inc.disagreement_job(g_pair, torch.tensor(X, dtype=torch.float32), 3, plan, 0.8, (0.25, 0.5))
    result = next(run_pool(g_pair, [(0, job)], 256)).result
    assert result.disagreements == 0 and result.certified
    n = result.samples
    assert result.zeta_upper == pytest.approx(1 - plan.alphas[plan.looks.index(n)] ** (1 / n))
    assert result.lower >= norm.cdf(0.5)  # stopped once the parent's largest grid radius (0.5) held


def test_stops_as_soon_as_the_parents_largest_radius_is_certified():
    plan = inc.disagreement_plan(100_000, 0.001)
    steps = inc.disagreement_steps(plan, 0.99, 0.5, (0.25, 0.5, 0.75, 1.0))
    m, drawn = next(steps), 0
    try:
        while True:
            drawn += m
            m = steps.send(0)
    except StopIteration as stop:
        result = stop.value
    t = norm.cdf(1.0 / 0.5)
    assert result.reason == "decided" and result.lower >= t
    earlier = plan.looks[plan.looks.index(drawn) - 1]
    assert 0.99 - (1 - plan.alphas[0] ** (1 / earlier)) < t  # the look before could not certify it


@pytest.mark.parametrize("text", ["0.868", "0.87", "1.23e-05", "0.456789", "2.0", "0.0"])
def test_recovered_lower_never_exceeds_the_bound_behind_a_printed_radius(text):
    sigma = 0.5
    value = float(text)
    decimals = {"0.868": 3, "0.87": 2, "1.23e-05": 7, "0.456789": 6, "2.0": 1, "0.0": 1}[text]
    true_low = max(value - 0.5 * 10 ** -decimals, 0)
    recovered = inc.recovered_lower(text, sigma)
    assert recovered <= max(norm.cdf(true_low / sigma), 0.5)
    assert recovered >= 0.5
    assert sigma * norm.ppf(recovered) <= value


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "NaN"])
def test_recovered_lower_refuses_a_radius_that_is_not_a_finite_number(text):
    with pytest.raises(ValueError, match="not a finite number"):
        inc.recovered_lower(text, 0.5)


def _rule(fallback="sequential"):
    return inc.RouteRule(sigma=0.25, radii=(0.25, 0.5, 0.75, 1.0), n0=100,
                         sequential_plan=look_plan(100_000, 0.002), disagreement_plan=inc.disagreement_plan(100_000, 0.001),
                         expected_disagreement=0.001, fallback=fallback)


def test_routing_prefers_the_direct_route_near_pA_one_and_the_test_at_moderate_pA():
    rule = _rule()
    assert inc.choose_route(False, 0.3, rule) == inc.ROUTE_PARENT
    assert inc.choose_route(True, 0.99990, rule) == inc.ROUTE_SEQUENTIAL  # 0.75 needs Phi(3): no margin left
    assert inc.choose_route(True, 0.95, rule) == inc.ROUTE_DISAGREEMENT
    assert inc.choose_route(True, 0.99990, _rule("none")) == inc.ROUTE_DISAGREEMENT
    direct, test = inc.route_costs(0.99990, rule)
    assert direct < test


def test_the_routed_procedure_keeps_false_certificates_below_alpha_total():
    """The whole procedure on a Bernoulli oracle: the parent re-certified per trial, the route chosen
    from its row, then the disagreement test or sequential CERTIFY of f' on fresh votes. pA' = pA - zeta
    (every disagreement on a hit), thresholds around pA' so that both routes and their bounds bite."""
    from peftsmooth.certify.sequential import run_plan, run_steps, stop_rule

    rng = np.random.default_rng(1)
    trials, n, alpha_1, alpha_total, sigma = 2000, 2000, 0.025, 0.05, 0.5
    pA, zeta = 0.975, 0.012
    pA_variant = pA - zeta
    radii = (0.25, 0.5, 0.75, 1.0, 0.9, 0.95)
    rule = inc.RouteRule(sigma, radii, 16, look_plan(n, alpha_total), inc.disagreement_plan(n, alpha_total - alpha_1),
                         0.01, "sequential")
    false, routes = 0, {k: 0 for k in inc.ROUTES}
    for _ in range(trials):
        p_lower = clopper_pearson_lower(int(rng.binomial(n, pA)), n, alpha_1)
        route = inc.choose_route(p_lower >= 0.5, p_lower, rule)
        routes[route] += 1
        if route == inc.ROUTE_SEQUENTIAL:
            result = run_plan(lambda m: int(rng.binomial(m, pA_variant)), rule.sequential_plan, sigma,
                              stop_rule("radii", list(radii)))
        else:
            result = run_steps(inc.disagreement_steps(rule.disagreement_plan, p_lower, sigma, radii),
                               lambda m: int(rng.binomial(m, zeta)))
        false += result.certified and result.lower > pA_variant
    assert routes[inc.ROUTE_SEQUENTIAL] > 0 and routes[inc.ROUTE_DISAGREEMENT] > 0, routes
    assert false / trials <= alpha_total


class _Precision(nn.Module):
    """Class 0 when it ran in fp32, class 1 under a reduced-precision autocast."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2)

    def forward(self, x):
        reduced = self.linear(x).dtype != torch.float32
        return torch.tensor([[0.0, 1.0] if reduced else [1.0, 0.0]]).expand(len(x), 2)


@pytest.mark.parametrize("parent, variant, differ", [("fp32", "bf16", 1), ("bf16", "bf16", 0), ("fp32", "fp32", 0)])
def test_pair_runs_each_member_at_its_own_precision_whatever_surrounds_it(parent, variant, differ):
    pair = inc.DisagreementClassifier(_Precision(), _Precision(), parent_precision=parent, variant_precision=variant)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):  # as a Smooth at bf16 would run it
        out = pair(torch.zeros(3, 2))
    assert out[:, 1].tolist() == [float(differ)] * 3


def test_changed_route_constants_reuse_the_same_samples_a_new_seed_draws_new_ones():
    """Why changing expected_disagreement, fallback or the alpha split after a result needs a new seed=
    (docs: rule 9, library.md): the zeta samples depend on seed= and the image only, not on those constants."""
    g_pair = Smooth(inc.DisagreementClassifier(HalfSpace(W1, B1), HalfSpace(W2, B2)), 2, SIGMA)
    x = torch.tensor(X, dtype=torch.float32)

    def first_draw(seed, alpha_2):
        request = next(inc.disagreement_job(g_pair, x, image_seed(seed, 3), inc.disagreement_plan(4096, alpha_2),
                                            0.8, RADII))
        return request.stream.take(64)

    assert torch.equal(first_draw(0, 0.01), first_draw(0, 0.04))
    assert not torch.equal(first_draw(0, 0.01), first_draw(1, 0.01))
