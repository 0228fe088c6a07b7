"""The two baselines PEFTSmoothing is compared against: linear probing and full fine-tuning."""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from peftsmooth.adapt.base import Adaptation
from peftsmooth.adapt.common import ModuleAdaptation
from peftsmooth.errors import UserError
from peftsmooth.models import load_state_dict_file, save_state_dict_file
from peftsmooth.runtime import freeze

MODEL_FILE = "model.safetensors"


class LinearProbe(ModuleAdaptation):
    """`peft=linear`: only the classification head trains; the backbone stays frozen."""

    name = "linear"
    weights_file = "head.safetensors"
    no_lp_ft = "it trains only the head already (lp_ft would be linear probing twice)"

    def insert(self, classifier: nn.Module) -> None:
        return None


class FullFineTuning(Adaptation):
    """`peft=full`: every backbone weight trains. Saves the backbone's full state dict as
    model.safetensors, which `model.checkpoint=` and `base=<run dir>` load as a starting point."""

    name = "full"

    def apply(self, classifier: nn.Module) -> nn.Module:
        freeze(classifier)
        classifier.backbone.requires_grad_(True)
        return classifier

    def save(self, model: nn.Module, run_dir: Path) -> list[str]:
        save_state_dict_file(model.backbone.state_dict(), Path(run_dir) / MODEL_FILE)
        return [MODEL_FILE]

    def load(self, classifier: nn.Module, run_dir: Path) -> nn.Module:
        path = Path(run_dir) / MODEL_FILE
        if not path.is_file():
            raise UserError(f"run={run_dir} has no {MODEL_FILE} (was the training finished?)")
        classifier.backbone.load_state_dict(load_state_dict_file(path), strict=True)
        return classifier
