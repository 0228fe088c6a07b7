"""The adaptation contract: what every way of adapting a base classifier provides, with defaults.

A `conf/peft/*.yaml` names a subclass of `Adaptation` with `_target_`. The commands and the training
loop call only what is defined here, so a new method overrides what differs and inherits the rest:

  apply(classifier)          -> the model to train; sets `requires_grad` on what trains (required)
  check(classifier)          -> raises a UserError if the method cannot adapt this classifier (run on
                                its module tree without weights, before any work; default: it can)
  load(classifier, run_dir)  -> the trained model rebuilt from a run directory (required)
  save(model, run_dir)       -> writes its weights, returns the file names (default: nothing to save)
  name, trains               -> run.json's `method`; whether anything trains (default: yes)
  no_lp_ft                   -> why train.schedule=lp_ft does not apply (default None: it does;
                                the method trains the classification head and something else)
  trained_names(model)       -> the parameters that train (default: those with requires_grad)
  extra_run_info()           -> fields added to run.json (default: none)
  before_certify(model)      -> (the model to certify, what was changed), e.g. an exact adapter merge

Methods that train without backpropagation subclass `ZerothOrderAdaptation` and implement
`training_step(model, x_noisy, y) -> dict` (one update, called by the training loop instead of
backward / optimizer step), with `state_dict` / `load_state_dict` for resume.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from peftsmooth.runtime import freeze


class Adaptation:
    """Base class of every adaptation method; see the module docstring for the contract."""

    name: str | None = None      # None: the Hydra choice of `peft` names the method
    trains: bool = True          # False: nothing to train, the command only evaluates
    zeroth_order: bool = False   # True for a ZerothOrderAdaptation (trains without backward)
    no_lp_ft: str | None = None  # why train.schedule=lp_ft does not apply (None: it does)

    def apply(self, classifier: nn.Module) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def load(self, classifier: nn.Module, run_dir: Path) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def check(self, classifier: nn.Module) -> None:
        """Raise a UserError naming the method, the model and what is missing if it cannot apply."""
        return None

    def save(self, model: nn.Module, run_dir: Path) -> list[str]:
        return []

    def trained_names(self, model: nn.Module) -> set[str]:
        return {n for n, p in model.named_parameters() if p.requires_grad}

    def extra_run_info(self) -> dict:
        return {}

    def before_certify(self, model: nn.Module) -> tuple[nn.Module, list[str]]:
        """The model certification runs on, and the names of what was changed (default: as trained)."""
        return model, []


class ZerothOrderAdaptation(Adaptation):
    """A method that trains without backpropagation (e.g. SPSA): the training loop builds no
    optimizer and calls `training_step` once per batch instead of backward / step."""

    zeroth_order = True

    def training_step(self, model: nn.Module, x_noisy: torch.Tensor, y: torch.Tensor) -> dict:
        """Update the trainable parameters in place; return at least {'loss': float} (see
        `peftsmooth.train.loop` for `correct` and the summed extra fields)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def state_dict(self) -> dict | None:
        """The method's own training state, checkpointed for resume (None: it has none)."""
        return None

    def load_state_dict(self, state: dict) -> None:
        return None


class NoAdaptation(Adaptation):
    """`peft=none`: no training; the off-the-shelf classifier is certified as it is."""

    name = "none"
    trains = False
    no_lp_ft = "it trains nothing"

    def apply(self, classifier: nn.Module) -> nn.Module:
        return freeze(classifier)

    def load(self, classifier: nn.Module, run_dir: Path) -> nn.Module:
        return classifier
