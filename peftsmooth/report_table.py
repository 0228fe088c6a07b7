"""Gather runs and their certifications into one comparison table and one plot.

`report` reads only files (DESIGN.md / STYLE.md rule 6): `run.json` of every train / denoise-baseline
run, and `certify.tsv` + `summary.json` of every certification found under the given directories.
A certification is one directory with a `certify.tsv` (or `summary.json`); certify writes it into
`<run>/certify/<mode>_sigma<s>_n<n>/` or, for an off-the-shelf model, under `outputs/certify/`.

- Finished certifications: the numbers are the ones in their `summary.json` (so the table equals
  the per-run summaries); radii outside the summary's grid are computed from the TSV rows.
- Unfinished ones (no summary yet, or `complete: false`): computed from the rows written so far,
  and marked `partial`.
- Shards (`certify.shard=i certify.num_shards=k`): the TSV rows of all shards are merged by image
  index and summarized as one certification; missing shards are marked.
- Runs without any certification are listed too (`not certified`), and a run whose training did
  not finish is marked.

`build_report(dirs, radius_grid)` returns the table rows (plain dicts) and the curves; the command
(`peftsmooth report`) writes report.md, report.csv and report.png and prints the table.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from peftsmooth import results
from peftsmooth.errors import UserError
from peftsmooth.runs import RUN_FILE
TSV_FILE = results.TSV_FILE
SUMMARY_FILE = results.SUMMARY_FILE
DEFAULT_RADII = (0.25, 0.5, 0.75, 1.0)

# A shard directory's name carries its index, e.g. `cohen_sigma0.5_n1000_shard1of4` or `shard1`.
_SHARD_TOKEN = re.compile(r"[_\-.]?shard[_\-]?(\d+)(?:[_\-]?of[_\-]?(\d+))?", re.IGNORECASE)


# --------------------------------------------------------------------------- reading files

read_tsv = results.read_tsv  # Cohen's TSV, torn last line of a killed run ignored


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def merge_rows(row_lists: Iterable[list[dict]]) -> list[dict]:
    """Rows of several shards (or a resumed run) as one list, one row per image, by index."""
    by_idx: dict[int, dict] = {}
    for rows in row_lists:
        for row in rows:
            by_idx.setdefault(row["idx"], row)
    return [by_idx[i] for i in sorted(by_idx)]


# --------------------------------------------------------------------------- metrics

certified_accuracy = results.certified_accuracy  # correct and radius >= r, over all images


def summarize_rows(rows: Sequence[dict], radius_grid: Sequence[float], mode: str = "cohen") -> dict:
    """ACR, smoothed clean accuracy and certified accuracy on `radius_grid` from TSV rows, exactly as
    certify summarizes them (results.summarize)."""
    summary = results.summarize(rows, radius_grid, mode=mode)
    by_radius = summary["certified_accuracy"]
    return {"acr": summary["acr"], "clean_accuracy": summary["clean_accuracy"],
            "certified_accuracy": {r: by_radius.get(results.radius_key(r)) for r in radius_grid},
            "num_images": summary["num_images"], "time": summary["elapsed_seconds"]}


def curve(rows: Sequence[dict], radii: Sequence[float]) -> list[float]:
    """Certified accuracy at each radius (the curve of the plot)."""
    good = sorted(r["radius"] for r in rows if r["correct"])
    n = len(rows)
    out, j = [], 0
    for radius in radii:  # radii ascending: count correct rows with radius >= r
        while j < len(good) and good[j] < radius:
            j += 1
        out.append((len(good) - j) / n if n else float("nan"))
    return out


# --------------------------------------------------------------------------- discovery

@dataclass
class Certification:
    """One certification as the report sees it (possibly several shard directories merged)."""

    path: Path
    rows: list[dict]
    summary: dict | None = None
    shards: list[Path] = field(default_factory=list)
    num_shards: int = 1
    complete: bool = False
    run: Path | None = None


def _walk(dirs: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """Run directories (run.json) and certification directories (certify.tsv, the record every
    certification writes first; a summary.json without it is a copy, e.g. the demo's)."""
    runs, certs, seen = [], [], set()
    for root in dirs:
        for here, subdirs, files in os.walk(root):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
            here_path = Path(here).resolve()
            if here_path in seen:
                continue
            seen.add(here_path)
            if RUN_FILE in files:
                runs.append(here_path)
            if TSV_FILE in files:
                certs.append(here_path)
    return runs, certs


def _shard_of(path: Path, summary: dict | None) -> tuple[int, int] | None:
    """(shard, num_shards) of a certification directory, from its summary or its name."""
    if summary and summary.get("shard") is not None and int(summary.get("num_shards") or 1) > 1:
        return int(summary["shard"]), int(summary["num_shards"])
    if summary and summary.get("shards"):  # a merged result (`peftsmooth merge`) is one certification
        return None
    m = _SHARD_TOKEN.search(path.name)
    if m and m.group(2):
        return int(m.group(1)), int(m.group(2))
    return None


def _shard_group_dir(path: Path) -> Path:
    """Where the shards of one certification belong: the name without its shard token
    (`x_shard1of4` -> `x`), or the parent of a bare `shard1of4` directory."""
    stripped = _SHARD_TOKEN.sub("", path.name)
    return path.with_name(stripped) if stripped else path.parent


def _owning_run(path: Path, summary: dict | None, runs: set[Path]) -> Path | None:
    """The run a certification belongs to: its summary's `run`, else the nearest enclosing run dir."""
    if summary and summary.get("run"):
        candidate = Path(str(summary["run"])).expanduser()
        if (candidate / RUN_FILE).is_file():
            return candidate.resolve()
    for parent in [path, *path.parents]:
        if parent in runs or (parent / RUN_FILE).is_file():
            return parent
    return None


def _load_single(path: Path) -> Certification:
    summary = _read_json(path / SUMMARY_FILE)
    rows = read_tsv(path / TSV_FILE) if (path / TSV_FILE).is_file() else []
    complete = bool(summary and summary.get("complete", True))
    return Certification(path=path, rows=rows, summary=summary, complete=complete)


def find_certifications(dirs: Sequence[Path]) -> tuple[list[Path], list[Certification]]:
    """Every run directory and every certification under `dirs`, shards merged into one."""
    run_dirs, cert_dirs = _walk(dirs)
    run_set = set(run_dirs)
    singles: list[Certification] = []
    groups: dict[tuple, list[tuple[int, int, Certification]]] = {}
    for path in cert_dirs:
        cert = _load_single(path)
        shard = _shard_of(path, cert.summary)
        if shard is None:
            singles.append(cert)
            continue
        stripped = _shard_group_dir(path)
        groups.setdefault((stripped, shard[1]), []).append((shard[0], shard[1], cert))
    single_paths = {c.path for c in singles}
    certs = list(singles)
    for (stripped, num_shards), members in sorted(groups.items(), key=lambda kv: str(kv[0][0])):
        # a merged result already written next to (or above) the shards wins over re-merging them
        if stripped in single_paths or any(m[2].path.parent in single_paths for m in members):
            continue
        members.sort(key=lambda m: m[0])
        present = {m[0] for m in members}
        complete = len(present) == num_shards and all(m[2].complete for m in members)
        summary = next((m[2].summary for m in members if m[2].summary), None)
        certs.append(Certification(
            path=stripped, rows=merge_rows(m[2].rows for m in members), summary=summary,
            shards=[m[2].path for m in members], num_shards=num_shards, complete=complete,
        ))
    for cert in certs:
        probe = cert.shards[0] if cert.shards else cert.path
        cert.run = _owning_run(probe, cert.summary, run_set)
    return sorted(run_dirs), sorted(certs, key=lambda c: str(c.path))


# --------------------------------------------------------------------------- the table

def _radius_key(radius: float) -> str:
    return f"cert@{radius:g}"


def _summary_value_at(summary: dict, radius: float) -> float | None:
    """certified_accuracy[radius] from a summary.json whose keys are strings like "0.25"."""
    for key, value in (summary.get("certified_accuracy") or {}).items():
        try:
            if math.isclose(float(key), radius, abs_tol=1e-9):
                return float(value)
        except (TypeError, ValueError):
            continue
    return None


def _run_info(run: Path | None, cache: dict) -> dict:
    if run is None:
        return {}
    if run not in cache:
        cache[run] = _read_json(run / RUN_FILE) or {}
    return cache[run]


def _status(cert: Certification | None, info: dict) -> str:
    parts = []
    if info and info.get("finished") is False:
        parts.append("training unfinished")
    if cert is None:
        parts.append("not certified")
    elif cert.num_shards > 1:
        done = len(cert.shards)
        if cert.complete:
            parts.append(f"merged {done} shards")
        else:
            parts.append(f"partial: shards {done}/{cert.num_shards}, {len(cert.rows)} images")
    elif not cert.complete:
        parts.append(f"partial: {len(cert.rows)} images")
    elif cert.summary and cert.summary.get("shards"):
        parts.append(f"complete (merged {len(cert.summary['shards'])} shards)")
    return "; ".join(parts) or "complete"


def certification_row(cert: Certification, radius_grid: Sequence[float], info: dict) -> dict:
    """One table row: the summary's numbers when it is a finished single run, else the TSV's."""
    summary = cert.summary or {}
    from_rows = summarize_rows(cert.rows, radius_grid, mode=summary.get("mode") or "cohen")
    use_summary = cert.complete and cert.num_shards == 1 and bool(cert.summary)
    predict_only = summary.get("mode") == "predict"
    if not use_summary and not cert.rows:  # started, no image finished yet: nothing to show
        from_rows = {"acr": None, "clean_accuracy": None, "num_images": 0, "time": None,
                     "certified_accuracy": {r: None for r in radius_grid}}
    row = {
        "method": _method_label(summary, info),
        "model": summary.get("model_name") or info.get("model_name") or _model_label(info),
        "dataset": summary.get("dataset") or (info.get("dataset") or {}).get("name"),
        "sigma": _first(summary.get("sigma"), info.get("sigma")),
        "trainable_params": _first(info.get("trainable_params"), summary.get("trainable_params")),
        "total_params": info.get("total_params"),
        "mode": summary.get("mode"),
        "n": summary.get("n"),
        "num_images": summary.get("num_images") if use_summary else from_rows["num_images"],
        "clean_accuracy": summary.get("clean_accuracy") if use_summary else from_rows["clean_accuracy"],
    }
    for radius in radius_grid:
        value = _summary_value_at(summary, radius) if use_summary else None
        if value is None:
            value = from_rows["certified_accuracy"][radius]
        row[_radius_key(radius)] = None if predict_only else value
    row["acr"] = None if predict_only else (summary.get("acr") if use_summary else from_rows["acr"])
    row["cert_time_s"] = _cert_time(cert, from_rows["time"])
    row["status"] = _status(cert, info)
    row["run"] = str(cert.run) if cert.run else None
    row["certification"] = str(cert.path)
    return row


def _cert_time(cert: Certification, tsv_time: float) -> float:
    """Wall time of the certification: summary elapsed_seconds (summed over shards), else the TSV's."""
    if cert.num_shards == 1 and cert.summary and cert.summary.get("elapsed_seconds") is not None:
        return float(cert.summary["elapsed_seconds"])
    if cert.shards and cert.complete:
        times = [(_read_json(p / SUMMARY_FILE) or {}).get("elapsed_seconds") for p in cert.shards]
        if all(t is not None for t in times):
            return float(sum(times))
    return tsv_time


def _method_label(summary: dict, info: dict) -> str:
    """The method; a run certified at another sigma than it was trained at says so
    (e.g. the clean base `full (trained sigma=0)` certified at 0.5: the no-adaptation baseline)."""
    method = summary.get("method") or info.get("method") or "none"
    trained, certified = info.get("sigma"), summary.get("sigma")
    if trained is not None and certified is not None and not math.isclose(float(trained), float(certified)):
        method = f"{method} (trained sigma={float(trained):g})"
    return method


def _model_label(info: dict) -> str | None:
    model = info.get("model") or {}
    return model.get("name") if isinstance(model, dict) else None


def _first(*values):
    return next((v for v in values if v is not None), None)


def run_row(run: Path, info: dict, radius_grid: Sequence[float]) -> dict:
    """A run with no certification yet: what it is, and that it is not certified."""
    row = {
        "method": info.get("method") or "none", "model": info.get("model_name") or _model_label(info),
        "dataset": (info.get("dataset") or {}).get("name"), "sigma": info.get("sigma"),
        "trainable_params": info.get("trainable_params"), "total_params": info.get("total_params"),
        "mode": None, "n": None, "num_images": 0, "clean_accuracy": None,
    }
    row.update({_radius_key(r): None for r in radius_grid})
    row.update({"acr": None, "cert_time_s": None, "status": _status(None, info),
                "run": str(run), "certification": None})
    return row


@dataclass
class Report:
    """The table (one dict per row, in display order) and the curves behind the plot."""

    rows: list[dict]
    radius_grid: list[float]
    certifications: list[Certification]


def build_report(dirs: Sequence[str | Path], radius_grid: Sequence[float] = DEFAULT_RADII) -> Report:
    """Find every run and certification under `dirs` and build the comparison table."""
    roots = [Path(str(d)).expanduser() for d in dirs]
    for root in roots:
        if not root.is_dir():
            raise UserError(f"dirs: {root} is not a directory (give directories holding train/certify runs)")
    grid = sorted(float(r) for r in radius_grid)
    runs, certs = find_certifications(roots)
    cache: dict = {}
    rows = [certification_row(c, grid, _run_info(c.run, cache)) for c in certs]
    certified_runs = {c.run for c in certs if c.run is not None}
    rows += [run_row(r, _run_info(r, cache), grid) for r in runs if r not in certified_runs]
    rows.sort(key=lambda r: (str(r["dataset"]), str(r["model"]), str(r["method"]),
                             r["sigma"] if r["sigma"] is not None else math.inf, str(r["certification"])))
    return Report(rows=rows, radius_grid=grid, certifications=certs)


# --------------------------------------------------------------------------- output formats

COLUMNS = ["method", "model", "sigma", "trainable params", "clean acc"]


def _fmt_params(value) -> str:
    if value is None:
        return "-"
    value = float(value)
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{int(value)}"


def _fmt_pct(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def _fmt_time(seconds) -> str:
    if seconds is None:
        return "-"
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}min"
    return f"{seconds / 3600:.1f}h"


def display_table(report: Report) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells (accuracies in %, as papers print them)."""
    header = COLUMNS + [f"cert@{r:g}" for r in report.radius_grid] + ["ACR", "cert time", "status"]
    cells = []
    for row in report.rows:
        cells.append([
            str(row["method"]), str(row["model"]),
            "-" if row["sigma"] is None else f"{row['sigma']:g}",
            _fmt_params(row["trainable_params"]), _fmt_pct(row["clean_accuracy"]),
            *[_fmt_pct(row[_radius_key(r)]) for r in report.radius_grid],
            "-" if row["acr"] is None or math.isnan(row["acr"]) else f"{row['acr']:.3f}",
            _fmt_time(row["cert_time_s"]), row["status"],
        ])
    return header, cells


def to_markdown(report: Report) -> str:
    header, cells = display_table(report)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    note = ("Accuracies in %, on the certified test images; cert@r = certified accuracy at L2 radius r "
            "(native [0,1] pixel space); ACR = average certified radius.")
    return "\n".join(lines) + "\n\n" + note + "\n"


def to_csv(report: Report) -> str:
    """Raw numbers (fractions, seconds, integer parameter counts) for further analysis."""
    keys = ["method", "model", "dataset", "sigma", "trainable_params", "total_params", "mode", "n",
            "num_images", "clean_accuracy", *[_radius_key(r) for r in report.radius_grid], "acr",
            "cert_time_s", "status", "run", "certification"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in report.rows:
        writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in keys})
    return buf.getvalue()


def rich_table(report: Report):
    from rich.table import Table

    header, cells = display_table(report)
    table = Table(title="peftsmooth report", show_lines=False)
    for name in header:
        table.add_column(name, justify="left" if name in ("method", "model", "status") else "right")
    for c in cells:
        table.add_row(*c)
    return table


def _curve_label(cert: Certification, info: dict) -> tuple[str, float | None]:
    summary = cert.summary or {}
    method = _method_label(summary, info)
    model = summary.get("model_name") or info.get("model_name") or _model_label(info)
    sigma = _first(summary.get("sigma"), info.get("sigma"))
    return f"{method} ({model})", sigma


def curves_by_method(report: Report, radii) -> dict[str, list[tuple[Certification, float | None, list[float]]]]:
    """Per method label ("method (model)"): each certification, its sigma and its curve on `radii`."""
    cache: dict = {}
    out: dict[str, list] = {}
    for cert in report.certifications:
        if not cert.rows or (cert.summary or {}).get("mode") == "predict":
            continue
        label, sigma = _curve_label(cert, _run_info(cert.run, cache))
        out.setdefault(label, []).append((cert, sigma, curve(cert.rows, radii)))
    return dict(sorted(out.items()))


def envelope(curves: Sequence[Sequence[float]]) -> list[float]:
    """Best certified accuracy over sigma at each radius (pointwise maximum of the curves)."""
    return [max(values) for values in zip(*curves)]


def plot_report(report: Report, path: str | Path) -> None:
    """All certified-accuracy curves (thin) and, per method, the best-over-sigma envelope (thick)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rmax = max([r["radius"] for c in report.certifications for r in c.rows] + [max(report.radius_grid, default=1.0)])
    radii = list(np.linspace(0.0, rmax * 1.05 + 1e-9, 400))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    by_method = curves_by_method(report, radii)
    for i, (method, members) in enumerate(by_method.items()):
        color = colors[i % len(colors)]
        for cert, _sigma, values in members:
            ax.plot(radii, values, color=color, lw=0.8, alpha=0.45, ls="-" if cert.complete else "--")
        sigmas = ", ".join(f"{s:g}" for _, s, _ in members if s is not None)
        ax.plot(radii, envelope([v for _, _, v in members]), color=color, lw=2.2,
                label=f"{method}, best over sigma in {{{sigmas}}}")
    ax.set_xlabel("L2 radius (native [0,1] pixels)")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    if by_method:
        ax.legend(fontsize=8)
    ax.set_title("thin: one sigma each (dashed: unfinished); thick: best-over-sigma envelope", fontsize=9)
    fig.tight_layout()
    results.save_figure(fig, path)
