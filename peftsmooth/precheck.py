"""Before Hydra starts: every job's config composed and checked, so that a refused command creates nothing.

`@hydra.main` creates the job's directory (and writes `.hydra/` and the log file there) before the
command's code runs. So `peftsmooth COMMAND` composes the config of every job first (one for a single
run, one per job of a `-m` sweep, see sweep_jobs) and runs the checks that need no model, data or network:
`config.check_common` and the command's own check (registered by `config.hydra_app`). Only then is
Hydra started. For a single run it also notes the deepest directory on the way to the run directory
that exists already, so that a command refused later (a missing dataset, an unreachable hub) can
remove the directories it created (`config._remove_if_unstarted`).
"""

from __future__ import annotations

import copy
import importlib
import os
from pathlib import Path
from typing import Any

from peftsmooth.errors import UserError, choice_error

# A sweep of more jobs than this is checked on a subset that still holds every swept value once.
MAX_CHECKED_JOBS = 64


def _override_values(override: Any) -> list[str]:
    if override.is_sweep_override():
        return [str(v) for v in override.sweep_string_iterator()]
    value = override.value()
    return [] if value is None else [str(value)]


def validate_cli_args(command: str, args: list[str], module: str | None = None) -> None:
    """Everything that needs no model, data or network, before Hydra starts (and creates a directory):
    config-group choices, then every job's composed config and the checks of the command (its
    `module`, imported here so that it registers them)."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parsed, _unknown = get_args_parser().parse_known_args(args)
    if parsed.help or parsed.hydra_help or parsed.shell_completion or parsed.info:
        return
    try:
        overrides = OverridesParser.create().parse_overrides(parsed.overrides)
    except HydraException as err:
        raise UserError(str(err).splitlines()[0]) from None
    from peftsmooth.config import conf_dir, group_choices

    root = conf_dir()
    for ov in overrides:
        group = ov.key_or_group
        if ov.is_delete() or group.startswith("hydra") or not (root / group).is_dir():
            continue
        allowed = group_choices(group)
        for value in _override_values(ov):
            if value not in allowed:
                raise choice_error(group, value, allowed)
    # --cfg only prints the config: composed, but not held to the command's checks
    check_jobs(command, list(parsed.overrides), multirun=bool(parsed.multirun), checks=not parsed.cfg,
               module=module)


def check_jobs(command: str, overrides: list[str], multirun: bool, checks: bool = True,
               module: str | None = None) -> None:
    """Compose every job of `peftsmooth COMMAND overrides` and (with `checks`) check it (raises UserError)."""
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from peftsmooth.config import CHECKS, check_common, conf_dir, remember_run_dir

    check = _command_check(command, module, CHECKS) if checks else None
    jobs = sweep_jobs(overrides) if multirun else [list(overrides)]
    saved = HydraConfig.instance().cfg  # checks resolve ${hydra:...}; leave Hydra's state as it was
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            for job in jobs:
                cfg = _compose(command, job)
                HydraConfig.instance().set_config(cfg)
                if not multirun:
                    remember_run_dir(_run_dir(cfg))
                if checks:
                    task = _task_config(cfg)
                    check_common(task)
                    if check is not None:
                        check(task)
    finally:
        HydraConfig.instance().cfg = saved


def _command_check(command: str, module: str | None, checks: dict):
    """The command's check, registered when its module is imported."""
    if module is not None:
        importlib.import_module(module)
    return checks.get(command)


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The override lists of the jobs a basic-sweeper multirun launches; of more than MAX_CHECKED_JOBS,
    those that bring a swept value no earlier one had (at most MAX_CHECKED_JOBS of them)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as err:
        raise UserError(str(err).splitlines()[0]) from None
    try:
        jobs = BasicSweeper.split_arguments(parsed, None)[0]
    except HydraException:  # e.g. interval() for another sweeper: check what all jobs share
        return [[o.input_line for o in parsed if not o.is_sweep_override()]]
    if len(jobs) <= MAX_CHECKED_JOBS:
        return jobs
    seen: set[str] = set()
    chosen = []
    for job in jobs:
        if not set(job) <= seen:
            chosen.append(job)
            seen.update(job)
    return chosen[:MAX_CHECKED_JOBS]  # the rest is checked when its job starts


def _compose(command: str, job: list[str]):
    """The job's config with its `hydra` node; without the hydra.* overrides if they alone fail
    (e.g. a launcher plugin that is not installed: Hydra reports that itself)."""
    from hydra import compose
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from peftsmooth.config import config_name

    name = config_name(command)
    plain = [o for o in job if not o.lstrip("+~").startswith("hydra")]
    try:
        return compose(config_name=name, overrides=job, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as err:
        unknown = unknown_key_error(name, plain)
        if unknown is not None:
            raise unknown from None
        if plain == job:
            raise compose_error(err) from None
    try:
        return compose(config_name=name, overrides=plain, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as err:
        raise compose_error(err) from None


def unknown_key_error(name: str, job: list[str]) -> UserError | None:
    """A UserError for the first override of `job` that names no key of the config and no config
    group, with the closest key or group (`modle=` -> `model=`, `certify.nmax` -> `certify.n_max`)."""
    from hydra import compose
    from omegaconf import OmegaConf

    from peftsmooth.config import conf_dir
    from peftsmooth.errors import did_you_mean

    root = conf_dir()
    groups = [o for o in job if (root / o.partition("=")[0]).is_dir()]
    try:
        cfg = compose(config_name=name, overrides=groups)
    except Exception:  # noqa: BLE001 - the group choices fail on their own: Hydra's message says why
        return None
    known = set(_paths(OmegaConf.to_container(cfg, resolve=False)))
    known |= {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", "hydra"))}
    for override in job:
        key, eq, _ = override.partition("=")
        if not eq or key.startswith(("+", "~")) or key in known:
            continue
        parent = key.rpartition(".")[0]
        if parent and parent in known and not _is_open(cfg, parent):
            options = [k for k in known if k.startswith(parent + ".") and "." not in k[len(parent) + 1:]]
            return UserError(f"{key}: {parent} has no such key{did_you_mean(key, options)}"
                             f"{_in_other_choices(key, options)}; its keys: "
                             f"{', '.join(sorted(o.rpartition('.')[2] for o in options))}")
        if not parent:
            return UserError(f"{key}: no such key or config group{did_you_mean(key, known)} "
                             f"(`peftsmooth {name.replace('_', '-')} --help` lists them)")
    return None


def _in_other_choices(key: str, present: list[str]) -> str:
    """'; certify=sequential has certify.n_max' when another choice of the key's group has a key close to
    it that the present choice (whose keys are `present`) lacks (`certify.nmax` under certify=cohen)."""
    import difflib

    from omegaconf import OmegaConf

    from peftsmooth.config import conf_dir, group_choices

    group, _, inner = key.partition(".")
    if not (conf_dir() / group).is_dir() or "." in inner:
        return ""
    having: dict[str, list[str]] = {}  # the close key -> the choices that have it
    for choice in group_choices(group):
        keys = [str(k) for k in OmegaConf.load(conf_dir() / group / f"{choice}.yaml")
                if k != "defaults" and f"{group}.{k}" not in present]
        for close in difflib.get_close_matches(inner, keys, n=1, cutoff=0.8):
            having.setdefault(close, []).append(f"{group}={choice}")
    if not having:
        return ""
    close = max(having, key=lambda k: difflib.SequenceMatcher(None, inner, k).ratio())
    return f"; {' and '.join(sorted(having[close]))} {'have' if len(having[close]) > 1 else 'has'} {group}.{close}"


def _paths(node: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a nested dict, inner nodes included."""
    out = []
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            out += [path, *_paths(value, path)]
    return out


def _is_open(cfg, key: str) -> bool:
    """Whether a node takes new keys (an empty dict such as model.kwargs: `kwargs.x=` is Hydra's to refuse)."""
    from omegaconf import OmegaConf

    node = OmegaConf.select(cfg, key)
    return node is None or (OmegaConf.is_dict(node) and len(node) == 0)


def compose_error(err: Exception) -> UserError:
    """Hydra's / OmegaConf's multi-line report as one line (its first line and its cause's)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    message = lines[0] if lines else type(err).__name__
    cause = err.__cause__
    if cause is not None and str(cause).strip():
        message += " " + str(cause).strip().splitlines()[0]
    return UserError(message)


def _run_dir(cfg) -> Path | None:
    """hydra.run.dir as Hydra will resolve it (the timestamp may still move on by a second)."""
    from omegaconf import OmegaConf

    try:
        return Path(os.path.abspath(str(OmegaConf.select(cfg, "hydra.run.dir"))))
    except Exception:  # noqa: BLE001 - an unresolvable run dir is Hydra's to report
        return None


def _task_config(cfg):
    """The config the command's function receives: everything but the `hydra` node."""
    from omegaconf import open_dict, read_write

    task = copy.deepcopy(cfg)
    with read_write(task), open_dict(task):
        del task["hydra"]
    return task
