"""Certification results as files: summary.json, curve.csv, curve.png, and shard merging.

This module owns every results concept but the TSV format itself (peftsmooth.certify.tsv, whose names it
re-exports): shard directory names, the metrics, the radius keys, the curves, the check and merge of
shards. Everything a summary
says is computed from the TSV rows (Cohen's analysis: certified accuracy at r is the fraction of images
with `correct` and `radius >= r`; ACR is the mean of `correct * radius`; rule 4 in
docs/architecture.md), so a resumed, sharded or merged certification summarizes exactly like one
uninterrupted run, and `report` shows the numbers certify wrote.
"""

from __future__ import annotations

import json
import math
import re
from bisect import bisect_left
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from peftsmooth.certify.tsv import HEADER, SAMPLES, TSV_FILE, TsvWriter, read_tsv, write_tsv  # noqa: F401 (re-exported)
from peftsmooth.errors import UserError
from peftsmooth.runtime import atomic_write, atomic_write_text

SUMMARY_FILE = "summary.json"
CURVE_CSV = "curve.csv"
CURVE_PNG = "curve.png"
ABSTAIN = -1
IMPORTED_FROM = "imported_from"  # summary.json key of a log brought in by `peftsmooth import`: its source files

# Keys that give a TSV row its meaning: a run may only append to rows certified with the same values.
# (The noise of image idx depends only on (seed, idx), so the image selection may grow on resume.)
# `noise`: the noise scheme (certify.noise.NOISE_SCHEME), so that rows of different noise never mix.
IDENTITY_KEYS = ("mode", "n0", "n", "alpha", "sigma", "seed", "precision", "dataset", "noise",
                 "stop", "radii", "max_radius_loss",  # certify=sequential's stopping rule
                 "reference", "fallback", "expected_disagreement")  # certify=incremental's parent and routing
# Shards being merged must also share the image selection they split.
SELECTION_KEYS = ("skip", "start", "max")
# Counters of the forward passes, which the rows cannot tell: summed over the sessions of a resumed
# certification and over merged shards. batch_fill = samples_drawn / batch_capacity (the rows the
# completed forward passes could hold); wall_seconds: the certification loop's wall time.
# classifier_evaluations: samples_drawn in the one-model modes, both models counted in certify=incremental.
THROUGHPUT_KEYS = ("forward_calls", "samples_drawn", "classifier_evaluations", "batch_capacity", "wall_seconds")
# What summarize computes from the rows; every other key of a summary.json is metadata.
METRIC_KEYS = frozenset({"acr", "certified_accuracy", "clean_accuracy", "abstain_rate", "num_images",
                         "samples_per_second", "elapsed_seconds", "complete", "radius_grid",
                         "mean_samples", "total_samples", "samples_quantiles", "routes", "measured_disagreement"})


# --- shard directories ----------------------------------------------------------------------

_SHARD_DIR = re.compile(r"shard(\d+)of(\d+)")


def shard_dir_name(shard: int, num_shards: int) -> str:
    return f"shard{shard}of{num_shards}"


def parse_shard_dir_name(name: str) -> tuple[int, int] | None:
    """(shard, num_shards) of a directory named by shard_dir_name, else None."""
    match = _SHARD_DIR.fullmatch(name)
    if not match:
        return None
    shard, num = int(match.group(1)), int(match.group(2))
    return (shard, num) if 0 <= shard < num else None


def shard_of(summary: dict | None) -> tuple[int, int] | None:
    """(shard, num_shards) when a summary.json belongs to one shard of a sharded certification."""
    if not summary or summary.get("shard") is None or int(summary.get("num_shards") or 1) <= 1:
        return None
    return int(summary["shard"]), int(summary["num_shards"])


# --- the metrics ----------------------------------------------------------------------------

def radius_key(r: float) -> str:
    """The key of radius r in summary.json's certified_accuracy."""
    return str(float(r))


def radius_column(r: float) -> str:
    """The column of radius r in report's table."""
    return f"cert@{r:g}"


def certifies(mode: str | None) -> bool:
    """Whether a mode certifies radii (CERTIFY and its variants) or only predicts (PREDICT)."""
    return mode != "predict"


def curve(rows: Sequence[dict], radii: Iterable[float]) -> list[float]:
    """Certified accuracy at each radius: the fraction of rows with correct and radius >= r
    (an abstention is never correct); nan without rows."""
    good = sorted(row["radius"] for row in rows if row["correct"])
    n = len(rows)
    return [(len(good) - bisect_left(good, r)) / n if n else math.nan for r in radii]


def certified_accuracy(rows: Sequence[dict], r: float) -> float:
    """Fraction of images with predict == label and radius >= r (0 without rows)."""
    return curve(rows, [r])[0] if rows else 0.0


def fixed_samples(meta: dict) -> int | None:
    """Forward passes per image of the fixed-n modes (CERTIFY: n0 + n, PREDICT: n), for rows written
    before the samples column existed; None for other modes."""
    n0, n = int(meta.get("n0") or 0), int(meta.get("n") or 0)
    return {"cohen": n0 + n, "predict": n}.get(meta.get("mode"))


def samples_stats(rows: Sequence[dict], meta: dict) -> dict:
    """Mean, total and quantiles of the samples spent per image (None when unknown)."""
    fixed = fixed_samples(meta)
    per_image = [row.get(SAMPLES, fixed) for row in rows]
    if not per_image or None in per_image:
        return {"mean_samples": None, "total_samples": None, "samples_quantiles": None}
    import numpy as np

    p10, p50, p90 = (float(q) for q in np.quantile(per_image, [0.1, 0.5, 0.9]))
    total = int(sum(per_image))
    return {"mean_samples": total / len(per_image), "total_samples": total,
            "samples_quantiles": {"p10": p10, "p50": p50, "p90": p90, "max": int(max(per_image))}}


def route_stats(rows: Sequence[dict]) -> dict:
    """Incremental certification: images per route, and the disagreement measured on the zeta samples
    (disagreements / samples drawn by the disagreement test, each sample counted once); {} otherwise."""
    if not rows or any(row.get("route") is None for row in rows):
        return {}
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["route"]] = counts.get(row["route"], 0) + 1
    tested = [row for row in rows if row["route"] == "disagreement"]
    pairs = sum(row[SAMPLES] // 2 for row in tested)
    measured = sum(row["disagreements"] for row in tested) / pairs if pairs else None
    return {"routes": counts, "measured_disagreement": measured}


def summarize(rows: Sequence[dict], radius_grid: Sequence[float], **meta) -> dict:
    """summary.json: the metrics of `rows` plus `meta` (settings, provenance); see the schema."""
    rows = sorted(rows, key=lambda row: row["idx"])
    num = len(rows)
    seconds = sum(row["time"] for row in rows)
    cost = samples_stats(rows, meta)
    radii = certifies(meta.get("mode", "cohen"))
    summary = {
        "acr": (sum(row["radius"] * row["correct"] for row in rows) / num if num else 0.0) if radii else None,
        "certified_accuracy": {radius_key(r): certified_accuracy(rows, r) for r in radius_grid} if radii else {},
        "radius_grid": [float(r) for r in radius_grid],
        "clean_accuracy": sum(row["correct"] for row in rows) / num if num else 0.0,
        "abstain_rate": sum(row["predict"] == ABSTAIN for row in rows) / num if num else 0.0,
        "num_images": num,
        "samples_per_second": cost["total_samples"] / seconds if seconds > 0 and cost["total_samples"] is not None
        else None,
        "elapsed_seconds": seconds,
        **cost,
        **route_stats(rows),
    }
    summary.update(meta)
    planned = meta.get("num_planned")
    summary["complete"] = planned is not None and num == int(planned)
    return summary


def throughput(*counters: dict | None) -> dict:
    """THROUGHPUT_KEYS summed over `counters` (sessions or shards; None or a missing key counts 0), and
    batch_fill; {} when none of them has any."""
    present = [c for c in counters if c and any(c.get(k) is not None for k in THROUGHPUT_KEYS)]
    if not present:
        return {}
    totals = {k: sum(c.get(k) or 0 for c in present) for k in THROUGHPUT_KEYS}
    # a session recorded before classifier_evaluations existed evaluated one model per sample
    totals["classifier_evaluations"] = sum(c.get("classifier_evaluations", c.get("samples_drawn")) or 0 for c in present)
    totals["wall_seconds"] = round(float(totals["wall_seconds"]), 3)
    totals["batch_fill"] = totals["samples_drawn"] / totals["batch_capacity"] if totals["batch_capacity"] else None
    return totals


def summary_metadata(summary: dict | None) -> dict:
    """The settings and provenance of a summary.json: everything but what summarize computes."""
    return {k: v for k, v in (summary or {}).items() if k not in METRIC_KEYS}


# --- the files ------------------------------------------------------------------------------

def _curve_radii(row_lists: Iterable[Sequence[dict]], step: float) -> list[float]:
    """Radii from 0 to just past the largest certified radius of any of the row lists."""
    top = max([row["radius"] for rows in row_lists for row in rows if row["correct"]], default=0.0)
    return [i * step for i in range(int(math.floor(top / step)) + 2)]


def curve_points(rows: Sequence[dict], step: float = 0.01) -> list[tuple[float, float]]:
    """(radius, certified accuracy) from 0 to just past the largest certified radius."""
    radii = _curve_radii([rows], step)
    return [(round(r, 10), a) for r, a in zip(radii, curve(rows, radii))]


def write_curve_csv(rows: Sequence[dict], path: str | Path) -> None:
    lines = ["radius,certified_accuracy"] + [f"{r:g},{a:.6f}" for r, a in curve_points(rows)]
    atomic_write_text(path, "\n".join(lines) + "\n")


def write_curves_csv(curves: Mapping[str, Sequence[dict]], path: str | Path, step: float = 0.01) -> None:
    """Several certifications' curves on one grid of radii: `radius,<label>,<label>,...`."""
    radii = _curve_radii(curves.values(), step)
    columns = [curve(rows, radii) for rows in curves.values()]
    lines = [",".join(["radius", *curves])]
    lines += [",".join([f"{round(r, 10):g}", *(f"{c[i]:.6f}" for c in columns)]) for i, r in enumerate(radii)]
    atomic_write_text(path, "\n".join(lines) + "\n")


def plot_curve(rows: Sequence[dict], path: str | Path, *, acr: float, sigma: float, title: str = "") -> None:
    """Certified accuracy vs radius, with ACR and sigma in the legend (atomic write)."""
    plot_curves({f"sigma={sigma:g}": (rows, acr)}, path, title=title)


def plot_curves(curves: Mapping[str, tuple[Sequence[dict], float]], path: str | Path, *, title: str = "") -> None:
    """Certified accuracy vs radius of several certifications (label -> (rows, ACR)) on one axis, each
    legend entry with its ACR (atomic write)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, (rows, acr) in curves.items():
        points = curve_points(rows)
        ax.plot([r for r, _ in points], [a for _, a in points], drawstyle="steps-post", label=f"{label}, ACR={acr:.3f}")
    ax.set_xlabel("radius (L2, native pixels in [0,1])")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path: str | Path) -> None:
    """Write a matplotlib figure atomically and close it."""
    import matplotlib.pyplot as plt

    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    finally:
        plt.close(fig)


def write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_results(out_dir: str | Path, rows: Sequence[dict], radius_grid: Sequence[float], **meta) -> dict:
    """summary.json, and for CERTIFY curve.csv and curve.png, all from `rows`."""
    out_dir = Path(out_dir)
    summary = summarize(rows, radius_grid, **meta)
    if summary["acr"] is not None and rows:
        write_curve_csv(rows, out_dir / CURVE_CSV)
        title = " ".join(str(meta[k]) for k in ("method", "model_name", "dataset") if meta.get(k))
        plot_curve(rows, out_dir / CURVE_PNG, acr=summary["acr"], sigma=float(meta.get("sigma") or 0), title=title)
    write_json(out_dir / SUMMARY_FILE, summary)
    return summary


# --- certification directories and shards ---------------------------------------------------

@dataclass
class CertificationFiles:
    """One certification directory as read from disk: its summary.json (None if absent) and TSV rows."""

    path: Path
    summary: dict | None
    rows: list[dict]


def read_summary(d: str | Path) -> dict | None:
    path = Path(d) / SUMMARY_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err.msg}, line {err.lineno})") from None


def load_certification(d: str | Path) -> CertificationFiles:
    d = Path(d)
    return CertificationFiles(path=d, summary=read_summary(d), rows=read_tsv(d / TSV_FILE))


def find_shards(dirs: Iterable[str | Path]) -> list[Path]:
    """Shard directories among `dirs`: each dir is a shard (its summary.json has num_shards > 1) or
    holds shard subdirectories (`shard{i}of{k}/` with a summary.json)."""
    found = []
    for d in dirs:
        d = Path(str(d)).expanduser()
        if not d.is_dir():
            raise UserError(f"dirs: {d} is not a directory")
        if shard_of(read_summary(d)) is not None:
            found.append(d)
            continue
        subs = sorted(p for p in d.iterdir() if parse_shard_dir_name(p.name) and (p / SUMMARY_FILE).is_file())
        if not subs:
            raise UserError(f"dirs: {d} is neither a certify shard nor a directory of shard<i>of<k>/ subdirectories")
        found += subs
    return found


def check_shards(shards: Sequence[CertificationFiles]) -> None:
    """Shards merge only when they are parts of one certification: the same settings and image
    selection, each shard index once."""
    reference = shards[0].summary or {}
    for shard in shards:
        summary = shard.summary or {}
        for key in (*IDENTITY_KEYS, *SELECTION_KEYS, "num_shards", "weights_sha256"):  # the same classifier too
            if summary.get(key) != reference.get(key):
                raise UserError(f"dirs: {shard.path} has {key}={summary.get(key)} but {shards[0].path} has "
                                f"{reference.get(key)}; only shards of one certification can be merged")
    seen = {}
    for shard in shards:
        index = (shard.summary or {}).get("shard")
        if index in seen:
            raise UserError(f"dirs: shard {index} given twice ({seen[index]} and {shard.path})")
        seen[index] = shard.path


def merge_rows(row_lists: Iterable[Sequence[dict]]) -> list[dict]:
    """Rows of several shards as one list, one row per image, by index."""
    by_idx: dict[int, dict] = {}
    for rows in row_lists:
        for row in rows:
            by_idx.setdefault(row["idx"], row)
    return [by_idx[i] for i in sorted(by_idx)]


def merge_certifications(shards: Sequence[CertificationFiles]) -> tuple[list[dict], dict]:
    """All shards' rows as one list (by idx) and the shared settings, after check_shards."""
    check_shards(shards)
    summaries = [s.summary or {} for s in shards]
    num_shards = int(summaries[0].get("num_shards") or 1)
    meta = {k: v for k, v in summary_metadata(summaries[0]).items() if k not in ("shard", "num_shards")}
    meta["merged_shards"] = num_shards
    meta["merged_from"] = [str(s.path) for s in shards]
    complete_set = len({s.get("shard") for s in summaries}) == num_shards
    meta["num_planned"] = sum(int(s.get("num_planned") or 0) for s in summaries) if complete_set else None
    meta.update(throughput(*summaries))
    return merge_rows(s.rows for s in shards), meta


def merge_shards(shard_dirs: Sequence[Path]) -> tuple[list[dict], dict]:
    """All shards' rows as one list (by idx) and the shared settings; shards must agree on them."""
    return merge_certifications([load_certification(d) for d in shard_dirs])


def write_merged(out_dir: str | Path, shard_dirs: Sequence[Path], radius_grid: Sequence[float] | None = None) -> dict:
    """certify.tsv, summary.json and the curve of the merged shards, in out_dir."""
    shards = [load_certification(d) for d in shard_dirs]
    rows, meta = merge_certifications(shards)  # every shard read and checked before anything is written
    if radius_grid is None:
        radius_grid = (shards[0].summary or {}).get("radius_grid") or [0.0]
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_tsv(Path(out_dir) / TSV_FILE, rows)
    return write_results(out_dir, rows, radius_grid, **meta)
