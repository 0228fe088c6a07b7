"""Incremental certification: certify a changed classifier f' from the certificate of its parent f.

Ugare, Xie, Misailovic & Singh (ICLR 2024, "Incremental Randomized Smoothing Certification"): take the
parent's top class cA and its lower bound pA_lower on pA = P(f(x + e) = cA), valid at alpha_1, and an
upper bound zeta_upper on the disagreement zeta = P(f(x + e) != f'(x + e)), valid at alpha_2. Since
f'(x + e) = cA whenever f(x + e) = cA and the two agree,

    P(f'(x + e) = cA) >= pA - zeta >= pA_lower - zeta_upper   with probability >= 1 - alpha_1 - alpha_2,

so f' is certified at R' = sigma * Phi^-1(pA_lower - zeta_upper) (when that bound is >= 1/2). A bound
on a near-zero proportion needs few samples: with no disagreement in m samples, zeta_upper is about
ln(1/alpha_2) / m.

Procedure (validity rule 9 in docs/architecture.md)
---------------------------------------------------
- alpha_total = certify.alpha; alpha_1 = the parent's alpha; alpha_2 = alpha_total - alpha_1 (> 0).
- Routing, before any sample of f' is drawn, from the parent's row, sigma, the radii, alpha and n_max
  only (`choose_route`): a parent row that certifies nothing is kept (ROUTE_PARENT: no certificate); a
  certified one goes to the cheaper of ordinary sequential CERTIFY of f' at alpha_total
  (ROUTE_SEQUENTIAL, certify.fallback=sequential) and the disagreement test (ROUTE_DISAGREEMENT), by the
  expected cost of each route (`route_costs`). certify.fallback=none sends every certified row to the
  disagreement test.
- The disagreement test: zeta samples evaluate f and f' on the same noisy input, drawn from the
  DISAGREEMENT noise phase of an image seed that no parent certificate used. Looks and the split of
  alpha_2 over them are fixed before sampling (`sequential.look_plan(n_max, alpha_2)`: geometric from
  128, half of alpha_2 at n_max). At look j, with d_j disagreements among n_j samples, zeta_upper_j is
  the (1 - alpha_2,j) Clopper-Pearson upper bound; P(zeta > zeta_upper_j for some j) <= alpha_2.
- Stopping (only ever changes which look J is reported): each radius r of the grid that the parent
  certified (threshold t = Phi(r / sigma) <= pA_lower) is certified (pA_lower - zeta_upper_j >= t),
  impossible (pA_lower - a plausible lower bound on zeta < t; an error there only loses a
  certificate), or unreachable (no remaining look could clear t even with no more disagreements).
  Sampling stops once none is open: at once when the parent's largest certified grid radius is
  certified. The answer is cA with R' = sigma * Phi^-1(pA_lower - zeta_upper_J), or abstain.

Guarantee: a false certificate needs pA < pA_lower (probability <= alpha_1 over the parent's noise) or
zeta > zeta_upper_J (<= alpha_2 over the fresh disagreement noise, whatever the stopping look), so the
row holds at alpha_1 + alpha_2 = alpha_total; a routed row is an ordinary sequential certificate at
alpha_total on noise independent of the parent's. The route depends on the parent's row only.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Generator, Sequence

import numpy as np
import torch
import torch.nn as nn

from peftsmooth.certify.noise import DISAGREEMENT
from peftsmooth.certify.pool import Job, Request
from peftsmooth.certify.sequential import (
    CERTIFIED,
    IMPOSSIBLE,
    OPEN,
    UNREACHABLE,
    LookPlan,
    look_plan,
    thresholds,
)
from peftsmooth.certify.stats import ABSTAIN, clopper_pearson_lower, clopper_pearson_upper, radius
from peftsmooth.runtime import PRECISIONS, hash_seed

ROUTE_PARENT, ROUTE_DISAGREEMENT, ROUTE_SEQUENTIAL = "parent", "disagreement", "sequential"
ROUTES = (ROUTE_PARENT, ROUTE_DISAGREEMENT, ROUTE_SEQUENTIAL)
FALLBACKS = ("sequential", "none")  # certify.fallback: the route an image may take instead of the test


# --- the disagreement test ----------------------------------------------------------------------

@dataclass(frozen=True)
class DisagreementResult:
    """The disagreement test of one image: the bound on pA' it gives, and how it was reached."""

    certified: bool
    radius: float
    lower: float  # pA_lower - zeta_upper at the stopping look (the bound behind the radius)
    zeta_upper: float
    samples: int  # zeta samples drawn (each evaluates both models)
    disagreements: int
    reason: str  # "decided", "n_max"


def disagreement_plan(n_max: int, alpha_2: float) -> LookPlan:
    """Looks and alpha_2's split over them, fixed before sampling (those of sequential CERTIFY)."""
    return look_plan(n_max, alpha_2, stop="radii")


def decision_radii(p_lower: float, sigma: float, radii: Sequence[float]) -> tuple[float, ...]:
    """0 and the radii of the grid that the parent's bound certifies (threshold Phi(r/sigma) <= p_lower)."""
    grid = tuple(sorted({0.0, *(float(r) for r in radii)}))
    return tuple(r for r, t in zip(grid, thresholds(grid, float(sigma))) if t <= p_lower)


def disagreement_steps(plan: LookPlan, p_lower: float, sigma: float,
                       radii: Sequence[float]) -> Generator[int, int, DisagreementResult]:
    """The test as a generator: yields how many zeta samples to draw up to the next look, is sent how
    many of them disagree, returns the result once no decision radius is open (or at n_max)."""
    targets = thresholds(decision_radii(p_lower, sigma, radii), float(sigma))
    found, drawn, reason = 0, 0, "n_max"
    for j, n in enumerate(plan.looks):
        got = int((yield n - drawn))
        if not 0 <= got <= n - drawn:
            raise ValueError(f"draw({n - drawn}) returned {got} disagreements")
        found, drawn = found + got, n
        zeta_upper = clopper_pearson_upper(found, n, plan.alphas[j])
        decisions = _decisions(found, j, plan, p_lower, zeta_upper, targets)
        if n < plan.looks[-1] and OPEN not in decisions:
            reason = "decided"
            break
    lower = p_lower - zeta_upper
    certified = lower >= 0.5
    return DisagreementResult(certified, radius(sigma, lower) if certified else 0.0, lower, zeta_upper,
                              drawn, found, reason)


def _decisions(found: int, j: int, plan: LookPlan, p_lower: float, zeta_upper: float,
               targets: Sequence[float]) -> tuple[str, ...]:
    """Each threshold's state at look j (certified / impossible / unreachable / open)."""
    zeta_plausible = clopper_pearson_lower(found, plan.looks[j], plan.upper_alphas[j])
    later = range(j + 1, len(plan.looks))
    best_later = min((clopper_pearson_upper(found, plan.looks[k], plan.alphas[k]) for k in later), default=math.inf)
    out = []
    for t in targets:
        if p_lower - zeta_upper >= t:
            out.append(CERTIFIED)
        elif p_lower - zeta_plausible < t:
            out.append(IMPOSSIBLE)
        elif p_lower - best_later < t:
            out.append(UNREACHABLE)
        else:
            out.append(OPEN)
    return tuple(out)


# --- routing, from the parent's row only ----------------------------------------------------------

@dataclass(frozen=True)
class RouteRule:
    """What the route of an image may depend on besides its parent row: fixed before sampling."""

    sigma: float
    radii: tuple[float, ...]
    n0: int
    sequential_plan: LookPlan  # the fallback's looks at alpha_total
    disagreement_plan: LookPlan  # the test's looks at alpha_2
    expected_disagreement: float  # the disagreement rate the cost model assumes (a constant, not a measurement)
    fallback: str  # "sequential" or "none"


def target_threshold(p_lower: float, rule: RouteRule) -> float:
    """Phi(r / sigma) of the parent's largest certified radius of the grid (1/2 when it certifies none)."""
    radii = decision_radii(p_lower, rule.sigma, rule.radii)
    return thresholds(radii, rule.sigma)[-1]


def route_costs(p_lower: float, rule: RouteRule) -> tuple[float, float]:
    """Expected classifier evaluations of (sequential CERTIFY of f', the disagreement test), with pA' and
    the hit rate set to p_lower and zeta to the expected disagreement (inf when a route cannot finish
    before n_max). Sequential CERTIFY must decide every radius of the rule, those above pA' included
    (the costly ones are the radii whose threshold lies just above pA'); the disagreement test only
    decides the radii the parent certified, and stops once the largest of them is certified."""
    return rule.n0 + _direct_looks(p_lower, rule), 2 * _test_looks(p_lower, rule)


def _direct_looks(p: float, rule: RouteRule) -> float:
    """The look at which sequential CERTIFY with hit rate p has decided every radius of the rule."""
    plan = rule.sequential_plan
    looks, n_max = np.asarray(plan.looks), plan.looks[-1]
    hits = np.floor(p * looks).astype(np.int64)
    lower = clopper_pearson_lower(hits, looks, np.asarray(plan.alphas))
    upper = clopper_pearson_upper(hits, looks, np.asarray(plan.upper_alphas))
    best = clopper_pearson_lower(hits + n_max - looks, np.full_like(looks, n_max), plan.alphas[-1])
    worst = 0
    for t in thresholds(tuple(rule.radii), rule.sigma):
        decided = np.flatnonzero((lower >= t) | (upper < t) | (best < t))
        worst = max(worst, int(decided[0]) if len(decided) else len(looks) - 1)
    return float(looks[worst])


def _test_looks(p_lower: float, rule: RouteRule) -> float:
    """The first look at which the disagreement test, at the expected rate, certifies the target radius."""
    plan, t, zeta = rule.disagreement_plan, target_threshold(p_lower, rule), rule.expected_disagreement
    looks = np.asarray(plan.looks)
    found = np.ceil(zeta * looks).astype(np.int64)
    clears = np.flatnonzero(p_lower - clopper_pearson_upper(found, looks, np.asarray(plan.alphas)) >= t)
    return float(looks[clears[0]]) if len(clears) else math.inf


def choose_route(parent_certified: bool, p_lower: float, rule: RouteRule) -> str:
    """The route of one image, from its parent row (certified or not, and pA_lower) and the rule."""
    if not parent_certified:
        return ROUTE_PARENT
    if rule.fallback == "none":
        return ROUTE_DISAGREEMENT
    direct, test = route_costs(p_lower, rule)
    return ROUTE_DISAGREEMENT if test < direct else ROUTE_SEQUENTIAL


# --- on models: the pair classifier and the pool job ---------------------------------------------

class DisagreementClassifier(nn.Module):
    """f and f' on the same batch: class 1 where their predictions differ, 0 where they agree, so that
    one forward pass of the pool evaluates both models on every noisy input (2 evaluations per row)."""

    def __init__(self, parent: nn.Module, variant: nn.Module, *, parent_precision: str = "fp32",
                 variant_precision: str = "fp32"):
        super().__init__()
        self.parent, self.variant = parent, variant
        self.precisions = (parent_precision, variant_precision)  # each member as its certification ran it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with _member_precision(x.device, self.precisions[0]):
            parent = self.parent(x).argmax(dim=1)
        with _member_precision(x.device, self.precisions[1]):
            variant = self.variant(x).argmax(dim=1)
        differ = parent != variant
        return torch.stack([~differ, differ], dim=1).float()


def _member_precision(device: torch.device, precision: str):
    """Autocast to `precision` for one member of the pair (fp32: autocast off, whatever is around it), so
    f runs exactly as its certificate was computed and f' as it is certified (validity rule 9)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=dtype)


def incremental_seed(image_seed: int) -> int:
    """The noise seed of an image's new samples: never one a parent certificate used, whatever seed the
    parent ran with (its routing must stay independent of the samples it routes to)."""
    return hash_seed("incremental", int(image_seed))


def disagreement_job(g_pair, x: torch.Tensor, seed: int, plan: LookPlan, p_lower: float,
                     radii: Sequence[float]) -> Job:
    """The disagreement test of one image as a pool job on the pair classifier's `Smooth`."""
    x = g_pair._on_device(x)
    stream = g_pair._stream(x, incremental_seed(seed), DISAGREEMENT)
    steps = disagreement_steps(plan, p_lower, g_pair.sigma, radii)
    m = next(steps)
    while True:
        counts = yield Request(x, stream, m)
        try:
            m = steps.send(int(counts[1]))
        except StopIteration as stop:
            return stop.value


def incremental_prediction(parent_class: int, result: DisagreementResult) -> int:
    return parent_class if result.certified else ABSTAIN


@functools.lru_cache(maxsize=4096)
def recovered_lower(radius_text: str, sigma: float) -> float:
    """A lower bound on the pA_lower behind a printed radius, never above the true one: the printed
    radius may be rounded (Cohen prints 3 significant digits) or truncated (this tool, 6 decimals), so
    the true radius is at least the printed one minus half a unit of its last printed digit; Phi of
    that, one float step down, and at least 1/2 (a certified row had pA_lower >= 1/2)."""
    text = radius_text.strip()
    if not math.isfinite(float(text)):  # "nan", "inf": no bound behind them (the TSV reader refuses them too)
        raise ValueError(f"radius {radius_text!r} is not a finite number: no pA_lower can be recovered from it")
    mantissa, _, exponent = text.lower().partition("e")
    decimals = len(mantissa.partition(".")[2]) - (int(exponent) if exponent else 0)
    low = max(float(text) - 0.5 * 10.0 ** (-decimals), 0.0)
    from scipy.stats import norm

    value = float(np.nextafter(norm.cdf(low / float(sigma)), 0.0))
    return max(value, 0.5)
