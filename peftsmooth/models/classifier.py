"""The base classifier f: native [0,1] image -> logits, with all preprocessing inside the model.

    x (native, noise already added) -> front (denoiser / coordinator, optional)
      -> channel repeat (grayscale -> RGB) -> resize to the backbone's input size -> (x-mean)/std
      -> backbone (timm, torchvision, transformers, a published RS network or the user's own module)

Because resizing and normalization are part of f, the noise of randomized smoothing and the
certified radius stay in the dataset's native pixel space (validity rule 1 in docs/architecture.md).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class BaseClassifier(nn.Module):
    """Preprocessing + backbone. `forward` takes native-space images in [0,1] and returns logits (a
    transformers model's output object is read for its `.logits`)."""

    def __init__(self, backbone: nn.Module, input_size: int, mean, std, in_chans: int = 3,
                 front: nn.Module | None = None, resample: str = "bilinear", antialias: bool = False,
                 flip_channels: bool = False):
        super().__init__()
        self.front = front if front is not None else nn.Identity()
        self.backbone = backbone
        self.input_size = int(input_size)
        self.in_chans = int(in_chans)
        self.resample, self.antialias, self.flip_channels = str(resample), bool(antialias), bool(flip_channels)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Native [0,1] image -> the backbone's input (channels, size, normalization)."""
        if x.shape[1] == 1 and self.in_chans != 1:
            x = x.expand(-1, self.in_chans, -1, -1)
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode=self.resample, align_corners=False,
                              antialias=self.antialias)
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return x.flip(1) if self.flip_channels else x

    def settings(self) -> dict:
        """The preprocessing as BaseClassifier's keyword arguments (for a copy with another front)."""
        return {"input_size": self.input_size, "mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist(),
                "in_chans": self.in_chans, "resample": self.resample, "antialias": self.antialias,
                "flip_channels": self.flip_channels}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.backbone(self.preprocess(self.front(x)))
        return out if isinstance(out, torch.Tensor) else out.logits


def classifier_name(backbone: nn.Module) -> str:
    """Module name of the backbone's classification head (`pretrained_cfg['classifier']`: timm's own,
    or the one every other source sets, see peftsmooth.models.base.describe)."""
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    name = cfg.get("classifier") or "head"
    return name if isinstance(name, str) else name[0]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
