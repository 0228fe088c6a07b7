"""`peftsmooth report`'s products: one comparison table (Markdown, CSV, rich) and one plot.

The parts: report_scan finds runs and certifications (shards merged), report_table makes one row per
certification or run, with every number computed from the TSV rows by the code certify uses
(results.summarize); this module only formats them and draws the curves (results.curve).
"""

from __future__ import annotations

import csv
import io
import math

from peftsmooth.certify import results
from peftsmooth.report.plot import curve_groups, envelope, plot_report  # noqa: F401 (re-exported)
from peftsmooth.report.table import DEFAULT_RADII, Report, build_report  # noqa: F401 (re-exported)

IDENTITY = ["method", "model", "sigma", "mode", "n", "alpha", "images"]  # how each row was certified
CSV_KEYS = ["method", "model", "dataset", "sigma", "mode", "n", "alpha", "num_images", "trainable_params",
            "total_params", "smoothed_accuracy"]
CSV_TAIL = ["acr", "samples_per_image", "cert_time_s", "forward_calls", "batch_fill", "wall_s", "status", "run",
            "certification", "alpha_total", "classifier_evaluations", "parent", "routes", "paper",
            "source"]
PUBLISHED_MARK = " (published)"  # after the method of a published row, in the printed tables
FOOTNOTE = (
    "Accuracies in %, on the certified test images. mode: how the row was certified (cohen: CERTIFY at a "
    "fixed n; sequential: CERTIFY stopped at fixed looks, n = its n_max; predict: PREDICT, no radii; "
    "imported: a log of another tool; any other: that mode's own rule); n: Monte Carlo samples per image "
    "behind each bound; alpha: the failure probability of each certificate (the total when certificates "
    "are combined); images: test images certified; trainable params: parameters trained for the noise; "
    "smoothed acc: certified accuracy at r = 0 (predict == label, abstentions wrong); cert@r: certified "
    "accuracy at L2 radius r (native [0,1] pixels); ACR: average certified radius; samples/img: mean noisy samples "
    "classified per image (classifier evaluations: n0 + n for cohen, both models for incremental); cert time: summed per-image time; fwd calls: batched forward "
    "passes; fill: samples drawn / batch capacity; (published): the field's published result, a blank "
    "radius is one its source has no value at (never interpolated); -: not known.")


def _cell(row: dict, key: str, text) -> str:
    """A published row's missing radius stays blank; anything else unknown is '-'."""
    return "" if row.get("published") and row.get(key) is None and key.startswith("cert@") else text


def _fmt_count(value) -> str:
    """Parameter and sample counts: 1.23M, 100.10k, 330."""
    if value is None:
        return "-"
    value = float(value)
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{int(value)}" if value == int(value) else f"{value:.1f}"


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


def method_cell(row: dict) -> str:
    return str(row["method"]) + (PUBLISHED_MARK if row.get("published") else "")


def identity_cells(row: dict) -> list[str]:
    """method, model, sigma, mode, n, alpha, images: what was certified and how."""
    return [method_cell(row), str(row["model"]) if row.get("model") else "-",
            "-" if row["sigma"] is None else f"{row['sigma']:g}", row.get("mode") or "-",
            "-" if row.get("n") is None else f"{int(row['n']):,}",
            "-" if row.get("alpha") is None else f"{float(row['alpha']):g}",
            "-" if not row.get("num_images") else f"{int(row['num_images']):,}"]


def display_table(report: Report) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells (accuracies in %, as papers print them)."""
    radius_columns = [results.radius_column(r) for r in report.radius_grid]
    header = IDENTITY + ["trainable params", "smoothed acc"] + radius_columns + [
        "ACR", "samples/img", "cert time", "fwd calls", "fill", "status"]
    cells = []
    for row in report.rows:
        cells.append([
            *identity_cells(row), _fmt_count(row["trainable_params"]), _fmt_pct(row["smoothed_accuracy"]),
            *[_cell(row, key, _fmt_pct(row[key])) for key in radius_columns],
            "-" if row["acr"] is None or math.isnan(row["acr"]) else f"{row['acr']:.3f}",
            _fmt_count(row["samples_per_image"]), _fmt_time(row["cert_time_s"]), _fmt_count(row.get("forward_calls")),
            _fmt_pct(row.get("batch_fill")), row["status"],
        ])
    return header, cells


def to_markdown(report: Report) -> str:
    header, cells = display_table(report)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    return "\n".join(lines) + "\n\n" + FOOTNOTE + "\n"


def to_csv(report: Report) -> str:
    """Raw numbers (fractions, seconds, integer parameter counts) for further analysis."""
    keys = CSV_KEYS + [results.radius_column(r) for r in report.radius_grid] + CSV_TAIL
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
        table.add_column(name, justify="left" if name in ("method", "model", "mode", "status") else "right")
    for c in cells:
        table.add_row(*c)
    table.caption = FOOTNOTE
    return table
