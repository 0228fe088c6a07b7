"""BlackVIP's coordinator: a frozen encoder and a small trainable decoder in front of the classifier.

    x + noise (native [0,1] space) -> frozen encoder -> features -> trainable decoder
        -> residual mode: x + eps * tanh(decoder)    (starts as the identity: the decoder's last
                                                      layer is zero-initialised)
        -> image mode:    sigmoid(decoder)           (replaces the input)

The output has the native shape (C,H,W), so the coordinator is simply part of the base classifier
f = classifier(coordinator(.)): it sits after the noise and before the classifier's own resizing
and normalization (validity rule 1 in docs/architecture.md): certificates stay in native pixel space.

Encoders (registry ENCODERS, `coordinator.encoder.name`): `random` (a tiny frozen random-feature
convnet, for CPU tests) and `timm` (a small frozen pretrained timm convnet, for GPU runs). Only the
decoder is trained; the training code flattens its parameters into one vector for SPSA.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftsmooth import hub
from peftsmooth.errors import UserError, choice_error, require
from peftsmooth.runtime import EvalPinned, freeze

ENCODERS: dict[str, Callable[..., nn.Module]] = {}


def register_encoder(name: str):
    def wrap(fn):
        ENCODERS[name] = fn
        return fn

    return wrap


class FrozenEncoder(EvalPinned):
    """Base for encoders: never trained, always in eval mode (no batch-norm statistics updates)."""

    out_channels: int
    saves_weights: bool = True   # False when the weights can be rebuilt (pretrained from timm)

    def freeze(self) -> "FrozenEncoder":
        return freeze(self).eval()


@register_encoder("random")
class RandomEncoder(FrozenEncoder):
    """Fixed random conv features (seeded): `depth` 3x3 convs + ReLU, the first `downsample` strided."""

    def __init__(self, in_chans: int, width: int = 16, depth: int = 2, downsample: int = 1, seed: int = 0, **_):
        super().__init__()
        require(width >= 1 and depth >= 1, f"peft.coordinator.encoder: width={width} and depth={depth} must be >= 1")
        gen = torch.Generator().manual_seed(int(seed))
        layers: list[nn.Module] = []
        chans = in_chans
        for i in range(depth):
            conv = nn.Conv2d(chans, width, 3, stride=2 if i < downsample else 1, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * math.sqrt(2.0 / (chans * 9)))
                conv.bias.zero_()
            layers += [conv, nn.ReLU()]
            chans = width
        self.net = nn.Sequential(*layers)
        self.out_channels = width
        self.freeze()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@register_encoder("timm")
class TimmEncoder(FrozenEncoder):
    """A frozen pretrained timm convnet (`features_only`), one feature stage; its own preprocessing."""

    def __init__(self, in_chans: int, model: str = "resnet18", pretrained: bool = True, weights: str | None = None,
                 stage: int = 2, input_size: int | None = None, **_):
        super().__init__()
        import timm

        kwargs = {}
        if weights:
            path = Path(str(weights)).expanduser()
            require(path.is_file(), f"peft.coordinator.encoder.weights={weights}: file not found")
            kwargs["pretrained_cfg_overlay"] = dict(file=str(path), custom_load=False)
            pretrained = True
        if not timm.is_model(str(model).split(".")[0]):
            raise UserError(f"peft.coordinator.encoder.model={model} is not a timm model (see timm.list_models())")
        from_hub = bool(pretrained) and not weights
        with hub.offline_unless_reachable() if from_hub else contextlib.nullcontext() as offline:
            if offline is not None:  # no hub: the cached copy, or one line now (peftsmooth.hub)
                hub.require_cached(str(model), "peft.coordinator.encoder", offline)
            try:
                self.net = timm.create_model(str(model), pretrained=bool(pretrained), features_only=True,
                                             out_indices=(int(stage),), **kwargs)
            except (OSError, ConnectionError, RuntimeError) as err:
                raise hub.weights_error(f"the coordinator encoder {model}", "peft.coordinator.encoder",
                                        offline or type(err).__name__) from err
        cfg = self.net.pretrained_cfg
        self.input_size = int(input_size) if input_size else None
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, -1, 1, 1), persistent=False)
        self.out_channels = int(self.net.feature_info.channels()[-1])
        self.saves_weights = not pretrained   # pretrained weights are rebuilt from timm, random ones saved
        self.freeze()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.input_size and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return self.net((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))[-1]


def build_encoder(cfg: dict, in_chans: int) -> FrozenEncoder:
    cfg = dict(cfg or {})
    name = cfg.pop("name", "random")
    if name not in ENCODERS:
        raise choice_error("peft.coordinator.encoder.name", name, ENCODERS)
    return ENCODERS[name](in_chans=in_chans, **cfg)


class Decoder(nn.Module):
    """1x1 conv -> `ups` x (transposed conv, stride 2, + GELU) -> 3x3 conv to the image channels."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int, ups: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, hidden, 1), nn.GELU()]
        for _ in range(ups):
            layers += [nn.ConvTranspose2d(hidden, hidden, 4, stride=2, padding=1), nn.GELU()]
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(hidden, out_channels, 3, padding=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(h))


MODES = ("residual", "image")


class Coordinator(nn.Module):
    """Frozen encoder + trainable decoder; maps a native-size image to a native-size image."""

    def __init__(self, image_size, encoder: dict | None = None, hidden: int = 8, mode: str = "residual",
                 eps: float = 1.0):
        super().__init__()
        if mode not in MODES:
            raise choice_error("peft.coordinator.mode", mode, MODES)
        require(hidden >= 1, f"peft.coordinator.hidden={hidden} must be >= 1")
        require(eps > 0, f"peft.coordinator.eps={eps} must be > 0")
        c, h, w = (int(v) for v in image_size)
        self.image_size, self.mode, self.eps = (c, h, w), mode, float(eps)
        self.encoder = build_encoder(encoder or {}, c)
        with torch.no_grad():
            fh, fw = self.encoder(torch.zeros(1, c, h, w)).shape[-2:]
        ups = max(0, math.ceil(math.log2(max(h / fh, w / fw))))
        self.decoder = Decoder(self.encoder.out_channels, c, hidden, ups)
        if mode == "residual":   # start as the identity map: the adapted model begins where the base model is
            nn.init.zeros_(self.decoder.out.weight)
            nn.init.zeros_(self.decoder.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.decoder(self.encoder(x))
        if tuple(out.shape[-2:]) != tuple(x.shape[-2:]):
            out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
        if self.mode == "residual":
            return x + self.eps * torch.tanh(out)
        return torch.sigmoid(out)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What must be saved: the decoder, plus the encoder when it cannot be rebuilt (random)."""
        state = {f"decoder.{k}": v for k, v in self.decoder.state_dict().items()}
        if self.encoder.saves_weights:
            state.update({f"encoder.{k}": v for k, v in self.encoder.state_dict().items()})
        return state

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if self.encoder.saves_weights or not k.startswith("encoder.")]
        if missing or unexpected:
            raise UserError(f"coordinator weights do not fit this coordinator config "
                            f"(missing {len(missing)} keys, unexpected {len(unexpected)})")
