"""The two ways one micro-batch updates a model in the training loop (`peftsmooth.train.loop.fit`).

`FirstOrderStep`: the objective's loss, backward, and every `grad_accum` micro-batches an optimizer
step: AdamW (no weight decay on biases and norm/scale vectors), linear warm-up then cosine decay per
optimizer step, gradient clipping, autocast in bf16 or fp16 (with a GradScaler), and under torchrun
DistributedDataParallel with the gradient all-reduce skipped (`no_sync`) until the last micro-batch.

`ZerothOrderStep`: a method's own `training_step(model, x_noisy, y) -> dict` (e.g. SPSA), one update
per micro-batch, no optimizer and no backward.

Both return a `StepResult` and give their resumable state as the checkpoint's `optimizer`,
`scheduler`, `scaler` and `hook` entries.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
import torch.nn as nn

from peftsmooth.distributed import DistInfo
from peftsmooth.runtime import PRECISIONS
from peftsmooth.train.losses import Batch, Objective, Progress
from peftsmooth.train.settings import TrainSettings


@dataclass
class StepResult:
    """What one micro-batch contributes to the epoch's metrics."""

    loss: float                  # mean loss over the micro-batch
    correct: float | None        # right predictions (None: the objective gives no logits)
    stepped: bool                # whether an update was made (the last micro-batch of an accumulation)
    extra: dict = field(default_factory=dict)  # other numeric fields, summed per epoch (e.g. queries)


class TrainingStep(Protocol):
    """A zeroth-order method (see peftsmooth.adapt.ZerothOrderAdaptation): updates in place."""

    def training_step(self, model: nn.Module, x_noisy: torch.Tensor, y: torch.Tensor) -> dict: ...

    def state_dict(self) -> dict | None: ...

    def load_state_dict(self, state: dict) -> None: ...


def autocast(device: torch.device, dtype):
    """Autocast to `dtype` on `device` (None: plain fp32)."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
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


class FirstOrderStep:
    """Gradient steps on `objective(model, batch)`; see the module docstring."""

    def __init__(self, model: nn.Module, objective: Objective, settings: TrainSettings, dist_info: DistInfo,
                 steps_per_epoch: int):
        self.objective, self.settings, self.device = objective, settings, dist_info.device
        self.accum = int(settings.grad_accum)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.ddp = dist_info.world_size > 1 and bool(self.trainable)
        self.train_model: nn.Module = model
        if self.ddp:
            self.train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.autocast_dtype = PRECISIONS[settings.precision]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=(settings.precision == "fp16"))
        self.optimizer = self.scheduler = None
        if self.trainable:
            self.optimizer = torch.optim.AdamW(param_groups(model, float(settings.weight_decay)), lr=float(settings.lr))
            warmup = int(round(float(settings.warmup_epochs) * steps_per_epoch))
            schedule = warmup_cosine(steps_per_epoch * settings.epochs, warmup, float(settings.min_lr_ratio))
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.micro = 0

    @property
    def lr(self) -> float | None:
        return self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else None

    def begin_epoch(self) -> None:
        self.train_model.train()
        self.micro = 0
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)

    def __call__(self, x: torch.Tensor, x_noisy: torch.Tensor, y: torch.Tensor, sigma: float,
                 progress: Progress | None = None) -> StepResult:
        self.micro += 1
        last = self.micro == self.accum
        with self.train_model.no_sync() if (self.ddp and not last) else nullcontext():
            with autocast(self.device, self.autocast_dtype):
                loss, logits = self.objective(self.train_model, Batch(x, x_noisy, y, sigma, progress or Progress()))
            self.scaler.scale(loss / self.accum).backward()
        correct = None if logits is None else float((logits.detach().argmax(1) == y).sum())
        if last:
            self._update()
            self.micro = 0
        return StepResult(float(loss.detach()), correct, last)

    def _update(self) -> None:
        """The optimizer step after the accumulated backward passes (clipped, scaled for fp16)."""
        if self.settings.clip_grad:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.trainable, float(self.settings.clip_grad))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "hook": None}

    def load_state_dict(self, checkpoint: dict) -> None:
        if self.optimizer is not None and checkpoint.get("optimizer"):
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.scheduler.load_state_dict(checkpoint["scheduler"])
        if checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])


class ZerothOrderStep:
    """One call of the method's `training_step` per micro-batch; see the module docstring."""

    accum = 1
    lr = None

    def __init__(self, model: nn.Module, method: TrainingStep):
        self.model, self.method = model, method

    def begin_epoch(self) -> None:
        self.model.train()

    def __call__(self, x: torch.Tensor, x_noisy: torch.Tensor, y: torch.Tensor, sigma: float,
                 progress: Progress | None = None) -> StepResult:
        out = dict(self.method.training_step(self.model, x_noisy, y))
        loss = float(out.pop("loss"))
        correct = float(out.pop("correct")) if "correct" in out else None
        extra = {k: v for k, v in out.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return StepResult(loss, correct, True, extra)

    def state_dict(self) -> dict:
        return {"optimizer": None, "scheduler": None, "scaler": None, "hook": self.method.state_dict()}

    def load_state_dict(self, checkpoint: dict) -> None:
        if checkpoint.get("hook") is not None:
            self.method.load_state_dict(checkpoint["hook"])
