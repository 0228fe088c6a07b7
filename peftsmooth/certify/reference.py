"""The parent certification of an incremental certification (certify.reference): read and checked.

Incremental certification (peftsmooth.certify.incremental) builds a variant's certificate from its
parent's: the parent's predicted class and lower bound pA_lower per image, valid at the parent's alpha.
A certification written by this version stores pA_lower exactly (certify.tsv column `pA_lower`); for an
older one it is recovered from the printed radius, rounded down (`incremental.recovered_lower`). The
parent must be a `cohen` or `sequential` certification of the same dataset, sigma and images, whose run
(`run` in its summary.json) can be loaded: its classifier f is rebuilt to measure the disagreement.
Everything here is a check made before any model is built or any sample drawn.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from peftsmooth.certify import results
from peftsmooth.certify.incremental import recovered_lower
from peftsmooth.certify.tsv import PA_LOWER, read_columns, read_radius_texts
from peftsmooth.errors import require
from peftsmooth.runtime import PRECISIONS

log = logging.getLogger(__name__)

PARENT_MODES = ("cohen", "sequential")  # certifications whose rows carry a certificate at the parent's alpha


@dataclass(frozen=True)
class ParentRow:
    """What the incremental certification of one image may use of its parent's row."""

    predict: int  # the parent's cA, or -1 (not certified)
    label: int
    radius: float
    lower: float  # pA_lower: exact, or recovered from the printed radius (never above the true bound)

    @property
    def certified(self) -> bool:
        return self.predict != results.ABSTAIN


@dataclass(frozen=True)
class Parent:
    """A parent certification: where it is, its summary, its rows by image index, and its run."""

    path: Path
    summary: dict
    rows: dict[int, ParentRow]
    run: Path

    @property
    def alpha(self) -> float:
        return float(self.summary["alpha"])

    @property
    def sigma(self) -> float:
        return float(self.summary["sigma"])

    @property
    def precision(self) -> str:
        """The precision f ran under when its certificate was computed (the pair classifier runs it so)."""
        return str(self.summary.get("precision", "fp32"))

    @property
    def merged_adapters(self) -> list:
        """The adapters merged into f when its certificate was computed (the rebuilt f merges the same)."""
        return list(self.summary.get("merged_adapters") or [])


def read_parent(reference) -> Parent:
    """The certification directory `certify.reference`, checked (a UserError names what is wrong)."""
    key = "certify.reference"
    require(reference not in (None, "", "???"), f"{key}=??? : give the certification directory of the parent run "
                                                f"(e.g. <parent run>/certify/cohen_sigma0.25_n100000)")
    path = Path(str(reference)).expanduser().resolve()
    require(path.is_dir(), f"{key}={reference} is not a directory (a certification of the parent run)")
    summary = results.read_summary(path)
    require(summary is not None and (path / results.TSV_FILE).is_file(),
            f"{key}={reference} holds no {results.TSV_FILE} and {results.SUMMARY_FILE}: not a certification directory")
    require(summary.get("mode") in PARENT_MODES,
            f"{key}={reference} is a certify.mode={summary.get('mode')} certification; a parent must be one of: "
            f"{', '.join(PARENT_MODES)}")
    run = summary.get("run")
    require(bool(run) and (Path(str(run)) / "run.json").is_file(),
            f"{key}={reference}: its parent run {run or '(none recorded, e.g. an imported log)'} cannot be loaded "
            f"(no run.json); incremental certification rebuilds the parent classifier from it")
    return Parent(path, summary, _parent_rows(path, float(summary["sigma"])), Path(str(run)))


def _parent_rows(path: Path, sigma: float) -> dict[int, ParentRow]:
    tsv = path / results.TSV_FILE
    rows = results.read_tsv(tsv)
    columns = read_columns(tsv) or ()
    texts = {} if PA_LOWER in columns else read_radius_texts(tsv)
    out = {}
    for row in rows:
        if PA_LOWER in columns:
            lower = row[PA_LOWER]
        else:
            lower = recovered_lower(texts[row["idx"]], sigma) if row["predict"] != results.ABSTAIN else 0.0
        out[row["idx"]] = ParentRow(row["predict"], row["label"], row["radius"], float(lower))
    return out


def check_parent(parent: Parent, *, sigma: float, dataset: str, alpha_total: float) -> None:
    """The variant certification must share the parent's sigma and dataset, and leave alpha_2 > 0."""
    key = "certify.reference"
    require(abs(parent.sigma - float(sigma)) <= 1e-12,
            f"{key}={parent.path} was certified at sigma={parent.sigma:g}, this certification is at sigma={float(sigma):g}; "
            f"a certificate transfers only at its own sigma")
    require(str(parent.summary.get("dataset")) == str(dataset),
            f"{key}={parent.path} certified dataset {parent.summary.get('dataset')}, this run's dataset is {dataset}")
    require(float(alpha_total) > parent.alpha,
            f"certify.alpha={alpha_total} must exceed the parent's alpha={parent.alpha:g}: it is alpha_total = "
            f"alpha_parent + alpha_disagreement (e.g. certify.alpha={2 * parent.alpha:g})")
    require(parent.precision in PRECISIONS,
            f"{key}={parent.path} was certified at precision={parent.precision}, which this version cannot run f "
            f"under (allowed: {', '.join(PRECISIONS)}); certify the parent again")


def check_fingerprint(parent: Parent, rebuilt: str) -> str:
    """The rebuilt f must hold the weights that were certified (summary.json `weights_sha256`): 'verified',
    or 'unverified' (with a warning) for a parent certified before fingerprints were recorded."""
    recorded = parent.summary.get("weights_sha256")
    if not recorded:
        log.warning("certify.reference=%s records no weights_sha256 (an older certification): the rebuilt parent "
                    "classifier cannot be checked against the certified one (parent_fingerprint: unverified)",
                    parent.path)
        return "unverified"
    require(recorded == rebuilt,
            f"certify.reference={parent.path}: its run {parent.run} now holds other weights (sha256 {rebuilt[:12]}) "
            f"than the ones certified ({str(recorded)[:12]}); its certificate is not about this f: certify the "
            f"parent run again")
    return "verified"


def check_merge(parent: Parent, merged: Sequence[str]) -> None:
    """The rebuilt f must merge exactly the adapters the certified f merged."""
    require(list(merged) == parent.merged_adapters,
            f"certify.reference={parent.path} certified f with merged adapters {parent.merged_adapters}, the rebuilt "
            f"f merges {list(merged)}; certify the parent again with this version")


def check_images(parent: Parent, indices: Sequence[int]) -> None:
    """Every image to certify must have a row in the parent certification (the same image set)."""
    missing = [i for i in indices if i not in parent.rows]
    require(not missing, f"certify.reference={parent.path} has no row for images {missing[:3]}... of this selection "
                         f"({len(missing)} of {len(indices)}); certify the parent's image set (skip/start/max)")


def check_labels(parent: Parent, labels: dict[int, int]) -> None:
    """The image at each idx must carry the label the parent's row records: an idx of another image set
    (another dataset root, size or listing under the same name) would lend the parent's bound to another x."""
    wrong = [i for i, label in labels.items() if parent.rows[i].label != int(label)]
    require(not wrong, f"certify.reference={parent.path} recorded other labels for images {wrong[:3]} "
                       f"({len(wrong)} of {len(labels)}): this dataset is not the image set the parent certified "
                       f"(dataset.root, image size or listing differ)")


def incremental_command(variant_run, parent_run) -> str:
    """The command that certifies `variant_run` incrementally from a certification of `parent_run`, as
    it runs when printed: the newest cohen certification under <parent_run>/certify/ (else the newest
    sequential one; cohen parents carry the tighter bounds), with the parent's image selection, its n as
    n_max and, for a parent alpha other than the default, alpha_total = twice it (else a placeholder)."""
    found = [(p.parent, results.read_summary(p.parent) or {})
             for p in Path(str(parent_run)).glob("certify/*/" + results.SUMMARY_FILE)]
    found = sorted(((d, summary) for d, summary in found if summary.get("mode") in PARENT_MODES),
                   key=lambda item: (item[1].get("mode") == "cohen", (item[0] / results.SUMMARY_FILE).stat().st_mtime))
    if not found:
        return (f"peftsmooth certify run={variant_run} certify=incremental "
                f"certify.reference=<a certify=cohen or sequential directory of {parent_run}>")
    reference, summary = found[-1]
    options = [f"certify.reference={reference}", f"certify.n_max={summary.get('n')}"]
    options += [f"certify.{key}={summary[key]}" for key, default in (("skip", 1), ("start", 0), ("max", None))
                if summary.get(key, default) != default]
    if summary.get("alpha") is not None and float(summary["alpha"]) != 0.001:
        options.append(f"certify.alpha={2 * float(summary['alpha']):g}")
    return f"peftsmooth certify run={variant_run} certify=incremental {' '.join(options)}"
