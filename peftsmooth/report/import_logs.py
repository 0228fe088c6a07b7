"""Certification logs of other tools (Cohen-format TSVs) as certification directories of our own.

Cohen et al.'s `certify.py` and the papers built on it (SmoothAdv, MACER, consistency, SmoothMix, ...)
publish one TSV per model and sigma, `idx label predict radius correct time` (time in seconds or as a
`datetime.timedelta`, extra columns after these). An import reads the given logs with the project's
one parser (peftsmooth.certify.tsv: a `correct` column that disagrees with `predict == label` is refused, like
any malformed line, naming the file and the line) and writes one certification directory: certify.tsv
in our format, summary.json (method, sigma, model, dataset, and `imported_from`: each source file with
its SHA-256 and row count), curve.csv and curve.png. `report` then lists it like its own
certifications, marked `imported`.

Several logs in one import are the parts of ONE certification (e.g. a test set certified in pieces):
their rows are joined by image index, and an image in two of them is refused. Another sigma or model
is another import.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from peftsmooth.certify import results, tsv
from peftsmooth.errors import UserError, require
from peftsmooth.runtime import atomic_directory

IMPORTS_DIR = "imports"  # default parent of imported certifications, in the working directory
RADIUS_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0)  # certify's default


@dataclass
class Imported:
    """What an import writes: the rows (by idx), the TSV text and the summary's metadata."""

    rows: list[dict]
    text: str
    meta: dict


def default_out(method: str, sigma: float, model: str | None, dataset: str | None) -> Path:
    """imports/[<dataset>_][<model>_]<method>_sigma<s>: one directory per label, model, dataset, sigma."""
    parts = [p for p in (dataset, model, method) if p] + [f"sigma{sigma:g}"]
    return Path(IMPORTS_DIR) / re.sub(r"[^A-Za-z0-9._+-]+", "_", "_".join(str(p) for p in parts))


def read_logs(paths: Sequence[str | Path]) -> tuple[list[dict], list[dict]]:
    """All rows of the logs (by idx) and one `imported_from` record per file; any problem is a
    UserError naming the file (and the line)."""
    by_idx: dict[int, tuple[Path, int]] = {}
    rows, sources = [], []
    for given in paths:
        path = Path(str(given)).expanduser()
        require(path.is_file(), f"files: {path} is not a file (give the Cohen-format TSV logs to import)")
        file_rows = tsv.read_tsv(path, foreign=True)
        require(bool(file_rows), f"{path}: no rows to import (a Cohen-format log starts with the header "
                                 f"{' '.join(tsv.HEADER)}, tab-separated, then one line per image)")
        for line, row in enumerate(file_rows, start=2):  # the parser maps lines to rows one to one
            if row["idx"] in by_idx:
                first, first_line = by_idx[row["idx"]]
                raise UserError(f"{path}:{line}: image idx {row['idx']} again (first in {first}:{first_line}); "
                                f"the logs of one import are parts of one certification")
            by_idx[row["idx"]] = (path, line)
        rows += file_rows
        sources.append({"path": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                        "rows": len(file_rows)})
    return sorted(rows, key=lambda r: r["idx"]), sources


def prepare(paths: Sequence[str | Path], *, method: str, sigma: float, model: str | None = None,
            dataset: str | None = None) -> Imported:
    """Read and check every log; nothing is written."""
    rows, sources = read_logs(paths)
    rows = [{k: v for k, v in row.items() if k != tsv.SAMPLES} for row in rows]  # another tool's count
    meta = {"method": method, "sigma": float(sigma), "model_name": model, "dataset": dataset,
            "num_planned": len(rows), results.IMPORTED_FROM: sources}
    return Imported(rows=rows, text=tsv.tsv_text(rows), meta=json.loads(json.dumps(meta)))


def already_there(out: Path, imported: Imported) -> bool:
    """Whether out holds exactly this import (True), nothing (False); anything else is refused."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return False
    tsv_path = out / results.TSV_FILE
    same = (out.is_dir() and tsv_path.is_file() and tsv_path.read_text() == imported.text
            and results.summary_metadata(results.read_summary(out)) == imported.meta)
    require(same, f"out={out} already exists and holds something else than this import; "
                  f"give another out= or remove it")
    return True


def write(out: Path, imported: Imported) -> dict:
    """The certification directory, complete or not at all: built in a hidden sibling (report skips
    hidden directories), then renamed into place."""
    with atomic_directory(out) as tmp:
        (tmp / results.TSV_FILE).write_text(imported.text)
        summary = results.write_results(tmp, imported.rows, RADIUS_GRID, **imported.meta)
    return summary
