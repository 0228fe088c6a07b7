"""The `peft` library's tuners (LoRA, LoHa, LoKr, IA3, OFT, BOFT, VeRA) on a BaseClassifier.

`get_peft_model` wraps the whole BaseClassifier, so module names start with `backbone.`. The default
`target_modules: auto` (and IA3's `feedforward_modules: auto`) is resolved per model when the method
is applied, by the family rules of `peftsmooth.adapt.targets`: a ViT's block linears
(`blocks.N.attn.qkv|proj`, `blocks.N.mlp.fc1|fc2`), a ResNet's block convs (`layerN.M.convK`), the
body's Linear / Conv2d layers of any other timm model; never the stem (e.g. the patch-embedding
conv) or the head, and only layers the tuner can wrap (VeRA: nn.Linear only; OFT: nn.Linear and
1x1 convs). A model with nothing to wrap is refused by `check`, before any work. The resolved list
is logged with its count and saved in adapter_config.json; an explicit regex (full match) or list
of names is passed to peft as it is. The new classification head is trained fully through
`modules_to_save`. The result is saved in peft's own format (adapter_config.json +
adapter_model.safetensors), loadable with `PeftModel.from_pretrained(build_classifier(...), run_dir)`.
Before certification the tuners whose merge is exact are folded into the base weights (`merge_exact`).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import re
from pathlib import Path

import torch.nn as nn

from peftsmooth.adapt import targets
from peftsmooth.adapt.base import Adaptation
from peftsmooth.adapt.common import head_module_name, load_buffers, save_buffers
from peftsmooth.errors import UserError

log = logging.getLogger("peftsmooth.adapt")

ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"]
RANK_KEYS = ("r", "boft_block_size", "boft_block_num", "oft_block_size")


def _config_class(path: str):
    module, _, name = str(path).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise UserError(f"peft.config_class={path} is not importable (e.g. peft.LoraConfig)") from err
    if not dataclasses.is_dataclass(cls):
        raise UserError(f"peft.config_class={path} is not a peft config class (e.g. peft.LoraConfig)")
    return cls


def matching_modules(model: nn.Module, target) -> list[str]:
    """Module names that `target_modules` selects, with peft's rules (str: full-match regex; list: name or suffix)."""
    names = [n for n, _ in model.named_modules() if n]
    if isinstance(target, str):
        return [n for n in names if re.fullmatch(target, n)]
    targets = list(target or [])
    return [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]


class PeftTuner(Adaptation):
    """One `peft` tuner, configured by `config_class` (e.g. peft.LoraConfig) and its options."""

    def __init__(self, name: str, config_class: str, **options):
        self.name = str(name)
        self.config_class = _config_class(config_class)
        known = {f.name for f in dataclasses.fields(self.config_class)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise UserError(f"peft.{unknown[0]} is not an option of {self.config_class.__name__} "
                            f"(options: {', '.join(sorted(k for k in known if not k.startswith('_')))})")
        for key in RANK_KEYS:
            value = options.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserError(f"peft.{key}={value} must be an integer")
            if key == "r" and value <= 0:
                raise UserError(f"peft.r={value} must be a positive integer (the adapter rank)")
            if value < 0:
                raise UserError(f"peft.{key}={value} must be >= 0")
        self.options = dict(options)
        try:  # validate now, before any work (`auto` targets are resolved on the model)
            options = self._options("backbone.head")
            self.config_class(**{k: (None if v == targets.AUTO else v) for k, v in options.items()})
        except (ValueError, TypeError) as err:
            raise UserError(f"peft={self.name}: invalid options ({str(err).splitlines()[0]})") from err

    def _options(self, head: str) -> dict:
        options = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.options.items()}
        options.setdefault("modules_to_save", [head])
        return options

    def peft_config(self, classifier: nn.Module) -> tuple[object, "targets.Resolved | None"]:
        """The peft config for this classifier, `auto` targets resolved (and what they resolved to)."""
        options = self._options(head_module_name(classifier))
        resolved = None
        if targets.AUTO in (options.get("target_modules"), options.get("feedforward_modules")):
            resolved = targets.resolve(classifier, self.config_class.__name__, options, self.name)
            options.update(resolved.modules)
        for key in ("target_modules", "feedforward_modules"):
            target = options.get(key)
            if target not in (None, []) and not matching_modules(classifier, target):
                raise UserError(
                    f"peft.{key}={target} matches no module of {type(classifier.backbone).__name__} "
                    f"(module names look like {', '.join(self._examples(classifier))})")
        return self.config_class(**options), resolved

    def check(self, classifier: nn.Module) -> None:
        """The targets resolve and match on this classifier (run on a module tree without weights)."""
        self.peft_config(classifier)

    @staticmethod
    def _examples(classifier: nn.Module) -> list[str]:
        linears = [n for n, m in classifier.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        return linears[:3] + (["..."] if len(linears) > 3 else [])

    def apply(self, classifier: nn.Module) -> nn.Module:
        from peft import get_peft_model

        config, resolved = self.peft_config(classifier)
        if resolved is not None:
            log.info(resolved.describe(self.name))
        _no_boft_extension_without_cuda()
        try:
            model = get_peft_model(classifier, config)
        except ValueError as err:
            raise UserError(f"peft={self.name}: {str(err).splitlines()[0]}") from err
        return model

    def save(self, model: nn.Module, run_dir: Path) -> list[str]:
        run_dir = Path(run_dir)
        had_readme = (run_dir / "README.md").exists()
        model.save_pretrained(str(run_dir))
        if not had_readme and (run_dir / "README.md").exists():
            (run_dir / "README.md").unlink()  # peft's model card: not ours to ship
        return ADAPTER_FILES + save_buffers(model, run_dir)

    def load(self, classifier: nn.Module, run_dir: Path) -> nn.Module:
        from peft import PeftModel

        run_dir = Path(run_dir)
        missing = [f for f in ADAPTER_FILES if not (run_dir / f).is_file()]
        if missing:
            raise UserError(f"run={run_dir} has no {missing[0]} (was the training finished?)")
        model = PeftModel.from_pretrained(classifier, str(run_dir))
        load_buffers(model, run_dir)
        return model

    def before_certify(self, model: nn.Module) -> tuple[nn.Module, list[str]]:
        """Fold the adapters whose merge is exact into the weights (`merge_exact`, below)."""
        return merge_exact(model)


def _no_boft_extension_without_cuda() -> None:
    """Without CUDA, tell peft's BOFT up front that its CUDA extension is unavailable: it would otherwise
    try (and fail) to compile it once per wrapped layer, seconds each; the result is the same."""
    import torch

    if not torch.cuda.is_available():
        import peft.tuners.boft.layer as boft_layer

        if getattr(boft_layer, "_FBD_CUDA", False) is None:
            boft_layer._FBD_CUDA = False


# peft methods whose adapter folds exactly into the base weights (merge_and_unload is exact).
EXACT_MERGE = {"LORA", "LOHA", "LOKR", "IA3", "OFT", "BOFT", "VERA"}


def merge_exact(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """Fold the peft adapters whose merge is exact (LoRA-type) into the weights, wherever they sit in
    `model` (the whole model or a submodule); returns the model and the methods merged. A model
    holding several adapters (an ensemble, peftsmooth.library.ensemble) stays as it is: merge_and_unload
    would fold the active one and drop the others."""

    def exact_kinds(m: nn.Module) -> set[str] | None:
        if not (hasattr(m, "merge_and_unload") and hasattr(m, "peft_config")) or len(m.peft_config) != 1:
            return None
        kinds = {str(getattr(c.peft_type, "value", c.peft_type)).upper() for c in m.peft_config.values()}
        return kinds if kinds <= EXACT_MERGE else None

    kinds = exact_kinds(model)
    if kinds:
        return model.merge_and_unload().eval(), sorted(kinds)
    merged = []
    for name, child in list(model.named_modules()):
        kinds = exact_kinds(child) if name else None
        if kinds:
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, child.merge_and_unload())
            merged += sorted(kinds)
    return model.eval(), merged
