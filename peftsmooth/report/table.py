"""Gather runs and their certifications into one comparison table: one dict per row.

`report` reads only files: `run.json` of every train / denoise-baseline run, and `certify.tsv` +
`summary.json` of every certification found under the given directories (report_scan). Every number
in the table is computed from the TSV rows by results.summarize, the code certify writes its
summary.json with; summary.json gives only the metadata (method, model, sigma, n, mode, run, ...).

- Unfinished certifications (`complete: false`, or no summary yet) are marked `partial`.
- Shards (`certify.shard=i certify.num_shards=k`) are merged by image index after the same identity
  check as `peftsmooth merge`, and summarized as one certification; missing shards are marked.
- Runs without any certification are listed too (`not certified`), and a run whose training did
  not finish is marked.
- Logs of other tools brought in by `peftsmooth import` are certifications like any other, marked
  `imported` (their summary.json names the source files).

`build_report(dirs, radius_grid)` returns the table rows and the certifications; `peftsmooth.report.render`
renders them (Markdown, CSV, rich, plot).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from peftsmooth.certify import results
from peftsmooth.errors import UserError
from peftsmooth.report.scan import Certification, find_certifications
from peftsmooth.runs import read_run_info

DEFAULT_RADII = (0.25, 0.5, 0.75, 1.0)


@dataclass
class Report:
    """The table (one dict per row, in display order), the certifications behind the plot and the
    published results shown beside them (peftsmooth.report.published.PublishedRow)."""

    rows: list[dict]
    radius_grid: list[float]
    certifications: list[Certification]
    published: list = field(default_factory=list)


def check_dirs(dirs: Sequence[str | Path]) -> list[Path]:
    """The directories to scan; each must exist."""
    roots = [Path(str(d)).expanduser() for d in dirs]
    for root in roots:
        if not root.is_dir():
            raise UserError(f"dirs: {root} is not a directory (give directories holding train/certify runs)")
    return roots


def build_report(dirs: Sequence[str | Path], radius_grid: Sequence[float] = DEFAULT_RADII) -> Report:
    """Find every run and certification under `dirs` and build the comparison table."""
    roots = check_dirs(dirs)
    grid = sorted(float(r) for r in radius_grid)
    runs, certs = find_certifications(roots)
    cache: dict = {}
    rows = [certification_row(c, grid, run_info(c.run, cache)) for c in certs]
    certified_runs = {c.run for c in certs if c.run is not None}
    rows += [run_row(r, run_info(r, cache), grid) for r in runs if r not in certified_runs]
    rows.sort(key=row_order)
    return Report(rows=rows, radius_grid=grid, certifications=certs)


def row_order(row: dict) -> tuple:
    """Rows of one envelope (model, method, mode, n, alpha) together, by sigma."""
    number = lambda key: row[key] if row.get(key) is not None else math.inf  # noqa: E731
    return (str(row["dataset"]), str(row["model"]), str(row["method"]), str(row["mode"]), number("n"),
            number("alpha"), number("sigma"), str(row["certification"]))


def run_info(run: Path | None, cache: dict) -> dict:
    """A run's run.json ({} without a run, or when it cannot be read)."""
    if run is None:
        return {}
    if run not in cache:
        try:
            cache[run] = read_run_info(run)
        except (OSError, UserError):
            cache[run] = {}
    return cache[run]


# --------------------------------------------------------------------------- one row

def certification_row(cert: Certification, radius_grid: Sequence[float], info: dict) -> dict:
    """One table row: what was certified (metadata) and its numbers, computed from the TSV rows."""
    meta = results.summary_metadata(cert.summary)
    row = describe(meta, info)
    row.update(metrics(cert.rows, radius_grid, meta))
    row.update(status=status(cert, info), run=str(cert.run) if cert.run else None, certification=str(cert.path))
    return row


def run_row(run: Path, info: dict, radius_grid: Sequence[float]) -> dict:
    """A run with no certification yet: what it is, and that it is not certified."""
    row = describe({}, info)
    row.update(metrics([], radius_grid, {}))
    row.update(status=status(None, info), run=str(run), certification=None)
    return row


def describe(meta: dict, info: dict) -> dict:
    """The identifying columns of a row, from the certification's metadata and its run's run.json."""
    return {
        "method": method_label(meta, info),
        "model": meta.get("model_name") or info.get("model_name") or _model_label(info),
        "dataset": meta.get("dataset") or (info.get("dataset") or {}).get("name"),
        "sigma": _first(meta.get("sigma"), info.get("sigma")),
        "trainable_params": _first(info.get("trainable_params"), meta.get("trainable_params")),
        "total_params": info.get("total_params"),
        "mode": certification_mode(meta),
        "n": _first(meta.get("n_max"), meta.get("n")),
        "alpha": _first(meta.get("alpha_total"), meta.get("alpha")),
    }


def certification_mode(meta: dict) -> str | None:
    """How a row was certified: the summary's mode (any string: cohen, sequential, predict, and those
    later modes add), `imported` for a log of another tool that names none."""
    if meta.get("mode"):
        return str(meta["mode"])
    return "imported" if meta.get(results.IMPORTED_FROM) else None


def metrics(rows: Sequence[dict], radius_grid: Sequence[float], meta: dict) -> dict:
    """The numbers of a row, from the TSV rows through results.summarize (None without rows; no
    radii for PREDICT)."""
    if not rows:
        summary = {"num_images": 0, "certified_accuracy": {}}
    else:
        summary = results.summarize(rows, radius_grid, **meta)
    by_radius = summary["certified_accuracy"]
    return {
        "num_images": summary["num_images"],
        "smoothed_accuracy": summary.get("clean_accuracy"),  # certified accuracy at r = 0
        **{results.radius_column(r): by_radius.get(results.radius_key(r)) for r in radius_grid},
        "acr": summary.get("acr"),
        "samples_per_image": summary.get("mean_samples"),
        "cert_time_s": summary.get("elapsed_seconds"),
        "forward_calls": meta.get("forward_calls"),
        "batch_fill": meta.get("batch_fill"),
        "wall_s": meta.get("wall_seconds"),
        **incremental_columns(summary, meta),
    }


def incremental_columns(summary: dict, meta: dict) -> dict:
    """alpha_total (every mode: the alpha the rows hold at), classifier evaluations (both models of an
    incremental certification counted), and for certify=incremental the parent and the route counts."""
    routes = summary.get("routes")
    return {"alpha_total": meta.get("alpha_total", meta.get("alpha")),
            "classifier_evaluations": meta.get("classifier_evaluations", meta.get("samples_drawn")),
            "parent": meta.get("reference"),
            "routes": " ".join(f"{k}={v}" for k, v in sorted(routes.items())) if routes else None}


def status(cert: Certification | None, info: dict) -> str:
    parts = []
    if info and info.get("finished") is False:
        parts.append("training unfinished")
    if cert is None:
        parts.append("not certified")
    elif (cert.summary or {}).get(results.IMPORTED_FROM):
        parts.append("imported")
    elif cert.num_shards > 1:
        done = len(cert.shards)
        if cert.complete:
            parts.append(f"merged {done} shards")
        else:
            parts.append(f"partial: shards {done}/{cert.num_shards}, {len(cert.rows)} images")
    elif not cert.complete:
        parts.append(f"partial: {len(cert.rows)} images")
    elif cert.summary and cert.summary.get("merged_from"):
        parts.append(f"complete (merged {len(cert.summary['merged_from'])} shards)")
    text = "; ".join(parts) or "complete"
    if cert is not None and (cert.summary or {}).get("mode") == "incremental":
        text += (f"; incremental from {Path(str(cert.summary.get('reference'))).name}, "
                 f"alpha_total={cert.summary.get('alpha_total')}, routes: {_routes(cert.rows)}")
    return text


def _routes(rows: Sequence[dict]) -> str:
    routes = results.route_stats(rows).get("routes") or {}
    return " ".join(f"{k}={v}" for k, v in sorted(routes.items())) or "-"


def method_label(meta: dict, info: dict) -> str:
    """The method; a run certified at another sigma than it was trained at says so
    (e.g. the clean base `full (trained sigma=0)` certified at 0.5: the no-adaptation baseline)."""
    method = meta.get("method") or info.get("method") or "none"
    trained, certified = info.get("sigma"), meta.get("sigma")
    if trained is not None and certified is not None and not math.isclose(float(trained), float(certified)):
        method = f"{method} (trained sigma={float(trained):g})"
    return method


def curve_label(cert: Certification, info: dict) -> tuple[str, float | None]:
    """The envelope a certification's curve belongs to and its sigma. One envelope per (model, method,
    mode, n, alpha): "method (model), mode, n=..., alpha=..." (parts that are unknown left out), so
    that two modes or two sample sizes are never merged as if they were two sigmas."""
    row = describe(results.summary_metadata(cert.summary), info)
    return group_label(row), row["sigma"]


def group_label(row: dict) -> str:
    """"method (model), mode, n=..., alpha=..." of a table row (the envelope it belongs to)."""
    label = f"{row['method']} ({row['model']})" if row.get("model") else str(row["method"])
    parts = [label] + [str(row["mode"])] * bool(row.get("mode"))
    parts += [f"{key}={row[key]:g}" for key in ("n", "alpha") if row.get(key) is not None]
    return ", ".join(parts)


def _model_label(info: dict) -> str | None:
    model = info.get("model") or {}
    return model.get("name") if isinstance(model, dict) else None


def _first(*values):
    return next((v for v in values if v is not None), None)
