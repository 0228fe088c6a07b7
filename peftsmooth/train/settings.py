"""The optimization settings of a training run (`train:` in conf/train.yaml), checked before any work."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional

import torch

from peftsmooth.errors import UserError, choice_error, require
from peftsmooth.runtime import PRECISIONS
from peftsmooth.train.watch import check_tensorboard

SCHEDULES = ("standard", "lp_ft")


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
    num_workers: Any = "auto"          # DataLoader workers; auto: what the cores allow (data_workers)
    eval_batch_size: int = 256
    max_steps_per_epoch: Optional[int] = None  # cap optimizer steps per epoch (quick runs, tests)
    max_eval: Optional[int] = None    # evaluate on the first max_eval test images only
    eval_every: int = 1               # evaluate every N epochs (and always after the last)
    tensorboard: bool = False         # also write TensorBoard event files into the run directory
    schedule: str = "standard"        # standard | lp_ft (head only for lp_epochs, then all; train.phases)
    lp_epochs: int = 2                # lp_ft: the first lp_epochs of `epochs` train only the head
    lp_lr: float = 1e-2               # lp_ft: the head-only phase's lr (linear probing's, whatever the method)

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
        require(self.num_workers == "auto" or (str(self.num_workers).isdigit() and not isinstance(self.num_workers, bool)),
                f"train.num_workers={self.num_workers} must be auto or an integer >= 0")
        require(int(self.eval_every) >= 1, f"train.eval_every={self.eval_every} must be >= 1")
        require(self.max_steps_per_epoch is None or int(self.max_steps_per_epoch) >= 1,
                f"train.max_steps_per_epoch={self.max_steps_per_epoch} must be >= 1 or null")
        require(self.max_eval is None or int(self.max_eval) >= 1, f"train.max_eval={self.max_eval} must be >= 1 or null")
        if self.precision not in PRECISIONS:
            raise choice_error("train.precision", self.precision, PRECISIONS)
        check_tensorboard(bool(self.tensorboard))
        check_schedule(self)


def check_schedule(settings: TrainSettings) -> None:
    """The schedule keys of TrainSettings.validate: a known schedule; for lp_ft 1 <= lp_epochs < epochs."""
    if settings.schedule not in SCHEDULES:
        raise choice_error("train.schedule", settings.schedule, SCHEDULES)
    if settings.schedule != "lp_ft":
        return
    epochs, k = int(settings.epochs), settings.lp_epochs
    require(isinstance(k, int) and not isinstance(k, bool) and 1 <= k < epochs,
            f"train.lp_epochs={k} must be an integer with 1 <= lp_epochs < train.epochs={epochs} "
            f"(train.epochs counts both phases: lp_epochs head-only, then the rest fine-tuning)")
    require(float(settings.lp_lr) > 0, f"train.lp_lr={settings.lp_lr} must be > 0")


def check_precision(settings: TrainSettings, device: torch.device) -> None:
    """fp16 autocast needs a GPU (its gradient scaler has no CPU counterpart here)."""
    if settings.precision == "fp16" and device.type != "cuda":
        raise UserError(f"train.precision=fp16 needs a GPU (device is {device}); use bf16 or fp32")


def data_workers(num_workers: Any) -> int:
    """train.num_workers as a number: `auto` is one worker per core this process may use beyond the
    main one, at most 4 (so DataLoader never asks for more workers than the machine suggests)."""
    if num_workers != "auto":
        return int(num_workers)
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cores - 1))
