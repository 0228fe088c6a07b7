"""Weight arithmetic on runs of one base classifier: the tensors of a combined adapter.

A tensor the base classifier also has (a head, a fully fine-tuned weight) combines as the base plus
the weighted changes, theta = theta_0 + sum_i w_i (theta_i - theta_0), computed as
(1 - sum w) theta_0 + sum_i w_i theta_i so that one run at weight 0 is exactly theta_0 and at weight 1
exactly theta_1. A tensor only the runs have (prompt tokens, bottleneck adapters) is sum_i w_i theta_i.

LoRA (peft's own format in and out):
  one run, weight lambda  A and B unchanged, lambda folded into lora_alpha (scaling = lambda alpha / r):
                          the update is lambda * scaling * B A, exactly the run's at 1 and zero at 0.
  several runs            peft's add_weighted_adapter (linear, svd, cat, ties, dare_linear, dare_ties)
                          on one backbone holding every run's adapter; the heads (modules_to_save)
                          combine as above with the same weights.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.nn as nn

from peftsmooth.errors import UserError

PREFIX = "base_model.model."  # peft's prefix of a saved adapter's keys (the BaseClassifier's names follow)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
NAMES = "s{}"                 # adapter names of the sources inside peft (no dots allowed)
COMBINED = "combined"


def base_weight(weights: list[float]) -> float:
    """1 - sum(w), the base's share; 0 when the weights sum to 1 (up to rounding)."""
    rest = 1.0 - math.fsum(weights)
    return 0.0 if abs(rest) < 1e-12 else rest


def weighted(tensors: list[torch.Tensor], weights: list[float], base: torch.Tensor | None = None) -> torch.Tensor:
    """sum_i w_i t_i (+ (1 - sum w) base), in float32, returned in the runs' dtype; integer tensors
    (counters) are the first run's."""
    first = tensors[0]
    if not first.is_floating_point():
        return first.clone()
    out = first.float() * weights[0]
    for tensor, weight in zip(tensors[1:], weights[1:]):
        out = out + tensor.float() * weight
    rest = base_weight(weights)
    if rest and base is not None:
        out = out + base.float() * rest
    return out.to(first.dtype)


def combine_states(states: list[dict], weights: list[float], base: dict, where: str) -> dict:
    """The weighted state of several runs' state dicts (same keys and shapes); `base` holds the base
    classifier's tensors under the same names (those it has)."""
    keys = list(states[0])
    for state in states[1:]:
        if set(state) != set(keys) or any(state[k].shape != states[0][k].shape for k in keys):
            raise UserError(f"{where}: the runs' tensors do not line up (different names or shapes); "
                            f"combine needs runs of one method with the same options")
    return {k: weighted([s[k] for s in states], weights, base.get(k)) for k in keys}


def module_weights(sources, weights: list[float], classifier: nn.Module) -> tuple[str, dict]:
    """Our own modules and full fine-tuning: (the weights file, its combined tensors)."""
    from peftsmooth.adapt.baselines import MODEL_FILE, FullFineTuning
    from peftsmooth.models import load_state_dict_file

    adaptation = sources[0].adaptation
    if isinstance(adaptation, FullFineTuning):
        name, base = MODEL_FILE, classifier.backbone.state_dict()
    else:
        name, base = adaptation.weights_file, classifier.state_dict()
    states = [load_state_dict_file(Path(s.path) / name) for s in sources]
    return name, combine_states(states, weights, base, f"{name} of {sources[0].method}")


def _heads(states: list[dict], weights: list[float], classifier: nn.Module) -> dict:
    """The modules_to_save tensors of saved adapters (the head), combined around the base's."""
    base = classifier.state_dict()
    heads = [{k: v for k, v in s.items() if ".lora_" not in k} for s in states]
    unknown = [k for k in heads[0] if not k.startswith(PREFIX) or k[len(PREFIX):] not in base]
    if unknown:
        raise UserError(f"the adapter holds {unknown[0]}, neither a LoRA weight nor a module of the base classifier")
    return combine_states(heads, weights, {PREFIX + k: v for k, v in base.items()}, "the heads (modules_to_save)")


def lora_rescaled(source, weight: float, classifier: nn.Module) -> tuple[object, dict]:
    """One LoRA run at strength `weight`: (its config with lora_alpha scaled, its tensors)."""
    from peft import PeftConfig
    from safetensors.torch import load_file

    config = PeftConfig.from_pretrained(str(source.path))
    state = load_file(str(Path(source.path) / ADAPTER_WEIGHTS))
    if weight != 1:
        config = dataclasses.replace(config, lora_alpha=config.lora_alpha * weight,
                                     alpha_pattern={k: v * weight for k, v in (config.alpha_pattern or {}).items()})
    lora = {k: v for k, v in state.items() if ".lora_" in k}
    return config, {**lora, **_heads([state], [weight], classifier)}


def lora_mixed(sources, weights: list[float], classifier: nn.Module, combination: str, options: dict,
               seed: int) -> tuple[object, dict]:
    """Several LoRA runs through peft's add_weighted_adapter: (the combined config, its tensors)."""
    from peft import PeftConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    configs = [PeftConfig.from_pretrained(str(s.path)) for s in sources]
    states = [load_file(str(Path(s.path) / ADAPTER_WEIGHTS)) for s in sources]
    heads = _heads(states, weights, classifier)  # before peft wraps the classifier
    bare = [dataclasses.replace(c, modules_to_save=None, inference_mode=True) for c in configs]
    names = [NAMES.format(i) for i in range(len(sources))]
    model = get_peft_model(classifier, bare[0], adapter_name=names[0])
    for name, config in zip(names[1:], bare[1:]):
        model.add_adapter(name, config)
    for name, state in zip(names, states):
        set_peft_model_state_dict(model, {k: v for k, v in state.items() if ".lora_" in k}, adapter_name=name)
    torch.manual_seed(seed)  # dare_*: the random drop
    try:
        model.base_model.add_weighted_adapter(names, list(weights), COMBINED, combination_type=combination,
                                              **options)
    except (ValueError, TypeError) as err:
        raise UserError(f"combination={combination}: {str(err).strip().splitlines()[0]}") from err
    lora = get_peft_model_state_dict(model, adapter_name=COMBINED)
    config = model.peft_config[COMBINED]
    same_targets = all(c.target_modules == configs[0].target_modules for c in configs)
    config = dataclasses.replace(config, modules_to_save=configs[0].modules_to_save, inference_mode=True,
                                 target_modules=configs[0].target_modules if same_targets else config.target_modules)
    return config, {**{k: v.detach().clone() for k, v in lora.items()}, **heads}
