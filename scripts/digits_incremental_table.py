#!/usr/bin/env python
"""The table of scripts/digits_incremental.sh: per sigma, variant and route, classifier evaluations per
image (both models counted in incremental), wall time, the measured disagreement and certified accuracy.

    python scripts/digits_incremental_table.py outputs/incremental_digits/cert

Reads only the certification directories (summary.json and certify.tsv): CERT/s<sigma>/<variant>/<route>.
"""

from __future__ import annotations

import sys
from pathlib import Path

from peftsmooth.certify.results import load_certification, route_stats, summarize

RADII = (0.0, 0.25, 0.5, 0.75, 1.0)


def line(label: str, variant: str, directory: Path) -> str | None:
    cert = load_certification(directory)
    if not cert.rows or cert.summary is None:
        return None
    summary = summarize(cert.rows, RADII, **{k: v for k, v in cert.summary.items() if k == "mode"})
    evaluations = sum(r["samples"] for r in cert.rows) / len(cert.rows)
    stats = route_stats(cert.rows)
    routes = " ".join(f"{k[:4]}={v}" for k, v in sorted((stats.get("routes") or {}).items())) or "-"
    zeta = stats.get("measured_disagreement")
    acc = " | ".join(f"{100 * summary['certified_accuracy'][str(float(r))]:.1f}" for r in RADII)
    wall = cert.summary.get("wall_seconds")
    return (f"| {variant} | {label} | {evaluations:,.0f} | {'-' if wall is None else f'{wall:.1f}'} | "
            f"{'-' if zeta is None else f'{100 * zeta:.2f} %'} | {routes} | {acc} | {summary['acr']:.3f} |")


def main(root: Path) -> None:
    header = ("| variant | certification | evaluations/image | wall s | disagreement | routes | "
              + " | ".join(f"@{r:g}" for r in RADII) + " | ACR |")
    for sigma_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        print(f"\n{sigma_dir.name} ({len(load_certification(sigma_dir / 'parent_cohen').rows)} images)\n")
        print(header)
        print("|" + "---|" * (header.count("|") - 1))
        for parent in ("parent_cohen", "parent_sequential"):
            out = line(parent.replace("parent_", "parent, "), "LoRA (parent)", sigma_dir / parent)
            if out:
                print(out)
        for variant in sorted(p for p in sigma_dir.iterdir() if p.is_dir() and not p.name.startswith("parent")):
            for route, label in (("scratch", "sequential from scratch"), ("from_cohen", "incremental from cohen"),
                                 ("from_sequential", "incremental from sequential")):
                out = line(label, variant.name, variant / route)
                if out:
                    print(out)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
