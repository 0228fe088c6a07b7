"""`report.tex`: the table a paper pastes in (booktabs, needs `\\usepackage{booktabs}`).

One row per certification (and per published row shown): method, model, sigma, mode, n, alpha and
images (how it was certified), certified accuracy in % at the report's radius grid, ACR last. The best
value of each numeric column is bold (ties all bold). The caption names n, alpha and the number of
images: once when every row shares them, otherwise it points at the columns. A published row is
marked with a dagger and a radius its source has no value at stays blank.
"""

from __future__ import annotations

import math

from peftsmooth.report.table import Report

_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
            "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def escape(text: str) -> str:
    """Text as LaTeX prints it literally."""
    return "".join(_ESCAPES.get(ch, ch) for ch in str(text))


def _number(value, digits: int, scale: float = 1.0) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return f"{scale * value:.{digits}f}"


def certified_rows(report: Report) -> list[dict]:
    """The rows of certifications and published results (a run not certified yet has no numbers)."""
    return [row for row in report.rows if row.get("certification") or row.get("published")]


def numeric_columns(rows: list[dict], radius_grid) -> list[list[str | None]]:
    """Per row: cert. acc. (%) at each radius of the grid, then ACR; None where unknown."""
    from peftsmooth.certify.results import radius_column

    return [[_number(row.get(radius_column(r)), 1, 100.0) for r in radius_grid]
            + [_number(row.get("acr"), 3)] for row in rows]


def bold_best(table: list[list[str | None]]) -> list[list[str]]:
    """Each column's largest value in bold; a missing value is blank ('-' for our rows is set by the
    caller)."""
    columns = list(zip(*table)) if table else []
    best = [max((float(v) for v in column if v is not None), default=None) for column in columns]
    return [[("" if v is None else rf"\textbf{{{v}}}" if best[k] is not None and float(v) == best[k] else v)
             for k, v in enumerate(row)] for row in table]


def _shared(rows: list[dict], key: str):
    values = {row.get(key) for row in rows}
    return values.pop() if len(values) == 1 else None


def caption(rows: list[dict]) -> str:
    """Names n, alpha and images: one value each when every row shares it, else 'per row'."""
    n, alpha, images = (_shared(rows, k) for k in ("n", "alpha", "num_images"))
    parts = [f"$n = {_count(n)}$" if n is not None else "$n$ per row",
             rf"$\alpha = {float(alpha):g}$" if alpha is not None else r"$\alpha$ per row",
             f"{_count(images)} test images" if images else "test images per row"]
    text = (r"Certified accuracy (\%) at $\ell_2$ radius $r$ (native $[0,1]$ pixels) and average "
            rf"certified radius (ACR); Monte Carlo samples {parts[0]}, failure probability {parts[1]}, "
            rf"{parts[2]}. Best of each column in bold.")
    if any(row.get("published") for row in rows):
        text += r" $^\dagger$Published result (sources in report.csv); a blank cell: no value at that radius."
    return text


def identity(row: dict) -> list[str]:
    method = escape(row["method"]) + (r"$^\dagger$" if row.get("published") else "")
    return [method, escape(row.get("model") or "-"), "-" if row["sigma"] is None else f"{row['sigma']:g}",
            escape(row.get("mode") or "-"), "-" if row.get("n") is None else _count(row["n"]),
            "-" if row.get("alpha") is None else f"{float(row['alpha']):g}",
            "-" if not row.get("num_images") else _count(row["num_images"])]


def _count(value) -> str:
    """100{,}000: a thousands separator LaTeX typesets without extra space."""
    return f"{int(value):,}".replace(",", "{,}")


def to_latex(report: Report) -> str:
    """The booktabs table environment."""
    rows = certified_rows(report)
    radii = [f"{r:g}" for r in report.radius_grid]
    numbers = bold_best(numeric_columns(rows, report.radius_grid))
    header = ["Method", "Model", r"$\sigma$", "Mode", "$n$", r"$\alpha$", "Images", *radii, "ACR"]
    spec = "lllrrrr" + "r" * (len(radii) + 1)
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{caption(rows)}}}", r"\label{tab:certified}",
             rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
             rf" & & & & & & & \multicolumn{{{len(radii)}}}{{c}}{{Certified accuracy (\%) at $r$}} & \\",
             rf"\cmidrule(lr){{8-{7 + len(radii)}}}", " & ".join(header) + r" \\", r"\midrule"]
    for row, cells in zip(rows, numbers):
        if not row.get("published"):
            cells = [c if c else "-" for c in cells]
        lines.append(" & ".join(identity(row) + cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"
