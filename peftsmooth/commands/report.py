"""`peftsmooth report <dir> [<dir>...]`: one comparison table (Markdown, CSV, LaTeX, rich) and one plot
(PNG, PDF), optionally beside the field's published results (`published=cifar10`).

The table lives in `peftsmooth.report.render`, the LaTeX in `report.latex`, the plot in `report.plot`
and the published rows in `report.published` (plain functions the tests call); this module only
checks the options, writes the chosen files atomically and prints the table.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from peftsmooth.config import _remove_if_unstarted, hydra_app, output_dir
from peftsmooth.errors import UserError, choice_error, require

log = logging.getLogger(__name__)

FORMATS = ("md", "csv", "tex", "png", "pdf")  # report.<format>


def _radius_grid(cfg) -> list[float]:
    grid = cfg.get("radius_grid")
    require(grid is not None and len(grid) > 0, "radius_grid must be a non-empty list of radii >= 0, e.g. radius_grid=[0.25,0.5,0.75,1.0]")
    try:
        values = [float(r) for r in grid]
    except (TypeError, ValueError):
        raise UserError(f"radius_grid={list(grid)} must be a list of numbers >= 0, e.g. radius_grid=[0.25,0.5]") from None
    require(all(math.isfinite(r) and r >= 0 for r in values), f"radius_grid={values} must hold finite radii >= 0")
    return values


def _formats(cfg) -> list[str]:
    """The files to write; an unknown format is refused naming the known ones."""
    given = cfg.get("formats")
    formats = [given] if isinstance(given, str) else [str(f) for f in (given or [])]
    require(bool(formats), f"formats is empty: choose some of {', '.join(FORMATS)}, e.g. formats=[md,tex]")
    for name in formats:
        if name not in FORMATS:
            raise choice_error("formats", name, FORMATS)
    return list(dict.fromkeys(formats))


def _published(cfg) -> str | None:
    from peftsmooth.report.published import check_selection

    dataset = cfg.get("published")
    dataset = None if dataset is None else str(dataset)
    check_selection(dataset, cfg.get("published_methods"), cfg.get("published_sigmas"))
    return dataset


def check_report(cfg) -> tuple[list[str], list[float]]:
    """The directories (each must exist), the radius grid, the formats and the published selection,
    before anything is read."""
    from peftsmooth.report.published import LIST
    from peftsmooth.report.table import check_dirs

    published = _published(cfg)
    grid = _radius_grid(cfg)
    _formats(cfg)
    dirs = [str(d) for d in (cfg.get("dirs") or [])]
    if published == LIST:
        return dirs, grid
    require(bool(dirs), "dirs is empty: give the directories to scan, e.g. `peftsmooth report outputs/` "
                        "(or published=list to print the published results)")
    check_dirs(dirs)
    return dirs, grid


def list_published() -> dict:
    """published=list: every row of the data file, one line each; nothing is written."""
    from peftsmooth.report.published import list_lines, load

    lines = list_lines(load())
    print("\n".join(lines))
    _remove_if_unstarted(output_dir())
    return {"published": lines}


def write_files(report, out: Path, formats: list[str]) -> dict[str, Path]:
    from peftsmooth.report.latex import to_latex
    from peftsmooth.report.render import plot_report, to_csv, to_markdown
    from peftsmooth.runtime import atomic_write_text

    files = {fmt: out / f"report.{fmt}" for fmt in formats}
    for fmt, text in (("md", to_markdown), ("csv", to_csv), ("tex", to_latex)):
        if fmt in files:
            atomic_write_text(files[fmt], text(report))
    figures = [files[fmt] for fmt in ("png", "pdf") if fmt in files]
    if figures:
        plot_report(report, figures)
    return files


def run_report(cfg) -> dict:
    from rich.console import Console

    from peftsmooth.report import published as field
    from peftsmooth.report.render import build_report, rich_table

    dirs, grid = check_report(cfg)
    dataset, formats = _published(cfg), _formats(cfg)
    if dataset == field.LIST:
        return list_published()
    report = build_report(dirs, grid)
    require(bool(report.rows), f"dirs={dirs}: no runs found (no run.json, certify.tsv or summary.json below them)")
    if dataset is not None:
        report.published = field.select(field.load(), dataset, cfg.get("published_methods") or [],
                                        cfg.get("published_sigmas") or [])
        report.rows += [field.table_row(row, report.radius_grid) for row in report.published]
        _warn_other_datasets(report.rows, dataset)
    out = Path(str(cfg.get("out") or dirs[0])).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    files = write_files(report, out, formats)
    console = Console()
    if not console.is_terminal:  # a log file or pipe: do not squeeze the table into 80 columns
        console = Console(width=max(console.width, 180))
    console.print(rich_table(report))
    console.print(f"wrote {', '.join(str(p) for p in files.values())}")
    _remove_if_unstarted(output_dir())  # the results are in out; Hydra's directory holds nothing of them
    return {"rows": report.rows, "files": {k: str(v) for k, v in files.items()}}


def _warn_other_datasets(rows: list[dict], published: str) -> None:
    """Published rows beside runs on another dataset are no like-for-like comparison: say so (the tables
    other than the CSV do not show the dataset)."""
    others = sorted({str(r.get("dataset")) for r in rows if not r.get("published") and r.get("dataset")} - {published})
    if others:
        log.warning("published=%s beside runs on %s: the published rows are another dataset's results, not a "
                    "like-for-like comparison (report.csv's dataset column tells the rows apart)",
                    published, ", ".join(others))


main = hydra_app("report", run_report, check=check_report)
