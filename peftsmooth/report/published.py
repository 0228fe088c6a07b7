"""The field's published results, shipped as data (`published.csv` beside this module), for `report`.

Each row of the file is one published certification: dataset, method, paper, model, sigma, images, n,
alpha, ACR, certified accuracy on the file's radius grid (`cert_acc@r`, a fraction; blank where the
source has no value at r), `source` and `provenance`:

- `recomputed from log`: every number recomputed from the published Cohen-format certification log
  named in `source` (repository and path), with Cohen's analysis (certified accuracy at r = the
  fraction of images with predict == label and radius >= r; ACR = the mean of correct * radius);
- `reported`: copied from a paper whose logs are not published; `source` then names the table and
  page the numbers were read from.

`report published=<dataset>` adds the selected rows to the table at the report's own radius grid:
a radius the file has no value for stays blank (None), never interpolated.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from importlib import resources
from typing import Sequence

from peftsmooth.errors import choice_error, is_number, require

DATA_FILE = "published.csv"
RECOMPUTED = "recomputed from log"
REPORTED = "reported"
PROVENANCE = "provenance"
ACCURACY_PREFIX = "cert_acc@"
LIST = "list"  # published=list prints the file instead of adding rows


@dataclass(frozen=True)
class PublishedRow:
    """One published certification; `accuracy` maps radius -> certified accuracy (fraction), only the
    radii the source has a value for."""

    dataset: str
    method: str
    paper: str
    model: str
    sigma: float
    images: int
    n: int
    alpha: float
    acr: float | None
    source: str
    provenance: str
    accuracy: dict = field(default_factory=dict)

    def at(self, radius: float) -> float | None:
        """Certified accuracy at `radius`, None where the source has no value there."""
        return next((v for r, v in self.accuracy.items() if math.isclose(r, radius, abs_tol=1e-9)), None)


def data_text() -> str:
    """The data file as shipped in the package."""
    return resources.files("peftsmooth.report").joinpath(DATA_FILE).read_text(encoding="utf-8")


def raw_rows() -> list[dict[str, str]]:
    """The data file's rows as strings, exactly as written."""
    return list(csv.DictReader(io.StringIO(data_text())))


def load() -> list[PublishedRow]:
    """Every published row of the data file."""
    return [_parse(raw) for raw in raw_rows()]


def _number(text: str) -> float | None:
    return float(text) if text.strip() else None


def _parse(raw: dict[str, str]) -> PublishedRow:
    accuracy = {float(key[len(ACCURACY_PREFIX):]): float(value) for key, value in raw.items()
                if key.startswith(ACCURACY_PREFIX) and value.strip()}
    return PublishedRow(dataset=raw["dataset"], method=raw["method"], paper=raw["paper"], model=raw["model"],
                        sigma=float(raw["sigma"]), images=int(raw["images"]), n=int(raw["n"]),
                        alpha=float(raw["alpha"]), acr=_number(raw["acr"]), source=raw["source"],
                        provenance=raw[PROVENANCE], accuracy=accuracy)


def datasets(rows: Sequence[PublishedRow]) -> list[str]:
    return sorted({row.dataset for row in rows})


def check_selection(dataset, methods, sigmas) -> None:
    """Refuse (one line naming what exists) an unknown dataset, a method or sigma the dataset has no
    row for, and filters without a dataset; before any work."""
    methods, sigmas = list(methods or []), list(sigmas or [])
    rows = load()
    known = datasets(rows)
    if dataset is None:
        require(not methods and not sigmas, "published_methods / published_sigmas filter published rows: "
                                            f"give published={'|'.join(known)} as well")
        return
    if str(dataset) not in known and str(dataset) != LIST:
        raise choice_error("published", dataset, [*known, LIST])
    if str(dataset) == LIST:
        require(not methods and not sigmas, "published=list prints every row; it takes no published_methods "
                                            "or published_sigmas")
        return
    select(rows, str(dataset), methods, sigmas)


def select(rows: Sequence[PublishedRow], dataset: str, methods: Sequence = (),
           sigmas: Sequence = ()) -> list[PublishedRow]:
    """The rows of `dataset`, only `methods` (case-insensitive) and `sigmas` when given; an unknown
    method or sigma is refused naming those the dataset has."""
    rows = [row for row in rows if row.dataset == dataset]
    names = {row.method.lower(): row.method for row in rows}
    for method in methods:
        if str(method).lower() not in names:
            raise choice_error("published_methods", method, sorted(set(names.values())))
    wanted = {names[str(m).lower()] for m in methods}
    values = sorted({row.sigma for row in rows})
    for sigma in sigmas:
        if not is_number(sigma) or not any(math.isclose(float(sigma), s) for s in values):
            raise choice_error("published_sigmas", sigma, [f"{s:g}" for s in values])
    chosen = [row for row in rows if (not wanted or row.method in wanted)
              and (not sigmas or any(math.isclose(row.sigma, float(s)) for s in sigmas))]
    require(bool(chosen), f"published={dataset} has no row for published_methods={list(methods)} at "
                          f"published_sigmas={list(sigmas)} (published=list shows every row)")
    return chosen


def table_row(row: PublishedRow, radius_grid: Sequence[float]) -> dict:
    """A report row for a published result: its numbers at the report's radius grid (None where the
    source has no value at a radius), marked `published`."""
    from peftsmooth.certify.results import radius_column

    return {
        "method": row.method, "model": row.model, "dataset": row.dataset, "sigma": row.sigma,
        "trainable_params": None, "total_params": None, "mode": "cohen", "n": row.n, "alpha": row.alpha,
        "num_images": row.images, "smoothed_accuracy": row.at(0.0),
        **{radius_column(r): row.at(r) for r in radius_grid},
        "acr": row.acr, "samples_per_image": None, "cert_time_s": None, "forward_calls": None,
        "batch_fill": None, "wall_s": None, "status": f"published ({row.provenance})", "run": None,
        "certification": None, "published": True, "paper": row.paper, "source": row.source,
    }


def list_lines(rows: Sequence[PublishedRow]) -> list[str]:
    """`published=list`: one line per row of the data file."""
    lines = []
    for row in rows:
        accuracy = " ".join(f"{r:g}:{100 * v:.1f}" for r, v in sorted(row.accuracy.items()))
        acr = "-" if row.acr is None else f"{row.acr:.3f}"
        lines.append(f"{row.dataset} | {row.method} | {row.model} | sigma={row.sigma:g} | images={row.images} "
                     f"| n={row.n} | alpha={row.alpha:g} | ACR={acr} | cert. acc. % at r {accuracy} | "
                     f"{row.paper} | {row.provenance}: {row.source}")
    return lines
