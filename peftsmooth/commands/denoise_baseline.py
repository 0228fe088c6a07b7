"""`peftsmooth denoise-baseline`: denoised smoothing, a denoiser in front of a frozen classifier.

    peftsmooth denoise-baseline model=vit denoiser=dncnn sigma=0.25 denoiser.objective=stability
    peftsmooth denoise-baseline base=<train run> denoiser=ddpm sigma=0.5

The classifier comes from `model=...` (off-the-shelf) or `base=<train run dir>` (rebuilt with
`load_run`); it is frozen. A CNN denoiser is trained by the shared training loop
(`peftsmooth.train.loop.fit`) with the objective `denoiser.objective`; a `ddpm` denoiser is used as
it is. The run directory has train's contract (`run.json` with `front` = the denoiser config), so
`peftsmooth certify run=<dir>` certifies denoiser -> classifier with no special casing.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import OmegaConf

from peftsmooth.config import hydra_app, hydra_choice
from peftsmooth.errors import UserError
from peftsmooth.front.denoisers import denoiser_evaluator
from peftsmooth.runs import RunInfo, link_run_files, to_plain

log = logging.getLogger("peftsmooth.denoise")


def _base_info(cfg) -> RunInfo | None:
    """The base run's run.json, checked against this command's dataset, or None without base=."""
    if not cfg.get("base"):
        return None
    from peftsmooth.runs import read_run_info

    info = read_run_info(cfg.base, "base")
    if info.finished is False:
        raise UserError(f"base={cfg.base} has not finished training (run.json says finished=false)")
    if info.front:
        raise UserError(f"base={cfg.base} already has a front module ({info.front.get('_target_')}); "
                        f"give a plain train run")
    base_dataset = (info.dataset or {}).get("name")
    if base_dataset and base_dataset != cfg.dataset.name:
        raise UserError(f"base={cfg.base} was trained on dataset={base_dataset} but dataset={cfg.dataset.name}; "
                        f"add dataset={base_dataset}")
    return info


def _classifier(cfg, base: RunInfo | None, run):
    """The frozen classifier and the run.json fields that rebuild it: the base run's classifier
    (`load_run`), or the off-the-shelf `model=...` (a random init is kept by the run, as train does)."""
    from peftsmooth.models import model_label
    from peftsmooth.runtime import freeze

    if base is not None:
        from peftsmooth.runs import load_run

        classifier, _ = load_run(cfg.base)
        fields = {"model": base.model, "model_name": base.model_name, "adapt": base.adapt,
                  "input_size": base.input_size, "dataset": base.dataset or cfg.dataset}
        return classifier, fields
    model_cfg = OmegaConf.create(to_plain(cfg.model))
    classifier = freeze(run.build_classifier(model_cfg, cfg.dataset))
    fields = {"model": model_cfg, "model_name": model_label(cfg.model, hydra_choice("model")), "adapt": None,
              "input_size": classifier.input_size, "dataset": cfg.dataset}
    return classifier.eval(), fields


def _method(name: str, denoiser_cfg) -> str:
    """'dncnn-mse', 'dncnn-stability'; started from another run: 'dncnn-stability+mse' ("Stab+MSE")."""
    method = f"{name}-{denoiser_cfg.objective}"
    if denoiser_cfg.get("init"):
        from peftsmooth.runs import read_run_info

        init_objective = read_run_info(denoiser_cfg.init, "denoiser.init").extra.get("objective") or "init"
        method += f"+{init_objective}"
    return method


def _eval_settings(train_cfg):
    """Only the evaluation settings of the train block (a ddpm run has nothing to optimize)."""
    from peftsmooth.train.settings import TrainSettings

    keys = ("eval_batch_size", "max_eval", "precision")
    return TrainSettings.from_cfg({k: train_cfg[k] for k in keys if k in train_cfg})


def check_denoise_baseline(cfg) -> None:
    """Every check denoise-baseline makes before a model, data or the network (the CLI runs it before
    Hydra starts): the denoiser's class, objective and init run, train.*, resume=, base= or the model."""
    from hydra.utils import get_class

    from peftsmooth.models import check_model_config
    from peftsmooth.runs import read_run_info
    from peftsmooth.runtime import resolve_device
    from peftsmooth.train.losses import build_objective
    from peftsmooth.train.run import check_resume
    from peftsmooth.train.settings import TrainSettings, check_precision

    try:
        trains = bool(getattr(get_class(str(cfg.denoiser._target_)), "trains", True))
    except Exception as err:  # noqa: BLE001 - an unimportable _target_ is the user's to fix
        raise UserError(f"denoiser._target_={cfg.denoiser.get('_target_')} cannot be imported ({err})") from None
    if trains:
        build_objective(str(cfg.denoiser.objective), "denoiser.objective")
        check_precision(TrainSettings.from_cfg(cfg.train), resolve_device(cfg.device))
    if cfg.denoiser.get("init"):
        read_run_info(cfg.denoiser.init, "denoiser.init")
    check_resume(cfg.get("resume"), "denoise-baseline")
    if _base_info(cfg) is None:
        check_model_config(cfg.model, cfg.dataset.image_size)


def run_denoise_baseline(cfg) -> dict:
    from hydra.utils import instantiate

    from peftsmooth.front.denoisers import DenoisedClassifier
    from peftsmooth.runtime import resolve_device, seed_everything
    from peftsmooth.train.losses import build_objective
    from peftsmooth.train.run import Run
    from peftsmooth.train.settings import TrainSettings

    # --- everything that can be wrong is checked before any work
    check_denoise_baseline(cfg)
    seed_everything(int(cfg.seed))  # the denoiser's initialization
    front = instantiate(cfg.denoiser)
    objective = build_objective(str(cfg.denoiser.objective), "denoiser.objective") if front.trains else None
    settings = TrainSettings.from_cfg(cfg.train) if front.trains else None
    run = Run.open(cfg, "denoise-baseline", resolve_device(cfg.device), settings)
    base = _base_info(cfg)
    denoiser = front.build()  # ddpm: checks for diffusers, loads the model, checks its image size
    classifier, fields = _classifier(cfg, base, run)
    model = DenoisedClassifier(denoiser, classifier).to(run.dist_info.device)
    name = hydra_choice("denoiser", type(denoiser).__name__.lower())
    method = _method(name, cfg.denoiser) if front.trains else name
    run.start(_run_info(cfg, run, base, method, fields, model, denoiser, trains=front.trains))
    log.info("%s: denoiser %s (%s trainable of %s parameters) in front of a frozen %s, sigma=%g", method,
             type(denoiser).__name__, f"{run.info.trainable_params:,}", f"{run.info.total_params:,}",
             fields["model_name"], float(cfg.sigma))

    started = time.time()
    metrics, files = _train_or_evaluate(cfg, run, front, model, objective, settings, method)
    info = run.finish(files)
    summary = {"run_dir": str(run.path), "method": method, "trainable_params": info.trainable_params,
               "total_params": info.total_params,
               **{k: metrics.get(k) for k in ("clean_acc", "noisy_acc", "test_mse") if k in metrics},
               "elapsed_seconds": round(time.time() - started, 3)}
    log.info("done: %s", " ".join(f"{k}={v}" for k, v in summary.items()))
    print(f"denoise-baseline: {method}: noisy_acc={summary.get('noisy_acc')} run dir {run.path}")
    return summary


def _run_info(cfg, run, base: RunInfo | None, method: str, fields: dict, model, denoiser, trains: bool) -> RunInfo:
    """run.json's fields: the classifier's (from the base run or model=...), the denoiser as `front`,
    and the base run's adaptation files linked here (command, argv and the rest are the lifecycle's)."""
    from peftsmooth.models import count_parameters

    trainable, total = count_parameters(model)
    data_cfg = to_plain(fields["dataset"])
    base_files = link_run_files(cfg.base, base.files, run.path) if base and base.adapt else []
    return RunInfo.from_fields(
        method=method, **fields, num_classes=int(data_cfg["num_classes"]), image_size=list(data_cfg["image_size"]),
        sigma=float(cfg.sigma), front=cfg.denoiser,
        base=str(Path(str(cfg.base)).expanduser().resolve()) if base else None,
        objective=str(cfg.denoiser.objective) if trains else None, timestep=getattr(denoiser, "timestep", None),
        trainable_params=trainable, total_params=total, seed=int(cfg.seed), files=base_files)


def _train_or_evaluate(cfg, run, front, model, objective, settings, method: str) -> tuple[dict, list]:
    """Train the denoiser with the shared loop, or (ddpm) evaluate once as "epoch 0"."""
    from peftsmooth.data import build_dataset
    from peftsmooth.train.loop import fit

    data_cfg = OmegaConf.create(run.info.dataset)
    test_set = build_dataset(data_cfg, "test")
    sigma, seed = float(cfg.sigma), int(cfg.seed)
    if not front.trains:
        if not cfg.evaluate:
            return {}, []
        return run.evaluate_once(model, denoiser_evaluator(test_set, sigma, _eval_settings(cfg.train), seed)), []
    train_set = build_dataset(data_cfg, "train", augment=bool(cfg.train.get("augment", True)))
    evaluate = denoiser_evaluator(test_set, sigma, settings, seed) if cfg.evaluate else None
    result = fit(model, train_set, sigma=sigma, settings=settings, run_dir=run.path, objective=objective,
                 evaluate=evaluate, save=lambda m, d: front.save(m.denoiser, d), config=run.fingerprint,
                 seed=seed, dist_info=run.dist_info, describe=method)
    return result["metrics"], list(result["files"])


main = hydra_app("denoise-baseline", run_denoise_baseline, check=check_denoise_baseline)
