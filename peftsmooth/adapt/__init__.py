"""Every way of adapting a base classifier; configs in conf/peft/ choose one with `_target_`.

An adaptation object has three methods:
  apply(classifier)          -> the model to train (what is trainable is set here)
  save(model, run_dir)       -> writes its weights in the run directory, returns the file names
  load(classifier, run_dir)  -> the trained model rebuilt from run_dir (used by certify)
and optionally: `name` (run.json's method), `trains = False` (evaluate only, like NoAdaptation),
`training_step(model, x_noisy, y) -> dict` (zeroth-order methods: called by the training loop
instead of backward/step, see peftsmooth.training), `state_dict()` / `load_state_dict()` (its
state, checkpointed for resume) and `extra_run_info() -> dict` (fields added to run.json).

Implementations: peft_tuners.PeftTuner (LoRA, LoHa, LoKr, IA3, OFT, BOFT, VeRA from `peft`),
prompt.VisualPromptTuning, bottleneck.BottleneckAdapters, baselines.LinearProbe / FullFineTuning,
blackbox (coordinators for the black-box setting). `build_adaptation(cfg.peft)` instantiates one.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn


class NoAdaptation:
    """`peft=none`: no training; the off-the-shelf classifier is certified as it is."""

    name = "none"
    trains = False

    def apply(self, classifier: nn.Module) -> nn.Module:
        for p in classifier.parameters():
            p.requires_grad_(False)
        return classifier

    def save(self, model: nn.Module, run_dir: Path) -> list[str]:
        return []

    def load(self, classifier: nn.Module, run_dir: Path) -> nn.Module:
        return classifier


def build_adaptation(cfg):
    """Instantiate the adaptation object of a `peft` config (its `_target_`); errors are UserErrors."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from peftsmooth.errors import UserError

    if not cfg or "_target_" not in cfg:
        raise UserError("peft config has no _target_ (choose peft=<one of conf/peft/*.yaml>)")
    try:
        return instantiate(cfg, _convert_="all")
    except InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, UserError) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        detail = str(cause or err).strip().splitlines()
        raise UserError(f"peft._target_={cfg['_target_']}: {detail[0] if detail else type(err).__name__}") from err
