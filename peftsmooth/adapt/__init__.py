"""Every way of adapting a base classifier; configs in conf/peft/ choose one with `_target_`.

The contract (and its defaults) is the `Adaptation` base class in `peftsmooth.adapt.base`.
Implementations: peft_tuners.PeftTuner (LoRA, LoHa, LoKr, IA3, OFT, BOFT, VeRA from `peft`),
prompt.VisualPromptTuning, bottleneck.BottleneckAdapters, baselines.LinearProbe / FullFineTuning,
NoAdaptation (`peft=none`) and the black-box coordinators (in the front stage: `peftsmooth.front.blackbox`).
`build_adaptation(cfg.peft)` instantiates one. A YAML's `train:` block holds the method's training
defaults (learning rate, weight decay), read by conf/train.yaml, not passed to the method.
"""

from __future__ import annotations

from peftsmooth.adapt.base import Adaptation, NoAdaptation, ZerothOrderAdaptation
from peftsmooth.errors import UserError

__all__ = ["Adaptation", "NoAdaptation", "ZerothOrderAdaptation", "build_adaptation"]


def build_adaptation(cfg) -> Adaptation:
    """Instantiate the adaptation object of a `peft` config (its `_target_`); errors are UserErrors."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    if not cfg or "_target_" not in cfg:
        raise UserError("peft config has no _target_ (choose peft=<one of conf/peft/*.yaml>)")
    cfg = _without_train(cfg)
    try:
        adaptation = instantiate(cfg, _convert_="all")
    except InstantiationException as err:
        cause = _root_cause(err)
        if isinstance(cause, UserError):
            raise cause from None
        detail = str(cause or err).strip().splitlines()
        raise UserError(f"peft._target_={cfg['_target_']}: {detail[0] if detail else type(err).__name__}") from err
    if not isinstance(adaptation, Adaptation):
        raise UserError(f"peft._target_={cfg['_target_']} is not an adaptation method "
                        f"(a subclass of peftsmooth.adapt.Adaptation)")
    return adaptation


def _without_train(cfg):
    """The config without its `train:` block: the method's training defaults (e.g. `train.lr`), which
    conf/train.yaml reads through ${oc.select:peft.train.<key>,...}; they are not the method's options."""
    from omegaconf import OmegaConf

    if "train" not in cfg:
        return cfg
    plain = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    plain.pop("train")
    return plain


def _root_cause(err: Exception) -> BaseException | None:
    """The first UserError in the chain of causes of Hydra's InstantiationException, else the last cause."""
    cause = err.__cause__
    while cause is not None and not isinstance(cause, UserError) and cause.__cause__ is not None:
        cause = cause.__cause__
    return cause
