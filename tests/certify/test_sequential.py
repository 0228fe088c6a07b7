"""Sequential CERTIFY: the bounds at every look, soundness under optional stopping, the stopping rules.

Soundness is checked by simulation where the truth is known: a Bernoulli oracle with pA just above the
threshold Phi(r / sigma) of each grid radius r, and a linear classifier f(x) = [w.x + b > 0], whose
smoothed classifier is the same half-space, so its true radius at x is the margin (w.x + b) / ||w|| and
pA = Phi(margin / sigma). A certificate is false when its radius exceeds the true one. Re-checking a
fixed-n Clopper-Pearson bound after every batch gives false certificates far more often than alpha;
the time-uniform bound stays below alpha (within sampling error). alpha is large (0.1) so that a few
thousand trials resolve it.
"""

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy.stats import beta, norm

from peftsmooth.certify.sequential import (
    CERTIFIED,
    DEFAULT_RADII,
    IMPOSSIBLE,
    OPEN,
    UNREACHABLE,
    LookPlan,
    certify_sequential,
    look_plan,
    run_plan,
    sequential_certificate,
    smooth_certify_sequential,
    stop_rule,
    thresholds,
)
from peftsmooth.certify.smoothing import ESTIMATION, Smooth
from peftsmooth.certify.stats import clopper_pearson_lower, clopper_pearson_upper, lower_confidence_bound

ALPHA, SIGMA, N_MAX = 0.1, 0.5, 4096
GRID = (0.25, 0.5, 0.75, 1.0)
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_sequential.py"


def bernoulli(pa, rng):
    return lambda m: int(rng.binomial(m, pa))


def naive_plan(n_max, alpha, batch):
    """A fixed-n bound at level alpha re-checked after every batch: what rule 6 forbids."""
    looks = tuple(range(batch, n_max + 1, batch))
    return LookPlan(looks, (alpha,) * len(looks), (alpha,) * len(looks))


def false_rate(trials, certify_once):
    false = sum(certify_once() for _ in range(trials))
    return false / trials, math.sqrt(ALPHA * (1 - ALPHA) / trials)


# --- the looks and the bounds ---------------------------------------------------------------------


@pytest.mark.parametrize("stop", ["radii", "radius"])
@pytest.mark.parametrize("n_max", [1, 100, 128, 129, 4096, 100_000])
def test_looks_are_geometric_end_at_n_max_and_split_alpha(stop, n_max):
    plan = look_plan(n_max, 0.001, stop=stop)
    assert plan.looks[-1] == n_max and list(plan.looks) == sorted(set(plan.looks))
    assert sum(plan.alphas) == pytest.approx(0.001) and sum(plan.alphas) <= 0.001 * (1 + 1e-12)
    assert sum(plan.upper_alphas) == pytest.approx(0.01)
    if len(plan.looks) > 1:
        assert plan.alphas[-1] == pytest.approx(0.0005)
        growth = 2.0 if stop == "radius" else 2 ** (1 / 3)
        assert all(b / a == pytest.approx(growth, rel=0.02) for a, b in zip(plan.looks[:-2], plan.looks[1:-1]))
    assert look_plan(100_000, 0.001, stop="radius").looks == (128, 256, 512, 1024, 2048, 4096, 8192, 16384,
                                                                 32768, 65536, 100000)


def test_bounds_at_every_look_are_exact_beta_quantiles():
    plan = look_plan(100_000, 0.001)
    for n, a, u in zip(plan.looks, plan.alphas, plan.upper_alphas):
        hits = np.unique(np.linspace(0, n, 23).astype(int))
        expected_lower = np.where(hits > 0, beta.ppf(a, np.maximum(hits, 1), n - hits + 1), 0.0)
        expected_upper = np.where(hits < n, beta.ppf(1 - u, hits + 1, np.maximum(n - hits, 1)), 1.0)
        np.testing.assert_allclose(clopper_pearson_lower(hits, n, a), expected_lower, rtol=1e-12, atol=1e-300)
        np.testing.assert_allclose(clopper_pearson_upper(hits, n, u), expected_upper, rtol=1e-10, atol=1e-12)
        for h in hits[::5]:  # the scalar path is the same number, and the one fixed-n CERTIFY uses
            assert clopper_pearson_lower(int(h), n, a) == lower_confidence_bound(int(h), n, a)


def test_trace_bounds_are_the_beta_quantiles_of_its_counts():
    result = certify_sequential(bernoulli(0.999, np.random.default_rng(1)), 100_000, 0.001, 0.25, radii=GRID)
    plan = look_plan(100_000, 0.001)
    for look, a, u in zip(result.trace, plan.alphas, plan.upper_alphas):
        assert look.lower == pytest.approx(beta.ppf(a, look.hits, look.n - look.hits + 1), rel=1e-12)
        upper = beta.isf(u, look.hits + 1, look.n - look.hits) if look.hits < look.n else 1.0
        assert look.upper == pytest.approx(upper, rel=1e-10)
    assert result.samples == result.trace[-1].n
    assert result.radius == pytest.approx(0.25 * norm.ppf(result.lower))


# --- soundness under optional stopping ------------------------------------------------------------


@pytest.mark.parametrize("r", GRID)
def test_bernoulli_oracle_sequential_is_sound_naive_is_not(r):
    pa = norm.cdf(r / SIGMA) + 1e-4  # just above the threshold of radius r
    rng = np.random.default_rng(int(100 * r))
    ours, se = false_rate(1000, lambda: certify_sequential(bernoulli(pa, rng), N_MAX, ALPHA, SIGMA,
                                                            radii=GRID).lower > pa)
    naive, _ = false_rate(300, lambda: run_plan(bernoulli(pa, rng), naive_plan(N_MAX, ALPHA, 64), SIGMA,
                                                 stop_rule("radii", GRID)).lower > pa)
    assert ours <= ALPHA + 3 * se
    assert naive > ALPHA + 6 * se


class LinearOracle:
    """f(x) = [w.x + b > 0] in 6 dimensions at a point with the given margin; counts the votes itself."""

    def __init__(self, margin, rng):
        self.w = rng.normal(size=6)
        self.x = rng.normal(size=6)
        self.b = margin * np.linalg.norm(self.w) - self.x @ self.w
        self.rng = rng

    def votes(self, m):
        noisy = self.x + SIGMA * self.rng.standard_normal((m, 6))
        return int(np.count_nonzero(noisy @ self.w + self.b > 0))

    def certify(self, n0=64, plan=None):
        """CERTIFY's selection on its own n0 samples, then the sequential estimate (with `plan`: that plan,
        unchecked); True if false."""
        side = self.votes(n0) * 2 > n0  # True: the positive side, the correct one
        draw = self.votes if side else lambda m: m - self.votes(m)
        if plan is None:
            result = certify_sequential(draw, N_MAX, ALPHA, SIGMA, radii=GRID)
        else:
            result = run_plan(draw, plan, SIGMA, stop_rule("radii", GRID))
        margin = (self.x @ self.w + self.b) / np.linalg.norm(self.w)
        return result.certified and (not side or result.radius > margin)


def test_linear_classifier_has_the_closed_form_pa():
    oracle = LinearOracle(0.5, np.random.default_rng(0))
    assert oracle.votes(200_000) / 200_000 == pytest.approx(norm.cdf(0.5 / SIGMA), abs=0.003)


@pytest.mark.parametrize("r", [0.25, 1.0])
def test_linear_classifier_sequential_is_sound_naive_is_not(r):
    oracle = LinearOracle(r * 1.002, np.random.default_rng(int(10 * r)))
    ours, se = false_rate(800, oracle.certify)
    naive, _ = false_rate(200, lambda: oracle.certify(plan=naive_plan(N_MAX, ALPHA, 64)))
    assert ours <= ALPHA + 3 * se
    assert naive > ALPHA + 6 * se


# --- the stopping rules are what the bounds say ---------------------------------------------------


def expected_decision(look, t, n_max, alpha_final):
    best = beta.ppf(alpha_final, look.hits + n_max - look.n, look.n - look.hits + 1)
    return (CERTIFIED if look.lower >= t else IMPOSSIBLE if look.upper < t
            else UNREACHABLE if best < t else OPEN)


@pytest.mark.parametrize("pa", [1.0, 0.9995, 0.99, 0.95, 0.8, 0.6, 0.5, 0.3])
def test_radii_stops_exactly_when_every_radius_is_decided(pa):
    result = certify_sequential(bernoulli(pa, np.random.default_rng(3)), 100_000, 0.001, 0.25, radii=GRID)
    ts = thresholds(GRID, 0.25)
    for k, look in enumerate(result.trace):
        assert look.decisions == tuple(expected_decision(look, t, 100_000, 0.0005) for t in ts)
        settled = OPEN not in look.decisions or look.upper < 0.5 or look.n == 100_000
        assert settled == (k == len(result.trace) - 1)
    last = result.trace[-1]
    for r, decision in zip(GRID, last.decisions):  # certified at r exactly when the decision says so
        assert (result.certified and result.radius >= r) == (decision == CERTIFIED)
    assert result.reason == ("n_max" if last.n == 100_000 else "abstain" if last.upper < 0.5 else "decided")


def test_all_hits_certify_early_and_unreachable_radii_do_not_cost_samples():
    result = certify_sequential(lambda m: m, 100_000, 0.001, 0.25, radii=GRID)
    assert result.trace[-1].decisions == (CERTIFIED, CERTIFIED, CERTIFIED, UNREACHABLE)
    assert result.samples < 10_000 and 0.75 <= result.radius < 1.0
    assert certify_sequential(lambda m: m, 100_000, 0.001, 0.25, radii=[1.0]).samples == 128


def test_abstains_as_soon_as_the_upper_bound_is_below_one_half():
    result = certify_sequential(lambda m: m // 4, 100_000, 0.001, 0.25, radii=[0.0])
    assert result.reason == "abstain" and result.samples == 128
    assert not result.certified and result.radius == 0.0


@pytest.mark.parametrize("pa", [1.0, 0.999, 0.97, 0.8, 0.55])
def test_radius_rule_stops_when_the_ceiling_is_within_the_loss(pa):
    result = certify_sequential(bernoulli(pa, np.random.default_rng(4)), 100_000, 0.001, 0.25,
                                max_radius_loss=0.04)
    plan = look_plan(100_000, 0.001, stop="radius")
    for k, look in enumerate(result.trace):
        plausible = look.hits + min(100_000 - look.n, math.ceil(look.upper * (100_000 - look.n)))
        ceiling = clopper_pearson_lower(plausible, 100_000, plan.alphas[-1])
        ceiling = 0.25 * norm.ppf(ceiling) if ceiling >= 0.5 else 0.0
        assert look.ceiling == pytest.approx(ceiling, abs=1e-12)
        now = 0.25 * norm.ppf(look.lower) if look.lower >= 0.5 else 0.0
        settled = ceiling - now <= 0.04 or look.upper < 0.5 or look.n == 100_000
        assert settled == (k == len(result.trace) - 1)


def test_draws_land_exactly_on_the_looks():
    asked = []
    result = certify_sequential(lambda m: asked.append(m) or m, 100_000, 0.001, 0.5, radii=GRID)
    assert list(np.cumsum(asked)) == list(look_plan(100_000, 0.001).looks[:len(asked)])
    assert result.samples == sum(asked)


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_max=0), "n_max"), (dict(n_max=-5), "n_max"), (dict(n_max=2.5), "n_max"), (dict(n_max=True), "n_max"),
    (dict(alpha=0.0), "alpha"), (dict(alpha=1.0), "alpha"), (dict(sigma=0.0), "sigma"),
    (dict(radii=[0.25, -0.5]), "radii"), (dict(radii=[float("nan")]), "radii"), (dict(radii=[]), "radii"),
    (dict(radii="0.5"), "radii"), (dict(stop="radius"), "max_radius_loss"), (dict(stop="fast"), "stop"),
    (dict(max_radius_loss=-0.1), "max_radius_loss"), (dict(max_radius_loss=float("inf")), "max_radius_loss"),
])
def test_bad_arguments_are_one_clear_value_error(kwargs, message):
    args = dict(n_max=1000, alpha=0.001, sigma=0.25) | kwargs
    draws = []
    with pytest.raises(ValueError, match=message):
        certify_sequential(lambda m: draws.append(m) or m, args.pop("n_max"), args.pop("alpha"), args.pop("sigma"),
                           **args)
    assert draws == []  # nothing was sampled


def test_a_draw_that_returns_too_many_hits_is_an_error():
    with pytest.raises(ValueError, match="returned"):
        certify_sequential(lambda m: m + 1, 1000, 0.001, 0.25)


def test_stop_rule_defaults():
    assert stop_rule() == stop_rule("radii", DEFAULT_RADII)
    assert stop_rule(max_radius_loss=0.1).stop == "radius"
    assert stop_rule("radii", [0.5, 0.25, 0.5]).radii == (0.25, 0.5)


# --- on a Smooth classifier -----------------------------------------------------------------------


class HalfSpace(nn.Module):
    """Logits (0, w.x + b) on a 1x2x2 image: class 1 on the positive side."""

    def __init__(self, margin):
        super().__init__()
        self.register_buffer("w", torch.tensor([1.0, -1.0, 0.5, 2.0]))
        self.b = margin * float(self.w.norm())

    def forward(self, x):
        s = x.flatten(1) @ self.w + self.b
        return torch.stack([torch.zeros_like(s), s], dim=1)


@pytest.mark.parametrize("margin", [0.6, 0.2])
def test_batch_size_does_not_change_the_answer(margin):
    g, x = Smooth(HalfSpace(margin), 2, 0.5), torch.zeros(1, 2, 2)
    answers = {batch: sequential_certificate(g, x, 50, 5000, 0.001, batch, radii=GRID, seed=7)
               for batch in (7, 128, 1000)}
    first = answers[7]
    assert all(a == first for a in answers.values())
    assert smooth_certify_sequential(g, x, 50, 5000, 0.001, 64, radii=GRID, seed=7) == \
        (first.prediction, first.radius, first.samples)
    assert first.samples == 50 + first.result.samples


def test_estimation_samples_are_those_of_fixed_n_certify():
    g, x = Smooth(HalfSpace(0.3), 2, 0.5), torch.zeros(1, 2, 2)
    cert = sequential_certificate(g, x, 50, 3000, 0.001, 256, max_radius_loss=0.0, seed=11)
    for look in cert.result.trace:  # the first n_j samples of the image's ESTIMATION stream
        assert look.hits == int(g._sample_noise(x, look.n, 300, 11, ESTIMATION)[cert.cAHat])
    if cert.result.samples == 3000:
        fixed = next(g.certify_many([x], [11], 50, 3000, 0.001, 256))
        assert fixed.cAHat == cert.cAHat and fixed.nA == cert.result.trace[-1].hits


def test_sequential_arguments_are_checked_before_sampling():
    class Boom(nn.Module):
        def forward(self, x):
            raise AssertionError("sampled")

    g = Smooth(Boom(), 2, 0.5)
    for kwargs in (dict(radii=[-1.0]), dict(stop="radius"), dict(n_max=0)):
        args = dict(n_max=1000) | kwargs
        with pytest.raises(ValueError):
            smooth_certify_sequential(g, torch.zeros(1, 2, 2), 50, args.pop("n_max"), 0.001, 64, **args)


# --- the replay benchmark -------------------------------------------------------------------------


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_sequential", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_replay_of_a_synthetic_log_meets_the_targets(tmp_path):
    bench = load_bench()
    tsv = tmp_path / "certify.tsv"
    bench.write_rows(tsv, bench.synthetic_rows(500, 0.25, 100_000, 0.001, seed=0))
    summaries = bench.main([str(tsv), "--sigma", "0.25", "--json", str(tmp_path / "replay.json")])
    radii, radius = summaries["sequential stop=radii"], summaries["sequential stop=radius"]
    assert radii["fewer_samples"] >= 8 and radii["worst_gap_points"] <= 1.0
    assert radius["fewer_samples"] >= 3 and radius["acr_change"] >= -0.03
    assert summaries["cohen"]["mean_samples"] == 100_100
    assert (tmp_path / "replay.json").exists()


def test_replay_reads_pa_back_from_the_radius():
    bench = load_bench()
    rows = [{"predict": 1, "radius": 0.25 * norm.ppf(lower_confidence_bound(99_000, 100_000, 0.001)), "correct": 1},
            {"predict": -1, "radius": 0.0, "correct": 0}, {"predict": 3, "radius": 0.978, "correct": 1}]
    assert bench.recover_pa(rows, 0.25, 100_000, 0.001).tolist() == pytest.approx([0.99, 0.5, 1.0], abs=1e-5)


def test_model_outcomes_compare_fixed_and_sequential():
    bench = load_bench()
    g, xs = Smooth(HalfSpace(0.5), 2, 0.5), [torch.zeros(1, 2, 2), torch.full((1, 2, 2), -0.3)]
    fixed = bench.model_outcomes(lambda x, s: (*g.certify(x, 50, 2000, 0.001, 500, seed=s), 2050), xs, [1, 1], [1, 2])
    seq = bench.model_outcomes(lambda x, s: smooth_certify_sequential(g, x, 50, 2000, 0.001, 500, radii=GRID, seed=s),
                               xs, [1, 1], [1, 2])
    table = bench.compare({"cohen": fixed, "sequential": seq})
    assert table["sequential"]["mean_samples"] <= 2050 and "less_time" in table["sequential"]
    assert "sequential" in bench.format_table(table)
