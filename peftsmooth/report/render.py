"""`peftsmooth report`'s products: one comparison table (Markdown, CSV, rich) and one plot.

The parts: report_scan finds runs and certifications (shards merged), report_table makes one row per
certification or run, with every number computed from the TSV rows by the code certify uses
(results.summarize); this module only formats them and draws the curves (results.curve).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Sequence

from peftsmooth.certify import results
from peftsmooth.report.scan import Certification
from peftsmooth.report.table import DEFAULT_RADII, Report, build_report, curve_label, run_info  # noqa: F401 (re-exported)

COLUMNS = ["method", "model", "sigma", "trainable params", "clean acc"]
CSV_KEYS = ["method", "model", "dataset", "sigma", "trainable_params", "total_params", "mode", "n",
            "num_images", "clean_accuracy"]
CSV_TAIL = ["acr", "samples_per_image", "cert_time_s", "forward_calls", "batch_fill", "wall_s", "status", "run",
            "certification", "alpha_total", "classifier_evaluations", "parent", "routes"]


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


def display_table(report: Report) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells (accuracies in %, as papers print them)."""
    header = COLUMNS + [results.radius_column(r) for r in report.radius_grid] + [
        "ACR", "samples/img", "cert time", "fwd calls", "fill", "status"]
    cells = []
    for row in report.rows:
        cells.append([
            str(row["method"]), str(row["model"]),
            "-" if row["sigma"] is None else f"{row['sigma']:g}",
            _fmt_count(row["trainable_params"]), _fmt_pct(row["clean_accuracy"]),
            *[_fmt_pct(row[results.radius_column(r)]) for r in report.radius_grid],
            "-" if row["acr"] is None or math.isnan(row["acr"]) else f"{row['acr']:.3f}",
            _fmt_count(row["samples_per_image"]), _fmt_time(row["cert_time_s"]), _fmt_count(row.get("forward_calls")),
            _fmt_pct(row.get("batch_fill")), row["status"],
        ])
    return header, cells


def to_markdown(report: Report) -> str:
    header, cells = display_table(report)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    note = ("Accuracies in %, on the certified test images; cert@r = certified accuracy at L2 radius r "
            "(native [0,1] pixel space); ACR = average certified radius; samples/img = mean forward "
            "passes per image.")
    return "\n".join(lines) + "\n\n" + note + "\n"


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
        table.add_column(name, justify="left" if name in ("method", "model", "status") else "right")
    for c in cells:
        table.add_row(*c)
    return table


# --------------------------------------------------------------------------- the plot

def curves_by_method(report: Report, radii) -> dict[str, list[tuple[Certification, float | None, list[float]]]]:
    """Per method label ("method (model)"): each certification, its sigma and its curve on `radii`."""
    cache: dict = {}
    out: dict[str, list] = {}
    for cert in report.certifications:
        if not cert.rows or not results.certifies((cert.summary or {}).get("mode")):
            continue
        label, sigma = curve_label(cert, run_info(cert.run, cache))
        out.setdefault(label, []).append((cert, sigma, results.curve(cert.rows, radii)))
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
    by_method = curves_by_method(report, radii)
    for color, (method, members) in zip(_colors(plt, len(by_method)), by_method.items()):
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


def _colors(plt, count: int) -> list[str]:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return [cycle[i % len(cycle)] for i in range(count)]
