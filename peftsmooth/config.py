"""Where the configs live, the Hydra app wrapper every command uses, and the command line of a run.

The configs are the package `peftsmooth.conf` (the top-level `conf/` folder, mapped into the package
by pyproject.toml), so they are found from any working directory, installed editable or not.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shlex
import shutil
from pathlib import Path
from typing import Any, Callable

from peftsmooth.errors import UserError, die


def conf_dir() -> Path:
    """Absolute path of the config folder (works for editable and regular installs)."""
    spec = importlib.util.find_spec("peftsmooth.conf")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("peftsmooth.conf not found: is peftsmooth installed?")
    return Path(list(spec.submodule_search_locations)[0]).resolve()


def config_name(command: str) -> str:
    return command.replace("-", "_")


def group_choices(group: str) -> list[str]:
    """The choices of a config group: the YAML files in conf/<group>/."""
    folder = conf_dir() / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def format_command(command: str, args: list[str]) -> str:
    """The shell line that reproduces a run (recorded in run.json)."""
    return " ".join(["peftsmooth", command, *(shlex.quote(a) for a in args)])


def hydra_choice(group: str, default=None):
    """The Hydra choice of a config group in this job (e.g. 'lora' for peft), or `default` outside one."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.choices.get(group) or default
    except (ValueError, AttributeError):  # not inside a Hydra job (plain Python use)
        return default


def output_dir() -> Path:
    """This job's Hydra run directory."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


# The deepest directory on the way to this process's run directory that existed before Hydra started
# (noted by peftsmooth.precheck): the directories below it were created by this command.
_EXISTED: list[Path] = []
# An existing run directory's Hydra files (their bytes) and logs (their sizes) before Hydra started: a
# refused command (a resume that fails a check, say) puts them back as they were.
_BEFORE: dict[Path, bytes | int] = {}


def remember_run_dir(run_dir: Path | None) -> None:
    """Note which directories on the way to `run_dir` exist already (before Hydra creates it), and what
    an existing one holds of Hydra's files and logs."""
    _EXISTED.clear()
    _BEFORE.clear()
    if run_dir is not None:
        _EXISTED.append(next(p for p in [run_dir, *run_dir.parents] if p.is_dir()))
        for path in [*Path(os.path.abspath(run_dir)).glob(".hydra/*"), *Path(os.path.abspath(run_dir)).glob("*.log")]:
            _BEFORE[path] = path.read_bytes() if path.parent.name == ".hydra" else path.stat().st_size


def _restore_existing(run_dir: Path) -> None:
    """After a UserError in a directory that existed before Hydra started: Hydra's files and the logs
    back as they were (Hydra rewrote .hydra/ and the job appended to its log before the refusal)."""
    run_dir = Path(os.path.abspath(run_dir))
    if not _EXISTED or _EXISTED[0] != run_dir:
        return
    _close_log_files(run_dir)
    for path in [*run_dir.glob(".hydra/*"), *run_dir.glob("*.log")]:
        if path not in _BEFORE:
            path.unlink()
    for path, before in _BEFORE.items():
        if isinstance(before, bytes):
            path.write_bytes(before)
        elif path.exists():
            os.truncate(path, before)


def _remove_if_unstarted(run_dir: Path) -> None:
    """After a UserError (or when a command wrote its results elsewhere), drop a run dir that holds
    only Hydra's own files, then the directories above it that this command created and left empty."""
    run_dir = Path(os.path.abspath(run_dir))  # as Hydra makes runtime.output_dir
    if run_dir.is_dir():
        produced = [p for p in run_dir.iterdir() if p.name != ".hydra" and p.suffix != ".log"]
        if produced:
            return
        _close_log_files(run_dir)
        shutil.rmtree(run_dir, ignore_errors=True)
    existed = _EXISTED[0] if _EXISTED else None
    for parent in run_dir.parents:
        if existed is None or existed not in parent.parents:
            break
        try:
            parent.rmdir()  # only an empty directory
        except OSError:
            break


def _close_log_files(run_dir: Path) -> None:
    """Detach the logging handlers that write into `run_dir` (Hydra's job log) before it goes, so
    that a process that carries on (a notebook, a test) does not log into a removed directory."""
    import logging

    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    for logger in loggers:
        for handler in list(logger.handlers):
            if isinstance(handler, logging.FileHandler) and run_dir in Path(handler.baseFilename).parents:
                logger.removeHandler(handler)
                handler.close()


# Datasets whose number of classes is fixed (imagenet's root may hold a subset; folder counts its own)
FIXED_CLASSES = {"cifar10": 10, "cifar100": 100, "digits": 10}


def check_common(cfg) -> None:
    """Checks every command shares: sigma is a non-negative number, device a usable one and an image
    folder (dataset=folder) a usable one, where set."""
    sigma = cfg.get("sigma")
    if sigma is not None:
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
            raise UserError(f"sigma={sigma} is not a number (the Gaussian noise std in [0,1] pixel units, e.g. 0.25, 0.5, 1.0)")
        if sigma < 0:
            raise UserError(f"sigma={sigma} must be >= 0 (the Gaussian noise std in [0,1] pixel units, e.g. 0.25, 0.5, 1.0)")
    if cfg.get("device") is not None:
        from peftsmooth.runtime import resolve_device

        resolve_device(cfg.device)
    dataset = cfg.get("dataset")
    if dataset is not None and hasattr(dataset, "get") and dataset.get("name") == "folder":
        from peftsmooth.data import check_folder

        check_folder(dataset)
    elif dataset is not None and hasattr(dataset, "get") and dataset.get("name") in FIXED_CLASSES:
        known = FIXED_CLASSES[dataset.name]
        if dataset.get("num_classes") != known:  # its labels would overrun the head deep inside training
            raise UserError(f"dataset.num_classes={dataset.get('num_classes')}: {dataset.name} has {known} classes "
                            f"(labels 0-{known - 1}); leave dataset.num_classes at {known}")


# command -> its check of the composed config (no model, data or network), set by hydra_app
CHECKS: dict[str, Callable[[Any], None]] = {}


def hydra_app(command: str, run_fn: Callable[[Any], Any],
              check: Callable[[Any], None] | None = None) -> Callable[[], Any]:
    """Wrap `run_fn(cfg)` as the command's Hydra main; a UserError becomes one line + exit 2.

    `check(cfg)` is the command's validation before work (no model, data or network): the CLI runs
    it on every job's config before Hydra starts (peftsmooth.precheck); `run_fn` starts with it too
    (it usually needs what the check finds, and tests call `run_fn` directly)."""
    import hydra

    if check is not None:
        CHECKS[command] = check

    @functools.wraps(run_fn)
    def task(cfg):
        try:
            check_common(cfg)
            return run_fn(cfg)
        except UserError as err:
            try:
                _restore_existing(output_dir())
                _remove_if_unstarted(output_dir())
            except Exception:  # noqa: BLE001 - cleanup is best effort
                pass
            die(command, str(err))

    return hydra.main(config_path=str(conf_dir()), config_name=config_name(command), version_base="1.3")(task)


def _folder_classes(root):
    from peftsmooth.data import folder_classes

    return folder_classes(root)


def register_resolvers() -> None:
    """The config resolvers every command's YAML may use (registered when this module is imported)."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("peftsmooth_folder_classes", _folder_classes, replace=True)


register_resolvers()
