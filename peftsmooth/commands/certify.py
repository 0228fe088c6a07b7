"""`peftsmooth certify`: CERTIFY (or PREDICT) every selected test image of a classifier, Cohen-style.

    peftsmooth certify run=<train or denoise-baseline run dir> [certify.n=100000 certify.skip=20 ...]
    peftsmooth certify model=vit dataset=cifar10 sigma=0.25 model.weights=...   # no adaptation
    torchrun --nproc_per_node=K -m peftsmooth certify run=<dir>                  # K shards, merged

Writes certify.tsv (one flushed row per image), summary.json, curve.csv and curve.png into the
certification directory: `<run>/certify/<mode>_sigma<sigma>_n<n>` for a run (so the same command
resumes), `outputs/certify/<mode>_<model>_<dataset>/<time>` otherwise, `certify.resume=<dir>` to continue
a given one. `certify.shard=i certify.num_shards=k` certifies every k-th selected image into
`<dir>/shard{i}of{k}`; `peftsmooth merge <dir>` combines the shards.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from omegaconf import OmegaConf

from peftsmooth import results
from peftsmooth.config import hydra_app, output_dir
from peftsmooth.errors import UserError, choice_error, require
from peftsmooth.runs import read_json
from peftsmooth.smoothing import PRECISIONS, Smooth, image_seed

log = logging.getLogger(__name__)

# peft methods whose adapter folds exactly into the base weights (merge_and_unload is exact).
EXACT_MERGE = {"LORA", "LOHA", "LOKR", "IA3", "OFT", "BOFT", "VERA"}
AUTO_BATCH = {"cuda": 4096, "cpu": 256}  # first try for certify.batch_size=auto (halved on out-of-memory)


# --- where the results go (hydra.run.dir in conf/certify.yaml) -----------------------------

def certify_dir(resume, run, mode, sigma, n, model, dataset, stamp, shard, num_shards) -> str:
    """`certify.resume`, else `<run>/certify/<mode>_sigma<sigma>_n<n>` for a run, else a fresh
    `outputs/certify/...` directory; a shard goes into `shard{i}of{k}/` below it."""
    if resume:
        return str(resume)
    base = Path("outputs/certify") / f"{mode}_{model}_{dataset}" / str(stamp)
    info_file = Path(str(run)).expanduser() / "run.json" if run else None
    if info_file is not None and info_file.is_file():
        try:
            run_sigma = read_json(info_file).get("sigma")
        except (OSError, ValueError):
            run_sigma = None
        base = Path(str(run)).expanduser() / "certify" / f"{mode}_sigma{_fmt(sigma if sigma is not None else run_sigma)}_n{n}"
    if int(num_shards) > 1:
        base = base / results.shard_dir_name(int(shard), int(num_shards))
    return os.path.abspath(base)  # absolute: it is also the multirun job dir (hydra.sweep.subdir)


def _fmt(value) -> str:
    try:
        return f"{float(value):g}"
    except (TypeError, ValueError):
        return str(value)


OmegaConf.register_new_resolver("peftsmooth_certify_dir", certify_dir, replace=True)


# --- settings, checked before anything runs -------------------------------------------------

@dataclass
class Settings:
    mode: str
    n0: int
    n: int
    alpha: float
    batch_size: int | str
    skip: int
    start: int
    max: int | None
    shard: int
    num_shards: int
    resume: str | None
    precision: str
    compile: bool
    compile_mode: str
    channels_last: bool
    merge_adapters: bool
    pack: bool
    radius_grid: list[float]


def _is_int(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def read_settings(c) -> Settings:
    """certify.* as a Settings, or a UserError naming the first bad key."""
    require(str(c.get("mode")) in MODES, str(choice_error("certify.mode", c.get("mode"), MODES)))
    for key in ("n0", "n"):
        require(_is_int(c.get(key), 1), f"certify.{key}={c.get(key)} must be an integer >= 1")
    alpha = c.get("alpha")
    require(isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and 0 < alpha < 1,
            f"certify.alpha={alpha} must lie strictly between 0 and 1 (Cohen's default: 0.001)")
    bs = c.get("batch_size")
    require(bs == "auto" or _is_int(bs, 1), f"certify.batch_size={bs} must be an integer >= 1 or auto")
    require(_is_int(c.get("skip"), 1), f"certify.skip={c.get('skip')} must be an integer >= 1")
    require(_is_int(c.get("start"), 0), f"certify.start={c.get('start')} must be an integer >= 0")
    require(c.get("max") is None or _is_int(c.get("max"), 1), f"certify.max={c.get('max')} must be null or an integer >= 1")
    require(_is_int(c.get("num_shards"), 1), f"certify.num_shards={c.get('num_shards')} must be an integer >= 1")
    require(_is_int(c.get("shard"), 0) and c.get("shard") < c.get("num_shards"),
            f"certify.shard={c.get('shard')} must be an integer in [0, certify.num_shards={c.get('num_shards')})")
    if str(c.get("precision")) not in PRECISIONS:
        raise choice_error("certify.precision", c.get("precision"), PRECISIONS)
    compile_modes = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
    if str(c.get("compile_mode", "default")) not in compile_modes:
        raise choice_error("certify.compile_mode", c.get("compile_mode"), compile_modes)
    grid = list(c.get("radius_grid") or [])
    require(all(isinstance(r, (int, float)) and r >= 0 for r in grid), f"certify.radius_grid={grid} must be radii >= 0")
    return Settings(mode=str(c.mode), n0=int(c.n0), n=int(c.n), alpha=float(alpha), batch_size=bs, skip=int(c.skip),
                    start=int(c.start), max=c.get("max"), shard=int(c.shard), num_shards=int(c.num_shards),
                    resume=c.get("resume"), precision=str(c.precision), compile=bool(c.compile),
                    compile_mode=str(c.get("compile_mode", "default")),
                    channels_last=bool(c.channels_last), merge_adapters=bool(c.merge_adapters),
                    pack=bool(c.get("pack", True)), radius_grid=[float(r) for r in grid])


# --- the classifier --------------------------------------------------------------------------

def load_classifier(cfg) -> tuple[nn.Module, dict]:
    """The model to certify and where it came from: a run's classifier (run=...) or an off-the-shelf
    one (model=..., the no-adaptation baseline)."""
    from peftsmooth.models import build_classifier, count_parameters
    from peftsmooth.runs import load_run

    choices = _choices()
    if cfg.get("run"):
        model, info = load_run(cfg.run)
        dataset = OmegaConf.create(info.get("dataset") or OmegaConf.to_container(cfg.dataset, resolve=True))
        if _overridden("dataset"):  # e.g. a dataset.root on this machine; must still be the same task
            dataset = cfg.dataset
            require(int(dataset.num_classes) == int(info["num_classes"]),
                    f"dataset.num_classes={dataset.num_classes} does not match the run's num_classes={info['num_classes']} "
                    f"(run={cfg.run})")
        source = {"run": str(Path(str(cfg.run)).expanduser().resolve()), "method": info.get("method"),
                  "model_name": info.get("model_name"), "trainable_params": info.get("trainable_params"),
                  "sigma_train": info.get("sigma"), "num_classes": int(info["num_classes"])}
    else:
        dataset = cfg.dataset
        model = build_classifier(cfg.model, int(dataset.num_classes), list(dataset.image_size)).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        source = {"run": None, "method": "none", "model_name": choices.get("model"), "trainable_params": 0,
                  "sigma_train": None, "num_classes": int(dataset.num_classes)}
    source["total_params"] = count_parameters(model)[1]
    source["dataset_cfg"] = dataset
    require(source["num_classes"] == int(dataset.num_classes),
            f"dataset.num_classes={dataset.num_classes} does not match the classifier's {source['num_classes']} classes")
    return model, source


def merge_exact_adapters(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """Fold peft adapters whose merge is exact (LoRA-type) into the weights; returns the methods merged."""
    merged = []

    def mergeable(m):
        if not (hasattr(m, "merge_and_unload") and hasattr(m, "peft_config")):
            return None
        kinds = {str(getattr(c.peft_type, "value", c.peft_type)).upper() for c in m.peft_config.values()}
        return kinds if kinds <= EXACT_MERGE else None

    kinds = mergeable(model)
    if kinds:
        return model.merge_and_unload().eval(), sorted(kinds)
    for name, child in list(model.named_modules()):
        kinds = mergeable(child) if name else None
        if kinds:
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, child.merge_and_unload())
            merged += sorted(kinds)
    return model.eval(), merged


def check_num_classes(model: nn.Module, num_classes: int, image_size) -> None:
    """One forward pass on a blank image: the classifier must output num_classes logits."""
    with torch.no_grad():
        logits = model(torch.zeros(1, *[int(s) for s in image_size]))
    require(logits.shape[-1] == num_classes,
            f"the classifier outputs {logits.shape[-1]} classes but dataset.num_classes={num_classes}")


def maybe_compile(g: Smooth, batch_size: int, image_size, device: torch.device, mode: str | None = None) -> str | None:
    """torch.compile the base classifier, warmed up outside the timed loop; falls back to eager
    (returns the error) when compilation fails. mode="reduce-overhead" adds CUDA graphs."""
    eager = g.base_classifier
    try:
        g.base_classifier = torch.compile(eager, mode=None if mode in (None, "default") else mode)
        g.pad_batches = True  # one fixed shape: no recompilation for the last, partial batch
        warm = torch.zeros(batch_size, *[int(s) for s in image_size], device=device)
        with torch.no_grad():
            for _ in range(2):
                g._classify(warm, batch_size)
        return None
    except Exception as err:  # noqa: BLE001 - any compiler failure falls back to eager execution
        log.warning("torch.compile failed (%s: %s); certifying the eager model", type(err).__name__, err)
        g.base_classifier, g.pad_batches = eager, False
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


# --- images ---------------------------------------------------------------------------------

def select_indices(num: int, s: Settings) -> list[int]:
    """Cohen's selection (every `skip`-th test image from `start`, at most `max`), then this shard's part."""
    chosen = list(range(s.start, num, s.skip))
    if s.max is not None:
        chosen = chosen[: s.max]
    return chosen[s.shard :: s.num_shards]


def certify_images(g: Smooth, dataset, todo: list[int], s: Settings, seed: int, batch_size: int):
    """CERTIFY: yields (idx, label, prediction, radius, seconds, samples) per image."""
    pending = deque()

    def images():
        for idx in todo:
            x, label = dataset[idx]
            pending.append((idx, int(label)))
            yield x

    seeds = (image_seed(seed, idx) for idx in todo)
    for cert in g.certify_many(images(), seeds, s.n0, s.n, s.alpha, batch_size, pack=s.pack):
        idx, label = pending.popleft()
        yield idx, label, cert.prediction, cert.radius, cert.seconds, s.n0 + s.n


def predict_images(g: Smooth, dataset, todo: list[int], s: Settings, seed: int, batch_size: int):
    """PREDICT: yields (idx, label, prediction, 0.0, seconds, samples) per image."""
    for idx in todo:
        x, label = dataset[idx]
        start = time.perf_counter()
        prediction = g.predict(x, s.n, s.alpha, batch_size, seed=image_seed(seed, idx))
        yield idx, int(label), prediction, 0.0, time.perf_counter() - start, s.n


MODES = {"cohen": certify_images, "predict": predict_images}


# --- the command ----------------------------------------------------------------------------

def run_certify(cfg) -> dict:
    from peftsmooth.data import build_dataset
    from peftsmooth.runtime import resolve_device, seed_everything

    s = read_settings(cfg.certify)
    rank, world = _distributed_env()
    require(world == 1 or s.num_shards == 1,
            "certify.num_shards must stay 1 under torchrun (each of the WORLD_SIZE processes certifies one shard)")
    model, source = load_classifier(cfg)
    sigma = cfg.sigma if cfg.get("sigma") is not None else source["sigma_train"]
    require(sigma is not None, "sigma=null: give the noise level to certify at, e.g. sigma=0.25 (required with model=...)")
    require(isinstance(sigma, (int, float)) and float(sigma) > 0,
            f"sigma={sigma} must be > 0 to certify" if cfg.get("sigma") is not None else
            f"the run was trained at sigma={sigma}: give the noise level to certify at, e.g. sigma=0.25")
    sigma = float(sigma)
    dataset_cfg = source.pop("dataset_cfg")
    image_size = list(dataset_cfg.image_size)
    check_num_classes(model, source["num_classes"], image_size)
    dataset = build_dataset(dataset_cfg, split="test")
    if world > 1:
        s.shard, s.num_shards = rank, world
    indices = select_indices(len(dataset), s)

    device = resolve_device(cfg.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    base_dir = _shared_dir(output_dir(), world)
    out = base_dir / results.shard_dir_name(rank, world) if world > 1 else output_dir()
    out.mkdir(parents=True, exist_ok=True)
    if s.resume:
        require((out / results.TSV_FILE).is_file(), f"certify.resume={s.resume} holds no {results.TSV_FILE} to resume")
    identity = {"mode": s.mode, "n0": s.n0 if s.mode == "cohen" else None, "n": s.n, "alpha": s.alpha, "sigma": sigma,
                "seed": int(cfg.seed), "precision": s.precision, "dataset": str(dataset_cfg.name)}
    wanted = set(indices)
    rows = _resume_rows(out, identity, wanted)  # checked before any compilation or sampling

    merged = []
    if s.merge_adapters:
        model, merged = merge_exact_adapters(model)
    model = model.to(device)
    if s.channels_last:
        model = model.to(memory_format=torch.channels_last)
    batch_size = AUTO_BATCH.get(device.type, 256) if s.batch_size == "auto" else int(s.batch_size)
    g = Smooth(model, source["num_classes"], sigma, precision=s.precision, channels_last=s.channels_last)
    compile_error = maybe_compile(g, batch_size, image_size, device, s.compile_mode) if s.compile else None
    seed_everything(int(cfg.seed))

    meta = {
        **identity, "skip": s.skip, "start": s.start, "max": s.max,
        "run": source["run"], "method": source["method"], "model_name": source["model_name"],
        "trainable_params": source["trainable_params"], "total_params": source["total_params"],
        "sigma_train": source["sigma_train"], "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "batch_size": batch_size, "compile": s.compile and compile_error is None, "compile_error": compile_error,
        "compile_mode": s.compile_mode if s.compile else None,
        "channels_last": s.channels_last, "merged_adapters": merged, "pack": s.pack,
        "num_planned": len(indices), "argv": " ".join(sys.argv),
    }
    if s.num_shards > 1:
        meta.update(shard=s.shard, num_shards=s.num_shards)
    todo = [i for i in indices if i not in {r["idx"] for r in rows}]
    results.write_results(out, rows, s.radius_grid, **meta)  # settings on disk before the first row

    _run_loop(g, dataset, todo, s, int(cfg.seed), batch_size, out, total=len(indices), rows=rows, show=rank == 0)
    summary = results.write_results(out, results.read_tsv(out / results.TSV_FILE), s.radius_grid, **meta)
    if g.max_batch:
        log.info("out-of-memory retries: batches of at most %d", g.max_batch)
    if world > 1:
        summary = _merge_ranks(base_dir, rank, world, s.radius_grid)
    _log_summary(summary, out if world == 1 else base_dir)
    return summary


def _run_loop(g, dataset, todo, s: Settings, seed, batch_size, out: Path, total: int, rows: list, show: bool) -> list:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    new = []
    acr_sum = sum(r["radius"] * r["correct"] for r in rows)
    tty = show and sys.stderr.isatty()
    columns = [TextColumn("certify"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[speed]}"),
               TextColumn("ACR {task.fields[acr]}"), TimeRemainingColumn()]
    with results.TsvWriter(out / results.TSV_FILE) as writer, \
            Progress(*columns, disable=not tty, transient=False) as progress:
        task = progress.add_task("certify", total=total, completed=len(rows), speed="", acr="-")
        for idx, label, prediction, r, seconds, samples in MODES[s.mode](g, dataset, todo, s, seed, batch_size):
            writer.write(idx, label, prediction, r, seconds)
            correct = int(prediction == label)
            new.append({"idx": idx, "label": label, "predict": prediction, "radius": r, "correct": correct})
            acr_sum += r * correct
            done = len(rows) + len(new)
            speed = f"{samples / seconds:,.0f} samples/s" if seconds > 0 else ""
            progress.update(task, advance=1, speed=speed, acr=f"{acr_sum / done:.3f}")
            if not tty and show:
                log.info("image %d (%d/%d): label %d predict %d radius %.3f, %s, running ACR %.3f",
                         idx, done, total, label, prediction, r, speed, acr_sum / done)
    return new


def _resume_rows(out: Path, meta: dict, wanted: set[int]) -> list[dict]:
    """Rows already in out/certify.tsv, after checking they were certified with these settings and
    belong to this run's image selection (which may extend the previous one, e.g. a larger max)."""
    tsv = out / results.TSV_FILE
    rows = results.read_tsv(tsv)
    if not tsv.is_file():
        return rows
    summary_file = out / results.SUMMARY_FILE
    require(summary_file.is_file(), f"{tsv} exists without a {results.SUMMARY_FILE}: not a certify directory to resume")
    previous = read_json(summary_file)
    for key in results.IDENTITY_KEYS:
        require(previous.get(key) == meta.get(key),
                f"{out} holds a certification with {key}={previous.get(key)}, this run has {key}={meta.get(key)}; "
                f"certify into another directory (hydra.run.dir=...)")
    extra = sorted(r["idx"] for r in rows if r["idx"] not in wanted)
    require(not extra, f"{out} holds images outside this run's selection (idx {extra[:3]}...; skip/start/max/shard "
                       f"differ); certify into another directory (hydra.run.dir=...)")
    if rows:
        log.info("resuming %s: %d images already certified", out, len(rows))
    return rows


# --- torchrun: one shard per process, merged by rank 0 --------------------------------------

def _distributed_env() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("PEFTSMOOTH_DIST_BACKEND") != "gloo" else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def _shared_dir(mine: Path, world: int) -> Path:
    """Rank 0's certification directory, the same for every process (timestamps may differ)."""
    if world == 1:
        return mine
    import torch.distributed as dist

    box = [str(mine)]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


def _merge_ranks(base: Path, rank: int, world: int, radius_grid) -> dict:
    import torch.distributed as dist

    from peftsmooth.config import _remove_if_unstarted

    dist.barrier()
    summary = {}
    if rank == 0:
        summary = results.write_merged(base, [base / results.shard_dir_name(r, world) for r in range(world)], radius_grid)
    elif output_dir() != base:
        _remove_if_unstarted(output_dir())
    dist.barrier()
    dist.destroy_process_group()
    return summary


# --- small helpers --------------------------------------------------------------------------

def _choices() -> dict:
    try:
        from hydra.core.hydra_config import HydraConfig

        return dict(HydraConfig.get().runtime.choices)
    except Exception:  # noqa: BLE001 - outside a Hydra job there are no choices
        return {}


def _overridden(group: str) -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig

        task = list(HydraConfig.get().overrides.task)
    except Exception:  # noqa: BLE001
        return False
    return any(o.lstrip("+~").split("=")[0].split(".")[0] == group for o in task)


def _cpu_name() -> str:
    import platform

    return platform.processor() or platform.machine()


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


main = hydra_app("certify", run_certify)
