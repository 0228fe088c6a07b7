"""Bottleneck adapters in every transformer block (Houlsby et al. 2019; AdaptFormer, Chen et al. 2022).

An adapter is x -> up(act(down(x))) with a `bottleneck`-wide hidden layer; `up` starts at zero, so
the adapted model starts as the base model. Two placements (`style`):
  parallel (AdaptFormer): mlp'(h) = mlp(h) + scale * adapter(h), next to each block's MLP.
  houlsby  (sequential):  f'(h) = f(h) + scale * adapter(f(h)) after each block's attention and MLP.
Only the adapters and the new head train. Timm blocks (`.attn`, `.mlp`) are adapted through
forward hooks, so the backbone's own parameter names do not change.
"""

from __future__ import annotations

import torch.nn as nn

from peftsmooth.adapt.common import ModuleAdaptation
from peftsmooth.adapt.targets import cannot_adapt
from peftsmooth.errors import choice_error, require

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


class Adapter(nn.Module):
    def __init__(self, dim: int, bottleneck: int, activation: str = "relu", dropout: float = 0.0):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.kaiming_uniform_(self.down.weight, a=5 ** 0.5)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return self.up(self.dropout(self.act(self.down(x))))


def _parallel(adapter: Adapter, scale: float):
    def hook(module, inputs, output):
        return output + scale * adapter(inputs[0])
    return hook


def _sequential(adapter: Adapter, scale: float):
    def hook(module, inputs, output):
        return output + scale * adapter(output)
    return hook


# style -> (sublayers adapted, hook factory)
STYLES = {"parallel": (("mlp",), _parallel), "houlsby": (("attn", "mlp"), _sequential)}


class BottleneckAdapters(ModuleAdaptation):
    """`peft=adapter`: bottleneck adapters in each ViT block (style: parallel | houlsby)."""

    weights_file = "adapter.safetensors"

    def __init__(self, bottleneck: int = 64, style: str = "parallel", scale: float = 0.1,
                 activation: str = "relu", dropout: float = 0.0, name: str = "adapter"):
        require(int(bottleneck) == bottleneck and bottleneck >= 1,
                f"peft.bottleneck={bottleneck} must be an integer >= 1 (adapter width)")
        if style not in STYLES:
            raise choice_error("peft.style", style, STYLES)
        if activation not in ACTIVATIONS:
            raise choice_error("peft.activation", activation, ACTIVATIONS)
        require(0 <= dropout < 1, f"peft.dropout={dropout} must be in [0, 1)")
        self.bottleneck, self.style, self.scale = int(bottleneck), style, float(scale)
        self.activation, self.dropout, self.name = activation, float(dropout), name

    def check(self, classifier: nn.Module) -> None:
        vit = classifier.backbone
        sublayers = STYLES[self.style][0]
        blocks = list(getattr(vit, "blocks", []))
        if not blocks or not hasattr(vit, "embed_dim") or not all(hasattr(b, s) for b in blocks for s in sublayers):
            raise cannot_adapt(self.name, vit, f"transformer blocks with {' and '.join(sublayers)} (a timm ViT)")

    def insert(self, classifier: nn.Module) -> None:
        self.check(classifier)
        vit = classifier.backbone
        sublayers, factory = STYLES[self.style]
        blocks = list(vit.blocks)
        dim = int(vit.embed_dim)
        for block in blocks:
            for sub in sublayers:
                adapter = Adapter(dim, self.bottleneck, self.activation, self.dropout)
                block.add_module(f"adapter_{sub}", adapter)
                getattr(block, sub).register_forward_hook(factory(adapter, self.scale))
