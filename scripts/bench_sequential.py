#!/usr/bin/env python
"""Sequential against fixed-n CERTIFY: samples per image, certified accuracy at each radius, ACR.

    python scripts/bench_sequential.py path/to/certify.tsv --sigma 0.25      # replay a Cohen-format TSV
    python scripts/bench_sequential.py --synthetic 500 --sigma 0.25          # replay a generated one
    python scripts/bench_sequential.py --run RUN_DIR --sigma 0.25 --n 100000 --out DIR -- certify.max=50
                                     # certify a trained run: cohen n=N, sequential n_max=N (both rules)

Model mode (--run): `peftsmooth certify` itself certifies the same images of a trained run three times
(certify=cohen certify.n=N; certify=sequential certify.n_max=N with stop=radii and with stop=radius),
each into its own directory under --out (so an interrupted benchmark resumes), and the table is built
from the three certify.tsv files: samples and wall time per image from their `samples` and `time`
columns. Arguments after `--` go to every certify command (e.g. certify.max=, certify.skip=,
certify.batch_size=, certify.precision=).

Replay: every row of a Cohen-format TSV (idx label predict radius correct [time] [samples], certified
with --n and --alpha) gives its image's pA back: the pA whose expected count nA = pA * n yields the
logged radius (a radius at or above the all-hit radius of (n, alpha) reads as pA = 1); an abstention
is replayed at pA = 1/2. Each image then gets one path of Bernoulli(pA) votes, shared by all methods:
fixed-n CERTIFY counts its first n votes, sequential CERTIFY (n_max = n) reads the same path look by
look, once with stop=radii (--radii) and once with stop=radius (--max-radius-loss). The selection is
the logged one: an image counts as correct when its row is correct and the method certifies it.

`compare(outcomes, ...)` builds the table from per-image `Outcomes`; `replay_outcomes` makes them from
a TSV, `certified_outcomes` from certify directories, `model_outcomes` from a `Smooth` called directly.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from scipy.stats import norm

from peftsmooth.certify.results import TSV_FILE, read_tsv
from peftsmooth.certify.sequential import (
    DEFAULT_MAX_RADIUS_LOSS,
    FINAL_SHARE,
    UPPER_ALPHA,
    certify_sequential,
    look_plan,
)
from peftsmooth.certify.stats import clopper_pearson_lower, radius

BENCH_RADII = (0.25, 0.5, 0.75, 1.0)
GRID = (0.0, 0.25, 0.5, 0.75, 1.0)  # radii of the certified-accuracy columns


@dataclass
class Outcomes:
    """Per image: certified and correct, the radius (0 unless certified), forward passes spent."""

    correct: np.ndarray
    radius: np.ndarray
    samples: np.ndarray
    seconds: float | None = None


# --- replay -----------------------------------------------------------------------------------------


def recover_pa(rows: Sequence[dict], sigma: float, n: int, alpha: float) -> np.ndarray:
    """The pA of each row's predicted class, read back from its radius (module docstring)."""
    counts = np.arange(n + 1)
    lowers = clopper_pearson_lower(counts, n, alpha)  # increasing in the count
    pa = np.full(len(rows), 0.5)
    for i, row in enumerate(rows):
        if row["predict"] != -1:
            target = norm.cdf(row["radius"] / sigma)
            pa[i] = min(int(np.searchsorted(lowers, target)), n) / n
    return pa


def vote_paths(pa: np.ndarray, looks: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """(images, looks) cumulative hits at the looks: one Bernoulli(pA) vote path per image."""
    steps = np.diff((0, *looks))
    return np.cumsum(rng.binomial(steps[None, :], pa[:, None]), axis=1)


def replay_draw(looks: Sequence[int], cumulative: np.ndarray) -> Callable[[int], int]:
    """draw(m) for `certify_sequential`: the hits among the next m votes of one path (m must end on a look)."""
    at = dict(zip(looks, cumulative.tolist()))
    at[0], drawn = 0, 0

    def draw(m: int) -> int:
        nonlocal drawn
        hits = at[drawn + m] - at[drawn]
        drawn += m
        return hits

    return draw


def replay_outcomes(rows: Sequence[dict], sigma: float, n0: int, n: int, alpha: float, rules: dict,
                    *, seed: int = 0, **plan_options) -> dict[str, Outcomes]:
    """Fixed-n CERTIFY and every sequential rule on the same simulated votes of each row's image.
    `plan_options` go to `look_plan` (final_share, upper_alpha, growth)."""
    plans = {name: look_plan(n, alpha, stop=rule["stop"], **plan_options) for name, rule in rules.items()}
    looks = sorted({look for plan in plans.values() for look in plan.looks})
    paths = vote_paths(recover_pa(rows, sigma, n, alpha), looks, np.random.default_rng(seed))
    labelled = np.array([bool(row["correct"]) for row in rows])
    lower = clopper_pearson_lower(paths[:, -1], n, alpha)
    fixed = np.array([radius(sigma, p) if p >= 0.5 else 0.0 for p in lower])
    outcomes = {"cohen": Outcomes(labelled & (lower >= 0.5), fixed, np.full(len(rows), n0 + n))}
    for name, rule in rules.items():
        results = [certify_sequential(replay_draw(looks, path), n, alpha, sigma, plan=plans[name], **rule)
                   for path in paths]
        outcomes[name] = Outcomes(labelled & np.array([r.certified for r in results]),
                                  np.array([r.radius for r in results]),
                                  np.array([n0 + r.samples for r in results]))
    return outcomes


# --- on a real classifier ---------------------------------------------------------------------------


def model_outcomes(certify: Callable, images: Sequence, labels: Sequence[int], seeds: Sequence[int]) -> Outcomes:
    """Outcomes of `certify(x, seed) -> (prediction, radius, samples)` over the images, timed.

    For fixed n: lambda x, s: (*g.certify(x, n0, n, alpha, batch, seed=s), n0 + n); sequential:
    lambda x, s: g.certify_sequential(x, n0, n, alpha, batch, radii=..., seed=s).
    """
    start = time.perf_counter()
    answers = [certify(x, seed) for x, seed in zip(images, seeds)]
    seconds = time.perf_counter() - start
    correct = np.array([prediction == label for (prediction, _, _), label in zip(answers, labels)])
    return Outcomes(correct, np.array([r for _, r, _ in answers]), np.array([s for _, _, s in answers]), seconds)


def certified_outcomes(out: Path) -> Outcomes:
    """Outcomes of a certify directory: its rows, with the samples and time columns they carry."""
    rows = read_tsv(Path(out) / TSV_FILE)  # the parser checks correct == (predict == label), never true on abstain
    return Outcomes(np.array([bool(r["correct"]) for r in rows]),
                    np.array([float(r["radius"]) for r in rows]), np.array([int(r["samples"]) for r in rows]),
                    float(sum(float(r["time"]) for r in rows)))


def certify_commands(run: Path, sigma: float, n: int, n0: int, alpha: float, radii: Sequence[float],
                     max_radius_loss: float, out: Path, extra: Sequence[str]) -> dict[str, list[str]]:
    """The three `peftsmooth certify` command lines of the model mode, by method name."""
    common = [sys.executable, "-m", "peftsmooth", "certify", f"run={run}", f"sigma={sigma}", f"certify.n0={n0}",
              f"certify.alpha={alpha}", *extra]
    radii_list = "[" + ",".join(f"{r:g}" for r in radii) + "]"
    return {
        f"cohen n={n}": [*common, "certify=cohen", f"certify.n={n}", f"hydra.run.dir={out}/cohen"],
        "sequential stop=radii": [*common, "certify=sequential", f"certify.n_max={n}", "certify.stop=radii",
                                  f"certify.radii={radii_list}", f"hydra.run.dir={out}/sequential_radii"],
        "sequential stop=radius": [*common, "certify=sequential", f"certify.n_max={n}", "certify.stop=radius",
                                   f"certify.max_radius_loss={max_radius_loss}", f"hydra.run.dir={out}/sequential_radius"],
    }


def run_outcomes(args: argparse.Namespace) -> dict[str, Outcomes]:
    """Model mode: certify the run three ways (resuming what is done), then read the rows back."""
    commands = certify_commands(args.run, args.sigma, args.n, args.n0, args.alpha, args.radii, args.max_radius_loss,
                                args.out, args.certify_args)
    outcomes = {}
    for name, command in commands.items():
        print(" ".join(command[2:]), file=sys.stderr)
        subprocess.run(command, check=True)
        outcomes[name] = certified_outcomes(Path(command[-1].split("=", 1)[1]))
    return outcomes


# --- the comparison ---------------------------------------------------------------------------------


def summarize(out: Outcomes, grid: Sequence[float]) -> dict:
    certified = {f"{r:g}": float(np.mean(out.correct & (out.radius >= r))) for r in grid}
    summary = {"mean_samples": float(np.mean(out.samples)), "certified_accuracy": certified,
               "acr": float(np.mean(np.where(out.correct, out.radius, 0.0)))}
    if out.seconds is not None:
        summary["seconds"], summary["seconds_per_image"] = out.seconds, out.seconds / len(out.correct)
    return summary


def compare(outcomes: dict[str, Outcomes], grid: Sequence[float] = GRID,
            radii: Sequence[float] = BENCH_RADII) -> dict:
    """Each method's summary, and against the first (fixed n): sample ratio, worst certified-accuracy
    gap (points) at `radii`, relative ACR change."""
    summaries = {name: summarize(out, grid) for name, out in outcomes.items()}
    base = summaries[next(iter(outcomes))]
    for name, summary in list(summaries.items())[1:]:
        summary["fewer_samples"] = base["mean_samples"] / summary["mean_samples"]
        summary["worst_gap_points"] = 100 * max(abs(summary["certified_accuracy"][f"{r:g}"]
                                                    - base["certified_accuracy"][f"{r:g}"]) for r in radii)
        summary["acr_change"] = summary["acr"] / base["acr"] - 1 if base["acr"] else 0.0
        if "seconds" in summary and base.get("seconds"):
            summary["less_time"] = base["seconds"] / summary["seconds"]
    return summaries


def format_table(summaries: dict, grid: Sequence[float] = GRID) -> str:
    timed = all("seconds" in s for s in summaries.values())
    head = ["method", "samples/image", "fewer"] + (["s/image", "less time"] if timed else [])
    head += [f"r={r:g}" for r in grid] + ["ACR", "ACR change", "worst gap"]
    lines = ["\t".join(head)]
    for name, s in summaries.items():
        cells = [name, f"{s['mean_samples']:.0f}", f"{s.get('fewer_samples', 1.0):.1f}x"]
        if timed:
            cells += [f"{s['seconds_per_image']:.2f}",
                      f"{s.get('less_time', 1.0):.1f}x"]
        cells += [f"{100 * s['certified_accuracy'][f'{r:g}']:.1f}" for r in grid]
        cells += [f"{s['acr']:.4f}", f"{100 * s.get('acr_change', 0.0):+.2f}%", f"{s.get('worst_gap_points', 0.0):.1f}"]
        lines.append("\t".join(cells))
    return "\n".join(lines)


# --- a synthetic Cohen-format TSV -------------------------------------------------------------------


def synthetic_pa(num: int, sigma: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(pA, correct) spread like Cohen et al.'s CIFAR-10 ResNet-110 at sigma = 0.25: ~9% abstain-like
    (pA in [0.3, 0.5)), ~17% wrong (radius up to 0.5 * sigma / 0.25), of the rest ~20% with pA = 1 and
    the others with a radius uniform up to the largest one (0.95 * sigma / 0.25)."""
    kind = rng.choice(3, size=num, p=(0.09, 0.17, 0.74))
    top = rng.uniform(0.0, 0.95, size=num) * sigma / 0.25
    pa = norm.cdf(top / sigma)
    pa = np.where(rng.uniform(size=num) < 0.2, 1.0, pa)
    pa = np.where(kind == 1, norm.cdf(rng.uniform(0.0, 0.5, size=num) / 0.25), pa)
    pa = np.where(kind == 0, rng.uniform(0.3, 0.5, size=num), pa)
    return pa, kind == 2


def synthetic_rows(num: int, sigma: float, n: int, alpha: float, seed: int = 0) -> list[dict]:
    """Rows of a fixed-n CERTIFY (n, alpha) of `num` images with pA from `synthetic_pa`."""
    rng = np.random.default_rng(seed)
    pa, right = synthetic_pa(num, sigma, rng)
    lower = clopper_pearson_lower(rng.binomial(n, pa), n, alpha)
    rows = []
    for idx, (p, ok) in enumerate(zip(lower, right)):
        label = idx % 10
        predict = -1 if p < 0.5 else (label if ok else (label + 1) % 10)
        rows.append({"idx": idx, "label": label, "predict": predict, "correct": int(predict == label),
                     "radius": radius(sigma, p) if p >= 0.5 else 0.0, "time": 0.0})
    return rows


def write_rows(path: Path, rows: Sequence[dict]) -> None:
    columns = ("idx", "label", "predict", "radius", "correct", "time")
    lines = ["\t".join(columns)] + ["\t".join(f"{row[c]:.6g}" if c == "radius" else str(row[c]) for c in columns)
                                    for row in rows]
    path.write_text("\n".join(lines) + "\n")


# --- command line -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tsv", nargs="?", type=Path, help="a Cohen-format certify.tsv to replay")
    parser.add_argument("--synthetic", type=int, metavar="NUM", help="replay NUM generated images instead")
    parser.add_argument("--write-synthetic", type=Path, help="also write the generated TSV here")
    parser.add_argument("--sigma", type=float, required=True)
    parser.add_argument("--n", type=int, default=100_000, help="the TSV's n, and n_max of the sequential runs")
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--radii", type=float, nargs="+", default=list(BENCH_RADII))
    parser.add_argument("--max-radius-loss", type=float, default=DEFAULT_MAX_RADIUS_LOSS)
    parser.add_argument("--final-share", type=float, default=FINAL_SHARE, help="share of alpha at the last look")
    parser.add_argument("--upper-alpha", type=float, default=UPPER_ALPHA, help="level of the stopping upper bounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the summaries here as JSON")
    parser.add_argument("--run", type=Path, help="model mode: certify this trained run (see above)")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_sequential"),
                        help="model mode: where the three certify directories go")
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.certify_args = argv[split + 1:]
    if sum(x is not None for x in (args.tsv, args.synthetic, args.run)) != 1:
        parser.error("give one of: a TSV to replay, --synthetic NUM, --run RUN_DIR")
    return args


def replay(args: argparse.Namespace) -> tuple[dict[str, Outcomes], str]:
    """Replay mode: the outcomes of a logged or generated TSV, and the table's title."""
    if args.tsv is not None:
        rows = read_tsv(args.tsv)
    else:
        rows = synthetic_rows(args.synthetic, args.sigma, args.n, args.alpha, args.seed)
        if args.write_synthetic:
            write_rows(args.write_synthetic, rows)
    rules = {"sequential stop=radii": {"stop": "radii", "radii": args.radii},
             "sequential stop=radius": {"stop": "radius", "max_radius_loss": args.max_radius_loss}}
    outcomes = replay_outcomes(rows, args.sigma, args.n0, args.n, args.alpha, rules, seed=args.seed,
                               final_share=args.final_share, upper_alpha=args.upper_alpha)
    return outcomes, (f"replay of {len(rows)} images, final_share={args.final_share}, "
                      f"upper_alpha={args.upper_alpha}")


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.run is not None:
        outcomes, title = run_outcomes(args), f"{args.run}, certify {' '.join(args.certify_args)}"
    else:
        outcomes, title = replay(args)
    summaries = compare(outcomes, radii=args.radii)
    print(f"{title}: sigma={args.sigma}, n=n_max={args.n}, n0={args.n0}, alpha={args.alpha}, radii={args.radii}, "
          f"max_radius_loss={args.max_radius_loss}")
    print(format_table(summaries))
    if args.json:
        args.json.write_text(json.dumps(summaries, indent=2) + "\n")
    return summaries


if __name__ == "__main__":
    main(sys.argv[1:])
