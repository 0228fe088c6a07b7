#!/usr/bin/env python
"""Incremental against from-scratch sequential certification of a changed model, replayed on Cohen-format logs.

    python scripts/bench_incremental.py LOG --sigma 0.5 [--disagreement 0.001 0.01] [--json out.json]

LOG is a Cohen-format certify.tsv of the parent (e.g. Cohen et al.'s published CIFAR-10 logs,
locuslab/smoothing data/certify/cifar10/resnet110/noise_S/test/sigma_S, certified with n = 100,000 and
alpha = 0.001; pass the paths, the logs are not shipped). Per image:
- pA is read back from the logged radius (bench_sequential.recover_pa), the parent is re-certified
  on one simulated path: nA ~ Binomial(n, pA), pA_lower its Clopper-Pearson bound at --alpha-parent;
- the variant f' disagrees with f on each noisy input with probability zeta (--disagreement), independently
  of f's vote, so pA' = pA (1 - zeta);
- from scratch: sequential CERTIFY of f' (stop=radii at --radii, n_max = n) at alpha_total = --alpha-total,
  on one Bernoulli(pA') path;
- incremental: each image routed from its parent row (`incremental.choose_route`, fallback=sequential,
  and once with fallback=none), then the disagreement test (zeta samples ~ Bernoulli(zeta), both models
  counted: 2 evaluations per sample) or the same sequential CERTIFY of f' at alpha_total.
Classifier evaluations per image (both models counted), certified accuracy at each radius, and the
ratio against from scratch are printed; the parent's own cost is already spent and not counted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sequential import GRID, Outcomes, compare, format_table, recover_pa, replay_draw, vote_paths  # noqa: E402

from peftsmooth.certify import incremental as inc  # noqa: E402
from peftsmooth.certify.results import read_tsv  # noqa: E402
from peftsmooth.certify.sequential import look_plan, run_plan, run_steps, stop_rule  # noqa: E402
from peftsmooth.certify.stats import clopper_pearson_lower  # noqa: E402

RADII = (0.25, 0.5, 0.75, 1.0)


def parent_lowers(pa: np.ndarray, n: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """The parent's pA_lower per image, re-certified on one simulated path of n votes."""
    return clopper_pearson_lower(rng.binomial(n, pa), n, alpha)


def sequential_outcome(cumulative: np.ndarray, looks, plan, sigma: float, rule) -> tuple[bool, float, int]:
    result = run_plan(replay_draw(looks, cumulative), plan, sigma, rule)
    return result.certified, result.radius, result.samples


def disagreement_outcome(p_lower: float, zeta: float, plan, sigma: float, radii, rng) -> tuple[bool, float, int, int]:
    r = run_steps(inc.disagreement_steps(plan, p_lower, sigma, radii), lambda m: int(rng.binomial(m, zeta)))
    return r.certified, r.radius, 2 * r.samples, r.disagreements


def replay(rows: Sequence[dict], sigma: float, zeta: float, args) -> dict[str, Outcomes]:
    """From scratch, incremental with routing, incremental without (fallback=none), on shared paths."""
    rng = np.random.default_rng(args.seed)
    pa = recover_pa(rows, sigma, args.n, args.alpha_parent)
    p_lower = parent_lowers(pa, args.n, args.alpha_parent, rng)
    rule = stop_rule("radii", list(args.radii))
    seq_plan = look_plan(args.n, args.alpha_total, stop="radii")
    paths = vote_paths(pa * (1 - zeta), seq_plan.looks, rng)
    labelled = np.array([bool(row["correct"]) for row in rows])
    scratch = [sequential_outcome(path, seq_plan.looks, seq_plan, sigma, rule) for path in paths]
    out = {"sequential from scratch": _outcomes(labelled, [(c, r, args.n0 + s) for c, r, s in scratch])}
    for fallback in ("sequential", "none"):
        route_rule = inc.RouteRule(sigma, tuple(args.radii), args.n0, seq_plan,
                                   inc.disagreement_plan(args.n, args.alpha_total - args.alpha_parent),
                                   args.expected_disagreement, fallback)
        answers, counts = [], {k: 0 for k in inc.ROUTES}
        for i, lower in enumerate(p_lower):
            route = inc.choose_route(bool(lower >= 0.5), float(lower), route_rule)
            counts[route] += 1
            if route == inc.ROUTE_PARENT:
                answers.append((False, 0.0, 0))
            elif route == inc.ROUTE_SEQUENTIAL:
                answers.append((scratch[i][0], scratch[i][1], args.n0 + scratch[i][2]))
            else:
                c, r, s, _ = disagreement_outcome(float(lower), zeta, route_rule.disagreement_plan, sigma,
                                                  route_rule.radii, rng)
                answers.append((c, r, s))
        out[f"incremental fallback={fallback} {counts}"] = _outcomes(labelled, answers)
    return out


def _outcomes(labelled: np.ndarray, answers) -> Outcomes:
    certified = np.array([c for c, _, _ in answers], dtype=bool)
    return Outcomes(labelled & certified, np.array([r for _, r, _ in answers]), np.array([s for _, _, s in answers]))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log", type=Path, help="the parent's Cohen-format certify.tsv")
    parser.add_argument("--sigma", type=float, required=True)
    parser.add_argument("--n", type=int, default=100_000, help="the log's n, and n_max of every new certification")
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--alpha-parent", type=float, default=0.001, help="the log's alpha (alpha_1)")
    parser.add_argument("--alpha-total", type=float, default=0.002, help="alpha_1 + alpha_2, and from scratch's alpha")
    parser.add_argument("--disagreement", type=float, nargs="+", default=[0.001, 0.01])
    parser.add_argument("--expected-disagreement", type=float, default=0.001, help="the route rule's constant")
    parser.add_argument("--radii", type=float, nargs="+", default=list(RADII))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the summaries here as JSON")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    rows = read_tsv(args.log, foreign=True)
    tables = {}
    for zeta in args.disagreement:
        summaries = compare(replay(rows, args.sigma, zeta, args), GRID, args.radii)
        tables[f"{zeta:g}"] = summaries
        print(f"# {args.log} sigma={args.sigma:g}, disagreement {100 * zeta:g} %, alpha_total={args.alpha_total:g} "
              f"(parent alpha {args.alpha_parent:g}), {len(rows)} images; evaluations/image count both models")
        print(format_table(summaries, GRID))
    if args.json:
        args.json.write_text(json.dumps(tables, indent=2))
    return tables


if __name__ == "__main__":
    main()
