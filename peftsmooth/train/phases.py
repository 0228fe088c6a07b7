"""Training schedules: `standard` (one phase) and `lp_ft`, linear probing then fine-tuning.

LP-FT (Kumar et al., ICLR 2022, "Fine-Tuning can Distort Pretrained Features and Underperform
Out-of-Distribution"; for LoRA, Tomihari & Sato 2024, "Understanding Linear Probing then
Fine-tuning Language Models from NTK Perspective"): a fresh random head trained together with the
features sends large, noisy gradients into them and distorts what was pretrained. Training the head
first, on frozen features, lets the fine-tuning phase start from a head that already fits them.

`train.schedule=lp_ft train.lp_epochs=K` with `train.epochs=E` (E is the total):
  epochs 1..K      phase `lp`: only the classification head trains (every other trainable parameter
                   of the method has requires_grad=False), AdamW at `train.lp_lr`
  epochs K+1..E    phase `ft`: the method's parameters and the head, AdamW at `train.lr`, a fresh
                   optimizer state; the head starts from where the lp phase left it
Each phase has its own linear warm-up + cosine decay over its own optimizer steps; its warm-up is
the same share of the phase as `train.warmup_epochs` is of `train.epochs`. Every other setting
(batch, weight decay, clipping, precision, loss) is shared. The head is found among the trainable
parameters by its module name (`head_parameter_names`), wherever peft put it.

The lp phase is linear probing of the starting features whatever the method (every method starts
as the identity or close to it), so `train.lp_lr` defaults to linear probing's own lr (1e-2, that of
peft=linear), not to a multiple of the method's fine-tuning lr.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from peftsmooth.errors import UserError, require
from peftsmooth.train.settings import TrainSettings


@dataclass(frozen=True)
class Phase:
    """A run of consecutive epochs trained by one step object (one optimizer and lr schedule)."""

    name: str | None            # metrics.jsonl's `phase` (lp / ft); None: the standard schedule
    first: int                  # its first and last epoch (1-based, inclusive)
    last: int
    settings: Any               # the TrainSettings its step object runs with (epochs = its length)
    head_only: bool = False     # whether only the classification head trains


def check_method(settings: TrainSettings, adapt: Any, method: str) -> None:
    """Refuse lp_ft for a method it does not apply to (before any work); see Adaptation.no_lp_ft."""
    if settings.schedule != "lp_ft":
        return
    if getattr(adapt, "zeroth_order", False):
        reason = "it trains without gradients (zeroth order, black box)"
    else:
        reason = getattr(adapt, "no_lp_ft", None)
    if reason:
        raise UserError(f"train.schedule=lp_ft does not apply to peft={method}: {reason}; "
                        f"use train.schedule=standard")


def plan(settings: TrainSettings) -> list[Phase]:
    """The phases of a run: one for `standard` (its settings unchanged), lp then ft for `lp_ft`."""
    epochs = int(settings.epochs)
    if settings.schedule != "lp_ft":
        return [Phase(None, 1, epochs, settings)]
    k = int(settings.lp_epochs)
    return [Phase("lp", 1, k, _phase_settings(settings, k, float(settings.lp_lr)), head_only=True),
            Phase("ft", k + 1, epochs, _phase_settings(settings, epochs - k, float(settings.lr)))]


def _phase_settings(settings: TrainSettings, epochs: int, lr: float) -> TrainSettings:
    """The settings of a phase of `epochs` epochs at `lr`: its warm-up the run's share of it."""
    warmup = float(settings.warmup_epochs) * epochs / max(int(settings.epochs), 1)
    return dataclasses.replace(settings, epochs=epochs, lr=lr, warmup_epochs=warmup)


def phase_of(phases: list[Phase], epoch: int) -> Phase:
    return next(p for p in phases if p.first <= epoch <= p.last)


def schedule_info(settings: TrainSettings) -> dict:
    """run.json's `schedule`: the name, and for lp_ft the epochs and learning rates of each phase."""
    if settings.schedule != "lp_ft":
        return {"name": settings.schedule}
    return {"name": "lp_ft", "lp_epochs": int(settings.lp_epochs), "lp_lr": float(settings.lp_lr),
            "ft_epochs": int(settings.epochs) - int(settings.lp_epochs), "ft_lr": float(settings.lr)}


def head_parameter_names(model: nn.Module) -> set[str]:
    """Names of the trainable parameters of the classification head, wherever the BaseClassifier sits
    in `model`: 'backbone.head.*' for our own methods, 'base_model.model.backbone.head.modules_to_save.
    default.*' under peft (its frozen original_module copy does not count: it has requires_grad=False)."""
    from peftsmooth.adapt.common import head_module_name
    from peftsmooth.models import BaseClassifier

    for prefix, module in model.named_modules():
        if isinstance(module, BaseClassifier):
            head = f"{prefix}.{head_module_name(module)}." if prefix else f"{head_module_name(module)}."
            return {n for n, p in model.named_parameters() if p.requires_grad and n.startswith(head)}
    return set()


class HeadOnly:
    """Switches a model between training only its head (lp) and every parameter it trains (ft)."""

    def __init__(self, model: nn.Module):
        self.trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.head = head_parameter_names(model)
        require(bool(self.head), "train.schedule=lp_ft: none of the model's trainable parameters belongs to a "
                                 "classification head (use train.schedule=standard)")
        require(len(self.head) < len(self.trained), "train.schedule=lp_ft: the model trains only its head "
                                                    "already (use train.schedule=standard)")

    def set(self, head_only: bool) -> None:
        for name, p in self.trained:
            p.requires_grad_(not head_only or name in self.head)
