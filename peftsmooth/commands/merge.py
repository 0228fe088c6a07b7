"""`peftsmooth merge DIR...`: the shards of one certification as one certify.tsv and summary.json.

    peftsmooth certify run=R certify.shard=0 certify.num_shards=2   # -> R/certify/<...>/shard0of2
    peftsmooth certify run=R certify.shard=1 certify.num_shards=2   # -> R/certify/<...>/shard1of2
    peftsmooth merge R/certify/<...>                                # -> R/certify/<...>/certify.tsv, summary.json

The merged summary is computed from the merged rows, so it equals the summary of one unsharded run
(apart from timings). Shards must share every certification setting (n0, n, alpha, sigma, seed, ...).
"""

from __future__ import annotations

import logging
from pathlib import Path

from peftsmooth.certify import results
from peftsmooth.config import hydra_app, output_dir
from peftsmooth.errors import require

log = logging.getLogger(__name__)


def check_merge(cfg) -> list[Path]:
    """The shard directories among dirs (each must exist), before any shard is read."""
    dirs = list(cfg.get("dirs") or [])
    require(bool(dirs), "dirs: give the shard directories to merge, e.g. `peftsmooth merge <certify dir>`")
    return results.find_shards(dirs)


def run_merge(cfg) -> dict:
    shard_dirs = check_merge(cfg)
    parents = {d.resolve().parent for d in shard_dirs}
    if cfg.get("out"):
        out = Path(str(cfg.out)).expanduser()
    elif len(parents) == 1:
        out = parents.pop()
    else:
        out = output_dir()
    summary = results.write_merged(out, shard_dirs)  # creates out only once every shard was read
    missing = summary["merged_shards"] - len(shard_dirs)
    log.info("merged %d shards (%d images%s) -> %s", len(shard_dirs), summary["num_images"],
             f", {missing} shards missing" if missing else "", out)
    if out != output_dir():
        from peftsmooth.config import _remove_if_unstarted

        _remove_if_unstarted(output_dir())
    return summary


main = hydra_app("merge", run_merge, check=check_merge)
