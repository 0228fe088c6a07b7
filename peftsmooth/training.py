"""The one training loop: train any model on Gaussian-noise-augmented data, with exact resume.

Used by `train` (PEFT / linear / full adaptation), `denoise-baseline` (a denoiser in front of a
frozen classifier) and the black-box method (zeroth-order steps). What varies is the objective.

    from peftsmooth.training import TrainSettings, fit

    summary = fit(
        model,                      # nn.Module on native [0,1] images; its trainable params = requires_grad
        train_set,                  # Dataset of (x (C,H,W) in [0,1], label), augmentation already inside
        sigma=0.5,                  # noise std in native pixel space
        settings=TrainSettings.from_cfg(cfg.train),   # epochs, batch_size, lr, ... (see below)
        run_dir=run_dir,            # metrics.jsonl and checkpoint.pt go here (rank 0 only)
        objective=CrossEntropy(),   # callable(model, Batch) -> (loss, logits or None); default CE
        evaluate=accuracy_evaluator(test_set, sigma, settings, seed),  # callable(model) -> dict, or None
        save=adapt.save,            # callable(model, run_dir) -> [file names], called once at the end
        config=to_plain(cfg),       # a resumed run must have been started with the same config
        seed=0, device=torch.device("cpu"),
        step_hook=None,             # object with training_step(model, x_noisy, y) -> dict (zeroth order)
    )

Each optimizer step sees `x_noisy = x + sigma * N(0, I)`: the noise is added here, in native pixel
space, after the dataset's augmentation, a fresh draw every step (DESIGN.md section 2, rule 1).
`Batch` gives an objective the clean batch too (`batch.x`), and `batch.noisy()` draws another
independent noisy copy (consistency regularization needs m of them).

Optimization: AdamW (no weight decay on biases and norm/scale vectors), linear warm-up then cosine
decay per optimizer step, gradient clipping, gradient accumulation (`grad_accum` micro-batches per
step), autocast in bf16 (CPU or GPU) or fp16 (GPU, with a GradScaler) when `precision` asks.

Zeroth-order hook: when `step_hook` is given (an adaptation object that defines
`training_step(model, x_noisy, y) -> dict`), no optimizer is built and the loop calls it once per
micro-batch instead of backward/step. The dict must hold `loss` (float); `correct` (number of right
predictions in the batch) is used for train accuracy if present; every other numeric field (e.g.
`queries`) is summed over the epoch and written to metrics.jsonl. If the hook object has
`state_dict()`/`load_state_dict()`, that state is checkpointed too. Its parameters should keep
`requires_grad=True` (so they are counted as trainable and checkpointed) and be updated in place.

Files (rank 0 only): `metrics.jsonl` (one JSON object per epoch: epoch, step, loss, train_acc,
clean_acc, noisy_acc, lr, time and the evaluator's / hook's extra fields), rewritten atomically
every epoch; `checkpoint.pt` (trainable parameters and buffers, optimizer, scheduler, grad scaler,
hook state, RNG states, epoch, config), written atomically at the end of every epoch and read back
with `torch.load(weights_only=True)`. If `run_dir` holds a checkpoint, `fit` resumes after its last
completed epoch; with the same config the resumed run reproduces the uninterrupted run's metrics,
because every random stream is re-seeded at the start of each epoch from (seed, epoch, rank). A
checkpoint written with a different config is a UserError naming the differing keys.

Data parallel: started under `torchrun`, `init_distributed()` joins the process group (NCCL on GPU,
gloo on CPU); `batch_size` is the global batch, split evenly over the ranks; gradients are averaged
by DistributedDataParallel; evaluation is sharded and summed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from peftsmooth.errors import UserError, choice_error, require
from peftsmooth.runs import atomic_write_text

log = logging.getLogger("peftsmooth.train")

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------- settings

@dataclass
class TrainSettings:
    """Optimization settings (the `train:` block of conf/train.yaml)."""

    epochs: int = 10
    batch_size: int = 128             # global batch (summed over data-parallel ranks), per micro-batch
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.0         # cosine decays to lr * min_lr_ratio
    grad_accum: int = 1               # micro-batches per optimizer step
    clip_grad: Optional[float] = 1.0  # max gradient norm (null: no clipping)
    precision: str = "fp32"           # fp32 | bf16 | fp16 (fp16 needs a GPU)
    num_workers: int = 0
    eval_batch_size: int = 256
    max_steps_per_epoch: Optional[int] = None  # cap optimizer steps per epoch (quick runs, tests)
    max_eval: Optional[int] = None    # evaluate on the first max_eval test images only
    eval_every: int = 1               # evaluate every N epochs (and always after the last)

    @classmethod
    def from_cfg(cls, cfg: Any) -> "TrainSettings":
        """From a config node / dict; unknown keys are ignored (callers keep their own keys there)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in dict(cfg or {}).items() if k in known}
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        require(int(self.epochs) >= 0, f"train.epochs={self.epochs} must be >= 0")
        require(int(self.batch_size) >= 1, f"train.batch_size={self.batch_size} must be >= 1")
        require(int(self.grad_accum) >= 1, f"train.grad_accum={self.grad_accum} must be >= 1")
        require(int(self.eval_batch_size) >= 1, f"train.eval_batch_size={self.eval_batch_size} must be >= 1")
        require(float(self.lr) > 0, f"train.lr={self.lr} must be > 0")
        require(float(self.weight_decay) >= 0, f"train.weight_decay={self.weight_decay} must be >= 0")
        require(float(self.warmup_epochs) >= 0, f"train.warmup_epochs={self.warmup_epochs} must be >= 0")
        require(int(self.num_workers) >= 0, f"train.num_workers={self.num_workers} must be >= 0")
        require(int(self.eval_every) >= 1, f"train.eval_every={self.eval_every} must be >= 1")
        require(self.max_steps_per_epoch is None or int(self.max_steps_per_epoch) >= 1,
                f"train.max_steps_per_epoch={self.max_steps_per_epoch} must be >= 1 or null")
        require(self.max_eval is None or int(self.max_eval) >= 1, f"train.max_eval={self.max_eval} must be >= 1 or null")
        if self.precision not in PRECISIONS:
            raise choice_error("train.precision", self.precision, PRECISIONS)


# --------------------------------------------------------------------------- distributed

@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the torchrun process group if started under torchrun (idempotent); else a 1-rank world.

    Under torchrun on GPUs every rank uses cuda:LOCAL_RANK; on CPU the gloo backend.
    """
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(0, 1, device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), device)


def broadcast_object(obj: Any, dist_info: DistInfo) -> Any:
    """Rank 0's value of `obj` on every rank (e.g. the run directory)."""
    if dist_info.world_size == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_sum(values: list[float], dist_info: DistInfo) -> list[float]:
    if dist_info.world_size == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=dist_info.device)
    dist.all_reduce(t)
    return t.tolist()


def _barrier(dist_info: DistInfo) -> None:
    if dist_info.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


# --------------------------------------------------------------------------- objectives

@dataclass
class Batch:
    """One micro-batch: clean (augmented) images, their noisy copy, labels and the noise level."""

    x: torch.Tensor
    x_noisy: torch.Tensor
    y: torch.Tensor
    sigma: float

    def noisy(self) -> torch.Tensor:
        """Another independent noisy copy x + sigma * N(0, I)."""
        return add_noise(self.x, self.sigma)


Objective = Callable[[nn.Module, Batch], "tuple[torch.Tensor, Optional[torch.Tensor]]"]


def add_noise(x: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """x + sigma * N(0, I) in native pixel space (no clipping: the smoothing noise is unbounded)."""
    if sigma == 0:
        return x
    if generator is None:
        return x + sigma * torch.randn_like(x)
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device)
    return x + sigma * noise.to(x.device)


def cross_entropy(model: nn.Module, batch: Batch):
    """Default objective: cross-entropy of the model on the noisy copy (Cohen et al. 2019)."""
    logits = model(batch.x_noisy)
    return F.cross_entropy(logits.float(), batch.y), logits


# --------------------------------------------------------------------------- evaluation

def accuracy_evaluator(test_set: Dataset, sigma: float, settings: TrainSettings, seed: int = 0,
                       num_workers: int = 0) -> Callable[[nn.Module], dict]:
    """The default evaluation: clean and noisy (one draw per image) accuracy on the test split.

    The noise of batch b is drawn from a generator seeded with (seed, b), so it is the same every
    epoch, on every device, and whatever the number of data-parallel ranks (ranks take whole batches).
    """
    if settings.max_eval is not None and settings.max_eval < len(test_set):
        test_set = Subset(test_set, range(int(settings.max_eval)))
    loader = DataLoader(test_set, batch_size=int(settings.eval_batch_size), shuffle=False, num_workers=num_workers)
    autocast_dtype = PRECISIONS[settings.precision]

    @torch.no_grad()
    def evaluate(model: nn.Module, dist_info: DistInfo | None = None) -> dict:
        dist_info = dist_info or DistInfo(0, 1, _model_device(model))
        device = dist_info.device
        was_training = model.training
        model.eval()
        clean = noisy = count = 0
        for b, (x, y) in enumerate(loader):
            if b % dist_info.world_size != dist_info.rank:
                continue
            x, y = x.to(device), y.to(device)
            gen = torch.Generator().manual_seed(_mix(seed, 7919, b))
            xn = add_noise(x, sigma, gen)
            with _autocast(device, autocast_dtype):
                clean += int((model(x).argmax(1) == y).sum())
                noisy += int((model(xn).argmax(1) == y).sum())
            count += len(y)
        model.train(was_training)
        clean, noisy, count = _all_sum([clean, noisy, count], dist_info)
        return {"clean_acc": clean / max(count, 1), "noisy_acc": noisy / max(count, 1)}

    return evaluate


# --------------------------------------------------------------------------- helpers

def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs and platforms)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _autocast(device: torch.device, dtype):
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors training changes: parameters with requires_grad, and all buffers."""
    state = model.state_dict()
    keep = {n for n, p in model.named_parameters() if p.requires_grad}
    keep |= {n for n, _ in model.named_buffers()}
    return {k: v.detach().cpu().clone() for k, v in state.items() if k in keep}


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on biases / norm scales / tokens of dim <= 1."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    """lr multiplier at optimizer step s: linear warm-up to 1, then cosine down to min_ratio."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_epoch(seed: int, epoch: int, rank: int) -> int:
    s = _mix(seed, epoch, rank)
    torch.manual_seed(s)  # CPU and every CUDA device: noise, dropout, augmentation (workers=0)
    return s


def _config_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _config_diff(old.get(k, "<unset>"), new.get(k, "<unset>"), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix[:-1]} ({old} -> {new})"]


def read_checkpoint(run_dir: str | Path) -> dict | None:
    """The checkpoint in `run_dir`, or None. Loaded without unrestricted unpickling."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        return None
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise UserError(f"cannot read checkpoint {path} ({type(err).__name__}); delete it to start over") from err


# Config keys that may change between a run and its resumption (they do not change the numbers).
RESUME_FREE = ("hydra", "resume", "device", "train.num_workers", "train.eval_batch_size")


def resume_fingerprint(cfg, free: tuple[str, ...] = RESUME_FREE) -> dict:
    """The config a checkpoint must match to be resumed: `cfg` as plain data minus the `free` keys."""
    from peftsmooth.runs import to_plain

    plain = to_plain(cfg)
    for dotted in free:
        node, *rest = dotted.split(".")
        if rest and isinstance(plain.get(node), dict):
            plain[node].pop(rest[0], None)
        elif not rest:
            plain.pop(node, None)
    return plain


def check_resume_config(checkpoint: dict, config: Any, run_dir: Path) -> None:
    """A UserError naming the keys whose value differs from the checkpoint's config."""
    if config is None:
        return
    old = json.loads(checkpoint.get("config", "null"))
    new = json.loads(json.dumps(config, default=str))
    diff = _config_diff(old, new)
    if diff:
        shown = "; ".join(diff[:4]) + (f"; ... ({len(diff)} keys)" if len(diff) > 4 else "")
        raise UserError(f"cannot resume {run_dir}: its checkpoint was written with a different config: {shown} "
                        f"(rerun with the same settings, or use a new run directory)")


def _save_checkpoint(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(payload, str(tmp))
    os.replace(tmp, path)


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    transient=True, disable=not enabled)


# --------------------------------------------------------------------------- the loop

def fit(model: nn.Module, train_set: Dataset, *, sigma: float, settings: TrainSettings,
        run_dir: str | Path, objective: Objective | None = None,
        evaluate: Callable[..., dict] | None = None, save: Callable[[nn.Module, Path], list] | None = None,
        config: Any = None, seed: int = 0, device: torch.device | None = None,
        step_hook: Any = None, dist_info: DistInfo | None = None, progress: bool | None = None,
        describe: str = "train") -> dict:
    """Train `model` on x + sigma*N(0,I); returns {'metrics': last epoch's metrics, 'files': saved files, ...}.

    See the module docstring for the contract. `evaluate(model, dist_info)` is called after every
    `eval_every` epochs (None: no evaluation); `save(model, run_dir)` once at the end (rank 0 only).
    """
    settings.validate()
    run_dir = Path(run_dir)
    device = device or _model_device(model)
    dist_info = dist_info or init_distributed(device)
    device = dist_info.device
    objective = objective or cross_entropy
    autocast_dtype = PRECISIONS[settings.precision]
    if settings.precision == "fp16" and device.type != "cuda":
        raise UserError(f"train.precision=fp16 needs a GPU (device is {device}); use bf16 or fp32")
    world = dist_info.world_size
    require(settings.batch_size % world == 0,
            f"train.batch_size={settings.batch_size} must be divisible by the number of ranks ({world})")
    zeroth_order = step_hook is not None and hasattr(step_hook, "training_step")
    require(not (zeroth_order and world > 1),
            "a training_step (zeroth-order) method runs in one process: start it without torchrun")

    checkpoint = read_checkpoint(run_dir)
    if checkpoint is not None:
        check_resume_config(checkpoint, config, run_dir)

    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    require(zeroth_order or trainable or settings.epochs == 0,
            "nothing to train: the model has no trainable parameters (use peft=none to certify it as it is)")

    # --- data: a per-epoch seeded order (DistributedSampler under torchrun)
    per_rank = settings.batch_size // world
    batches = math.ceil(math.ceil(len(train_set) / world) / per_rank)  # micro-batches per rank and epoch
    accum = 1 if zeroth_order else int(settings.grad_accum)
    require(batches >= accum or settings.epochs == 0,
            f"train.grad_accum={settings.grad_accum} exceeds the {batches} batches of an epoch")
    steps_per_epoch = batches // accum  # a trailing partial accumulation is dropped
    if settings.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, int(settings.max_steps_per_epoch))
    require(steps_per_epoch >= 1 or settings.epochs == 0, "the training set is empty")
    total_steps = steps_per_epoch * settings.epochs

    # --- model, optimizer, schedule
    train_model: nn.Module = model
    if world > 1 and trainable and not zeroth_order:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = scheduler = None
    scaler = torch.amp.GradScaler(device.type, enabled=(settings.precision == "fp16"))
    if not zeroth_order and trainable:
        optimizer = torch.optim.AdamW(_param_groups(model, float(settings.weight_decay)), lr=float(settings.lr))
        warmup = int(round(float(settings.warmup_epochs) * steps_per_epoch))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(total_steps, warmup, float(settings.min_lr_ratio)))

    # --- resume
    start_epoch, step = 0, 0
    history: list[dict] = []
    if checkpoint is not None:
        missing = set(checkpoint["model"]) - set(model.state_dict())
        require(not missing, f"cannot resume {run_dir}: checkpoint tensors {sorted(missing)[:3]} are not in the model")
        model.load_state_dict(checkpoint["model"], strict=False)
        if optimizer is not None and checkpoint.get("optimizer"):
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
        if checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        if step_hook is not None and hasattr(step_hook, "load_state_dict") and checkpoint.get("hook") is not None:
            step_hook.load_state_dict(checkpoint["hook"])
        if checkpoint.get("rng"):
            _set_rng_state(checkpoint["rng"])
        start_epoch, step = int(checkpoint["epoch"]), int(checkpoint["step"])
        history = [m for m in read_metrics(run_dir) if int(m.get("epoch", 0)) <= start_epoch]
        if dist_info.is_main:
            log.info("resuming %s after epoch %d (step %d)", run_dir, start_epoch, step)

    show = (sys.stderr.isatty() if progress is None else progress) and dist_info.is_main
    started = time.time()
    with _progress(show) as bar:
        for epoch in range(start_epoch + 1, settings.epochs + 1):
            epoch_seed = _seed_epoch(seed, epoch, dist_info.rank)
            loader = _epoch_loader(train_set, per_rank, settings, seed, epoch, epoch_seed, dist_info)
            train_model.train()
            task = bar.add_task(f"{describe} epoch {epoch}/{settings.epochs}", total=steps_per_epoch, stats="")
            t0 = time.time()
            sums: dict[str, float] = {}
            loss_sum = correct = seen = 0.0
            scored = False  # whether the objective gave logits (an MSE denoiser objective does not)
            micro, done_steps = 0, 0
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
            for x, y in loader:
                if done_steps >= steps_per_epoch:
                    break
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                x_noisy = add_noise(x, sigma)
                if zeroth_order:
                    out = dict(step_hook.training_step(model, x_noisy, y))
                    loss_value = float(out.pop("loss"))
                    scored = scored or "correct" in out
                    correct += float(out.pop("correct", 0))
                    for k, v in out.items():
                        if isinstance(v, (int, float)) and not isinstance(v, bool):
                            sums[k] = sums.get(k, 0.0) + v
                    micro, stepped = 0, True
                else:
                    micro += 1
                    last = micro == settings.grad_accum
                    sync = train_model.no_sync() if (world > 1 and not last and hasattr(train_model, "no_sync")) else nullcontext()
                    with sync:
                        with _autocast(device, autocast_dtype):
                            loss, logits = objective(train_model, Batch(x, x_noisy, y, sigma))
                        scaler.scale(loss / settings.grad_accum).backward()
                    loss_value = float(loss.detach())
                    if logits is not None:
                        scored = True
                        correct += float((logits.detach().argmax(1) == y).sum())
                    stepped = last
                    if last:
                        if settings.clip_grad:
                            scaler.unscale_(optimizer)
                            torch.nn.utils.clip_grad_norm_(trainable, float(settings.clip_grad))
                        scaler.step(optimizer)
                        scaler.update()
                        optimizer.zero_grad(set_to_none=True)
                        scheduler.step()
                        micro = 0
                loss_sum += loss_value * len(y)
                seen += len(y)
                if stepped:
                    done_steps += 1
                    step += 1
                    bar.update(task, advance=1,
                               stats=f"loss {loss_sum / seen:.4f} acc {correct / seen:.3f}")
            bar.remove_task(task)
            loss_sum, correct, seen, *extra = _all_sum([loss_sum, correct, seen, *sums.values()], dist_info)
            record = {"epoch": epoch, "step": step, "loss": loss_sum / max(seen, 1),
                      "train_acc": correct / max(seen, 1) if scored else None, "clean_acc": None, "noisy_acc": None,
                      "lr": optimizer.param_groups[0]["lr"] if optimizer is not None else None}
            record.update({k: int(v) if float(v).is_integer() else v for k, v in zip(sums.keys(), extra)})
            if evaluate is not None and (epoch % settings.eval_every == 0 or epoch == settings.epochs):
                record.update(evaluate(model, dist_info))
            record["time"] = round(time.time() - t0, 3)
            history.append(record)
            if dist_info.is_main:
                atomic_write_text(run_dir / METRICS, "".join(json.dumps(m) + "\n" for m in history))
                _save_checkpoint(run_dir / CHECKPOINT, {
                    "epoch": epoch, "step": step, "model": trainable_state(model),
                    "optimizer": optimizer.state_dict() if optimizer is not None else None,
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                    "hook": step_hook.state_dict() if step_hook is not None and hasattr(step_hook, "state_dict") else None,
                    "rng": _rng_state(), "config": json.dumps(config, default=str)})
                shown = " ".join(f"{k} {v:.4f}" for k, v in record.items()
                                 if isinstance(v, float) and k not in ("time",))
                log.info("epoch %d/%d %s (%.1fs)", epoch, settings.epochs, shown, record["time"])
            _barrier(dist_info)

    files: list = []
    if dist_info.is_main and save is not None:
        files = list(save(model, run_dir) or [])
    _barrier(dist_info)
    return {"metrics": history[-1] if history else {}, "history": history, "files": files,
            "epochs": settings.epochs, "steps": step, "elapsed_seconds": round(time.time() - started, 3)}


def _epoch_loader(train_set: Dataset, per_rank: int, settings: TrainSettings, seed: int, epoch: int,
                  epoch_seed: int, dist_info: DistInfo) -> DataLoader:
    """This epoch's loader: shuffled by a generator seeded from (seed, epoch); sharded under DDP."""
    generator = torch.Generator().manual_seed(epoch_seed)
    sampler = None
    if dist_info.world_size > 1:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(train_set, num_replicas=dist_info.world_size, rank=dist_info.rank,
                                     shuffle=True, seed=seed, drop_last=False)
        sampler.set_epoch(epoch)
    return DataLoader(train_set, batch_size=per_rank, shuffle=sampler is None, sampler=sampler,
                      generator=generator, num_workers=int(settings.num_workers),
                      pin_memory=dist_info.device.type == "cuda", drop_last=False)
