"""Certification results as files: Cohen's TSV, summary.json, curve.csv, curve.png, and shard merging.

Everything a summary says is computed from the TSV rows (Cohen's analysis: certified accuracy at r is
the fraction of images with `correct` and `radius >= r`; ACR is the mean of `correct * radius`), so a
resumed, sharded or merged certification summarizes exactly like one uninterrupted run.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable, Sequence

from peftsmooth.errors import UserError
from peftsmooth.runs import read_json, write_json

TSV_FILE = "certify.tsv"
SUMMARY_FILE = "summary.json"
CURVE_CSV = "curve.csv"
CURVE_PNG = "curve.png"
HEADER = ("idx", "label", "predict", "radius", "correct", "time")
RADIUS_DECIMALS = 6  # radii are written rounded DOWN, so the file never claims more than was certified

# Keys that give a TSV row its meaning: a run may only append to rows certified with the same values.
# (The noise of image idx depends only on (seed, idx), so the image selection may grow on resume.)
IDENTITY_KEYS = ("mode", "n0", "n", "alpha", "sigma", "seed", "precision", "dataset")
# Shards being merged must also share the image selection they split.
SELECTION_KEYS = ("skip", "start", "max")


def shard_dir_name(shard: int, num_shards: int) -> str:
    return f"shard{shard}of{num_shards}"


# --- the TSV --------------------------------------------------------------------------------

def format_row(idx: int, label: int, prediction: int, radius: float, correct: bool, seconds: float) -> str:
    whole, _, frac = f"{max(float(radius), 0.0):.12f}".partition(".")
    r = f"{whole}.{frac[:RADIUS_DECIMALS]}"  # truncated, not rounded: never more than was certified
    return f"{idx}\t{label}\t{prediction}\t{r}\t{int(bool(correct))}\t{seconds:.4f}\n"


def read_tsv(path: str | Path) -> list[dict]:
    """Rows of a certify.tsv as dicts (idx, label, predict, radius, correct, time); a torn last line
    from a killed run is ignored."""
    rows = []
    path = Path(path)
    if not path.is_file():
        return rows
    with open(path) as fh:
        header = tuple(fh.readline().rstrip("\n").split("\t"))
        if header != HEADER:
            raise UserError(f"{path} is not a certify.tsv (header {header!r}, expected {HEADER!r})")
        for line in fh:
            fields = line.rstrip("\n").split("\t")
            if not line.endswith("\n") or len(fields) != len(HEADER):
                continue
            rows.append({"idx": int(fields[0]), "label": int(fields[1]), "predict": int(fields[2]),
                         "radius": float(fields[3]), "correct": int(fields[4]), "time": float(fields[5])})
    return rows


class TsvWriter:
    """Appends one flushed row per image (the only file certify writes as it goes)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        _drop_torn_tail(self.path)
        new = not self.path.is_file() or self.path.stat().st_size == 0
        self._fh = open(self.path, "a")
        if new:
            self._fh.write("\t".join(HEADER) + "\n")
            self._fh.flush()

    def write(self, idx: int, label: int, prediction: int, radius: float, seconds: float) -> None:
        self._fh.write(format_row(idx, label, prediction, radius, prediction == label, seconds))
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_tsv(path: str | Path, rows: Sequence[dict]) -> None:
    """A whole TSV at once (merged shards), atomically."""
    from peftsmooth.runs import atomic_write_text

    lines = ["\t".join(HEADER) + "\n"] + [
        format_row(r["idx"], r["label"], r["predict"], r["radius"], r["predict"] == r["label"], r["time"]) for r in rows]
    atomic_write_text(path, "".join(lines))


def write_merged(out_dir: str | Path, shard_dirs: Sequence[Path], radius_grid: Sequence[float] | None = None) -> dict:
    """certify.tsv, summary.json and the curve of the merged shards, in out_dir."""
    rows, meta = merge_shards(shard_dirs)
    if radius_grid is None:
        radius_grid = (_read_summary(shard_dirs[0]) or {}).get("radius_grid") or [0.0]
    write_tsv(Path(out_dir) / TSV_FILE, rows)
    return write_results(out_dir, rows, radius_grid, **meta)


def _drop_torn_tail(path: Path) -> None:
    """Cut a partial last line (a run killed mid-write) so appended rows start on a fresh line."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as fh:
            fh.truncate(data.rfind(b"\n") + 1)


# --- the summary ----------------------------------------------------------------------------

def radius_key(r: float) -> str:
    return str(float(r))


def certified_accuracy(rows: Sequence[dict], r: float) -> float:
    """Fraction of images with predict == label and radius >= r (an abstention is never correct)."""
    return sum(1 for row in rows if row["correct"] and row["radius"] >= r) / len(rows) if rows else 0.0


def summarize(rows: Sequence[dict], radius_grid: Sequence[float], **meta) -> dict:
    """summary.json: the metrics of `rows` plus `meta` (settings, provenance); see the schema."""
    rows = sorted(rows, key=lambda row: row["idx"])
    num = len(rows)
    seconds = sum(row["time"] for row in rows)
    samples = num * (int(meta.get("n0") or 0) + int(meta.get("n") or 0)) if meta.get("mode") == "cohen" \
        else num * int(meta.get("n") or 0)
    cohen = meta.get("mode", "cohen") == "cohen"
    summary = {
        "acr": (sum(row["radius"] * row["correct"] for row in rows) / num if num else 0.0) if cohen else None,
        "certified_accuracy": {radius_key(r): certified_accuracy(rows, r) for r in radius_grid} if cohen else {},
        "radius_grid": [float(r) for r in radius_grid],
        "clean_accuracy": sum(row["correct"] for row in rows) / num if num else 0.0,
        "abstain_rate": sum(row["predict"] == -1 for row in rows) / num if num else 0.0,
        "num_images": num,
        "samples_per_second": samples / seconds if seconds > 0 else None,
        "elapsed_seconds": seconds,
    }
    summary.update(meta)
    planned = meta.get("num_planned")
    summary["complete"] = planned is not None and num == int(planned)
    return summary


def curve_points(rows: Sequence[dict], step: float = 0.01) -> list[tuple[float, float]]:
    """(radius, certified accuracy) from 0 to just past the largest certified radius."""
    top = max([row["radius"] for row in rows if row["correct"]], default=0.0)
    count = int(math.floor(top / step)) + 2
    return [(round(i * step, 10), certified_accuracy(rows, i * step)) for i in range(count)]


def write_curve_csv(rows: Sequence[dict], path: str | Path) -> None:
    from peftsmooth.runs import atomic_write_text

    lines = ["radius,certified_accuracy"] + [f"{r:g},{a:.6f}" for r, a in curve_points(rows)]
    atomic_write_text(path, "\n".join(lines) + "\n")


def plot_curve(rows: Sequence[dict], path: str | Path, *, acr: float, sigma: float, title: str = "") -> None:
    """Certified accuracy vs radius, with ACR and sigma in the legend (atomic write)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = curve_points(rows)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r for r, _ in points], [a for _, a in points], drawstyle="steps-post",
            label=f"sigma={sigma:g}, ACR={acr:.3f}")
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
    """Write a matplotlib figure atomically (temporary file + rename) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


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


# --- shards ---------------------------------------------------------------------------------

def find_shards(dirs: Iterable[str | Path]) -> list[Path]:
    """Shard directories among `dirs`: each dir is a shard (its summary.json has num_shards > 1) or
    holds shard subdirectories (`shard{i}of{k}/`)."""
    found = []
    for d in dirs:
        d = Path(str(d)).expanduser()
        if not d.is_dir():
            raise UserError(f"dirs: {d} is not a directory")
        summary = _read_summary(d)
        if summary is not None and int(summary.get("num_shards") or 1) > 1:
            found.append(d)
            continue
        subs = sorted(p.parent for p in d.glob("shard*of*/" + SUMMARY_FILE))
        if not subs:
            raise UserError(f"dirs: {d} is neither a certify shard nor a directory of shard*of*/ subdirectories")
        found += subs
    return found


def merge_shards(shard_dirs: Sequence[Path]) -> tuple[list[dict], dict]:
    """All shards' rows as one list (by idx) and the shared settings; shards must agree on them."""
    summaries = [(_read_summary(d) or {}) for d in shard_dirs]
    reference = summaries[0]
    for d, s in zip(shard_dirs, summaries):
        for key in (*IDENTITY_KEYS, *SELECTION_KEYS, "num_shards"):
            if s.get(key) != reference.get(key):
                raise UserError(f"dirs: {d} has {key}={s.get(key)} but {shard_dirs[0]} has {reference.get(key)}; "
                                f"only shards of one certification can be merged")
    by_shard = {}
    for d, s in zip(shard_dirs, summaries):
        if s.get("shard") in by_shard:
            raise UserError(f"dirs: shard {s.get('shard')} given twice ({by_shard[s.get('shard')]} and {d})")
        by_shard[s.get("shard")] = d
    rows: dict[int, dict] = {}
    for d in shard_dirs:
        for row in read_tsv(Path(d) / TSV_FILE):
            rows.setdefault(row["idx"], row)
    num_shards = int(reference.get("num_shards") or 1)
    meta = {k: v for k, v in reference.items() if k not in _METRIC_KEYS and k not in ("shard", "num_shards")}
    meta["merged_shards"] = num_shards
    meta["merged_from"] = [str(d) for d in shard_dirs]
    meta["num_planned"] = sum(int(s.get("num_planned") or 0) for s in summaries) if len(by_shard) == num_shards else None
    return [rows[i] for i in sorted(rows)], meta


_METRIC_KEYS = {"acr", "certified_accuracy", "clean_accuracy", "abstain_rate", "num_images",
                "samples_per_second", "elapsed_seconds", "complete", "radius_grid"}


def _read_summary(d: Path) -> dict | None:
    path = Path(d) / SUMMARY_FILE
    return read_json(path) if path.is_file() else None
