"""The classifier `certify` certifies: a run's (run=...) or an off-the-shelf one (model=..., no adaptation),
checked against the dataset and prepared for certification (exact adapter merge, device, memory format)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from omegaconf import OmegaConf

from peftsmooth.config import hydra_choice
from peftsmooth.errors import UserError, require
from peftsmooth.runtime import freeze


def load_classifier(cfg) -> tuple[nn.Module, dict]:
    """The model to certify and where it came from (`source`: run, method, model_name, parameter
    counts, sigma_train, num_classes, the weights' fingerprint, and `dataset_cfg`, the dataset to certify on)."""
    from peftsmooth.certify.fingerprint import weights_sha256
    from peftsmooth.models import build_classifier, count_parameters, model_label
    from peftsmooth.runs import load_run

    if cfg.get("run"):
        model, info = load_run(cfg.run, model_overrides(cfg))
        dataset = OmegaConf.create(info.get("dataset") or OmegaConf.to_container(cfg.dataset, resolve=True))
        if _overridden("dataset"):  # e.g. a dataset.root on this machine; must still be the same task
            dataset = cfg.dataset
            require(int(dataset.num_classes) == int(info["num_classes"]),
                    f"dataset.num_classes={dataset.num_classes} does not match the run's num_classes={info['num_classes']} "
                    f"(run={cfg.run})")
        source = {"run": str(Path(str(cfg.run)).expanduser().resolve()), "method": info.get("method"),
                  "model_name": info.get("model_name"), "trainable_params": info.get("trainable_params"),
                  "sigma_train": info.get("sigma"), "num_classes": int(info["num_classes"]),
                  "quantized": info.get("quantized")}  # a dequantized adapter is what is certified
    else:
        dataset = cfg.dataset
        model = freeze(build_classifier(cfg.model, int(dataset.num_classes), list(dataset.image_size)).eval())
        source = {"run": None, "method": "none", "model_name": model_label(cfg.model, hydra_choice("model")), "trainable_params": 0,
                  "sigma_train": None, "num_classes": int(dataset.num_classes)}
    source["total_params"] = count_parameters(model)[1]
    source["weights_sha256"] = weights_sha256(model)  # what is certified, before any merge or move
    source["dataset_cfg"] = dataset
    require(source["num_classes"] == int(dataset.num_classes),
            f"dataset.num_classes={dataset.num_classes} does not match the classifier's {source['num_classes']} classes")
    return model, source


def model_overrides(cfg) -> dict:
    """`certify run=... model.factory=/model.weights=/model.checkpoint=`: where the run's code and files
    are on this machine (the keys given on the command line, with their values)."""
    from peftsmooth.runs import MOVABLE_MODEL_KEYS

    given = set(_overridden_keys("model"))
    return {key: cfg.model.get(key) for key in MOVABLE_MODEL_KEYS if key in given}


def check_run_model(cfg, info) -> None:
    """A run's model can be built here: its code importable and its files present, with the
    `model.factory=/model.weights=/model.checkpoint=` overrides of a run that moved."""
    from omegaconf import OmegaConf

    from peftsmooth.models import check_model_config
    from peftsmooth.runs import run_model_config

    overrides = model_overrides(cfg)
    try:
        check_model_config(OmegaConf.create(run_model_config(cfg.run, info, overrides)))
    except UserError as err:
        hint = "" if overrides else (" (run=" + str(cfg.run) + " moved? give model.factory=, model.weights= or "
                                     "model.checkpoint= where they are now)")
        raise UserError(f"{err}{hint}") from None


def certify_sigma(given, sigma_train) -> float:
    """The noise level to certify at: `sigma` when given, else the run's training sigma (model=... has none)."""
    sigma = given if given is not None else sigma_train
    require(sigma is not None, "sigma=null: give the noise level to certify at, e.g. sigma=0.25 (required with model=...)")
    require(isinstance(sigma, (int, float)) and float(sigma) > 0,
            f"sigma={sigma} must be > 0 to certify (there is no smoothing at sigma=0), e.g. sigma=0.25"
            if given is not None else
            f"the run was trained at sigma={sigma}: give the noise level to certify at, e.g. sigma=0.25")
    return float(sigma)


def check_num_classes(model: nn.Module, num_classes: int, image_size) -> None:
    """One forward pass on a blank image: the classifier must output num_classes logits."""
    with torch.no_grad():
        logits = model(torch.zeros(1, *[int(s) for s in image_size]))
    require(logits.shape[-1] == num_classes,
            f"the classifier outputs {logits.shape[-1]} classes but dataset.num_classes={num_classes}")


def prepare_for_certify(model: nn.Module, device: torch.device, *, merge_adapters: bool,
                        channels_last: bool) -> tuple[nn.Module, list[str]]:
    """The model on `device`, its exactly mergeable adapters folded in (when asked); returns it and the
    adapter methods merged."""
    merged = []
    if merge_adapters:
        from peftsmooth.adapt.peft_tuners import merge_exact

        model, merged = merge_exact(model)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, merged


def _override_names() -> list[str]:
    """The keys and groups the command line sets (`model.factory=...` -> model.factory, `dataset=folder`
    -> dataset); none outside a Hydra job."""
    try:
        from hydra.core.hydra_config import HydraConfig

        task = list(HydraConfig.get().overrides.task)
    except Exception:  # noqa: BLE001 - outside a Hydra job nothing is overridden
        return []
    return [o.lstrip("+~").split("=")[0] for o in task]


def _overridden_keys(group: str) -> list[str]:
    """The keys of `group` the command line sets (`model.factory=...` -> factory)."""
    return [n.split(".", 1)[1] for n in _override_names() if n.startswith(group + ".")]


def _overridden(group: str) -> bool:
    """Whether the command line overrides a key of `group` (e.g. dataset=... or dataset.root=...)."""
    return any(n.split(".")[0] == group for n in _override_names())
