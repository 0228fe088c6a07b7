"""Visual prompt tuning (VPT, Jia et al. ECCV 2022) for timm ViTs: learnable tokens in the sequence.

`peft` implements prompt tuning for language models only, so this is our own small module. After
the patch embedding and the class token (and any register tokens), `tokens` learnable vectors are
inserted into the token sequence:
  shallow (deep=false): once, before the first block; they then flow through every block.
  deep (deep=true):     a fresh set for every block, replacing the previous block's prompt outputs.
The prompt outputs are dropped again before the final norm, so pooling (class token or average)
sees the original sequence. Only the prompts and the new head train.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from peftsmooth.adapt.common import ModuleAdaptation
from peftsmooth.adapt.targets import cannot_adapt
from peftsmooth.errors import require


class PromptTokens(nn.Module):
    """`layers` x `tokens` learnable vectors of width `dim`, initialized as in VPT (Xavier uniform)."""

    def __init__(self, layers: int, tokens: int, dim: int, patch_area: int, dropout: float = 0.0):
        super().__init__()
        bound = math.sqrt(6.0 / float(3 * patch_area + dim))
        self.tokens = nn.Parameter(torch.empty(layers, tokens, dim).uniform_(-bound, bound))
        self.dropout = nn.Dropout(dropout)

    def get(self, layer: int, batch: int, like: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.tokens[layer].to(like.dtype)).unsqueeze(0).expand(batch, -1, -1)


class VisualPromptTuning(ModuleAdaptation):
    """`peft=prompt` (shallow) and `peft=prompt_deep`: VPT on a timm VisionTransformer."""

    weights_file = "prompt.safetensors"

    def __init__(self, tokens: int = 10, deep: bool = False, dropout: float = 0.0, name: str | None = None):
        require(int(tokens) == tokens and tokens >= 1, f"peft.tokens={tokens} must be an integer >= 1 (prompt tokens)")
        require(0 <= dropout < 1, f"peft.dropout={dropout} must be in [0, 1)")
        self.tokens, self.deep, self.dropout = int(tokens), bool(deep), float(dropout)
        self.name = name or ("prompt_deep" if self.deep else "prompt")

    def check(self, classifier: nn.Module) -> None:
        vit = classifier.backbone
        if not all(hasattr(vit, a) for a in ("blocks", "embed_dim", "num_prefix_tokens", "norm", "patch_embed")):
            raise cannot_adapt(self.name, vit, "a ViT backbone (timm VisionTransformer: a token sequence to insert "
                                               "prompts into)")

    def insert(self, classifier: nn.Module) -> None:
        self.check(classifier)
        vit = classifier.backbone
        blocks = list(vit.blocks)
        patch = vit.patch_embed.patch_size
        area = int(patch[0] * patch[1]) if isinstance(patch, (tuple, list)) else int(patch) ** 2
        vit.prompt = PromptTokens(len(blocks) if self.deep else 1, self.tokens, int(vit.embed_dim), area, self.dropout)
        start, n = int(vit.num_prefix_tokens), self.tokens

        def insert_first(module, args):
            x = args[0]
            prompts = vit.prompt.get(0, x.shape[0], x)
            return (torch.cat([x[:, :start], prompts, x[:, start:]], dim=1), *args[1:])

        def replace(layer):
            def hook(module, args):
                x = args[0]
                prompts = vit.prompt.get(layer, x.shape[0], x)
                return (torch.cat([x[:, :start], prompts, x[:, start + n:]], dim=1), *args[1:])
            return hook

        def strip(module, args):
            x = args[0]
            return (torch.cat([x[:, :start], x[:, start + n:]], dim=1), *args[1:])

        blocks[0].register_forward_pre_hook(insert_first)
        if self.deep:
            for i, block in enumerate(blocks[1:], start=1):
                block.register_forward_pre_hook(replace(i))
        vit.norm.register_forward_pre_hook(strip)
