"""Sequential CERTIFY: Cohen et al.'s certificate with fewer samples, decided at a fixed grid of looks.

CERTIFY (Cohen, Rosenfeld & Kolter 2019) draws n0 samples to select cAHat, then n fresh samples, and
certifies radius sigma * Phi^-1(pABar) with pABar the one-sided (1 - alpha) Clopper-Pearson lower bound
on pA = P(f(x + e) = cAHat). Most images are decided long before n = 100,000; this module draws the
estimation samples in stages and stops as soon as the answer asked for is known.

Procedure
---------
- Looks, fixed before any sample is drawn (they depend on n_max and the stopping rule only): geometric
  from `FIRST_LOOK` = 128, capped at n_max, which is always the last look. stop="radii" multiplies by
  2^(1/3) (n_max = 100,000: 30 looks 128, 161, 203, 256, ..., 65536, 82570, 100000); stop="radius"
  doubles (11 looks 128, 256, ..., 65536, 100000). A radii decision is a threshold crossing, which a
  finer grid catches sooner; a radius that must stop growing gains more from the larger alpha_j a
  coarser grid leaves each look.
- Alpha split: the last look gets alpha_K = `FINAL_SHARE` * alpha (one half), the K - 1 earlier looks
  share the rest equally, so sum_j alpha_j = alpha. Not uniform, because the two ends cost differently:
  an early look only has to clear a threshold Phi(r / sigma), and the samples that takes grow with
  log(1 / alpha_j) only (alpha / 58 instead of alpha / 30 costs ~6% more samples there), while the last
  look sets the largest radius, sigma * Phi^-1(alpha_K^(1/n_max)) for an image whose votes all hit:
  0.947 at sigma = 0.25, against 0.953 for fixed-n CERTIFY; alpha / 30 there would give 0.927. In
  replays of published CIFAR-10 logs (scripts/bench_sequential.py --final-share) a quarter saved ~1% of
  the samples but lost certified accuracy at the decided radii, three quarters cost 1-6% more samples.
- Bounds at look j, with nA_j hits among the first n_j estimation samples:
  lower_j = the Clopper-Pearson lower bound at level alpha_j (the alpha_j quantile of
  Beta(nA_j, n_j - nA_j + 1)); only lower_j certifies.
  upper_j = the Clopper-Pearson upper bound at level `UPPER_ALPHA` / K (0.01 in all); it only ends
  sampling early. Its errors cannot make a false certificate; they can only lose one, with probability
  at most 0.01 per image and radius.
- Stopping rules, checked at every look:
  abstain as soon as upper_j < 1/2;
  stop="radii" (default): stop once every radius r of `radii` is decided: certified
  (lower_j >= Phi(r/sigma)), impossible (upper_j < Phi(r/sigma)), or unreachable within n_max (even if
  all n_max - n_j remaining samples were hits, the lower bound at the last look would stay below
  Phi(r/sigma));
  stop="radius": stop once the radius can grow by at most `max_radius_loss` up to n_max, its ceiling
  being the last-look radius if the remaining samples hit at the rate upper_j;
  always stop at n_max.
- Answer: radius sigma * Phi^-1(lower_J) at the stopping look J, or abstain when lower_J < 1/2.

Guarantee
---------
With probability at least 1 - alpha over the estimation noise, pA >= lower_j at every look j at once
(union bound: P(some lower_j > pA) <= sum_j alpha_j = alpha). The stopping look J is one of the looks,
chosen by whatever rule, so pA >= lower_J with probability >= 1 - alpha: the reported radius is a true
certificate of g with the failure probability of fixed-n CERTIFY (validity rules 2 and 6 in
docs/architecture.md). Re-checking a fixed-n bound at level alpha after every batch is not valid: it
certifies too often (tests/certify/test_sequential.py shows it). The selection samples are never counted.

Cost against fixed-n CERTIFY at n = n_max: an image that runs to n_max is bounded at alpha / 2 instead
of alpha (a slightly smaller largest radius, above), and an image stopped early reports the radius of
its stopping look. stop="radii" keeps every decision at the radii asked for, so certified accuracy
there matches fixed n, while ACR drops (radii beyond the largest decided one are not pursued);
stop="radius" bounds the radius each image may lose.

`certify_sequential(draw, ...)` is the pure procedure (draw(m) returns the hits among m fresh samples),
`plan_steps` the same procedure as a generator (it yields the samples each look needs and is sent
their hits), `sequential_job` one image's selection and looks as a job of the pool of images in
flight (peftsmooth.certify.pool), and `smooth_certify_sequential(g, x, ...)` runs one image alone on a
`Smooth` classifier. The decisions depend on the counts at the looks only, never on how the samples
were batched.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Iterable, Iterator, Sequence

import numpy as np
from scipy.special import ndtri
from scipy.stats import norm

from peftsmooth.certify.noise import ESTIMATION, SELECTION, check_args, fresh_seed
from peftsmooth.certify.pool import Job, Request, in_order, run_pool
from peftsmooth.certify.stats import ABSTAIN, clopper_pearson_lower, clopper_pearson_upper, radius

FIRST_LOOK = 128  # estimation samples at the first look
# Ratio between consecutive looks: a radii decision is a threshold crossing, and a finer grid stops closer
# to it; a radius-growth stop gains more from the larger alpha each look keeps on a coarser grid.
GROWTH = {"radii": 2 ** (1 / 3), "radius": 2.0}
FINAL_SHARE = 0.5  # share of alpha spent at the last look (n_max)
UPPER_ALPHA = 0.01  # total level of the upper bounds, which only stop sampling
STOP_RULES = ("radii", "radius")
# The radius grid of the certification summaries (conf/certify/*.yaml radius_grid), and the radii stop="radii"
# decides unless told otherwise, in the Python API and the CLI alike: the grid's positive radii. (Adding 0
# also decides abstain-or-not exactly, at the cost of running near-ties to n_max.)
RADIUS_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0)
DEFAULT_RADII = tuple(r for r in RADIUS_GRID if r > 0)
DEFAULT_MAX_RADIUS_LOSS = 0.04  # stop="radius": the most a radius may lose against running to n_max

CERTIFIED, IMPOSSIBLE, UNREACHABLE, OPEN = "certified", "impossible", "unreachable", "open"


@dataclass(frozen=True)
class LookPlan:
    """The looks (estimation sample counts), the alpha of the lower bound at each (sum(alphas) <= alpha)
    and the level of the upper bound at each (stopping only)."""

    looks: tuple[int, ...]
    alphas: tuple[float, ...]
    upper_alphas: tuple[float, ...]


def look_plan(n_max: int, alpha: float, *, stop: str = "radii", growth: float | None = None,
              first: int = FIRST_LOOK, final_share: float = FINAL_SHARE, upper_alpha: float = UPPER_ALPHA) -> LookPlan:
    """Looks round(first * growth^k) below n_max, then n_max (growth: GROWTH[stop] unless given), and the
    alpha split of the module docstring. Depends on its arguments only, never on samples."""
    _check_count("n_max", n_max)
    _check_count("first", first)
    _check_alpha(alpha)
    _check_alpha(upper_alpha)
    if stop not in GROWTH:
        raise ValueError(f"stop={stop!r} is not allowed (choose from: {', '.join(STOP_RULES)})")
    growth = GROWTH[stop] if growth is None else growth
    if not (_is_number(growth) and growth > 1.0):
        raise ValueError(f"growth must be a number > 1, got {growth!r}")
    if not (_is_number(final_share) and 0.0 < final_share <= 1.0):
        raise ValueError(f"final_share must lie in (0, 1], got {final_share!r}")
    looks, k = [], 0
    while (n := round(first * growth ** k)) < n_max:
        if not looks or n > looks[-1]:
            looks.append(n)
        k += 1
    looks.append(int(n_max))
    if len(looks) == 1:
        return LookPlan(tuple(looks), (float(alpha),), (float(upper_alpha),))
    early = (1.0 - final_share) * alpha / (len(looks) - 1)
    uppers = (upper_alpha / len(looks),) * len(looks)
    return LookPlan(tuple(looks), (early,) * (len(looks) - 1) + (final_share * alpha,), uppers)


def check_plan(plan: LookPlan, n_max: int, alpha: float) -> LookPlan:
    """A plan given by the caller, held to what makes the certificate valid (ValueError otherwise):
    increasing looks ending at n_max, one lower-bound level alpha_j >= 0 and one upper-bound level per
    look, and sum_j alpha_j <= alpha (the union bound of the module docstring)."""
    looks, alphas = tuple(plan.looks), tuple(plan.alphas)
    if not looks or any(not isinstance(n, (int, np.integer)) or n < 1 for n in looks) \
            or any(b <= a for a, b in zip(looks, looks[1:])):
        raise ValueError(f"the plan's looks must be increasing integers >= 1, got {list(looks)!r}")
    if looks[-1] != n_max:
        raise ValueError(f"the plan's last look is {looks[-1]}, not n_max={n_max}")
    if len(alphas) != len(looks) or len(plan.upper_alphas) != len(looks):
        raise ValueError(f"the plan has {len(looks)} looks, {len(alphas)} alphas and {len(plan.upper_alphas)} upper alphas")
    if not all(_is_number(a) and a >= 0 for a in alphas):
        raise ValueError(f"the plan's alphas must be numbers >= 0, got {list(alphas)!r}")
    spent = math.fsum(alphas)
    if spent > alpha * (1 + 1e-12):
        raise ValueError(f"the plan's alphas sum to {spent:.6g}, more than alpha={alpha:g}: the certificate's "
                         f"failure probability would exceed alpha")
    return plan


@dataclass(frozen=True)
class StopRule:
    """A validated stopping rule: stop="radii" with its radii, or stop="radius" with its loss."""

    stop: str
    radii: tuple[float, ...] = ()
    max_radius_loss: float | None = None


def stop_rule(stop: str | None = None, radii: Sequence[float] | None = None,
              max_radius_loss: float | None = None) -> StopRule:
    """Check the stopping rule's arguments (ValueError on bad input, before anything is sampled).

    stop=None picks "radius" when max_radius_loss is given, else "radii"; radii=None means DEFAULT_RADII.
    The parameter of the rule not chosen is ignored.
    """
    stop = ("radius" if max_radius_loss is not None else "radii") if stop is None else stop
    if stop not in STOP_RULES:
        raise ValueError(f"stop={stop!r} is not allowed (choose from: {', '.join(STOP_RULES)})")
    if stop == "radius":
        if max_radius_loss is None:
            raise ValueError("stop=radius needs max_radius_loss (the radius it may lose against running to n_max)")
        if not (_is_number(max_radius_loss) and 0.0 <= max_radius_loss < math.inf):
            raise ValueError(f"max_radius_loss must be a finite number >= 0, got {max_radius_loss!r}")
        return StopRule("radius", max_radius_loss=float(max_radius_loss))
    radii = DEFAULT_RADII if radii is None else radii
    if isinstance(radii, (str, bytes)) or not isinstance(radii, Sequence) or len(radii) == 0:
        raise ValueError(f"radii must be a non-empty list of radii >= 0, got {radii!r}")
    if not all(_is_number(r) and 0.0 <= r < math.inf for r in radii):
        raise ValueError(f"radii must be finite numbers >= 0, got {list(radii)!r}")
    return StopRule("radii", radii=tuple(sorted({float(r) for r in radii})))


@dataclass(frozen=True)
class Look:
    """What the procedure knew at one look: counts, both bounds, and the per-radius decisions."""

    n: int
    hits: int
    alpha: float
    lower: float
    upper: float
    best_final: float  # the final-look lower bound if every remaining sample were a hit
    decisions: tuple[str, ...] = ()  # stop="radii": one of CERTIFIED/IMPOSSIBLE/UNREACHABLE/OPEN per radius
    ceiling: float | None = None  # stop="radius": the radius n_max samples could plausibly reach


@dataclass(frozen=True)
class SequentialResult:
    """The answer for the selected class: certified (lower >= 1/2) with its radius, or abstain."""

    certified: bool
    radius: float
    samples: int  # estimation samples drawn (selection samples not included)
    lower: float  # the lower bound at the stopping look
    reason: str  # why sampling stopped: "decided", "converged", "abstain" or "n_max"
    trace: tuple[Look, ...]


def certify_sequential(draw: Callable[[int], int], n_max: int, alpha: float, sigma: float, *,
                       stop: str | None = None, radii: Sequence[float] | None = None,
                       max_radius_loss: float | None = None, plan: LookPlan | None = None) -> SequentialResult:
    """Sequential CERTIFY of one image whose top class was already selected on other samples.

    :param draw: draw(m) returns how many of the next m fresh estimation samples hit the selected class;
        it is called once per look with m = the samples up to that look, so the decisions never depend
        on how the caller batches its forward passes
    :param n_max: the most estimation samples (the last look)
    :param alpha: failure probability of the certificate (time-uniform over the looks)
    :param sigma: noise level of the smoothed classifier
    :param stop: the stopping rule, with `radii` or `max_radius_loss` (see `stop_rule`)
    :param plan: the looks and alpha split (default `look_plan(n_max, alpha, stop=...)`); a given plan must
        end at n_max and spend at most alpha in all (`check_plan`)
    """
    rule = stop_rule(stop, radii, max_radius_loss)
    plan = look_plan(n_max, alpha, stop=rule.stop) if plan is None else check_plan(plan, n_max, alpha)
    if not float(sigma) > 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    return run_plan(draw, plan, float(sigma), rule)


def run_plan(draw: Callable[[int], int], plan: LookPlan, sigma: float, rule: StopRule) -> SequentialResult:
    """The looks of `plan`, taken as given (`certify_sequential` checks it first), with `draw` called
    once per look. Any plan runs here, an invalid one too, so that the tests can show what an invalid
    plan does."""
    return run_steps(plan_steps(plan, sigma, rule), draw)


def run_steps(steps: Generator[int, int, Any], draw: Callable[[int], int]) -> Any:
    """Drive a look procedure (a generator: yields how many samples to draw, is sent how many hit, returns
    its result) with `draw(m)` as the hits among m fresh samples: replays and tests of any such test."""
    m = next(steps)
    while True:
        try:
            m = steps.send(draw(m))
        except StopIteration as stop:
            return stop.value


def plan_steps(plan: LookPlan, sigma: float, rule: StopRule) -> Generator[int, int, SequentialResult]:
    """The procedure as a generator: yields how many fresh samples to draw up to the next look, is sent
    how many of them hit, bounds and decides at each look, and returns the result when the rule stops
    (so that a pool of images in flight can draw the samples of many images in one forward pass)."""
    hits, drawn, trace = 0, 0, []
    for j, n in enumerate(plan.looks):
        got = int((yield n - drawn))
        if not 0 <= got <= n - drawn:
            raise ValueError(f"draw({n - drawn}) returned {got} hits")
        hits, drawn = hits + got, n
        look, reason = evaluate_look(hits, j, plan, sigma, rule)
        trace.append(look)
        if reason:
            break
    certified = look.lower >= 0.5
    r = radius(sigma, look.lower) if certified else 0.0
    return SequentialResult(certified, r, drawn, look.lower, reason, tuple(trace))


def evaluate_look(hits: int, j: int, plan: LookPlan, sigma: float, rule: StopRule) -> tuple[Look, str]:
    """The bounds and decisions at look j (hits among its n_j samples), and the reason to stop there
    ("" to go on)."""
    n, alpha_j, n_max, alpha_final = plan.looks[j], plan.alphas[j], plan.looks[-1], plan.alphas[-1]
    lower, upper = clopper_pearson_lower(hits, n, alpha_j), clopper_pearson_upper(hits, n, plan.upper_alphas[j])
    best_final = clopper_pearson_lower(hits + n_max - n, n_max, alpha_final)
    decisions, ceiling = (), None
    if rule.stop == "radii":
        decisions = tuple(decide(lower, upper, best_final, t) for t in thresholds(rule.radii, sigma))
        settled = OPEN not in decisions
    else:
        plausible = hits + min(n_max - n, math.ceil(upper * (n_max - n)))
        ceiling = _radius_or_zero(sigma, clopper_pearson_lower(plausible, n_max, alpha_final))
        settled = ceiling - _radius_or_zero(sigma, lower) <= rule.max_radius_loss
    look = Look(n, hits, alpha_j, lower, upper, best_final, decisions, ceiling)
    if n >= n_max:
        return look, "n_max"
    if upper < 0.5:
        return look, "abstain"
    return look, ("decided" if rule.stop == "radii" else "converged") if settled else ""


def decide(lower: float, upper: float, best_final: float, threshold: float) -> str:
    """Certification at the radius whose threshold Phi(r / sigma) is `threshold`."""
    if lower >= threshold:
        return CERTIFIED
    if upper < threshold:
        return IMPOSSIBLE
    if best_final < threshold:
        return UNREACHABLE
    return OPEN


@functools.lru_cache(maxsize=64)
def thresholds(radii: tuple[float, ...], sigma: float) -> tuple[float, ...]:
    """Phi(r / sigma) for each radius: the pA a certificate at r needs."""
    return tuple(float(t) for t in norm.cdf(np.asarray(radii) / sigma))


def _radius_or_zero(sigma: float, lower: float) -> float:
    """sigma * Phi^-1(lower), 0 below 1/2: for stopping decisions (the certificate itself uses `radius`)."""
    return sigma * float(ndtri(lower)) if lower >= 0.5 else 0.0


# --- on a Smooth classifier -----------------------------------------------------------------------


@dataclass(frozen=True)
class SequentialCertificate:
    """One image's sequential CERTIFY: the answer, the forward passes it cost, and how it was reached."""

    prediction: int  # cAHat, or -1 (abstain)
    radius: float
    samples: int  # n0 + estimation samples drawn
    cAHat: int
    result: SequentialResult
    seconds: float = field(default=0.0, compare=False)  # wall time (its share of a packed selection pass included)


def sequential_certificates(g, xs: Iterable, seeds: Iterable[int], n0: int, n_max: int, alpha: float,
                            batch_size: int, *, pack: bool = True, stop: str | None = None,
                            radii: Sequence[float] | None = None, max_radius_loss: float | None = None,
                            precision: str | None = None) -> Iterator[SequentialCertificate]:
    """Sequential CERTIFY of each image on the `Smooth` classifier g, in order.

    n0 selection samples (g's SELECTION stream) pick cAHat; the estimation samples come from g's
    ESTIMATION stream of the same seed, in order, so running to n_max sees exactly the samples of
    `g.certify(x, n0, n_max, ...)`, and no batch size changes a decision. With `pack`, many images are
    in flight and every forward pass is filled from their looks (`pool`; the same answers). All
    arguments are checked before anything is sampled.
    """
    check_args(n0=n0, n=n_max, alpha=alpha, batch_size=batch_size)
    rule = stop_rule(stop, radii, max_radius_loss)
    plan = look_plan(n_max, alpha, stop=rule.stop)
    jobs = ((i, sequential_job(g, x, seed, n0, plan, rule)) for i, (x, seed) in enumerate(zip(xs, seeds)))
    with g._precision(precision):
        for done in in_order(run_pool(g, jobs, batch_size, max_in_flight=None if pack else 1), itertools.count()):
            yield dataclasses.replace(done.result, seconds=done.seconds)


def sequential_job(g, x, seed: int, n0: int, plan: LookPlan, rule: StopRule) -> Job:
    """Sequential CERTIFY of one image as a pool job: n0 selection samples, then one request per look."""
    x = g._on_device(x)
    selection = yield Request(x, g._stream(x, seed, SELECTION), n0)
    cAHat = int(selection.argmax())
    stream = g._stream(x, seed, ESTIMATION)
    steps = plan_steps(plan, g.sigma, rule)
    m = next(steps)
    while True:
        counts = yield Request(x, stream, m)
        try:
            m = steps.send(int(counts[cAHat]))
        except StopIteration as stop:
            result = stop.value
            break
    prediction = cAHat if result.certified else ABSTAIN
    return SequentialCertificate(prediction, result.radius, n0 + result.samples, cAHat, result)


def smooth_certify_sequential(g, x, n0: int, n_max: int, alpha: float, batch_size: int, *,
                              radii: Sequence[float] | None = None, max_radius_loss: float | None = None,
                              seed: int | None = None, stop: str | None = None,
                              precision: str | None = None) -> tuple[int, float, int]:
    """The body of `Smooth.certify_sequential`: (prediction, radius, samples), samples counting n0.

    prediction is -1 (ABSTAIN) with radius 0.0 on abstain. With probability at least 1 - alpha
    over the noise, a returned class is g's prediction everywhere in the L2 ball of the returned radius.
    """
    cert = sequential_certificate(g, x, n0, n_max, alpha, batch_size, stop=stop, radii=radii,
                                  max_radius_loss=max_radius_loss, seed=seed, precision=precision)
    return cert.prediction, cert.radius, cert.samples


def sequential_certificate(g, x, n0: int, n_max: int, alpha: float, batch_size: int, *,
                           seed: int | None = None, **rule) -> SequentialCertificate:
    """Sequential CERTIFY of one image x (the details of `sequential_certificates`)."""
    seed = fresh_seed() if seed is None else int(seed)
    return next(sequential_certificates(g, [x], [seed], n0, n_max, alpha, batch_size, pack=False, **rule))


# --- argument checks ------------------------------------------------------------------------------


def _is_number(value) -> bool:
    """A real number (not a bool, not NaN)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and not math.isnan(value)


def _check_count(name: str, value) -> None:
    if not (isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_alpha(alpha) -> None:
    if not (_is_number(alpha) and 0.0 < alpha < 1.0):
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")
