"""Shared pieces of the adaptation methods: the head's name, buffers, and `ModuleAdaptation`."""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from peftsmooth.adapt.base import Adaptation
from peftsmooth.errors import UserError
from peftsmooth.models import classifier_name, load_state_dict_file, save_state_dict_file
from peftsmooth.runtime import freeze

BUFFERS_FILE = "buffers.safetensors"


def head_module_name(classifier: nn.Module) -> str:
    """Name of the classification head inside a BaseClassifier, e.g. 'backbone.head' (timm pretrained_cfg)."""
    return "backbone." + classifier_name(classifier.backbone)


def persistent_buffers(model: nn.Module) -> dict:
    """Buffers saved in the state dict (e.g. BatchNorm running statistics), which training may change."""
    names = {n for n, _ in model.named_buffers()}
    return {k: v for k, v in model.state_dict().items() if k in names}


def save_buffers(model: nn.Module, run_dir: Path) -> list[str]:
    """Write the persistent buffers (if the model has any) so that a reload is exact."""
    buffers = persistent_buffers(model)
    if not buffers:
        return []
    save_state_dict_file(buffers, Path(run_dir) / BUFFERS_FILE)
    return [BUFFERS_FILE]


def load_buffers(model: nn.Module, run_dir: Path) -> None:
    path = Path(run_dir) / BUFFERS_FILE
    if path.is_file():
        result = model.load_state_dict(load_state_dict_file(path), strict=False)
        if result.unexpected_keys:
            raise UserError(f"{path} does not fit the model (unexpected {result.unexpected_keys[:2]})")


class ModuleAdaptation(Adaptation):
    """Base for our own methods: freeze the classifier, add/unfreeze some modules, train those.

    Subclasses implement `insert(classifier)` (add modules, mark what trains). Saved as one
    safetensors file of the trainable parameters and persistent buffers; loading re-applies the
    method to a fresh classifier and fills in those tensors.
    """

    name = "module"
    weights_file = "adapter.safetensors"
    train_head = True

    def insert(self, classifier: nn.Module) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def apply(self, classifier: nn.Module) -> nn.Module:
        freeze(classifier)
        self.insert(classifier)
        if self.train_head:
            classifier.get_submodule(head_module_name(classifier)).requires_grad_(True)
        return classifier

    def save(self, model: nn.Module, run_dir: Path) -> list[str]:
        trained = self.trained_names(model)
        state = {k: v for k, v in model.state_dict().items() if k in trained}
        state.update(persistent_buffers(model))
        save_state_dict_file(state, Path(run_dir) / self.weights_file)
        return [self.weights_file]

    def load(self, classifier: nn.Module, run_dir: Path) -> nn.Module:
        path = Path(run_dir) / self.weights_file
        if not path.is_file():
            raise UserError(f"run={run_dir} has no {self.weights_file} (was the training finished?)")
        return self.load_state(classifier, load_state_dict_file(path), path)

    def load_state(self, classifier: nn.Module, state: dict, path: Path) -> nn.Module:
        """The method on a fresh classifier with its tensors from `state` (read from `path`; a
        quantized run passes the dequantized tensors, peftsmooth.library.quantize)."""
        model = self.apply(classifier)
        missing = sorted(self.trained_names(model) - set(state))
        result = model.load_state_dict(state, strict=False)
        if missing or result.unexpected_keys:
            raise UserError(f"{path} does not fit peft={self.name} on this model "
                            f"(missing {missing[:2]}, unexpected {result.unexpected_keys[:2]})")
        return model
