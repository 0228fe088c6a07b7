"""`peftsmooth certify`: CERTIFY (or PREDICT) every selected test image of a classifier, Cohen-style.

    peftsmooth certify run=<train or denoise-baseline run dir> [certify.n=100000 certify.skip=20 ...]
    peftsmooth certify model=vit dataset=cifar10 sigma=0.25 model.weights=...   # no adaptation
    torchrun --nproc_per_node=K -m peftsmooth certify run=<dir>                  # K shards, merged

Writes certify.tsv (one flushed row per image), summary.json, curve.csv and curve.png into the
certification directory: `<run>/certify/<mode>_sigma<sigma>_n<n>` for a run (so the same command
resumes), `outputs/certify/<mode>_<model>_<dataset>/<time>` otherwise, `certify.resume=<dir>` to continue
a given one. `certify.shard=i certify.num_shards=k` certifies every k-th selected image into
`<dir>/shard{i}of{k}`; `peftsmooth merge <dir>` combines the shards.

This is the driver: settings (peftsmooth.certify.engine.Settings) -> classifier (peftsmooth.certify.classifier) ->
engine (peftsmooth.certify.engine: selection, resume, one row per image) -> results (peftsmooth.certify.results).
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from peftsmooth.certify import results
from peftsmooth.certify.classifier import certify_sigma, check_num_classes, check_run_model, load_classifier, \
    prepare_for_certify
from peftsmooth.certify.engine import Settings, certify_into, certify_rows, resume_rows, select_indices, session_counters
from peftsmooth.certify.incremental_run import load_parent_model, pair_smooth, parent_meta
from peftsmooth.certify.preflight import preflight_check
from peftsmooth.certify.smoothing import Smooth
from peftsmooth.config import _remove_if_unstarted, hydra_app, output_dir
from peftsmooth.distributed import DistInfo, barrier, broadcast_object, init_distributed, shutdown
from peftsmooth.errors import UserError, require

log = logging.getLogger(__name__)


def check_certify(cfg) -> Settings:
    """Every check certify makes before a model, data or the network: certify.*, sigma (> 0: there is
    no smoothing at 0), the run's run.json and its model's code and files (with the overrides of a run
    that moved), or the model's name and weight files."""
    from peftsmooth.models import check_model_config
    from peftsmooth.runs import read_run_info

    settings = Settings.from_config(cfg.certify)
    info = read_run_info(cfg.run) if cfg.get("run") else None
    sigma = certify_sigma(cfg.get("sigma"), info.sigma if info else None)
    if info is None:
        check_model_config(cfg.model, cfg.dataset.image_size)
    else:
        check_run_model(cfg, info)
    dataset = (info.get("dataset") or {}).get("name") if info else None
    settings.engine_mode.check_run(settings, sigma=sigma, dataset=str(dataset or cfg.dataset.name))
    return settings


def run_certify(cfg) -> dict:
    from peftsmooth.certify.progress import CertifyProgress
    from peftsmooth.data import build_dataset
    from peftsmooth.runtime import resolve_device, seed_everything

    s = check_certify(cfg)
    dist = init_distributed(resolve_device(cfg.device))
    require(dist.world_size == 1 or s.num_shards == 1,
            "certify.num_shards must stay 1 under torchrun (each of the WORLD_SIZE processes certifies one shard)")
    s = s.for_rank(dist.rank, dist.world_size)
    model, source = load_classifier(cfg)
    sigma = certify_sigma(cfg.get("sigma"), source["sigma_train"])
    dataset_cfg = source.pop("dataset_cfg")
    check_num_classes(model, source["num_classes"], dataset_cfg.image_size)
    dataset = build_dataset(dataset_cfg, split="test")
    indices = select_indices(len(dataset), s)
    parent_model, parent_fingerprint = load_parent_model(parent := s.options.get("parent"), dataset, indices)

    base_dir = Path(broadcast_object(str(output_dir()), dist))  # rank 0's directory (timestamps may differ)
    out = base_dir / results.shard_dir_name(dist.rank, dist.world_size) if dist.world_size > 1 else base_dir
    identity = {"mode": s.mode, **s.engine_mode.identity(s), "alpha": s.alpha, "sigma": sigma,
                "seed": int(cfg.seed), "precision": s.precision, "dataset": str(dataset_cfg.name),
                "weights_sha256": source["weights_sha256"]}
    rows = resume_rows(out, identity, set(indices), resume=s.resume)  # checked before compiling or sampling

    model, merged = prepare_for_certify(model, dist.device, merge_adapters=s.merge_adapters,
                                        channels_last=s.channels_last)
    batch_size = s.batch_for(dist.device)
    g = Smooth(model, source["num_classes"], sigma, precision=s.precision, channels_last=s.channels_last)
    g_pair = pair_smooth(parent_model, model, dist.device, s, sigma, parent)  # f and f' on one batch, or None
    compile_error = g.compile(batch_size, dataset_cfg.image_size, mode=s.compile_mode) if s.compile else None
    seed_everything(int(cfg.seed))
    todo = [i for i in indices if i not in {r["idx"] for r in rows}]
    preflight = (preflight_check(g, dataset, indices, s.preflight, s.preflight_min_acc, int(cfg.seed), batch_size,
                                 show=dist.is_main) if todo else  # may refuse: before anything is written
                 (results.read_summary(out) or {}).get("preflight"))  # nothing left: the recorded one
    out.mkdir(parents=True, exist_ok=True)

    meta = {**identity, "skip": s.skip, "start": s.start, "max": s.max,
            **{k: source[k] for k in ("run", "method", "model_name", "trainable_params", "total_params", "sigma_train")},
            "device": str(dist.device), "device_name": _device_name(dist.device), "batch_size": batch_size,
            "compile": s.compile and compile_error is None, "compile_error": compile_error,
            "compile_mode": s.compile_mode if s.compile else None, "channels_last": s.channels_last,
            "merged_adapters": merged, **({"quantized": source["quantized"]} if source.get("quantized") else {}),
            "pack": s.pack, "num_planned": len(indices), "argv": " ".join(sys.argv), "preflight": preflight,
            **({"shard": s.shard, "num_shards": s.num_shards} if s.num_shards > 1 else {}),
            "alpha_total": s.alpha, **parent_meta(parent, s.alpha, parent_fingerprint)}
    earlier = results.throughput(results.read_summary(out)) if rows else {}  # sessions that ran to the end
    results.write_results(out, rows, s.radius_grid, **meta, **earlier)  # settings on disk before the first row

    with CertifyProgress(len(indices), rows, show=dist.is_main) as progress:
        session = _certify_session(out, g, g_pair, dataset, todo, s, int(cfg.seed), batch_size, progress)
    summary = results.write_results(out, results.read_tsv(out / results.TSV_FILE), s.radius_grid, **meta,
                                    **results.throughput(earlier, session))
    if g.max_batch:
        log.info("out-of-memory retries: batches of at most %d", g.max_batch)
    if dist.world_size > 1:
        summary = _merge_ranks(base_dir, dist, s.radius_grid)
    _log_summary(summary, base_dir)
    return summary


def _certify_session(out: Path, g: Smooth, g_pair: Smooth | None, dataset, todo, s: Settings, seed: int,
                     batch_size: int, progress) -> dict:
    """Certify the images still to do into out/certify.tsv; this session's forward-pass counters."""
    start = time.perf_counter()
    certify_into(out, certify_rows(g, dataset, todo, s, seed, batch_size, companion=g_pair), on_row=progress)
    return session_counters([g, g_pair], start)


def _merge_ranks(base: Path, dist: DistInfo, radius_grid) -> dict:
    """torchrun: rank 0 merges every rank's shard into `base` once all are done."""
    barrier(dist)
    summary = {}
    if dist.is_main:
        shards = [base / results.shard_dir_name(r, dist.world_size) for r in range(dist.world_size)]
        summary = results.write_merged(base, shards, radius_grid)
    elif output_dir() != base:
        _remove_if_unstarted(output_dir())
    barrier(dist)
    shutdown(dist)
    return summary


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())


def _log_summary(summary: dict, where: Path) -> None:
    if not summary:
        return
    if summary.get("acr") is not None:
        acc = ", ".join(f"@{k}: {v:.3f}" for k, v in list(summary["certified_accuracy"].items())[:5])
        log.info("ACR %.4f; certified accuracy %s; smoothed accuracy %.3f, abstain %.3f; %s samples/s -> %s",
                 summary["acr"], acc, summary["clean_accuracy"], summary["abstain_rate"],
                 f"{summary['samples_per_second']:,.0f}" if summary.get("samples_per_second") else "-", where)
    else:
        log.info("smoothed accuracy %.3f, abstain %.3f -> %s", summary["clean_accuracy"], summary["abstain_rate"], where)
    if summary.get("forward_calls"):
        log.info("%d forward passes, batch fill %.3f, wall time %.1f s", summary["forward_calls"],
                 summary["batch_fill"], summary["wall_seconds"])


# --- where the results go: hydra.run.dir in conf/certify.yaml, resolved while Hydra composes ---

def certify_dir(resume, run, mode, sigma, n, model, dataset, stamp, shard, num_shards) -> str:
    """`certify.resume`, else `<run>/certify/<mode>_sigma<sigma>_n<n>` for a run (sigma: the run's when
    not given), else a fresh `outputs/certify/...` directory; a shard goes into `shard{i}of{k}/` below it."""
    if resume:
        return str(resume)
    base = Path("outputs/certify") / f"{mode}_{model}_{dataset}" / str(stamp)
    run_dir = Path(str(run)).expanduser() if run else None
    if run_dir is not None and (run_dir / "run.json").is_file():
        base = run_dir / "certify" / f"{mode}_sigma{_fmt(sigma if sigma is not None else _run_sigma(run_dir))}_n{n}"
    if int(num_shards) > 1:
        base = base / results.shard_dir_name(int(shard), int(num_shards))
    return os.path.abspath(base)  # absolute: it is also the multirun job dir (hydra.sweep.subdir)


def _run_sigma(run_dir: Path):
    from peftsmooth.runs import read_run_info

    try:
        return read_run_info(run_dir).sigma
    except (OSError, UserError):  # load_run reports it, once the command runs
        return None


def _fmt(value) -> str:
    try:
        return f"{float(value):g}"
    except (TypeError, ValueError):
        return str(value)


OmegaConf.register_new_resolver("peftsmooth_certify_dir", certify_dir, replace=True)

main = hydra_app("certify", run_certify, check=check_certify)
