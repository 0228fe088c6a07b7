"""Find every run and every certification below some directories, for `report`.

A run is a directory with `run.json`; a certification is a directory with `certify.tsv` (the record
every certification writes first; a summary.json without it is a copy, e.g. the demo's). The shards
of one certification (`certify.shard=i certify.num_shards=k`, each in `<dir>/shard{i}of{k}/`) are
merged into one, through the same check and merge as `peftsmooth merge` (results.merge_certifications).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from peftsmooth.certify import results
from peftsmooth.runs import RUN_FILE


@dataclass
class Certification:
    """One certification as the report sees it (possibly several shard directories merged)."""

    path: Path
    rows: list[dict]
    summary: dict | None = None
    shards: list[Path] = field(default_factory=list)
    num_shards: int = 1
    complete: bool = False
    run: Path | None = None


def find_certifications(dirs: Sequence[Path]) -> tuple[list[Path], list[Certification]]:
    """Every run directory and every certification under `dirs`, shards merged into one."""
    run_dirs, cert_dirs = _walk(dirs)
    singles: list[Certification] = []
    groups: dict[tuple[Path, int], list[results.CertificationFiles]] = {}
    for path in cert_dirs:
        files = results.load_certification(path)
        shard = results.shard_of(files.summary)
        if shard is None:
            singles.append(_single(files))
        else:  # shards of one certification are siblings: their parent is the certification
            groups.setdefault((path.parent, shard[1]), []).append(files)
    single_paths = {c.path for c in singles}
    certs = singles + [_merged(group, num_shards, members)
                       for (group, num_shards), members in sorted(groups.items(), key=lambda kv: str(kv[0][0]))
                       if group not in single_paths]  # a merged result written there wins over re-merging
    run_set = set(run_dirs)
    for cert in certs:
        cert.run = _owning_run(cert.shards[0] if cert.shards else cert.path, cert.summary, run_set)
    return sorted(run_dirs), sorted(certs, key=lambda c: str(c.path))


def _walk(dirs: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """Run directories (run.json) and certification directories (certify.tsv)."""
    runs, certs, seen = [], [], set()
    for root in dirs:
        for here, subdirs, files in os.walk(root):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
            here_path = Path(here).resolve()
            if here_path in seen:
                continue
            seen.add(here_path)
            if RUN_FILE in files:
                runs.append(here_path)
            if results.TSV_FILE in files:
                certs.append(here_path)
    return runs, certs


def _single(files: results.CertificationFiles) -> Certification:
    complete = bool(files.summary and files.summary.get("complete", True))
    return Certification(path=files.path, rows=files.rows, summary=files.summary, complete=complete)


def _merged(group: Path, num_shards: int, members: list[results.CertificationFiles]) -> Certification:
    """The shards found in `group`, merged; complete when every shard is there and finished."""
    members = sorted(members, key=lambda m: results.shard_of(m.summary)[0])
    rows, _ = results.merge_certifications(members)
    present = {results.shard_of(m.summary)[0] for m in members}
    complete = len(present) == num_shards and all(m.summary.get("complete", True) for m in members)
    return Certification(path=group, rows=rows, summary=members[0].summary, shards=[m.path for m in members],
                         num_shards=num_shards, complete=complete)


def _owning_run(path: Path, summary: dict | None, runs: set[Path]) -> Path | None:
    """The run a certification belongs to: its summary's `run`, else the nearest enclosing run dir."""
    if summary and summary.get("run"):
        candidate = Path(str(summary["run"])).expanduser()
        if (candidate / RUN_FILE).is_file():
            return candidate.resolve()
    for parent in [path, *path.parents]:
        if parent in runs or (parent / RUN_FILE).is_file():
            return parent
    return None
