"""`peftsmooth report <dir> [<dir>...]`: one comparison table (Markdown, CSV, rich) and one plot.

The table and plot live in `peftsmooth.report.render` (plain functions the tests call); this module only
checks the options, writes the three files atomically and prints the table.
"""

from __future__ import annotations

import math
from pathlib import Path

from peftsmooth.config import _remove_if_unstarted, hydra_app, output_dir
from peftsmooth.errors import UserError, require


def _radius_grid(cfg) -> list[float]:
    grid = cfg.get("radius_grid")
    require(grid is not None and len(grid) > 0, "radius_grid must be a non-empty list of radii >= 0, e.g. radius_grid=[0.25,0.5,0.75,1.0]")
    try:
        values = [float(r) for r in grid]
    except (TypeError, ValueError):
        raise UserError(f"radius_grid={list(grid)} must be a list of numbers >= 0, e.g. radius_grid=[0.25,0.5]") from None
    require(all(math.isfinite(r) and r >= 0 for r in values), f"radius_grid={values} must hold finite radii >= 0")
    return values


def check_report(cfg) -> tuple[list[str], list[float]]:
    """The directories (each must exist) and the radius grid, before anything is read."""
    from peftsmooth.report.table import check_dirs

    dirs = [str(d) for d in (cfg.get("dirs") or [])]
    require(bool(dirs), "dirs is empty: give the directories to scan, e.g. `peftsmooth report outputs/`")
    check_dirs(dirs)
    return dirs, _radius_grid(cfg)


def run_report(cfg) -> dict:
    from rich.console import Console

    from peftsmooth.report.render import build_report, plot_report, rich_table, to_csv, to_markdown
    from peftsmooth.runtime import atomic_write_text

    dirs, grid = check_report(cfg)
    report = build_report(dirs, grid)
    require(bool(report.rows), f"dirs={dirs}: no runs found (no run.json, certify.tsv or summary.json below them)")
    out = Path(str(cfg.get("out") or dirs[0])).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    files = {"markdown": out / "report.md", "csv": out / "report.csv", "plot": out / "report.png"}
    atomic_write_text(files["markdown"], to_markdown(report))
    atomic_write_text(files["csv"], to_csv(report))
    plot_report(report, files["plot"])
    console = Console()
    if not console.is_terminal:  # a log file or pipe: do not squeeze the table into 80 columns
        console = Console(width=max(console.width, 180))
    console.print(rich_table(report))
    console.print(f"wrote {files['markdown']}, {files['csv']}, {files['plot']}")
    _remove_if_unstarted(output_dir())  # the results are in out; Hydra's directory holds nothing of them
    return {"rows": report.rows, "files": {k: str(v) for k, v in files.items()}}


main = hydra_app("report", run_report, check=check_report)
