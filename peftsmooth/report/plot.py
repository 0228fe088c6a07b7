"""`report.png` / `report.pdf`: every certified-accuracy curve and the best-over-sigma envelopes.

An envelope is taken per (model, method, mode, n, alpha) group (table.group_label): two modes or two
sample sizes of one model are two envelopes, never merged as if they were two sigmas. The legend names
each group and the sigmas its envelope covers. Published results (report.published) are dashed, with
markers at the radii their source has a value for; the dashes only join those points (a
certified-accuracy curve is non-increasing, so between two markers it lies between their values).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from peftsmooth.certify import results
from peftsmooth.report.scan import Certification
from peftsmooth.runtime import atomic_write
from peftsmooth.report.table import Report, curve_label, group_label, run_info


def curve_groups(report: Report, radii) -> dict[str, list[tuple[Certification, float | None, list[float]]]]:
    """Per group label ("method (model), mode, n=..., alpha=..."): each certification, its sigma and its
    curve on `radii`."""
    cache: dict = {}
    out: dict[str, list] = {}
    for cert in report.certifications:
        if not cert.rows or not results.certifies((cert.summary or {}).get("mode")):
            continue
        label, sigma = curve_label(cert, run_info(cert.run, cache))
        out.setdefault(label, []).append((cert, sigma, results.curve(cert.rows, radii)))
    return dict(sorted(out.items()))


def published_groups(report: Report) -> dict[str, list]:
    """Per group label (as for our rows, marked published): the published rows, by sigma."""
    from peftsmooth.report.published import table_row

    out: dict[str, list] = {}
    for row in sorted(report.published, key=lambda r: r.sigma):
        label = group_label({**table_row(row, []), "model": f"{row.model}, {row.images:,} images"})
        out.setdefault(f"{label}, published", []).append(row)
    return dict(sorted(out.items()))


def envelope(curves: Sequence[Sequence[float]]) -> list[float]:
    """Best certified accuracy over sigma at each radius (pointwise maximum of the curves)."""
    return [max(values) for values in zip(*curves)]


def published_envelope(rows: Sequence) -> tuple[list[float], list[float]]:
    """Radii any of the rows has a value at, and the best value over the rows there."""
    radii = sorted({r for row in rows for r in row.accuracy})
    return radii, [max(row.at(r) for row in rows if row.at(r) is not None) for r in radii]


def _sigmas(values) -> str:
    return ", ".join(f"{s:g}" for s in values if s is not None)


def _draw(ax, plt, report: Report) -> None:
    import numpy as np

    rmax = max([r["radius"] for c in report.certifications for r in c.rows]
               + [max(report.radius_grid, default=1.0)])
    radii = list(np.linspace(0.0, rmax * 1.05 + 1e-9, 400))
    ours, published = curve_groups(report, radii), published_groups(report)
    colors = _colors(plt, len(ours) + len(published))
    for color, (label, members) in zip(colors, ours.items()):
        for cert, _sigma, values in members:
            ax.plot(radii, values, color=color, lw=0.8, alpha=0.45, ls="-" if cert.complete else ":")
        ax.plot(radii, envelope([v for _, _, v in members]), color=color, lw=2.2,
                label=f"{label}; best over sigma in {{{_sigmas(s for _, s, _ in members)}}}")
    for color, (label, rows) in zip(colors[len(ours):], published.items()):
        xs, ys = published_envelope(rows)
        ax.plot(xs, ys, color=color, lw=1.8, ls="--", marker="o", ms=3,
                label=f"{label}; best over sigma in {{{_sigmas(r.sigma for r in rows)}}}")


def plot_report(report: Report, paths: str | Path | Sequence[str | Path]) -> list[str]:
    """All certified-accuracy curves (thin) and, per group, the best-over-sigma envelope (thick;
    published results dashed), written to each of `paths` (the format follows the suffix: png, pdf).
    Returns the legend's entries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    fig, ax = plt.subplots(figsize=(8, 5))
    try:
        _draw(ax, plt, report)
        ax.set_xlabel("L2 radius (native [0,1] pixels)")
        ax.set_ylabel("certified accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        labels = ax.get_legend_handles_labels()[1]
        if labels:
            ax.legend(fontsize=7)
        ax.set_title("thin: one sigma each (dotted: unfinished); thick: best over sigma per (model, method, "
                     "mode, n, alpha); dashed: published", fontsize=8)
        fig.tight_layout()
        for path in paths:
            atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    finally:
        plt.close(fig)
    return labels


def _colors(plt, count: int) -> list[str]:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return [cycle[i % len(cycle)] for i in range(count)]
