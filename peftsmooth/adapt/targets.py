"""Where the peft tuners go on each model family: `target_modules: auto`, resolved at apply time.

A family rule names, by full-match regexes over the backbone's module names, the layers the
weight-update tuners adapt (LoRA, LoHa, LoKr, OFT, BOFT, VeRA) and IA3's targets and feed-forward
modules (IA3 scales a feed-forward module's input, any other target's output):

  transformer (timm vision_transformer, deit, beit, swin_transformer): every block's attn.qkv,
      attn.proj, mlp.fc1, mlp.fc2; IA3: qkv and fc2, fc2 feed-forward.
  resnet (ResNet, ResNeXt, SE-ResNet, ...: timm.models.resnet): every block's convK (layerN.M.convK;
      not the stem conv1, the shortcut's downsample, the head fc); IA3: the same convs, all
      feed-forward (a BatchNorm follows each conv and would undo a per-channel scaling of its output).
  convnext: every block's mlp.fc1, mlp.fc2 (not the depthwise conv_dw, the stem, the downsampling
      convs, the head); IA3: both, fc2 feed-forward.
  transformers ViT / DeiT / BEiT / Swin: every layer's attention q/k/v/o_proj, mlp.fc1, mlp.fc2; IA3:
      k_proj, v_proj and fc2, fc2 feed-forward. transformers ConvNeXt: every layer's pwconv1, pwconv2.
      transformers ResNet: every layer's convolutions (not the embedder, the shortcut, the classifier).
  torchvision: ResNet as timm's; ViT the blocks' MLP linears (mlp.0, mlp.3: the attention is one
      nn.MultiheadAttention); ConvNeXt every block's two linears (block.3, block.5); EfficientNet and
      the rest the generic rule. The published RS networks (model=rs) as timm's ResNet.
  generic (any other model): every nn.Linear and nn.Conv2d of the body, that is outside the stem
      (around `pretrained_cfg["first_conv"]`) and the head (around `pretrained_cfg["classifier"]`);
      IA3: all of them, feed-forward.

A family rule that selects nothing on a model falls back to the generic rule. Each selected layer is
then kept only where the method's tuner can wrap it (peft 0.21, tuners/<method>/layer.py): its layer
types (VeRA: nn.Linear only; the others nn.Linear and nn.Conv2d), no grouped (depthwise) convs,
OFT / BOFT blocks that divide the layer's input width (in_channels * k * k for a conv), and for OFT
no k x k conv with k > 1 (peft's OFT rotates unfolded input patches and folds them back: not the
identity at init, not what its merge computes). Nothing left is a one-line UserError naming the
method, the model and why. An explicit regex or list in `target_modules` goes to peft as it is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch.nn as nn

from peftsmooth.errors import UserError

AUTO = "auto"
ANY_MODEL = "lora, loha, lokr, ia3, boft, linear or full"  # the methods that adapt any model
BOTH = (nn.Linear, nn.Conv2d)
# peft config class -> the layer types its tuner wraps (of those a vision backbone has)
TUNER_LAYERS = {"LoraConfig": BOTH, "LoHaConfig": BOTH, "LoKrConfig": BOTH, "IA3Config": BOTH,
                "OFTConfig": BOTH, "BOFTConfig": BOTH, "VeraConfig": (nn.Linear,)}
BLOCK_KEYS = {"OFTConfig": ("oft_block_size", "r"), "BOFTConfig": ("boft_block_size", "boft_block_num")}


@dataclass(frozen=True)
class Rule:
    """One family's targets, as full-match regexes over backbone module names (None: generic)."""

    name: str
    body: str | None = None          # the weight-update tuners' layers
    ia3: str | None = None           # IA3's target_modules
    feedforward: str | None = None   # IA3's feedforward_modules (a subset of `ia3`)
    shown: str = "every nn.Linear / nn.Conv2d outside the stem and the head"


_BLOCK = r"(layers\.\d+\.)?blocks\.\d+\."
TRANSFORMER = Rule("transformer", _BLOCK + r"(attn\.(qkv|proj)|mlp\.fc[12])", _BLOCK + r"(attn\.qkv|mlp\.fc2)",
                   _BLOCK + r"mlp\.fc2", "blocks.N.attn.qkv|proj, blocks.N.mlp.fc1|fc2")
RESNET = Rule("resnet", r"layer\d+\.\d+\.conv\d", r"layer\d+\.\d+\.conv\d", r"layer\d+\.\d+\.conv\d",
              "layerN.M.convK")
CONVNEXT = Rule("convnext", r"stages\.\d+\.blocks\.\d+\.mlp\.fc[12]", r"stages\.\d+\.blocks\.\d+\.mlp\.fc[12]",
                r"stages\.\d+\.blocks\.\d+\.mlp\.fc2", "stages.N.blocks.M.mlp.fc1|fc2")
# transformers 5 (ViT, DeiT, BEiT: <model>.layers.N.; Swin: <model>.encoder.layers.N.blocks.M.)
_HF_BLOCK = r"\w+\.(encoder\.)?layers\.\d+\.(blocks\.\d+\.)?"
HF_TRANSFORMER = Rule("transformers ViT/DeiT/BEiT/Swin", _HF_BLOCK + r"(attention\.[qkvo]_proj|mlp\.fc[12])",
                      _HF_BLOCK + r"(attention\.[kv]_proj|mlp\.fc2)", _HF_BLOCK + r"mlp\.fc2",
                      "layers.N.attention.q|k|v|o_proj, layers.N.mlp.fc1|fc2")
_HF_STAGE = r"\w+\.encoder\.stages\.\d+\.layers\.\d+\."
HF_CONVNEXT = Rule("transformers ConvNeXt", _HF_STAGE + r"pwconv[12]", _HF_STAGE + r"pwconv[12]", _HF_STAGE + r"pwconv2",
                   "stages.N.layers.M.pwconv1|pwconv2")
HF_RESNET = Rule("transformers ResNet", _HF_STAGE + r"layer\.\d+\.convolution", _HF_STAGE + r"layer\.\d+\.convolution",
                 _HF_STAGE + r"layer\.\d+\.convolution", "stages.N.layers.M.layer.K.convolution")
# torchvision (ResNet's names are timm's: the RESNET rule)
_TV_MLP = r"encoder\.layers\.encoder_layer_\d+\.mlp\."
TV_VIT = Rule("torchvision ViT", _TV_MLP + r"[03]", _TV_MLP + r"[03]", _TV_MLP + r"3",
              "encoder_layer_N.mlp.0|3 (the MLP: the attention is one nn.MultiheadAttention)")
_TV_BLOCK = r"features\.\d+\.\d+\.block\."
TV_CONVNEXT = Rule("torchvision ConvNeXt", _TV_BLOCK + r"[35]", _TV_BLOCK + r"[35]", _TV_BLOCK + r"5",
                   "features.N.M.block.3|5")
GENERIC = Rule("generic")
# (library, module) of the backbone's class or a base class -> its rule: timm.models.<module>,
# transformers.models.<model>.modeling_<model>, torchvision.models.<module>, and the published RS
# networks (peftsmooth.models.rs: conv1 / layerN.M.convK / fc, as in timm's ResNet).
FAMILIES = {("timm", "vision_transformer"): TRANSFORMER, ("timm", "deit"): TRANSFORMER, ("timm", "beit"): TRANSFORMER,
            ("timm", "swin_transformer"): TRANSFORMER, ("timm", "resnet"): RESNET, ("timm", "convnext"): CONVNEXT,
            ("transformers", "modeling_vit"): HF_TRANSFORMER, ("transformers", "modeling_deit"): HF_TRANSFORMER,
            ("transformers", "modeling_beit"): HF_TRANSFORMER, ("transformers", "modeling_swin"): HF_TRANSFORMER,
            ("transformers", "modeling_convnext"): HF_CONVNEXT, ("transformers", "modeling_resnet"): HF_RESNET,
            ("torchvision", "resnet"): RESNET, ("torchvision", "vision_transformer"): TV_VIT,
            ("torchvision", "convnext"): TV_CONVNEXT, ("peftsmooth", "rs"): RESNET}


def family(backbone: nn.Module) -> Rule:
    """The rule of the backbone's family (along its class hierarchy), else the generic rule."""
    for cls in type(backbone).__mro__:
        module = cls.__module__
        key = (module.split(".", 1)[0], module.rsplit(".", 1)[-1])
        if key in FAMILIES:
            return FAMILIES[key]
    return GENERIC


def model_label(backbone: nn.Module) -> str:
    """The backbone's timm name (e.g. 'resnet10t'), else its class name, for messages."""
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(backbone).__name__)


def cannot_adapt(method: str, backbone: nn.Module, needs: str) -> UserError:
    """The one-line refusal of a method whose layers the backbone lacks (`needs`: what it would need)."""
    return UserError(f"peft={method} cannot adapt model.name={model_label(backbone)}: it needs {needs}, and "
                     f"{type(backbone).__name__} has none; use peft={ANY_MODEL}")


def _outer(inner: str, weights: set[str]) -> str:
    """The outermost module around `inner` that holds less than half of the weight layers."""
    parts = inner.split(".")
    for depth in range(1, len(parts) + 1):
        prefix = ".".join(parts[:depth])
        if 2 * sum(w == prefix or w.startswith(prefix + ".") for w in weights) < len(weights):
            return prefix
    return inner


def stem_and_head(backbone: nn.Module) -> list[str]:
    """Module names (in the backbone) of the stem and the head, which no rule adapts."""
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    names = [n for n, _ in backbone.named_modules() if n]
    weights = [n for n, m in backbone.named_modules() if n and isinstance(m, BOTH)]
    classifier = cfg.get("classifier") or "head"
    inner = [cfg.get("first_conv") or (weights[0] if weights else "")]
    inner += [classifier] if isinstance(classifier, str) else list(classifier)
    return [_outer(n, set(weights)) for n in inner if n in names]


def body_layers(backbone: nn.Module) -> list[str]:
    """The generic rule: every nn.Linear / nn.Conv2d outside the stem and the head."""
    outside = stem_and_head(backbone)
    return [n for n, m in backbone.named_modules()
            if n and isinstance(m, BOTH) and not any(n == o or n.startswith(o + ".") for o in outside)]


def _selected(backbone: nn.Module, pattern: str | None) -> list[str]:
    if pattern is None:
        return body_layers(backbone)
    return [n for n, m in backbone.named_modules() if n and isinstance(m, BOTH) and re.fullmatch(pattern, n)]


def misfit(module: nn.Module, config: str, options: dict) -> str | None:
    """Why the tuner of `config` cannot wrap `module` (None: it can)."""
    if not isinstance(module, TUNER_LAYERS.get(config, (nn.Linear,))):
        return f"a {type(module).__name__}"
    width = module.in_features if isinstance(module, nn.Linear) else module.in_channels
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return "a grouped conv"
        if config == "OFTConfig" and tuple(module.kernel_size) != (1, 1):
            k = "x".join(map(str, module.kernel_size))
            return (f"a {k} conv (peft's OFT is exact only on 1x1 convs: it rotates unfolded input patches "
                    f"and folds them back, which is not a weight rotation)")
        if config in BLOCK_KEYS and (module.kernel_size[0] != module.kernel_size[1] or module.dilation[0] != 1):
            return "a non-square or dilated conv"
        width *= module.kernel_size[0] * module.kernel_size[1]
    for key in BLOCK_KEYS.get(config, ()):
        block = int(options.get(key) or 0)
        if block and width % block:
            return f"input width {width} not divisible by {key}={block}"
    return None


@dataclass
class Resolved:
    """What `auto` became on one model: the rule, the modules per key, what was left out and why."""

    rule: Rule
    modules: dict = field(default_factory=dict)    # option key -> sorted classifier module names
    skipped: dict = field(default_factory=dict)    # module name -> reason

    def describe(self, method: str) -> str:
        counts = ", ".join(f"{len(v)} {k}" for k, v in self.modules.items())
        text = f"peft={method}: auto targets ({self.rule.name} rule): {counts}"
        if self.skipped:
            name, why = next(iter(self.skipped.items()))
            text += f"; {len(self.skipped)} left out (e.g. {name}: {why})"
        return text


def resolve(classifier: nn.Module, config: str, options: dict, method: str) -> Resolved:
    """The modules `auto` stands for in `target_modules` (and IA3's `feedforward_modules`) on this
    classifier (a BaseClassifier: names start with 'backbone.'); a UserError when none fits."""
    backbone = classifier.backbone
    rule = family(backbone)
    ia3 = config == "IA3Config"
    if not _selected(backbone, rule.ia3 if ia3 else rule.body):
        rule = GENERIC
    resolved = Resolved(rule)
    keys = ("target_modules", "feedforward_modules") if ia3 else ("target_modules",)
    patterns = (rule.ia3, rule.feedforward) if ia3 else (rule.body,)
    modules = dict(backbone.named_modules())
    for key, pattern in zip(keys, patterns):
        if options.get(key) != AUTO:
            continue
        chosen = []
        for name in _selected(backbone, pattern):
            why = misfit(modules[name], config, options)
            if why:
                resolved.skipped["backbone." + name] = why
            else:
                chosen.append("backbone." + name)
        resolved.modules[key] = sorted(chosen)
    target = resolved.modules.get("target_modules")
    if target == []:
        raise UserError(_nothing_fits(backbone, config, method, resolved))
    if ia3 and target is not None and "feedforward_modules" in resolved.modules:
        resolved.modules["feedforward_modules"] = [n for n in resolved.modules["feedforward_modules"] if n in target]
    return resolved


def _nothing_fits(backbone: nn.Module, config: str, method: str, resolved: Resolved) -> str:
    types = " / ".join(f"nn.{t.__name__}" for t in TUNER_LAYERS.get(config, (nn.Linear,)))
    why = sorted(set(resolved.skipped.values())) or ["none selected"]
    return (f"peft={method} cannot adapt model.name={model_label(backbone)}: its tuner ({config}) wraps {types} "
            f"layers and none of the {resolved.rule.name} rule's layers ({resolved.rule.shown}) fits "
            f"({'; '.join(why[:2])}); use peft={ANY_MODEL}, or give peft.target_modules=<regex>")
