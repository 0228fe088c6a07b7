"""Where the configs live, the Hydra app wrapper every command uses, and CLI validation.

The configs are the package `peftsmooth.conf` (the top-level `conf/` folder, mapped into the package
by pyproject.toml), so they are found from any working directory, installed editable or not.
"""

from __future__ import annotations

import functools
import importlib.util
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

from peftsmooth.errors import UserError, choice_error, die


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


def _override_values(override: Any) -> list[str]:
    if override.is_sweep_override():
        return [str(v) for v in override.sweep_string_iterator()]
    value = override.value()
    return [] if value is None else [str(value)]


def validate_cli_args(command: str, args: list[str]) -> None:
    """Check config-group choices (and, for single runs, compose the config) before Hydra starts."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    parsed, _unknown = get_args_parser().parse_known_args(args)
    if parsed.help or parsed.hydra_help or parsed.shell_completion or parsed.info:
        return
    try:
        overrides = OverridesParser.create().parse_overrides(parsed.overrides)
    except HydraException as err:
        raise UserError(str(err).splitlines()[0]) from None
    root = conf_dir()
    for ov in overrides:
        group = ov.key_or_group
        if ov.is_delete() or group.startswith("hydra") or not (root / group).is_dir():
            continue
        allowed = group_choices(group)
        for value in _override_values(ov):
            if value not in allowed:
                raise choice_error(group, value, allowed)
    if parsed.multirun:
        return
    from hydra import compose, initialize_config_dir

    plain = [o for o in parsed.overrides if not o.lstrip("+~").startswith("hydra")]
    try:
        with initialize_config_dir(config_dir=str(root), version_base="1.3"):
            compose(config_name=config_name(command), overrides=plain)
    except (HydraException, OmegaConfBaseException) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        message = lines[0] if lines else type(err).__name__
        cause = err.__cause__
        if cause is not None and str(cause).strip():
            message += " " + str(cause).strip().splitlines()[0]
        raise UserError(message) from None


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


def _remove_if_unstarted(run_dir: Path) -> None:
    """After a UserError, drop a run dir that holds only Hydra's own files (nothing was produced)."""
    if not run_dir.is_dir():
        return
    produced = [p for p in run_dir.iterdir() if p.name != ".hydra" and p.suffix != ".log"]
    if not produced:
        shutil.rmtree(run_dir, ignore_errors=True)


def check_common(cfg) -> None:
    """Checks every command shares: sigma is a non-negative number where it is set."""
    sigma = cfg.get("sigma")
    if sigma is None:
        return
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
        raise UserError(f"sigma={sigma} is not a number (the Gaussian noise std in [0,1] pixel units, e.g. 0.25, 0.5, 1.0)")
    if sigma < 0:
        raise UserError(f"sigma={sigma} must be >= 0 (the Gaussian noise std in [0,1] pixel units, e.g. 0.25, 0.5, 1.0)")


def hydra_app(command: str, run_fn: Callable[[Any], Any]) -> Callable[[], Any]:
    """Wrap `run_fn(cfg)` as the command's Hydra main; a UserError becomes one line + exit 2."""
    import hydra

    @functools.wraps(run_fn)
    def task(cfg):
        try:
            check_common(cfg)
            return run_fn(cfg)
        except UserError as err:
            try:
                _remove_if_unstarted(output_dir())
            except Exception:  # noqa: BLE001 - cleanup is best effort
                pass
            die(command, str(err))

    return hydra.main(config_path=str(conf_dir()), config_name=config_name(command), version_base="1.3")(task)
