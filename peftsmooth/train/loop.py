"""The one training loop: train any model on Gaussian-noise-augmented data, with exact resume.

Used by `train` (PEFT / linear / full adaptation), `denoise-baseline` (a denoiser in front of a
frozen classifier) and the black-box method (zeroth-order steps). What varies is the objective.

    from peftsmooth.train.loop import TrainSettings, fit

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
space, after the dataset's augmentation, a fresh draw every step (validity rule 1 in
docs/architecture.md). `Batch` (peftsmooth.train.losses) gives an objective the clean batch too
(`batch.x`), `batch.noisy()` draws another independent noisy copy, and `batch.progress`
(peftsmooth.train.losses.Progress) says which global optimizer step it is, for objectives with a
schedule (SmoothAdv's epsilon warm-up).

The parts: `preflight` makes every check before any work (the commands call it too, before they
write anything); `EpochPlan` sizes the epochs; a step object does the update of one micro-batch
(peftsmooth.train.steps: `FirstOrderStep` for gradients with AdamW, warm-up + cosine, clipping,
accumulation and autocast; `ZerothOrderStep` for a method's own `training_step`); `TrainState`
(peftsmooth.train.state) is what checkpoint.pt saves and a resumed run restores.

Schedules (`settings.schedule`, peftsmooth.train.phases): `standard` trains every trainable
parameter for all epochs with one step object; `lp_ft` trains only the classification head for the
first `lp_epochs` epochs (phase `lp`, at `lp_lr`), then everything for the rest (phase `ft`, at `lr`),
each phase with a fresh step object (AdamW, warm-up + cosine over the phase's own steps). Under
lp_ft every metrics line has `phase` (lp / ft) and the checkpoint records it for the resume.

Zeroth-order hook: when `step_hook` is given (a `peftsmooth.adapt.ZerothOrderAdaptation`, or any
object with `training_step(model, x_noisy, y) -> dict`, `state_dict()` and `load_state_dict()`), no
optimizer is built and the loop calls it once per micro-batch instead of backward/step. The dict
must hold `loss` (float); `correct` (number of right predictions in the batch) is used for train
accuracy if present; every other numeric field (e.g. `queries`) is summed over the epoch and written
to metrics.jsonl. Its parameters should keep `requires_grad=True` (so they are counted as trainable
and checkpointed) and be updated in place.

Files (rank 0 only): `metrics.jsonl` (one JSON object per epoch: epoch, step, loss, train_acc,
clean_acc, noisy_acc, lr, the evaluator's / hook's extra fields and time), rewritten atomically
every epoch; `checkpoint.pt` (see peftsmooth.train.state); `training.png` and, with
`tensorboard=True`, TensorBoard event files (peftsmooth.train.watch). If `run_dir` holds a
checkpoint, `fit` resumes after its last completed epoch; with the same config the resumed run
reproduces the uninterrupted run's metrics, because every random stream is re-seeded at the start
of each epoch from (seed, epoch, rank). A checkpoint written with a different config is a UserError
naming the differing keys.

Data parallel: started under `torchrun`, `init_distributed()` joins the process group;
`batch_size` is the global batch, split evenly over the ranks; gradients are averaged by
DistributedDataParallel; evaluation is sharded and summed.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset

from peftsmooth.distributed import DistInfo, all_sum, barrier, init_distributed
from peftsmooth.errors import require
from peftsmooth.runtime import PRECISIONS, mix_seed
from peftsmooth.train.losses import Batch, CrossEntropy, Objective, Progress, add_noise
from peftsmooth.train.phases import HeadOnly, Phase, phase_of, plan
from peftsmooth.train.settings import TrainSettings, check_precision, data_workers
from peftsmooth.train.state import (
    CHECKPOINT,
    METRICS,
    TrainState,
    check_resume_config,
    read_checkpoint,
    read_metrics,
    resume_fingerprint,
    write_metrics,
)
from peftsmooth.train.steps import FirstOrderStep, StepResult, TrainingStep, ZerothOrderStep, autocast
from peftsmooth.train.watch import TrainingWatch

__all__ = ["TrainSettings", "fit", "preflight", "check_precision", "accuracy_evaluator", "eval_loader",
           "evaluation_record", "Batch", "add_noise", "CHECKPOINT", "METRICS", "read_checkpoint", "read_metrics",
           "resume_fingerprint"]

log = logging.getLogger("peftsmooth.train")


def preflight(run_dir: str | Path, config: Any, device: torch.device,
              settings: TrainSettings | None = None) -> dict | None:
    """Every check a run makes before any work: valid settings, fp16 only on a GPU, and a checkpoint
    in `run_dir` written with the same `config`. Returns that checkpoint (None: a fresh start)."""
    if settings is not None:
        settings.validate()
        check_precision(settings, device)
    checkpoint = read_checkpoint(run_dir)
    if checkpoint is not None:
        check_resume_config(checkpoint, config, Path(run_dir))
    return checkpoint


@dataclass(frozen=True)
class EpochPlan:
    """How an epoch is cut: micro-batches of `per_rank` images, `steps` updates per epoch."""

    per_rank: int
    steps: int

    @classmethod
    def of(cls, size: int, settings: TrainSettings, world: int, accum: int) -> "EpochPlan":
        require(settings.batch_size % world == 0,
                f"train.batch_size={settings.batch_size} must be divisible by the number of ranks ({world})")
        per_rank = settings.batch_size // world
        batches = math.ceil(math.ceil(size / world) / per_rank)  # micro-batches per rank and epoch
        require(batches >= accum or settings.epochs == 0,
                f"train.grad_accum={settings.grad_accum} exceeds the {batches} batches of an epoch")
        steps = batches // accum  # a trailing partial accumulation is dropped
        if settings.max_steps_per_epoch:
            steps = min(steps, int(settings.max_steps_per_epoch))
        require(steps >= 1 or settings.epochs == 0, "the training set is empty")
        return cls(per_rank, steps)


# --------------------------------------------------------------------------- evaluation

def eval_loader(test_set: Dataset, settings: TrainSettings) -> DataLoader:
    """The test split in order, cut to `max_eval` images, in batches of `eval_batch_size`."""
    if settings.max_eval is not None and settings.max_eval < len(test_set):
        test_set = Subset(test_set, range(int(settings.max_eval)))
    return DataLoader(test_set, batch_size=int(settings.eval_batch_size), shuffle=False)


def accuracy_evaluator(test_set: Dataset, sigma: float, settings: TrainSettings,
                       seed: int = 0) -> Callable[[nn.Module], dict]:
    """The default evaluation: clean and noisy (one draw per image) accuracy on the test split.

    The noise of batch b is drawn from a generator seeded with (seed, b), so it is the same every
    epoch, on every device, and whatever the number of data-parallel ranks (ranks take whole batches).
    """
    loader = eval_loader(test_set, settings)
    autocast_dtype = PRECISIONS[settings.precision]

    @torch.no_grad()
    def evaluate(model: nn.Module, dist_info: DistInfo | None = None) -> dict:
        dist_info = dist_info or DistInfo(0, 1, _model_device(model))
        device, was_training = dist_info.device, model.training
        model.eval()
        clean = noisy = count = 0
        for b, (x, y) in enumerate(loader):
            if b % dist_info.world_size != dist_info.rank:
                continue
            x, y = x.to(device), y.to(device)
            xn = add_noise(x, sigma, torch.Generator().manual_seed(mix_seed(seed, 7919, b)))
            with autocast(device, autocast_dtype):
                clean += int((model(x).argmax(1) == y).sum())
                noisy += int((model(xn).argmax(1) == y).sum())
            count += len(y)
        model.train(was_training)
        clean, noisy, count = all_sum([clean, noisy, count], dist_info)
        return {"clean_acc": clean / max(count, 1), "noisy_acc": noisy / max(count, 1)}

    return evaluate


def evaluation_record(model: nn.Module, evaluate: Callable[..., dict], run_dir: str | Path,
                      dist_info: DistInfo) -> dict:
    """The metrics line of a run that trains nothing: `evaluate` once, as epoch 0 (rank 0 writes it)."""
    started = time.time()
    model.to(dist_info.device)
    record = _record(0, 0, None, None, None)
    record.update(evaluate(model, dist_info))
    record["time"] = round(time.time() - started, 3)
    if dist_info.is_main:
        write_metrics(run_dir, [record])
        TrainingWatch(run_dir).close([record])
    return record


def _record(epoch: int, step: int, loss: float | None, train_acc: float | None, lr: float | None) -> dict:
    """One metrics line before evaluation: the keys every line of metrics.jsonl starts with."""
    return {"epoch": epoch, "step": step, "loss": loss, "train_acc": train_acc, "clean_acc": None,
            "noisy_acc": None, "lr": lr}


# --------------------------------------------------------------------------- helpers

def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _seed_epoch(seed: int, epoch: int, rank: int) -> int:
    s = mix_seed(seed, epoch, rank)
    torch.manual_seed(s)  # CPU and every CUDA device: noise, dropout, augmentation (workers=0)
    return s


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
                      generator=generator, num_workers=data_workers(settings.num_workers),
                      pin_memory=dist_info.device.type == "cuda", drop_last=False)


def _progress(enabled: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    transient=True, disable=not enabled)


class EpochTally:
    """Sums over one epoch's micro-batches: loss, right predictions, images and extra fields."""

    def __init__(self):
        self.loss_sum = self.correct = self.seen = 0.0
        self.scored = False  # whether the step gave predictions (an MSE denoiser objective does not)
        self.sums: dict[str, float] = {}

    def add(self, result: StepResult, size: int) -> None:
        self.loss_sum += result.loss * size
        self.seen += size
        if result.correct is not None:
            self.scored = True
            self.correct += result.correct
        for k, v in result.extra.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def stats(self) -> str:
        return f"loss {self.loss_sum / self.seen:.4f} acc {self.correct / self.seen:.3f}"

    def record(self, epoch: int, step: int, lr: float | None, dist_info: DistInfo) -> dict:
        """The epoch's metrics line (summed over ranks), before evaluation and time."""
        loss_sum, correct, seen, *extra = all_sum([self.loss_sum, self.correct, self.seen, *self.sums.values()],
                                                  dist_info)
        record = _record(epoch, step, loss_sum / max(seen, 1), correct / max(seen, 1) if self.scored else None, lr)
        record.update({k: int(v) if float(v).is_integer() else v for k, v in zip(self.sums.keys(), extra)})
        return record


# --------------------------------------------------------------------------- the loop

def fit(model: nn.Module, train_set: Dataset, *, sigma: float, settings: TrainSettings,
        run_dir: str | Path, objective: Objective | None = None,
        evaluate: Callable[..., dict] | None = None, save: Callable[[nn.Module, Path], list] | None = None,
        config: Any = None, seed: int = 0, device: torch.device | None = None,
        step_hook: TrainingStep | None = None, dist_info: DistInfo | None = None, progress: bool | None = None,
        describe: str = "train") -> dict:
    """Train `model` on x + sigma*N(0,I); returns {'metrics': last epoch's metrics, 'files': saved files, ...}.

    See the module docstring for the contract. `evaluate(model, dist_info)` is called after every
    `eval_every` epochs (None: no evaluation); `save(model, run_dir)` once at the end (rank 0 only).
    """
    run_dir = Path(run_dir)
    dist_info = dist_info or init_distributed(device or _model_device(model))
    checkpoint = preflight(run_dir, config, dist_info.device, settings)
    loop = _Loop(model, train_set, sigma, settings, seed, dist_info, objective, step_hook)
    state = TrainState(model, None, config)
    if checkpoint is not None:
        state.resume(checkpoint, run_dir, announce=dist_info.is_main)
    started = time.time()
    show = (sys.stderr.isatty() if progress is None else progress) and dist_info.is_main
    watch = (TrainingWatch(run_dir, tensorboard=settings.tensorboard, resumed_epoch=state.epoch)
             if dist_info.is_main else None)
    try:
        with _progress(show) as bar:
            for epoch in range(state.epoch + 1, settings.epochs + 1):
                t0 = time.time()
                record = loop.train_epoch(epoch, state, bar, describe)
                if evaluate is not None and (epoch % settings.eval_every == 0 or epoch == settings.epochs):
                    record.update(evaluate(model, dist_info))
                record["time"] = round(time.time() - t0, 3)
                state.end_epoch(record, run_dir, write=dist_info.is_main)
                if watch is not None:
                    _log_epoch(record, settings.epochs)
                    watch.epoch(state.history)
                barrier(dist_info)
    finally:
        loop.release()
    if watch is not None:
        watch.close(state.history)
    files = list(save(model, run_dir) or []) if dist_info.is_main and save is not None else []
    barrier(dist_info)
    return {"metrics": state.history[-1] if state.history else {}, "history": state.history, "files": files,
            "epochs": settings.epochs, "steps": state.step, "elapsed_seconds": round(time.time() - started, 3)}


def _log_epoch(record: dict, epochs: int) -> None:
    shown = " ".join(f"{k} {v:.4f}" for k, v in record.items() if isinstance(v, float) and k not in ("time",))
    log.info("epoch %d/%d %s (%.1fs)", record["epoch"], epochs, shown, record["time"])


class _Loop:
    """The model, its data and its phases, checked and sized once; `train_epoch` runs one epoch with
    the step object of the epoch's phase (peftsmooth.train.phases: one phase unless lp_ft)."""

    def __init__(self, model: nn.Module, train_set: Dataset, sigma: float, settings: TrainSettings, seed: int,
                 dist_info: DistInfo, objective: Objective | None, step_hook: TrainingStep | None):
        zeroth_order = step_hook is not None
        require(not (zeroth_order and dist_info.world_size > 1),
                "a training_step (zeroth-order) method runs in one process: start it without torchrun")
        require(not (zeroth_order and settings.schedule != "standard"),
                f"train.schedule={settings.schedule} needs gradients: a training_step (zeroth-order) method "
                f"trains with train.schedule=standard only")
        model.to(dist_info.device)
        require(zeroth_order or any(p.requires_grad for p in model.parameters()) or settings.epochs == 0,
                "nothing to train: the model has no trainable parameters (use peft=none to certify it as it is)")
        accum = 1 if zeroth_order else int(settings.grad_accum)
        self.plan = EpochPlan.of(len(train_set), settings, dist_info.world_size, accum)
        self.model, self.train_set, self.sigma, self.settings = model, train_set, sigma, settings
        self.seed, self.dist_info = seed, dist_info
        self.objective, self.step_hook = objective or CrossEntropy(), step_hook
        self.phases = plan(settings)
        self.head = HeadOnly(model) if any(p.head_only for p in self.phases) else None
        self.phase: Phase | None = None
        self.stepper: FirstOrderStep | ZerothOrderStep | None = None

    def enter(self, epoch: int, state: TrainState) -> None:
        """Before `epoch`: on a new phase, its trainable parameters and a fresh step object (optimizer
        and lr schedule over the phase's steps), which takes a resumed checkpoint's state if it was
        saved in that phase."""
        phase = phase_of(self.phases, epoch)
        if phase is self.phase:
            return
        self.phase = phase
        if self.head is not None:
            self.head.set(phase.head_only)
        self.stepper = (ZerothOrderStep(self.model, self.step_hook) if self.step_hook is not None else
                        FirstOrderStep(self.model, self.objective, phase.settings, self.dist_info, self.plan.steps))
        state.use(self.stepper, phase.name)

    def release(self) -> None:
        """After training (or on an error): every parameter the method trains has requires_grad again."""
        if self.head is not None:
            self.head.set(False)

    def train_epoch(self, epoch: int, state: TrainState, bar, describe: str) -> dict:
        """One epoch of updates (re-seeded from (seed, epoch, rank)); returns its metrics line."""
        self.enter(epoch, state)
        dist_info, device = self.dist_info, self.dist_info.device
        epoch_seed = _seed_epoch(self.seed, epoch, dist_info.rank)
        loader = _epoch_loader(self.train_set, self.plan.per_rank, self.settings, self.seed, epoch, epoch_seed,
                               dist_info)
        self.stepper.begin_epoch()
        name = self.phase.name
        task = bar.add_task(f"{describe} epoch {epoch}/{self.settings.epochs}" + (f" ({name})" if name else ""),
                            total=self.plan.steps, stats="")
        tally, done = EpochTally(), 0
        for x, y in loader:
            if done >= self.plan.steps:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            progress = Progress(state.step, self.plan.steps)  # the global step, for objectives' schedules
            result = self.stepper(x, add_noise(x, self.sigma), y, self.sigma, progress)
            tally.add(result, len(y))
            if result.stepped:
                done += 1
                state.step += 1
                bar.update(task, advance=1, stats=tally.stats())
        bar.remove_task(task)
        record = tally.record(epoch, state.step, self.stepper.lr, dist_info)
        return record if name is None else {"epoch": record.pop("epoch"), "phase": name, **record}
