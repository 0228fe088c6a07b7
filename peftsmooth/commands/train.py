"""`peftsmooth train`: adapt a pretrained classifier to Gaussian noise (PEFTSmoothing).

    dataset (native [0,1]) -> augment -> x + sigma*N(0,I) -> classifier adapted by `peft=<method>`

Builds the base classifier (`model=...`, or the fine-tuned weights of `base=<run dir>`), applies
the adaptation chosen by conf/peft/<method>.yaml (its `_target_`), trains it with the shared loop
(peftsmooth.training.fit) and writes run.json, metrics.jsonl, checkpoint.pt and the method's
weights (peft's adapter files, model.safetensors, ...) into the run directory.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

from peftsmooth.config import hydra_app, hydra_choice, output_dir
from peftsmooth.errors import UserError, require

log = logging.getLogger("peftsmooth.train")


def resolve_run_dir(cfg) -> Path:
    """`resume=<dir>` continues that run; otherwise this job's Hydra directory (which resumes too if
    it already holds a checkpoint, e.g. `hydra.run.dir=<dir>`)."""
    if cfg.get("resume"):
        run_dir = Path(str(cfg.resume)).expanduser()
        require(run_dir.is_dir(), f"resume={cfg.resume}: no such directory")
        require((run_dir / "checkpoint.pt").is_file() or (run_dir / "run.json").is_file(),
                f"resume={cfg.resume} is not a train run directory (no checkpoint.pt or run.json)")
        return run_dir.resolve()
    run_dir = output_dir().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def resolve_model(cfg):
    """(model cfg, model name, base dir): `base=<run dir>` starts from that run's model.safetensors."""
    from omegaconf import OmegaConf

    from peftsmooth.adapt.baselines import MODEL_FILE
    from peftsmooth.runs import read_run_info

    if not cfg.get("base"):
        return OmegaConf.create(OmegaConf.to_container(cfg.model, resolve=True)), hydra_choice("model", cfg.model.name), None
    base = Path(str(cfg.base)).expanduser().resolve()
    info = read_run_info(base)
    weights = base / MODEL_FILE
    require(weights.is_file(), f"base={cfg.base} has no {MODEL_FILE} (only peft=full runs write one; "
                               f"train the base with `peftsmooth train peft=full sigma=0`)")
    require(int(info["num_classes"]) == int(cfg.dataset.num_classes),
            f"base={cfg.base} has {info['num_classes']} classes but dataset={cfg.dataset.name} has {cfg.dataset.num_classes}")
    model_cfg = OmegaConf.create(info["model"])
    model_cfg.checkpoint = str(weights)
    return model_cfg, info.get("model_name") or model_cfg.name, base


def _drop_stray_dir(mine: Path, run_dir: Path) -> None:
    """Under torchrun, a rank whose Hydra dir differs from rank 0's removes it (only Hydra's files)."""
    if mine != run_dir and mine.is_dir() and all(p.name == ".hydra" or p.suffix == ".log" for p in mine.iterdir()):
        shutil.rmtree(mine, ignore_errors=True)


def run_train(cfg) -> dict:
    import torch

    from peftsmooth.adapt import build_adaptation
    from peftsmooth.data import build_dataset
    from peftsmooth.losses import build_objective
    from peftsmooth.models import build_classifier, count_parameters, save_state_dict_file
    from peftsmooth.runs import INIT_FILE, is_random_init, to_plain, write_run_info
    from peftsmooth.runtime import resolve_device, seed_everything
    from peftsmooth.training import (METRICS, TrainSettings, accuracy_evaluator, broadcast_object,
                                     check_resume_config, init_distributed, read_checkpoint,
                                     resume_fingerprint)

    # ---- every check before any work
    settings = TrainSettings.from_cfg(cfg.train)
    loss_name = str(cfg.train.get("loss", "ce"))
    objective = build_objective(loss_name, **dict(to_plain(cfg.train.get(loss_name)) or {}))
    adapt = build_adaptation(cfg.peft)
    device = resolve_device(cfg.device)
    require(settings.precision != "fp16" or device.type == "cuda",
            f"train.precision=fp16 needs a GPU (device is {device}); use bf16 or fp32")
    dist_info = init_distributed(device)
    mine = output_dir().resolve()
    run_dir = broadcast_object(resolve_run_dir(cfg), dist_info)
    fingerprint = resume_fingerprint(cfg)
    checkpoint = read_checkpoint(run_dir)
    if checkpoint is not None:
        check_resume_config(checkpoint, fingerprint, run_dir)
    model_cfg, model_name, base = resolve_model(cfg)
    sigma = float(cfg.sigma)
    method = getattr(adapt, "name", None) or hydra_choice("peft", "custom")
    trains = bool(getattr(adapt, "trains", True))
    require(settings.epochs > 0 or not trains,
            f"train.epochs=0 with peft={method} would save an untrained adapter; give train.epochs >= 1, "
            f"or use peft=none to evaluate / certify the model as it is")

    # ---- data (a missing dataset fails here, before anything is written)
    test_set = build_dataset(cfg.dataset, "test", augment=False)
    train_set = build_dataset(cfg.dataset, "train", augment=bool(cfg.train.get("augment", True))) if trains else None

    # ---- model
    seed_everything(int(cfg.seed))
    num_classes, image_size = int(cfg.dataset.num_classes), list(cfg.dataset.image_size)
    classifier = build_classifier(model_cfg, num_classes, image_size)
    fresh_init = is_random_init(model_cfg)
    if fresh_init:  # random init (tiny test models): keep it, so the run can be rebuilt exactly
        if dist_info.is_main:
            save_state_dict_file(classifier.backbone.state_dict(), run_dir / INIT_FILE)
        model_cfg.checkpoint = str(run_dir / INIT_FILE)
    model = adapt.apply(classifier)
    trainable, total = count_parameters(model)
    log.info("peft=%s: %d trainable of %d parameters (%.3f%%)", method, trainable, total, 100.0 * trainable / max(total, 1))

    info = dict(command="train", method=method, model=model_cfg, model_name=model_name, dataset=cfg.dataset,
                num_classes=num_classes, image_size=image_size, input_size=int(classifier.input_size),
                sigma=sigma, adapt=cfg.peft, front=None, base=str(base) if base else None,
                trainable_params=trainable, total_params=total, files=[], argv=sys.argv,
                seed=int(cfg.seed), loss=loss_name if trains else None, train=cfg.train, finished=False)
    if hasattr(adapt, "extra_run_info"):
        info.update(adapt.extra_run_info())
    if dist_info.is_main:
        write_run_info(run_dir, **info)
        _drop_stray_dir(mine, run_dir)
    elif mine != run_dir:
        _drop_stray_dir(mine, run_dir)

    # ---- training
    evaluate = accuracy_evaluator(test_set, sigma, settings, int(cfg.seed))
    if trains:
        from peftsmooth.training import fit

        step_hook = adapt if hasattr(adapt, "training_step") else None
        result = fit(model, train_set, sigma=sigma, settings=settings, run_dir=run_dir, objective=objective,
                     evaluate=evaluate, save=adapt.save, config=fingerprint, seed=int(cfg.seed), device=device,
                     step_hook=step_hook, dist_info=dist_info, describe=f"train {method}")
        metrics, files = result["metrics"], result["files"]
    else:  # peft=none: evaluate once, save whatever the method saves
        model.to(dist_info.device)
        metrics = {"epoch": 0, "step": 0, "loss": None, "train_acc": None, **evaluate(model, dist_info),
                   "lr": None, "time": 0.0}
        files = []
        if dist_info.is_main:
            from peftsmooth.runs import atomic_write_text
            import json

            atomic_write_text(run_dir / METRICS, json.dumps(metrics) + "\n")
            files = list(adapt.save(model, run_dir) or [])

    if fresh_init:
        files = [INIT_FILE, *files]
    if hasattr(adapt, "extra_run_info"):
        info.update(adapt.extra_run_info())
    if dist_info.is_main:
        write_run_info(run_dir, **{**info, "files": files, "finished": True})
        shown = ", ".join(f"{k}={metrics[k]:.4f}" for k in ("clean_acc", "noisy_acc") if metrics.get(k) is not None)
        print(f"peftsmooth train: {method} sigma={sigma}: {trainable}/{total} trainable, {shown} -> {run_dir}")
    if dist_info.world_size > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return {"run_dir": str(run_dir), "method": method, "trainable_params": trainable, "total_params": total,
            "files": files, **{k: v for k, v in metrics.items() if k in ("epoch", "loss", "clean_acc", "noisy_acc")}}


main = hydra_app("train", run_train)
