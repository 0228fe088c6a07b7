"""`model=torchvision model.name=<torchvision.models name>`: any classification model of torchvision.

Weights: `model.pretrained=true` (the name's DEFAULT weights, from the torch hub cache or downloaded;
offline without them: one line naming `model.weights=`), `model.weights=<file>` (a state dict of that
model, read with weights_only=True) or none. The head is replaced by a fresh one when the dataset's
number of classes differs. Mean, std and input size come from the DEFAULT weights' transforms
(ImageNet's where the name has none); `model.input_size` overrides the size.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from peftsmooth.errors import UserError
from peftsmooth.models.base import IMAGENET_MEAN, IMAGENET_STD, Preprocess, Source, check_files, describe, \
    sequential_head, square

HEADS = ("fc", "heads.head", "head", "classifier")  # torchvision's head attributes, in the order tried


def head_name(model: nn.Module) -> str:
    """The module name of a torchvision classifier's last Linear layer (ResNet `fc`, ViT `heads.head`,
    ConvNeXt / EfficientNet `classifier.N`, Swin `head`)."""
    names = dict(model.named_modules())
    for name in HEADS:
        if name in names:
            return sequential_head(model, name)
    raise UserError(f"{type(model).__name__} has none of the heads {', '.join(HEADS)}")


def replace_head(model: nn.Module, num_classes: int) -> None:
    """A fresh nn.Linear head with num_classes outputs (nothing changes where it has them already)."""
    name = head_name(model)
    old = model.get_submodule(name)
    if old.out_features == num_classes:
        return
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, nn.Linear(old.in_features, num_classes))


def default_weights(name: str):
    import torchvision

    try:
        return torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError):
        return None


def cached_file(weights) -> Path:
    """Where torch.hub keeps the file of these weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


class TorchvisionSource(Source):
    name = "torchvision"

    def check(self, model_cfg) -> None:
        import torchvision

        check_files(model_cfg)
        if str(model_cfg.get("name")) not in torchvision.models.list_models():
            raise UserError(f"model.name={model_cfg.get('name')} is not a torchvision model "
                            f"(see torchvision.models.list_models())")

    def create(self, model_cfg, num_classes: int, weights: bool = True) -> nn.Module:
        import torchvision

        name = str(model_cfg.name)
        file = model_cfg.get("weights") if weights and not model_cfg.get("checkpoint") else None
        pretrained = weights and bool(model_cfg.get("pretrained")) and not file and not model_cfg.get("checkpoint")
        if file or pretrained:
            from peftsmooth.models.weights import load_into

            state = self._weights_state(name, file)
            with torch.device("meta"):
                head = head_name(torchvision.models.get_model(name, weights=None))
            classes = int(state[f"{head}.weight"].shape[0]) if f"{head}.weight" in state else 1000
            model = torchvision.models.get_model(name, weights=None, num_classes=classes)
            load_into(model, state, f"model.weights={file}" if file else f"the {name} DEFAULT weights")
            replace_head(model, num_classes)
        else:
            model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        describe(model, name, head_name(model))
        return model

    @staticmethod
    def _weights_state(name: str, file) -> dict:
        from peftsmooth.models.weights import load_state_dict_file

        if file:
            return load_state_dict_file(file)
        w = default_weights(name)
        if w is None:
            raise UserError(f"model.name={name} has no pretrained torchvision weights; use model.pretrained=false")
        path = cached_file(w)
        if not path.is_file():
            from peftsmooth import hub

            if not hub.reachable(w.url):
                raise hub.weights_error(name, "model", f"{w.url} cannot be reached and {path} is not there")
            torch.hub.load_state_dict_from_url(w.url, progress=False)
        return load_state_dict_file(path)

    def preprocess(self, backbone: nn.Module, model_cfg) -> Preprocess:
        w = default_weights(str(model_cfg.name))
        if w is None:
            return Preprocess(square(model_cfg.get("input_size") or 224))
        t = w.transforms()
        size = model_cfg.get("input_size") or square(list(t.crop_size))
        return Preprocess(square(size), tuple(t.mean or IMAGENET_MEAN), tuple(t.std or IMAGENET_STD))
