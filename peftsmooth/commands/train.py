"""`peftsmooth train`: adapt a pretrained classifier to Gaussian noise (PEFTSmoothing).

    dataset (native [0,1]) -> augment -> x + sigma*N(0,I) -> classifier adapted by `peft=<method>`

Builds the base classifier (`model=...`, or the fine-tuned weights of `base=<run dir>`), applies
the adaptation chosen by conf/peft/<method>.yaml (its `_target_`), trains it with the shared loop
(peftsmooth.train.loop.fit) and writes run.json, metrics.jsonl, checkpoint.pt and the method's
weights (peft's adapter files, model.safetensors, ...) into the run directory.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NamedTuple

from peftsmooth.config import hydra_app, hydra_choice
from peftsmooth.errors import require

log = logging.getLogger("peftsmooth.train")


def resolve_model(cfg):
    """(model cfg, model name, base dir): `base=<run dir>` starts from that run's model.safetensors."""
    from omegaconf import OmegaConf

    from peftsmooth.adapt.baselines import MODEL_FILE
    from peftsmooth.models import model_label
    from peftsmooth.runs import read_run_info

    if not cfg.get("base"):
        model_cfg = OmegaConf.create(OmegaConf.to_container(cfg.model, resolve=True))
        return model_cfg, model_label(cfg.model, hydra_choice("model")), None
    base = Path(str(cfg.base)).expanduser().resolve()
    info = read_run_info(base, "base")
    weights = base / MODEL_FILE
    require(weights.is_file(), f"base={cfg.base} has no {MODEL_FILE} (only peft=full runs write one; "
                               f"train the base with `peftsmooth train peft=full sigma=0`)")
    require(info.num_classes == int(cfg.dataset.num_classes),
            f"base={cfg.base} has {info.num_classes} classes but dataset={cfg.dataset.name} has {cfg.dataset.num_classes}")
    model_cfg = OmegaConf.create(info.model)
    model_cfg.checkpoint = str(weights)
    return model_cfg, info.model_name or model_cfg.name, base


class Checked(NamedTuple):
    """What check_train found: the settings, the objective, the method and the model to start from."""

    settings: Any
    loss_name: str
    objective: Any
    adapt: Any
    method: str
    model_cfg: Any
    model_name: str
    base: Path | None


def check_train(cfg) -> Checked:
    """Every check train makes before a model, data or the network (the CLI runs it before Hydra
    starts): train.*, the loss, the method, resume=, base=, the model's name and weight files, and
    that the method can adapt the model (on its module tree without weights)."""
    from peftsmooth.adapt import build_adaptation
    from peftsmooth.models import check_model_config, module_tree
    from peftsmooth.runtime import resolve_device
    from peftsmooth.train.losses import objective_from_cfg
    from peftsmooth.train.phases import check_method
    from peftsmooth.train.run import check_resume
    from peftsmooth.train.settings import TrainSettings, check_precision

    settings = TrainSettings.from_cfg(cfg.train)
    loss_name, objective = objective_from_cfg(cfg.train)
    adapt = build_adaptation(cfg.peft)
    method = adapt.name or hydra_choice("peft", "custom")
    require(settings.epochs > 0 or not adapt.trains,
            f"train.epochs=0 with peft={method} would save an untrained adapter; give train.epochs >= 1, "
            f"or use peft=none to evaluate / certify the model as it is")
    check_method(settings, adapt, method)
    check_precision(settings, resolve_device(cfg.device))
    check_resume(cfg.get("resume"), "train")
    model_cfg, model_name, base = resolve_model(cfg)
    check_model_config(model_cfg, cfg.dataset.image_size)
    tree = module_tree(model_cfg, int(cfg.dataset.num_classes))
    if tree is not None:  # the method fits the model: its peft targets resolve, a ViT for prompts / adapters
        adapt.check(tree)
    return Checked(settings, loss_name, objective, adapt, method, model_cfg, model_name, base)


def run_train(cfg) -> dict:
    from peftsmooth.data import build_dataset
    from peftsmooth.runtime import resolve_device, seed_everything
    from peftsmooth.train.loop import accuracy_evaluator
    from peftsmooth.train.phases import schedule_info
    from peftsmooth.train.run import Run

    # ---- every check before any work
    settings, loss_name, objective, adapt, method, model_cfg, model_name, base = check_train(cfg)
    run = Run.open(cfg, "train", resolve_device(cfg.device), settings)

    # ---- data (a missing dataset fails here, before anything is written)
    test_set = build_dataset(cfg.dataset, "test", augment=False)
    train_set = build_dataset(cfg.dataset, "train", augment=bool(cfg.train.get("augment", True))) if adapt.trains else None

    # ---- model, run.json, training (or one evaluation)
    seed_everything(int(cfg.seed))
    classifier = run.build_classifier(model_cfg, cfg.dataset)
    model = adapt.apply(classifier)
    run.start(_run_info(cfg, adapt, method, model_cfg, model_name, base, classifier, model,
                        loss=loss_name if adapt.trains else None, schedule=schedule_info(settings)))
    evaluate = accuracy_evaluator(test_set, float(cfg.sigma), settings, int(cfg.seed))
    if adapt.trains:
        metrics, files = _fit(run, cfg, model, train_set, settings, objective, evaluate, adapt, method)
    else:  # peft=none: evaluate once, save whatever the method saves
        metrics = run.evaluate_once(model, evaluate)
        files = list(adapt.save(model, run.path) or []) if run.dist_info.is_main else []
    info = run.finish(files, **adapt.extra_run_info())
    if run.dist_info.is_main:
        shown = ", ".join(f"{k}={metrics[k]:.4f}" for k in ("clean_acc", "noisy_acc") if metrics.get(k) is not None)
        print(f"peftsmooth train: {method} sigma={info.sigma}: {info.trainable_params}/{info.total_params} "
              f"trainable, {shown} -> {run.path}")
    return {"run_dir": str(run.path), "method": method, "trainable_params": info.trainable_params,
            "total_params": info.total_params, "files": info.files,
            **{k: v for k, v in metrics.items() if k in ("epoch", "loss", "clean_acc", "noisy_acc")}}


def _run_info(cfg, adapt, method: str, model_cfg, model_name: str, base: Path | None, classifier, model, loss,
              schedule: dict):
    """run.json's fields for this run (command, argv and files are the lifecycle's)."""
    from peftsmooth.models import count_parameters
    from peftsmooth.runs import RunInfo

    trainable, total = count_parameters(model)
    log.info("peft=%s: %d trainable of %d parameters (%.3f%%)", method, trainable, total, 100.0 * trainable / max(total, 1))
    return RunInfo.from_fields(
        method=method, model=model_cfg, model_name=model_name, dataset=cfg.dataset,
        num_classes=int(cfg.dataset.num_classes), image_size=list(cfg.dataset.image_size),
        input_size=int(classifier.input_size), sigma=float(cfg.sigma), adapt=cfg.peft, front=None,
        base=str(base) if base else None, trainable_params=trainable, total_params=total, seed=int(cfg.seed),
        loss=loss, train=cfg.train, schedule=schedule, **adapt.extra_run_info())


def _fit(run, cfg, model, train_set, settings, objective, evaluate, adapt, method: str) -> tuple[dict, list]:
    """The shared loop on this run (zeroth-order methods bring their own training_step)."""
    from peftsmooth.train.loop import fit

    result = fit(model, train_set, sigma=float(cfg.sigma), settings=settings, run_dir=run.path, objective=objective,
                 evaluate=evaluate, save=adapt.save, config=run.fingerprint, seed=int(cfg.seed),
                 step_hook=adapt if adapt.zeroth_order else None, dist_info=run.dist_info,
                 describe=f"train {method}")
    return result["metrics"], result["files"]


main = hydra_app("train", run_train, check=check_train)
