"""The contract of a model source (timm, rs, torchvision, hf, python), and what every source shares.

A source turns a `model:` config into a backbone (nn.Module: preprocessed image -> logits) and the
preprocessing that goes in front of it (input size, mean and std, channels). `model.source` chooses
it (conf/model/*.yaml; `timm` when absent, as in run.json files of earlier versions). Each non-timm
backbone gets a timm-style `pretrained_cfg` (`architecture`, `classifier`: the head's module name,
`first_conv`: the stem's), so that the adaptation code finds the head and the stem of any model
the same way (`peftsmooth.adapt.targets`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn

from peftsmooth.errors import UserError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


RESAMPLE_MODES = ("bilinear", "bicubic")


@dataclass(frozen=True)
class Preprocess:
    """What BaseClassifier does before the backbone: resize to input_size (`resample`, antialiased as
    the library's own resize where `antialias`), then (x - mean) / std, then RGB -> BGR where
    `flip_channels` (a transformers processor's `do_flip_channel_order`)."""

    input_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    in_chans: int = 3
    resample: str = "bilinear"
    antialias: bool = False
    flip_channels: bool = False

    def __post_init__(self):
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise UserError(f"the model takes {self.in_chans} channel(s) but its mean {list(self.mean)} and std "
                            f"{list(self.std)} have {len(self.mean)} and {len(self.std)}: give one value per channel")
        if self.resample not in RESAMPLE_MODES:
            raise UserError(f"resample={self.resample} is not supported inside f (choose from: bilinear, bicubic)")


class Source:
    """One way of getting a backbone. `check` runs before any work (no model built, nothing fetched);
    `create` builds the backbone with its weights (random, pretrained or a file; `weights=False`:
    none, for the weightless module tree of the checks); `load_checkpoint` reads `model.checkpoint`."""

    name = ""

    def check(self, model_cfg) -> None:
        check_files(model_cfg)

    def create(self, model_cfg, num_classes: int, weights: bool = True) -> nn.Module:
        raise NotImplementedError

    def preprocess(self, backbone: nn.Module, model_cfg) -> Preprocess:
        raise NotImplementedError

    def make_portable(self, model_cfg) -> None:
        """Turn what the config finds relative to the working directory (files, code) into absolute
        places, so that a run rebuilds from any directory (model_cfg is changed in place)."""

    def input_channels(self, model_cfg) -> int | None:
        """The model's number of input channels where the config alone tells it (None: known once built)."""
        return None

    def load_checkpoint(self, backbone: nn.Module, model_cfg, num_classes: int) -> None:
        """`model.checkpoint`: the backbone's state dict as `peftsmooth train` keeps it (safetensors)."""
        from peftsmooth.models.weights import load_into, load_state_dict_file

        load_into(backbone, load_state_dict_file(model_cfg.checkpoint), f"model.checkpoint={model_cfg.checkpoint}")

    def label(self, model_cfg) -> str:
        """The model's name in run.json and report."""
        return str(model_cfg.get("name"))


def check_files(model_cfg, keys=("weights", "checkpoint")) -> None:
    for key in keys:
        value = model_cfg.get(key)
        if value and not Path(str(value)).expanduser().is_file():
            raise UserError(f"model.{key}={value}: file not found")


def describe(backbone: nn.Module, architecture: str, classifier: str | None, first_conv: str | None = None) -> None:
    """Give a non-timm backbone timm's `pretrained_cfg` keys: its name, its head and its stem."""
    names = [n for n, m in backbone.named_modules() if n and isinstance(m, (nn.Linear, nn.Conv2d))]
    cfg = dict(getattr(backbone, "pretrained_cfg", None) or {})
    cfg.update(architecture=architecture, classifier=classifier or last_linear(backbone),
               first_conv=first_conv or (names[0] if names else None))
    backbone.pretrained_cfg = cfg


def last_linear(backbone: nn.Module) -> str | None:
    """The name of the backbone's last nn.Linear (the head of a plain classifier)."""
    linears = [n for n, m in backbone.named_modules() if n and isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def sequential_head(backbone: nn.Module, name: str) -> str:
    """`name`, or its last nn.Linear child where `name` is a Sequential (e.g. torchvision `classifier`)."""
    module = backbone.get_submodule(name)
    if isinstance(module, nn.Sequential):
        inner = [n for n, m in module.named_children() if isinstance(m, nn.Linear)]
        if inner:
            return f"{name}.{inner[-1]}"
    return name


def square(size) -> int:
    """An input size as one side: an int, [C, H, W] / (H, W), or a processor's {"height", "width"} /
    {"shortest_edge"} dict."""
    if isinstance(size, dict):
        return int(size.get("height") or size.get("shortest_edge") or size.get("width"))
    if isinstance(size, (list, tuple)):
        return int(size[-1])
    return int(size)
