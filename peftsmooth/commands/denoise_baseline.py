"""`peftsmooth denoise-baseline`: denoised smoothing, a denoiser in front of a frozen classifier.

    peftsmooth denoise-baseline model=vit denoiser=dncnn sigma=0.25 denoiser.objective=stability
    peftsmooth denoise-baseline base=<train run> denoiser=ddpm sigma=0.5

The classifier comes from `model=...` (off-the-shelf) or `base=<train run dir>` (rebuilt with
`load_run`); it is frozen. A CNN denoiser is trained by the shared training loop
(`peftsmooth.training.fit`) with the objective `denoiser.objective`; a `ddpm` denoiser is used as
it is. The run directory has train's contract (`run.json` with `front` = the denoiser config), so
`peftsmooth certify run=<dir>` certifies denoiser -> classifier with no special casing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from peftsmooth.config import hydra_app, hydra_choice, output_dir
from peftsmooth.errors import UserError
from peftsmooth.runs import INIT_FILE, is_random_init, to_plain

log = logging.getLogger("peftsmooth.denoise")


def resolve_run_dir(cfg) -> Path:
    """`resume=<dir>` continues that run (after its last completed epoch); otherwise this job's Hydra
    directory (which resumes too if it already holds a checkpoint, e.g. `hydra.run.dir=<dir>`)."""
    if not cfg.get("resume"):
        return output_dir().resolve()
    run_dir = Path(str(cfg.resume)).expanduser()
    if not (run_dir / "checkpoint.pt").is_file():
        raise UserError(f"resume={cfg.resume} holds no checkpoint.pt; give a denoise-baseline run directory")
    return run_dir.resolve()


def _base_info(cfg) -> dict | None:
    """The base run's run.json, checked against this command's dataset, or None without base=."""
    if not cfg.get("base"):
        return None
    from peftsmooth.runs import read_run_info

    info = read_run_info(cfg.base)
    if info.get("finished") is False:
        raise UserError(f"base={cfg.base} has not finished training (run.json says finished=false)")
    if info.get("front"):
        raise UserError(f"base={cfg.base} already has a front module ({info['front'].get('_target_')}); "
                        f"give a plain train run")
    base_dataset = (info.get("dataset") or {}).get("name")
    if base_dataset and base_dataset != cfg.dataset.name:
        raise UserError(f"base={cfg.base} was trained on dataset={base_dataset} but dataset={cfg.dataset.name}; "
                        f"add dataset={base_dataset}")
    return info


def _classifier(cfg, base: dict | None, run_dir: Path):
    """The frozen classifier and the run.json fields that rebuild it. A randomly initialized
    off-the-shelf model (tiny test models) keeps its weights in init.safetensors, as train does."""
    from peftsmooth.models import build_classifier, save_state_dict_file

    if base is not None:
        from peftsmooth.runs import load_run

        classifier, _ = load_run(cfg.base)
        fields = {"model": base["model"], "model_name": base.get("model_name"), "adapt": base.get("adapt"),
                  "input_size": base.get("input_size"), "dataset": base.get("dataset") or cfg.dataset}
        return classifier, fields
    model_cfg = OmegaConf.create(to_plain(cfg.model))
    fresh = is_random_init(model_cfg)
    kept = run_dir / INIT_FILE
    if fresh and kept.is_file():  # a resumed run: the same random classifier as before
        model_cfg.checkpoint = str(kept)
    classifier = build_classifier(model_cfg, int(cfg.dataset.num_classes), list(cfg.dataset.image_size))
    for p in classifier.parameters():
        p.requires_grad_(False)
    if fresh and not kept.is_file():
        save_state_dict_file(classifier.backbone.state_dict(), kept)
        model_cfg.checkpoint = str(kept)
    fields = {"model": model_cfg, "model_name": hydra_choice("model", str(cfg.model.name)), "adapt": None,
              "input_size": classifier.input_size, "dataset": cfg.dataset}
    return classifier.eval(), fields


def _link_base_files(base_dir: str, files: list, run_dir: Path) -> list[str]:
    """The base run's adaptation weights, hard-linked (or copied) here so load_run(run_dir) finds them."""
    out = []
    for name in files or []:
        src, dst = Path(str(base_dir)).expanduser() / name, run_dir / name
        if not src.exists():
            raise UserError(f"base={base_dir}: run.json lists {name} but the file is missing")
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists():
            dst.unlink() if dst.is_file() else shutil.rmtree(dst)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
        out.append(str(name))
    return out


def _method(name: str, denoiser_cfg) -> str:
    """'dncnn-mse', 'dncnn-stability'; started from another run: 'dncnn-stability+mse' ("Stab+MSE")."""
    method = f"{name}-{denoiser_cfg.objective}"
    if denoiser_cfg.get("init"):
        from peftsmooth.runs import read_run_info

        init_objective = read_run_info(denoiser_cfg.init).get("objective") or "init"
        method += f"+{init_objective}"
    return method


def _eval_settings(train_cfg):
    """Only the evaluation settings of the train block (a ddpm run has nothing to optimize)."""
    from peftsmooth.training import TrainSettings

    keys = ("eval_batch_size", "max_eval", "precision")
    return TrainSettings.from_cfg({k: train_cfg[k] for k in keys if k in train_cfg})


def denoiser_evaluator(test_set, sigma: float, settings, seed: int):
    """Clean / noisy accuracy of f(D(.)) (the shared evaluator) plus the denoiser's test MSE on the
    same kind of seeded noise: ||D(x + noise) - x||^2 per pixel."""
    from torch.utils.data import DataLoader, Subset

    from peftsmooth.training import accuracy_evaluator, add_noise

    accuracy = accuracy_evaluator(test_set, sigma, settings, seed)
    if settings.max_eval is not None and settings.max_eval < len(test_set):
        test_set = Subset(test_set, range(int(settings.max_eval)))
    loader = DataLoader(test_set, batch_size=int(settings.eval_batch_size), shuffle=False)

    @torch.no_grad()
    def evaluate(model, dist_info=None) -> dict:
        out = accuracy(model, dist_info)
        inner = getattr(model, "module", model)
        was_training = inner.training
        inner.eval()
        device = next(inner.parameters()).device
        total = count = 0.0
        for b, (x, _) in enumerate(loader):
            x = x.to(device)
            noisy = add_noise(x, sigma, torch.Generator().manual_seed(seed * 1_000_003 + b))
            total += float(((inner(noisy, part="denoiser").float() - x) ** 2).sum())
            count += x.numel()
        inner.train(was_training)
        out["test_mse"] = total / max(count, 1)
        return out

    return evaluate


def run_denoise_baseline(cfg) -> dict:
    from hydra.utils import instantiate

    from peftsmooth.cli import format_command
    from peftsmooth.data import build_dataset
    from peftsmooth.denoisers import DenoisedClassifier, get_objective
    from peftsmooth.models import count_parameters
    from peftsmooth.runs import atomic_write_text, write_run_info
    from peftsmooth.runtime import resolve_device, seed_everything
    from peftsmooth.training import (METRICS, TrainSettings, check_resume_config, fit, read_checkpoint,
                                     resume_fingerprint)

    run_dir = resolve_run_dir(cfg)
    device = resolve_device(cfg.device)
    sigma = float(cfg.sigma)

    # --- everything that can be wrong is checked before any work
    seed_everything(int(cfg.seed))  # the denoiser's initialization
    front = instantiate(cfg.denoiser)
    trains = bool(getattr(front, "trains", True))
    objective = get_objective(str(cfg.denoiser.objective)) if trains else None
    settings = TrainSettings.from_cfg(cfg.train) if trains else None
    fingerprint = resume_fingerprint(cfg)
    checkpoint = read_checkpoint(run_dir)
    if checkpoint is not None:
        check_resume_config(checkpoint, fingerprint, run_dir)
    base = _base_info(cfg)
    denoiser = front.build()  # ddpm: checks for diffusers, loads the model, checks its image size
    classifier, fields = _classifier(cfg, base, run_dir)

    name = hydra_choice("denoiser", type(denoiser).__name__.lower())
    method = _method(name, cfg.denoiser) if trains else name
    model = DenoisedClassifier(denoiser, classifier).to(device)
    trainable, total = count_parameters(model)
    base_files = _link_base_files(cfg.base, base.get("files"), run_dir) if base and base.get("adapt") else []
    data_cfg = OmegaConf.create(to_plain(fields["dataset"]))
    info = dict(command="denoise-baseline", method=method, **fields,
                num_classes=int(data_cfg.num_classes), image_size=list(data_cfg.image_size), sigma=sigma,
                front=cfg.denoiser, base=str(Path(str(cfg.base)).expanduser().resolve()) if base else None,
                objective=str(cfg.denoiser.objective) if trains else None,
                timestep=getattr(denoiser, "timestep", None),
                trainable_params=trainable, total_params=total, seed=int(cfg.seed),
                argv=format_command("denoise-baseline", sys.argv[1:]))
    write_run_info(run_dir, **info, files=base_files, finished=False)
    log.info("%s: denoiser %s (%s trainable of %s parameters) in front of a frozen %s, sigma=%g",
             method, type(denoiser).__name__, f"{trainable:,}", f"{total:,}", fields["model_name"], sigma)

    test_set = build_dataset(data_cfg, "test")
    started = time.time()
    if trains:
        train_set = build_dataset(data_cfg, "train", augment=bool(cfg.train.get("augment", True)))
        evaluate = denoiser_evaluator(test_set, sigma, settings, int(cfg.seed)) if cfg.evaluate else None
        result = fit(model, train_set, sigma=sigma, settings=settings, run_dir=run_dir, objective=objective,
                     evaluate=evaluate, save=lambda m, d: front.save(m.denoiser, d), config=fingerprint,
                     seed=int(cfg.seed), device=device, describe=method)
        metrics, files = result["metrics"], list(result["files"])
    else:  # nothing to train: evaluate once, as "epoch 0"
        metrics, files = {}, []
        if cfg.evaluate:
            evaluate = denoiser_evaluator(test_set, sigma, _eval_settings(cfg.train), int(cfg.seed))
            metrics = {"epoch": 0, "loss": None, **evaluate(model.eval()), "lr": None,
                       "time": round(time.time() - started, 3)}
            atomic_write_text(run_dir / METRICS, json.dumps(metrics) + "\n")
    if not base and fields["model"].get("checkpoint") == str(run_dir / INIT_FILE):
        files = [INIT_FILE, *files]
    write_run_info(run_dir, **info, files=base_files + files, finished=True)
    summary = {"run_dir": str(run_dir), "method": method, "trainable_params": trainable, "total_params": total,
               **{k: metrics.get(k) for k in ("clean_acc", "noisy_acc", "test_mse") if k in metrics},
               "elapsed_seconds": round(time.time() - started, 3)}
    log.info("done: %s", " ".join(f"{k}={v}" for k, v in summary.items()))
    print(f"denoise-baseline: {method}: noisy_acc={summary.get('noisy_acc')} run dir {run_dir}")
    return summary


main = hydra_app("denoise-baseline", run_denoise_baseline)
